"""Noise scale, GSNR and GVM allocation (stats/noise.py) against a synthetic model with known truth."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsight.measures.moments import MomentAccumulator
from gradsight.stats.noise import (
    gsnr,
    gvm_allocation,
    noise_scale,
    noise_scale_ci,
    noise_scale_microbatches,
    noise_scale_two_batch,
    per_layer_noise,
)

# synthetic per-example gradients g = mu + N(0, s^2 I_d): tr(Sigma) = d s^2, |G|^2 = |mu|^2
D, S = 8, 1.5
MU = np.linspace(-0.6, 0.8, D)
TRUE_TR, TRUE_GSQ = D * S**2, float((MU**2).sum())


def _draws(trials, n, seed=0):
    return MU + S * np.random.default_rng(seed).standard_normal((trials, n, D))


def _within(samples, truth, k=4.0):
    samples = np.asarray(samples)
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    return abs(samples.mean() - truth) < k * se, (samples.mean(), truth, se)


def test_unbiased_estimators_match_truth_over_trials():
    draws = _draws(3000, 6)
    res = [noise_scale(g) for g in draws]
    ok, info = _within([r["trace_sigma"] for r in res], TRUE_TR)
    assert ok, info
    ok, info = _within([r["g_sq"] for r in res], TRUE_GSQ)
    assert ok, info
    # the plug-in |gbar|^2 is biased upward by tr(Sigma)/n: the test above would catch that
    plug = np.mean([noise_scale(g, unbiased=False)["g_sq"] for g in draws])
    assert plug - TRUE_GSQ > 0.8 * TRUE_TR / 6


def test_b_simple_recovered_for_large_n():
    g = _draws(1, 40000, seed=1)[0]
    r = noise_scale(torch.as_tensor(g, dtype=torch.float32))
    assert r["n"] == 40000 and r["signal_detected"]
    assert r["b_simple"] == pytest.approx(TRUE_TR / TRUE_GSQ, rel=0.05)
    ci = noise_scale_ci(g[:2000], n_boot=300, seed=0)
    assert ci["lo"] < ci["estimate"] < ci["hi"]
    assert ci["lo"] < TRUE_TR / TRUE_GSQ < ci["hi"]


def test_pure_noise_gives_inf_with_flag_and_ci_handles_it():
    g = np.random.default_rng(2).standard_normal((50, D))
    res = [noise_scale(g[i:i + 10]) for i in range(0, 50, 10)]
    assert any(not r["signal_detected"] for r in res)
    for r in res:
        assert (r["b_simple"] == math.inf) == (not r["signal_detected"])
    ci = noise_scale_ci(g, n_boot=200)
    assert ci["hi"] == math.inf and 0 < ci["frac_no_signal"] <= 1
    with pytest.raises(ValueError, match="at least 2"):
        noise_scale(g[:1])


def test_streaming_merge_equals_one_shot_and_skips_nonfinite():
    g = _draws(1, 37, seed=3)[0]
    a = MomentAccumulator().update(g[:10])
    b = MomentAccumulator().update(g[10:25]).update(g[25:])
    st_ = {k: v for k, v in a.merge(b).state_dict().items()}
    merged = MomentAccumulator.from_state(st_)
    one = noise_scale(g)
    for key in ("trace_sigma", "g_sq", "b_simple"):
        assert merged.noise_scale()[key] == pytest.approx(one[key], rel=1e-12)
    bad = np.vstack([g, np.full((1, D), np.nan)])
    r = noise_scale(bad)
    assert r["n_skipped"] == 1 and r["trace_sigma"] == pytest.approx(one["trace_sigma"], rel=1e-12)


def test_two_batch_estimators_match_truth():
    draws = _draws(4000, 32, seed=4)
    s_small = (draws[:, :4].mean(1) ** 2).sum(1)  # one "device" of 4 examples
    s_big = (draws.mean(1) ** 2).sum(1)  # the global batch of 32
    r = noise_scale_two_batch(s_small, s_big, 4, 32)
    ok, info = _within(r["g_sq"], TRUE_GSQ)
    assert ok, info
    ok, info = _within(r["trace_sigma"], TRUE_TR)
    assert ok, info
    assert r["b_simple"] == pytest.approx(TRUE_TR / TRUE_GSQ, rel=0.1)
    one = noise_scale_two_batch(float(s_small[0]), float(s_big[0]), 4, 32)
    assert one["g_sq"] == pytest.approx(float(r["g_sq"][0]))
    # by hand: E S_B = |G|^2 + tr/B is inverted exactly
    h = noise_scale_two_batch(2.0 + 12.0 / 4, 2.0 + 12.0 / 32, 4, 32)
    assert h["g_sq"] == pytest.approx(2.0) and h["trace_sigma"] == pytest.approx(12.0) and h["b_simple"] == 6.0
    with pytest.raises(ValueError, match="B_small < B_big"):
        noise_scale_two_batch(1.0, 1.0, 8, 8)


def test_microbatch_estimator_matches_truth():
    K, b = 6, 5
    draws = _draws(3000, K * b, seed=5).reshape(3000, K, b, D).mean(2)  # (trials, K, D) micro-batch means
    res = [noise_scale_microbatches(G, b) for G in draws]
    ok, info = _within([r["trace_sigma"] for r in res], TRUE_TR)
    assert ok, info
    ok, info = _within([r["g_sq"] for r in res], TRUE_GSQ)
    assert ok, info
    # formula by hand on one case
    G = draws[0]
    gbar = G.mean(0)
    s2 = ((G - gbar) ** 2).sum() / (K - 1)
    assert res[0]["b_simple"] == pytest.approx(b * s2 / ((gbar**2).sum() - s2 / K), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        noise_scale_microbatches(G[:1], b)


def test_gsnr_matches_mu_sq_over_s_sq():
    g = _draws(1, 50000, seed=6)[0]
    per, mean = gsnr(g)
    assert per.shape == (D,) and per.dtype == torch.float64
    np.testing.assert_allclose(per.numpy(), MU**2 / S**2, rtol=0.05, atol=0.005)
    assert mean == pytest.approx(float(per.mean()))
    # cockpit convention by hand (population variance + eps) on a tiny case
    x = np.array([[1.0, 0.0], [3.0, 2.0]])
    per, _ = gsnr(x, eps=0.5)
    np.testing.assert_allclose(per.numpy(), [4.0 / 1.5, 1.0 / 1.5])
    per_u, _ = gsnr(x, eps=0.5, unbiased=True)  # s^2 = 2, 2; mu^2 est = 4 - 1, 1 - 1
    np.testing.assert_allclose(per_u.numpy(), [3.0 / 2.5, 0.0])


def test_per_layer_noise_total_row():
    g = _draws(1, 200, seed=7)[0]
    feats = {"a": torch.as_tensor(g[:, :3]), "b": torch.as_tensor(g[:, 3:])}
    df = per_layer_noise(feats)
    assert list(df.columns) == ["layer", "n", "trace_sigma", "g_sq", "b_simple", "gsnr_mean"]
    assert df["layer"].tolist() == ["a", "b", "total"]
    tot = df.set_index("layer").loc["total"]
    layers = df[df.layer != "total"]
    assert tot.trace_sigma == pytest.approx(layers.trace_sigma.sum(), rel=1e-12)
    assert tot.g_sq == pytest.approx(layers.g_sq.sum(), rel=1e-12)
    assert tot.b_simple == pytest.approx(tot.trace_sigma / tot.g_sq)
    full = noise_scale(g)
    assert tot.b_simple == pytest.approx(full["b_simple"], rel=1e-12)
    assert tot.gsnr_mean == pytest.approx(gsnr(g)[1], rel=1e-12)
    with pytest.raises(ValueError, match="same number of examples"):
        per_layer_noise({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})


def test_gvm_worked_example():
    G, p = [1.0, 1.0, 1.0], [0.5, 0.1, 0.0]
    raw = np.array([1 / math.sqrt(0.5 + 1e-3 / 0.5), 1 / math.sqrt(0.1 + 1e-3 / 0.1), 0.0])
    np.testing.assert_allclose(raw, [1.41139, 3.01511, 0.0], atol=1e-5)
    np.testing.assert_allclose(raw / raw.sum(), [0.31885, 0.68115, 0.0], atol=1e-5)
    counts = gvm_allocation(G, p, 10)
    assert counts.tolist() == [3, 7, 0] and counts.dtype == np.int64
    # proportional at a large budget: the fractions themselves
    np.testing.assert_allclose(gvm_allocation(G, p, 100000) / 100000, [0.31885, 0.68115, 0.0], atol=1e-5)


def test_gvm_filters():
    G, p = [1.0, 1.0, 2.0], [0.5, 0.1, 1.0]
    assert gvm_allocation(G, p, 20, filter_threshold=0.9)[2] == 0
    assert gvm_allocation(G, p, 20)[2] > 0
    # expected accepted count p_i n_i: prompt 1 gets about 0.1 * 20 * f_1 < 1.5 -> dropped
    c = gvm_allocation(G, p, 20, filter_insufficient=1.5)
    assert c[1] == 0 and c.sum() == 20


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0, 1e3), st.floats(0, 1)), min_size=1, max_size=30),
    budget=st.integers(0, 5000),
    alpha=st.floats(0, 1),
    beta=st.floats(0.5, 4),
)
def test_gvm_counts_sum_to_budget(data, budget, alpha, beta):
    G = [d[0] for d in data]
    p = [d[1] for d in data]
    positive = any(g > 0 and q > 0 for g, q in data)
    if budget > 0 and not positive:
        with pytest.raises(ValueError, match="positive weight"):
            gvm_allocation(G, p, budget, alpha=alpha, beta=beta)
        return
    try:
        c = gvm_allocation(G, p, budget, alpha=alpha, beta=beta)
    except ValueError as e:  # only possible when every weight underflows to 0
        assert "positive weight" in str(e)
        return
    assert c.sum() == budget and (c >= 0).all()
    assert all(c[i] == 0 for i, (g, q) in enumerate(data) if g == 0 or q == 0)


@pytest.mark.parametrize(
    "args,match",
    [
        (([1.0, 2.0], [0.5], 10), "entries"),
        (([1.0, -2.0], [0.5, 0.5], 10), "non-negative"),
        (([1.0, float("nan")], [0.5, 0.5], 10), "non-negative"),
        (([1.0, 2.0], [0.5, 1.5], 10), r"\[0, 1\]"),
        (([1.0, 2.0], [0.5, -0.1], 10), r"\[0, 1\]"),
        (([1.0, 2.0], [0.5, 0.5], -1), "non-negative integer"),
        (([1.0, 2.0], [0.5, 0.5], 2.5), "non-negative integer"),
        (([[1.0]], [[0.5]], 3), "1-D"),
        (([0.0, 2.0], [0.5, 0.0], 3), "positive weight"),
        (([1.0, 2.0], [0.5, 0.5], 3, -1.0), "alpha"),
    ],
)
def test_gvm_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        gvm_allocation(*args)
