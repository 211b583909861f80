"""Compact terminal summary of a saved run (rich; readable at 80-100 columns and when not a TTY).

All user text (group names, reasons, paths) is rendered as plain `Text`, never parsed as rich markup.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .html import (
    ALPHA,
    depth_mean_table,
    fmt_num,
    fmt_p,
    group_counts,
    load_run,
    mad_value,
    skip_reason_counts,
    whole_depth_tests,
)

__all__ = ["print_summary"]

TOP_TESTS = 12


def _t(s: object, style: str = "") -> Text:
    return Text(str(s), style=style)


def print_summary(run_dir: Path | str, console: Console | None = None) -> None:
    """Print the run header, per-kind depth-means and MAD, the top tests and the report path."""
    run_dir = Path(run_dir)
    console = console or Console()
    data = load_run(run_dir, depth_metrics=None)  # the per-example layer stats are not needed here
    man = data.manifest
    model = man.get("model") or {}
    dsrc = man.get("data") or {}

    # ---- header -----------------------------------------------------------------------------------------
    console.print(Text.assemble(("gradsight run ", "bold"), (str(run_dir), "cyan")))
    head = Text()
    head.append("model ", style="dim")
    head.append(str(model.get("id") or "(unknown)"))
    if model.get("n_blocks") is not None:
        head.append(f"  ({model.get('n_blocks')} blocks, {len(model.get('layers') or [])} layers)", style="dim")
    console.print(head)
    dl = Text()
    dl.append("data  ", style="dim")
    dl.append(str(dsrc.get("path") or "(unknown)"))
    if dsrc.get("n_records") is not None:
        dl.append(f"  ({dsrc.get('n_records')} records)", style="dim")
    console.print(dl)

    counts = group_counts(data)
    gt = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    gt.add_column("group", overflow="fold")
    gt.add_column("records", justify="right")
    gt.add_column("ok", justify="right")
    gt.add_column("skipped", justify="right")
    gt.add_column("mean n_target", justify="right")
    for c in counts:
        gt.add_row(
            _t(c["group"]),
            str(c["records"]),
            str(c["ok"]),
            _t(c["skipped"], "bold yellow" if c["skipped"] else ""),
            fmt_num(c["n_target"]),
        )
    if counts:
        console.print(gt)
    n_skip = sum(c["skipped"] for c in counts)
    if n_skip:
        w = Text()
        w.append(f"WARNING: {n_skip} of {sum(c['records'] for c in counts)} examples skipped", style="bold yellow")
        console.print(w)
        for reason, n in skip_reason_counts(data.examples):
            line = Text("  - ")
            line.append(reason)
            line.append(f": {n}", style="bold")
            console.print(line)
    for note in data.notes:
        if "only one group" in note:  # expected, reported once below
            continue
        console.print(Text("note: ", style="dim") + Text(note))

    # ---- per-kind depth-means ---------------------------------------------------------------------------
    dm = depth_mean_table(data)
    metrics = [m for m in ("nuclear", "sigma1_ratio") if m in data.metrics]
    if dm is not None and metrics:
        console.print()
        console.print(Text("Depth-mean per kind (group curves averaged over blocks)", style="bold"))
        kt = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        kt.add_column("kind")
        kt.add_column("group", overflow="fold", max_width=36)
        labels = {"nuclear": "nuclear", "sigma1_ratio": "σ1 ratio"}
        for m in metrics:
            kt.add_column(labels[m], justify="right")
        has_mad = data.mad is not None and "nuclear" in set(data.mad["metric"])
        if has_mad:
            kt.add_column("MAD(all) nuclear", justify="right")
        for kind in data.kinds:
            rows = []
            for g in data.groups:
                vals = [dm.get((g, kind, m), float("nan")) for m in metrics]
                if all(v != v for v in vals):  # all NaN: group absent for this kind
                    continue
                cells = [fmt_num(v) for v in vals]
                if has_mad:
                    cells.append(fmt_num(mad_value(data, g, kind, "nuclear")))
                rows.append([_t(g)] + cells)
            for i, r in enumerate(rows):
                kt.add_row(_t(kind if i == 0 else "", "bold"), *r)
        console.print(kt)

    # ---- tests ------------------------------------------------------------------------------------------
    wt = whole_depth_tests(data)
    if wt is not None and not wt.empty:
        sel = wt[wt["test"].isin(["mad_diff", "rel_mad_diff", "mean_diff"])]
        if "nuclear" in set(sel["metric"]):
            sel_n = sel[sel["metric"] == "nuclear"]
        else:
            sel_n = sel
        sel_n = sel_n.assign(_abs=sel_n["statistic"].abs()).sort_values(["p_value", "_abs"], ascending=[True, False])
        n_sig = int((sel["p_value"] < ALPHA).sum())
        console.print()
        console.print(
            Text(
                f"Whole-depth tests: {n_sig} of {len(sel)} with p < {ALPHA} (all metrics); "
                f"smallest p{' (nuclear)' if 'nuclear' in set(sel['metric']) else ''}:",
                style="bold",
            )
        )
        tt = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            show_edge=False,
        )
        tt.add_column("test")
        tt.add_column("metric")
        tt.add_column("kind")
        tt.add_column("groups (a vs b)", overflow="fold", max_width=40)
        tt.add_column("stat", justify="right")
        tt.add_column("p", justify="right")
        for r in sel_n.head(TOP_TESTS).to_dict("records"):
            p = r.get("p_value")
            sig = p == p and p is not None and float(p) < ALPHA
            tt.add_row(
                _t(r["test"]),
                _t(r["metric"]),
                _t(r["kind"]),
                _t(f"{r['group_a']} vs {r['group_b']}"),
                fmt_num(r.get("statistic")),
                _t(fmt_p(p, r.get("n_perm")), "bold green" if sig else ""),
            )
        console.print(tt)
    elif len(data.groups) < 2:
        console.print(Text("Only one group: no between-group tests.", style="dim"))

    # ---- report path ------------------------------------------------------------------------------------
    rp = run_dir / "report.html"
    line = Text("report ", style="dim")
    line.append(str(rp), style="cyan")
    if not rp.exists():
        line.append("  (not written yet: gradsight.report.render_html(run_dir))", style="dim")
    console.print(line)
