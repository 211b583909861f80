"""Accountant known answers, privacy transforms by hand, the DP-SGD step against a hand computation, digits utility."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("opacus")

import gradsight.transforms as gt  # noqa: E402
from gradsight.privacy.accountant import Accountant, epsilon, epsilon_with_error, noise_for_epsilon  # noqa: E402
from gradsight.privacy.defences import parse_defence  # noqa: E402
from gradsight.privacy.dpsgd import DPSGD, poisson_batches, train_digits, utility_grid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:GDP accounting", "ignore:Optimal order")

SIG, Q, T, DELTA = 1.5, 0.04, 2250, 1e-5  # opacus/tests/accountants_test.py


# ----------------------------------------------------------------------------------------------- accountant

def test_rdp_known_answer():
    assert epsilon(SIG, Q, T, DELTA, "rdp") == pytest.approx(7.32911117143, rel=1e-9)


def test_prv_interval_and_known_answers():
    low, est, up = epsilon_with_error(SIG, Q, T, DELTA)
    assert low < est < up and up - low < 2 * 0.01 + 0.01  # width ~ 2 eps_error
    assert epsilon(SIG, Q, T, DELTA, "prv") == pytest.approx(up, abs=1e-9)  # Opacus reports the upper end
    assert up == pytest.approx(6.779, abs=1e-3)  # opacus 1.6.0
    assert abs(up - 6.78) <= 0.01 and abs(est - 6.78) <= 0.012  # 6.78 within eps_error
    # opacus' own test runs int(90 // 0.04) = 2249 steps
    assert epsilon(SIG, Q, 2249, DELTA, "prv") == pytest.approx(6.777395712150674, abs=1e-6)
    assert up < epsilon(SIG, Q, T, DELTA, "rdp")  # PRV is tighter than the RDP bound


def test_prv_cross_check_microsoft_prv_accountant():
    # values computed by microsoft/prv_accountant (a second maintained accountant), delta = 1e-6, recorded in
    # opacus/tests/prv_accountant.py; dp_accounting is not installed here, so it is not compared
    msr = {(1.5, 0.05, 1000): 6.20996924657726712, (2.0, 0.001, 20000): 0.305837939762453436}
    for (s, q, t), ref in msr.items():
        low, est, up = epsilon_with_error(s, q, t, 1e-6)
        assert low <= ref <= up + 1e-6 and abs(est - ref) <= 0.011


def test_gdp_known_answer():
    assert 6.59 < epsilon(SIG, Q, 2249, DELTA, "gdp") < 6.6


def test_noise_for_epsilon_known_answers():
    s = noise_for_epsilon(8.0, DELTA, Q, 2000, "rdp")
    assert s == pytest.approx(1.3562, abs=1e-4)
    assert 8.0 - 0.01 < epsilon(s, Q, 2000, DELTA) <= 8.0  # the bisection's tolerance
    assert noise_for_epsilon(8.0, DELTA, Q, int(90 / Q), "rdp") == pytest.approx(1.416, abs=1e-4)


def test_noise_for_epsilon_prv_known_answer():
    assert noise_for_epsilon(8.0, DELTA, Q, 2000, "prv") == pytest.approx(1.2915, abs=1e-4)


@pytest.mark.parametrize("args, msg", [
    ((0.0, Q, T, DELTA), r"noise multiplier must be > 0 \(got 0.0\)"),
    ((-1.0, Q, T, DELTA), r"noise multiplier must be > 0 \(got -1.0\)"),
    ((SIG, 0.0, T, DELTA), r"sample rate must be in \(0, 1\] \(got 0.0\)"),
    ((SIG, 1.5, T, DELTA), r"sample rate must be in \(0, 1\] \(got 1.5\)"),
    ((SIG, Q, 0, DELTA), r"steps must be an integer >= 1 \(got 0\)"),
    ((SIG, Q, T, 0.0), r"delta must be in \(0, 1\) \(got 0.0\)"),
    ((SIG, Q, T, 1.0), r"delta must be in \(0, 1\) \(got 1.0\)"),
])
def test_accountant_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        epsilon(*args)


def test_delta_vs_n_and_kind_errors():
    with pytest.raises(ValueError, match=r"delta=0.01 with n=1000"):
        epsilon(SIG, Q, T, 0.01, n=1000)
    with pytest.raises(ValueError, match=r"delta=0.01 with n=100,"):
        Accountant("rdp", delta=0.01, n=100)
    with pytest.raises(ValueError, match="'moments'"):
        epsilon(SIG, Q, T, DELTA, "moments")
    with pytest.raises(ValueError, match=r"target epsilon .* \(got -1"):
        noise_for_epsilon(-1, DELTA, Q, T)


def test_running_accountant():
    acc = Accountant("rdp", delta=DELTA, n=60000)
    assert acc.epsilon() == 0.0
    for _ in range(300):
        acc.step(1.1, 0.01)
    assert acc.steps == 300 and acc.history == [(1.1, 0.01, 300)]
    assert acc.epsilon() == pytest.approx(epsilon(1.1, 0.01, 300, DELTA), rel=1e-12)
    acc.step(0.0, 0.01)  # a step without noise: no guarantee any more
    assert acc.epsilon() == math.inf


# ----------------------------------------------------------------------------------------------- transforms

def _run(tx, grads, state=None, ctx=None):
    state = tx.init({k: torch.zeros_like(v) for k, v in grads.items()}) if state is None else state
    return tx.update({k: v.clone() for k, v in grads.items()}, state, None, ctx)


def test_dp_noise_by_hand_and_resume():
    g = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    sigma, C, B = 0.7, 2.0, 8.0
    tx = gt.dp_noise(sigma, C, B, seed=5)
    ctx = gt.Context()
    out, s1 = _run(tx, g, ctx=ctx)
    gen = torch.Generator().manual_seed(5)
    for k in ("w", "b"):  # dict order
        z = torch.randn(g[k].shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(out[k], (g[k] + sigma * C * z) / B, rtol=0, atol=1e-14)
    assert ctx.stats["dp_noise"]["std"] == pytest.approx(sigma * C)
    # resume: the second step from the saved state equals a continuous run
    out2, _ = _run(tx, g, state=s1)
    cont = {k: (g[k] + sigma * C * torch.randn(g[k].shape, generator=gen, dtype=torch.float64)) / B for k in g}
    for k in g:
        torch.testing.assert_close(out2[k], cont[k], rtol=0, atol=1e-14)
    # per-layer: std sigma * sqrt(sum C_l^2); sigma 0 with C inf: averaging only
    ctx = gt.Context()
    _run(gt.dp_noise(1.0, {"w": 3.0, "b": 4.0}, 1.0), g, ctx=ctx)
    assert ctx.stats["dp_noise"]["std"] == pytest.approx(5.0)
    out0, _ = _run(gt.dp_noise(0.0, math.inf, 4.0), g)
    torch.testing.assert_close(out0["w"], g["w"] / 4.0)
    with pytest.raises(ValueError, match="infinite"):
        gt.dp_noise(1.0, math.inf, 4.0)


def test_dp_noise_statistics():
    g = {"w": torch.zeros(200_000, dtype=torch.float64)}
    out, _ = _run(gt.dp_noise(1.5, 2.0, 10.0, seed=1), g)
    assert out["w"].mean().abs() < 5 * 0.3 / math.sqrt(2e5) and out["w"].std() == pytest.approx(0.3, rel=0.01)


def test_prune_by_hand():
    g = {"a": torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    ctx = gt.Context()
    out, _ = _run(gt.prune_gradients(0.4), g, ctx=ctx)  # a: k = 2 (0.5, -1); b: k = round(1.6) = 2, ties -> 0, 1
    assert out["a"].tolist() == [3.0, 0.0, 2.0, 0.0, -4.0]
    assert out["b"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert ctx.stats["prune_gradients"]["zeroed"] == 4
    w = torch.randn(7, 9)
    o, _ = _run(gt.prune_gradients(0.9), {"w": w})
    assert int((o["w"] == 0).sum()) == round(0.9 * 63)
    assert o["w"].abs().max() == w.abs().max()
    assert _run(gt.prune_gradients(0.0), {"w": w})[0]["w"].equal(w)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\] \(got 1.5\)"):
        gt.prune_gradients(1.5)


def test_random_mask_by_hand():
    g = {"w": torch.randn(50, 40), "b": torch.randn(40)}
    out, _ = _run(gt.random_mask(0.3, seed=2), g)
    gen = torch.Generator().manual_seed(2)
    for k in ("w", "b"):
        keep = torch.rand(g[k].shape, generator=gen) >= 0.3
        torch.testing.assert_close(out[k], g[k] * keep)
    frac = float((out["w"] == 0).float().mean())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.21 / 2000)
    assert _run(gt.random_mask(0.0), g)[0]["w"].equal(g["w"])
    assert not _run(gt.random_mask(1.0), g)[0]["w"].any()


def test_top_k_global_by_hand():
    g = {"a": torch.tensor([1.0, -5.0]), "b": torch.tensor([3.0, 0.5, -2.0])}
    ctx = gt.Context()
    out, _ = _run(gt.top_k(0.4), g, ctx=ctx)  # k = 2 of 5 entries over both tensors: -5 and 3
    assert out["a"].tolist() == [0.0, -5.0] and out["b"].tolist() == [3.0, 0.0, 0.0]
    assert ctx.stats["top_k"] == {"kept": 2, "threshold": 3.0}
    out, _ = _run(gt.top_k(0.5), {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([2.0, 2.0])})  # ties: earliest
    assert out["a"].tolist() == [2.0, 0.0] and out["b"].tolist() == [2.0, 0.0]


def test_quantize_by_hand():
    g = {"w": torch.tensor([1.0, 0.4, -0.6, -0.2], dtype=torch.float64), "z": torch.zeros(3, dtype=torch.float64)}
    out, _ = _run(gt.quantize(2), g)  # L = 1, s = 1: round -> {-1, 0, 1}
    assert out["w"].tolist() == [1.0, 0.0, -1.0, 0.0] and not out["z"].any()
    out, _ = _run(gt.quantize(3), g)  # L = 3, s = 1/3: g/s = 3, 1.2, -1.8, -0.6 -> 3, 1, -2, -1
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 1.0, -2.0, -1.0], dtype=torch.float64) / 3)
    with pytest.raises(ValueError, match=r"bits must be an integer >= 2 \(got 1\)"):
        gt.quantize(1)


# ----------------------------------------------------------------------------------------------- DP-SGD

def test_poisson_batches_match_opacus_sampler():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    ours = [b.tolist() for b in poisson_batches(100, 0.1, 5, seed=3)]
    ref = list(UniformWithReplacementSampler(num_samples=100, sample_rate=0.1, steps=5,
                                             generator=torch.Generator().manual_seed(3)))
    assert ours == [list(r) for r in ref]
    sizes = [len(b) for b in poisson_batches(5, 0.05, 50, seed=0)]
    assert 0 in sizes and max(sizes) <= 5  # empty batches happen


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def test_dpsgd_sigma0_Cinf_is_plain_sgd():
    X, y = _data()
    q, lr, n = 0.4, 0.3, len(y)
    a, b = _tiny(), _tiny()
    dp = DPSGD(a, torch.optim.SGD(a.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=math.inf,
               sample_rate=q, n=n, delta=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=lr)
    for idx in poisson_batches(n, q, 6, seed=0):
        dp.step(lambda: F.cross_entropy(a(X[idx]), y[idx], reduction="none"), len(idx))
        opt_b.zero_grad()
        (F.cross_entropy(b(X[idx]), y[idx], reduction="sum") / (q * n)).backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-12)
    assert dp.epsilon() == math.inf and dp.steps == 6


@pytest.mark.parametrize("per_layer", [False, True])
def test_dpsgd_step_by_hand(per_layer):
    X, y = _data()
    q, lr, n, sigma, C, seed = 0.5, 0.2, len(y), 0.8, 0.5, 7
    model = _tiny()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    idx = torch.tensor([0, 2, 3, 7, 9])
    # hand: per-example gradients by a loop, Opacus clip factors, seeded noise, / (q n)
    summed = {k: torch.zeros_like(p) for k, p in before.items()}
    L = len(before)
    for e in idx.tolist():
        model.zero_grad()
        F.cross_entropy(model(X[e:e + 1]), y[e:e + 1]).backward()
        ge = {k: p.grad.clone() for k, p in model.named_parameters()}
        if per_layer:
            c = {k: min(1.0, (C / math.sqrt(L)) / (float(v.norm()) + 1e-6)) for k, v in ge.items()}
        else:
            tot = math.sqrt(sum(float(v.norm()) ** 2 for v in ge.values()))
            c = {k: min(1.0, C / (tot + 1e-6)) for k in ge}
        for k in ge:
            summed[k] += c[k] * ge[k]
    gen = torch.Generator().manual_seed(seed)
    expect = {k: before[k] - lr * (summed[k] + sigma * C * torch.randn(before[k].shape, generator=gen,
                                                                         dtype=torch.float64)) / (q * n)
              for k in before}
    model.zero_grad()
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=C,
               sample_rate=q, n=n, delta=1e-3, per_layer=per_layer, seed=seed)
    res = dp.step(lambda: F.cross_entropy(model(X[idx]), y[idx], reduction="none"), len(idx))
    assert res.norms.shape == (5,)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expect[k], rtol=0, atol=1e-12)
    assert dp.epsilon() == pytest.approx(epsilon(sigma, q, 1, 1e-3), rel=1e-12)


def test_dpsgd_empty_batch_adds_noise_and_counts():
    model = _tiny()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    q, n, sigma, C, lr = 0.1, 20, 1.3, 2.0, 0.5
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=C,
               sample_rate=q, n=n, delta=1e-3, seed=4)
    assert dp.step(lambda: pytest.fail("not called on an empty batch"), 0) is None
    gen = torch.Generator().manual_seed(4)
    for k, p in model.named_parameters():
        z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(p.detach(), before[k] - lr * sigma * C * z / (q * n), rtol=0, atol=1e-12)
    assert dp.steps == 1 and dp.accountant.history == [(sigma, q, 1)]


def test_parse_defence():
    assert parse_defence("dp:1.5") == ("dp", 1.5) and parse_defence("none") == ("none", None)
    for bad, msg in (("dp", "needs a number"), ("prune:2", "must be in"), ("noise:-1", "must be >= 0"),
                     ("foo:1", "unknown defence"), ("none:1", "takes no value"), ("dp:0", "must be > 0")):
        with pytest.raises(ValueError, match=msg):
            parse_defence(bad)


def test_train_digits_utility():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = utility_grid(["none", "dp:1.0"], seeds=(0,), epochs=8)
    none, dp = df.iloc[0], df.iloc[1]
    assert none["accuracy"] > 0.9 and none["epsilon"] == math.inf
    assert 0.5 < dp["accuracy"] and math.isfinite(dp["epsilon"]) and dp["steps"] == 8 * int(1 / 0.05)
    assert dp["epsilon"] == pytest.approx(epsilon(1.0, 0.05, int(dp["steps"]), 1e-5), rel=1e-12)


def test_train_digits_null_defences_equal_none():
    # the same seeded init and Poisson batches: noise 0 and pruning 0 reproduce "none" exactly
    base = train_digits("none", epochs=2)
    for d in ("noise:0", "prune:0"):
        r = train_digits(d, epochs=2)
        assert (r["accuracy"], r["train_accuracy"]) == (base["accuracy"], base["train_accuracy"])
    assert train_digits("noise:5", epochs=2)["accuracy"] < base["accuracy"]
