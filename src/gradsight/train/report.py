"""The training report and terminal summary of a training-monitor run (`gradsight.train.Monitor`).

Reads the run directory only: ``manifest.json`` (identity, "optimizer", "finished"), and the summary tables
``series.parquet`` (SCALARS merged), ``alerts.parquet`` (ALERTS) and ``diagnoses.parquet`` (DIAGNOSES) whose
columns and metric names are defined in `gradsight.train.schema`. Nothing is recomputed from the model: the
page plots what the monitor recorded and lists what `train.diagnose` concluded.

The page (template ``train/train.html``) is built with `gradsight.report.kit` like every other page: plotly.js
inlined once, each figure embedded as script-safe JSON (`kit.script_json`), user text (layer names, messages,
actions, term names) autoescaped by jinja and entity-escaped (`kit.ptext`) before it reaches plotly. Sections
whose measures were not recorded say so in one line instead of drawing empty axes.

Large runs stay readable and small: every line trace keeps at most `MAX_POINTS` points (the minimum, the
maximum and the first non-finite value of each bin of steps, plus the alert steps, so spikes and NaNs survive
downsampling), heatmaps keep at most `MAX_HEATMAP_ROWS` layers (those with alerts first, then the largest)
and `MAX_HEATMAP_COLS` columns of step bins; the page says when either cap applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..report.kit import (PALETTE, FigureRegistry, Subplots, figure, flatten, floats, fmt_num, fmt_pct, out_path,
                          ptext, read_table, render_page, report_path_line, run_context, str_cols)
from ..runs.store import read_manifest
from . import schema as S

__all__ = [
    "render", "print_summary", "run_findings", "build_context", "load_train", "TrainData", "train_findings",
    "overview", "diagnosis_rows", "alert_rows", "identity_rows", "thin", "MAX_POINTS", "MAX_HEATMAP_ROWS",
    "MAX_HEATMAP_COLS", "MAX_ALERT_ROWS", "MAX_DIAGNOSES", "TOP_K",
]

HERE = Path(__file__).parent  # the page template (train.html) lives next to this module

MAX_POINTS = 2000        # points per line trace (steps are thinned above this)
MAX_HEATMAP_ROWS = 300   # layers per heatmap
MAX_HEATMAP_COLS = 500   # step bins per heatmap
MAX_ALERT_ROWS = 500     # rows of the alerts table
MAX_ALERT_LINES = 150    # vertical alert lines on the loss timeline
MAX_DIAGNOSES = 200      # diagnoses listed on the page
MAX_PAIRS = 6            # per-layer conflict heatmaps (term pairs)
TOP_K = 8                # layers drawn as lines under each heatmap
HOVER_ALERTS = 5         # alert messages listed in one marker's hover text
SEVERITIES = ("error", "warning", "info")
CLIPPED_BELOW = 1 - 1e-6  # a step counts as clipped when its clip coefficient is below this

# ---------------------------------------------------------------------------------------------------------
# reading the run


@dataclass
class TrainData:
    """A monitor run as read from disk: manifest, the three summary tables (never None; empty with the schema
    columns when missing) and notes on what could not be read."""

    run_dir: Path
    manifest: dict
    series: pd.DataFrame
    alerts: pd.DataFrame
    diagnoses: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    _by_metric: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_metric = {str(m): g for m, g in self.series.groupby("metric", sort=False)}

    @property
    def metrics(self) -> list[str]:
        """The recorded metric names, in the order they first appear."""
        return list(self._by_metric)

    def model(self, metric: str) -> pd.Series:
        """The model-wide values (layer MODEL) of `metric` indexed by step (sorted; the last write of a step
        wins); empty when not recorded. NaN values are kept."""
        return self.layer(metric, S.MODEL)

    def layers(self, metric: str) -> pd.DataFrame:
        """The per-layer values of `metric`: steps (sorted index) x layers (columns in the order they first
        appear); empty when not recorded per layer. Missing (step, layer) cells are NaN."""
        g = self._by_metric.get(metric)
        if g is None:
            return pd.DataFrame()
        g = g[g["layer"] != S.MODEL].drop_duplicates(["step", "layer"], keep="last")
        if g.empty:
            return pd.DataFrame()
        wide = g.pivot(index="step", columns="layer", values="value").sort_index()
        return wide.reindex(columns=list(pd.unique(g["layer"]))).astype(float)

    def layer(self, metric: str, layer: str) -> pd.Series:
        """The values of `metric` of one layer indexed by step (sorted; NaN kept); empty when not recorded."""
        g = self._by_metric.get(metric)
        if g is None:
            return pd.Series(dtype=float)
        g = g[g["layer"] == layer].drop_duplicates("step", keep="last").sort_values("step")
        return pd.Series(g["value"].to_numpy(float), index=g["step"].to_numpy(np.int64), name=metric)

    def has(self, metric: str) -> bool:
        return not self.model(metric).empty

    def has_layers(self, metric: str) -> bool:
        g = self._by_metric.get(metric)
        return g is not None and bool((g["layer"] != S.MODEL).any())

    @property
    def steps(self) -> np.ndarray:
        """Every step with at least one recorded value, sorted."""
        return np.unique(self.series["step"].to_numpy(np.int64))


def _table(path: Path, notes: list[str], label: str, columns: list[str], why: str) -> pd.DataFrame:
    """A summary table with the schema columns and dtypes, or an empty one (with a note) when it is missing,
    unreadable or lacks columns."""
    df = read_table(path, notes, label, why)
    if df is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            notes.append(f"{label} ({path.name}) lacks the columns {', '.join(missing)}; it is ignored.")
            df = None
    if df is None:
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    df = str_cols(df[columns], [c for c in columns if c in ("layer", "metric", "rule", "severity", "message",
                                                            "evidence", "action")])
    for c in ("step", "last_step"):
        if c in df:
            s = pd.to_numeric(df[c], errors="coerce")
            df = df[s.notna()].copy()
            df[c] = s[s.notna()].astype(np.int64)
    for c in ("value", "threshold"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df.reset_index(drop=True)


def load_train(run_dir: Path | str) -> TrainData:
    """Read a monitor run directory (manifest.json is required; a missing summary table gives a note and an
    empty table)."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    notes: list[str] = []
    why = "the run's shards have not been summarised yet"
    series = _table(run_dir / f"{S.SERIES}.parquet", notes, "series", S.SCALAR_COLUMNS, why)
    alerts = _table(run_dir / f"{S.ALERTS}.parquet", notes, "alerts", S.ALERT_COLUMNS, why)
    diagnoses = _table(run_dir / f"{S.DIAGNOSES}.parquet", notes, "diagnoses", S.DIAGNOSIS_COLUMNS, why)
    if not man.get("finished"):
        notes.append("The run has not finished: the tables hold the steps summarised so far.")
    return TrainData(run_dir, man, series, alerts.sort_values(["step", "layer"], kind="stable"), diagnoses, notes)


# ---------------------------------------------------------------------------------------------------------
# identity, overview and findings


def _model_id(man: dict) -> str:
    for src in (man.get("model"), (man.get("identity") or {}).get("model")):
        if isinstance(src, str) and src:
            return src
        if isinstance(src, dict):
            for k in ("id", "name", "class"):
                if src.get(k):
                    return str(src[k])
    return "(unknown)"


def _param_count(man: dict) -> str:
    """'N tensors, M entries' from the parameter names and shapes of the identity, '' when absent."""
    ident = man.get("identity") or {}
    params = next((ident[k] for k in ("params", "parameters", "param_shapes") if ident.get(k)), None)
    if isinstance(params, dict):
        shapes = list(params.values())
    elif isinstance(params, list):
        shapes = [p.get("shape") if isinstance(p, dict) else None for p in params]
    else:
        return ""
    sizes = [math.prod(int(d) for d in s) for s in shapes
             if isinstance(s, (list, tuple)) and all(isinstance(d, (int, float)) for d in s)]
    entries = f", {sum(sizes):,} entries" if len(sizes) == len(shapes) else ""
    return f"{len(shapes)} tensors{entries}"


def _monitor_config(man: dict) -> dict:
    ident = man.get("identity") or {}
    cfg = man.get("config") or ident.get("config") or ident.get("monitor") or {}
    return cfg if isinstance(cfg, dict) else {"config": cfg}


def _optimizer_text(opt: dict) -> str:
    parts = [str(opt.get("name") or "(unknown optimizer)")]
    for key, label in (("betas", "betas"), ("momentum", "momentum"), ("weight_decay", "weight decay")):
        v = opt.get(key)
        if v is None or v == []:
            continue
        shown = "(" + ", ".join(fmt_num(x) for x in v) + ")" if isinstance(v, (list, tuple)) else fmt_num(v)
        parts.append(f"{label} {shown}")
    return ", ".join(parts)


def _steps_text(steps: np.ndarray) -> str:
    if not len(steps):
        return "none recorded"
    return f"{len(steps)} ({int(steps[0])}–{int(steps[-1])})" if len(steps) > 1 else f"1 (step {int(steps[0])})"


def identity_rows(data: TrainData) -> list[tuple[str, str]]:
    """(label, value) lines of the page header and the terminal summary: model, optimizer, lr, steps, world
    size, monitored parameters, status."""
    man = data.manifest
    opt = man.get("optimizer") or {}
    opt = opt if isinstance(opt, dict) else {"name": str(opt)}
    rows = [("Model", _model_id(man)), ("Optimizer", _optimizer_text(opt))]
    lr = data.model(S.LR)
    lr_text = fmt_num(opt.get("lr")) if opt.get("lr") is not None else "(not in the manifest)"
    if lr.notna().any() and float(lr.min()) != float(lr.max()):
        lr_text += f" (schedule: {fmt_num(lr.min())} to {fmt_num(lr.max())})"
    rows.append(("Learning rate", lr_text))
    rows.append(("Steps recorded", _steps_text(data.steps)))
    ws = man.get("world_size", (man.get("identity") or {}).get("world_size"))
    rows.append(("World size", str(ws) if ws is not None else "1 (not recorded)"))
    params = _param_count(man)
    if params:
        rows.append(("Parameters", params))
    rows.append(("Status", "finished" if man.get("finished") else "not finished"))
    return rows


def _argext(s: pd.Series, fn: str) -> tuple[float, int] | None:
    f = s[np.isfinite(s.to_numpy(float))]
    if f.empty:
        return None
    i = f.idxmax() if fn == "max" else f.idxmin()
    return float(f[i]), int(i)


def _clip_coef(data: TrainData) -> pd.Series:
    """The recorded clip coefficient, else grad_norm_clipped / grad_norm."""
    c = data.model(S.CLIP_COEF)
    if c.empty and data.has(S.GRAD_NORM) and data.has(S.GRAD_NORM_CLIPPED):
        g, gc = data.model(S.GRAD_NORM).align(data.model(S.GRAD_NORM_CLIPPED), join="inner")
        with np.errstate(divide="ignore", invalid="ignore"):
            c = gc / g
    return c


def overview(data: TrainData) -> dict[str, Any]:
    """The numbers of the summary: steps, loss (first, final, min), global grad norm (median, max, non-finite
    steps), clipping (steps clipped / steps with a coefficient), alerts per rule (most frequent first)."""
    out: dict[str, Any] = {"steps": data.steps}
    loss = data.model(S.LOSS)
    fin = loss[np.isfinite(loss.to_numpy(float))]
    if not fin.empty:
        out["loss"] = {"first": float(fin.iloc[0]), "final": float(fin.iloc[-1]), "final_step": int(fin.index[-1]),
                       "min": _argext(fin, "min"), "n_nonfinite": int(len(loss) - len(fin))}
    g = data.model(S.GRAD_NORM)
    if not g.empty:
        gf = g[np.isfinite(g.to_numpy(float))]
        out["grad_norm"] = {"median": float(gf.median()) if len(gf) else float("nan"), "max": _argext(g, "max"),
                            "n_nonfinite": int(len(g) - len(gf)), "n": int(len(g))}
    c = _clip_coef(data)
    c = c[np.isfinite(c.to_numpy(float))]
    if not c.empty:
        n_clip = int((c < CLIPPED_BELOW).sum())
        out["clip"] = {"n_clipped": n_clip, "n": int(len(c)), "rate": n_clip / len(c)}
    out["alerts"] = [(str(r), int(n)) for r, n in data.alerts["rule"].value_counts().items()]
    return out


def _overview_lines(ov: dict) -> list[str]:
    lines = []
    steps = ov["steps"]
    if not len(steps):
        return ["No measurement was recorded: the series is empty."]
    lines.append(f"{len(steps)} steps recorded (step {int(steps[0])} to {int(steps[-1])}).")
    if "loss" in ov:
        lo = ov["loss"]
        mn = f"; minimum {fmt_num(lo['min'][0])} at step {lo['min'][1]}" if lo["min"] else ""
        nf = f"; {lo['n_nonfinite']} non-finite" if lo["n_nonfinite"] else ""
        lines.append(f"Loss {fmt_num(lo['first'])} at the first step, {fmt_num(lo['final'])} at step "
                     f"{lo['final_step']}{mn}{nf}.")
    if "grad_norm" in ov:
        gn = ov["grad_norm"]
        mx = f", maximum {fmt_num(gn['max'][0])} at step {gn['max'][1]}" if gn["max"] else ""
        nf = (f"; non-finite at {gn['n_nonfinite']} step{'s' if gn['n_nonfinite'] > 1 else ''}"
              if gn["n_nonfinite"] else "")
        lines.append(f"Global gradient norm (pre-clip): median {fmt_num(gn['median'])}{mx}{nf}.")
    if "clip" in ov:
        cl = ov["clip"]
        lines.append(f"Clipped at {cl['n_clipped']} of {cl['n']} steps ({fmt_pct(cl['rate'])}).")
    if ov["alerts"]:
        total = sum(n for _, n in ov["alerts"])
        lines.append(f"{total} alerts: " + ", ".join(f"{r} {n}" for r, n in ov["alerts"]) + ".")
    else:
        lines.append("No alert was raised.")
    return lines


def _step_span(step: int, last: int) -> str:
    return f"{step}–{last}" if last > step else str(step)


def _evidence_text(ev: str, limit: int = 600) -> str:
    """The evidence JSON as 'key value' pairs (the raw text when it is not a JSON object), capped."""
    try:
        obj = json.loads(ev) if ev else {}
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        text = "; ".join(f"{k} {fmt_num(v) if isinstance(v, (int, float)) else v}" for k, v in flatten(obj).items())
    else:
        text = ev
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def diagnosis_rows(data: TrainData) -> list[dict]:
    """The diagnoses, most severe first then by step: severity (one of SEVERITIES, unknown ones shown as
    given with the info style), rule, steps, layer ('' for model-wide), message, action, evidence."""
    d = data.diagnoses
    if d.empty:
        return []
    rank = d["severity"].str.lower().map({s: i for i, s in enumerate(SEVERITIES)}).fillna(len(SEVERITIES))
    d = d.assign(_rank=rank).sort_values(["_rank", "step", "layer"], kind="stable")
    rows = []
    for r in d.itertuples(index=False):
        sev = str(r.severity).lower()
        rows.append({"severity": str(r.severity) or "info", "style": sev if sev in SEVERITIES else "info",
                     "rule": str(r.rule), "step": int(r.step), "last_step": int(r.last_step),
                     "steps": _step_span(int(r.step), int(r.last_step)), "layer": str(r.layer),
                     "message": str(r.message), "action": str(r.action), "evidence": _evidence_text(str(r.evidence))})
    return rows


def _diagnosis_line(d: dict) -> str:
    where = f"in {d['layer']}" if d["layer"] else "model-wide"
    action = f" Action: {d['action']}" if d["action"] else ""
    return f"[{d['severity']}] {d['rule']}, step {d['steps']}, {where}: {d['message']}{action}"


def train_findings(data: TrainData) -> list[dict]:
    """[{"title", "lines"}]: the diagnoses (one line each, most severe first) when there are any, then the
    overview of the run (steps, loss, gradient norm, clipping, alerts). Plain text; pages escape it."""
    out = []
    diags = diagnosis_rows(data)
    if diags:
        n_sev = pd.Series([d["severity"] for d in diags]).value_counts()
        counts = ", ".join(f"{n} {s}" for s, n in n_sev.items())
        out.append({"title": f"{len(diags)} diagnoses ({counts})", "lines": [_diagnosis_line(d) for d in diags]})
    out.append({"title": "Training", "lines": _overview_lines(overview(data))})
    return out


def run_findings(run_dir: Path | str) -> list[dict]:
    """The key findings of a monitor run for the index page: the diagnoses, then the overview."""
    return train_findings(load_train(run_dir))


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
    """What the figure builders share: the alert steps to keep, the alerted layers, the rule colours, and the
    downsampling notes they raise."""

    data: TrainData
    keep: np.ndarray
    alert_layers: list[str]
    rule_colors: dict[str, str]
    thinned: bool = False

    @classmethod
    def of(cls, data: TrainData) -> "_Plot":
        al = data.alerts
        counts = al[al["layer"] != S.MODEL]["layer"].value_counts()
        rules = sorted(al["rule"].unique().tolist())
        return cls(data, np.unique(al["step"].to_numpy(np.int64)), [str(x) for x in counts.index],
                   {r: PALETTE[(i + 1) % len(PALETTE)] for i, r in enumerate(rules)})

    def line(self, s: pd.Series, name: str, color: str | None = None, dash: str | None = None,
             width: float = 1.5) -> dict:
        """A thinned line trace of a step-indexed series (NaN drawn as gaps)."""
        steps = s.index.to_numpy(np.int64)
        vals = s.to_numpy(float)
        idx = thin(vals, steps, self.keep)
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
        if len(by_step) > MAX_POINTS:
            by_step = [by_step[i] for i in np.linspace(0, len(by_step) - 1, MAX_POINTS).round().astype(int)]
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
    capped to MAX_HEATMAP_ROWS layers and MAX_HEATMAP_COLS step bins (aggregated with `agg`); with notes."""
    notes = []
    layers = list(frame.columns)
    if len(layers) > MAX_HEATMAP_ROWS:
        keep = _top_layers(frame, pl.alert_layers, MAX_HEATMAP_ROWS, signed)
        keep_set = set(keep)
        frame = frame[[c for c in layers if c in keep_set]]
        notes.append(f"The {label} heatmap shows {MAX_HEATMAP_ROWS} of {len(layers)} layers: those with alerts "
                     f"first, then the largest; the other layers are not drawn.")
    vals = frame.to_numpy(float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(vals > 0, np.log10(np.where(vals > 0, vals, 1.0)), np.nan)
    steps = frame.index.to_numpy(np.int64)
    x, last = steps, steps
    if len(steps) > MAX_HEATMAP_COLS:
        bins = np.arange(len(steps)) * MAX_HEATMAP_COLS // len(steps)
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


def alert_rows(data: TrainData, limit: int = MAX_ALERT_ROWS) -> tuple[list[dict], int]:
    """The first `limit` alerts by step (formatted), and how many more there are."""
    al = data.alerts
    rows = [{"step": int(r.step), "layer": r.layer, "rule": r.rule, "value": fmt_num(r.value),
             "threshold": fmt_num(r.threshold), "message": r.message} for r in al.head(limit).itertuples()]
    return rows, max(0, len(al) - limit)


def _alert_rule_rows(data: TrainData) -> list[dict]:
    al = data.alerts
    if al.empty:
        return []
    g = al.groupby("rule")
    t = pd.DataFrame({"n": g.size(), "first": g["step"].min(), "last": g["step"].max(),
                      "layers": g["layer"].nunique()}).sort_values("n", ascending=False, kind="stable")
    return [{"rule": str(r), "n": int(x.n), "first": int(x.first), "last": int(x.last), "layers": int(x.layers)}
            for r, x in t.iterrows()]


# ---------------------------------------------------------------------------------------------------------
# page


def build_context(data: TrainData) -> dict:
    """The template fields of the training page."""
    man = data.manifest
    model_id = _model_id(man)
    cfg = _monitor_config(man)
    safe = {**man, "model": {"id": model_id}, "data": {}, "config": cfg}
    reg = FigureRegistry()
    pl = _Plot.of(data)
    sections = [_loss_section(pl, reg), _norms_section(pl, reg), _layers_section(pl, reg), _noise_section(pl, reg),
                _sharpness_section(pl, reg), _conflict_section(pl, reg)]
    notes = list(data.notes)
    if pl.thinned:
        notes.append(f"Long run: each line keeps at most {MAX_POINTS} points (the minimum, maximum and first "
                     f"non-finite value of each bin of steps, and up to {MAX_POINTS // 4} alert steps); the values "
                     "drawn are exact, none is averaged.")
    diags = diagnosis_rows(data)
    alerts, alerts_omitted = alert_rows(data)
    flat = flatten(cfg)
    return {
        **run_context(safe, data.run_dir),
        "title": f"gradsight training report: {model_id}",
        "identity": identity_rows(data),
        "notes": notes,
        "empty": data.series.empty,
        "diagnoses": diags[:MAX_DIAGNOSES],
        "diagnoses_omitted": max(0, len(diags) - MAX_DIAGNOSES),
        "findings": [f for f in train_findings(data) if f["title"] == "Training"],
        "sections": sections,
        "alerts": alerts,
        "alerts_omitted": alerts_omitted,
        "alert_rules": _alert_rule_rows(data),
        "n_alerts": len(data.alerts),
        "key_config": [(k, json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v))
                       for k, v in list(flat.items())[:40]],
        "config_json": json.dumps(cfg, indent=2, default=str, ensure_ascii=False),
        "figures": reg.items,
    }


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a monitor run, atomically; returns the written path."""
    data = load_train(run_dir)
    return render_page("train.html", build_context(data), out_path(run_dir, out), search=(HERE,))


# ---------------------------------------------------------------------------------------------------------
# terminal

_SEV_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def print_summary(run_dir: Path | str, console=None) -> None:
    """The run in a few lines: identity, steps, final and minimum loss, grad-norm median and max, clip rate,
    alert counts by rule, then one line per diagnosis (severity, rule, steps, layer, message, action) and the
    report path.

    Every line is printed with ``soft_wrap`` (no hard wrapping, so each diagnosis stays one line in a log file)
    and user text as rich ``Text`` (never parsed as markup).
    """
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    data = load_train(run_dir)

    def say(t: Text) -> None:
        console.print(t, soft_wrap=True)

    say(Text.assemble(("gradsight train run ", "bold"), (str(data.run_dir), "cyan")))
    for k, v in identity_rows(data):
        say(Text(f"{k.lower():<15} ", style="dim") + Text(v))
    for note in data.notes:
        say(Text("note: ", style="dim") + Text(note))
    ov = overview(data)
    for line in _overview_lines(ov):
        say(Text(line))
    diags = diagnosis_rows(data)
    if diags:
        say(Text(f"diagnoses ({len(diags)})", style="bold"))
        for d in diags:
            t = Text("  ") + Text(f"{d['severity'].upper():<7}", style=_SEV_STYLE.get(d["style"], ""))
            t += Text(f" step {d['steps']}  {d['rule']}  ")
            t += Text(d["layer"] or "(model)", style="cyan")
            t += Text(f"  {d['message']}")
            if d["action"]:
                t += Text("  action: ", style="dim") + Text(d["action"])
            say(t)
    else:
        say(Text("no diagnosis", style="dim"))
    say(report_path_line(data.run_dir))
