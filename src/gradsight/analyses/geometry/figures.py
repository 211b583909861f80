"""Figures of the `geometry` page, as plain plotly JSON dicts: label x label cosine heatmaps, cosines and
conflict rates along depth, conflict rates per kind, coherence, loss-term cosines, the entanglement scatter
and regime shares, PSR/NSR norms, G-Vendi and the noise scale. User text handed to plotly goes through
`kit.ptext`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ...report.kit import (PALETTE, Subplots, figure, finite, floats, fmt_ci, fmt_int, fmt_num, hex_rgba, na, order,
                           ptext)
from .data import (
    ALL,
    GeometryData,
    by_labels,
    first_row,
    get_table,
    note_text,
    pair_name,
    pair_row,
    scoped,
    show_label,
    sqrt_norm,
    unordered,
)

__all__ = ["cosine_heatmaps", "cosine_depth_figure", "conflict_kind_figure", "conflict_depth_figure",
           "coherence_figure", "terms_depth_figure", "entanglement_scatter", "regime_share_figure",
           "ratio_depth_figure", "psr_norm_figure", "psr_cos_depth_figure", "diversity_figure", "noise_figure",
           "MAX_SCATTER", "MAX_PAIR_BARS"]

REGIME_COLORS = {"ideal": "#009E73", "both_up": "#E69F00", "both_down": "#0072B2", "reversed": "#D55E00",
                 "tie": "#7f7f7f", "invalid": "#000000"}
REGIME_TEXT = {"ideal": "ideal (chosen ↑, rejected ↓)", "both_up": "both up", "both_down": "both down",
               "reversed": "reversed", "tie": "tie", "invalid": "invalid", "other": "other (tie / reversed)"}
MAX_SCATTER = 5000  # entanglement points drawn before subsampling
MAX_PAIR_BARS = 15  # label pairs in the conflict-rate bar chart and conflict-vs-depth lines


def _cos_fmt(x: Any) -> str:
    return f"{float(x):.2f}" if finite(x) else "n/a"


def cosine_heatmaps(data: GeometryData, scope_type: str) -> dict | None:
    """Label x label cosine heatmap(s): one panel at model scope, or one per kind (labels as #codes)."""
    gc = scoped(get_table(data, "group_cosines"), scope_type)
    if gc.empty:
        return None
    panels = ["model"] if scope_type == "model" else [k for k in data.kinds if k in set(gc["kind"])]
    if not panels:
        return None
    labels = [g for g in data.labels if g in set(gc["group_a"]) | set(gc["group_b"])]
    codes = scope_type != "model"
    ticks = [f"#{i + 1}" for i in range(len(labels))] if codes else [ptext(g) for g in labels]
    sp = Subplots([ptext(p) if codes else "" for p in panels], max_cols=3, hspace=0.06 if codes else None)
    traces = []
    for i, p in enumerate(panels):
        d = gc if not codes else gc[gc["kind"] == p]
        look = {(a, b): c for a, b, c in zip(d["group_a"], d["group_b"], d["cosine"])}
        z = [[look.get((a, b)) if finite(look.get((a, b))) else None for b in labels] for a in labels]
        traces.append(dict(
            sp.refs(i), type="heatmap", x=ticks, y=ticks, z=z, coloraxis="coloraxis", xgap=1, ygap=1,
            text=[[_cos_fmt(look.get((a, b))) for b in labels] for a in labels], texttemplate="%{text}",
            customdata=[[[ptext(a), ptext(b)] for b in labels] for a in labels],
            hovertemplate="%{customdata[0]} · %{customdata[1]}<br>cosine %{text}<extra></extra>",
        ))
    for ax in sp.axes("yaxis"):
        ax.update(autorange="reversed", type="category", automargin=True)
    for ax in sp.axes("xaxis"):
        ax.update(type="category", automargin=True, tickangle=-30 if not codes else 0)
    cell = 34 if not codes else 22
    per_row = max(220, cell * len(labels) + 80)
    return figure(traces, sp, per_row * sp.rows + 80,
                   coloraxis={"colorscale": "RdBu", "cmin": -1, "cmax": 1,
                              "colorbar": {"title": {"text": "cosine", "side": "right"}, "thickness": 14}},
                   margin={"l": 60, "r": 20, "t": 40, "b": 40})


def _depth_lines(rows: pd.DataFrame, key_cols: tuple[str, str], y: str, names: list[tuple[str, str]],
                 colors: list[str], lo: str | None = None, hi: str | None = None, percent: bool = False,
                 ytitle: str = "", ref_line: float | None = None, height: int = 380) -> dict | None:
    """One line (and optional CI band) per pair of keys, y against block."""
    traces: list[dict] = []
    fmt = ".1%" if percent else ".3g"
    for (a, b), col in zip(names, colors):
        d = rows[(rows[key_cols[0]] == a) & (rows[key_cols[1]] == b)].sort_values("block")
        if d.empty:
            continue
        x = [int(v) for v in d["block"]]
        name = ptext(pair_name(a, b) if key_cols[0] != key_cols[1] else a)
        if lo and hi:
            band = d[d[lo].map(finite) & d[hi].map(finite)]
            if len(band):
                bx = [int(v) for v in band["block"]]
                traces.append(dict(type="scatter", mode="lines", x=bx + bx[::-1],
                                   y=floats(band[hi]) + floats(band[lo])[::-1], fill="toself",
                                   fillcolor=hex_rgba(col, 0.15), line={"width": 0}, hoverinfo="skip",
                                   showlegend=False, legendgroup=name, name=name))
        traces.append(dict(type="scatter", mode="lines+markers", x=x, y=floats(d[y]), name=name, legendgroup=name,
                           line={"color": col, "width": 2}, marker={"size": 5, "color": col},
                           hovertemplate=f"%{{fullData.name}}<br>block %{{x}}: %{{y:{fmt}}}<extra></extra>"))
    if not traces:
        return None
    shapes = []
    if ref_line is not None:
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": ref_line, "y1": ref_line,
                       "line": {"dash": "dot", "color": "#888", "width": 1}})
    yaxis: dict = {"title": {"text": ytitle}, "zeroline": True}
    if percent:
        yaxis["tickformat"] = ".0%"
    return {"data": traces, "layout": {
        "height": height, "margin": {"l": 60, "r": 20, "t": 20, "b": 50}, "hovermode": "closest",
        "xaxis": {"title": {"text": "block"}, "tickformat": "d"}, "yaxis": yaxis, "shapes": shapes,
        "legend": {"font": {"size": 11}}, "font": {"size": 12}}}


def _pair_colors(n: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def cosine_depth_figure(data: GeometryData) -> dict | None:
    gc = unordered(scoped(get_table(data, "group_cosines"), "block"))
    if gc.empty or gc["block"].nunique() < 2:
        return None
    rank = {g: i for i, g in enumerate(data.labels)}
    names = {(a, b) if rank.get(a, 0) <= rank.get(b, 0) else (b, a) for a, b in zip(gc["group_a"], gc["group_b"])}
    names = sorted(names, key=lambda t: (rank.get(t[0], 99), rank.get(t[1], 99)))
    rows = _symmetrize(gc)
    return _depth_lines(rows, ("group_a", "group_b"), "cosine", names, _pair_colors(len(names)),
                        ytitle="cosine of the mean gradients", ref_line=0.0)


def _symmetrize(df: pd.DataFrame) -> pd.DataFrame:
    flip = df.rename(columns={"group_a": "group_b", "group_b": "group_a"})
    return pd.concat([df, flip], ignore_index=True)


def _top_conflict_pairs(data: GeometryData, scope_type: str) -> list[tuple[str, str]]:
    """Label pairs ranked by their whole-model conflict rate, ties by the largest rate over `scope_type`."""
    pairs = get_table(data, "pairs")
    pm = scoped(pairs, "model")
    if pm.empty:
        return []
    pm = pm[pm["conflict_rate"].map(finite)]
    other = scoped(pairs, scope_type)
    peak = (other.groupby(["group_a", "group_b"])["conflict_rate"].max() if len(other)
            else pd.Series(dtype=float))
    key = [(-float(c), -float(peak.get((a, b), 0.0)) if finite(peak.get((a, b))) else 0.0)
           for a, b, c in zip(pm["group_a"], pm["group_b"], pm["conflict_rate"])]
    ranked = sorted(range(len(pm)), key=lambda i: key[i])
    names = list(zip(pm["group_a"], pm["group_b"]))
    return [names[i] for i in ranked][:MAX_PAIR_BARS]


def conflict_kind_figure(data: GeometryData) -> dict | None:
    pairs = get_table(data, "pairs")
    top = _top_conflict_pairs(data, "kind")
    if pairs is None or not top:
        return None
    scopes = [("model", scoped(pairs, "model"))]
    kd = scoped(pairs, "kind")
    scopes += [(f"kind {k}", kd[kd["kind"] == k]) for k in data.kinds if len(kd) and k in set(kd["kind"])]
    cats = [ptext(pair_name(a, b)) for a, b in top]
    traces = []
    for j, (name, d) in enumerate(scopes):
        xs, lo, hi, n = [], [], [], []
        for a, b in top:
            r = pair_row(d, a, b) or {}
            v = r.get("conflict_rate")
            xs.append(float(v) if finite(v) else None)
            l, h = r.get("conflict_ci_lo"), r.get("conflict_ci_hi")
            lo.append(float(v) - float(l) if finite(v) and finite(l) else None)
            hi.append(float(h) - float(v) if finite(v) and finite(h) else None)
            n.append(fmt_int(r.get("n_pairs")))
        col = "#1d2330" if name == "model" else PALETTE[(j - 1) % len(PALETTE)]
        traces.append(dict(type="bar", orientation="h", y=cats, x=xs, name=ptext(name), marker={"color": col},
                           error_x={"type": "data", "array": hi, "arrayminus": lo, "visible": True, "thickness": 1},
                           customdata=n, hovertemplate="%{y}<br>" + ptext(name)
                           + ": %{x:.1%} of %{customdata} pairs<extra></extra>"))
    h = 80 + len(top) * (8 * len(scopes) + 14)
    return {"data": traces, "layout": {
        "height": max(260, h), "barmode": "group", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "xaxis": {"title": {"text": "conflict rate (share of example pairs with cos < 0)"}, "tickformat": ".0%",
                  "rangemode": "tozero"},
        "yaxis": {"autorange": "reversed", "automargin": True, "type": "category"},
        "legend": {"orientation": "h", "y": 1, "yanchor": "bottom"}, "font": {"size": 12}, "hovermode": "closest"}}


def conflict_depth_figure(data: GeometryData) -> dict | None:
    bl = scoped(get_table(data, "pairs"), "block")
    top = _top_conflict_pairs(data, "block")
    if bl.empty or bl["block"].nunique() < 2 or not top:
        return None
    return _depth_lines(_symmetrize(bl), ("group_a", "group_b"), "conflict_rate", top, _pair_colors(len(top)),
                        percent=True, ytitle="conflict rate")


def coherence_figure(data: GeometryData) -> dict | None:
    coh = scoped(get_table(data, "coherence"), "model")
    if coh.empty:
        return None
    coh = by_labels(coh, data, "group")
    cats = [ptext(g) for g in coh["group"]]
    y = floats(coh["coherence"])
    lo = [v - l if v is not None and finite(l) else None for v, l in zip(y, coh["ci_lo"])]
    hi = [h - v if v is not None and finite(h) else None for v, h in zip(y, coh["ci_hi"])]
    colors = [data.colors.get(g, "#888") for g in coh["group"]]
    custom = [[fmt_int(n), fmt_ci(a, b), ptext(note_text(t)) or "–"] for n, a, b, t in
              zip(coh["n"], coh["ci_lo"], coh["ci_hi"], coh["note"])]
    traces = [
        dict(type="bar", x=cats, y=y, name="coherence", marker={"color": colors}, customdata=custom,
             error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True, "thickness": 1.2},
             hovertemplate="%{x}<br>coherence %{y:.3g}<br>CI %{customdata[1]}<br>n %{customdata[0]}"
                           "<br>%{customdata[2]}<extra></extra>"),
        dict(type="scatter", mode="markers", x=cats, y=floats(coh["expected"]), name="1/n (no alignment)",
             marker={"symbol": "line-ew-open", "size": 28, "line": {"width": 2.5, "color": "#D55E00"}},
             hovertemplate="%{x}<br>expected 1/n = %{y:.3g}<extra></extra>"),
    ]
    return {"data": traces, "layout": {
        "height": 380, "margin": {"l": 60, "r": 20, "t": 20, "b": 60}, "hovermode": "closest",
        "yaxis": {"title": {"text": "coherence ‖mean g‖² / mean ‖g‖²"}, "rangemode": "tozero"},
        "xaxis": {"automargin": True, "type": "category"}, "legend": {"orientation": "h", "y": 1.02,
                                                                       "yanchor": "bottom"},
        "font": {"size": 12}}}


def terms_depth_figure(data: GeometryData) -> dict | None:
    t = scoped(get_table(data, "terms"), "block")
    if t.empty or t["block"].nunique() < 2:
        return None
    names = list(dict.fromkeys(zip(t["term_a"], t["term_b"])))
    return _depth_lines(t, ("term_a", "term_b"), "mean", names, _pair_colors(len(names)), lo="ci_lo", hi="ci_hi",
                        ytitle="mean per-record cosine", ref_line=0.0)


def entanglement_scatter(data: GeometryData) -> tuple[dict | None, int, int]:
    """Inner product vs min(‖a‖², ‖b‖²) per pair at model scope; returns (figure, n shown, n total)."""
    e = scoped(get_table(data, "entanglement"), "model")
    if e.empty:
        return None, 0, 0
    e = e[e["inner"].map(finite) & e["sq_norm_chosen"].map(finite) & e["sq_norm_rejected"].map(finite)]
    n_total = len(e)
    if n_total == 0:
        return None, 0, 0
    if n_total > MAX_SCATTER:
        e = e.sample(MAX_SCATTER, random_state=0).sort_index()
    xm = np.minimum(e["sq_norm_chosen"].to_numpy(float), e["sq_norm_rejected"].to_numpy(float))
    e = e.assign(_x=xm)
    traces = []
    for reg in order(e["regime"], list(REGIME_COLORS)):
        d = e[e["regime"] == reg]
        traces.append(dict(
            type="scatter", mode="markers", x=floats(d["_x"]),
            y=floats(d["inner"]), name=ptext(REGIME_TEXT.get(reg, reg)),
            marker={"color": REGIME_COLORS.get(reg, "#888"), "size": 6, "opacity": 0.8},
            text=[ptext(f"{i} ({g})") for i, g in zip(d["id"], d["group"])],
            customdata=[[na(c), na(r), na(a), na(b)] for c, r, a, b in
                        zip(d["cos"], d["ratio"], d["sq_norm_chosen"], d["sq_norm_rejected"])],
            hovertemplate="%{text}<br>⟨a, b⟩ %{y:.4g}<br>‖a‖² %{customdata[2]}, ‖b‖² %{customdata[3]}"
                          "<br>cos %{customdata[0]}, ratio %{customdata[1]}<extra></extra>"))
    hi = float(max(xm.max(), e["inner"].max()))
    traces.append(dict(type="scatter", mode="lines", x=[0.0, hi], y=[0.0, hi],
                       name="⟨a, b⟩ = min(‖a‖², ‖b‖²)", line={"dash": "dash", "color": "#555", "width": 1},
                       hoverinfo="skip"))
    fig = {"data": traces, "layout": {
        "height": 440, "margin": {"l": 70, "r": 20, "t": 20, "b": 60}, "hovermode": "closest",
        "xaxis": {"title": {"text": "min(‖a‖², ‖b‖²)  (a = ∇ log π(chosen), b = ∇ log π(rejected))"},
                  "rangemode": "tozero"},
        "yaxis": {"title": {"text": "⟨a, b⟩"}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"},
        "font": {"size": 12}}}
    return fig, len(e), n_total


def regime_share_figure(data: GeometryData) -> dict | None:
    es = get_table(data, "entanglement_summary")
    if es is None:
        return None
    rows = [("model", first_row(scoped(es, "model")))]
    kd = scoped(es, "kind")
    rows += [(k, first_row(kd, kind=k)) for k in data.kinds if len(kd) and k in set(kd["kind"])]
    rows = [(n, r) for n, r in rows if r is not None]
    if not rows:
        return None
    cats = [ptext(n) for n, _ in rows]
    traces = []
    for key in ("ideal", "both_up", "both_down", "other"):
        traces.append(dict(type="bar", x=cats, y=[float(r[f"share_{key}"]) if finite(r[f"share_{key}"]) else None
                                                  for _, r in rows],
                           name=ptext(REGIME_TEXT[key]), marker={"color": REGIME_COLORS.get(key, "#bbbbbb")},
                           customdata=[fmt_int(r["n_pairs"]) for _, r in rows],
                           hovertemplate="%{x}: %{y:.1%} of %{customdata} pairs<extra>%{fullData.name}</extra>"))
    return {"data": traces, "layout": {
        "height": 340, "barmode": "stack", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "yaxis": {"title": {"text": "share of pairs"}, "tickformat": ".0%", "range": [0, 1]},
        "xaxis": {"type": "category", "title": {"text": "scope (whole model, then per layer kind)"}},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"}, "font": {"size": 12}}}


def ratio_depth_figure(data: GeometryData) -> dict | None:
    es = get_table(data, "entanglement_summary")
    bl = scoped(es, "block")
    if bl.empty or bl["block"].nunique() < 2:
        return None
    rows = bl.assign(_a="all kinds")
    fig = _depth_lines(rows, ("_a", "_a"), "mean_ratio", [("all kinds", "all kinds")], ["#1d2330"],
                       lo="ratio_ci_lo", hi="ratio_ci_hi", ytitle="mean ratio ⟨a, b⟩ / min(‖a‖², ‖b‖²)",
                       ref_line=1.0)
    lay = scoped(es, "layer")
    if fig is not None and len(lay):
        for i, k in enumerate(k for k in data.kinds if k in set(lay["kind"])):
            d = lay[lay["kind"] == k].sort_values("block")
            fig["data"].append(dict(type="scatter", mode="lines+markers", x=[int(b) for b in d["block"]],
                                    y=floats(d["mean_ratio"]), name=ptext(f"kind {k}"),
                                    line={"dash": "dot", "width": 1.5, "color": PALETTE[i % len(PALETTE)]},
                                    marker={"size": 4}, visible="legendonly" if i >= 4 else True,
                                    hovertemplate="%{fullData.name}<br>block %{x}: %{y:.3g}<extra></extra>"))
    return fig


def psr_norm_figure(data: GeometryData) -> dict | None:
    ps = scoped(get_table(data, "psr_nsr"), "model")
    if ps.empty:
        return None
    ps = pd.concat([ps[ps["group"] == ALL], ps[ps["group"] != ALL]])
    cats = [ptext(show_label(g, "all rollouts")) for g in ps["group"]]

    def root(v):
        return floats(sqrt_norm(x) for x in v)

    lam = ps["lam"].iloc[0]
    series = [("‖g+‖ (PSR)", root(ps["sq_norm_psr"]), "#009E73"), ("‖g−‖ (NSR)", root(ps["sq_norm_nsr"]), "#D55E00"),
              (f"W-REINFORCE ‖λg+ + g−‖, λ = {fmt_num(lam)}", floats(ps["w_reinforce_norm"]), "#0072B2"),
              ("RLVR ‖g+ + g−‖", floats(ps["rlvr_norm"]), "#7f7f7f")]
    custom = [[fmt_int(n), fmt_int(p), fmt_int(q), na(c)] for n, p, q, c in
              zip(ps["n"], ps["n_positive"], ps["n_negative"], ps["cos"])]
    traces = [dict(type="bar", x=cats, y=y, name=ptext(name), marker={"color": col}, customdata=custom,
                   hovertemplate="%{x}<br>%{fullData.name} = %{y:.4g}<br>n %{customdata[0]} (+%{customdata[1]} / "
                                 "−%{customdata[2]}), cos(g+, g−) %{customdata[3]}<extra></extra>")
              for name, y, col in series]
    return {"data": traces, "layout": {
        "height": 340, "barmode": "group", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "yaxis": {"title": {"text": "gradient norm (sum over rollouts)"}}, "xaxis": {"type": "category"},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"}, "font": {"size": 12}}}


def psr_cos_depth_figure(data: GeometryData) -> dict | None:
    bl = scoped(get_table(data, "psr_nsr"), "block")
    if bl.empty or bl["block"].nunique() < 2:
        return None
    groups = [ALL] + [g for g in dict.fromkeys(bl["group"]) if g != ALL]
    rows = bl.assign(_g=bl["group"].map(lambda g: show_label(g, "all rollouts")))
    names = [(show_label(g, "all rollouts"),) * 2 for g in groups if g in set(bl["group"])]
    return _depth_lines(rows, ("_g", "_g"), "cos", names, ["#1d2330"] + PALETTE, ytitle="cos(g+, g−)",
                        ref_line=0.0)


def diversity_figure(data: GeometryData) -> dict | None:
    dv = get_table(data, "diversity")
    if dv is None:
        return None
    dv = pd.concat([dv[dv["label"] == ALL], dv[dv["label"] != ALL]])
    cats = [ptext(show_label(g)) for g in dv["label"]]
    colors = ["#1d2330" if g == ALL else data.colors.get(g, "#888") for g in dv["label"]]
    return {"data": [dict(type="bar", x=cats, y=floats(dv["g_vendi"]), marker={"color": colors},
                          text=[f"n = {fmt_int(n)}" for n in dv["n"]], textposition="outside",
                          cliponaxis=False, hovertemplate="%{x}<br>G-Vendi %{y:.4g}<br>%{text}<extra></extra>",
                          name="G-Vendi")],
            "layout": {"height": 360, "margin": {"l": 60, "r": 20, "t": 30, "b": 60}, "showlegend": False,
                       "yaxis": {"title": {"text": "G-Vendi (effective number of directions)"},
                                 "rangemode": "tozero"},
                       "xaxis": {"type": "category", "automargin": True}, "font": {"size": 12}}}


def noise_figure(data: GeometryData) -> dict | None:
    nz = get_table(data, "noise")
    if nz is None:
        return None
    lay = nz[(nz["label"] == ALL) & (nz["layer"] != "total") & (nz["block"] >= 0)]
    if lay.empty:
        return None
    kinds = [k for k in data.kinds if k in set(lay["kind"])] or list(dict.fromkeys(lay["kind"]))
    sp = Subplots(["B_simple = tr(Σ) / ‖G‖² per layer", "mean GSNR per layer"], max_cols=2, hspace=0.1)
    traces = []
    for i, k in enumerate(kinds):
        d = lay[lay["kind"] == k].sort_values("block")
        col = PALETTE[i % len(PALETTE)]
        for j, (y, fmt) in enumerate((("b_simple", ".4g"), ("gsnr_mean", ".3g"))):
            traces.append(dict(sp.refs(j), type="scatter", mode="lines+markers", x=[int(b) for b in d["block"]],
                               y=floats(d[y]), name=ptext(k), legendgroup=ptext(k), showlegend=j == 0,
                               line={"color": col, "width": 2}, marker={"size": 5, "color": col},
                               text=[ptext(x) for x in d["layer"]],
                               hovertemplate=f"%{{text}}<br>%{{y:{fmt}}}<extra></extra>"))
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d", title={"text": "block"})
    sp.layout["yaxis"].update(type="log", exponentformat="power")
    return figure(traces, sp, 380)

