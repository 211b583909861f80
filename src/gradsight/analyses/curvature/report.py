"""The `curvature` page and terminal summary of a saved run.

Reads the run directory only (manifest.json and the parquet tables written by the curvature analysis) and
never recomputes a statistic: eigenvalues, traces with their standard errors, the SLQ density, the spectral
criteria (bulk edge, outliers) and the stability numbers come from the tables. The page (template
``analyses/curvature/curvature.html``) is built with `gradsight.report.kit` like every page: plotly.js
inlined once, every figure embedded as script-safe JSON, every user string autoescaped by jinja, and text
handed to plotly entity-escaped first (`kit.ptext`).

The landscape page (`gradsight.analyses.landscape.report`) reads its run with `load_curvature` too and
shares `settings`, `print_head` and `print_tail`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...report.kit import (
    report_path_line,
    KIND_ORDER,
    PALETTE,
    FigureRegistry,
    Subplots,
    figure,
    finite,
    floats,
    fmt_int,
    fmt_num,
    order,
    out_path,
    ptext,
    read_table,
    render_page,
    run_context,
    str_cols,
)
from ...runs.store import read_manifest

__all__ = ["run_findings", "render", "print_summary", "build_context", "curvature_findings", "load_curvature", "CurvatureData",
           "settings", "op_name", "print_head", "print_tail"]

HERE = Path(__file__).parent  # the page template (curvature.html) lives next to this module
TABLES = ("eigenvalues", "trace", "density", "slq_nodes", "spectral_criteria", "stability")
SCOPE_STR = ("scope", "scope_type", "kind")
OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher_true": "true Fisher", "fisher_mc": "MC Fisher",
                  "fisher_empirical": "empirical Fisher"}
Z = 1.96


@dataclass
class CurvatureData:
    """The tables of a curvature or landscape run (`get` returns None for an absent or empty table)."""

    run_dir: Path
    manifest: dict
    tables: dict[str, pd.DataFrame | None]
    notes: list[str] = field(default_factory=list)

    @property
    def analysis(self) -> str:
        return self.manifest.get("analysis", "curvature")

    def get(self, name: str) -> pd.DataFrame | None:
        df = self.tables.get(name)
        return None if df is None or df.empty else df


def load_curvature(run_dir: Path | str) -> CurvatureData:
    """Read the tables of a curvature run, or the landscape table of a landscape run (the manifest's "analysis"
    says which); a missing required table becomes a note, the optional ones (stability, density, trace) None."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    notes: list[str] = []
    tables: dict[str, pd.DataFrame | None] = {}
    wanted = ("landscape",) if man.get("analysis") == "landscape" else TABLES
    for name in wanted:
        p = run_dir / f"{name}.parquet"
        if name == "stability" and not p.exists():
            tables[name] = None  # only with --lr
            continue
        if name in ("density", "slq_nodes", "trace") and not p.exists():
            tables[name] = None  # density/trace only for the scope types that asked for one
            continue
        tables[name] = str_cols(read_table(p, notes, name), SCOPE_STR)
    if man.get("analysis") != "landscape" and not man.get("finished"):
        notes.append("the run has not finished: tables hold the scopes done so far (rerun to resume).")
    return CurvatureData(run_dir, man, tables, notes)


def op_name(man: dict) -> str:
    op = (man.get("curvature") or {}).get("operator") or (man.get("config") or {}).get("operator") or "hessian"
    return OPERATOR_NAMES.get(op, str(op))


def settings(man: dict) -> list[tuple[str, str]]:
    """The options worth a header line, from the manifest's curvature block (or landscape_options block)."""
    cur = man.get("curvature") or man.get("landscape_options") or {}
    keep = ("operator", "method", "objective", "per", "trace_scopes", "density_scopes", "top_k", "bottom_k", "tol", "n_products",
            "n_probes", "n_steps", "lr", "switched_to_eval", "sdpa_math", "n_examples", "n_target_tokens",
            "n_batches", "world_size", "kind", "dims", "steps", "span", "norm", "from_curvature", "to", "trajectory")
    out = []
    for k in keep:
        if k in cur:
            v = cur[k]
            out.append((k, (", ".join(map(str, v)) or "(none)") if isinstance(v, list) else "(none)" if v is None
                        else str(v)))
    return out


# ---------------------------------------------------------------------------------------------------------
# tables for the page


def eigen_rows(data: CurvatureData) -> list[dict]:
    """One row per scope: top eigenvalues (descending), bottom eigenvalues, convergence, products."""
    ev = data.get("eigenvalues")
    if ev is None:
        return []
    out = []
    for scope, g in ev.groupby("scope", sort=False):
        top = g[g["which"] == "top"].sort_values("rank")
        bot = g[g["which"] == "bottom"].sort_values("rank")
        r0 = g.iloc[0]
        out.append({"scope": str(scope), "scope_type": str(r0["scope_type"]), "kind": str(r0["kind"]),
                    "block": "" if int(r0["block"]) < 0 else str(int(r0["block"])),
                    "n_params": fmt_int(r0["n_params"]),
                    "top": ", ".join(fmt_num(x) for x in top["eigenvalue"]),
                    "bottom": ", ".join(fmt_num(x) for x in bot["eigenvalue"]) if len(bot) else "–",
                    "max_residual": fmt_num(g["residual"].max()),
                    "converged": f"{int(g['converged'].sum())}/{len(g)}",
                    "all_converged": bool(g["converged"].all()),
                    "n_products": fmt_int(r0["n_products"])})
    return out


def trace_rows(data: CurvatureData) -> list[dict]:
    tr = data.get("trace")
    if tr is None:
        return []
    out = []
    for r in tr.to_dict("records"):
        se = r["stderr"]
        ci = f"[{fmt_num(r['estimate'] - Z * se)}, {fmt_num(r['estimate'] + Z * se)}]" if finite(se) else "–"
        out.append({"scope": r["scope"], "n_params": fmt_int(r["n_params"]), "estimate": fmt_num(r["estimate"]),
                    "stderr": fmt_num(se), "ci": ci, "n_products": fmt_int(r["n_products"]),
                    "method": str(r["method"]) + (" (exact: sketch spans the block)" if r.get("exact") else ""),
                    "per_param": fmt_num(r["estimate"] / r["n_params"]) if r["n_params"] else "–"})
    return out


def criteria_rows(data: CurvatureData) -> list[dict]:
    cr = data.get("spectral_criteria")
    if cr is None:
        return []
    out = []
    for r in cr.to_dict("records"):
        n_out = int(r["n_outliers"]) if finite(r.get("n_outliers")) and r["n_outliers"] >= 0 else None
        out.append({"scope": r["scope"], "lambda_max": fmt_num(r["lambda_max"]), "lambda_min": fmt_num(r["lambda_min"]),
                    "ratio": fmt_num(r["abs_min_max_ratio"]), "neg_mass": fmt_num(r["neg_mass"]),
                    "pos_mass": fmt_num(r["pos_mass"]), "curv_ratio": fmt_num(r["neg_pos_curvature_ratio"]),
                    "bulk_edge": fmt_num(r["bulk_edge"]), "n_outliers": "–" if n_out is None else str(n_out)})
    return out


def stability_rows(data: CurvatureData) -> list[dict]:
    st = data.get("stability")
    if st is None:
        return []
    return [{"scope": r["scope"], "lr": fmt_num(r["lr"]), "lambda_max": fmt_num(r["lambda_max"]),
             "lr_lmax": fmt_num(r["lr_lmax"]), "lr_trace": fmt_num(r["lr_trace"]),
             "stable": "yes" if r["stable"] else "no", "stable_by_trace": "yes" if r["stable_by_trace"] else "no",
             "unstable": not bool(r["stable"])} for r in st.to_dict("records")]


# ---------------------------------------------------------------------------------------------------------
# figures


def top_by_block_figure(data: CurvatureData) -> dict | None:
    """Largest eigenvalue per block (and per layer kind along depth when layer scopes exist)."""
    ev = data.get("eigenvalues")
    if ev is None:
        return None
    top = ev[(ev["which"] == "top") & (ev["rank"] == 1)]
    traces = []
    blk = top[top["scope_type"] == "block"].sort_values("block")
    if not blk.empty:
        traces.append({"type": "scatter", "mode": "lines+markers", "name": "block (all selected layers)",
                       "x": [int(b) for b in blk["block"]], "y": floats(blk["eigenvalue"]),
                       "line": {"color": "#1d2330", "width": 3},
                       "hovertemplate": "block %{x}: λmax %{y:.4g}<extra></extra>"})
    lay = top[(top["scope_type"] == "layer") & (top["block"] >= 0)]
    for i, k in enumerate(order(lay["kind"].unique(), KIND_ORDER)):
        rows = lay[lay["kind"] == k].sort_values("block")
        traces.append({"type": "scatter", "mode": "lines+markers", "name": ptext(k),
                       "x": [int(b) for b in rows["block"]], "y": floats(rows["eigenvalue"]),
                       "line": {"color": PALETTE[i % len(PALETTE)], "width": 1.5},
                       "hovertemplate": ptext(k) + " block %{x}: λmax %{y:.4g}<extra></extra>"})
    if not traces:
        return None
    sp = Subplots([""])
    fig = figure(traces, sp, 380)
    fig["layout"]["xaxis"].update(title="block", dtick=1)
    fig["layout"]["yaxis"].update(title="top eigenvalue λmax")
    return fig


def density_figure(data: CurvatureData) -> dict | None:
    de = data.get("density")
    if de is None:
        return None
    cr = data.get("spectral_criteria")
    traces, shapes = [], []
    for i, (scope, g) in enumerate(de.groupby("scope", sort=False)):
        y = np.maximum(g["density"].to_numpy(dtype=float), 1e-12)  # log axis: floor the Gaussian tails
        traces.append({"type": "scatter", "mode": "lines", "name": ptext(scope), "x": floats(g["grid"]),
                       "y": floats(y), "line": {"color": PALETTE[i % len(PALETTE)]},
                       "hovertemplate": "λ %{x:.4g}: density %{y:.3g}<extra>" + ptext(scope) + "</extra>"})
        if cr is not None:
            row = cr[cr["scope"] == scope]
            if len(row) and finite(row["bulk_edge"].iloc[0]):
                x = float(row["bulk_edge"].iloc[0])
                shapes.append({"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                               "line": {"dash": "dot", "color": PALETTE[i % len(PALETTE)]}})
    sp = Subplots([""])
    fig = figure(traces, sp, 380, shapes=shapes)
    fig["layout"]["xaxis"].update(title="eigenvalue λ")
    fig["layout"]["yaxis"].update(title="spectral density (log scale)", type="log", exponentformat="power")
    return fig


def trace_figure(data: CurvatureData) -> dict | None:
    tr = data.get("trace")
    if tr is None:
        return None
    se = tr["stderr"].astype(float).fillna(0.0)
    names = [ptext(s) for s in tr["scope"]]
    fig = figure([{"type": "scatter", "mode": "markers", "x": names, "y": floats(tr["estimate"]),
                    "error_y": {"type": "data", "array": floats(Z * se), "visible": True},
                    "marker": {"color": "#0072B2", "size": 8}, "name": "trace ± 1.96 se",
                    "hovertemplate": "%{x}: %{y:.4g}<extra></extra>"}], Subplots([""]), 360)
    fig["layout"]["yaxis"].update(title="trace (Hutch++)")
    fig["layout"]["xaxis"].update(type="category", automargin=True)
    return fig


def stability_figure(data: CurvatureData) -> dict | None:
    st = data.get("stability")
    if st is None:
        return None
    names = [ptext(s) for s in st["scope"]]
    traces = [{"type": "bar", "name": "lr · λmax", "x": names, "y": floats(st["lr_lmax"]), "marker": {"color": "#0072B2"}},
              {"type": "bar", "name": "lr · trace", "x": names, "y": floats(st["lr_trace"]), "marker": {"color": "#E69F00"}}]
    fig = figure(traces, Subplots([""]), 360, barmode="group",
                  shapes=[{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 2, "y1": 2,
                           "line": {"color": "#D55E00", "dash": "dash"}}])
    fig["layout"]["yaxis"].update(title="lr × curvature (stable below 2)")
    fig["layout"]["xaxis"].update(type="category", automargin=True)
    return fig


# ---------------------------------------------------------------------------------------------------------
# findings


def curvature_findings(data: CurvatureData) -> list[dict]:
    """Titles and sentences with the run's numbers (plain text; the template escapes them)."""
    out: list[dict] = []
    op = op_name(data.manifest)
    ev, tr, cr, st = data.get("eigenvalues"), data.get("trace"), data.get("spectral_criteria"), data.get("stability")
    if ev is not None:
        top = ev[(ev["which"] == "top") & (ev["rank"] == 1)]
        lines = []
        m = top[top["scope_type"] == "model"]
        if len(m):
            r = m.iloc[0]
            conv = "converged" if bool(r["converged"]) else f"NOT converged (residual {fmt_num(r['residual'])})"
            lines.append(f"Largest {op} eigenvalue of the whole selection: λmax = {fmt_num(r['eigenvalue'])} "
                         f"({fmt_int(r['n_params'])} parameters, {conv}, {fmt_int(r['n_products'])} Lanczos products).")
            bot = ev[(ev["scope_type"] == "model") & (ev["which"] == "bottom") & (ev["rank"] == 1)]
            if len(bot):
                lines.append(f"Smallest eigenvalue λmin = {fmt_num(bot['eigenvalue'].iloc[0])}"
                             + (" (negative curvature present: not a local minimum of this objective)."
                                if bot["eigenvalue"].iloc[0] < 0 else "."))
        for stype, what in (("block", "block"), ("kind", "layer kind"), ("layer", "layer")):
            sub = top[top["scope_type"] == stype]
            if len(sub) >= 2:
                hi, lo = sub.loc[sub["eigenvalue"].idxmax()], sub.loc[sub["eigenvalue"].idxmin()]
                lines.append(f"Per {what}: the largest top eigenvalue is in {hi['scope']} ({fmt_num(hi['eigenvalue'])}), "
                             f"the smallest in {lo['scope']} ({fmt_num(lo['eigenvalue'])}); ratio "
                             f"{fmt_num(hi['eigenvalue'] / lo['eigenvalue']) if lo['eigenvalue'] else '–'}.")
                if len(m) and hi["eigenvalue"] > 0:
                    lam, tot = float(m["eigenvalue"].iloc[0]), float(sub["eigenvalue"].clip(lower=0).sum())
                    lines.append(f"The whole selection's λmax is {fmt_num(lam / hi['eigenvalue'])} times the largest "
                                 f"{what}'s (the sum over {what}s is {fmt_num(tot)}; a value above 1 means the "
                                 f"off-diagonal {what} couplings add curvature: the top direction spans {what}s).")
                break
        n_nc = int((~ev["converged"].astype(bool)).sum())
        if n_nc:
            lines.append(f"{n_nc} of {len(ev)} eigenvalues did not reach the tolerance (see the residual column; "
                         "raise --max-iter).")
        if lines:
            out.append({"title": "Top eigenvalues", "lines": lines})
    if tr is not None:
        m = tr[tr["scope_type"] == "model"]
        r = m.iloc[0] if len(m) else tr.iloc[0]
        se = float(r["stderr"])
        ci = (f" ± {fmt_num(Z * se)} (95% CI [{fmt_num(r['estimate'] - Z * se)}, {fmt_num(r['estimate'] + Z * se)}])"
              if finite(se) and se > 0 else " (exact)" if bool(r.get("exact")) else "")
        out.append({"title": "Trace", "lines": [
            f"tr = {fmt_num(r['estimate'])}{ci} for {r['scope']}, Hutch++ with {fmt_int(r['n_products'])} products; "
            f"mean eigenvalue {fmt_num(r['estimate'] / r['n_params'])}."]})
    if cr is not None:
        lines = []
        for r in cr[cr["has_density"].astype(bool)].to_dict("records"):
            if finite(r["bulk_edge"]):
                sat = (" — the split is at the end of the computed eigenvalues, so there may be more (raise --top-k)"
                       if bool(r.get("outliers_saturated")) else "")
                lines.append(f"{r['scope']}: {int(r['n_outliers'])} outlier(s) above the bulk edge "
                             f"{fmt_num(r['bulk_edge'])} (largest log-gap of the top eigenvalues' distance to the "
                             f"SLQ median {fmt_num(r.get('bulk_ref'))}; gap margin {fmt_num(r.get('gap_margin'))}{sat}). "
                             f"Negative mass {fmt_num(r['neg_mass'])}, positive mass {fmt_num(r['pos_mass'])}, "
                             f"|λmin/λmax| = {fmt_num(r['abs_min_max_ratio'])}.")
        if lines:
            out.append({"title": "Spectral density", "lines": lines})
    if st is not None:
        lines = []
        m = st[st["scope_type"] == "model"]
        for r in (m if len(m) else st.head(1)).to_dict("records"):
            verdict = ("below 2: gradient descent with this lr is stable along every eigen-direction"
                       if r["stable"] else "at or above 2: beyond the edge of stability (lr · λmax ≥ 2)")
            lines.append(f"lr = {fmt_num(r['lr'])}: lr · λmax = {fmt_num(r['lr_lmax'])}, {verdict}; lr · trace = "
                         f"{fmt_num(r['lr_trace'])} ({'< 2' if r['stable_by_trace'] else '≥ 2'}, the conservative "
                         "bound).")
        n_bad = int((~st["stable"].astype(bool)).sum())
        if n_bad:
            lines.append(f"{n_bad} of {len(st)} scopes have lr · λmax ≥ 2.")
        out.append({"title": "Stability", "lines": lines})
    return out


# ---------------------------------------------------------------------------------------------------------
# page


def build_context(data: CurvatureData) -> dict:
    """The template fields of the curvature page."""
    man = data.manifest
    model = man.get("model") or {}
    registry = FigureRegistry()
    fig = registry.add
    groups = (man.get("curvature") or {}).get("groups") or {}
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight curvature report: {model.get('id') or data.run_dir.name}",
        "operator": op_name(man),
        "groups": [(str(g), int(n)) for g, n in groups.items()],
        "settings": settings(man),
        "notes": data.notes,
        "findings": curvature_findings(data),
        "eigen_rows": eigen_rows(data),
        "trace_rows": trace_rows(data),
        "criteria_rows": criteria_rows(data),
        "stability_rows": stability_rows(data),
        "fig_top": fig("top-block", top_by_block_figure(data)),
        "fig_density": fig("density", density_figure(data)),
        "fig_trace": fig("trace", trace_figure(data)),
        "fig_stability": fig("stability", stability_figure(data)),
        "figures": registry.items,
    }


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables."""
    return curvature_findings(load_curvature(run_dir))


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a curvature run; returns the written path."""
    data = load_curvature(run_dir)
    return render_page("curvature.html", build_context(data), out_path(run_dir, out), search=(HERE,))


# ---------------------------------------------------------------------------------------------------------
# terminal


def print_head(data: CurvatureData, console) -> None:
    """The first lines of a curvature or landscape summary: the run, model and data, and the notes."""
    from rich.text import Text

    man = data.manifest
    model = man.get("model") or {}
    console.print(Text.assemble((f"gradsight {data.analysis} run ", "bold"), (str(data.run_dir), "cyan")))
    console.print(Text("model ", style="dim") + Text(str(model.get("id") or "(unknown)")))
    console.print(Text("data  ", style="dim") + Text(str((man.get("data") or {}).get("path") or "(unknown)")))
    for note in data.notes:
        console.print(Text("note: ", style="dim") + Text(note))


def print_tail(data: CurvatureData, findings: list[dict], console) -> None:
    """The last lines of a curvature or landscape summary: the findings and the report path."""
    from rich.text import Text

    for f in findings:
        console.print(Text(f["title"], style="bold cyan"))
        for line in f["lines"]:
            console.print(Text("  " + line))
    console.print(report_path_line(data.run_dir))


def print_summary(run_dir: Path | str, console=None) -> None:
    """The eigenvalue and trace tables (and stability) and the findings of a curvature run.

    User text (scope names, paths) is printed as rich ``Text``, never parsed as markup.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    data = load_curvature(run_dir)
    man = data.manifest
    print_head(data, console)

    def table(*cols: str) -> Table:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right", overflow="fold", max_width=48)
        return t

    rows = eigen_rows(data)
    if rows:
        t = table("scope", "params", "top eigenvalues", "bottom", "converged", "products")
        for r in rows[:40]:
            t.add_row(Text(r["scope"]), r["n_params"], r["top"], r["bottom"], r["converged"], r["n_products"])
        console.print(Text(f"{op_name(man)} eigenvalues", style="bold"))
        console.print(t)
    trs = trace_rows(data)
    if trs:
        t = table("scope", "trace", "95% CI", "products")
        for r in trs[:40]:
            t.add_row(Text(r["scope"]), r["estimate"], r["ci"], r["n_products"])
        console.print(t)
    sts = stability_rows(data)
    if sts:
        t = table("scope", "lr·λmax", "lr·trace", "stable")
        for r in sts[:40]:
            t.add_row(Text(r["scope"]), r["lr_lmax"], r["lr_trace"], Text(r["stable"], style="" if r["stable"] == "yes"
                                                                            else "bold red"))
        console.print(t)
    print_tail(data, curvature_findings(data), console)
