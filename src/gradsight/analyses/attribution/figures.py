"""Figures of the `attribute` page, as plain plotly JSON dicts (no graph_objects validation).

* `score_distribution_figure`: per method, each shown query's score distribution over the training set
  (score_stats.parquet: 5% - 95% quantile bar, median dot, mean cross), with the zero line: a query whose
  bar sits above zero is helped by most training examples.
* `layer_share_figure`: per method, the mean share of |score| carried by each layer (layer_share.parquet);
  methods without a per-layer split (TRAK's whole-model feature: every share 0) are left out.
* `self_influence_figure`: per method, a histogram of the self-influence robust z (self_influence.parquet)
  with the outlier threshold; methods whose self-influence is constant (grad_cos: Σ_k η_k) are left out.

Histograms are binned here (numpy) so that the page carries bar heights, not one number per training example.
User text handed to plotly (query ids, layer and method names) goes through `kit.ptext`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...report.kit import PALETTE, Subplots, figure, floats, ptext

__all__ = ["score_distribution_figure", "layer_share_figure", "self_influence_figure", "constant_methods",
           "OUTLIER_Z", "MAX_FIG_QUERIES", "N_BINS"]

OUTLIER_Z = 3.5  # summarize's outlier flag: robust z > 3.5 (Iglewicz & Hoaglin's modified z-score cut-off)
MAX_FIG_QUERIES = 60  # queries drawn per method in the score-distribution figure
N_BINS = 40  # bins of the self-influence histograms
CONSTANT_RTOL = 1e-6  # a self-influence whose spread is below this x its scale is a constant (float noise only)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def score_distribution_figure(stats: pd.DataFrame | None, methods: list[str], queries: list[int],
                              labels: dict[int, str]) -> dict | None:
    """Per method (one panel each), the 5%-95% quantile bar, median and mean of each query's scores.

    Args:
        stats: score_stats.parquet (method, query, mean, std, q05, median, q95, frac_positive) or None.
        methods: methods in page order.
        queries: query example indices in page order (at most MAX_FIG_QUERIES are drawn).
        labels: query index -> its label on the x axis (id).

    Returns:
        a plotly figure dict, or None without any row.
    """
    if stats is None or stats.empty:
        return None
    ms = [m for m in methods if m in set(stats["method"])]
    if not ms:
        return None
    shown = queries[:MAX_FIG_QUERIES]
    sp = Subplots([ptext(m) for m in ms], max_cols=min(3, len(ms)), hspace=0.07)
    traces = []
    for i, m in enumerate(ms):
        d = stats[stats["method"] == m].set_index("query")
        d = d[d.index.isin(shown)]
        d = d.reindex([q for q in shown if q in d.index])
        if d.empty:
            continue
        x = [ptext(labels.get(int(q), str(q))) for q in d.index]
        med, lo, hi = d["median"].to_numpy(float), d["q05"].to_numpy(float), d["q95"].to_numpy(float)
        traces.append(dict(sp.refs(i), type="scatter", mode="markers", x=x, y=floats(med), name="median",
                           legendgroup="median", showlegend=i == 0, marker={"color": _color(0), "size": 7},
                           error_y={"type": "data", "symmetric": False, "array": floats(hi - med),
                                    "arrayminus": floats(med - lo), "thickness": 1.5, "width": 3,
                                    "color": _color(0)},
                           customdata=[[a, b, c] for a, b, c in zip(floats(lo), floats(hi),
                                                                     floats(d["frac_positive"]))],
                           hovertemplate="%{x}<br>median %{y:.4g}<br>5%–95%: %{customdata[0]:.4g} … "
                                         "%{customdata[1]:.4g}<br>share of training examples that help: "
                                         "%{customdata[2]:.1%}<extra></extra>"))
        traces.append(dict(sp.refs(i), type="scatter", mode="markers", x=x, y=floats(d["mean"]), name="mean",
                           legendgroup="mean", showlegend=i == 0,
                           marker={"color": _color(1), "symbol": "x-thin", "size": 8, "line": {"width": 2,
                                                                                              "color": _color(1)}},
                           hovertemplate="%{x}<br>mean %{y:.4g}<extra></extra>"))
    if not traces:
        return None
    for ax in sp.axes("xaxis"):
        ax.update(type="category", tickangle=-45, automargin=True, showticklabels=len(shown) <= 40)
    for ax in sp.axes("yaxis"):
        ax.update(zeroline=True, zerolinewidth=1.5, zerolinecolor="#888")
    sp.layout["yaxis"]["title"] = {"text": "score (positive = helps)"}
    return figure(traces, sp, 330 * sp.rows + 80)


def layer_share_figure(share: pd.DataFrame | None, methods: list[str], layers: list[str]) -> dict | None:
    """Grouped bars: per layer, each method's mean share of |score| (methods with no per-layer split left out).

    Args:
        share: layer_share.parquet (method, layer, abs_share) or None.
        methods: methods in page order.
        layers: layer names in model order (layers not in it follow in table order).

    Returns:
        a plotly figure dict, or None when no method has a per-layer split.
    """
    if share is None or share.empty:
        return None
    present = list(dict.fromkeys(share["layer"].astype(str)))
    order = [n for n in layers if n in present] + [n for n in present if n not in layers]
    traces = []
    for i, m in enumerate(methods):
        d = share[share["method"] == m]
        if d.empty or not np.nansum(d["abs_share"].to_numpy(float)) > 0:
            continue
        v = d.groupby(d["layer"].astype(str))["abs_share"].mean().reindex(order)
        traces.append(dict(type="bar", x=[ptext(n) for n in order], y=floats(v.to_numpy(float)), name=ptext(m),
                           marker={"color": _color(i)},
                           hovertemplate="%{x}<br>%{fullData.name}: %{y:.1%} of |score|<extra></extra>"))
    if not traces:
        return None
    return {"data": traces, "layout": {
        "height": 380, "barmode": "group", "margin": {"l": 60, "r": 20, "t": 30, "b": 80},
        "yaxis": {"title": {"text": "mean share of |score|"}, "tickformat": ".0%", "rangemode": "tozero"},
        "xaxis": {"type": "category", "automargin": True, "tickangle": -30 if len(order) > 6 else 0},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"}, "font": {"size": 12}}}


def constant_methods(si: pd.DataFrame | None) -> set[str]:
    """Methods whose self-influence is the same number for every example up to float noise (grad_cos: each
    example's cosine with itself is 1, times Σ_k η_k); their robust z is noise and means nothing."""
    out = set()
    if si is None or si.empty:
        return out
    for m, g in si.groupby("method"):
        v = g["self_influence"].to_numpy(float)
        v = v[np.isfinite(v)]
        if v.size and np.ptp(v) <= CONSTANT_RTOL * max(np.abs(v).max(), 1e-300):
            out.add(str(m))
    return out


def self_influence_figure(si: pd.DataFrame | None, methods: list[str]) -> dict | None:
    """Per method, a histogram of the training examples' self-influence robust z, outlier threshold dashed.

    Args:
        si: self_influence.parquet (method, example, self_influence, z, outlier, ...) or None.
        methods: methods in page order.

    Returns:
        a plotly figure dict, or None without any informative method.
    """
    if si is None or si.empty:
        return None
    const = constant_methods(si)
    ms = [m for m in methods if m in set(si["method"]) and m not in const]
    ms = [m for m in ms if np.isfinite(si.loc[si["method"] == m, "z"].to_numpy(float)).any()]
    if not ms:
        return None
    sp = Subplots([ptext(m) for m in ms], max_cols=min(3, len(ms)), hspace=0.07)
    traces = []
    for i, m in enumerate(ms):
        z = si.loc[si["method"] == m, "z"].to_numpy(float)
        z = z[np.isfinite(z)]
        hi = max(float(z.max()), OUTLIER_Z + 0.5)
        lo = min(float(z.min()), -1.0)
        counts, edges = np.histogram(z, bins=N_BINS, range=(lo, hi))
        mid = (edges[:-1] + edges[1:]) / 2
        colors = ["#D55E00" if e0 >= OUTLIER_Z else _color(0) for e0 in edges[:-1]]
        traces.append(dict(sp.refs(i), type="bar", x=floats(mid), y=[int(c) for c in counts],
                           width=float(edges[1] - edges[0]), marker={"color": colors}, showlegend=False,
                           name=ptext(m), customdata=[[a, b] for a, b in zip(floats(edges[:-1]), floats(edges[1:]))],
                           hovertemplate="z in [%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y} examples"
                                         "<extra></extra>"))
        k = "" if i == 0 else str(i + 1)
        sp.layout.setdefault("shapes", []).append(
            {"type": "line", "xref": f"x{k}", "yref": f"y{k} domain", "x0": OUTLIER_Z, "x1": OUTLIER_Z, "y0": 0,
             "y1": 1, "line": {"dash": "dash", "color": "#D55E00", "width": 1.5}})
    for ax in sp.axes("xaxis"):
        ax.update(title={"text": "robust z of self-influence"})
    sp.layout["yaxis"]["title"] = {"text": "training examples"}
    return figure(traces, sp, 300 * sp.rows + 80, bargap=0.02)
