"""gradsight.transforms: known answers from the anchors (monitor-transforms §2.7-2.11, METHODS §11), the
combinators, wrap(), and equivalence with pytorch-optimizer's SPAM / StableSPAM / OrthoGrad."""

import copy
import io
import math

import pytest
import torch

import gradsight.transforms as gt
from gradsight.transforms import Context

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


def run(tx, grads, params=None, ctx=None, state=None):
    state = tx.init(params if params is not None else grads) if state is None else state
    return tx.update(grads, state, params, ctx)


# ------------------------------------------------------------------------------------------- clipping

def test_global_clip_known_answer_and_coef():
    ctx = Context()
    out, _ = run(gt.clip_by_global_norm(1.0), {"a": t(3.0), "b": t(4.0)}, ctx=ctx)
    assert close(torch.cat([out["a"], out["b"]]), [0.6, 0.8])
    assert close(ctx.stats["clip_by_global_norm"]["norm"], 5.0)
    assert close(ctx.stats["clip_by_global_norm"]["coef"], 0.2)
    out, _ = run(gt.clip_by_global_norm(10.0), {"a": t(3.0, 4.0)})           # under the bound: unchanged
    assert torch.equal(out["a"], t(3.0, 4.0))


def test_per_layer_clip_uniform_and_dim_split():
    out, st = run(gt.clip_per_layer(1.0), {"A": t(3.0, 0.0), "B": t(0.0, 4.0)})
    assert close(out["A"].norm(), 0.7071068) and close(out["B"].norm(), 0.7071068)
    assert close(sum(c ** 2 for c in st["max_norms"].values()), 1.0)
    out, _ = run(gt.clip_per_layer(1.0), {"A": t(0.1, 0.0), "B": t(0.0, 4.0)})
    assert close(out["A"], [0.1, 0.0]) and close(out["B"].norm(), 0.7071068)   # A is not scaled up
    # dim split: D_A = 1, D_B = 3 -> C_A = sqrt(1/4) = 0.5, C_B = sqrt(3/4); bounds add up to C^2 in squares
    out, st = run(gt.clip_per_layer(1.0, split="dim"), {"A": t(3.0), "B": t(0.0, 0.0, 4.0)})
    assert close(out["A"], [0.5]) and close(out["B"], [0.0, 0.0, math.sqrt(0.75)])
    assert close(sum(c ** 2 for c in st["max_norms"].values()), 1.0)


def test_agc_known_answers_and_units():
    W = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    G = torch.tensor([[0.3, 0.4], [0.3, 0.4], [1e-4, 0.0]])
    b, gb = t(3.0, 4.0), t(1.0, 0.0)               # a bias is ONE unit: norm 5, bound 0.05
    out, _ = run(gt.adaptive_grad_clip(0.01), {"W": G.clone(), "b": gb.clone()}, params={"W": W, "b": b})
    assert close(out["W"][0], [0.03, 0.04], 1e-8)
    assert close(out["W"][1], [6e-6, 8e-6], 1e-10)   # zero row: bound lambda * eps = 1e-5
    assert close(out["W"][2], [1e-4, 0.0], 1e-10)   # under its bound: unchanged
    assert close(out["b"], [0.05, 0.0], 1e-8)


def test_normalize_and_trust_ratio():
    out, _ = run(gt.normalize_per_layer(), {"a": t(3.0, 4.0), "z": t(0.0, 0.0)})
    assert close(out["a"], [0.6, 0.8]) and torch.equal(out["z"], t(0.0, 0.0))
    params = {"a": t(0.0, 10.0), "z": t(0.0, 0.0)}
    out, _ = run(gt.trust_ratio(), {"a": t(3.0, 4.0), "z": t(1.0, 0.0)}, params=params)
    assert close(out["a"], [6.0, 8.0]) and close(out["z"], [1.0, 0.0])   # ||w|| = 0 -> ratio 1


def test_noise_schedule_std_and_reproducible_state():
    assert close(gt.noise_std(0.01, 0.55, 0), 0.1, 1e-12)
    assert close(gt.noise_std(0.01, 0.55, 1), 0.0826, 1e-4)
    assert close(gt.noise_std(0.01, 0.55, 99), 0.0282, 1e-4)
    tx = gt.add_noise(0.01, 0.55, seed=3)
    g = {"w": torch.zeros(1_000_000)}
    st = tx.init(g)
    out, st = tx.update(g, st)
    assert abs(out["w"].std().item() / 0.1 - 1) < 0.01
    st99 = {**st, "count": 99}
    out, _ = tx.update({"w": torch.zeros(1_000_000)}, st99)
    assert abs(out["w"].std().item() / gt.noise_std(0.01, 0.55, 99) - 1) < 0.01
    # same seed and state after a save/load round trip => the same noise
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    a, _ = tx.update({"w": torch.zeros(10)}, st)
    b, _ = tx.update({"w": torch.zeros(10)}, loaded)
    c, _ = tx.update({"w": torch.zeros(10)}, tx.init(g))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_orthograd_known_answer():
    out, _ = run(gt.orthograd(), {"w": t(1.0, 1.0)}, params={"w": t(1.0, 0.0)})
    assert close(out["w"], [0.0, math.sqrt(2)])
    out, _ = run(gt.orthograd(), {"w": t(2.0, 0.0)}, params={"w": t(1.0, 0.0)})   # parallel: zero, not noise
    assert torch.equal(out["w"], t(0.0, 0.0))


# ------------------------------------------------------------------------------------------- SPAM pieces

def adam_ctx(v, step=100, m=None):
    """An AdamW holding one parameter 'w' whose second moment is v (as after `step` steps)."""
    p = torch.nn.Parameter(torch.zeros_like(v))
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(v) if m is None else m,
                    "exp_avg_sq": v.clone()}
    return opt, Context(step=step, optimizer=opt, params={"w": p})


def test_spam_clip_known_answers():
    opt, ctx = adam_ctx(torch.ones(3))
    out, _ = run(gt.spam_clip(5000), {"w": t(1000.0, 50.0, -1000.0)}, ctx=ctx)
    assert close(out["w"], [70.710678, 50.0, -70.710678], 1e-4)
    assert int(ctx.stats["spam_clip"]["clipped"]["w"]) == 2
    opt, ctx = adam_ctx(torch.full((2,), 1e-4))                            # METHODS §11.1
    out, _ = run(gt.spam_clip(5000), {"w": t(0.01, 5.0)}, ctx=ctx)
    assert close(out["w"], [0.01, math.sqrt(0.5)])


@pytest.mark.parametrize("step, active", [(18, False), (19, True), (499, False), (518, False), (519, True)])
def test_spam_clip_skips_first_steps_and_after_resets(step, active):
    opt, ctx = adam_ctx(torch.ones(1), step=step)                          # k = step + 1
    out, _ = run(gt.spam_clip(5000, skip_first=20, reset_every=500), {"w": t(1000.0)}, ctx=ctx)
    assert close(out["w"], [70.710678 if active else 1000.0], 1e-4)


def test_spam_pieces_need_an_adam_like_optimizer():
    with pytest.raises(ValueError, match="wrap"):
        run(gt.spam_clip(), {"w": t(1.0)}, ctx=Context(step=50))
    p = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Adam-like"):
        run(gt.momentum_reset(), {"w": t(1.0)}, ctx=Context(step=499, optimizer=sgd, params={"w": p}))
    opt = torch.optim.Adamax([p])
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(1), "exp_inf": torch.ones(1)}
    with pytest.raises(ValueError, match="exp_avg_sq"):
        run(gt.spam_clip(), {"w": t(1.0)}, ctx=Context(step=50, optimizer=opt, params={"w": p}))


def test_momentum_reset_zeroes_on_multiples_and_warms_up():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    w = gt.wrap(opt, gt.momentum_reset(every=5, warmup=3), model)
    seen = []   # registered after wrap's hook: sees the state and lr the optimizer is about to use

    def probe(o, args, kwargs):
        st = o.state.get(model.weight, {})
        zero = bool(st) and bool((st["exp_avg"] == 0).all() and (st["exp_avg_sq"] == 0).all())
        seen.append((zero, o.param_groups[0]["lr"]))

    opt.register_step_pre_hook(probe)
    x = torch.randn(4, 3)
    for _ in range(12):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        assert opt.param_groups[0]["lr"] == 0.1                             # restored after every step
    zeroed = [k for k, (z, _) in enumerate(seen, 1) if z]
    assert zeroed == [5, 10]
    lrs = [lr for _, lr in seen]
    assert lrs[:4] == [0.1] * 4                                            # no warm-up before the first reset
    assert close(lrs[4], 0.1 * gt.warmup_scale(0, 3)) and lrs[4] < lrs[5] < lrs[6] < 0.1   # cosine ramp
    assert close(lrs[7], 0.1)                                              # c = 3 = warmup
    assert w.state["resets"] == 2
    assert int(opt.state[model.weight]["step"]) == 12                      # SPAM keeps the step counter
    assert abs(gt.warmup_scale(0, 150) - 0.01) < 1e-3 and gt.warmup_scale(150, 150) == 1.0
    assert gt.warmup_scale(149, 150) < 1.0


def test_momentum_reset_step_option_restarts_bias_correction():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    gt.wrap(opt, gt.momentum_reset(every=4, warmup=0, reset_step=True), model)
    for _ in range(5):
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert int(opt.state[model.weight]["step"]) == 2                       # reset to 0 before step 4 -> 1, 2


def test_ada_clip_known_answers():
    tx = gt.ada_clip(0.999)
    g1 = {"w": t(1.0, -0.5)}
    st = tx.init(g1)
    out, st = tx.update(g1, st)
    assert close(out["w"], [1.0, -0.5])                                    # m_hat = M at t = 1
    out, st = tx.update({"w": t(100.0, 0.5, dtype=torch.float64)}, st)
    m_hat = (0.999 * 0.001 + 0.001 * 100) / (1 - 0.999 ** 2)
    assert abs(m_hat - 50.525) < 1e-3
    assert close(out["w"], [m_hat, 0.5], 1e-4)


def test_ada_norm_first_step_unit_norm():
    out, _ = run(gt.ada_norm(0.7, 0.9, 1e-8), {"w": t(3.0, 4.0, dtype=torch.float64)})
    assert abs(out["w"].norm().item() - (1 - 2e-9)) < 1e-12
    out, _ = run(gt.ada_norm(), {"w": t(0.0, 0.0)})
    assert torch.equal(out["w"], t(0.0, 0.0))                              # zero stays zero, no NaN


# ------------------------------------------------------------------------------------------- combinators

def test_chain_order_matters():
    grads = lambda: {"w": torch.full((1000,), 10.0)}   # noqa: E731
    clip_then_noise, _ = run(gt.chain(gt.clip_by_global_norm(1.0), gt.add_noise(1.0, seed=0)), grads())
    noise_then_clip, _ = run(gt.chain(gt.add_noise(1.0, seed=0), gt.clip_by_global_norm(1.0)), grads())
    assert clip_then_noise["w"].norm() > 10 * noise_then_clip["w"].norm()  # noise (std 1) added after the clip
    assert close(noise_then_clip["w"].norm(), 1.0, 1e-5)


@pytest.mark.parametrize("select", [r"^enc\.", lambda n, p: p.ndim > 1, {"enc.w"}])
def test_masked_leaves_others_untouched(select):
    grads = {"enc.w": torch.tensor([[3.0, 4.0]]), "head.b": t(30.0, 40.0)}
    b = grads["head.b"]
    out, st = run(gt.masked(gt.clip_by_global_norm(1.0), select), grads)
    assert close(out["enc.w"], [[0.6, 0.8]]) and out["head.b"] is b and torch.equal(b, t(30.0, 40.0))


def test_partition_state_per_label_and_reset_one_label():
    tx = gt.partition({"a": gt.ada_clip(), "b": gt.ada_clip()}, lambda n, p: n[0])
    grads = lambda: {"a1": t(1.0), "b1": t(2.0)}   # noqa: E731
    st = tx.init(grads())
    for _ in range(3):
        _, st = tx.update(grads(), st)
    assert st["partition"]["a"]["count"] == 3 and set(st["partition"]["b"]["m_max"]) == {"b1"}
    st = gt.reset_state([st], "a")[0]                                      # nested in a chain-like list
    assert st["partition"]["a"] is None and st["partition"]["b"]["count"] == 3
    _, st = tx.update(grads(), st)
    assert st["partition"]["a"]["count"] == 1 and st["partition"]["b"]["count"] == 4
    with pytest.raises(KeyError):
        gt.reset_state(st, "c")
    with pytest.raises(KeyError, match="no transform"):
        gt.partition({"a": gt.identity()}, lambda n, p: "x").init({"w": t(1.0)})


def test_apply_if_finite_skips_nan_step_and_counts():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    w = gt.wrap(opt, gt.apply_if_finite(gt.chain(gt.ada_clip(), gt.clip_by_global_norm(1.0))), model)
    x = torch.ones(3, 2)
    model(x).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    v_before = opt.state[model.weight]["exp_avg_sq"].clone()
    opt.zero_grad()
    model(x).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))   # skipped: no move, no decay
    assert torch.equal(opt.state[model.weight]["exp_avg_sq"], v_before)
    assert w.state["total_notfinite"] == 1 and w.state["last_finite"] is False
    assert w.state["inner"][0]["count"] == 1                               # inner state untouched
    assert w.last_stats["apply_if_finite"]["notfinite_count"] == 1
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert w.state["notfinite_count"] == 0 and w.state["total_notfinite"] == 1
    assert w.state["inner"][0]["count"] == 2


def test_snapshot_records_pre_and_post_norms():
    ctx = Context()
    tx = gt.chain(gt.snapshot("pre"), gt.clip_by_global_norm(1.0), gt.snapshot("post"))
    run(tx, {"a": t(3.0), "b": t(4.0)}, ctx=ctx)
    assert close(ctx.stats["pre"]["global_norm"], 5.0) and close(ctx.stats["pre"]["norms"]["b"], 4.0)
    assert close(ctx.stats["post"]["global_norm"], 1.0, 1e-5) and close(ctx.stats["post"]["norms"]["a"], 0.6)


# ------------------------------------------------------------------------------------------- wrap

def mlp(seed=0, dtype=torch.float32, d=8, h=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, 1)).to(dtype)


def batch(seed=0, n=64, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X.to(dtype), (X[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=g)).to(dtype)


def train(model, opt, steps, data, spikes=(), factor=1000.0):
    X, y = data
    traj = []
    for k in range(steps):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        if k in spikes:
            for p in model.parameters():
                p.grad.mul_(factor)
        opt.step()
        traj.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return torch.stack(traj)


def test_wrap_clip_equals_manual_clip_then_step():
    data = batch()
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.5, momentum=0.9)
    gt.wrap(o1, gt.clip_by_global_norm(0.1), m1)
    t1 = train(m1, o1, 10, data)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.5, momentum=0.9)
    X, y = data
    t2 = []
    for _ in range(10):
        o2.zero_grad()
        ((m2(X) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.1)
        o2.step()
        t2.append(torch.cat([p.detach().flatten().clone() for p in m2.parameters()]))
    assert (t1 - torch.stack(t2)).abs().max() < 1e-7


def test_wrap_state_dict_round_trip_continues_identically(tmp_path):
    data = batch()
    tx = lambda: gt.chain(gt.snapshot("pre"), gt.add_noise(1e-4, seed=1), gt.stable_spam(reset_every=7))  # noqa
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = gt.wrap(opt, tx(), model)
    train(model, opt, 9, data)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tx": w.state_dict()}, tmp_path / "c.pt")
    cont = train(model, opt, 8, data)
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["opt"])
    w2 = gt.wrap(opt2, tx(), model2)
    w2.load_state_dict(ck["tx"])
    assert w2.step == 9
    assert torch.equal(train(model2, opt2, 8, data), cont)
    other = gt.wrap(torch.optim.AdamW(model2.parameters()), gt.chain(gt.ada_norm(), gt.add_noise()), model2)
    with pytest.raises(ValueError, match="expected"):
        other.load_state_dict(ck["tx"])                                    # another transform's state


def test_remove_restores_plain_behaviour_and_context_manager():
    data = batch()
    ref_model = mlp()
    ref = train(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), 3, data)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.wrap(opt, gt.clip_by_global_norm(1e-3), model) as w:
        pass
    assert w._handles == []
    assert torch.equal(train(model, opt, 3, data), ref)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gt.wrap(opt, gt.clip_by_global_norm(1e-3), model)
    assert not torch.equal(train(model, opt, 3, data), ref)
    w.remove()
    assert w.step == 3


def test_wrap_sees_unscaled_grads_under_grad_scaler_and_skipped_steps_not_counted():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w = gt.wrap(opt, gt.snapshot("g"), model, scaler=scaler)
    X, y = batch()
    ((model(X) - y) ** 2).mean().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.zero_grad()
    scaler.scale(((model(X) - y) ** 2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert close(w.last_stats["g"]["global_norm"], expected, 1e-5) and w.step == 1
    opt.zero_grad()
    scaler.scale(((model(X) - y) ** 2).mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)                                                        # skipped by the scaler
    assert w.step == 1


def test_wrap_rejects_unnamed_optimizer_params():
    model = mlp()
    extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="no name"):
        gt.wrap(torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1), gt.identity(), model)


# ------------------------------------------------------------------------------------------- against the peers

@pytest.mark.parametrize("dtype, lr, eps, tol", [(torch.float64, 1e-2, 1e-30, 1e-10),
                                               (torch.float32, 1e-3, 1e-12, 1e-6)])
def test_spam_matches_pytorch_optimizer(dtype, lr, eps, tol):
    """60 steps with 3 resets, warm-ups and spikes. Conventions matched: warmup_epoch = warmup, weight decay 0
    (SPAM decays after the update with the unscaled lr), and eps << sqrt(v): SPAM adds eps to sqrt(v), torch to
    sqrt(v / (1 - beta2^t)) (with eps = 1e-6 they differ by 5e-3 at lr 1e-3 here: a convention difference)."""
    import pytorch_optimizer as po  # installed by `make install`
    data = batch(dtype=dtype)
    m1, m2 = mlp(dtype=dtype), mlp(dtype=dtype)
    o1 = po.SPAM(m1.parameters(), lr=lr, eps=eps, warmup_epoch=7, update_proj_gap=20, grad_accu_steps=5,
                 threshold=5000, weight_decay=0.0)
    o2 = torch.optim.AdamW(m2.parameters(), lr=lr, eps=eps, weight_decay=0.0)
    w = gt.wrap(o2, gt.spam(threshold=5000, reset_every=20, warmup=7, skip_first=5), m2)
    spikes = (12, 25, 47)
    diff = (train(m1, o1, 60, data, spikes) - train(m2, o2, 60, data, spikes)).abs().max()
    assert diff < tol
    assert w.state[0]["resets"] == 3


def test_stable_spam_matches_pytorch_optimizer():
    import pytorch_optimizer as po  # installed by `make install`
    data = batch()
    m1, m2 = mlp(), mlp()
    o1 = po.StableSPAM(m1.parameters(), lr=1e-2, update_proj_gap=20, weight_decay=0.01)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.01)
    gt.wrap(o2, gt.stable_spam(reset_every=20), m2)
    assert (train(m1, o1, 60, data, (12, 47)) - train(m2, o2, 60, data, (12, 47))).abs().max() < 1e-6


def test_orthograd_matches_pytorch_optimizer():
    import pytorch_optimizer as po  # installed by `make install`
    data = batch()
    m1, m2 = mlp(), mlp()
    o1 = po.OrthoGrad(torch.optim.AdamW(m1.parameters(), lr=1e-2))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    gt.wrap(o2, gt.orthograd(), m2)
    assert (train(m1, o1, 30, data) - train(m2, o2, 30, data)).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------- spike experiment

def spike_run(seed, kind, steps=200, spikes=(25, 125)):
    """2-layer MLP regression, full batch, AdamW lr 1e-3; x1000 gradients on 1% of the steps."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(128, 16, generator=g)
    y = torch.tanh(X @ (torch.randn(16, 1, generator=g) / 4)) + 0.05 * torch.randn(128, 1, generator=g)
    model = mlp(seed, d=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
    if kind == "spam":
        gt.wrap(opt, gt.spam(), model)
    train(model, opt, steps, (X, y), spikes=() if kind == "clean" else spikes)
    with torch.no_grad():
        return ((model(X) - y) ** 2).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spam_survives_gradient_spikes(seed):
    clean, adam, spam = (spike_run(seed, k) for k in ("clean", "adam", "spam"))
    # plain Adam: the x1000 gradient inflates v by ~1e3, so the effective lr drops ~30x for hundreds of steps
    assert adam > 3 * clean
    assert math.isfinite(spam) and spam < 1.75 * clean and adam > 2 * spam
