"""Diagnoses of a training-monitor run: what went wrong, when, in which layer, with the numbers, and what to do.

`diagnose(series, alerts, manifest)` runs a registry of rules (`RULES`) over the tidy SERIES table (one row per
(step, layer, metric)) and the ALERTS of the online detectors, and returns one DIAGNOSES row per finding:
the step range, the layer, a sentence with the numbers, the numbers again as JSON (`evidence`), and an action
that names a gradsight transform where one applies (the diagnose-then-act link of the monitor spec).

Why rules and not thresholds on raw values: a training trace is noisy, drifts (the loss falls, the lr warms
up and decays) and differs by orders of magnitude between layers. So every rule compares a value with a
*robust* reference of the same trace (the median of the previous `window` observations, the median absolute
deviation for the spread), needs a minimum history before it may fire, and asks for both a large ratio and a
large robust z-score, so a short or flat trace never fires. All knobs live in one dataclass, `Thresholds`.

The rules (registry name: what fires it, defaults in `Thresholds`):

    grad_spike         a layer's grad_norm >= 10x the median of its previous 100 steps (and robust z of log
                       norm >= 5); layers of the same step are grouped; the loss response is reported
    loss_spike         loss >= 1.5x its running median (robust z >= 6); cause "gradient" (a gradient spike in
                       the 3 steps before), "lr" (lr rose, or the loss stayed up) or "data" (it recovered)
    nonfinite          NaN/inf gradients or skipped steps: count, first step, layers, loss scale
    clipping           clip_coef < 1 on > 50% of the last 200 steps
    update_ratio       median ||dtheta||/||theta|| of a layer over the last 200 steps > 1e-2 or < 1e-5
    layer_scale        a layer's median grad_norm >= 100x or <= 1/100 of the median layer's (last 200 steps)
    conflict           "cos:a|b" < 0 on > 30% of its measured steps (at least 10)
    edge_of_stability  sharpness / threshold >= 1 (median of the last 5 probes), or >= 0.9 and rising
    softmax_collapse   softmax_collapse_fp32 or zero_loss_frac > 0.1 at the last probes and above the first
    noise_scale        B_simple >= 10x or <= 1/10 the manifest's "batch_size"

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

__all__ = ["Thresholds", "RuleContext", "Rule", "RULES", "register", "diagnose", "grad_spikes", "loss_spikes",
           "SEVERITIES"]

SEVERITIES = ("info", "warning", "error")
_MAD_SIGMA = 1.4826  # MAD -> standard deviation for a normal distribution
_CLIPPED = 1.0 - 1e-6  # clip_coef below this counts as clipped (torch divides by total + 1e-6)


@dataclass(frozen=True)
class Thresholds:
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
                raise ValueError(f"Thresholds.{f.name}={v!r}: must be a positive finite number")
            if f.type == "int" and int(v) != v:
                raise ValueError(f"Thresholds.{f.name}={v!r}: must be an integer")
        for name in ("spike_factor", "loss_spike_factor", "recovery_factor", "lr_rise_factor", "layer_factor",
                     "noise_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"Thresholds.{name}={getattr(self, name)!r}: a factor must be > 1")
        for name in ("nonfinite_amp_share", "clip_share", "conflict_share", "collapse_frac"):
            if getattr(self, name) >= 1:
                raise ValueError(f"Thresholds.{name}={getattr(self, name)!r}: a share must be in (0, 1)")
        if self.update_ratio_low >= self.update_ratio_high:
            raise ValueError(f"Thresholds.update_ratio_low={self.update_ratio_low!r} must be below "
                             f"update_ratio_high={self.update_ratio_high!r}")
        if self.eos_rising_ratio > self.eos_ratio:
            raise ValueError(f"Thresholds.eos_rising_ratio={self.eos_rising_ratio!r} must not exceed "
                             f"eos_ratio={self.eos_ratio!r}")
        if self.min_probes > self.probes:
            raise ValueError(f"Thresholds.min_probes={self.min_probes!r} must not exceed probes={self.probes!r}")


@dataclass
class RuleContext:
    """What a rule may read besides the tables: thresholds, the manifest, and cached views of the series."""

    thresholds: Thresholds
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
        return _finite(w[S.MODEL])

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

def _finite(x: pd.Series) -> pd.Series:
    x = x.astype("float64")
    return x[np.isfinite(x.to_numpy())]


def _num(x: float) -> str:
    """3 significant digits, without an exponent between 1e-4 and 1e6 (3200, not 3.2e+03)."""
    return "nan" if x is None or not math.isfinite(x) else f"{float(f'{x:.3g}'):g}"


def _times(r: float) -> str:
    return f"{_num(r)}×"


def _pct(share: float) -> str:
    return f"{_num(100 * share)}%"


def _who(layer: str) -> str:
    return "the model" if layer == S.MODEL else layer


def _names(layers: list[str], k: int = 3) -> str:
    shown = ", ".join(_who(x) for x in layers[:k])
    return shown + (f" (+{len(layers) - k} more)" if len(layers) > k else "")


def _running_median(x: pd.Series, th: Thresholds) -> pd.Series:
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


def _median_before(x: pd.Series, step: int, th: Thresholds) -> float | None:
    """Median of the last `window` observations of x strictly before `step` (None under min_history)."""
    prev = x[x.index < step].tail(th.window)
    return float(prev.median()) if len(prev) >= th.min_history else None


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


def _loss_response(ctx: RuleContext, step: int) -> dict:
    """The loss around a gradient spike at `step`: same-step ratio and the largest ratio in the next steps."""
    th = ctx.thresholds
    loss = ctx.model(S.LOSS)
    base = _median_before(loss, step, th) if len(loss) else None
    if base is None or base <= 0:
        return {}
    out: dict[str, Any] = {"loss_median": base}
    if step in loss.index:
        out["loss_ratio_same_step"] = float(loss[step] / base)
    nxt = loss[(loss.index > step) & (loss.index <= step + th.response_steps)]
    if len(nxt):
        out["loss_response_ratio"] = float(nxt.max() / base)
        out["loss_response_step"] = int(nxt.idxmax())
    return out


# --- the rules ----------------------------------------------------------------------------------------------

@register("grad_spike")
def _rule_grad_spike(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """1. Gradient spikes, one diagnosis per step naming the worst layer, with the loss response."""
    th = ctx.thresholds
    spikes = grad_spikes(ctx)
    if spikes.empty:
        return []
    n_layers = max(1, len([c for c in ctx.wide(S.GRAD_NORM).columns if c != S.MODEL]))
    spam = ctx.wide(S.SPAM_FRAC)
    fired = {}
    for r in alerts[alerts["rule"].isin([S.RULE_SPAM, S.RULE_NORM_Z, S.RULE_MAXABS])].itertuples(index=False):
        fired.setdefault((int(r.step), r.layer), {})[r.rule] = float(r.value)
    out = []
    for step, g in spikes.groupby("step", sort=True):
        step = int(step)
        per_layer = g[g["layer"] != S.MODEL]
        global_ratio = g.loc[g["layer"] == S.MODEL, "ratio"]
        g = per_layer if len(per_layer) else g
        g = g.sort_values("ratio", ascending=False, na_position="last", kind="stable")
        w = g.iloc[0]
        worst, n = str(w["layer"]), len(g)
        ev: dict[str, Any] = {"layer": worst, "value": w["value"], "median": w["median"], "ratio": w["ratio"],
                              "z": w["z"], "n_layers": n,
                              "layers": {str(r.layer): r.ratio for r in g.head(10).itertuples(index=False)}}
        if len(global_ratio):
            ev["global_ratio"] = float(global_ratio.iloc[0])
        frac = None
        if worst in spam.columns and step in spam.index and math.isfinite(spam.at[step, worst]):
            frac = float(spam.at[step, worst])
        elif S.RULE_SPAM in fired.get((step, worst), {}):
            frac = fired[(step, worst)][S.RULE_SPAM]
        if frac is not None:
            ev["spam_frac"] = frac
        if fired.get((step, worst)):
            ev["alerts"] = fired[(step, worst)]
        if w["source"] == "series":
            msg = (f"step {step}: gradient of {_who(worst)} {_times(w['ratio'])} its running median "
                   f"({_num(w['value'])} vs {_num(w['median'])})")
        else:
            msg = f"step {step}: the online {w['source']} detector flagged the gradient of {_who(worst)}"
        if n > 1:
            msg += f", {n} layers spiked together"
        if frac is not None:
            msg += f" (SPAM rule fired on {_pct(frac)} of entries)"
        resp = _loss_response(ctx, step)
        ev.update(resp)
        responded = resp.get("loss_response_ratio", 0.0) >= th.loss_spike_factor
        if "loss_response_ratio" in resp:
            if responded:
                msg += f"; the loss jumped {_times(resp['loss_response_ratio'])} at step {resp['loss_response_step']}"
            else:
                msg += (f"; the loss did not jump (at most {_times(resp['loss_response_ratio'])} its median "
                        f"in the next {th.response_steps} steps)")
        if n >= max(2, n_layers / 2):
            action = ("most layers spiked together: bound the global norm with gradsight.transforms."
                      "clip_by_global_norm(), or gradsight.transforms.spam() to clip entries against Adam's v")
        else:
            action = (f"clip the spike where it happens: gradsight.transforms.spam() (element-wise, against "
                      f"Adam's v) or clip_per_layer() on {_names(list(g['layer']))}; adaptive_grad_clip() "
                      "bounds it relative to the weights")
        out.append({"step": step, "layer": worst, "severity": "warning" if responded else "info",
                    "message": msg, "evidence": ev, "action": action})
    return out


@register("loss_spike")
def _rule_loss_spike(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """2. Loss spikes, with their cause: a gradient spike just before, a rising lr or lasting rise, or data."""
    th = ctx.thresholds
    spikes = grad_spikes(ctx)
    per_step = {}
    for step, g in spikes.groupby("step"):
        g = g[g["layer"] != S.MODEL] if (g["layer"] != S.MODEL).any() else g
        w = g.sort_values("ratio", ascending=False, na_position="last").iloc[0]
        per_step[int(step)] = (str(w["layer"]), float(w["ratio"]))
    lr = ctx.model(S.LR)
    out = []
    for e in loss_spikes(ctx):
        t0 = e["step"]
        ev = dict(e)
        head = (f"step {t0}: the loss rose {_times(e['ratio'])} its running median ({_num(e['value'])} vs "
                f"{_num(e['median'])})" + (f" up to step {e['last_step']}" if e["last_step"] != t0 else ""))
        prior = [s for s in per_step if t0 - th.response_steps <= s < t0]
        lr_ratio = None
        if len(lr):
            before = lr[lr.index < t0 - th.response_steps].tail(th.window)
            now = lr[(lr.index >= t0 - th.response_steps) & (lr.index <= t0)]
            if len(before) and len(now) and before.median() > 0:
                lr_ratio = float(now.max() / before.median())
                ev["lr_ratio"] = lr_ratio
        rec = e["recovered_after"]
        if prior:
            s = max(prior)
            layer, r = per_step[s]
            ev.update(cause="gradient", grad_spike_step=s, grad_spike_layer=layer, grad_spike_ratio=r)
            msg = (f"{head}, {t0 - s} step(s) after a gradient spike at step {s} ({_who(layer)} "
                   f"{_times(r)} its median): the spiked update caused it")
            action = ("clip the gradient spikes: gradsight.transforms.spam(), clip_by_global_norm() or "
                      f"clip_per_layer() on {_who(layer)}; lower lr if spikes recur")
        elif lr_ratio is not None and lr_ratio >= th.lr_rise_factor:
            ev["cause"] = "lr"
            msg = (f"{head} without a gradient spike before it, while the lr rose {_times(lr_ratio)} its "
                   "running median: the lr is past what the run tolerates")
            action = "lower the peak lr or lengthen the warm-up"
        elif rec is not None and rec <= th.recovery_steps:
            ev["cause"] = "data"
            msg = (f"{head} without a gradient spike before it and recovered within {rec} step(s): an outlier "
                   "batch")
            action = (f"inspect the batch of step {e['peak_step']} (per-example losses); skip or down-weight "
                      "such batches, or cap per-example gradients")
        else:
            ev["cause"] = "lr"
            stay = "never came back" if rec is None else f"took {rec} steps to come back"
            msg = (f"{head} without a gradient spike before it and {stay} below {_times(th.recovery_factor)} its "
                   "prior median: the run destabilised at this lr")
            action = "lower lr (or lengthen the warm-up) and resume from a checkpoint before the spike"
        if t0 in per_step:
            ev["same_step_grad_ratio"] = per_step[t0][1]
            msg += f" (the gradient of the same step was {_times(per_step[t0][1])} its median: same batch)"
        out.append({"step": t0, "last_step": e["last_step"], "layer": S.MODEL, "severity": "warning",
                    "message": msg, "evidence": ev, "action": action})
    return out


@register("nonfinite")
def _rule_nonfinite(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """3. Non-finite gradients or skipped steps: how many, from when, in which layers."""
    th = ctx.thresholds
    m, v = series["metric"], series["value"].to_numpy()
    bad = series[((m == S.NONFINITE) & (v > 0)) | ((m == S.GRAD_NORM) & ~np.isfinite(v))]
    skipped = set(series.loc[(m == S.SKIPPED) & (v > 0), "step"].astype(int))
    na = alerts[alerts["rule"] == S.RULE_NONFINITE]
    steps = sorted(set(bad["step"].astype(int)) | skipped | set(na["step"].astype(int)))
    if not steps:
        return []
    hits = pd.concat([bad[["step", "layer"]], na[["step", "layer"]]])
    hits = hits[hits["layer"] != S.MODEL].sort_values(["step", "layer"], kind="stable")
    layers = list(dict.fromkeys(hits["layer"]))
    n_all = max(int(series["step"].nunique()), len(steps))
    share = len(steps) / n_all
    scale = ctx.model(S.LOSS_SCALE)
    has_skip = bool((m == S.SKIPPED).any())
    ev: dict[str, Any] = {"steps": len(steps), "of_steps": n_all, "share": share, "first_step": steps[0],
                          "last_step": steps[-1], "skipped": len(skipped), "layers": layers[:20],
                          "n_layers": len(layers)}
    msg = (f"non-finite gradients on {len(steps)} of {n_all} steps ({_pct(share)}), first at step {steps[0]}"
           + (f", last at step {steps[-1]}" if len(steps) > 1 else "") + f"; {len(skipped)} step(s) skipped")
    if layers:
        msg += f"; layers: {_names(layers)}"
    if len(scale):
        ev.update(loss_scale_min=float(scale.min()), loss_scale_last=float(scale.iloc[-1]))
        msg += f"; loss scale min {scale.min():.6g}, last {scale.iloc[-1]:.6g}"  # powers of 2: keep exact
    all_skipped = has_skip and set(steps) <= skipped
    if len(scale) and all_skipped and share <= th.nonfinite_amp_share:
        severity = "info"
        msg += " (fp16 GradScaler calibrating its scale; these steps were skipped)"
    elif has_skip and not all_skipped:
        severity = "error"
        msg += f" ({len(set(steps) - skipped)} of them were NOT skipped: the optimizer applied them)"
    else:
        severity = "error" if share > th.nonfinite_amp_share else "warning"
    action = ("wrap the update with gradsight.transforms.apply_if_finite() so non-finite steps are skipped; "
              + ("check the loss scale (GradScaler init_scale, growth_interval) and " if len(scale) else
                 "under fp16 AMP check the loss scale; ")
              + (f"look at the first layer hit ({_who(layers[0])}): run it in fp32 or lower lr"
                 if layers else "look for an overflowing activation, or lower lr"))
    return [{"step": steps[0], "last_step": steps[-1], "layer": layers[0] if layers else S.MODEL,
             "severity": severity, "message": msg, "evidence": ev, "action": action}]


@register("clipping")
def _rule_clipping(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """4. Clipping on most recent steps: the threshold is too low for this run, or lr too high."""
    th = ctx.thresholds
    coef = ctx.model(S.CLIP_COEF).tail(th.recent)
    if len(coef) < th.min_history:
        return []
    clipped = coef < _CLIPPED
    share = float(clipped.mean())
    if share <= th.clip_share:
        return []
    med = float(coef.median())
    ev: dict[str, Any] = {"share": share, "n_steps": len(coef), "median_coef": med,
                          "median_coef_clipped": float(coef[clipped].median())}
    msg = (f"gradient clipping on {_pct(share)} of the last {len(coef)} steps ({coef.index[0]}–{coef.index[-1]}), "
           f"median clip coefficient {_num(med)}")
    norm = ctx.model(S.GRAD_NORM)
    norm = norm[norm.index.isin(coef.index)]
    if len(norm):
        both = pd.concat([norm, coef], axis=1, join="inner").to_numpy()
        limit = float(np.median(both[both[:, 1] < _CLIPPED, 0] * both[both[:, 1] < _CLIPPED, 1])) \
            if (both[:, 1] < _CLIPPED).any() else math.nan
        ev.update(median_grad_norm=float(norm.median()), clip_threshold=limit)
        msg += f" (pre-clip global norm median {_num(norm.median())}, threshold ≈ {_num(limit)})"
    action = ("the clip threshold is too low for this run or lr is too high (clipping every step turns the "
              "optimizer into normalised SGD): raise max_norm of gradsight.transforms.clip_by_global_norm() "
              "toward the median norm, or lower lr")
    return [{"step": int(coef.index[0]), "last_step": int(coef.index[-1]), "layer": S.MODEL,
             "severity": "warning", "message": msg, "evidence": ev, "action": action}]


def _moving_steps(ctx: RuleContext) -> pd.Index | None:
    """Steps to leave out of update-based rules: skipped steps and steps at lr <= 0 (None: none known)."""
    skipped = ctx.model(S.SKIPPED)
    lr = ctx.model(S.LR)
    out = set(skipped.index[skipped > 0]) | set(lr.index[lr <= 0])
    return pd.Index(sorted(out)) if out else None


def _recent_medians(wide: pd.DataFrame, th: Thresholds, drop: pd.Index | None = None) -> tuple[pd.Series, int]:
    """Per column: median of the last `recent` finite observations (columns under min_history left out), and
    the largest number of observations used."""
    med, n = {}, 0
    for c in wide.columns:
        x = _finite(wide[c])
        if drop is not None:
            x = x[~x.index.isin(drop)]
        x = x.tail(th.recent)
        if len(x) >= th.min_history:
            med[c] = float(x.median())
            n = max(n, len(x))
    return pd.Series(med, dtype="float64"), n


@register("update_ratio")
def _rule_update_ratio(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """5. ||dtheta||/||theta|| per layer out of [update_ratio_low, update_ratio_high] (rule of thumb ~1e-3)."""
    th = ctx.thresholds
    wide = ctx.layers(S.UPDATE_RATIO)
    med, n_obs = _recent_medians(wide, th, _moving_steps(ctx))
    if med.empty:
        return []
    last = int(wide.index[-1])
    first = int(wide.index[max(0, len(wide) - th.recent)])
    out = []
    high = med[med > th.update_ratio_high].sort_values(ascending=False)
    if len(high):
        worst = str(high.index[0])
        out.append({"step": first, "last_step": last, "layer": worst, "severity": "warning",
                    "message": (f"update/parameter ratio too large on {len(high)} layer(s): median "
                                f"‖Δθ‖/‖θ‖ {_num(high.iloc[0])} on {_who(worst)} over the last {n_obs} steps "
                                f"(above {_num(th.update_ratio_high)}; rule of thumb ~1e-3): "
                                f"{_names(list(high.index))}"),
                    "evidence": {"kind": "too_large", "layers": high.head(20).to_dict(),
                                 "threshold": th.update_ratio_high},
                    "action": (f"lower lr (the worst layer moves {_times(high.iloc[0] / 1e-3)} the usual 1e-3 "
                               "per step) or bound these layers with gradsight.transforms.clip_per_layer() / "
                               "adaptive_grad_clip()")})
    low = med[med < th.update_ratio_low].sort_values()
    if len(low):
        worst = str(low.index[0])
        out.append({"step": first, "last_step": last, "layer": worst, "severity": "warning",
                    "message": (f"update/parameter ratio too small on {len(low)} layer(s): median ‖Δθ‖/‖θ‖ "
                                f"{_num(low.iloc[0])} on {_who(worst)} over the last {n_obs} steps (below "
                                f"{_num(th.update_ratio_low)}; rule of thumb ~1e-3): the layers barely move: "
                                f"{_names(list(low.index))}"),
                    "evidence": {"kind": "too_small", "layers": low.head(20).to_dict(),
                                 "threshold": th.update_ratio_low},
                    "action": ("check that these layers are in an optimizer group with a non-zero lr (frozen? "
                               "weight decay dominating?); if they should train, raise their lr")})
    return out


@register("layer_scale")
def _rule_layer_scale(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """6. Exploding / vanishing layers: median grad_norm far from the median layer's over the recent window."""
    th = ctx.thresholds
    wide = ctx.layers(S.GRAD_NORM)
    wide = wide[[c for c in wide.columns if c != S.MODEL]]
    med, n_obs = _recent_medians(wide, th)
    if len(med) < th.min_layers:
        return []
    ref = float(med.median())
    if not ref > 0:
        return []
    ratio = med / ref
    last = int(wide.index[-1])
    first = int(wide.index[max(0, len(wide) - th.recent)])
    out = []
    hi = ratio[ratio >= th.layer_factor].sort_values(ascending=False)
    if len(hi):
        worst = str(hi.index[0])
        out.append({"step": first, "last_step": last, "layer": worst, "severity": "warning",
                    "message": (f"exploding gradient: {_who(worst)} has a median grad_norm {_num(med[worst])}, "
                                f"{_times(hi.iloc[0])} the median layer's ({_num(ref)}) over the last "
                                f"{n_obs} steps; {len(hi)} layer(s) above {_times(th.layer_factor)}: "
                                f"{_names(list(hi.index))}"),
                    "evidence": {"kind": "exploding", "median_layer_norm": ref, "ratios": hi.head(20).to_dict()},
                    "action": ("give the layer its own budget with gradsight.transforms.clip_per_layer() or "
                               "adaptive_grad_clip() (relative to its weights); check its initialisation and "
                               "normalisation")})
    lo = ratio[ratio <= 1 / th.layer_factor].sort_values()
    if len(lo):
        worst = str(lo.index[0])
        r = float(lo.iloc[0])
        rel = "exactly zero gradient (an unused parameter)" if r == 0 else f"1/{_num(1 / r)} of the median layer's"
        out.append({"step": first, "last_step": last, "layer": worst, "severity": "warning",
                    "message": (f"vanishing gradient: {_who(worst)} has a median grad_norm {_num(med[worst])}, "
                                f"{rel} ({_num(ref)}) over the last {n_obs} steps; {len(lo)} layer(s) below "
                                f"1/{_num(th.layer_factor)}: {_names(list(lo.index))}"),
                    "evidence": {"kind": "vanishing", "median_layer_norm": ref, "ratios": lo.head(20).to_dict()},
                    "action": ("check the layer receives gradient (detached path, dead activations, a gated "
                               "residual); a per-layer lr or layer-wise normalisation (LAMB-style trust ratio) "
                               "can compensate")})
    return out


@register("conflict")
def _rule_conflict(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """7. Conflicting loss terms: "cos:a|b" negative on more than conflict_share of its measured steps."""
    th = ctx.thresholds
    cos = series[series["metric"].str.startswith(S.COS_PREFIX)]
    cos = cos[np.isfinite(cos["value"].to_numpy())]
    out = []
    for metric, g in cos.groupby("metric", sort=True):
        stats = []
        for layer, h in g.groupby("layer", sort=True):
            if len(h) >= th.min_measured:
                share = float((h["value"] < 0).mean())
                stats.append((layer, share, len(h), float(h["value"].median()), int(h["step"].min()),
                              int(h["step"].max())))
        hit = [s for s in stats if s[1] > th.conflict_share]
        if not hit:
            continue
        hit.sort(key=lambda s: (s[0] != S.MODEL, -s[1]))
        layer, share, n, mcos, first, last = hit[0]
        pair = metric[len(S.COS_PREFIX):]
        a, _, b = pair.partition("|")
        names = f"'{a}' and '{b}'" if b else f"'{pair}'"
        msg = (f"terms {names} conflict on {_who(layer)}: cos < 0 on {_pct(share)} of {n} measured steps "
               f"({first}–{last}), median cos {_num(mcos)}")
        others = [s[0] for s in hit if s[0] != layer]
        if others:
            msg += f"; also on {len(others)} other layer(s): {_names(others)}"
        terms = f"[loss_{a}, loss_{b}]" if b else "the terms' losses"
        out.append({"step": first, "last_step": last, "layer": layer, "severity": "warning", "message": msg,
                    "evidence": {"metric": metric, "share": share, "n_measured": n, "median_cos": mcos,
                                 "layers": {s[0]: s[1] for s in hit[:20]}},
                    "action": (f"aggregate the terms instead of summing them: gradsight.aggregate_backward({terms}, "
                               "shared_params, aggregator=pcgrad or upgrad) on the conflicting block "
                               f"({_names([s[0] for s in hit])})")})
    return out


def _rising(x: np.ndarray) -> bool:
    """Least-squares slope > 0 and last > first."""
    if len(x) < 2:
        return False
    slope = np.polyfit(np.arange(len(x), dtype="float64"), x, 1)[0]
    return bool(slope > 0 and x[-1] > x[0])


@register("edge_of_stability")
def _rule_eos(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """8. Sharpness at its stability threshold (2/lr for GD; Adam's preconditioned one): lr at the limit."""
    th = ctx.thresholds
    both = pd.concat([ctx.model(S.SHARPNESS).rename("s"), ctx.model(S.SHARPNESS_THRESHOLD).rename("t")],
                     axis=1, join="inner")
    both = both[both["t"] > 0]
    recent = both.tail(th.probes)
    if len(recent) < th.min_probes:
        return []
    ratio = (recent["s"] / recent["t"]).to_numpy()
    med = float(np.median(ratio))
    rising = _rising(ratio)
    if not (med >= th.eos_ratio or (med >= th.eos_rising_ratio and rising)):
        return []
    ev = {"ratio": med, "ratios": ratio, "sharpness": float(recent["s"].median()),
          "threshold": float(recent["t"].median()), "rising": rising, "probes": len(recent),
          "alerts": int((alerts["rule"] == S.RULE_SHARPNESS).sum())}
    msg = (f"sharpness at {_times(med)} its stability threshold over the last {len(recent)} probes (steps "
           f"{recent.index[0]}–{recent.index[-1]}): λ_max {_num(ev['sharpness'])} vs {_num(ev['threshold'])}"
           + (", rising" if rising else ""))
    return [{"step": int(recent.index[0]), "last_step": int(recent.index[-1]), "layer": S.MODEL,
             "severity": "warning" if med >= th.eos_ratio else "info", "message": msg, "evidence": ev,
             "action": (f"lr is at the stability limit (edge of stability): lower lr by at least "
                        f"{_times(med / th.eos_rising_ratio)} or lengthen the warm-up")}]


@register("softmax_collapse")
def _rule_softmax_collapse(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """9. Softmax collapse (SC fp32) or zero-loss share above collapse_frac and rising."""
    th = ctx.thresholds
    found = {}
    for metric in (S.SC_FP32, S.ZERO_LOSS):
        x = ctx.model(metric)
        if len(x) < th.min_probes:
            continue
        k = min(th.probes, len(x) // 2) or 1
        now, early = float(x.tail(k).median()), float(x.head(k).median())
        found[metric] = (now, early, int(x.index[-k]), int(x.index[-1]))
    fire = {m: f for m, f in found.items() if f[0] > th.collapse_frac and f[0] > f[1]}
    if not fire:
        return []
    parts = []
    if S.SC_FP32 in found:
        now, early = found[S.SC_FP32][:2]
        parts.append(f"{_pct(now)} of rows have Σexp(z−max z) == 1 in float32 (softmax collapse; {_pct(early)} "
                     "at the first probes)")
    if S.ZERO_LOSS in found:
        now, early = found[S.ZERO_LOSS][:2]
        parts.append(f"{_pct(now)} of rows have a zero loss ({_pct(early)} at the first probes)")
    bf16 = ctx.model(S.SC_BF16)
    if len(bf16):
        parts.append(f"{_pct(float(bf16.tail(th.probes).median()))} collapse in bfloat16")
    first = min(f[2] for f in fire.values())
    last = max(f[3] for f in fire.values())
    ev = {m: {"now": f[0], "early": f[1]} for m, f in found.items()}
    return [{"step": first, "last_step": last, "layer": S.MODEL, "severity": "warning",
             "message": f"steps {first}–{last}: " + "; ".join(parts), "evidence": ev,
             "action": ("the logits grow along the weights (naive loss minimisation) and the gradient vanishes "
                        "in floating point: apply gradsight.transforms.orthograd() (⊥Grad), use a StableMax "
                        "output, or add weight decay")}]


@register("noise_scale")
def _rule_noise_scale(series: pd.DataFrame, alerts: pd.DataFrame, ctx: RuleContext) -> list[dict]:
    """10. Gradient noise scale B_simple against the batch size (McCandlish et al. 2018)."""
    th = ctx.thresholds
    batch = ctx.batch_size
    ns = ctx.model(S.NOISE_SCALE)
    ns = ns[ns > 0].tail(th.recent)  # the unbiased estimate can be <= 0 early on; it is then meaningless
    if batch is None or len(ns) < th.min_probes:
        return []
    b = float(ns.median())
    ratio = b / batch
    ev = {"noise_scale": b, "batch_size": batch, "ratio": ratio, "n": len(ns)}
    head = (f"gradient noise scale B_simple {_num(b)} is {_times(ratio)} the batch size {_num(batch)} "
            f"(median of {len(ns)} measurements, steps {ns.index[0]}–{ns.index[-1]})")
    if ratio >= th.noise_factor:
        msg = head + ": the gradient is noise-dominated, a larger batch would cut the steps needed nearly " \
                     "in proportion"
        action = (f"raise the batch size toward ~{_num(b)} (more accumulation steps), scaling lr with it")
    elif ratio <= 1 / th.noise_factor:
        msg = head + ": the batch is larger than useful, extra examples per step barely reduce the noise"
        action = (f"use a smaller batch (toward ~{_num(b)}) with more steps, or raise lr")
    else:
        return []
    return [{"step": int(ns.index[0]), "last_step": int(ns.index[-1]), "layer": S.MODEL, "severity": "info",
             "message": msg, "evidence": ev, "action": action}]


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
             thresholds: Thresholds | None = None) -> pd.DataFrame:
    """Run the diagnosis rules over a monitor run's series and alerts.

    Args:
        series: SCALARS/SERIES table (step, layer, metric, value). Repeated (step, layer, metric) rows are
            allowed: the last one wins, as in `summarize` (a resumed run rewrites its steps).
        alerts: ALERTS table of the online detectors (None: no alerts).
        manifest: the run's manifest (None: {}). Read: "batch_size" (top level, "identity" or "config"),
            in examples per optimizer step, for the noise-scale rule.
        rules: None (every rule of RULES), names of RULES to run, or a {name: rule} mapping.
        thresholds: the rules' knobs (default `Thresholds()`).

    Returns:
        DIAGNOSES table (DIAGNOSIS_COLUMNS), one row per finding, sorted by step (then rule name); evidence is
        a JSON string (non-finite numbers as null).
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise ValueError(f"thresholds={thresholds!r}: expected a Thresholds")
    selected = _select(rules)
    s, a = _clean_series(series), _clean_alerts(alerts)
    ctx = RuleContext(th, dict(manifest or {}), s, a)
    rows = [_row(name, r) for name, fn in selected.items() for r in fn(s, a, ctx)]
    df = pd.DataFrame(rows, columns=S.DIAGNOSIS_COLUMNS)
    df = df.astype({"step": "int64", "last_step": "int64"})
    for c in ("rule", "layer", "severity", "message", "evidence", "action"):
        df[c] = df[c].astype(object)
    return df.sort_values(["step", "rule"], kind="stable", ignore_index=True)
