"""Figures and example images of the `privacy` page, as plain plotly JSON dicts and inline PNG data URIs.

* `batch_figure`: recovery against batch size (curves.parquet), one panel per probe, one line per defence; the
  headline metric of each probe (`headline_metric`): PSNR in dB for the image probes (analytic, DLG, Inverting
  Gradients), F1 of the recovered token set (tokens), ROUGE-1 F1 of the recovered sequences (TAG), label accuracy
  for iDLG labels.
* `noise_figure`: the same metric against the noise multiplier sigma of the formal defences (``dp:SIGMA``,
  ``dp-layer:SIGMA``; `privacy.defences.FORMAL`) on a log axis, one line per (kind, batch size).
* `utility_figure`: what each defence costs (utility.parquet): the accuracy of a model trained under it against
  the epsilon of that training, the defences without a guarantee (epsilon = inf) in a "no guarantee" panel.
* `stored_figure`: what gradsight's stored projected features reveal against the input-side projection size
  r_in (defence "stored" rows of recovery.parquet): cosine, exact, token precision and recall.
* `png_data_uri` / `image_grid`: true vs recovered images (samples "UNIT/DEFENCE/PROBE/true|hat", d = a perfect
  square) as 8-bit grey PNGs inlined as data URIs (no external reference); `load_samples` reads them (safetensors,
  numpy reader) and `multiset_diff` lists the missed / spurious items of a recovered token or label list.

User text handed to plotly (defence and probe names) goes through `kit.ptext`.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ...privacy.defences import FORMAL
from ...report.kit import PALETTE, Subplots, figure, floats, fmt_num, ptext

__all__ = ["IMAGE_PROBES", "TOKEN_PROBES", "SEQUENCE_PROBES", "LABEL_PROBES", "STORED", "headline_metric",
           "metric_label", "defence_colors", "batch_figure", "noise_figure", "stored_figure", "utility_figure",
           "utility_metric", "png_data_uri", "to_image", "psnr_word", "load_samples", "multiset_diff", "RANDOM_DB",
           "RECOGNISABLE_DB", "EXACT_DB"]

IMAGE_PROBES = ("analytic", "dlg", "ig")
TOKEN_PROBES = ("tokens",)
SEQUENCE_PROBES = ("tag",)  # recovered sequences, scored by ROUGE
LABEL_PROBES = ("labels",)
STORED = "stored"  # the defence value of the stored-artefact probe's rows
RANDOM_DB, RECOGNISABLE_DB, EXACT_DB = 12.0, 30.0, 80.0  # PSNR landmarks (dB) drawn on the figures
LABELS = {"psnr": "PSNR (dB)", "f1": "token F1", "label_acc": "label accuracy", "cosine": "cosine",
          "exact": "exact", "recall": "token recall", "precision": "token precision", "rouge1": "ROUGE-1 F1",
          "rouge2": "ROUGE-2 F1"}


def headline_metric(probe: str, row: dict | pd.Series | None = None) -> str:
    """The column that summarises a probe: psnr (images), f1 (token sets), rouge1 (recovered sequences, TAG),
    label_acc (labels); for an unknown probe the first of psnr, f1, rouge1, label_acc, cosine that `row` has
    finite (curves' ``*_mean`` or recovery's)."""
    if probe in IMAGE_PROBES:
        return "psnr"
    if probe in TOKEN_PROBES:
        return "f1"
    if probe in SEQUENCE_PROBES:
        return "rouge1"
    if probe in LABEL_PROBES:
        return "label_acc"
    for m in ("psnr", "f1", "rouge1", "label_acc", "cosine"):
        if row is not None and any(_finite(row.get(k)) for k in (m, f"{m}_mean")):
            return m
    return "cosine"


def metric_label(metric: str) -> str:
    return LABELS.get(metric, metric)


def psnr_word(db) -> str:
    """What a PSNR means for a reconstruction: exact (> 80 dB, float precision), recognisable (> 30 dB), partial,
    or the level of a random image (<= 12 dB)."""
    if not _finite(db):
        return "n/a"
    db = float(db)
    return ("exact" if db > EXACT_DB else "recognisable" if db > RECOGNISABLE_DB else "partial" if db > RANDOM_DB
            else "no better than a random image")


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def defence_colors(defences: list[str]) -> dict[str, str]:
    """One colour per defence, the same on every figure of the page."""
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(defences)}


def _probe_panels(curves: pd.DataFrame) -> list[str]:
    return [p for p in dict.fromkeys(curves["probe"].astype(str)) if p != "skipped"]


def _metric_axes(sp: Subplots, i: int, metric: str) -> None:
    """y axis of panel i: a fixed [0, 1.05] range for shares, PSNR landmarks (random, recognisable) dotted."""
    k = "" if i == 0 else str(i + 1)
    ax = sp.layout[f"yaxis{k}"]
    ax["title"] = {"text": metric_label(metric)}
    if metric != "psnr":
        ax["range"] = [-0.02, 1.05]
        return
    for y, name in ((RANDOM_DB, "random image"), (RECOGNISABLE_DB, "recognisable")):
        sp.layout.setdefault("shapes", []).append(
            {"type": "line", "xref": f"x{k} domain", "yref": f"y{k}", "x0": 0, "x1": 1, "y0": y, "y1": y,
             "line": {"color": "#999999", "dash": "dot", "width": 1}})
        sp.layout["annotations"].append(
            {"text": name, "xref": f"x{k} domain", "yref": f"y{k}", "x": 1, "y": y, "xanchor": "right",
             "yanchor": "bottom", "showarrow": False, "font": {"size": 10, "color": "#777777"}})


def _log_ticks(sp: Subplots, values: list, title: str) -> None:
    """Log x axes ticked at the audited values only (no minor-tick clutter)."""
    for ax in sp.axes("xaxis"):
        ax.update(type="log", title={"text": title}, tickvals=floats(values), ticktext=[fmt_num(v) for v in values])


def _err(sd: pd.Series) -> dict | None:
    v = floats(sd)
    return {"type": "data", "array": v, "thickness": 1, "width": 3} if any(x is not None for x in v) else None


def batch_figure(curves: pd.DataFrame | None, defences: list[str], colors: dict[str, str],
                 epsilons: dict[str, float]) -> dict | None:
    """Recovery against batch size: a panel per probe (the stored probe excluded), a line per defence, the mean
    over the audited batches with +-1 sd.

    Args:
        curves: curves.parquet (probe, defence, batch_size, projection, METRIC_mean, METRIC_sd).
        defences: defence order; colors: defence -> colour; epsilons: defence -> epsilon (hover).

    Returns:
        a plotly figure dict, or None without a non-stored probe.
    """
    if curves is None or curves.empty:
        return None
    c = curves[curves["defence"].astype(str) != STORED]
    probes = _probe_panels(c)
    if not probes:
        return None
    sp = Subplots([ptext(p) for p in probes], max_cols=min(3, len(probes)), hspace=0.07)
    traces, shown = [], set()
    for i, p in enumerate(probes):
        dp = c[c["probe"].astype(str) == p]
        metric = headline_metric(p, dp.iloc[0])
        for d in [x for x in defences if x in set(dp["defence"].astype(str))]:
            g = dp[dp["defence"].astype(str) == d].sort_values("batch_size", kind="stable")
            eps = epsilons.get(d, math.nan)
            tail = f" (ε = {fmt_num(eps)})" if _finite(eps) else ""
            traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers", x=floats(g["batch_size"]),
                               y=floats(g[f"{metric}_mean"]), error_y=_err(g[f"{metric}_sd"]), name=ptext(d),
                               legendgroup=d, showlegend=d not in shown,
                               marker={"color": colors.get(d, "#000000"), "size": 7},
                               line={"color": colors.get(d, "#000000"), "width": 2},
                               hovertemplate=ptext(f"{p} · {d}{tail}") + "<br>batch size %{x}<br>"
                               + metric_label(metric) + " %{y:.4g}<extra></extra>"))
            shown.add(d)
        _metric_axes(sp, i, metric)
    _log_ticks(sp, sorted(set(int(b) for b in c["batch_size"])), "batch size")
    return figure(traces, sp, 360 * sp.rows + 60)


def _kind(defence: str) -> str:
    return str(defence).partition(":")[0]


def noise_figure(curves: pd.DataFrame | None, epsilons: dict[str, float]) -> dict | None:
    """Recovery against the noise multiplier sigma of the formal defences (``defences.FORMAL``: dp:SIGMA and
    dp-layer:SIGMA; log axis), a line per (kind, batch size) -- colour = batch size, dash = kind -- and a panel
    per probe. noise:SIGMA rows are left out: their sigma is a per-coordinate std, not a multiplier of C.
    Returns None without a formal defence."""
    if curves is None or curves.empty:
        return None
    kinds = curves["defence"].astype(str).map(_kind)
    c = curves[kinds.isin(FORMAL) & curves["noise_multiplier"].notna()].assign(kind=kinds)
    probes = _probe_panels(c)
    if not probes:
        return None
    sizes = sorted(set(int(b) for b in c["batch_size"]))
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(sizes)}
    used = [x for x in FORMAL if x in set(c["kind"])]
    dashes = {k: ("solid", "dash", "dot")[i % 3] for i, k in enumerate(used)}
    symbols = {k: ("circle", "diamond", "square")[i % 3] for i, k in enumerate(used)}  # single points show no dash
    sp = Subplots([ptext(p) for p in probes], max_cols=min(3, len(probes)), hspace=0.07)
    traces, shown = [], set()
    for i, p in enumerate(probes):
        dp = c[c["probe"].astype(str) == p]
        metric = headline_metric(p, dp.iloc[0])
        for k in dashes:
            for b in sizes:
                g = dp[(dp["batch_size"] == b) & (dp["kind"] == k)].sort_values("noise_multiplier", kind="stable")
                if g.empty:
                    continue
                eps = [fmt_num(epsilons.get(str(d), math.nan)) for d in g["defence"].astype(str)]
                name = f"{k}, batch size {b}"
                traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers", x=floats(g["noise_multiplier"]),
                                   y=floats(g[f"{metric}_mean"]), error_y=_err(g[f"{metric}_sd"]), name=name,
                                   legendgroup=name, showlegend=name not in shown,
                                   marker={"color": colors[b], "size": 8, "symbol": symbols[k]},
                                   line={"color": colors[b], "width": 2, "dash": dashes[k]},
                                   customdata=[[e] for e in eps],
                                   hovertemplate=ptext(p) + f" · {name}<br>σ = %{{x}} (ε = %{{customdata[0]}})"
                                   "<br>" + metric_label(metric) + " %{y:.4g}<extra></extra>"))
                shown.add(name)
        _metric_axes(sp, i, metric)
    _log_ticks(sp, sorted(set(float(x) for x in c["noise_multiplier"])),
               "noise multiplier σ (noise std σ·C on the clipped sum)")
    return figure(traces, sp, 360 * sp.rows + 60)


def utility_metric(utility: pd.DataFrame) -> str:
    """"accuracy" when the utility table has a finite accuracy (integer labels), else "loss"."""
    return "accuracy" if np.isfinite(utility["accuracy"].to_numpy(dtype=float)).any() else "loss"


def utility_figure(utility: pd.DataFrame | None, colors: dict[str, str]) -> dict | None:
    """What each defence costs: the accuracy (the mean loss when no accuracy was measured) of the model trained
    under it against the epsilon of that training. Left panel: the formal defences (finite epsilon, log axis),
    a line per kind through its noise multipliers; right panel: the defences without a guarantee (epsilon = inf,
    "no guarantee") as points on a category axis. Dotted: the undefended model ("none"). Both panels share the
    y range, so a drop reads the same on either side.

    Args:
        utility: utility.parquet (defence, accuracy, loss, epsilon, ...); colors: defence -> colour.

    Returns:
        a plotly figure dict, or None without utility rows.
    """
    if utility is None or utility.empty:
        return None
    u = utility.assign(defence=utility["defence"].astype(str))
    metric = utility_metric(u)
    eps = u["epsilon"].to_numpy(dtype=float)
    formal = u[u["defence"].map(_kind).isin(FORMAL).to_numpy() & np.isfinite(eps)]
    rest = u.drop(index=formal.index)
    panels = ([("formal", formal)] if len(formal) else []) + ([("none", rest)] if len(rest) else [])
    titles = {"formal": "formal guarantee: against ε", "none": "no guarantee (ε = ∞)"}
    sp = Subplots([titles[k] for k, _ in panels], max_cols=2, hspace=0.1)
    label = "accuracy" if metric == "accuracy" else "mean loss (lower = better)"
    hover = "<br>ε = %{customdata[0]}<br>" + label + " %{y:.4g}<extra></extra>"
    traces = []
    for i, (k, g) in enumerate(panels):
        if k == "formal":
            for kind in dict.fromkeys(g["defence"].map(_kind)):
                h = g[g["defence"].map(_kind) == kind].sort_values("epsilon", kind="stable")
                traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers+text", x=floats(h["epsilon"]),
                                   y=floats(h[metric]), name=ptext(kind), text=[ptext(d) for d in h["defence"]],
                                   textposition="top center" if kind == "dp" else "bottom center",
                                   customdata=[[fmt_num(e)] for e in h["epsilon"]],
                                   marker={"color": [colors.get(d, "#000000") for d in h["defence"]], "size": 9},
                                   line={"color": "#999999", "width": 1, "dash": "dot" if kind != "dp" else "solid"},
                                   hovertemplate="%{text}" + hover))
            sp.layout["xaxis" + ("" if i == 0 else str(i + 1))].update(
                type="log", title={"text": "ε at δ of the training (lower = more private)"},
                tickvals=floats(sorted(set(g["epsilon"]))), ticktext=[fmt_num(e) for e in sorted(set(g["epsilon"]))])
        else:
            traces.append(dict(sp.refs(i), type="scatter", mode="markers", x=[ptext(d) for d in g["defence"]],
                               y=floats(g[metric]), name="no guarantee", customdata=[["∞"] for _ in range(len(g))],
                               marker={"color": [colors.get(d, "#000000") for d in g["defence"]], "size": 10,
                                       "symbol": "diamond"}, hovertemplate="%{x}" + hover))
            sp.layout["xaxis" + ("" if i == 0 else str(i + 1))].update(type="category", title={"text": "defence"})
    vals = u[metric].to_numpy(dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size:
        pad = max(0.01, 0.15 * float(vals.max() - vals.min()))
        lo, hi = float(vals.min()) - pad, float(vals.max()) + pad
        if metric == "accuracy":
            lo, hi = max(0.0, lo), min(1.02, hi)
        for ax in sp.axes("yaxis"):
            ax.update(range=[lo, hi], title={"text": label})
    base = u[u["defence"] == "none"][metric].to_numpy(dtype=float)
    if base.size and np.isfinite(base[0]):
        for i in range(len(panels)):
            k = "" if i == 0 else str(i + 1)
            sp.layout.setdefault("shapes", []).append(
                {"type": "line", "xref": f"x{k} domain", "yref": f"y{k}", "x0": 0, "x1": 1, "y0": float(base[0]),
                 "y1": float(base[0]), "line": {"color": "#999999", "dash": "dot", "width": 1}})
    return figure(traces, sp, 380, showlegend=len(formal) > 0)


def stored_figure(recovery: pd.DataFrame | None) -> dict | None:
    """What the stored projected features reveal against r_in: the mean over the audited batches of cosine, exact,
    token recall and precision (whichever the rows measure), a panel per stored probe with a projection size."""
    if recovery is None or recovery.empty:
        return None
    s = recovery[(recovery["defence"].astype(str) == STORED) & (recovery["projection"] > 0)]
    probes = list(dict.fromkeys(s["probe"].astype(str)))
    if not probes:
        return None
    sp = Subplots([ptext(p) for p in probes], max_cols=min(3, len(probes)), hspace=0.07)
    traces, shown = [], set()
    colors = {"cosine": PALETTE[0], "exact": PALETTE[1], "recall": PALETTE[2], "precision": PALETTE[3]}
    for i, p in enumerate(probes):
        g = s[s["probe"].astype(str) == p].groupby("projection", sort=True)[list(colors)].mean()
        for m, col in colors.items():
            if not np.isfinite(g[m].to_numpy(float)).any():
                continue
            traces.append(dict(sp.refs(i), type="scatter", mode="lines+markers", x=floats(g.index), y=floats(g[m]),
                               name=metric_label(m), legendgroup=m, showlegend=m not in shown,
                               marker={"color": col, "size": 7}, line={"color": col, "width": 2},
                               hovertemplate=ptext(p) + "<br>r_in %{x}<br>" + metric_label(m)
                               + " %{y:.4g}<extra></extra>"))
            shown.add(m)
        k = "" if i == 0 else str(i + 1)
        sp.layout[f"yaxis{k}"].update(range=[-0.05, 1.05], title={"text": "recovery (1 = the data)"})
    _log_ticks(sp, sorted(set(int(x) for x in s["projection"])), "input-side projection size r_in")
    return figure(traces, sp, 340 * sp.rows + 60) if traces else None


# ---------------------------------------------------------------------------------------------------------
# images


def to_image(row: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A flat input of d = h*h values as an (h, h) image in [0, 1]: (x - lo) / (hi - lo), clamped (reconstructions
    may leave the data range). A d that is no perfect square gives a (1, d) strip."""
    x = np.asarray(row, dtype=np.float64).reshape(-1)
    h = int(math.isqrt(x.size))
    shape = (h, h) if h * h == x.size else (1, x.size)
    span = hi - lo if hi > lo else 1.0
    x = np.nan_to_num((x - lo) / span, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(x, 0.0, 1.0).reshape(shape)


def png_data_uri(img: np.ndarray) -> str:
    """An (h, w) image in [0, 1] as a "data:image/png;base64,..." URI: 8-bit greyscale PNG (colour type 0), one
    zlib-compressed IDAT, filter 0 on every row (PNG spec, ISO/IEC 15948, sections 5-6 and 11.2)."""
    a = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
    h, w = a.shape
    px = np.round(a * 255).astype(np.uint8)  # (h, w)
    raw = b"".join(b"\x00" + r.tobytes() for r in px)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def load_samples(run_dir: Path) -> dict[tuple[int, str, str], dict[str, np.ndarray]]:
    """{(unit, defence, probe): {"true": (B, d), "hat": (B, d)}} from samples/*.safetensors (keys
    "UNIT/DEFENCE/PROBE/true|hat"; other keys ignored). Loaded with safetensors' numpy reader (no pickle)."""
    from safetensors.numpy import load_file

    out: dict = {}
    for f in sorted((Path(run_dir) / "samples").glob("r*-*.safetensors")):
        for key, arr in load_file(str(f)).items():
            parts = key.split("/")
            if len(parts) < 4 or parts[-1] not in ("true", "hat") or not parts[0].isdigit():
                continue
            out.setdefault((int(parts[0]), "/".join(parts[1:-2]), parts[-2]), {})[parts[-1]] = arr
    return out


def multiset_diff(a: str, b: str) -> str:
    """The items of the space-separated list a that b lacks (as multisets), in a's order."""
    left = Counter(b.split())
    out = []
    for x in a.split():
        if left[x] > 0:
            left[x] -= 1
        else:
            out.append(x)
    return " ".join(out)
