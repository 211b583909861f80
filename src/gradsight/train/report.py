"""The training report and terminal summary of a training-monitor run (`gradsight.train.Monitor`).

Reads the run directory only: ``manifest.json`` (identity, "optimizer", "finished"), and the summary tables
``series.parquet`` (SCALARS merged), ``alerts.parquet`` (ALERTS) and ``diagnoses.parquet`` (DIAGNOSES) whose
columns and metric names are defined in `gradsight.train.schema`. Nothing is recomputed from the model: the
page plots what the monitor recorded and lists what `train.diagnose` concluded.

The page (template ``train/train.html``) is built with `gradsight.report.kit` like every other page: plotly.js
inlined once, each figure embedded as script-safe JSON (`kit.script_json`), user text (layer names, messages,
actions, term names) autoescaped by jinja and entity-escaped (`kit.ptext`) before it reaches plotly. Sections
whose measures were not recorded say so in one line instead of drawing empty axes.

The figures (downsampled lines, capped heatmaps and the plot sections) are built in `gradsight.train.figures`;
this module reads the run, writes the identity, overview, diagnoses and alert tables, and assembles the page
and the terminal summary. `thin`, `TOP_K` and the caps `MAX_POINTS`, `MAX_HEATMAP_ROWS` and `MAX_HEATMAP_COLS`
are re-exported from there; the three caps are read from this module each time a page is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..report.kit import (FigureRegistry, flatten, fmt_num, fmt_pct, out_path, read_table, render_page,
                          report_path_line, run_context, str_cols)
from ..runs.store import read_manifest
from . import schema as S
from .figures import MAX_HEATMAP_COLS, MAX_HEATMAP_ROWS, MAX_POINTS, TOP_K, figure_sections, thin

__all__ = [
    "render", "print_summary", "run_findings", "build_context", "load_train", "TrainData", "train_findings",
    "overview", "diagnosis_rows", "alert_rows", "identity_rows", "thin", "MAX_POINTS", "MAX_HEATMAP_ROWS",
    "MAX_HEATMAP_COLS", "MAX_ALERT_ROWS", "MAX_DIAGNOSES", "TOP_K",
]

HERE = Path(__file__).parent  # the page template (train.html) lives next to this module

MAX_ALERT_ROWS = 500     # rows of the alerts table
MAX_DIAGNOSES = 200      # diagnoses listed on the page
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
    # the caps are read here, at call time, so that a caller (or a test) may set them on this module
    sections, thinned = figure_sections(data, reg, max_points=MAX_POINTS, heatmap_rows=MAX_HEATMAP_ROWS,
                                        heatmap_cols=MAX_HEATMAP_COLS)
    notes = list(data.notes)
    if thinned:
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
