"""The figures of the training report: downsampled line traces, layers x steps heatmaps and the page sections.

`figure_sections(data, registry)` builds the six plot sections of ``train.html`` (loss and lr with the alert
markers, global norms and clipping, per-layer norms and update ratios, gradient noise, sharpness and numerics,
gradient conflict) from a `gradsight.train.report.TrainData`, adds each figure to the page's
`FigureRegistry`, and says which measures were not recorded. `gradsight.train.report` assembles the page
around them; this module only draws.

Large runs stay readable and small: every line trace keeps at most `MAX_POINTS` points (`thin`: the minimum,
the maximum and the first non-finite value of each bin of steps, plus the alert steps, so spikes and NaNs
survive downsampling), heatmaps keep at most `MAX_HEATMAP_ROWS` layers (those with alerts first, then the
largest) and `MAX_HEATMAP_COLS` columns of step bins; the notes say when either cap applied. The caps are
arguments of `figure_sections` (defaults: these constants), so the page can pass its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..report.kit import PALETTE, FigureRegistry, Subplots, figure, floats, ptext
from . import schema as S

if TYPE_CHECKING:  # report imports this module; the data class is only needed for the annotations
    from .report import TrainData

__all__ = ["figure_sections", "thin", "MAX_POINTS", "MAX_HEATMAP_ROWS", "MAX_HEATMAP_COLS", "MAX_ALERT_LINES",
           "MAX_PAIRS", "TOP_K", "HOVER_ALERTS"]

MAX_POINTS = 2000        # points per line trace (steps are thinned above this)
MAX_HEATMAP_ROWS = 300   # layers per heatmap
MAX_HEATMAP_COLS = 500   # step bins per heatmap
MAX_ALERT_LINES = 150    # vertical alert lines on the loss timeline
MAX_PAIRS = 6            # per-layer conflict heatmaps (term pairs)
TOP_K = 8                # layers drawn as lines under each heatmap
HOVER_ALERTS = 5         # alert messages listed in one marker's hover text

# ---------------------------------------------------------------------------------------------------------
# downsampling


def thin(values: Sequence[float] | np.ndarray, steps: Sequence[int] | np.ndarray, keep: Iterable[int] = (),
         max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices (sorted, into `steps`) of at most `max_points` points of a trace that keep its shape.

    All points when there are at most `max_points`. Otherwise: the points at the `keep` steps (alert steps;
    thinned evenly to max_points // 4 if there are more), the first and last point, and in each of the
    remaining equal bins of consecutive points the minimum, the maximum and the first non-finite value (so a
    one-step spike or NaN is never lost, unlike taking every n-th point). `steps` must be sorted ascending.
    """
    if max_points < 8:
        raise ValueError(f"max_points must be >= 8, got {max_points}")
    steps = np.asarray(steps)
    v = np.asarray(values, dtype=float)
    n = len(steps)
    if len(v) != n:
        raise ValueError(f"values has {len(v)} entries but steps has {n}")
    if n <= max_points:
        return np.arange(n)
    k = np.asarray(sorted(set(int(s) for s in keep)), dtype=np.int64)
    pos = np.searchsorted(steps, k)
    ok = pos < n
    pos = pos[ok][steps[pos[ok]] == k[ok]]
    cap = max_points // 4
    if len(pos) > cap:
        pos = pos[np.linspace(0, len(pos) - 1, cap).round().astype(int)]
    n_bins = max(1, (max_points - len(pos) - 2) // 3)
    edges = np.linspace(0, n, n_bins + 1).round().astype(int)
    fin = np.isfinite(v)
    picks = [pos, np.array([0, n - 1])]
    lo_v, hi_v = np.where(fin, v, np.inf), np.where(fin, v, -np.inf)
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        f = fin[a:b]
        extra = [a + int(np.argmin(lo_v[a:b])), a + int(np.argmax(hi_v[a:b]))] if f.any() else []
        if not f.all():
            extra.append(a + int(np.argmin(f)))
        picks.append(np.array(extra, dtype=np.int64))
    return np.unique(np.concatenate([p.astype(np.int64) for p in picks]))


# ---------------------------------------------------------------------------------------------------------
# figures


@dataclass
class _Plot:
    """What the figure builders share: the alert steps to keep, the alerted layers, the rule colours, the caps,
    and whether a line trace was thinned."""

    data: TrainData
    keep: np.ndarray
    alert_layers: list[str]
    rule_colors: dict[str, str]
    max_points: int = MAX_POINTS
    heatmap_rows: int = MAX_HEATMAP_ROWS
    heatmap_cols: int = MAX_HEATMAP_COLS
    thinned: bool = False

    @classmethod
    def of(cls, data: TrainData, max_points: int = MAX_POINTS, heatmap_rows: int = MAX_HEATMAP_ROWS,
           heatmap_cols: int = MAX_HEATMAP_COLS) -> "_Plot":
        al = data.alerts
        counts = al[al["layer"] != S.MODEL]["layer"].value_counts()
        rules = sorted(al["rule"].unique().tolist())
        return cls(data, np.unique(al["step"].to_numpy(np.int64)), [str(x) for x in counts.index],
                   {r: PALETTE[(i + 1) % len(PALETTE)] for i, r in enumerate(rules)}, max_points, heatmap_rows,
                   heatmap_cols)

    def line(self, s: pd.Series, name: str, color: str | None = None, dash: str | None = None,
             width: float = 1.5) -> dict:
        """A thinned line trace of a step-indexed series (NaN drawn as gaps)."""
        steps = s.index.to_numpy(np.int64)
        vals = s.to_numpy(float)
        idx = thin(vals, steps, self.keep, self.max_points)
        self.thinned |= len(idx) < len(steps)
        ln: dict[str, Any] = {"width": width}
        if color:
            ln["color"] = color
        if dash:
            ln["dash"] = dash
        return {"type": "scatter", "mode": "lines+markers" if len(idx) < 3 else "lines", "name": ptext(name),
                "x": steps[idx].tolist(), "y": floats(vals[idx]), "line": ln,
                "hovertemplate": "step %{x}: %{y:.5g}"}


def _panels(panels: list[dict], row_height: int = 260, max_cols: int = 2, shared_x: bool = True) -> dict | None:
    """A figure with one subplot per panel {"title", "traces", "log"?, "range"?, "shapes"?}; None if empty."""
    panels = [p for p in panels if p["traces"]]
    if not panels:
        return None
    sp = Subplots([ptext(p["title"]) for p in panels], max_cols=max_cols)
    traces, shapes = [], []
    for i, p in enumerate(panels):
        refs = sp.refs(i)
        alone = len(p["traces"]) == 1  # the panel title names it: no legend entry
        traces.extend({**t, **refs, **({"showlegend": False} if alone else {})} for t in p["traces"])
        for sh in p.get("shapes", []):  # "full_width" / "full_height": span the panel (axis domain)
            sh = dict(sh)
            sh["xref"] = refs["xaxis"] + (" domain" if sh.pop("full_width", False) else "")
            sh["yref"] = refs["yaxis"] + (" domain" if sh.pop("full_height", False) else "")
            shapes.append(sh)
        ax = sp.layout["yaxis" + ("" if i == 0 else str(i + 1))]
        if p.get("log"):
            ax["type"] = "log"
        if p.get("range"):
            ax["range"] = p["range"]
        xa = sp.layout["xaxis" + ("" if i == 0 else str(i + 1))]
        if shared_x and i:
            xa["matches"] = "x"
    for ax in sp.bottom_x():
        ax["title"] = {"text": "step"}
    return figure(traces, sp, height=90 + row_height * sp.rows, shapes=shapes)


def _alert_hover(g: pd.DataFrame) -> str:
    lines = [f"{ptext(r.layer or '(model)')}: {ptext(r.message)}" for r in g.head(HOVER_ALERTS).itertuples()]
    if len(g) > HOVER_ALERTS:
        lines.append(f"(+{len(g) - HOVER_ALERTS} more)")
    return "<br>".join(lines)


def _alert_markers(pl: _Plot, on: pd.Series) -> list[dict]:
    """One marker trace per rule at its alert steps, placed on the series `on` (its value at the nearest
    recorded step); the hover lists the alerts of the step."""
    al = pl.data.alerts
    if al.empty or on.empty:
        return []
    fin = on[np.isfinite(on.to_numpy(float))]
    if fin.empty:
        return []
    out = []
    for rule, g in al.groupby("rule", sort=True):
        by_step = list(g.groupby("step", sort=True))
        if len(by_step) > pl.max_points:
            by_step = [by_step[i] for i in np.linspace(0, len(by_step) - 1, pl.max_points).round().astype(int)]
        xs = np.array([s for s, _ in by_step], dtype=np.int64)
        ys = fin.reindex(xs, method="nearest") if len(fin) > 1 else pd.Series(float(fin.iloc[0]), index=xs)
        out.append({"type": "scatter", "mode": "markers", "name": f"alert: {ptext(rule)}", "x": xs.tolist(),
                    "y": floats(ys.to_numpy(float)), "hovertext": [_alert_hover(gg) for _, gg in by_step],
                    "hovertemplate": "step %{x}<br>%{hovertext}",
                    "marker": {"symbol": "x", "size": 9, "color": pl.rule_colors.get(str(rule), PALETTE[1])}})
    return out


def _alert_lines(pl: _Plot) -> tuple[list[dict], str]:
    """Vertical lines at the alert steps (the busiest MAX_ALERT_LINES steps), and a note if capped."""
    al = pl.data.alerts
    if al.empty:
        return [], ""
    per_step = al.groupby("step").size().sort_values(ascending=False, kind="stable")
    shown = per_step.index[:MAX_ALERT_LINES]
    note = (f"Vertical lines mark the {len(shown)} steps with the most alerts (of {len(per_step)} steps with an "
            "alert); the markers cover all of them." if len(per_step) > len(shown) else "")
    return [{"type": "line", "x0": int(s), "x1": int(s), "y0": 0, "y1": 1, "full_height": True, "layer": "below",
             "line": {"color": "rgba(213,94,0,0.25)", "width": 1}} for s in sorted(shown)], note


def _heatmap(pl: _Plot, frame: pd.DataFrame, label: str, *, log: bool, agg: str = "max",
             signed: bool = False) -> tuple[dict, list[str]]:
    """A layers x steps heatmap of a per-layer metric (log10 when `log`; diverging on [-1, 1] when `signed`),
    capped to `pl.heatmap_rows` layers and `pl.heatmap_cols` step bins (aggregated with `agg`); with notes."""
    notes = []
    layers = list(frame.columns)
    if len(layers) > pl.heatmap_rows:
        keep = _top_layers(frame, pl.alert_layers, pl.heatmap_rows, signed)
        keep_set = set(keep)
        frame = frame[[c for c in layers if c in keep_set]]
        notes.append(f"The {label} heatmap shows {pl.heatmap_rows} of {len(layers)} layers: those with alerts "
                     f"first, then the largest; the other layers are not drawn.")
    vals = frame.to_numpy(float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(vals > 0, np.log10(np.where(vals > 0, vals, 1.0)), np.nan)
    steps = frame.index.to_numpy(np.int64)
    x, last = steps, steps
    if len(steps) > pl.heatmap_cols:
        bins = np.arange(len(steps)) * pl.heatmap_cols // len(steps)
        df = pd.DataFrame(vals).groupby(bins)
        vals = (df.max() if agg == "max" else df.mean()).to_numpy(float)
        first = pd.Series(steps).groupby(bins)
        x, last = first.min().to_numpy(), first.max().to_numpy()
        notes.append(f"The {label} heatmap bins {len(steps)} steps into {len(x)} columns (the "
                     f"{'maximum' if agg == 'max' else 'mean'} over each bin).")
    z = [floats(row, 5) for row in vals.T]
    what = ptext(f"log10 {label}" if log else label)
    trace = {"type": "heatmap", "x": [int(s) for s in x], "y": [ptext(c) for c in frame.columns], "z": z,
             "colorbar": {"title": {"text": what}}, "colorscale": "RdBu" if signed else "Viridis",
             "hoverongaps": False, "hovertemplate": "%{y}<br>step %{x}<br>" + what + " %{z:.4g}<extra></extra>"}
    if len(x) < len(steps):  # binned: the hover names each column's steps
        span = [f"{a}–{b}" if b > a else str(a) for a, b in zip(x, last)]
        trace["customdata"] = [span] * len(frame.columns)
        trace["hovertemplate"] = "%{y}<br>steps %{customdata}<br>" + what + " %{z:.4g}<extra></extra>"
    if signed:
        trace.update(zmin=-1, zmax=1, zmid=0)
    n = len(frame.columns)
    fig = figure([trace], Subplots([""]), height=120 + min(1600, max(220, 14 * n)),
                 margin={"l": 20, "r": 20, "t": 30, "b": 50})
    fig["layout"]["xaxis"]["title"] = {"text": "step"}
    fig["layout"]["yaxis"].update(autorange="reversed", automargin=True, type="category",
                                  showticklabels=n <= 60, tickfont={"size": 10})
    if n > 60:
        notes.append(f"The {label} heatmap has {n} rows: hover a row for its layer name.")
    return fig, notes


def _top_layers(frame: pd.DataFrame, alert_layers: Sequence[str], k: int, signed: bool = False) -> list[str]:
    """The k layers to show: those with alerts (most alerts first), then the largest |value| (most negative
    for a signed metric such as a cosine)."""
    cols = set(frame.columns)
    out = [c for c in alert_layers if c in cols][:k]
    if len(out) < k:
        score = (-frame.min(skipna=True)) if signed else frame.abs().max(skipna=True)
        rest = score.drop(labels=out, errors="ignore").sort_values(ascending=False, na_position="last")
        out.extend(list(rest.index[: k - len(out)]))
    return out


def _layer_figures(pl: _Plot, reg: FigureRegistry, fid: str, metric: str, label: str, *, log: bool = True,
                   signed: bool = False) -> tuple[list[dict], list[str]]:
    """Heatmap of a per-layer metric and line plots of its top-k layers; ([] , []) when not recorded."""
    frame = pl.data.layers(metric)
    if frame.empty:
        return [], []
    hm, notes = _heatmap(pl, frame, label, log=log, agg="mean" if signed else "max", signed=signed)
    top = _top_layers(frame, pl.alert_layers, TOP_K, signed)
    traces = [pl.line(pl.data.layer(metric, c), c, color=PALETTE[i % len(PALETTE)], width=1.2)
              for i, c in enumerate(top)]
    lines = _panels([{"title": "", "traces": traces, "log": log, "range": [-1.05, 1.05] if signed else None}],
                    row_height=340)
    which = "with alerts first, then the largest" if not signed else "with alerts first, then the most negative"
    return [{"title": f"{label} per layer", "id": reg.add(f"{fid}-hm", hm),
             "caption": f"Rows are layers in model order, columns steps{' (log10 colour scale)' if log else ''}."},
            {"title": f"{label}: {len(top)} layers", "id": reg.add(f"{fid}-top", lines),
             "caption": f"The layers {which} (of {frame.shape[1]})."}], notes


def _model_traces(pl: _Plot, metrics: Sequence[tuple[str, str, str | None]], start: int = 0) -> list[dict]:
    """Line traces of the recorded model-wide metrics among (metric, name, dash), coloured from PALETTE[start]
    on (a figure's panels pass different starts so that no two legend entries share a colour)."""
    out = []
    for i, (m, name, dash) in enumerate(metrics):
        s = pl.data.model(m)
        if not s.empty:
            out.append(pl.line(s, name, color=PALETTE[(start + i) % len(PALETTE)], dash=dash))
    return out


def _not_recorded(what: str) -> str:
    return f"{what} was not recorded in this run."


def _section(sid: str, title: str, nav: str, figs: list[dict], notes: list[str], missing: list[str],
             absent: str, caption: str = "") -> dict:
    figs = [{"title": "", "caption": "", **f} for f in figs if f.get("id")]
    if not figs:
        return {"id": sid, "title": title, "nav": nav, "figs": [], "notes": [], "missing": [_not_recorded(absent)],
                "caption": ""}
    return {"id": sid, "title": title, "nav": nav, "figs": figs, "notes": notes, "missing": missing,
            "caption": caption}


def _loss_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """The loss and lr timeline with the alert markers and lines."""
    d = pl.data
    loss, lr = d.model(S.LOSS), d.model(S.LR)
    panels = []
    shapes, note = _alert_lines(pl)
    if not loss.empty:
        panels.append({"title": "loss", "traces": [pl.line(loss, "loss", PALETTE[0])] + _alert_markers(pl, loss),
                       "shapes": shapes})
    if not lr.empty:
        panels.append({"title": "learning rate", "traces": [pl.line(lr, "lr", PALETTE[2])], "shapes": shapes})
    fig = _panels(panels, row_height=250, max_cols=1)
    missing = [_not_recorded(w) for w, s in (("The loss", loss), ("The learning rate", lr)) if s.empty]
    return _section("loss", "Loss and learning rate", "Loss", [{"title": "", "id": reg.add("loss", fig)}],
                    [note] if note else [], missing, "The loss and the learning rate",
                    "Crosses mark the steps where an online detector raised an alert (hover for its message); "
                    "vertical lines mark alert steps.")


def _norms_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """Global gradient norm before and after clipping, clip coefficient, update ratio, parameter norm, loss
    scale and non-finite / skipped steps (those recorded)."""
    d = pl.data
    panels = [
        {"title": "global gradient norm (pre and post clip)", "log": True,
         "traces": _model_traces(pl, [(S.GRAD_NORM, "pre-clip", None), (S.GRAD_NORM_CLIPPED, "post-clip", "dot")])},
        {"title": "clip coefficient", "traces": _model_traces(pl, [(S.CLIP_COEF, "clip coef", None)], start=2)},
        {"title": "update / parameter norm ratio", "log": True,
         "traces": _model_traces(pl, [(S.UPDATE_RATIO, "update ratio", None)])},
        {"title": "parameter norm", "traces": _model_traces(pl, [(S.PARAM_NORM, "param norm", None)])},
        {"title": "loss scale (AMP)", "log": True, "traces": _model_traces(pl, [(S.LOSS_SCALE, "loss scale", None)])},
        {"title": "non-finite gradients / skipped steps",
         "traces": _model_traces(pl, [(S.NONFINITE, "non-finite tensors", None), (S.SKIPPED, "skipped", "dot")],
                                 start=3)},
    ]
    fig = _panels(panels)
    missing = [_not_recorded(w) for w, m in (("The global gradient norm", S.GRAD_NORM),
                                             ("The clip coefficient", S.CLIP_COEF),
                                             ("The update/parameter ratio", S.UPDATE_RATIO)) if not d.has(m)]
    return _section("norms", "Gradient norm, clipping and update size", "Norms",
                    [{"title": "", "id": reg.add("norms", fig)}], [], missing, "The global gradient norm",
                    "Pre-clip: the L2 norm of the whole gradient (unscaled under AMP, after all-reduce); post-clip: "
                    "the norm the optimizer received; clip coefficient = post / pre (1: not clipped); update "
                    "ratio = ‖Δθ‖ / ‖θ‖.")


def _layers_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """Per-layer gradient norm and update ratio: heatmap and top-k lines of each."""
    figs, notes, missing = [], [], []
    for metric, label in ((S.GRAD_NORM, "gradient norm"), (S.UPDATE_RATIO, "update ratio")):
        f, n = _layer_figures(pl, reg, f"layer-{metric}", metric, label)
        figs += f
        notes += n
        if not f:
            missing.append(_not_recorded(f"The per-layer {label}"))
    return _section("layers", "Per-layer gradient norm and update ratio", "Layers", figs, notes, missing,
                    "The per-layer gradient norm and update ratio")


def _noise_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """Noise scale and GSNR (model-wide, and per layer when recorded) and per-example norm quantiles."""
    d = pl.data
    panels = [
        {"title": "gradient noise scale B_simple", "log": True,
         "traces": _model_traces(pl, [(S.NOISE_SCALE, "noise scale", None)])},
        {"title": "GSNR", "log": True, "traces": _model_traces(pl, [(S.GSNR, "GSNR", None)])},
        {"title": "per-example gradient norm quantiles", "log": True,
         "traces": _model_traces(pl, [(S.PE_Q10, "q10", "dot"), (S.PE_Q50, "median", None),
                                      (S.PE_Q90, "q90", "dot"), (S.PE_MAX, "max", "dash")], start=2)},
    ]
    figs = [{"title": "", "id": reg.add("noise", _panels(panels))}]
    notes = []
    for metric, label in ((S.NOISE_SCALE, "noise scale"), (S.GSNR, "GSNR"), (S.PE_Q50, "median per-example norm")):
        f, n = _layer_figures(pl, reg, f"layer-{metric}", metric, label)
        figs += f
        notes += n
    missing = [_not_recorded(w) for w, m in (("The noise scale", S.NOISE_SCALE), ("The GSNR", S.GSNR),
                                             ("The per-example norm quantiles", S.PE_Q50))
               if not (d.has(m) or d.has_layers(m))]
    return _section("noise", "Gradient noise", "Noise", figs, notes, missing,
                    "The gradient noise (noise scale, GSNR, per-example norms)",
                    "B_simple = EMA(tr Σ) / EMA(|G|²): the batch size above which larger batches stop helping much; "
                    "GSNR = mean over entries of mean² / (variance + 1e-5).")


def _sharpness_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """Sharpness against its stability threshold, softmax collapse (fp32 / bf16) and zero-loss rows."""
    d = pl.data
    panels = [
        {"title": "sharpness and its stability threshold", "log": True,
         "traces": _model_traces(pl, [(S.SHARPNESS, "sharpness λmax", None),
                                      (S.SHARPNESS_THRESHOLD, "threshold", "dash")])},
        {"title": "softmax collapse and zero-loss rows", "range": [-0.02, 1.02],
         "traces": _model_traces(pl, [(S.SC_FP32, "collapse fp32", None), (S.SC_BF16, "collapse bf16", "dot"),
                                      (S.ZERO_LOSS, "zero-loss rows", "dash")], start=2)},
    ]
    missing = [_not_recorded(w) for w, m in (("Sharpness", S.SHARPNESS), ("Softmax collapse", S.SC_FP32))
               if not d.has(m)]
    return _section("sharpness", "Sharpness and numerics", "Sharpness",
                    [{"title": "", "id": reg.add("sharpness", _panels(panels))}], [], missing,
                    "Sharpness (and softmax collapse)",
                    "λmax of the (preconditioned, for Adam) Hessian on the probe batch, against 2/lr (GD), "
                    "(2+2β)/lr (momentum) or (2+2β1)/((1−β1) lr) (Adam); softmax collapse = share of rows whose "
                    "Σ exp(z − max z) rounds to exactly 1.")


def _conflict_section(pl: _Plot, reg: FigureRegistry) -> dict:
    """Cosines between term gradients (model-wide lines, per-layer heatmaps) and the terms' norms."""
    d = pl.data
    cos = [m for m in d.metrics if m.startswith(S.COS_PREFIX)]
    norms = [m for m in d.metrics if m.startswith(S.TERM_NORM_PREFIX)]

    def pair(m: str) -> str:
        a, _, b = m[len(S.COS_PREFIX):].partition("|")
        return f"cos({a}, {b})"

    panels = [
        {"title": "cosine between term gradients (model-wide)", "range": [-1.05, 1.05],
         "traces": _model_traces(pl, [(m, pair(m), None) for m in cos])},
        {"title": "term gradient norms", "log": True,
         "traces": _model_traces(pl, [(m, m[len(S.TERM_NORM_PREFIX):], None) for m in norms], start=len(cos))},
    ]
    panels[0]["shapes"] = [{"type": "line", "x0": 0, "x1": 1, "full_width": True, "y0": 0, "y1": 0,
                            "line": {"color": "#999999", "width": 1, "dash": "dot"}}]
    fig = _panels(panels)
    figs = [{"title": "", "id": reg.add("conflict", fig)}]
    notes = []
    per_layer = [m for m in cos if d.has_layers(m)]
    if len(per_layer) > MAX_PAIRS:
        notes.append(f"Per-layer heatmaps are drawn for {MAX_PAIRS} of {len(per_layer)} term pairs.")
    for i, m in enumerate(per_layer[:MAX_PAIRS]):
        f, n = _layer_figures(pl, reg, f"cos-{i}", m, pair(m), log=False, signed=True)
        figs += f
        notes += n
    return _section("conflict", "Gradient conflict", "Conflict", figs, notes, [],
                    "Gradient conflict between terms (cos:<a>|<b>)",
                    "Cosine between the gradients of two loss terms or micro-batches: negative values mean the "
                    "terms pull the weights in opposite directions.")


# ---------------------------------------------------------------------------------------------------------
# entry point


def figure_sections(data: TrainData, registry: FigureRegistry, *, max_points: int = MAX_POINTS,
                    heatmap_rows: int = MAX_HEATMAP_ROWS, heatmap_cols: int = MAX_HEATMAP_COLS
                    ) -> tuple[list[dict], bool]:
    """The plot sections of the training page, in page order, and whether any line trace was thinned.

    Each section is {"id", "title", "nav", "figs": [{"title", "id", "caption"}], "notes", "missing",
    "caption"}; figure ids are those `registry.add` returned. `max_points` caps the points of each line trace
    (see `thin`, at least 8), `heatmap_rows` and `heatmap_cols` the layers and step bins of each heatmap.
    """
    for name, v, low in (("max_points", max_points, 8), ("heatmap_rows", heatmap_rows, 1),
                         ("heatmap_cols", heatmap_cols, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"figure_sections: {name}={v!r} must be an integer >= {low}")
    pl = _Plot.of(data, int(max_points), int(heatmap_rows), int(heatmap_cols))
    sections = [_loss_section(pl, registry), _norms_section(pl, registry), _layers_section(pl, registry),
                _noise_section(pl, registry), _sharpness_section(pl, registry), _conflict_section(pl, registry)]
    return sections, pl.thinned
