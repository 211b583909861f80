"""Diagnoses of a training-monitor run: what went wrong, when, in which layer, with the numbers, and what to do.

`diagnose(series, alerts, manifest)` runs a registry of rules (`RULES`) over the tidy SERIES table (one row per
(step, layer, metric)) and the ALERTS of the online detectors, and returns one DIAGNOSES row per finding:
the step range, the layer, a sentence with the numbers, the numbers again as JSON (`evidence`), and an action
that names a gradsight transform where one applies (the diagnose-then-act link of the monitor spec).

Why rules and not thresholds on raw values: a training trace is noisy, drifts (the loss falls, the lr warms
up and decays) and differs by orders of magnitude between layers. So every rule compares a value with a
*robust* reference of the same trace (the median of the previous `window` observations, the median absolute
deviation for the spread), needs a minimum history before it may fire, and asks for both a large ratio and a
large robust z-score, so a short or flat trace never fires. All knobs live in one dataclass,
`DiagnosisThresholds` (named apart from the online monitor's `gradsight.train.Thresholds`).

This module holds the machinery: the thresholds, the `RuleContext` the rules read, the registry (`RULES`,
`register`), the detectors several rules share (`grad_spikes`, `loss_spikes`) and `diagnose` itself. The ten
built-in rules live in `gradsight.train.rules`, which is imported at the end of this module so that `RULES`
is complete as soon as `diagnose` is importable.

Add a rule with `@register("name")` (a function `(series, alerts, ctx) -> list[dict]`), disable one with
`diagnose(..., rules=[n for n in RULES if n != "clipping"])`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from . import schema as S

__all__ = ["DiagnosisThresholds", "RuleContext", "Rule", "RULES", "register", "diagnose", "grad_spikes",
           "loss_spikes", "finite_only", "SEVERITIES"]

SEVERITIES = ("info", "warning", "error")
_MAD_SIGMA = 1.4826  # MAD -> standard deviation for a normal distribution


@dataclass(frozen=True)
class DiagnosisThresholds:
    """Every knob of the rules, with its default and why.

    Attributes:
        min_history: observations a running reference needs before a rule may compare with it (20).
        window: observations in the running median of spike rules (100 previous steps, the current excluded).
        recent: observations of the "recent window" of the state rules (clipping, update ratio, layer scale,
            noise scale): the last 200.
        spike_factor: gradient spike when grad_norm >= this x its running median (10).
        spike_z: ... and the robust z-score of log grad_norm >= this (5; a layer whose norm varies by a
            factor e per step needs ~150x to fire, not 10x).
        loss_spike_factor: loss spike when loss >= this x its running median (1.5).
        loss_spike_z: ... and its robust z-score >= this (6).
        response_steps: steps after a gradient spike in which the loss response is read, and before a loss
            spike in which a gradient spike counts as its cause (3).
        recovery_factor: the loss has recovered when back below this x its pre-spike median (1.2).
        recovery_steps: a loss spike that recovers within this many steps is transient, i.e. a bad batch (10).
        lr_rise_factor: the lr "rose" before a loss spike when it is >= this x its running median (1.2).
        nonfinite_amp_share: under fp16 AMP (a loss_scale series), skipped non-finite steps up to this share
            of all steps are GradScaler's normal calibration: severity info (0.01).
        clip_share: clipping "always on" above this share of the recent steps (0.5).
        update_ratio_high / update_ratio_low: the per-layer median ||dtheta||/||theta|| band (1e-2, 1e-5).
            The rule of thumb for Adam-type training is ~1e-3 per step (Karpathy's "update:data ratio");
            1e-2 moves a layer by 1% a step, 1e-5 barely moves it.
        layer_factor: a layer's median grad_norm this many times above (exploding) or below (vanishing) the
            median layer's (100).
        min_layers: layers needed before the layer-scale rule compares them (3).
        conflict_share: conflict when cos < 0 on more than this share of measured steps (0.3).
        min_measured: measured steps a cosine needs before it is judged (10).
        probes: the "last probes" of scheduled measures (sharpness, softmax collapse): 5.
        min_probes: probes needed before those rules are judged (3).
        eos_ratio: sharpness / its stability threshold at which lr is at the stability limit (1.0).
        eos_rising_ratio: ... or this ratio when it is still rising (0.9).
        collapse_frac: softmax-collapse and zero-loss shares above this are a collapse (0.1).
        noise_factor: B_simple this many times above or below the batch size (10).
    """

    min_history: int = 20
    window: int = 100
    recent: int = 200
    spike_factor: float = 10.0
    spike_z: float = 5.0
    loss_spike_factor: float = 1.5
    loss_spike_z: float = 6.0
    response_steps: int = 3
    recovery_factor: float = 1.2
    recovery_steps: int = 10
    lr_rise_factor: float = 1.2
    nonfinite_amp_share: float = 0.01
    clip_share: float = 0.5
    update_ratio_high: float = 1e-2
    update_ratio_low: float = 1e-5
    layer_factor: float = 100.0
    min_layers: int = 3
    conflict_share: float = 0.3
    min_measured: int = 10
    probes: int = 5
    min_probes: int = 3
    eos_ratio: float = 1.0
    eos_rising_ratio: float = 0.9
    collapse_frac: float = 0.1
    noise_factor: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"DiagnosisThresholds.{f.name}={v!r}: must be a positive finite number")
            if f.type == "int" and int(v) != v:
                raise ValueError(f"DiagnosisThresholds.{f.name}={v!r}: must be an integer")
        for name in ("spike_factor", "loss_spike_factor", "recovery_factor", "lr_rise_factor", "layer_factor",
                     "noise_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"DiagnosisThresholds.{name}={getattr(self, name)!r}: a factor must be > 1")
        for name in ("nonfinite_amp_share", "clip_share", "conflict_share", "collapse_frac"):
            if getattr(self, name) >= 1:
                raise ValueError(f"DiagnosisThresholds.{name}={getattr(self, name)!r}: a share must be in (0, 1)")
        if self.update_ratio_low >= self.update_ratio_high:
            raise ValueError(f"DiagnosisThresholds.update_ratio_low={self.update_ratio_low!r} must be below "
                             f"update_ratio_high={self.update_ratio_high!r}")
        if self.eos_rising_ratio > self.eos_ratio:
            raise ValueError(f"DiagnosisThresholds.eos_rising_ratio={self.eos_rising_ratio!r} must not exceed "
                             f"eos_ratio={self.eos_ratio!r}")
        if self.min_probes > self.probes:
            raise ValueError(f"DiagnosisThresholds.min_probes={self.min_probes!r} must not exceed "
                             f"probes={self.probes!r}")


@dataclass
class RuleContext:
    """What a rule may read besides the tables: thresholds, the manifest, and cached views of the series."""

    thresholds: DiagnosisThresholds
    manifest: dict
    series: pd.DataFrame
    alerts: pd.DataFrame
    _cache: dict = field(default_factory=dict, repr=False)

    def wide(self, metric: str) -> pd.DataFrame:
        """(steps, layers) table of one metric, index sorted by step; NaN where a layer has no row."""
        key = ("wide", metric)
        if key not in self._cache:
            sub = self.series[self.series["metric"] == metric]
            w = sub.pivot(index="step", columns="layer", values="value").sort_index() if len(sub) else \
                pd.DataFrame(index=pd.Index([], dtype="int64", name="step"))
            self._cache[key] = w
        return self._cache[key]

    def model(self, metric: str) -> pd.Series:
        """The model-wide (layer MODEL) trace of a metric by step, finite values only (maybe empty)."""
        w = self.wide(metric)
        if S.MODEL not in w.columns:
            return pd.Series([], dtype="float64", index=pd.Index([], dtype="int64", name="step"))
        return finite_only(w[S.MODEL])

    def layers(self, metric: str) -> pd.DataFrame:
        """The per-layer traces of a metric (MODEL left out unless it is the only column)."""
        w = self.wide(metric)
        cols = [c for c in w.columns if c != S.MODEL]
        return w[cols] if cols else w

    @property
    def batch_size(self) -> float | None:
        """The manifest's "batch_size" (top level, "identity" or "config"), in examples per optimizer step."""
        for block in (self.manifest, self.manifest.get("identity"), self.manifest.get("config")):
            if isinstance(block, Mapping) and block.get("batch_size") is not None:
                b = float(block["batch_size"])
                if math.isfinite(b) and b > 0:
                    return b
        return None

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


Rule = Callable[[pd.DataFrame, pd.DataFrame, RuleContext], list]
RULES: dict[str, Rule] = {}


def register(name: str) -> Callable[[Rule], Rule]:
    """Decorator adding `fn(series, alerts, ctx) -> list[dict]` to RULES under `name` (replacing one).

    Each dict holds step, optionally last_step (default step), layer (default MODEL), severity (default
    "warning"), message, evidence (a dict, written as JSON) and action."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name={name!r} must be a non-empty string")

    def deco(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return deco


# --- small helpers ------------------------------------------------------------------------------------------

def finite_only(x: pd.Series) -> pd.Series:
    """`x` as float64 with its NaN and +-inf entries dropped (the index of the others kept)."""
    x = x.astype("float64")
    return x[np.isfinite(x.to_numpy())]


def _running_median(x: pd.Series, th: DiagnosisThresholds) -> pd.Series:
    """Median of the previous `window` observations (the current excluded); NaN before `min_history`."""
    return x.shift(1).rolling(th.window, min_periods=th.min_history).median()


def _robust_z(prev: np.ndarray, v: float) -> float:
    """(v - median) / (1.4826 MAD) of `prev`; +inf above a flat history (MAD 0), 0 on or below it."""
    c = float(np.median(prev))
    sigma = _MAD_SIGMA * float(np.median(np.abs(prev - c)))
    if sigma > 0:
        return (v - c) / sigma
    return math.inf if v > c else 0.0


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _json(evidence: Any) -> str:
    return evidence if isinstance(evidence, str) else json.dumps(_plain(evidence or {}), sort_keys=True)


# --- shared detectors ---------------------------------------------------------------------------------------

def grad_spikes(ctx: RuleContext) -> pd.DataFrame:
    """Every (step, layer) whose grad_norm is a spike, one row each.

    A spike: grad_norm >= spike_factor x the median of the layer's previous `window` finite positive
    observations (at least `min_history` of them) and a robust z-score of log grad_norm >= spike_z against
    the same window. Layers with no grad_norm series but an online spike alert (spam, norm_z, max_abs) count
    too, with NaN ratio (the detector's own threshold decided). Columns: step, layer, value, median, ratio, z,
    source ("series" or the alert rule).
    """
    def compute() -> pd.DataFrame:
        th = ctx.thresholds
        wide = ctx.wide(S.GRAD_NORM)
        rows = []
        for layer in wide.columns:
            x = wide[layer]
            x = x[np.isfinite(x.to_numpy()) & (x.to_numpy() > 0)].astype("float64")
            if len(x) <= th.min_history:
                continue
            ratio = (x / _running_median(x, th)).to_numpy()
            logs = np.log(x.to_numpy())
            steps = x.index.to_numpy()
            for i in np.flatnonzero(ratio >= th.spike_factor):
                z = _robust_z(logs[max(0, i - th.window):i], logs[i])
                if z >= th.spike_z:
                    rows.append({"step": int(steps[i]), "layer": layer, "value": float(x.iloc[i]),
                                 "median": float(x.iloc[i] / ratio[i]), "ratio": float(ratio[i]), "z": z,
                                 "source": "series"})
        a = ctx.alerts
        a = a[a["rule"].isin([S.RULE_SPAM, S.RULE_NORM_Z, S.RULE_MAXABS]) & ~a["layer"].isin(list(wide.columns))]
        for r in a.itertuples(index=False):
            rows.append({"step": int(r.step), "layer": r.layer, "value": float(r.value), "median": math.nan,
                         "ratio": math.nan, "z": math.nan, "source": r.rule})
        cols = ["step", "layer", "value", "median", "ratio", "z", "source"]
        df = pd.DataFrame(rows, columns=cols)
        return df.drop_duplicates(["step", "layer"], keep="first").sort_values(["step", "layer"],
                                                                              ignore_index=True)

    return ctx.cached("grad_spikes", compute)


def loss_spikes(ctx: RuleContext) -> list[dict]:
    """Loss spike events: runs of consecutive loss observations that are spikes, one dict per run.

    A spike: loss >= loss_spike_factor x the median of the previous `window` observations (positive, at least
    `min_history`) and robust z >= loss_spike_z. Each event: step (first), last_step, peak_step, value (peak),
    median (before the event), ratio (peak / median), z (peak), recovered_after (steps from last_step until the
    loss is back below recovery_factor x median; None if it never is).
    """
    def compute() -> list[dict]:
        th = ctx.thresholds
        loss = ctx.model(S.LOSS)
        if len(loss) <= th.min_history:
            return []
        med = _running_median(loss, th).to_numpy()
        vals, steps = loss.to_numpy(), loss.index.to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(med > 0, vals / med, np.nan)
        hits = [i for i in np.flatnonzero(ratio >= th.loss_spike_factor)
                if _robust_z(vals[max(0, i - th.window):i], vals[i]) >= th.loss_spike_z]
        events: list[list[int]] = []
        for i in hits:
            if events and i == events[-1][-1] + 1:
                events[-1].append(i)
            else:
                events.append([i])
        out = []
        for ev in events:
            i0, i1 = ev[0], ev[-1]
            base = float(med[i0])
            peak = max(ev, key=lambda i: vals[i])
            after = np.flatnonzero(vals[i1 + 1:] <= th.recovery_factor * base)
            out.append({"step": int(steps[i0]), "last_step": int(steps[i1]), "peak_step": int(steps[peak]),
                        "value": float(vals[peak]), "median": base, "ratio": float(vals[peak] / base),
                        "z": _robust_z(vals[max(0, i0 - th.window):i0], vals[peak]),
                        "recovered_after": int(steps[i1 + 1 + after[0]] - steps[i1]) if len(after) else None})
        return out

    return ctx.cached("loss_spikes", compute)


# --- entry point --------------------------------------------------------------------------------------------

def _clean_series(series: pd.DataFrame | None) -> pd.DataFrame:
    if series is None:
        series = pd.DataFrame(columns=S.SCALAR_COLUMNS)
    missing = [c for c in S.SCALAR_COLUMNS if c not in series.columns]
    if missing:
        raise ValueError(f"series: missing columns {missing} (expected {S.SCALAR_COLUMNS})")
    s = series[S.SCALAR_COLUMNS].copy()
    s["step"] = s["step"].astype("int64")
    s["layer"] = s["layer"].astype(str)
    s["metric"] = s["metric"].astype(str)
    s["value"] = s["value"].astype("float64")
    # several writes of one (step, layer, metric): the last wins (a resumed run rewrites its steps)
    return s.drop_duplicates(["step", "layer", "metric"], keep="last").reset_index(drop=True)


def _clean_alerts(alerts: pd.DataFrame | None) -> pd.DataFrame:
    if alerts is None:
        alerts = pd.DataFrame(columns=S.ALERT_COLUMNS)
    missing = [c for c in ("step", "layer", "rule", "value") if c not in alerts.columns]
    if missing:
        raise ValueError(f"alerts: missing columns {missing} (expected {S.ALERT_COLUMNS})")
    a = alerts.copy()
    a["step"] = a["step"].astype("int64")
    a["layer"] = a["layer"].astype(str)
    a["rule"] = a["rule"].astype(str)
    a["value"] = a["value"].astype("float64")
    return a.reset_index(drop=True)


def _select(rules: Mapping[str, Rule] | Iterable[str] | str | None) -> dict[str, Rule]:
    if rules is None:
        return dict(RULES)
    if isinstance(rules, Mapping):
        bad = [k for k, f in rules.items() if not callable(f)]
        if bad:
            raise ValueError(f"rules: {bad} map to non-callables")
        return dict(rules)
    names = [rules] if isinstance(rules, str) else list(rules)
    unknown = [n for n in names if n not in RULES]
    if unknown:
        raise ValueError(f"rules: unknown rule(s) {unknown}; known: {sorted(RULES)}")
    return {n: RULES[n] for n in names}


def _row(name: str, r: Mapping) -> dict:
    severity = r.get("severity", "warning")
    if severity not in SEVERITIES:
        raise ValueError(f"rule {name!r}: severity={severity!r} must be one of {SEVERITIES}")
    step = int(r["step"])
    return {"rule": str(r.get("rule", name)), "step": step, "last_step": int(r.get("last_step", step)),
            "layer": str(r.get("layer", S.MODEL)), "severity": severity, "message": str(r["message"]),
            "evidence": _json(r.get("evidence")), "action": str(r.get("action", ""))}


def diagnose(series: pd.DataFrame | None, alerts: pd.DataFrame | None = None, manifest: Mapping | None = None,
             *, rules: Mapping[str, Rule] | Iterable[str] | str | None = None,
             thresholds: DiagnosisThresholds | None = None) -> pd.DataFrame:
    """Run the diagnosis rules over a monitor run's series and alerts.

    Args:
        series: SCALARS/SERIES table (step, layer, metric, value). Repeated (step, layer, metric) rows are
            allowed: the last one wins, as in `summarize` (a resumed run rewrites its steps).
        alerts: ALERTS table of the online detectors (None: no alerts).
        manifest: the run's manifest (None: {}). Read: "batch_size" (top level, "identity" or "config"),
            in examples per optimizer step, for the noise-scale rule.
        rules: None (every rule of RULES), names of RULES to run, or a {name: rule} mapping.
        thresholds: the rules' knobs (default `DiagnosisThresholds()`).

    Returns:
        DIAGNOSES table (DIAGNOSIS_COLUMNS), one row per finding, sorted by step (then rule name); evidence is
        a JSON string (non-finite numbers as null).
    """
    th = thresholds if thresholds is not None else DiagnosisThresholds()
    if not isinstance(th, DiagnosisThresholds):
        raise ValueError(f"thresholds={thresholds!r}: expected a DiagnosisThresholds")
    selected = _select(rules)
    s, a = _clean_series(series), _clean_alerts(alerts)
    ctx = RuleContext(th, dict(manifest or {}), s, a)
    rows = [_row(name, r) for name, fn in selected.items() for r in fn(s, a, ctx)]
    df = pd.DataFrame(rows, columns=S.DIAGNOSIS_COLUMNS)
    df = df.astype({"step": "int64", "last_step": "int64"})
    for c in ("rule", "layer", "severity", "message", "evidence", "action"):
        df[c] = df[c].astype(object)
    return df.sort_values(["step", "rule"], kind="stable", ignore_index=True)


Thresholds = DiagnosisThresholds  # the former name, kept importable from here (the monitor has its own Thresholds)

# The built-in rules register themselves on import; imported last because they use the names above.
from . import rules as _rules  # noqa: E402,F401
