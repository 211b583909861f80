"""Figures of the `importance` page, as plain plotly JSON dicts (no graph_objects validation), and the per-layer
summaries that go with them (`overlap_summary`, `allocation_summary`, `score_summary`).

* `curve_figure`: the sparsity-perplexity curves (evaluation.parquet): one panel per structure family
  (unstructured: a curve per method over the target sparsity; N:M: one point per method and pattern; neuron: a
  curve per method over the fraction of neurons removed), the dense model as a dashed line. y = perplexity on a
  log axis (language models) or the mean loss (plain modules).
* `layer_sparsity_figure`: the pruned fraction of each layer, in block order, for the configurations whose
  layers are not all pruned alike (a global threshold, neuron masks, SparseGPT's blocks ...), per
  (structure, sparsity) panel (layers.parquet ``sparsity``).
* `overlap_figure`: per layer, the share of a method's pruned weights that magnitude prunes too at the same
  structure and sparsity (layers.parquet ``overlap_magnitude``), with the share a random mask would reach
  (magnitude's pruned fraction of that layer) dotted.
* `score_figure`: per method (small multiples: the scales differ by orders of magnitude), each layer's median
  score with its 10% - 90% range (scores.parquet).

Layers are drawn in block order with short labels ("3.v" = block 3, kind v); the full name is in the hover.
User text handed to plotly (layer, method and structure names) goes through `kit.ptext`.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ...report.kit import PALETTE, Subplots, figure, floats, fmt_num, fmt_pct, order, ptext

__all__ = ["family", "FAMILIES", "method_colors", "pct", "cfg_label", "at", "layer_order", "layer_labels",
           "varying_configs", "overlap_summary", "allocation_summary", "score_summary",
           "curve_figure", "layer_sparsity_figure", "overlap_figure", "score_figure", "MAX_PANELS", "SPREAD_TOL"]

FAMILIES = ["unstructured", "N:M", "neuron"]  # panel order of the curves
MAX_PANELS = 12  # (structure, sparsity) panels of the per-layer figures
SPREAD_TOL = 1e-6  # layers whose pruned fractions differ by less than this are "all pruned alike"
_NM = re.compile(r"^\d+:\d+$")
DENSE = "#000000"
CHANCE = "#7f7f7f"


def family(structure) -> str:
    """The panel of a structure: "unstructured", "N:M" (2:4, 4:8 ...), "neuron", "dense" or the name itself."""
    s = str(structure)
    return "N:M" if _NM.match(s) else s


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same on every figure of the page."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def pct(x) -> str:
    """A sparsity as a short percentage: 0.5 -> '50%', 0.125 -> '12.5%'."""
    return f"{100 * float(x):.3g}%"


def cfg_label(structure: str, target: float) -> str:
    """'unstructured 50%', 'neuron 25%'; an N:M pattern is its own label ('2:4')."""
    return structure if family(structure) == "N:M" else f"{structure} {pct(target)}"


def at(df: pd.DataFrame, structure: str, target: float) -> pd.DataFrame:
    """The rows of one (structure, sparsity_target) configuration."""
    return df[(df["structure"].astype(str) == structure) & np.isclose(df["sparsity_target"].astype(float), target)]


def layer_order(preferred: list[str], *tables: pd.DataFrame | None) -> list[str]:
    """Layer names in model order (the manifest's layer list), then any other layer of the tables sorted by
    block (stable: table order within a block)."""
    seen: dict[str, int] = {}
    for t in tables:
        if t is not None and len(t) and "layer" in t:
            blocks = t["block"] if "block" in t else pd.Series([-1] * len(t))
            for name, b in zip(t["layer"].astype(str), blocks):
                seen.setdefault(name, int(b) if pd.notna(b) else -1)
    first = [n for n in preferred if n in seen]
    rest = sorted((n for n in seen if n not in set(first)), key=lambda n: seen[n])
    return first + rest


def layer_labels(*tables: pd.DataFrame | None) -> dict[str, str]:
    """Short axis labels "BLOCK.KIND" (unique), else the layer name itself."""
    info: dict[str, tuple[int, str]] = {}
    for t in tables:
        if t is not None and len(t) and {"layer", "block", "kind"} <= set(t.columns):
            for n, b, k in zip(t["layer"].astype(str), t["block"], t["kind"].astype(str)):
                info.setdefault(n, (int(b) if pd.notna(b) else -1, k))
    short = {n: (f"{b}.{k}" if b >= 0 else n) for n, (b, k) in info.items()}
    if len(set(short.values())) < len(short):  # two layers of one kind in a block: keep the full names
        return {n: n for n in info}
    return short


def varying_configs(layers: pd.DataFrame | None) -> list[tuple[str, str, float]]:
    """(method, structure, sparsity_target) whose per-layer pruned fractions are not all the same (neuron masks:
    among the layers they prune, the others being untouched by construction)."""
    if layers is None or layers.empty:
        return []
    out = []
    for key, g in layers.groupby(["method", "structure", "sparsity_target"], sort=False):
        s = g["sparsity"].to_numpy(float)
        if str(key[1]) == "neuron":  # only the neuron layers are pruned: compare those
            s = s[s > 0]
        if len(s) > 1 and np.nanmax(s) - np.nanmin(s) > SPREAD_TOL:
            out.append((str(key[0]), str(key[1]), float(key[2])))
    return out


def overlap_summary(lay: pd.DataFrame | None) -> list[dict]:
    """Per (structure, sparsity, method != magnitude), over the layers it prunes (layers.parquet):

        overlap = Σ_l o_l k_l / Σ_l k_l      o_l = overlap_magnitude of layer l, k_l = sparsity_l · numel_l
        chance  = Σ_l s_l k_l / Σ_l k_l      s_l = magnitude's pruned fraction of layer l

    i.e. the share of all the method's pruned weights that magnitude prunes too, and the share a mask drawn at
    random within each layer would reach; with the layer of the lowest overlap."""
    if lay is None or lay.empty or "overlap_magnitude" not in lay:
        return []
    labels = layer_labels(lay)
    out = []
    for (s, p, m), g in lay.groupby(["structure", "sparsity_target", "method"], sort=False):
        g = g[g["overlap_magnitude"].notna() & (g["sparsity"] > 0)]
        if str(m) == "magnitude" or g.empty:
            continue
        pruned = (g["sparsity"] * g["numel"]).to_numpy(float)  # weights the method prunes per layer
        mag = at(lay[lay["method"].astype(str) == "magnitude"], str(s), float(p)).set_index("layer")["sparsity"]
        chance = mag.reindex(g["layer"]).to_numpy(float)
        lo = g.loc[g["overlap_magnitude"].astype(float).idxmin()]
        out.append({"structure": str(s), "target": float(p), "config": cfg_label(str(s), float(p)), "method": str(m),
                    "overlap": float((g["overlap_magnitude"].to_numpy(float) * pruned).sum() / pruned.sum()),
                    "chance": float(np.nansum(chance * pruned) / pruned.sum()) if np.isfinite(chance).any() else np.nan,
                    "low_layer": labels.get(str(lo["layer"]), str(lo["layer"])), "low": float(lo["overlap_magnitude"]),
                    "n_layers": len(g)})
    return out


def allocation_summary(lay: pd.DataFrame | None) -> list[dict]:
    """Configurations whose layers are pruned unevenly (`varying_configs`): the least and most pruned layer, and
    how many layers are untouched or removed entirely."""
    labels = layer_labels(lay)
    out = []
    for m, s, p in varying_configs(lay):
        g = at(lay[lay["method"].astype(str) == m], s, p)
        h = g[g["sparsity"] > 0] if s == "neuron" else g  # neuron masks: among the neuron layers
        lo, hi = h.loc[h["sparsity"].idxmin()], h.loc[h["sparsity"].idxmax()]
        out.append({"method": m, "config": cfg_label(s, p), "lo": fmt_pct(lo["sparsity"]),
                    "hi": fmt_pct(hi["sparsity"]), "lo_layer": labels.get(str(lo["layer"]), str(lo["layer"])),
                    "hi_layer": labels.get(str(hi["layer"]), str(hi["layer"])),
                    "n_zero": int((g["sparsity"] <= 0).sum()), "n_full": int((g["sparsity"] >= 1).sum()), "n": len(g)})
    return out


def score_summary(sc: pd.DataFrame | None, methods: list[str], formulas: dict[str, str]) -> list[dict]:
    """Per method (scores.parquet): the median over layers of each layer's median score, their range, the
    typical q10 / q90, spread = largest / smallest layer median, and the largest share of exact zeros."""
    if sc is None or sc.empty:
        return []
    out = []
    for m in order(sc["method"].astype(str), methods):
        g = sc[sc["method"].astype(str) == m]
        med = g["median"].to_numpy(float)
        spread = float(np.nanmax(med) / np.nanmin(med)) if np.nanmin(med) > 0 else float("nan")
        out.append({"method": m, "n": len(g), "median": fmt_num(np.nanmedian(med)), "lo": fmt_num(np.nanmin(med)),
                    "hi": fmt_num(np.nanmax(med)), "q10": fmt_num(g["q10"].median()), "q90": fmt_num(g["q90"].median()),
                    "spread": fmt_num(spread), "zero": fmt_pct(g["frac_zero"].max()),
                    "formula": formulas.get(m, "")})
    return out


def _line_axes(sp: Subplots, ytitle: str, yfmt: str | None = ".0%", yrange=(0, 1.02)) -> None:
    for ax in sp.axes("xaxis"):
        ax.update(type="category", tickangle=-45, automargin=True)
    for ax in sp.axes("yaxis"):
        if yfmt:
            ax.update(tickformat=yfmt)
        if yrange:
            ax.update(range=list(yrange))
    sp.layout["yaxis"]["title"] = {"text": ytitle}


def curve_figure(ev: pd.DataFrame | None, methods: list[str], metric: str, label: str, log_y: bool,
                 colors: dict[str, str]) -> dict | None:
    """The sparsity-quality curves, one panel per structure family, the dense model dashed.

    Args:
        ev: evaluation.parquet (method, structure, sparsity_target, sparsity, finite, and the `metric` column).
        methods: methods in page order.
        metric: the column drawn ("ppl" for language models, "nll" = mean loss for plain modules).
        label: its name on the axis and in the hover.
        log_y: a log y axis (perplexity).
        colors: method -> colour.

    Returns:
        a plotly figure dict, or None without any pruned configuration.
    """
    if ev is None or ev.empty:
        return None
    rows = ev[ev["method"].astype(str) != "dense"]
    if rows.empty:
        return None
    dense = ev.loc[ev["method"].astype(str) == "dense", metric]
    dval = float(dense.iloc[0]) if len(dense) else float("nan")
    fam = rows["structure"].map(family)
    fams = order(fam, FAMILIES)
    titles = {"unstructured": "unstructured", "N:M": "N:M (semi-structured)", "neuron": "neurons removed"}
    sp = Subplots([ptext(titles.get(f, f)) for f in fams], max_cols=min(3, len(fams)), hspace=0.07)
    traces, shown = [], set()
    for i, f in enumerate(fams):
        d = rows[fam == f]
        nm = f == "N:M"
        pats = list(dict.fromkeys(d["structure"].astype(str)))
        for m in methods:
            dm = d[d["method"].astype(str) == m]
            if dm.empty:
                continue
            dm = dm if nm else dm.sort_values("sparsity_target", kind="stable")
            x = [pats.index(s) for s in dm["structure"].astype(str)] if nm else floats(dm["sparsity_target"])
            ratio = dm[metric].to_numpy(float) / dval if np.isfinite(dval) and dval else np.full(len(dm), np.nan)
            cd = [[a, b, ptext(s), "" if ok else " (not finite)"] for a, b, s, ok in
                  zip(floats(dm["sparsity"]), floats(ratio), dm["structure"].astype(str), dm["finite"].astype(bool))]
            traces.append(dict(sp.refs(i), type="scatter", mode="markers" if nm else "lines+markers", x=x,
                               y=floats(dm[metric]), name=ptext(m), legendgroup=m, showlegend=m not in shown,
                               marker={"color": colors.get(m, DENSE), "size": 9 if nm else 7},
                               line={"color": colors.get(m, DENSE), "width": 2}, customdata=cd,
                               hovertemplate=ptext(m) + " · %{customdata[2]}%{customdata[3]}<br>achieved sparsity "
                               "%{customdata[0]:.1%}<br>" + label + " %{y:.4g} (×%{customdata[1]:.3g} dense)"
                               "<extra></extra>"))
            shown.add(m)
        if np.isfinite(dval):
            xs = [-0.5, len(pats) - 0.5] if nm else [0.0, float(d["sparsity_target"].max())]
            traces.append(dict(sp.refs(i), type="scatter", mode="lines", x=xs, y=[dval, dval], name="dense",
                               legendgroup="dense", showlegend=i == 0, line={"color": DENSE, "dash": "dash",
                                                                              "width": 1.5},
                               hovertemplate="dense model: " + label + " %{y:.4g}<extra></extra>"))
        k = "" if i == 0 else str(i + 1)
        ax = sp.layout[f"xaxis{k}"]
        if nm:
            ax.update(tickvals=list(range(len(pats))), ticktext=[ptext(p) for p in pats],
                      range=[-0.6, len(pats) - 0.4], title={"text": "pattern (50% of the weights for 2:4)"})
        else:
            ax.update(tickformat=".0%", rangemode="tozero",
                      title={"text": "fraction of neurons removed" if f == "neuron" else "target sparsity"})
    if not traces:
        return None
    for ax in sp.axes("yaxis"):
        if log_y:
            ax.update(type="log")
    sp.layout["yaxis"]["title"] = {"text": label + (" (log scale)" if log_y else "") + ", lower is better"}
    return figure(traces, sp, 380 * sp.rows + 60)


def _panels(keys: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return list(dict.fromkeys(keys))[:MAX_PANELS]


def layer_sparsity_figure(layers: pd.DataFrame | None, names: list[str], labels: dict[str, str],
                          colors: dict[str, str]) -> dict | None:
    """Pruned fraction by layer (block order) of each configuration whose layers differ.

    Args:
        layers: layers.parquet (method, structure, sparsity_target, layer, sparsity).
        names: layer names in block order; labels: name -> axis label; colors: method -> colour.

    Returns:
        a plotly figure dict, or None when every configuration prunes each layer alike.
    """
    vary = varying_configs(layers)
    if not vary:
        return None
    panels = _panels([(s, p) for _, s, p in vary])
    sp = Subplots([ptext(f"{s} at {pct(p)}") for s, p in panels], max_cols=2, hspace=0.08)
    traces, shown = [], set()
    for i, (s, p) in enumerate(panels):
        for m, s2, p2 in vary:
            if (s2, p2) != (s, p):
                continue
            g = layers[(layers["method"].astype(str) == m) & (layers["structure"].astype(str) == s)
                       & np.isclose(layers["sparsity_target"].astype(float), p)]
            g = g.set_index(g["layer"].astype(str)).reindex([n for n in names if n in set(g["layer"].astype(str))])
            traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers", x=[ptext(labels.get(n, n))
                                                                                      for n in g.index],
                               y=floats(g["sparsity"]), name=ptext(m), legendgroup=m, showlegend=m not in shown,
                               marker={"color": colors.get(m, DENSE), "size": 5}, line={"color": colors.get(m, DENSE)},
                               customdata=[[ptext(n)] for n in g.index],
                               hovertemplate=ptext(m) + "<br>%{customdata[0]}<br>pruned %{y:.1%}<extra></extra>"))
            shown.add(m)
    _line_axes(sp, "pruned fraction of the layer")
    return figure(traces, sp, 340 * sp.rows + 60)


def overlap_figure(layers: pd.DataFrame | None, names: list[str], labels: dict[str, str],
                   colors: dict[str, str]) -> dict | None:
    """Per layer, the share of each method's pruned weights that magnitude prunes too (1 = the same weights),
    with the share a random mask would reach (magnitude's pruned fraction of the layer) dotted.

    Returns:
        a plotly figure dict, or None without any overlap (no magnitude configuration to compare with).
    """
    if layers is None or layers.empty or "overlap_magnitude" not in layers:
        return None
    d = layers[(layers["method"].astype(str) != "magnitude") & layers["overlap_magnitude"].notna()
               & (layers["sparsity"] > 0)]
    if d.empty:
        return None
    panels = _panels(list(zip(d["structure"].astype(str), d["sparsity_target"].astype(float))))
    sp = Subplots([ptext(f"{s} at {pct(p)}") for s, p in panels], max_cols=2, hspace=0.08)
    traces, shown = [], set()
    for i, (s, p) in enumerate(panels):
        at = d[(d["structure"].astype(str) == s) & np.isclose(d["sparsity_target"].astype(float), p)]
        present = set(at["layer"].astype(str))
        keep = [n for n in names if n in present]
        for m, g in at.groupby(at["method"].astype(str), sort=False):
            g = g.set_index(g["layer"].astype(str)).reindex([n for n in keep if n in set(g["layer"].astype(str))])
            traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers",
                               x=[ptext(labels.get(n, n)) for n in g.index], y=floats(g["overlap_magnitude"]),
                               name=ptext(m), legendgroup=m, showlegend=m not in shown,
                               marker={"color": colors.get(m, DENSE), "size": 5}, line={"color": colors.get(m, DENSE)},
                               customdata=[[ptext(n)] for n in g.index],
                               hovertemplate=ptext(m) + "<br>%{customdata[0]}<br>%{y:.1%} of its pruned weights "
                                                        "are pruned by magnitude too<extra></extra>"))
            shown.add(m)
        mag = layers[(layers["method"].astype(str) == "magnitude") & (layers["structure"].astype(str) == s)
                     & np.isclose(layers["sparsity_target"].astype(float), p)]
        mag = mag.set_index(mag["layer"].astype(str)).reindex([n for n in keep if n in set(mag["layer"].astype(str))])
        if len(mag):
            traces.append(dict(sp.refs(i), type="scatter", mode="lines", x=[ptext(labels.get(n, n)) for n in mag.index],
                               y=floats(mag["sparsity"]), name="random mask (chance)", legendgroup="chance",
                               showlegend="chance" not in shown, line={"color": CHANCE, "dash": "dot", "width": 1.5},
                               hovertemplate="a random mask: %{y:.1%}<extra></extra>"))
            shown.add("chance")
    _line_axes(sp, "share also pruned by magnitude")
    return figure(traces, sp, 340 * sp.rows + 60)


def score_figure(scores: pd.DataFrame | None, methods: list[str], names: list[str], labels: dict[str, str],
                 colors: dict[str, str]) -> dict | None:
    """Per method, each layer's median score with its 10% - 90% range (log axis when every q10 > 0).

    Returns:
        a plotly figure dict, or None without scores.
    """
    if scores is None or scores.empty:
        return None
    ms = [m for m in methods if m in set(scores["method"].astype(str))]
    if not ms:
        return None
    sp = Subplots([ptext(m) for m in ms], max_cols=min(3, len(ms)), hspace=0.07)
    traces = []
    for i, m in enumerate(ms):
        g = scores[scores["method"].astype(str) == m]
        g = g.set_index(g["layer"].astype(str)).reindex([n for n in names if n in set(g["layer"].astype(str))])
        med, lo, hi = (g[c].to_numpy(float) for c in ("median", "q10", "q90"))
        traces.append(dict(sp.refs(i), type="scatter", mode="markers", x=[ptext(labels.get(n, n)) for n in g.index],
                           y=floats(med), name=ptext(m), showlegend=False,
                           marker={"color": colors.get(m, DENSE), "size": 6},
                           error_y={"type": "data", "symmetric": False, "array": floats(hi - med),
                                    "arrayminus": floats(med - lo), "thickness": 1.2, "width": 2,
                                    "color": colors.get(m, DENSE)},
                           customdata=[[ptext(n), a, b, c] for n, a, b, c in
                                       zip(g.index, floats(g["mean"]), floats(g["frac_zero"]), floats(lo))],
                           hovertemplate="%{customdata[0]}<br>median %{y:.4g}, mean %{customdata[1]:.4g}<br>"
                                         "q10 %{customdata[3]:.4g}; exact zeros %{customdata[2]:.1%}<extra></extra>"))
        k = "" if i == 0 else str(i + 1)
        if np.isfinite(lo).all() and (lo > 0).all():
            sp.layout[f"yaxis{k}"]["type"] = "log"
    for ax in sp.axes("xaxis"):
        ax.update(type="category", tickangle=-45, automargin=True, showticklabels=len(names) <= 60)
    sp.layout["yaxis"]["title"] = {"text": "score (median, 10%–90%)"}
    return figure(traces, sp, 300 * sp.rows + 60)
