"""Figures of the `layers` page, as plain plotly JSON dicts (no graph_objects validation, which is slow and
not needed here): the group curves over depth with their CI bands, the distributions of per-example
depth-means, and the per-layer significance heatmaps. Text handed to plotly goes through `kit.ptext`.
"""

from __future__ import annotations

import math

import pandas as pd

from ...report.kit import Subplots, figure, floats, fmt_int, fmt_num, fmt_p, hex_rgba, isnan, order, ptext
from .data import ALPHA, RunData, depth_rows

__all__ = ["curves_figure", "distribution_figure", "heatmap_figure"]


def _metric_rows(df: pd.DataFrame | None, data: RunData, metric: str) -> tuple[pd.DataFrame, list[str]] | None:
    """Rows of one metric and the run's kinds present in them (None when there is nothing to plot)."""
    if df is None or df.empty:
        return None
    rows = df[df["metric"] == metric]
    kinds = [k for k in data.kinds if k in set(rows["kind"])]
    return (rows, kinds) if kinds else None


def curves_figure(data: RunData, metric: str) -> dict | None:
    got = _metric_rows(data.summary, data, metric)
    if got is None:
        return None
    sm, kinds = got
    sp = Subplots([ptext(k) for k in kinds])
    colors = data.colors
    traces: list[dict] = []
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        ref = sp.refs(i)
        dk = depth_rows(sm[sm["kind"] == kind])
        for g in data.groups:
            d = dk[dk["group"] == g].sort_values("block")
            if d.empty:
                continue
            col = colors[g]
            x = [int(b) for b in d["block"]]
            if {"ci_lo", "ci_hi"} <= set(d.columns):
                band = d.dropna(subset=["ci_lo", "ci_hi"])
                if len(band):
                    bx = [int(b) for b in band["block"]]
                    traces.append(
                        dict(ref, type="scatter", mode="lines", x=bx + bx[::-1],
                             y=floats(band["ci_hi"]) + floats(band["ci_lo"])[::-1],
                             fill="toself", fillcolor=hex_rgba(col, 0.18), line={"width": 0},
                             hoverinfo="skip", showlegend=False, legendgroup=ptext(g), name=ptext(g))
                    )
            n = d["n"] if "n" in d else [None] * len(d)
            lo = d["ci_lo"] if "ci_lo" in d else [None] * len(d)
            hi = d["ci_hi"] if "ci_hi" in d else [None] * len(d)
            traces.append(
                dict(
                    ref,
                    type="scatter",
                    mode="lines+markers",
                    x=x,
                    y=floats(d["mean"]),
                    marker={"size": 4, "color": col},
                    line={"width": 2, "color": col},
                    name=ptext(g),
                    legendgroup=ptext(g),
                    showlegend=g not in shown,
                    customdata=[[fmt_int(a), fmt_num(b), fmt_num(c)] for a, b, c in zip(n, lo, hi)],
                    hovertemplate=(
                        "%{fullData.name}<br>" + ptext(kind) + ", block %{x}<br>mean %{y:.4g}"
                        "<br>CI [%{customdata[1]}, %{customdata[2]}]<br>n %{customdata[0]}<extra></extra>"
                    ),
                )
            )
            shown.add(g)
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d", zeroline=False)
    for ax in sp.axes("yaxis"):
        ax.update(zeroline=False, exponentformat="power")
    for ax in sp.bottom_x():
        ax["title"] = {"text": "block"}
    return figure(traces, sp, 260 * sp.rows + 110)


def distribution_figure(data: RunData, metric: str) -> dict | None:
    got = _metric_rows(data.depth_means, data, metric)
    if got is None:
        return None
    d_m, kinds = got
    ids: dict[int, str] = {}
    if data.examples is not None and {"idx", "id"} <= set(data.examples.columns):
        ids = dict(zip(data.examples["idx"].astype(int), data.examples["id"]))
    sp = Subplots([ptext(k) for k in kinds])
    colors = data.colors
    traces: list[dict] = []
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        ref = sp.refs(i)
        dk = d_m[d_m["kind"] == kind]
        for g in data.groups:
            d = dk[dk["group"] == g]
            if d.empty:
                continue
            traces.append(
                dict(
                    ref,
                    type="box",
                    y=floats(d["value"], 5),
                    name=ptext(g),
                    legendgroup=ptext(g),
                    showlegend=g not in shown,
                    marker={"color": colors[g], "size": 3},
                    line={"color": colors[g]},
                    boxpoints="all",
                    jitter=0.4,
                    pointpos=0,
                    boxmean=True,
                    text=[ptext(ids.get(int(ix), ix)) for ix in d["idx"]],
                    hovertemplate="%{fullData.name}<br>id %{text}<br>%{y:.4g}<extra></extra>",
                )
            )
            shown.add(g)
    for ax in sp.axes("xaxis"):
        ax["showticklabels"] = False
    for ax in sp.axes("yaxis"):
        ax["exponentformat"] = "power"
    return figure(traces, sp, 260 * sp.rows + 90)


def heatmap_figure(data: RunData, metric: str) -> dict | None:
    t = data.tests
    if t is None or t.empty:
        return None
    lt = t[(t["test"] == "layer_mean_diff") & (t["metric"] == metric) & (t["block"] >= 0)]
    if lt.empty:
        return None
    use_q = bool(lt["q_value"].notna().any())
    pcol = "q_value" if use_q else "p_value"
    pairs = list(dict.fromkeys(zip(lt["group_a"], lt["group_b"])))
    kinds = order(lt["kind"], data.kinds)
    blocks = sorted(int(b) for b in set(lt["block"]))
    sp = Subplots([ptext(f"{a} vs {b}") for a, b in pairs], max_cols=2, hspace=0.08)
    traces: list[dict] = []
    zmax = 1.0
    for i, (a, b) in enumerate(pairs):
        d = lt[(lt["group_a"] == a) & (lt["group_b"] == b)]
        lookup = {(str(k), int(bl)): (q, st) for k, bl, q, st in zip(d["kind"], d["block"], d[pcol], d["statistic"])}
        z, text, custom = [], [], []
        for k in kinds:
            zr, tr, cr = [], [], []
            for bl in blocks:
                q, stat = lookup.get((k, bl), (float("nan"), float("nan")))
                if isnan(q):
                    zr.append(None)
                    tr.append("")
                    cr.append(["–", "–"])
                    continue
                qf = max(float(q), 1e-300)
                sign = -1.0 if (not isnan(stat) and float(stat) < 0) else 1.0
                v = sign * -math.log10(qf)
                zmax = max(zmax, abs(v))
                zr.append(round(v, 3))
                tr.append("*" if qf < ALPHA else "")
                cr.append([fmt_p(q), fmt_num(stat)])
            z.append(zr)
            text.append(tr)
            custom.append(cr)
        traces.append(
            dict(
                sp.refs(i),
                type="heatmap",
                z=z,
                x=blocks,
                y=[ptext(k) for k in kinds],
                text=text,
                texttemplate="%{text}",
                customdata=custom,
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
                hovertemplate=(
                    "kind %{y}, block %{x}<br>" + ("q" if use_q else "p") + " = %{customdata[0]}"
                    "<br>statistic = %{customdata[1]}<extra></extra>"
                ),
            )
        )
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d")
    for ax in sp.axes("yaxis"):
        ax.update(autorange="reversed", type="category")
    for ax in sp.bottom_x():
        ax["title"] = {"text": "block"}
    per_row = max(160, 22 * len(kinds) + 90)
    label = "−log10 q" if use_q else "−log10 p"
    return figure(
        traces,
        sp,
        per_row * sp.rows + 60,
        coloraxis={
            "colorscale": "RdBu",  # plotly's RdBu runs blue (low) -> red (high)
            "cmin": -zmax,
            "cmax": zmax,
            "colorbar": {"title": {"text": label + "<br>× sign", "side": "right"}, "thickness": 14},
        },
        margin={"l": 70, "r": 20, "t": 40, "b": 50},
    )

