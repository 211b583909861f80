"""The `layers` page and terminal summary of a saved run (reads the run directory only, never a model).

The page (template ``analyses/layers/report.html``, built with `gradsight.report.kit`) is a single file:
plotly.js is inlined once, every figure is embedded as JSON and drawn with ``Plotly.newPlot``; there are no
external URLs. All user text (prompts, responses, ids, group names, reasons, paths) goes through jinja2
autoescaping; JSON placed inside ``<script>`` has ``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc., and text
handed to plotly (which renders a small HTML subset) is entity-escaped first.

The report never recomputes statistics: curves, CIs, MAD, RD and tests are read from the run's tables
(`data.load_run`). It only averages over depth for display (depth-mean of the summary curves and of each
example's layer values). Figures are in `figures`.

The terminal summary (`print_summary`, rich) is readable at 80-100 columns and when not a TTY; all user text
(group names, reasons, paths) is rendered as plain `Text`, never parsed as rich markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ...report.kit import (
    report_path_line,
    clip_text,
    flatten,
    fmt_int,
    fmt_num,
    fmt_p,
    isnan,
    order,
    out_path,
    render_page,
    run_context,
    script_json,
    skip_reason_counts,
    slug,
)
from .data import (
    ALPHA,
    DIST_METRICS,
    MAD_METRICS,
    MAX_EXAMPLE_ROWS,
    METRIC_LABELS,
    SEGMENTS,
    RunData,
    depth_mean_table,
    group_counts,
    load_run,
    mad_value,
    whole_depth_tests,
)
from .figures import curves_figure, distribution_figure, heatmap_figure

__all__ = ["run_findings", "render", "print_summary", "build_context", "findings", "load_run", "RunData", "fmt_num", "fmt_p",
           "skip_reason_counts"]

HERE = Path(__file__).parent  # the page template (report.html) lives next to this module
TOP_TESTS = 12  # whole-depth tests listed by the terminal summary


# ---------------------------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------------------------


def loss_reduction(manifest: dict) -> str:
    for k, v in flatten(manifest.get("config") or {}).items():
        if k.split(".")[-1].lower() == "reduction" and isinstance(v, str):
            return v.lower()
    return "mean"


def _sig(p: float, q: float | None = None) -> bool:
    x = q if q is not None and not isnan(q) else p
    return not isnan(x) and float(x) < ALPHA


def p_phrase(p: Any, n_perm: Any = None, name: str = "p") -> str:
    s = fmt_p(p, n_perm)
    return f"{name} {s[0]} {s[1:]}" if s.startswith("<") else f"{name} = {s}"


def _sig_phrase(recs: list[dict]) -> str:
    """'p < 0.001 (significant at 0.05)' for one pair; for several pairs, which are and which are not."""

    def pair(r: dict) -> str:
        return f"{r['group_a']} vs {r['group_b']}"

    untested = [r for r in recs if isnan(r.get("p_value"))]
    recs = [r for r in recs if not isnan(r.get("p_value"))]
    parts = []
    if len(recs) == 1:
        r = recs[0]
        s = "significant" if _sig(r.get("p_value")) else "not significant"
        parts.append(f"{pair(r)}: {p_phrase(r.get('p_value'), r.get('n_perm'))} ({s} at {ALPHA})")
    elif recs:
        sig = [r for r in recs if _sig(r.get("p_value"))]
        non = [r for r in recs if not _sig(r.get("p_value"))]
        if not sig:
            parts.append(f"not significant at {ALPHA} for any pair")
        else:
            parts.append(f"significant at {ALPHA} for {len(sig)} of {len(recs)} pairs")
            if non:
                parts.append("not for " + ", ".join(
                    f"{pair(r)} ({p_phrase(r.get('p_value'), r.get('n_perm'))})" for r in non))
    for r in untested:
        note = str(r.get("note") or "").strip()
        parts.append(f"{pair(r)} not tested" + (f" ({note})" if note and note != "nan" else ""))
    return "; ".join(parts)


def findings(data: RunData) -> list[dict]:
    """Short sentences generated from the tables. Each item: {"title": str, "lines": [str, ...]}."""
    out: list[dict] = []
    dm = depth_mean_table(data)
    groups = data.groups
    wt = whole_depth_tests(data)
    counts = group_counts(data)

    def tests_for(kind: str, metric: str, test: str) -> list[dict]:
        if wt is None:
            return []
        r = wt[(wt["kind"] == kind) & (wt["metric"] == metric) & (wt["test"] == test)]
        return r.to_dict("records")

    # --- headline over kinds -------------------------------------------------------------------------------
    if dm is not None and "nuclear" in data.metrics and len(groups) >= 2:
        largest: dict[str, int] = {}
        flattest_not: dict[str, int] = {}
        n_k = 0
        for kind in data.kinds:
            vals = {g: dm.get((g, kind, "nuclear"), float("nan")) for g in groups}
            vals = {g: v for g, v in vals.items() if not isnan(v)}
            if len(vals) < 2:
                continue
            n_k += 1
            gmax = max(vals, key=vals.get)
            largest[gmax] = largest.get(gmax, 0) + 1
            mads = {g: mad_value(data, g, kind, "nuclear") for g in vals}
            mads = {g: v for g, v in mads.items() if not isnan(v)}
            if mads:
                gm = max(mads, key=mads.get)
                flattest_not[gm] = flattest_not.get(gm, 0) + 1
        if n_k:
            lines = []
            g1 = max(largest, key=largest.get)
            lines.append(f"{g1} has the largest depth-mean nuclear norm in {largest[g1]} of {n_k} layer kinds.")
            if flattest_not:
                g2 = max(flattest_not, key=flattest_not.get)
                lines.append(
                    f"{g2} has the least flat nuclear-norm curve (largest MAD over the whole depth) in "
                    f"{flattest_not[g2]} of {n_k} layer kinds."
                )
            out.append({"title": "Overview", "lines": lines})

    # --- response length caveat ----------------------------------------------------------------------------
    lens = [(c["group"], c["n_target"]) for c in counts if not isnan(c["n_target"])]
    if lens:
        txt = ", ".join(f"{g} {v:.1f}" for g, v in lens)
        lines = [f"Mean response length (supervised target tokens, ok examples): {txt}."]
        red = loss_reduction(data.manifest)
        if len(lens) >= 2:
            glong = max(lens, key=lambda t: t[1])
            gshort = min(lens, key=lambda t: t[1])
            ratio = glong[1] / gshort[1] if gshort[1] > 0 else float("inf")
        else:
            glong = gshort = lens[0]
            ratio = 1.0
        if red == "sum":
            lines.append(
                "The loss is summed over response tokens (reduction=sum), so gradient norms grow with response "
                "length; longer responses are expected to give larger norms for that reason alone."
            )
        else:
            lines.append(
                "The loss is the token-mean over response tokens, so at equal per-token difficulty the gradient "
                "shrinks as the response gets longer: a group with longer responses is expected to have smaller "
                "norms for that reason alone."
            )
        if len(lens) >= 2 and ratio >= 1.5:
            lines.append(
                f"Here {glong[0]} responses are {ratio:.1f}× longer than {gshort[0]}: compare at matched lengths "
                "or with a summed loss (reduction \"sum\") before attributing norm differences to the answer style."
            )
        if "erank" in data.metrics:
            lines.append(
                "Effective rank and σ1 ratio are bounded by the token count (rank(G) ≤ T): longer sequences can "
                "have a higher effective rank for purely structural reasons."
            )
        out.append({"title": "Response length", "lines": lines})

    # --- per kind, nuclear norm ----------------------------------------------------------------------------
    if dm is not None and "nuclear" in data.metrics:
        for kind in data.kinds:
            vals = [(g, dm.get((g, kind, "nuclear"), float("nan"))) for g in groups]
            vals = [(g, v) for g, v in vals if not isnan(v)]
            if not vals:
                continue
            lines = []
            vals.sort(key=lambda t: -t[1])
            g0, v0 = vals[0]
            if len(vals) == 1:
                lines.append(f"Depth-mean nuclear norm of {g0}: {fmt_num(v0)}.")
            elif len(vals) == 2:
                g1, v1 = vals[1]
                fac = f"{v0 / v1:.2f}×" if v1 > 0 else "∞×"
                lines.append(
                    f"{g0} has the larger depth-mean nuclear norm: {fmt_num(v0)} vs {fmt_num(v1)} for {g1} ({fac})."
                )
            else:
                rest = ", ".join(
                    f"{g} {fmt_num(v)} ({v0 / v:.2f}× smaller)" if v > 0 else f"{g} {fmt_num(v)}"
                    for g, v in vals[1:]
                )
                lines.append(f"{g0} has the largest depth-mean nuclear norm ({fmt_num(v0)}); then {rest}.")
            mads = [(g, mad_value(data, g, kind, "nuclear")) for g in groups]
            mads = [(g, v) for g, v in mads if not isnan(v)]
            txt = ""
            if mads:
                txt = "MAD over the whole depth: " + ", ".join(f"{g} {fmt_num(v)}" for g, v in mads) + "."
            rels = [(g, mad_value(data, g, kind, "nuclear", column="rel_value")) for g in groups]
            rels = [(g, v) for g, v in rels if not isnan(v)]
            if rels:
                txt += (" Scale-free flatness MAD/mean (level removed): "
                        + ", ".join(f"{g} {fmt_num(v)}" for g, v in rels) + ".")
            sig_txt = []
            for test, label in (("mad_diff", "MAD difference"), ("rel_mad_diff", "MAD/mean difference"),
                                ("mean_diff", "mean difference")):
                recs = tests_for(kind, "nuclear", test)
                if recs:
                    sig_txt.append(f"{label} {_sig_phrase(recs)}")
            if sig_txt:
                joined = "; ".join(sig_txt)
                txt += (" " if txt else "") + joined[0].upper() + joined[1:] + "."
            if txt:
                lines.append(txt)
            out.append({"title": f"Nuclear norm, {kind}", "lines": lines})

    # --- sigma1 ratio / erank, averaged over kinds ---------------------------------------------------------
    if dm is not None:
        for metric in ("sigma1_ratio", "erank"):
            if metric not in data.metrics:
                continue
            vals = []
            for g in groups:
                v = [dm.get((g, k, metric), float("nan")) for k in data.kinds]
                v = [x for x in v if not isnan(x)]
                if v:
                    vals.append((g, sum(v) / len(v)))
            if vals:
                txt = ", ".join(f"{g} {fmt_num(v)}" for g, v in vals)
                out.append(
                    {
                        "title": METRIC_LABELS.get(metric, metric),
                        "lines": [f"Depth-mean averaged over layer kinds: {txt}."],
                    }
                )
    if len(data.kinds) > 1:
        out.append(
            {
                "title": "Reading across kinds",
                "lines": [
                    "Compare groups within a layer kind, not kinds with each other: matrices of different shapes "
                    "(e.g. K/V under grouped-query attention, MLP vs attention) are not on the same scale."
                ],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------


def mad_tables(data: RunData) -> list[dict]:
    m = data.mad
    if m is None or m.empty:
        return []
    out = []
    present = set(m["metric"])
    metrics = [x for x in MAD_METRICS if x in present] or [x for x in data.metrics if x in present][:3]
    for metric in metrics:
        mm = m[m["metric"] == metric]
        segs = [s for s in SEGMENTS if s in set(mm["segment"])] + sorted(set(mm["segment"]) - set(SEGMENTS))
        headers = []
        for s in segs:
            r = mm[mm["segment"] == s]
            rng = ""
            if len(r) and {"start", "stop"} <= set(r.columns):
                starts, stops = set(r["start"].dropna().astype(int)), set(r["stop"].dropna().astype(int))
                if len(starts) == 1 and len(stops) == 1:
                    rng = f"blocks [{next(iter(starts))}, {next(iter(stops))})"
                else:
                    rng = "blocks vary by kind"
            headers.append({"name": s, "range": rng})
        has_rel = "rel_value" in mm.columns
        if has_rel:
            headers.append({"name": "all: MAD/mean", "range": "scale-free"})
        rows = []
        for kind in data.kinds:
            for g in data.groups:
                d = mm[(mm["kind"] == kind) & (mm["group"] == g)]
                if d.empty:
                    continue
                vals = {str(s): v for s, v in zip(d["segment"], d["value"])}
                values = [fmt_num(vals.get(s)) for s in segs]
                if has_rel:
                    rel = d.loc[d["segment"] == "all", "rel_value"]
                    values.append(fmt_num(float(rel.iloc[0])) if len(rel) else "")
                rows.append({"kind": kind, "group": g, "color": data.colors[g], "values": values})
        out.append({"metric": metric, "label": METRIC_LABELS.get(metric, metric), "headers": headers, "rows": rows})
    return out


def rd_rows(data: RunData) -> list[dict]:
    r = data.rd
    if r is None or r.empty:
        return []
    morder = {m: i for i, m in enumerate(data.metrics)}
    korder = {k: i for i, k in enumerate(data.kinds)}
    recs = r.to_dict("records")
    recs.sort(key=lambda x: (morder.get(x["metric"], 99), str(x["reference"]), str(x["group"]),
                             korder.get(x["kind"], 99)))
    return [
        {
            "reference": x["reference"],
            "group": x["group"],
            "kind": x["kind"],
            "metric": x["metric"],
            "rd": fmt_num(x.get("rd")),
            "top_blocks": str(x.get("top_blocks", "")).replace(",", ", "),
        }
        for x in recs
    ]


def _test_row(x: dict) -> dict:
    p, q = x.get("p_value"), x.get("q_value")
    return {
        "group_a": x["group_a"],
        "group_b": x["group_b"],
        "kind": x["kind"],
        "metric": x["metric"],
        "test": x["test"],
        "block": fmt_int(x.get("block")) if not isnan(x.get("block")) and int(x.get("block")) >= 0 else "all",
        "statistic": fmt_num(x.get("statistic")),
        "p": fmt_p(p, x.get("n_perm")),
        "q": fmt_p(q),
        "n_perm": fmt_int(x.get("n_perm")),
        "n_a": fmt_int(x.get("n_a")),
        "n_b": fmt_int(x.get("n_b")),
        "n_dropped": fmt_int(x.get("n_dropped")),
        "note": "" if isnan(x.get("note")) else str(x.get("note")),
        "sig": _sig(p, q if x["test"] == "layer_mean_diff" else None),
    }


def test_rows(data: RunData) -> list[dict]:
    w = whole_depth_tests(data)
    if w is None or w.empty:
        return []
    morder = {m: i for i, m in enumerate(data.metrics)}
    korder = {k: i for i, k in enumerate(data.kinds)}
    torder = {"mad_diff": 0, "rel_mad_diff": 1, "mean_diff": 2}
    recs = w.to_dict("records")
    recs.sort(key=lambda x: (morder.get(x["metric"], 99), torder.get(x["test"], 9), str(x["group_a"]),
                             str(x["group_b"]), korder.get(x["kind"], 99)))
    return [_test_row(x) for x in recs]


def layer_test_summary(data: RunData) -> tuple[list[dict], list[dict]]:
    t = data.tests
    if t is None or t.empty:
        return [], []
    lt = t[(t["test"] == "layer_mean_diff") & (t["block"] >= 0)]
    if lt.empty:
        return [], []
    col = "q_value" if lt["q_value"].notna().any() else "p_value"
    summ = []
    for (a, b, m), d in lt.groupby(["group_a", "group_b", "metric"], sort=False):
        n_sig = int((d[col] < ALPHA).sum())
        summ.append({"group_a": a, "group_b": b, "metric": m, "n_sig": n_sig, "n": len(d),
                     "by": "q" if col == "q_value" else "p"})
    morder = {m: i for i, m in enumerate(data.metrics)}
    summ.sort(key=lambda x: (morder.get(x["metric"], 99), x["group_a"], x["group_b"]))
    top = lt.sort_values([col, "p_value"]).head(30)
    return summ, [_test_row(x) for x in top.to_dict("records")]


def example_rows(data: RunData) -> tuple[list[dict], int]:
    ex = data.examples
    if ex is None or ex.empty:
        return [], 0
    status = ex["status"] if "status" in ex else pd.Series(["ok"] * len(ex), index=ex.index)
    ok_idx = ex.index[status == "ok"]
    keep = ex.index
    omitted = 0
    if len(ok_idx) > MAX_EXAMPLE_ROWS:
        drop = ok_idx[MAX_EXAMPLE_ROWS:]
        omitted = len(drop)
        keep = ex.index.difference(drop)
    rows = []
    for x in ex.loc[keep].to_dict("records"):
        rows.append(
            {
                "idx": fmt_int(x.get("idx")),
                "id": x.get("id", ""),
                "group": x.get("group", ""),
                "source": x.get("source", ""),
                "status": x.get("status", "ok"),
                "reason": x.get("reason", ""),
                "n_tokens": fmt_int(x.get("n_tokens")),
                "n_target": fmt_int(x.get("n_target")),
                "loss": fmt_num(x.get("loss")),
                "prompt": clip_text(x.get("prompt", "")),
                "response": clip_text(x.get("response", "")),
            }
        )
    return rows, omitted


# ---------------------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------------------


def build_context(data: RunData) -> dict:
    """The template fields of the layers page."""
    from markupsafe import Markup

    man = data.manifest
    model = man.get("model") or {}
    counts = group_counts(data)
    tot = {
        "records": sum(c["records"] for c in counts),
        "ok": sum(c["ok"] for c in counts),
        "skipped": sum(c["skipped"] for c in counts),
    }

    figures: list[dict] = []
    used_ids: set[str] = set()

    def add_fig(kind: str, metric: str, fig: dict | None) -> dict | None:
        if fig is None:
            return None
        base = f"fig-{kind}-{slug(metric)}"
        fid, n = base, 1
        while fid in used_ids:
            n += 1
            fid = f"{base}-{n}"
        used_ids.add(fid)
        item = {"id": fid, "metric": metric, "label": METRIC_LABELS.get(metric, metric),
                "json": Markup(script_json(fig))}
        figures.append(item)
        return item

    curve_figs = [f for f in (add_fig("curves", m, curves_figure(data, m)) for m in data.metrics) if f]
    dist_figs = [f for f in (add_fig("dist", m, distribution_figure(data, m)) for m in DIST_METRICS) if f]
    heat_metrics = []
    if data.tests is not None and not data.tests.empty:
        lm = data.tests[data.tests["test"] == "layer_mean_diff"]["metric"]
        heat_metrics = order(set(lm), data.metrics)
    heat_figs = [f for f in (add_fig("heat", m, heatmap_figure(data, m)) for m in heat_metrics) if f]

    layer_summary, layer_top = layer_test_summary(data)
    ex_rows, ex_omitted = example_rows(data)
    single_group = len(data.groups) < 2

    trows = test_rows(data)
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight report: {model.get('id') or data.run_dir.name}",
        "kinds": data.kinds,
        "counts": [dict(c, n_target=fmt_num(c["n_target"]), n_tokens=fmt_num(c["n_tokens"]), loss=fmt_num(c["loss"]))
                   for c in counts],
        "totals": tot,
        "skip_reasons": skip_reason_counts(data.examples),
        "notes": data.notes,
        "findings": findings(data),
        "groups": [{"name": g, "color": data.colors[g]} for g in data.groups],
        "single_group": single_group,
        "curve_figs": curve_figs,
        "dist_figs": dist_figs,
        "heat_figs": heat_figs,
        "figures": figures,
        "mad_tables": mad_tables(data),
        "has_mad": data.mad is not None,
        "rd_rows": rd_rows(data),
        "has_rd": data.rd is not None,
        "test_rows": trows,
        "has_tests": data.tests is not None,
        "test_metrics": order({r["metric"] for r in trows}, data.metrics),
        "test_kinds": order({r["kind"] for r in trows}, data.kinds),
        "layer_summary": layer_summary,
        "layer_top": layer_top,
        "alpha": ALPHA,
        "examples": ex_rows,
        "examples_omitted": ex_omitted,
        "max_example_rows": MAX_EXAMPLE_ROWS,
        "statuses": sorted({r["status"] for r in ex_rows}),
    }


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables (the per-example layer stats are not read)."""
    return findings(load_run(run_dir, depth_metrics=None))


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) from the run directory; returns the written path."""
    data = load_run(run_dir)
    return render_page("report.html", build_context(data), out_path(run_dir, out), search=(HERE,))


# ---------------------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------------------


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
    console.print(report_path_line(run_dir))
