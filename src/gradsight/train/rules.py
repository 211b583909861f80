"""The diagnosis rules of `gradsight.train.diagnose`, registered in its `RULES` when this module is imported.

Each rule is a function `(series, alerts, ctx) -> list[dict]` over the cleaned SERIES and ALERTS tables and a
`RuleContext` (thresholds, manifest, cached wide views); `diagnose` turns the dicts into DIAGNOSES rows. The
registry, the thresholds and the detectors shared by several rules (`grad_spikes`, `loss_spikes`) live in
`diagnose`, which imports this module so that `RULES` always holds every rule below.

The rules (registry name: what fires it, defaults in `DiagnosisThresholds`):

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

Every action names a transform only by its real name in `gradsight.transforms` (`__all__`), so that a
diagnosis can be acted on as written.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from . import schema as S
from .diagnose import DiagnosisThresholds, RuleContext, finite_only, grad_spikes, loss_spikes, register

__all__: list[str] = []  # the rules are reached through `diagnose.RULES`, not by name

_CLIPPED = 1.0 - 1e-6  # clip_coef below this counts as clipped (torch divides by total + 1e-6)


# --- formatting and small helpers ---------------------------------------------------------------------------

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


def _median_before(x: pd.Series, step: int, th: DiagnosisThresholds) -> float | None:
    """Median of the last `window` observations of x strictly before `step` (None under min_history)."""
    prev = x[x.index < step].tail(th.window)
    return float(prev.median()) if len(prev) >= th.min_history else None


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
            action = ("most layers spiked together: bound the global norm with "
                      "gradsight.transforms.clip_by_global_norm(), or gradsight.transforms.spam() to clip "
                      "entries against Adam's v")
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
    action = ("wrap the update with gradsight.transforms.apply_if_finite(tx) so non-finite steps are skipped; "
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


def _recent_medians(wide: pd.DataFrame, th: DiagnosisThresholds,
                    drop: pd.Index | None = None) -> tuple[pd.Series, int]:
    """Per column: median of the last `recent` finite observations (columns under min_history left out), and
    the largest number of observations used."""
    med, n = {}, 0
    for c in wide.columns:
        x = finite_only(wide[c])
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
                    "message": (f"update/parameter ratio too large on {len(high)} layer(s): median ‖Δθ‖/‖θ‖ "
                                f"{_num(high.iloc[0])} on {_who(worst)} over the last {n_obs} steps "
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
                               "residual); a per-layer lr or a LAMB-style trust ratio "
                               "(gradsight.transforms.trust_ratio()) can compensate")})
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
                    "action": ("aggregate the terms instead of summing them: "
                               f"gradsight.transforms.aggregate_backward({terms}, shared_params, "
                               "aggregator='pcgrad' or 'upgrad') on the conflicting block "
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
