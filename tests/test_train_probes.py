"""Known-answer and dense-reference tests of gradsight.train.probes (sharpness, stability thresholds, softmax
collapse), plus a small edge-of-stability run of full-batch GD on a tanh MLP."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradsight.train.probes import (
    SharpnessProbe,
    SoftmaxCollapseProbe,
    adam_preconditioner,
    softmax_collapse,
    stability_threshold,
    zero_loss_fraction,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------------
# helpers


class Quadratic(nn.Module):
    """L(x) = 0.5 x^T diag(h) x, h passed as the batch."""

    def __init__(self, x0):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(x0, dtype=F64).clone())


def quad_loss(m, h):
    return 0.5 * (h * m.x * m.x).sum()


def mlp(seed=0, d=4, width=16, out=3, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, width), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out)]
    return nn.Sequential(*layers).to(F64)


def ce_loss(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y)


def data(n=64, d=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def dense_hessian(model, loss_fn, batch):
    """Reference: the (P, P) Hessian of loss_fn over all trainable parameters by torch.autograd.functional."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    was = model.training
    model.eval()

    def f(theta):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = theta[i:i + k].view(s)
            i += k

        return loss_fn(_Wrap(model, ps), batch)

    H = torch.autograd.functional.hessian(f, flat)
    model.train(was)
    return H


class _Wrap:
    """Calls `model` with the parameters in `ps` (functional_call), so loss_fn(m, b) can call m(x)."""

    def __init__(self, model, ps):
        self.model, self.ps = model, ps

    def __call__(self, x):
        return functional_call(self.model, self.ps, (x,))


# ------------------------------------------------------------------------------------------------------------
# sharpness: known answers


def test_quadratic_lmax_known_answer():
    model = Quadratic([1.0, -2.0, 0.5])
    r = SharpnessProbe(model, quad_loss, torch.tensor([1.0, 4.0, 9.0], dtype=F64)).measure()
    assert abs(r["lmax"] - 9.0) < 1e-4
    assert math.isnan(r["threshold"]) and math.isnan(r["ratio"])
    assert r["converged"] and r["hvps"] <= 3


@pytest.mark.parametrize("lr, threshold, diverges", [(0.25, 8.0, True), (0.2, 10.0, False)])
def test_gd_on_quadratic_diverges_iff_lmax_above_threshold(lr, threshold, diverges):
    h = torch.tensor([1.0, 4.0, 9.0], dtype=F64)
    model = Quadratic([1.0, 1.0, 1.0])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    info = stability_threshold(opt)
    assert info["kind"] == "gd" and not info["preconditioned"]
    assert info["threshold"] == pytest.approx(threshold, rel=1e-12)
    probe = SharpnessProbe(model, quad_loss, h)
    r = probe.measure(opt)
    assert r["ratio"] == pytest.approx(9.0 / threshold, rel=1e-5)
    for _ in range(200):
        opt.zero_grad()
        quad_loss(model, h).backward()
        opt.step()
    norm = float(model.x.detach().norm())
    assert (norm > 1e3) if diverges else (norm < 1e-3)
    assert (r["ratio"] > 1) == diverges


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.5, dampening=0.5),
                                dict(momentum=0.9, nesterov=True), dict(momentum=0.3, nesterov=True)],
                         ids=["heavy_ball", "dampened", "nesterov", "nesterov_0.3"])
@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_momentum_thresholds_match_torch_sgd_dynamics(kw, factor):
    """torch.optim.SGD on 0.5 lam x^2 diverges iff lam exceeds the threshold (lam = factor * threshold)."""
    lr = 0.1
    x = torch.ones(1, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr, **kw)
    info = stability_threshold(opt)
    assert info["kind"] == "momentum" and info["beta"] == kw["momentum"]
    lam = factor * info["threshold"]
    for _ in range(300):
        x.grad = lam * x.detach()  # the gradient of 0.5 lam x^2
        opt.step()
    size = abs(float(x.detach()))
    assert (size > 1e3) if factor > 1 else (size < 1e-3)


def test_stability_threshold_values_and_errors():
    p = [torch.zeros(2, requires_grad=True)]
    assert stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9))["threshold"] == pytest.approx(38.0)
    assert stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))["threshold"] == \
        pytest.approx(3.8 / 2.8 / 0.1)
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        info = stability_threshold(cls(p, lr=1e-3, betas=(0.9, 0.999)))
        assert info["kind"] == "adam" and info["preconditioned"] and info["beta"] == 0.9
        assert info["threshold"] == pytest.approx(38.0 / 1e-3, rel=1e-12)
    with pytest.raises(ValueError, match="RMSprop"):
        stability_threshold(torch.optim.RMSprop(p, lr=0.1))
    custom = stability_threshold(torch.optim.RMSprop(p, lr=0.1), threshold=5.0)
    assert custom["kind"] == "custom" and custom["threshold"] == 5.0 and custom["lr"] == pytest.approx(0.1)
    q = [torch.zeros(2, requires_grad=True)]
    two = torch.optim.SGD([{"params": p, "lr": 0.1}, {"params": q, "lr": 0.2}])
    with pytest.raises(ValueError, match="differ in 'lr'"):
        stability_threshold(two)
    assert stability_threshold(two, group=1)["threshold"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="threshold"):
        stability_threshold(None)


# ------------------------------------------------------------------------------------------------------------
# Adam preconditioner


@pytest.mark.parametrize("cls, kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, dict(weight_decay=0.0)),
                                     (torch.optim.Adam, dict(amsgrad=True)), (torch.optim.Adam, dict(eps=1e-3))])
def test_adam_preconditioner_reproduces_the_update(cls, kw):
    """theta_{t} - theta_{t-1} == -lr * exp_avg / P with P from the state after the step (float64, exact)."""
    model = mlp()
    batch = data()
    opt = cls(model.parameters(), lr=1e-2, betas=(0.8, 0.95), **kw)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="no Adam state"):
        adam_preconditioner(opt, params)
    for _ in range(4):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()
        P = adam_preconditioner(opt, params)
        for p, b, Pi in zip(params, before, P):
            expected = -1e-2 * opt.state[p]["exp_avg"] / Pi
            torch.testing.assert_close(p.detach() - b, expected, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="not managed"):
        adam_preconditioner(opt, [torch.zeros(2)])
    with pytest.raises(ValueError, match="SGD"):
        adam_preconditioner(torch.optim.SGD(params, lr=0.1), params)


# ------------------------------------------------------------------------------------------------------------
# sharpness: dense references, warm start, state hygiene


def test_lmax_matches_dense_eigvalsh():
    model, batch = mlp(), data()
    assert sum(p.numel() for p in model.parameters()) < 2000
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()
    H = dense_hessian(model, ce_loss, batch)
    ref = float(torch.linalg.eigvalsh(H)[-1])
    r = SharpnessProbe(model, ce_loss, batch).measure(opt)
    assert abs(r["lmax"] - ref) / abs(ref) < 1e-3
    assert r["threshold"] == pytest.approx(4.0)
    assert r["ratio"] == pytest.approx(r["lmax"] / 4.0)


def test_preconditioned_lmax_matches_dense_eigvalsh():
    model, batch = mlp(seed=3), data(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        ce_loss(model, batch).backward()
        opt.step()
    H = dense_hessian(model, ce_loss, batch)
    d = torch.cat([P.reshape(-1) for P in adam_preconditioner(opt, list(model.parameters()))]).rsqrt()
    ref = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
    raw = float(torch.linalg.eigvalsh(H)[-1])
    probe = SharpnessProbe(model, ce_loss, batch)
    r = probe.measure(opt)
    assert r["preconditioned"] and r["kind"] == "adam"
    assert abs(r["lmax"] - ref) / abs(ref) < 1e-3
    assert abs(ref - raw) / raw > 10  # the preconditioned value is a different number altogether
    assert r["threshold"] == pytest.approx(38.0 / 1e-2)
    plain = SharpnessProbe(model, ce_loss, batch, precondition=False).measure(opt)
    assert abs(plain["lmax"] - raw) / raw < 1e-3 and math.isnan(plain["threshold"])
    with pytest.raises(ValueError, match="precondition=True"):
        SharpnessProbe(model, ce_loss, batch, precondition=True).measure(torch.optim.SGD(model.parameters(), lr=1))


def test_warm_start_needs_clearly_fewer_hvps():
    model, batch = mlp(seed=1, d=8, width=24, out=5), data(n=128, d=8, classes=5, seed=2)  # 941 parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = SharpnessProbe(model, ce_loss, batch)
    first = probe.measure(opt)
    opt.zero_grad()
    ce_loss(model, batch).backward()
    opt.step()  # nearly the same parameters
    warm = probe.measure(opt)
    cold = SharpnessProbe(model, ce_loss, batch).measure(opt)
    assert not first["warm"] and warm["warm"] and not cold["warm"]
    assert warm["hvps"] * 2 <= cold["hvps"], (warm["hvps"], cold["hvps"])  # measured: 5 vs 17
    assert warm["lmax"] == pytest.approx(cold["lmax"], rel=1e-5)
    assert probe.total_hvps == first["hvps"] + warm["hvps"]
    probe.reset()
    assert probe.measure(opt)["hvps"] == cold["hvps"]  # reset: the same seeded cold start


def test_probe_leaves_grads_flags_and_mode_untouched():
    model, batch = mlp(seed=7, dropout=0.5), data(seed=8)
    model.train()
    model[-1].bias.requires_grad_(False)  # a frozen parameter: outside the default block
    ce_loss(model, batch).backward()
    model[0].bias.grad = None  # one trainable parameter without a gradient
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eval-mode warning either
        probe = SharpnessProbe(model, ce_loss, batch)
        with torch.no_grad():  # a monitor may call it from a no_grad region
            r1 = probe.measure(opt)
    for n, p in model.named_parameters():
        g, saved = grads[n]
        assert p.grad is g, n
        if g is not None:
            assert torch.equal(p.grad, saved), n
        assert p.requires_grad == flags[n], n
    assert [m.training for m in model.modules()] == modes and model.training
    assert probe.dim == sum(p.numel() for p in model.parameters()) - model[-1].bias.numel()
    # eval mode: dropout off, so the value is deterministic and equals the dense eval-mode Hessian's
    probe.reset()
    assert probe.measure(opt)["lmax"] == r1["lmax"]
    H = dense_hessian(model, ce_loss, batch)
    assert abs(r1["lmax"] - float(torch.linalg.eigvalsh(H)[-1])) / abs(r1["lmax"]) < 1e-3
    # the block given as parameter tensors (what a monitor holds) is the same block
    same = SharpnessProbe(model, ce_loss, batch, params=[p for p in model.parameters() if p.requires_grad])
    assert same.measure(opt)["lmax"] == pytest.approx(r1["lmax"], rel=1e-10)


def test_probe_argument_errors():
    model, batch = mlp(), data()
    with pytest.raises(ValueError, match="scalar"):
        SharpnessProbe(model, lambda m, b: m(b[0]), batch).measure()
    with pytest.raises(ValueError, match="iters"):
        SharpnessProbe(model, ce_loss, batch, iters=0)
    with pytest.raises(ValueError, match="not a parameter"):
        SharpnessProbe(model, ce_loss, batch, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="no Adam state"):
        SharpnessProbe(model, ce_loss, batch).measure(torch.optim.Adam(model.parameters()))


# ------------------------------------------------------------------------------------------------------------
# softmax collapse


def test_softmax_collapse_known_answers():
    collapsed = torch.tensor([[0.0] + [-30.0] * 112])  # 1 + 112 e^-30 = 1 + 1.05e-11
    assert softmax_collapse(collapsed) == 1.0
    assert softmax_collapse(collapsed, dtype=F64) == 0.0
    assert softmax_collapse(collapsed, dtype=torch.bfloat16) == 1.0
    gap10 = torch.tensor([[0.0, -10.0]])  # 1 + 4.5e-5: exact in fp32/fp64, rounds to 1 in bf16 (ulp 2^-7)
    assert softmax_collapse(gap10) == 0.0 and softmax_collapse(gap10, dtype=F64) == 0.0
    assert softmax_collapse(gap10, dtype=torch.bfloat16) == 1.0
    gap3 = torch.tensor([[0.0, -3.0]])  # 1 + 0.0498 survives even bf16
    assert softmax_collapse(gap3, dtype=torch.bfloat16) == 0.0
    # rows are the last dim; (B, T, C) flattened; a shift of all logits changes nothing
    z = torch.stack([torch.cat([collapsed, torch.tensor([[0.0] * 113])]), torch.cat([collapsed, collapsed])]) + 7.0
    assert z.shape == (2, 2, 113)
    assert softmax_collapse(z) == 0.75
    assert softmax_collapse(z, mask=torch.tensor([[False, True], [False, False]])) == 0.0
    assert math.isnan(softmax_collapse(z, mask=torch.zeros(2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="mask"):
        softmax_collapse(z, mask=torch.ones(3, dtype=torch.bool))


def test_zero_loss_fraction_known_answers():
    z = torch.tensor([[0.0] + [-30.0] * 112] * 3)
    y = torch.tensor([0, 1, -100])  # exact zero loss / loss 30 / ignored
    assert zero_loss_fraction(z, y) == 0.5
    assert zero_loss_fraction(z, y, dtype=F64) == 0.0  # loss 1.05e-11
    assert zero_loss_fraction(z, torch.tensor([0, 0, 0]), mask=torch.tensor([True, False, True])) == 1.0
    assert math.isnan(zero_loss_fraction(z, torch.full((3,), -100)))
    with pytest.raises(ValueError, match="targets"):
        zero_loss_fraction(z, torch.tensor([0, 1]))


def test_softmax_collapse_probe_hook():
    torch.manual_seed(0)
    head = nn.Linear(8, 50)
    with torch.no_grad():
        head.weight.mul_(40.0)  # large logits: part of the rows collapse
    h = torch.randn(4, 300, 8)
    with SoftmaxCollapseProbe(head, max_rows=10_000) as probe:
        assert probe.read() == {}
        out = head(h)  # not armed: nothing recorded
        assert probe.read() == {}
        y = out.argmax(-1)
        y[0, :10] = -100
        probe.arm(targets=y)
        out2 = head(h)
        torch.testing.assert_close(out2, out)  # the hook never changes the output
        head(h)  # disarmed after one forward
        got = probe.read()
        keep = y != -100
        assert got["rows"] == got["rows_total"] == 1190
        assert got["fp32"] == pytest.approx(softmax_collapse(out, mask=keep), abs=1e-12)
        assert got["bf16"] == pytest.approx(softmax_collapse(out, torch.bfloat16, mask=keep), abs=1e-12)
        assert got["zero_loss"] == pytest.approx(zero_loss_fraction(out, y), abs=1e-12)
        assert 0.0 < got["fp32"] < got["bf16"] < 1.0 and got["zero_loss"] > 0
        assert probe.read() == {}  # read clears
        # causal shift: logits at t against labels at t + 1
        probe.arm(targets=y, shift=True)
        head(h)
        shifted = probe.read()
        assert shifted["zero_loss"] == pytest.approx(zero_loss_fraction(out[:, :-1], y[:, 1:]), abs=1e-12)
        # the backward pass through a measured forward is unaffected
        head.zero_grad()
        probe.arm()
        head(h).square().mean().backward()
        assert head.weight.grad is not None and "zero_loss" not in probe.read()
    assert not head._forward_hooks  # removed on exit


def test_softmax_collapse_probe_samples_rows_and_keeps_no_logits():
    half = torch.cat([torch.tensor([[0.0] + [-30.0] * 9]).expand(500, 10), torch.zeros(500, 10)])  # 50% collapsed

    class Emit(nn.Module):
        def forward(self, x):
            return half * x

    m = Emit()
    probe = SoftmaxCollapseProbe(m, max_rows=400, seed=1, chunk_rows=64)
    probe.arm()
    out = m(torch.ones(()))
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None  # the probe does not hold the logits
    got = probe.read()
    assert got["rows"] == 400 and got["rows_total"] == 1000
    assert 0.4 < got["fp32"] < 0.6  # a random sample (hypergeometric sd 0.019), not the first 400 rows (= 1.0)
    probe.arm()
    m(torch.ones(()))
    assert probe.read()["fp32"] != got["fp32"]  # the sampler advances: a new sample each time
    probe.remove()
    probe.arm()
    m(torch.ones(()))
    assert probe.read() == {}
    with pytest.raises(ValueError, match="max_rows"):
        SoftmaxCollapseProbe(m, max_rows=0)


# ------------------------------------------------------------------------------------------------------------
# edge of stability (Cohen et al. 2021): progressive sharpening, then sharpness hovering at 2 / lr


def test_gd_edge_of_stability_plateau():
    n, d, width, lr, steps, every = 200, 8, 32, 0.3, 1200, 20
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, generator=g, dtype=F64)
    Y = torch.sign(torch.sin(2 * X @ w / math.sqrt(d)))[:, None]  # (n, 1) targets +-1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 1)).to(F64)

    def mse(m, b):
        return 0.5 * (m(b[0]) - b[1]).pow(2).sum(-1).mean()

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = SharpnessProbe(model, mse, (X, Y))
    trace = []  # (step, ratio, hvps)
    for step in range(steps + 1):
        if step % every == 0:
            r = probe.measure(opt)
            trace.append((step, r["ratio"], r["hvps"]))
        opt.zero_grad()
        mse(model, (X, Y)).backward()
        opt.step()
    ratios = [q for _, q, _ in trace]
    plateau = [q for s, q, _ in trace if s >= 500]
    assert trace[0][2] > 2 * max(h for s, _, h in trace if s >= 500)  # warm starts: cold probe vs the rest
    assert ratios[0] < 0.5  # starts well below 2 / lr
    assert max(ratios[: len(ratios) // 3]) > 0.85  # progressive sharpening up to the threshold
    assert all(0.8 < q < 1.2 for q in plateau), plateau  # then hovers at 2 / lr (+-20%)
    assert abs(sum(plateau) / len(plateau) - 1.0) < 0.05
