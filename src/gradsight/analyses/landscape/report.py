"""The `landscape` page and terminal summary of a saved run.

Reads the run directory only (manifest.json with its "landscape" block and landscape.parquet, via
`gradsight.analyses.curvature.report.load_curvature`) and never recomputes a loss: the grid or path of
losses, the loss at the trained weights, the interpolation barrier and the PCA plane of a trajectory come
from the run. It only takes central second differences of the grid at the centre for the findings. The
page (template ``analyses/landscape/landscape.html``) is built with `gradsight.report.kit` like every page:
plotly.js inlined once, every figure embedded as script-safe JSON, every user string autoescaped by jinja,
and text handed to plotly entity-escaped first (`kit.ptext`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...report.kit import FigureRegistry, Subplots, figure, finite, floats, fmt_num, out_path, render_page, run_context
from ..curvature.report import CurvatureData, load_curvature, print_head, print_tail, settings

__all__ = ["run_findings", "render", "print_summary", "build_context", "landscape_findings", "landscape_figures"]

HERE = Path(__file__).parent  # the page template (landscape.html) lives next to this module


# ---------------------------------------------------------------------------------------------------------
# figures


def landscape_figures(data: CurvatureData) -> list[dict]:
    """(title, figure) pairs: a 1-D curve, or a 2-D contour plus a surface and the two axis slices."""
    ls = data.get("landscape")
    if ls is None:
        return []
    meta = data.manifest.get("landscape") or {}
    kind = meta.get("kind", "")
    xlab = "t (0 = this model, 1 = the other)" if kind == "interpolate" else "alpha (direction 1)"
    loss = ls["loss"].astype(float)
    if ls["beta"].isna().all():
        fig = figure([{"type": "scatter", "mode": "lines+markers", "x": floats(ls["alpha"]), "y": floats(loss),
                        "name": "loss", "hovertemplate": "%{x:.3g}: loss %{y:.5g}<extra></extra>"}],
                      Subplots([""]), 380)
        fig["layout"]["xaxis"].update(title=xlab)
        fig["layout"]["yaxis"].update(title="loss")
        return [{"title": "1-D slice" if kind != "interpolate" else "Linear interpolation", "fig": fig}]
    a = np.sort(ls["alpha"].unique())
    b = np.sort(ls["beta"].unique())
    Zm = ls.pivot_table(index="beta", columns="alpha", values="loss", dropna=False).reindex(index=b, columns=a)
    z = [floats(row) for row in Zm.to_numpy()]
    contour = figure([{"type": "contour", "x": floats(a), "y": floats(b), "z": z, "colorscale": "Viridis",
                        "contours": {"coloring": "heatmap", "showlabels": True}, "colorbar": {"title": "loss"},
                        "hovertemplate": "α %{x:.3g}, β %{y:.3g}: loss %{z:.5g}<extra></extra>"}],
                      Subplots([""]), 480)
    coords = (meta.get("pca") or {}).get("coords") or {}
    if coords.get("alpha") and coords.get("beta"):  # the checkpoints of a PCA plane, in training order
        contour["data"].append({"type": "scatter", "mode": "lines+markers", "name": "trajectory",
                                "x": floats(coords["alpha"]), "y": floats(coords["beta"]),
                                "marker": {"color": "#ffffff", "size": 7, "line": {"color": "#000000", "width": 1}},
                                "line": {"color": "#ffffff", "dash": "dot"},
                                "hovertemplate": "checkpoint %{pointNumber}: α %{x:.3g}, β %{y:.3g}<extra></extra>"})
    contour["layout"]["xaxis"].update(title="alpha (direction 1)")
    contour["layout"]["yaxis"].update(title="beta (direction 2)", scaleanchor="x")
    surface = {"data": [{"type": "surface", "x": floats(a), "y": floats(b), "z": z, "colorscale": "Viridis",
                         "showscale": False}],
               "layout": {"height": 480, "margin": {"l": 10, "r": 10, "t": 30, "b": 10},
                          "scene": {"xaxis": {"title": "alpha"}, "yaxis": {"title": "beta"},
                                    "zaxis": {"title": "loss"}}}}
    ia = int(np.argmin(np.abs(a))) if len(a) else 0
    ib = int(np.argmin(np.abs(b))) if len(b) else 0
    sp = Subplots(["along alpha (beta = %.3g)" % b[ib], "along beta (alpha = %.3g)" % a[ia]], max_cols=2)
    curves = figure([{"type": "scatter", "mode": "lines+markers", "x": floats(a), "y": floats(Zm.iloc[ib]),
                       "name": "direction 1", **sp.refs(0)},
                      {"type": "scatter", "mode": "lines+markers", "x": floats(b), "y": floats(Zm.iloc[:, ia]),
                       "name": "direction 2", **sp.refs(1)}], sp, 340)
    return [{"title": "Contour", "fig": contour}, {"title": "Surface", "fig": surface},
            {"title": "1-D curves through the centre", "fig": curves}]


# ---------------------------------------------------------------------------------------------------------
# findings


def axis_curvatures(ls: pd.DataFrame, meta: dict) -> list[str]:
    """Central second differences of the loss at the centre along each axis (vs the eigenvalue on Hessian axes)."""
    if meta.get("kind") == "interpolate":
        return []
    out = []
    dirs = meta.get("directions") or []
    for j, (col, other) in enumerate((("alpha", "beta"), ("beta", "alpha"))):
        if col == "beta" and ls["beta"].isna().all():
            break
        line = ls if ls["beta"].isna().all() else ls[np.isclose(ls[other], 0.0)]
        xs = np.sort(line[col].unique())
        i0 = np.flatnonzero(np.isclose(xs, 0.0))
        if len(i0) != 1 or i0[0] == 0 or i0[0] == len(xs) - 1:
            return out
        i = int(i0[0])
        f = line.set_index(col)["loss"]
        h1, h2 = xs[i] - xs[i - 1], xs[i + 1] - xs[i]
        fm, f0, fp = float(f[xs[i - 1]]), float(f[xs[i]]), float(f[xs[i + 1]])
        c = 2 * (h1 * fp + h2 * fm - (h1 + h2) * f0) / (h1 * h2 * (h1 + h2))
        lam = (dirs[j] or {}).get("eigenvalue") if j < len(dirs) else None
        ref = (f" (its Hessian eigenvalue: {fmt_num(lam)}; they agree when the loss is quadratic over one grid step)"
               if finite(lam) else "")
        out.append(f"Curvature at the centre along direction {j + 1}: {fmt_num(c)} (second difference over "
                   f"±{fmt_num(min(h1, h2))}){ref}.")
    return out


def landscape_findings(data: CurvatureData) -> list[dict]:
    """Titles and sentences with the run's numbers (plain text; the template escapes them)."""
    ls = data.get("landscape")
    if ls is None:
        return []
    meta = data.manifest.get("landscape") or {}
    fin = ls[ls["finite"].astype(bool)]
    lines = []
    if meta.get("center_loss") is not None:
        lines.append(f"Loss at the trained weights: {fmt_num(meta['center_loss'])}.")
    if len(fin):
        lo, hi = fin.loc[fin["loss"].idxmin()], fin.loc[fin["loss"].idxmax()]
        interp = meta.get("kind") == "interpolate"
        where = (lambda r: f"{'t' if interp else 'alpha'} {fmt_num(r['alpha'])}"  # noqa: E731
                 + (f", beta {fmt_num(r['beta'])}" if finite(r["beta"]) else ""))
        what = "the linear path between the two models" if interp else f"{meta.get('kind', '?')} directions"
        lines.append(f"Over {len(ls)} points ({what}): minimum {fmt_num(lo['loss'])} at "
                     f"{where(lo)}, maximum {fmt_num(hi['loss'])} at {where(hi)}.")
    n_nan = int((~ls["finite"].astype(bool)).sum())
    if n_nan:
        lines.append(f"{n_nan} points had a non-finite loss (recorded as NaN).")
    pca = meta.get("pca") or {}
    if pca.get("explained_variance_ratio"):
        shares = ", ".join(f"{100 * float(r):.1f}%" for r in pca["explained_variance_ratio"])
        lines.append(f"PCA plane of {len((pca.get('coords') or {}).get('alpha') or []) - 1} checkpoints: the "
                     f"axes explain {shares} of the trajectory's variance (the path is drawn on the contour).")
    lines.extend(axis_curvatures(ls, meta))
    if meta.get("barrier") is not None and finite(meta.get("barrier")):
        lines.append(f"Interpolation barrier (max loss above the straight line): {fmt_num(meta['barrier'])}.")
    return [{"title": "Landscape", "lines": lines}]


# ---------------------------------------------------------------------------------------------------------
# page


def build_context(data: CurvatureData) -> dict:
    """The template fields of the landscape page."""
    man = data.manifest
    model = man.get("model") or {}
    meta = man.get("landscape") or {}
    registry = FigureRegistry()
    fig = registry.add
    land = [{"title": x["title"], "id": fig(f"land-{i}", x["fig"])} for i, x in enumerate(landscape_figures(data))]
    groups = meta.get("groups") or {}
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight landscape report: {model.get('id') or data.run_dir.name}",
        "groups": [(str(g), int(n)) for g, n in groups.items()],
        "settings": settings(man),
        "notes": data.notes,
        "findings": landscape_findings(data),
        "landscape_figs": land,
        "landscape_objective": meta.get("objective") or "the run's objective",
        "landscape_kind": meta.get("kind"),
        "figures": registry.items,
    }


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables."""
    return landscape_findings(load_curvature(run_dir))


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a landscape run; returns the written path."""
    data = load_curvature(run_dir)
    return render_page("landscape.html", build_context(data), out_path(run_dir, out), search=(HERE,))


# ---------------------------------------------------------------------------------------------------------
# terminal


def print_summary(run_dir: Path | str, console=None) -> None:
    """The findings of a landscape run (loss range, curvature at the centre, barrier) and the report path.

    User text (paths) is printed as rich ``Text``, never parsed as markup.
    """
    from rich.console import Console

    console = console or Console()
    data = load_curvature(run_dir)
    print_head(data, console)
    print_tail(data, landscape_findings(data), console)
