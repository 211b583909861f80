"""The training monitor's numbers are right: against hand computations, per-example loops, gradient
accumulation, a GradScaler, DDP with 2 ranks, torch.compile and HF Trainer's own logged grad_norm."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.train import Monitor, Thresholds, psr_nsr_terms
from gradsight.train import schema as S

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def _data(n=64, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _pivot(df, metric, layer=None):
    d = df[df.metric == metric]
    if layer is not None:
        d = d[d.layer == layer]
    return d.set_index(["step", "layer"])["value"].sort_index()


def _train(model, opt, mon, steps=8, micro=1, batch=16, clip=None, scaler=None, spike_at=(), seed=1):
    X, y = _data(steps * batch, seed=seed, dtype=next(model.parameters()).dtype)
    for s in range(steps):
        xb, yb = X[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
        for xm, ym in zip(xb.chunk(micro), yb.chunk(micro)):
            loss = nn.functional.cross_entropy(model(xm), ym) / micro
            mon.log_loss(loss * micro)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if s in spike_at:
            for p in model.parameters():
                p.grad.mul_(1000.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return mon.table()


# --- first-order set -----------------------------------------------------------------------------------------
def test_norms_clip_coefficient_and_update_ratio_equal_hand_computations():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, every={"per_example": None, "hist": None})
    X, y = _data(16)
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    pre = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    total = math.sqrt(sum(v * v for v in pre.values()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    post = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ratio = {n: (p.detach() - before[n]).norm().item() / before[n].norm().item() for n, p in model.named_parameters()}
    df = mon.table()
    for n in pre:
        assert _pivot(df, S.GRAD_NORM, n).iloc[0] == pytest.approx(pre[n], rel=1e-6)
        assert _pivot(df, S.GRAD_NORM_CLIPPED, n).iloc[0] == pytest.approx(post[n], rel=1e-6)
        assert _pivot(df, S.UPDATE_RATIO, n).iloc[0] == pytest.approx(ratio[n], rel=1e-6)
    assert _pivot(df, S.GRAD_NORM, S.MODEL).iloc[0] == pytest.approx(total, rel=1e-9)
    assert _pivot(df, S.CLIP_COEF, S.MODEL).iloc[0] == pytest.approx(0.1 / total, rel=1e-5)
    assert _pivot(df, S.LR, S.MODEL).iloc[0] == 0.1


def test_gradient_accumulation_gives_the_numbers_of_one_big_batch():
    runs = []
    for micro in (1, 4):
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = Monitor(model, opt, every={"per_example": None, "hist": None}, flush_every=3)
        runs.append(_train(model, opt, mon, micro=micro, clip=0.3))
    a, b = runs
    for metric in (S.GRAD_NORM, S.GRAD_NORM_CLIPPED, S.UPDATE_RATIO, S.CLIP_COEF, S.NORM_Z, S.LOSS):
        x, y = _pivot(a, metric), _pivot(b, metric)
        assert x.index.equals(y.index) and len(x) > 0, metric
        np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-9, atol=1e-12, err_msg=metric)


def test_grad_scaler_numbers_are_unscaled():
    runs = []
    for scaled in (False, True):
        model = _mlp(dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaled else None
        mon = Monitor(model, opt, scaler=scaler, every={"per_example": 2, "hist": None})
        runs.append(_train(model, opt, mon, clip=0.3, scaler=scaler))
    a, b = runs
    for metric in (S.GRAD_NORM, S.GRAD_NORM_CLIPPED, S.UPDATE_RATIO, S.TRACE_SIGMA, S.GRAD_SQ, S.PE_Q50):
        x, y = _pivot(a, metric), _pivot(b, metric)
        assert len(x) > 0 and x.index.equals(y.index), metric
        np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=2e-5, err_msg=metric)
    assert _pivot(b, S.LOSS_SCALE, S.MODEL).iloc[0] == 2.0 ** 12


def test_a_skipped_amp_step_is_recorded_with_its_nonfinite_layers():
    model = _mlp(dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    mon = Monitor(model, opt, scaler=scaler, every={"per_example": None, "hist": None})
    X, y = _data(8, dtype=torch.float32)
    for s in range(3):
        loss = nn.functional.cross_entropy(model(X), y)
        scaler.scale(loss).backward()
        if s == 1:
            model[0].weight.grad[0, 0] = float("inf")
            mon._pre = None  # the inf is injected after the backward: as if the backward had produced it
            mon._pre = torch.stack([p.grad.norm() for p in model.parameters()]) / 2.0 ** 8
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    df = mon.table()
    skipped = _pivot(df, S.SKIPPED, S.MODEL)
    assert skipped.tolist() == [0.0, 1.0, 0.0]
    bad = df[(df.metric == S.NONFINITE) & (df.step == 1) & (df.layer == "0.weight")]["value"]
    assert bad.iloc[0] == 1.0
    assert any(a["rule"] == S.RULE_NONFINITE and a["step"] == 1 and a["layer"] == "0.weight" for a in mon.alerts)


def test_injected_spikes_are_flagged_on_exactly_those_steps():
    model = _mlp(dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, every={"per_example": None, "hist": None}, flush_every=25)
    spikes = {40, 77, 93}
    _train(model, opt, mon, steps=100, batch=16, spike_at=spikes)
    flagged = {a["step"] for a in mon.alerts}
    assert flagged == spikes
    for rule in (S.RULE_SPAM, S.RULE_NORM_Z, S.RULE_MAXABS):
        assert {a["step"] for a in mon.alerts if a["rule"] == rule} == spikes, rule


def test_nonfinite_gradients_are_recorded_and_alerted_not_raised():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, every={"per_example": 1, "hist": None})
    X, y = _data(8)
    X[3, 0] = float("nan")
    loss = nn.functional.cross_entropy(model(X), y)
    mon.log_loss(loss)
    loss.backward()
    opt.step()
    df = mon.table()
    assert _pivot(df, S.NONFINITE, S.MODEL).iloc[0] == 4  # every tensor
    assert math.isnan(_pivot(df, S.LOSS, S.MODEL).iloc[0])
    assert {a["rule"] for a in mon.alerts} == {S.RULE_NONFINITE}


# --- per-example measures against a per-example loop -----------------------------------------------------------
def _per_example_reference(model, X, y):
    """Per-example gradients g_e of the mean batch loss scaled by B (their mean is the batch gradient)."""
    out = {}
    for n, p in model.named_parameters():
        if n.endswith(".weight"):
            out[n] = []
    for e in range(len(X)):
        model.zero_grad()
        nn.functional.cross_entropy(model(X[e:e + 1]), y[e:e + 1]).backward()
        for n, p in model.named_parameters():
            if n in out:
                out[n].append(p.grad.detach().clone().flatten())
    model.zero_grad()
    return {n: torch.stack(v) for n, v in out.items()}


def test_per_example_norms_and_noise_scale_equal_a_per_example_loop():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    X, y = _data(12)
    ref = _per_example_reference(model, X, y)  # before the monitor is attached (it would see these backwards)
    mon = Monitor(model, opt, every={"per_example": 1, "gsnr": 1, "hist": None},
                  thresholds=Thresholds(noise_ema=0.0))
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    df = mon.table()
    B = len(X)
    total = sum(g.pow(2).sum(1) for g in ref.values()).sqrt()
    q = torch.quantile(total, torch.tensor([0.1, 0.5, 0.9], dtype=total.dtype))
    for metric, v in zip((S.PE_Q10, S.PE_Q50, S.PE_Q90), q):
        assert _pivot(df, metric, S.MODEL).iloc[0] == pytest.approx(float(v), rel=1e-9)
    for n, g in ref.items():
        mean = g.mean(0)
        S_true = g.var(0, unbiased=True).sum()  # the unbiased trace of the covariance
        G_true = mean.pow(2).sum() - S_true / B  # unbiased |G|^2
        assert _pivot(df, S.TRACE_SIGMA, n).iloc[0] == pytest.approx(float(S_true), rel=1e-9)
        assert _pivot(df, S.GRAD_SQ, n).iloc[0] == pytest.approx(float(G_true), rel=1e-9)
        assert _pivot(df, S.NOISE_SCALE, n).iloc[0] == pytest.approx(float(S_true / G_true), rel=1e-9)
        var = g.var(0, unbiased=False)
        gsnr = (mean.pow(2) / (var + 1e-5)).mean()
        assert _pivot(df, S.GSNR, n).iloc[0] == pytest.approx(float(gsnr), rel=1e-9)


def test_noise_scale_known_answer_and_padding_invariance():
    """[1,3,1,3] per-example gradients with B=4 -> |G|^2 = 11/3, tr Sigma = 4/3, B_simple = 4/11; and the tiny
    LM's per-example numbers do not depend on padding."""
    lin = nn.Linear(1, 1, bias=False).double()
    lin.weight.data.fill_(1.0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    mon = Monitor(lin, opt, every={"per_example": 1, "hist": None}, thresholds=Thresholds(noise_ema=0.0))
    x = torch.tensor([[1.0], [3.0], [1.0], [3.0]], dtype=torch.float64)
    lin(x).mean().backward()  # d/dw of w*x_e = x_e: per-example gradients 1, 3, 1, 3
    opt.step()
    df = mon.table()
    assert _pivot(df, S.GRAD_SQ, "weight").iloc[0] == pytest.approx(11 / 3, rel=1e-12)
    assert _pivot(df, S.TRACE_SIGMA, "weight").iloc[0] == pytest.approx(4 / 3, rel=1e-12)
    assert _pivot(df, S.NOISE_SCALE, "weight").iloc[0] == pytest.approx(4 / 11, rel=1e-12)


def test_tiny_lm_per_example_norms_ignore_padding():
    from helpers import tiny_model

    model = tiny_model(dtype=torch.float64)
    model.config._attn_implementation = "eager"
    model.train()
    for m in model.modules():
        if hasattr(m, "p") and isinstance(m, nn.Dropout):
            m.p = 0.0
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    lens = [9, 6, 4]

    def run(pad_to):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        mon = Monitor(model, opt, every={"per_example": 1, "hist": None}, layers=r"mlp\.down_proj",
                      thresholds=Thresholds(noise_ema=0.0))
        x = torch.zeros(3, pad_to, dtype=torch.long)
        mask = torch.zeros(3, pad_to, dtype=torch.long)
        labels = torch.full((3, pad_to), -100)
        for i, n in enumerate(lens):
            x[i, :n], mask[i, :n], labels[i, :n] = ids[i, :n], 1, ids[i, :n]
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        mon.close()
        return mon.table()

    a, b = run(9), run(14)
    for metric in (S.PE_Q50, S.PE_MAX, S.TRACE_SIGMA):
        np.testing.assert_allclose(_pivot(a, metric).to_numpy(), _pivot(b, metric).to_numpy(), rtol=1e-9)


def test_named_terms_give_the_cosines_of_their_gradients():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, every={"terms": 1, "per_example": None, "hist": None})
    X, y = _data(16)
    out = model(X)
    la = nn.functional.cross_entropy(out[:8], y[:8])
    lb = nn.functional.cross_entropy(out[8:], (y[8:] + 1) % 3)
    got = mon.terms({"a": la, "b": lb})
    ga = torch.cat([g.flatten() for g in torch.autograd.grad(la, list(model.parameters()), retain_graph=True)])
    gb = torch.cat([g.flatten() for g in torch.autograd.grad(lb, list(model.parameters()), retain_graph=True)])
    cos = float(ga @ gb / (ga.norm() * gb.norm()))
    assert got["cos"][("a", "b")] == pytest.approx(cos, rel=1e-9)
    (la + lb).backward()
    opt.step()
    df = mon.table()
    assert _pivot(df, "cos:a|b", S.MODEL).iloc[0] == pytest.approx(cos, rel=1e-9)
    w = model[0].weight
    ga0, gb0 = torch.autograd.grad(nn.functional.cross_entropy(model(X)[:8], y[:8]), w)[0], None
    assert _pivot(df, "term_norm:a", "0.weight").iloc[0] > 0
    logps = torch.randn(6, dtype=torch.float64, requires_grad=True)
    t = psr_nsr_terms(logps, torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5, 1.0]))
    assert set(t) == {"psr", "nsr"} and t["psr"].requires_grad
    with pytest.raises(ValueError, match="positive and with negative"):
        psr_nsr_terms(logps, torch.ones(6))


# --- integrations of the runtime -----------------------------------------------------------------------------
def test_torch_compile_keeps_the_numbers(tmp_path):
    runs = []
    for compiled in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon = Monitor(model, opt, every={"per_example": None, "hist": None})
        net = torch.compile(model, backend="aot_eager") if compiled else model
        X, y = _data(16)
        for _ in range(3):
            nn.functional.cross_entropy(net(X), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(mon.table())
    for metric in (S.GRAD_NORM, S.UPDATE_RATIO):
        np.testing.assert_allclose(_pivot(runs[0], metric).to_numpy(), _pivot(runs[1], metric).to_numpy(),
                                   rtol=1e-10)


@pytest.mark.slow
def test_ddp_and_fsdp2_with_two_gloo_ranks_equal_one_process(tmp_path):
    """DDP (read after the all-reduce) and FSDP2 (DTensor shards: full-tensor norms) on 2 ranks, each with half
    of every global batch, give the numbers of one process on the whole batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(Path(__file__).parent / "train_ddp_script.py")
    p = subprocess.run([sys.executable, script, str(tmp_path / "one")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "one" / "rows.parquet")
    torchrun = Path(sys.executable).parent / "torchrun"
    for mode in ("ddp", "fsdp"):
        p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", script, str(tmp_path / mode),
                            mode], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        b = pd.read_parquet(tmp_path / mode / "rows.parquet")
        for metric in (S.GRAD_NORM, S.GRAD_NORM_CLIPPED, S.UPDATE_RATIO, S.CLIP_COEF, S.LOSS, S.NORM_Z, S.MAXABS):
            x, y = _pivot(a, metric), _pivot(b, metric)
            assert len(x) > 0 and x.index.equals(y.index), (mode, metric)
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{mode} {metric}")


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="unknown measure"):
        Monitor(model, every={"norm": 1})
    with pytest.raises(ValueError, match="makes no sense"):
        Monitor(model, every={"norms": -3})
    with pytest.raises(ValueError, match="not a schedule"):
        Monitor(model, every={"norms": "sometimes"})
    with pytest.raises(ValueError, match="flush_every"):
        Monitor(model, flush_every=0)
    with pytest.raises(ValueError, match="needs loss_fn"):
        Monitor(model, every={"sharpness": 10})
    with pytest.raises(ValueError, match="needs the optimizer"):
        Monitor(model, every={"update": 1})
    with pytest.raises(ValueError, match="no trainable parameter"):
        Monitor(model, params="nothing-matches")
    mon = Monitor(model, every={"per_example": None})
    with pytest.raises(ValueError, match="scalar"):
        mon.terms({"a": torch.ones(3, requires_grad=True)}, force=True)
    mon.remove()


def test_schedules():
    from gradsight.train import Schedule

    assert [s for s in range(20) if Schedule.of("log")(s)] == [0, 1, 2, 4, 8, 16]
    assert [s for s in range(0, 3001, 500) if Schedule.of("log")(s)] == [0, 1000, 2000, 3000]
    assert [s for s in range(7) if Schedule.of(3)(s)] == [0, 3, 6]
    assert not any(Schedule.of(None)(s) for s in range(5))
    assert [s for s in range(6) if Schedule.of(lambda s: s % 5 == 4)(s)] == [4]


def test_monitor_sharpness_equals_the_dense_hessian_and_softmax_collapse_is_recorded():
    model = _mlp()
    X, y = _data(32)
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    shapes = [p.shape for p in params]

    def f(v):
        out, i = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            out.append(v[i:i + n].view(s))
            i += n
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(
            [n for n, _ in model.named_parameters()], out)), (X,)), y)

    lmax = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat))[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = Monitor(model, opt, loss_fn=loss_fn, probe=(X, y), every={"sharpness": 5, "softmax": 1,
                                                                     "per_example": None, "hist": None})
    for _ in range(6):
        loss = loss_fn(model, (X, y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    df = mon.table()
    sharp = _pivot(df, S.SHARPNESS, S.MODEL)
    assert list(sharp.index.get_level_values(0)) == [0, 5]
    assert sharp.iloc[0] == pytest.approx(lmax, rel=1e-3)
    assert _pivot(df, S.SHARPNESS_THRESHOLD, S.MODEL).iloc[0] == pytest.approx(2 / 0.05)
    sc = _pivot(df, S.SC_FP32, S.MODEL)
    assert len(sc) == 6 and (sc == 0).all()  # healthy logits: no row collapses


def test_dpo_terms_entanglement_is_the_cosine_of_chosen_and_rejected_gradients():
    from gradsight.train import dpo_terms

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, every={"terms": 1, "per_example": None, "hist": None})
    X, y = _data(8)
    logp = torch.log_softmax(model(X), -1)
    chosen, rejected = logp[torch.arange(8), y], logp[torch.arange(8), (y + 1) % 3]
    got = mon.terms(dpo_terms(chosen, rejected))
    gc = torch.cat([g.flatten() for g in torch.autograd.grad(chosen.sum(), list(model.parameters()),
                                                             retain_graph=True)])
    gr = torch.cat([g.flatten() for g in torch.autograd.grad(rejected.sum(), list(model.parameters()),
                                                             retain_graph=True)])
    assert got["cos"][("chosen", "rejected")] == pytest.approx(float(gc @ gr / (gc.norm() * gr.norm())), rel=1e-9)
    with pytest.raises(ValueError, match="pair up"):
        dpo_terms(chosen, rejected[:3])
    mon.remove()


def test_microbatch_cosines_equal_the_cosine_of_the_two_halves():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, every={"microbatch": 1, "per_example": None, "hist": None})
    X, y = _data(16)
    halves = [(X[:8], y[:8]), (X[8:], (y[8:] + 1) % 3)]
    want = []
    for xb, yb in halves:
        want.append(torch.cat([g.flatten() for g in torch.autograd.grad(
            nn.functional.cross_entropy(model(xb), yb) / 2, list(model.parameters()))]))
    for xb, yb in halves:
        (nn.functional.cross_entropy(model(xb), yb) / 2).backward()
    opt.step()
    df = mon.table()
    cos = float(want[1] @ want[0] / (want[0].norm() * want[1].norm()))
    assert _pivot(df, "cos:microbatch|earlier", S.MODEL).iloc[0] == pytest.approx(cos, rel=1e-9)
    assert len(_pivot(df, "cos:microbatch|earlier")) == 5  # 4 tensors + model-wide


def test_spam_keeps_training_finite_through_x1000_spikes_that_the_monitor_flags_exactly():
    """The experiment of the issue: x1000 gradient spikes on 3 of 200 steps (the loss is scaled, so the spike
    comes out of the backward). Plain AdamW ends far from the spike-free run; AdamW wrapped with SPAM ends
    close to it; the monitor (attached before the transforms, so it sees the raw gradients) flags exactly the
    spike steps with all three rules."""
    import gradsight.transforms as gt

    spikes = {30, 97, 151}

    def run(spam: bool, inject: bool, seed: int = 0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        mon = Monitor(model, opt, every={"per_example": None, "hist": None}, flush_every=50)
        if spam:
            gt.wrap(opt, gt.spam(), model)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(2048, 5, generator=g)
        y = (X @ torch.randn(5, 1, generator=g)).tanh()
        for s in range(200):
            i = torch.randint(0, 2048, (32,), generator=g)
            loss = nn.functional.mse_loss(model(X[i]), y[i])
            (loss * (1000.0 if inject and s in spikes else 1.0)).backward()
            opt.step()
            opt.zero_grad()
        mon.close()
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(X), y)), mon.alerts

    clean, _ = run(False, False)
    plain, alerts = run(False, True)
    spam, spam_alerts = run(True, True)
    assert math.isfinite(spam) and spam < 1.5 * clean and plain > 2 * clean, (clean, plain, spam)
    for rule in (S.RULE_SPAM, S.RULE_NORM_Z, S.RULE_MAXABS):
        assert {a["step"] for a in spam_alerts if a["rule"] == rule} == spikes, rule
    # plain AdamW: the same, except that its disturbed trajectory may move a layer's norm for real afterwards
    for rule in (S.RULE_SPAM, S.RULE_MAXABS):
        assert {a["step"] for a in alerts if a["rule"] == rule} == spikes, rule
    assert spikes <= {a["step"] for a in alerts if a["rule"] == S.RULE_NORM_Z}
