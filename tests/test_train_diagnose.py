"""The training monitor's diagnoses and summarizer.

Every rule gets a synthetic trace where it must fire (rule, step, layer and the numbers of its message are
checked) and realistic healthy traces where it must not (log-normal gradient norms, a noisy decreasing loss,
occasional clipping, ...). The firing traces use a period-3 ripple (c*0.9, c, c*1.1) around a constant, so
running medians are exactly c and the numbers in the messages are known in advance.
"""

from __future__ import annotations

import functools
import inspect
import json
import re

import numpy as np
import pandas as pd
import pytest

from gradsight.runs.store import atomic_write_text, write_parquet
from gradsight.train import schema as S
from gradsight.train.diagnose import RULES, Thresholds, diagnose
from gradsight.train.summarize import summarize

L = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]


def ripple(n: int, c: float, spread: float = 0.1) -> np.ndarray:
    return c * np.array([1 - spread, 1.0, 1 + spread])[np.arange(n) % 3]


def rows(metric: str, layer: str, values, steps=None) -> pd.DataFrame:
    values = np.asarray(values, dtype="float64")
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)
    return pd.DataFrame({"step": steps.astype("int64"), "layer": layer, "metric": metric, "value": values})


def frame(*parts: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True)[S.SCALAR_COLUMNS]


def only(df: pd.DataFrame, rule: str) -> pd.DataFrame:
    return df[df["rule"] == rule].reset_index(drop=True)


@functools.lru_cache(maxsize=None)
def _healthy(seed: int, n: int) -> pd.DataFrame:
    return healthy(seed, n)


def healthy(seed: int, n: int = 600) -> pd.DataFrame:
    """A noisy but healthy run: nothing should fire on it."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    parts = []
    base = np.geomspace(0.3, 3.0, len(L))
    norms = base[:, None] * np.exp(0.4 * rng.standard_normal((len(L), n)))
    for layer, g, in zip(L, norms):
        parts += [rows(S.GRAD_NORM, layer, g),
                  rows(S.UPDATE_RATIO, layer, 1e-3 * np.exp(0.4 * rng.standard_normal(n))),
                  rows(S.SPAM_FRAC, layer, np.where(rng.random(n) < 0.02, 1e-6, 0.0))]
    lr = np.where(t < 50, 1e-3 * (t + 1) / 50, 1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * (t - 50) / (n - 50))))
    clip = np.where(rng.random(n) < 0.05, rng.uniform(0.7, 1.0, n), 1.0)
    loss = (1.0 + 3.0 * np.exp(-t / 200)) * (1 + 0.05 * rng.standard_normal(n))
    probe = t[::50]
    cos_steps = t[::5]
    parts += [rows(S.GRAD_NORM, S.MODEL, np.sqrt((norms ** 2).sum(0))), rows(S.LOSS, S.MODEL, loss),
              rows(S.LR, S.MODEL, lr), rows(S.CLIP_COEF, S.MODEL, clip),
              rows(S.NONFINITE, S.MODEL, np.zeros(n)), rows(S.SKIPPED, S.MODEL, np.zeros(n)),
              rows(S.LOSS_SCALE, S.MODEL, np.full(n, 65536.0)),
              rows(S.NOISE_SCALE, S.MODEL, 64 * np.exp(0.3 * rng.standard_normal(n))),
              rows(S.COS_PREFIX + "lm|aux", S.MODEL, np.clip(rng.normal(0.3, 0.2, len(cos_steps)), -1, 1), cos_steps),
              rows(S.SHARPNESS, S.MODEL, (0.4 + 0.1 * rng.standard_normal(len(probe))) * 2 / lr[probe], probe),
              rows(S.SHARPNESS_THRESHOLD, S.MODEL, 2 / lr[probe], probe),
              rows(S.SC_FP32, S.MODEL, np.zeros(len(probe)), probe),
              rows(S.ZERO_LOSS, S.MODEL, np.zeros(len(probe)), probe)]
    return frame(*parts)


MANIFEST = {"analysis": "train", "batch_size": 32}


# --- healthy, short and flat traces: nothing fires -------------------------------------------------------

@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_run_fires_nothing(rule, seed):
    out = diagnose(_healthy(seed, 600).copy(), None, MANIFEST, rules=[rule])
    assert out.empty, out["message"].tolist()


def test_short_trace_does_not_fire():
    n = 15  # under min_history: a 40x jump of the gradient and a 3x loss are not judged yet
    g = ripple(n, 1.0)
    g[-1] = 40.0
    loss = ripple(n, 2.0, 0.005)
    loss[-1] = 6.0
    s = frame(rows(S.GRAD_NORM, L[0], g), rows(S.LOSS, S.MODEL, loss),
              rows(S.CLIP_COEF, S.MODEL, np.full(n, 0.2)), rows(S.UPDATE_RATIO, L[0], np.full(n, 0.5)))
    assert diagnose(s, None, MANIFEST).empty


def test_flat_trace_does_not_fire():
    n = 300
    loss = np.full(n, 2.0)
    loss[200] = 2.0 * (1 + 1e-6)  # a bump on a flat trace (MAD 0): infinite z, but no real ratio
    s = frame(*[rows(S.GRAD_NORM, layer, np.full(n, 1.0)) for layer in L],
              *[rows(S.UPDATE_RATIO, layer, np.full(n, 1e-3)) for layer in L],
              rows(S.LOSS, S.MODEL, loss), rows(S.CLIP_COEF, S.MODEL, np.ones(n)),
              rows(S.NONFINITE, S.MODEL, np.zeros(n)), rows(S.NOISE_SCALE, S.MODEL, np.full(n, 32.0)))
    assert diagnose(s, None, MANIFEST).empty


def test_empty_inputs():
    out = diagnose(pd.DataFrame(columns=S.SCALAR_COLUMNS), pd.DataFrame(columns=S.ALERT_COLUMNS))
    assert list(out.columns) == S.DIAGNOSIS_COLUMNS and out.empty


# --- 1 and 2: gradient spike, loss spike after it ---------------------------------------------------------

def spike_trace(n: int = 400) -> pd.DataFrame:
    parts = []
    for layer in L:
        g = ripple(n, 1.0)
        if layer == L[3]:
            g[300] = 40.0
        if layer == L[4]:
            g[300] = 20.0
        parts.append(rows(S.GRAD_NORM, layer, g))
    loss = ripple(n, 2.0, 0.005)
    loss[301] = 4.6
    parts += [rows(S.LOSS, S.MODEL, loss), rows(S.SPAM_FRAC, L[3], [0.03], [300])]
    return frame(*parts)


def test_grad_spike_fires_with_loss_response():
    out = diagnose(spike_trace(), None, rules=["grad_spike"])
    assert len(out) == 1
    d = out.iloc[0]
    assert (d["rule"], d["step"], d["last_step"], d["layer"]) == ("grad_spike", 300, 300, L[3])
    for text in ("step 300", "40×", "(40 vs 1)", "2 layers", "3% of entries", "jumped 2.3× at step 301"):
        assert text in d["message"], (text, d["message"])
    ev = json.loads(d["evidence"])
    assert ev["n_layers"] == 2 and ev["ratio"] == pytest.approx(40) and ev["spam_frac"] == pytest.approx(0.03)
    assert ev["layers"][L[4]] == pytest.approx(20)
    assert "spam()" in d["action"] and d["severity"] == "warning"


def test_grad_spike_without_loss_response_and_threshold_override():
    s = spike_trace()
    s.loc[(s["metric"] == S.LOSS) & (s["step"] == 301), "value"] = 2.0
    d = diagnose(s, None, rules=["grad_spike"]).iloc[0]
    assert "the loss did not jump" in d["message"] and d["severity"] == "info"
    assert diagnose(s, None, rules=["grad_spike"], thresholds=Thresholds(spike_factor=50)).empty


def test_grad_spike_from_alerts_only():
    alerts = pd.DataFrame([{"step": 120, "layer": L[2], "rule": S.RULE_NORM_Z, "value": 9.0, "threshold": 6.0,
                            "message": "norm z 9"}], columns=S.ALERT_COLUMNS)
    d = diagnose(frame(rows(S.LOSS, S.MODEL, ripple(200, 2.0, 0.005))), alerts, rules=["grad_spike"])
    assert list(d["step"]) == [120] and d.iloc[0]["layer"] == L[2] and "norm_z" in d.iloc[0]["message"]


def test_loss_spike_after_grad_spike_is_caused_by_it():
    out = diagnose(spike_trace(), None, rules=["loss_spike"])
    assert len(out) == 1
    d = out.iloc[0]
    assert (d["rule"], d["step"], d["layer"]) == ("loss_spike", 301, S.MODEL)
    assert "2.3×" in d["message"] and "gradient spike at step 300" in d["message"] and L[3] in d["message"]
    assert json.loads(d["evidence"])["cause"] == "gradient"


def loss_trace(n: int = 600, lr_jump: bool = False, persistent: bool = False, at: int = 450) -> pd.DataFrame:
    loss = ripple(n, 2.0, 0.005)
    if persistent:
        loss[at:] *= 2.0
    else:
        loss[at] = 5.0
    lr = np.full(n, 1e-3)
    if lr_jump:
        lr[at:] = 3e-3
    return frame(*[rows(S.GRAD_NORM, layer, ripple(n, 1.0)) for layer in L], rows(S.LOSS, S.MODEL, loss),
                 rows(S.LR, S.MODEL, lr))


def test_loss_spike_without_grad_spike_data():
    out = diagnose(loss_trace(), None, rules=["loss_spike", "grad_spike"])
    assert list(out["rule"]) == ["loss_spike"]
    d = out.iloc[0]
    assert d["step"] == 450 and "2.5×" in d["message"] and "recovered within 1 step" in d["message"]
    assert json.loads(d["evidence"])["cause"] == "data" and "batch of step 450" in d["action"]


def test_loss_spike_without_grad_spike_lr():
    out = diagnose(loss_trace(lr_jump=True, persistent=True), None, rules=["loss_spike"])
    assert len(out) == 1  # one event, not one per elevated step
    d = out.iloc[0]
    assert d["step"] == 450 and d["last_step"] > 450 and "lr rose 3×" in d["message"]
    assert json.loads(d["evidence"])["cause"] == "lr" and "lr" in d["action"]
    d = diagnose(loss_trace(persistent=True), None, rules=["loss_spike"]).iloc[0]
    assert json.loads(d["evidence"])["cause"] == "lr" and "never came back" in d["message"]


# --- 3. non-finite gradients ------------------------------------------------------------------------------

def nonfinite_trace(skipped: bool = True) -> pd.DataFrame:
    n = 300
    bad = [100, 101, 250]
    count = np.zeros(n)
    count[bad] = 2
    scale = np.full(n, 65536.0)
    for b in bad:
        scale[b:] /= 2
    g = ripple(n, 1.0)
    g[100] = np.nan
    return frame(rows(S.NONFINITE, S.MODEL, count), rows(S.NONFINITE, L[1], [1, 1], [100, 101]),
                 rows(S.NONFINITE, L[2], [1, 1], [100, 250]), rows(S.GRAD_NORM, L[1], g),
                 rows(S.SKIPPED, S.MODEL, (count > 0) * 1.0 if skipped else np.zeros(n)),
                 rows(S.LOSS_SCALE, S.MODEL, scale))


def test_nonfinite_fires():
    out = diagnose(nonfinite_trace(), None, rules=["nonfinite"])
    assert len(out) == 1
    d = out.iloc[0]
    assert (d["rule"], d["step"], d["last_step"], d["layer"]) == ("nonfinite", 100, 250, L[1])
    for text in ("3 of 300 steps (1%)", "first at step 100", "3 step(s) skipped", L[2], "loss scale min 8192"):
        assert text in d["message"], (text, d["message"])
    assert "apply_if_finite" in d["action"] and d["severity"] == "info"  # GradScaler's calibration
    d = diagnose(nonfinite_trace(skipped=False), None, rules=["nonfinite"]).iloc[0]
    assert d["severity"] == "error" and "NOT skipped" in d["message"]


# --- 4. clipping always on ---------------------------------------------------------------------------------

def clip_trace(clipped_mod: set[int]) -> pd.DataFrame:
    n = 400
    t = np.arange(n)
    coef = np.where(np.isin(t % 5, list(clipped_mod)), 0.25, 1.0)
    return frame(rows(S.CLIP_COEF, S.MODEL, coef), rows(S.GRAD_NORM, S.MODEL, np.full(n, 4.0)))


def test_clipping_fires():
    out = diagnose(clip_trace({1, 2, 3, 4}), None, rules=["clipping"])
    assert len(out) == 1
    d = out.iloc[0]
    assert (d["rule"], d["step"], d["last_step"], d["layer"]) == ("clipping", 200, 399, S.MODEL)
    for text in ("80% of the last 200 steps", "median clip coefficient 0.25", "threshold ≈ 1"):
        assert text in d["message"], (text, d["message"])
    assert "clip_by_global_norm" in d["action"]
    assert diagnose(clip_trace({1, 2}), None, rules=["clipping"]).empty  # 40%: not "always on"


# --- 5. update/parameter ratio ------------------------------------------------------------------------------

def update_ratio_trace(n: int = 300) -> pd.DataFrame:
    values = {L[0]: 1e-3, L[1]: 0.05, L[2]: 1e-3, L[3]: 1e-6, L[4]: 1e-3}
    return frame(*[rows(S.UPDATE_RATIO, k, ripple(n, v)) for k, v in values.items()])


def test_update_ratio_fires():
    out = diagnose(update_ratio_trace(), None, rules=["update_ratio"])
    assert list(out["layer"]) == [L[1], L[3]] and set(out["rule"]) == {"update_ratio"}
    assert list(out["step"]) == [100, 100] and list(out["last_step"]) == [299, 299]
    hi, lo = out.iloc[0], out.iloc[1]
    assert "too large on 1 layer" in hi["message"] and "0.05" in hi["message"] and "clip_per_layer" in hi["action"]
    assert "too small on 1 layer" in lo["message"] and "1e-06" in lo["message"]


# --- 6. vanishing / exploding layers --------------------------------------------------------------------------

def layer_scale_trace(n: int = 300) -> pd.DataFrame:
    scale = {L[0]: 1.0, L[1]: 1.0, L[2]: 500.0, L[3]: 1.0, L[4]: 0.004, L[5]: 1.0, "lm_head.weight": 1.0}
    return frame(*[rows(S.GRAD_NORM, k, ripple(n, v)) for k, v in scale.items()])


def test_layer_scale_fires():
    out = diagnose(layer_scale_trace(), None)
    assert list(out["rule"]) == ["layer_scale", "layer_scale"]  # and no spike: a constant scale is no spike
    ex, va = out.iloc[0], out.iloc[1]
    assert ex["layer"] == L[2] and "exploding" in ex["message"] and "500×" in ex["message"]
    assert va["layer"] == L[4] and "vanishing" in va["message"] and "1/250" in va["message"]


# --- 7. conflicting terms -------------------------------------------------------------------------------------

def conflict_trace() -> pd.DataFrame:
    steps = np.arange(0, 200, 5)  # 40 measurements
    cos = np.where(np.arange(len(steps)) % 2 == 0, -0.2, 0.3)
    per_layer = np.where(np.arange(len(steps)) % 5 < 3, -0.1, 0.2)  # 60% negative
    return frame(rows(S.COS_PREFIX + "lm|aux", S.MODEL, cos, steps),
                 rows(S.COS_PREFIX + "lm|aux", L[2], per_layer, steps),
                 rows(S.COS_PREFIX + "lm|kl", S.MODEL, np.full(5, -0.5), steps[:5]))  # 5 < min_measured


def test_conflict_fires():
    out = diagnose(conflict_trace(), None, rules=["conflict"])
    assert len(out) == 1
    d = out.iloc[0]
    assert (d["rule"], d["step"], d["last_step"], d["layer"]) == ("conflict", 0, 195, S.MODEL)
    for text in ("'lm' and 'aux'", "50% of 40 measured steps", "median cos 0.05", L[2]):
        assert text in d["message"], (text, d["message"])
    assert "aggregate_backward([loss_lm, loss_aux]" in d["action"] and "pcgrad" in d["action"]


# --- 8. edge of stability ------------------------------------------------------------------------------------

def eos_trace(last_ratios) -> pd.DataFrame:
    ratios = np.concatenate([np.linspace(0.2, 0.6, 6), last_ratios])
    steps = 50 * np.arange(len(ratios))
    return frame(rows(S.SHARPNESS, S.MODEL, 40.0 * ratios, steps), rows(S.SHARPNESS_THRESHOLD, S.MODEL,
                                                                        np.full(len(ratios), 40.0), steps))


def test_edge_of_stability_fires():
    d = diagnose(eos_trace([1.025, 1.05, 1.05, 1.05, 1.075]), None, rules=["edge_of_stability"]).iloc[0]
    assert (d["rule"], d["step"], d["last_step"], d["layer"]) == ("edge_of_stability", 300, 500, S.MODEL)
    assert "1.05× its stability threshold" in d["message"] and "λ_max 42 vs 40" in d["message"]
    assert d["severity"] == "warning" and "lower lr" in d["action"]
    d = diagnose(eos_trace([0.9, 0.92, 0.94, 0.96, 0.98]), None, rules=["edge_of_stability"]).iloc[0]
    assert "0.94×" in d["message"] and "rising" in d["message"] and d["severity"] == "info"
    assert diagnose(eos_trace([0.93] * 5), None, rules=["edge_of_stability"]).empty  # 0.93, not rising


# --- 9. softmax collapse --------------------------------------------------------------------------------------

COLLAPSE_STEPS = 50 * np.arange(11)


def collapse_trace() -> pd.DataFrame:
    sc = [0, 0, 0, 0, 0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.4]
    zl = [0, 0, 0, 0, 0, 0.0, 0.05, 0.1, 0.25, 0.3, 0.3]
    return frame(rows(S.SC_FP32, S.MODEL, sc, COLLAPSE_STEPS), rows(S.ZERO_LOSS, S.MODEL, zl, COLLAPSE_STEPS))


def test_softmax_collapse_fires():
    steps = COLLAPSE_STEPS
    out = diagnose(collapse_trace(), None, rules=["softmax_collapse"])
    d = out.iloc[0]
    assert len(out) == 1 and (d["rule"], d["step"], d["last_step"]) == ("softmax_collapse", 300, 500)
    assert "30% of rows" in d["message"] and "25% of rows have a zero loss" in d["message"]
    assert "orthograd()" in d["action"] and "StableMax" in d["action"]
    flat = frame(rows(S.SC_FP32, S.MODEL, np.full(11, 0.2), steps))  # high from the start, not rising
    assert diagnose(flat, None, rules=["softmax_collapse"]).empty


# --- 10. noise scale vs batch size ------------------------------------------------------------------------------

def noise_trace(c: float) -> pd.DataFrame:
    return frame(rows(S.NOISE_SCALE, S.MODEL, ripple(300, c)))


def test_noise_scale_fires_both_ways():
    s = noise_trace(3200.0)
    d = diagnose(s, None, {"batch_size": 32}, rules=["noise_scale"]).iloc[0]
    assert (d["rule"], d["step"], d["last_step"]) == ("noise_scale", 100, 299)
    assert "B_simple 3200 is 100× the batch size 32" in d["message"] and "larger batch" in d["message"]
    assert "raise the batch size toward ~3200" in d["action"]
    d = diagnose(noise_trace(4.0), None, {"batch_size": 512}, rules=["noise_scale"]).iloc[0]
    assert "0.00781×" in d["message"] and "larger than useful" in d["message"]
    assert diagnose(s, None, {}, rules=["noise_scale"]).empty  # no batch size: nothing to compare with


# --- registry and arguments ------------------------------------------------------------------------------------

def test_registry_add_disable_and_errors():
    s = spike_trace()
    every = diagnose(s, None)
    assert set(every["rule"]) == {"grad_spike", "loss_spike"} and list(every["step"]) == sorted(every["step"])
    assert set(diagnose(s, None, rules=[r for r in RULES if r != "loss_spike"])["rule"]) == {"grad_spike"}
    mine = {"always": lambda series, alerts, ctx: [{"step": 7, "message": "x", "evidence": {"n": np.float64(1)}}]}
    d = diagnose(s, None, rules=mine).iloc[0]
    assert (d["rule"], d["step"], d["layer"], d["severity"], json.loads(d["evidence"])) == \
        ("always", 7, S.MODEL, "warning", {"n": 1.0})
    with pytest.raises(ValueError, match="unknown rule"):
        diagnose(s, None, rules=["nope"])
    with pytest.raises(ValueError, match="spike_factor"):
        Thresholds(spike_factor=0.5)
    with pytest.raises(ValueError, match="update_ratio_low"):
        Thresholds(update_ratio_low=0.1)
    with pytest.raises(ValueError, match="missing columns"):
        diagnose(pd.DataFrame({"step": [1]}), None)


# --- summarize -------------------------------------------------------------------------------------------------

def new_run(tmp_path, batch_size=32):
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_text(run / "manifest.json", json.dumps({"schema_version": 2, "analysis": "train",
                                                         "identity": {"analysis": "train"}, "batch_size": batch_size}))
    return run


def commit(run, key, scalars=None, alerts=None, marker=True):
    if scalars is not None:
        write_parquet(scalars, run / S.SCALARS / f"{key}.parquet")
    if alerts is not None:
        write_parquet(alerts, run / S.ALERTS / f"{key}.parquet")
    if marker:
        steps = sorted(set(scalars["step"]) if scalars is not None else set())
        write_parquet(pd.DataFrame({"step": pd.Series(steps, dtype="int64")}), run / S.STEPS / f"{key}.parquet")


def alert(step, rule):
    return pd.DataFrame([{"step": step, "layer": L[0], "rule": rule, "value": 1.0, "threshold": 0.5,
                          "message": f"{rule} at {step}"}], columns=S.ALERT_COLUMNS)


def test_summarize_keeps_committed_last_writes(tmp_path):
    run = new_run(tmp_path)
    steps = np.arange(21)
    commit(run, "r0-00000", frame(rows(S.LOSS, S.MODEL, np.ones(10), steps[:10])), alert(5, S.RULE_SPAM))
    commit(run, "r0-00001", frame(rows(S.LOSS, S.MODEL, np.ones(5), steps[10:15])))
    # resumed from a checkpoint at step 10: steps 10-12 written again (the newest write wins)
    commit(run, "r0-00002", frame(rows(S.LOSS, S.MODEL, np.full(3, 5.0), steps[10:13])), alert(11, S.RULE_NORM_Z))
    # killed before its marker: ignored
    commit(run, "r0-00003", frame(rows(S.LOSS, S.MODEL, np.full(8, 999.0), steps[13:])), alert(13, S.RULE_SPAM),
           marker=False)
    (run / S.SCALARS / ".r0-00004.parquet.abc.tmp").write_bytes(b"torn")
    # key order is numeric: r10 comes after r2
    commit(run, "r10-00000", frame(rows(S.LR, S.MODEL, [10.0], [0])))
    commit(run, "r2-00000", frame(rows(S.LR, S.MODEL, [2.0], [0])))
    out = summarize(run)
    series = out["series"]
    assert list(series.columns) == S.SCALAR_COLUMNS
    loss = series[series["metric"] == S.LOSS].set_index("step")["value"]
    assert list(loss.index) == list(range(15))
    assert list(loss.loc[10:12]) == [5.0, 5.0, 5.0] and loss.loc[13] == 1.0 and 999.0 not in loss.values
    assert series.loc[series["metric"] == S.LR, "value"].tolist() == [10.0]
    assert sorted(out["alerts"]["step"]) == [5, 11]
    for name in (S.SERIES, S.ALERTS, S.DIAGNOSES):
        on_disk = pd.read_parquet(run / f"{name}.parquet")
        pd.testing.assert_frame_equal(on_disk, out[name], check_dtype=False)
    assert list(out["diagnoses"].columns) == S.DIAGNOSIS_COLUMNS


def test_summarize_diagnoses_a_run(tmp_path):
    run = new_run(tmp_path)
    s = spike_trace()
    commit(run, "r0-00000", s[s["step"] < 200])
    commit(run, "r0-00001", s[s["step"] >= 200])
    d = summarize(run)["diagnoses"]
    assert pd.read_parquet(run / "diagnoses.parquet")[["rule", "step"]].values.tolist() == \
        [["grad_spike", 300], ["loss_spike", 301]] == d[["rule", "step"]].values.tolist()


def test_summarize_empty_run(tmp_path):
    run = new_run(tmp_path, batch_size=None)
    out = summarize(run)
    assert list(out["series"].columns) == S.SCALAR_COLUMNS and out["series"].empty
    assert list(out["alerts"].columns) == S.ALERT_COLUMNS and out["alerts"].empty
    assert list(out["diagnoses"].columns) == S.DIAGNOSIS_COLUMNS and out["diagnoses"].empty
    assert str(out["series"]["step"].dtype) == "int64"
    assert all((run / f"{n}.parquet").exists() for n in (S.SERIES, S.ALERTS, S.DIAGNOSES))
    with pytest.raises(FileNotFoundError):
        summarize(tmp_path / "nothing")


# --- actions name real transforms ----------------------------------------------------------------------------

CALL = re.compile(r"([A-Za-z_][\w.]*)\(")  # a name written as a call: "spam()", "gradsight.transforms.spam("
PREFIX = "gradsight.transforms."


def together_trace(n: int = 400) -> pd.DataFrame:
    """Every layer spikes 40x at step 300: the grad_spike rule's global-clipping branch."""
    spike = np.where(np.arange(n) == 300, 40.0, 1.0)
    return frame(*[rows(S.GRAD_NORM, layer, ripple(n, 1.0) * spike) for layer in L])


def fire_actions() -> pd.DataFrame:
    """Every rule run over every firing trace of this file (both branches where a rule has two actions)."""
    traces = [(spike_trace(), MANIFEST), (together_trace(), MANIFEST), (loss_trace(), MANIFEST),
              (loss_trace(lr_jump=True, persistent=True), MANIFEST), (loss_trace(persistent=True), MANIFEST),
              (nonfinite_trace(), MANIFEST), (nonfinite_trace(skipped=False), MANIFEST),
              (clip_trace({1, 2, 3, 4}), MANIFEST), (update_ratio_trace(), MANIFEST),
              (layer_scale_trace(), MANIFEST), (conflict_trace(), MANIFEST),
              (eos_trace([1.025, 1.05, 1.05, 1.05, 1.075]), MANIFEST), (collapse_trace(), MANIFEST),
              (noise_trace(3200.0), {"batch_size": 32}), (noise_trace(4.0), {"batch_size": 512})]
    return pd.concat([diagnose(s, None, m) for s, m in traces], ignore_index=True)


def test_actions_name_only_real_transforms():
    import gradsight.transforms as gt

    real = set(gt.__all__)
    out = fire_actions()
    assert set(out["rule"]) == set(RULES)  # every rule's action is checked
    assert "clip_by_global_norm" in " ".join(out["action"])  # the together branch fired
    named = set()
    for rule, action in zip(out["rule"], out["action"]):
        for name in CALL.findall(action):
            short = name[len(PREFIX):] if name.startswith(PREFIX) else name
            assert short in real and "." not in short, (rule, name, action)
            named.add(short)
        for agg in re.findall(r"aggregator='(\w+)'", action):
            assert agg in gt.AGGREGATORS, (rule, agg, action)
    assert {"spam", "clip_per_layer", "clip_by_global_norm", "apply_if_finite", "orthograd",
            "aggregate_backward"} <= named


def test_rule_sources_name_only_real_transforms():
    import gradsight.train.diagnose as diag
    import gradsight.train.rules as rules
    import gradsight.transforms as gt

    text = inspect.getsource(diag) + inspect.getsource(rules)
    mentioned = set(re.findall(r"gradsight\.transforms\.(\w+)", text))
    assert len(mentioned) >= 6 and mentioned <= set(gt.__all__), mentioned - set(gt.__all__)
    assert not re.search(r"gradsight\.transforms\.[\"']", text)  # a name split across string literals
