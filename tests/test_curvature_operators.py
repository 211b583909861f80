"""Curvature operators (Hessian, GGN, Fisher) against dense autograd references, float64, tiny models."""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradsight.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    causal_lm_forward,
    select_params,
)

DT = torch.float64
METHODS = ["double_backward", "forward_over_reverse"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ---------------------------------------------------------------------------------------------------------
# problems as plain data: id -> (model factory, input factory, loss)


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class _TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):  # (B, 1, 5, 5)
        return self.fc(torch.tanh(self.conv(x)).flatten(1))  # (B, 3)


PROBLEMS = {
    "mlp-tanh-ce": dict(model=_mlp, x=(4,), loss="cross_entropy"),
    "conv-ce": dict(model=_TinyConv, x=(1, 5, 5), loss="cross_entropy"),
    "linear-mse": dict(model=lambda: nn.Linear(4, 2), x=(4,), loss="mse"),
    "softmax-regression": dict(model=lambda: nn.Linear(3, 3), x=(3,), loss="cross_entropy"),
}


def make(pid, n=10, seed=0):
    """(model in eval mode, X, Y) for a problem id."""
    spec = PROBLEMS[pid]
    torch.manual_seed(seed)
    model = spec["model"]().to(DT).eval()
    X = torch.randn(n, *spec["x"], dtype=DT)
    if spec["loss"] == "cross_entropy":
        Y = torch.randint(0, 3, (n,))
    else:
        Y = torch.randn(n, 2, dtype=DT)
    return model, X, Y


def split(X, Y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((X[i:i + s], Y[i:i + s]))
        i += s
    assert i == len(X)
    return out


def loss_of(name, out, y):
    if name == "cross_entropy":
        return F.cross_entropy(out, y)
    return 0.5 * (out - y).pow(2).sum(-1).mean()


def flat_fn(model, names, fn):
    """theta_flat -> fn(dict of block tensors), with the block in model order."""
    ps = dict(model.named_parameters())
    shapes = [ps[n].shape for n in names]
    sizes = [ps[n].numel() for n in names]
    theta0 = torch.cat([ps[n].detach().reshape(-1) for n in names])

    def f(theta):
        parts = [c.view(s) for c, s in zip(theta.split(sizes), shapes)]
        return fn(dict(zip(names, parts)))

    return f, theta0


def ref_hessian(model, X, Y, loss, names=None):
    """Dense Hessian of the full-data mean loss, by torch.autograd.functional.hessian."""
    names = names or [n for n, _ in model.named_parameters()]
    f, theta0 = flat_fn(model, names, lambda ps: loss_of(loss, functional_call(model, ps, (X,)), Y))
    return torch.autograd.functional.hessian(f, theta0)


def close(a, b, rtol=1e-8, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------
# Hessian


@pytest.mark.parametrize("method", METHODS)
def test_quadratic_plus_sine_known_answer(method):
    # f(theta) = 0.5 theta^T A theta + sum(sin theta): H v = A v - sin(theta) * v   (METHODS 8, test 1)
    torch.manual_seed(1)
    P = 20
    B = torch.randn(P, P, dtype=DT)
    A = B + B.T
    model = nn.Module()
    model.theta = nn.Parameter(torch.randn(P, dtype=DT))
    H = HessianOperator(model, lambda o, t: 0.5 * o @ A @ o + o.sin().sum(), [None], method=method,
                        forward_fn=lambda m, b: (m.theta, None), weight_fn=lambda o, t: 1)
    v = torch.randn(P, dtype=DT)
    close(H.matvec(v), A @ v - model.theta.detach().sin() * v)


@pytest.mark.parametrize("pid", ["mlp-tanh-ce", "conv-ce"])
@pytest.mark.parametrize("method", METHODS)
def test_hessian_matches_autograd(pid, method):
    model, X, Y = make(pid, n=9)
    R = ref_hessian(model, X, Y, PROBLEMS[pid]["loss"])
    H = HessianOperator(model, PROBLEMS[pid]["loss"], split(X, Y, [4, 5]), method=method)
    assert H.dim == R.shape[0] == sum(p.numel() for p in model.parameters())
    if method == "double_backward":
        close(H.dense(), R)
        assert H.n_products == H.dim
    else:  # forward-mode products are slower: a few columns
        V = torch.randn(H.dim, 3, dtype=DT)
        close(H.matmat(V), R @ V)
        assert H.n_products == 3
    assert H.kind == "hessian" and not H.switched_to_eval


@pytest.mark.parametrize("method", METHODS)
def test_hessian_parameter_subset(method):
    model, X, Y = make("mlp-tanh-ce")
    R = ref_hessian(model, X, Y, "cross_entropy")
    batches = split(X, Y, [10])
    H0 = HessianOperator(model, "cross_entropy", batches, params=r"^0\.", method=method)  # first layer
    assert [n for n, _ in H0.params] == ["0.weight", "0.bias"]
    k = H0.dim
    V = torch.randn(k, 2, dtype=DT)
    close(H0.matmat(V), R[:k, :k] @ V)
    H2 = HessianOperator(model, "cross_entropy", batches, params=["2.weight"], method=method)
    off = 4 * 6 + 6
    v = torch.randn(H2.dim, dtype=DT)
    close(H2.matvec(v), R[off:off + H2.dim, off:off + H2.dim] @ v)


def test_operators_are_batch_split_invariant():
    model, X, Y = make("mlp-tanh-ce", n=12)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    for build in (lambda b: HessianOperator(model, "cross_entropy", b),
                  lambda b: HessianOperator(model, "cross_entropy", b, method="forward_over_reverse"),
                  lambda b: GGNOperator(model, b),
                  lambda b: FisherOperator(model, b, kind="empirical")):
        a = build(split(X, Y, [12])).matvec(v)
        b = build(split(X, Y, [3, 4, 5])).matvec(v)
        c = build(split(X, Y, [7, 1, 4])).matvec(v)
        close(a, b)
        close(a, c)


def test_interface_flatten_matmat_dense_guard():
    model, X, Y = make("mlp-tanh-ce")
    H = HessianOperator(model, "cross_entropy", split(X, Y, [10]))
    ts = [torch.randn_like(p) for _, p in H.params]
    back = H.unflatten(H.flatten(ts))
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    V = torch.randn(H.dim, 2, dtype=DT)
    close(H.matmat(V), torch.stack([H.matvec(V[:, 0]), H.matvec(V[:, 1])], 1))  # batched vs column loop
    H.matmat_chunk = 3  # chunked batched double backward
    close(H.matmat(torch.eye(H.dim, dtype=DT)[:, :7]), torch.stack([H.matvec(e) for e in torch.eye(H.dim,
                                                                     dtype=DT)[:7]], 1))
    assert H.n_products == 2 + 2 + 7 + 7
    with pytest.raises(ValueError, match="shape"):
        H.matvec(torch.zeros(H.dim + 1, dtype=DT))
    big = nn.Linear(100, 60)
    Hb = HessianOperator(big, "cross_entropy", [(torch.randn(2, 100), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="dense"):
        Hb.dense()
    assert Hb.n_products == 0
    # dtype follows the model
    assert Hb.matvec(torch.randn(Hb.dim)).dtype == torch.float32
    assert H.info["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"] and H.info["mode"] == "eval"


# ---------------------------------------------------------------------------------------------------------
# GGN and Fisher


def test_ggn_equals_hessian_for_linear_least_squares():
    model, X, Y = make("linear-mse", n=8)
    batches = split(X, Y, [3, 5])
    G = GGNOperator(model, batches, loss="mse").dense()
    H = HessianOperator(model, "mse", batches).dense()
    close(G, H)
    close(H, ref_hessian(model, X, Y, "mse"))
    # closed form on the weight block (0.5 ||.||^2 mean convention): H_W = I_2 kron X^T X / n
    GW = GGNOperator(model, batches, loss="mse", params=["weight"]).dense()
    close(GW, torch.kron(torch.eye(2, dtype=DT), X.T @ X / len(X)))


def test_ggn_equals_true_fisher_and_hessian_for_softmax_regression():
    model, X, Y = make("softmax-regression", n=7)
    batches = split(X, Y, [3, 4])
    G = GGNOperator(model, batches).dense()
    # independent true Fisher: E_x sum_c p(c|x) g_c g_c^T with per-example gradients by a loop
    names = [n for n, _ in model.named_parameters()]
    P = G.shape[0]
    Fref = torch.zeros(P, P, dtype=DT)
    for x in X:
        p = torch.softmax(model(x[None]), -1)[0].detach()
        for c in range(3):
            f, th = flat_fn(model, names, lambda ps: F.cross_entropy(functional_call(model, ps, (x[None],)),
                                                                     torch.tensor([c])))
            g = torch.autograd.functional.jacobian(f, th)
            Fref += p[c] * torch.outer(g, g)
    Fref /= len(X)
    close(G, Fref)
    Ft = FisherOperator(model, batches, kind="true")
    close(Ft.dense(), Fref)
    assert Ft.kind == "true"
    close(G, ref_hessian(model, X, Y, "cross_entropy"))  # model linear in theta: H = GGN


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_ggn_matches_dense_jacobian_and_is_psd(method):
    model, X, Y = make("mlp-tanh-ce", n=6)
    names = [n for n, _ in model.named_parameters()]
    f, th = flat_fn(model, names, lambda ps: functional_call(model, ps, (X,)))
    J = torch.autograd.functional.jacobian(f, th).reshape(6 * 3, -1)  # (N C, P)
    p = torch.softmax(model(X), -1).detach()  # (N, C)
    Hout = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p]) / len(X)  # (N C, N C)
    Gref = J.T @ Hout @ J
    G = GGNOperator(model, split(X, Y, [2, 4]), method=method)
    if method == "reverse":
        D = G.dense()
        close(D, Gref)
        ev = torch.linalg.eigvalsh(D)
        assert ev.min() > -1e-12 * ev.max()
        close(D, D.T)
    else:
        V = torch.randn(G.dim, 3, dtype=DT)
        close(G.matmat(V), Gref @ V)


@pytest.mark.parametrize("pid", ["mlp-tanh-ce", "linear-mse"])
def test_empirical_fisher_equals_per_example_outer_products(pid):
    model, X, Y = make(pid, n=6)
    loss = PROBLEMS[pid]["loss"]
    names = [n for n, _ in model.named_parameters()]
    gs = []
    for x, y in zip(X, Y):
        f, th = flat_fn(model, names, lambda ps: loss_of(loss, functional_call(model, ps, (x[None],)), y[None]))
        gs.append(torch.autograd.functional.jacobian(f, th))
    Gm = torch.stack(gs)  # (N, P)
    Fref = Gm.T @ Gm / len(X)
    Fe = FisherOperator(model, split(X, Y, [4, 2]), kind="empirical", loss=loss)
    V = torch.randn(Fe.dim, 4, dtype=DT)
    close(Fe.matmat(V), Fref @ V)
    assert Fe.kind == "empirical"


@pytest.mark.parametrize("pid", ["softmax-regression", "linear-mse"])
def test_mc_fisher_approaches_true_fisher(pid):
    # statistical: S = 3000 samples per row; the MC Fisher is unbiased, relative error ~ 1/sqrt(S N)
    model, X, Y = make(pid, n=6)
    loss = PROBLEMS[pid]["loss"]
    batches = split(X, Y, [6])
    Ft = FisherOperator(model, batches, kind="true", loss=loss).dense()
    Fm = FisherOperator(model, batches, kind="mc", loss=loss, n_samples=3000, seed=0).dense()
    rel = (Fm - Ft).norm() / Ft.norm()
    assert rel < 0.05, rel
    few = [FisherOperator(model, batches, kind="mc", loss=loss, n_samples=2, seed=s).dense() for s in (0, 0, 1)]
    assert torch.equal(few[0], few[1])  # a fixed operator under a seed
    assert not torch.equal(few[0], few[2])
    assert (few[0] - Ft).norm() / Ft.norm() > rel  # 2 samples: noisier


# ---------------------------------------------------------------------------------------------------------
# Hugging Face causal LM

BLOCK = "model.layers.0.mlp.down_proj.weight"


def _rms_norm_float64(self, h):
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


def _llama(attn, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).to(DT).eval()
    # LlamaRMSNorm computes in float32 even for a float64 model, which limits any float64 Hessian to ~1e-7
    # relative accuracy (finite differences disagree at 1e-5); keep the norms in float64 for 1e-8 checks.
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(_rms_norm_float64, m)
    return model


def _lm_data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    att = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])  # right-padded
    tgt = att.clone()
    tgt[:, :3] = 0  # a "prompt" of 3 tokens: supervise only the rest
    return ids, att, tgt.bool()


def _lm_batches(rows_per_batch):
    ids, att, tgt = _lm_data()
    out, i = [], 0
    for s in rows_per_batch:
        sl = slice(i, i + s)
        T = int(att[sl].sum(1).max())  # trim the padding of this batch
        out.append({"input_ids": ids[sl, :T], "attention_mask": att[sl, :T], "target_mask": tgt[sl, :T]})
        i += s
    return out


def _lm_reference_hessian(model):
    """Dense Hessian of the pooled token-mean loss w.r.t. BLOCK, computed without the operators' code."""
    ids, att, tgt = _lm_data()

    def loss(ps):
        logits = functional_call(model, ps, (), dict(input_ids=ids, attention_mask=att)).logits  # (B, T, V)
        m = tgt[:, 1:]
        return F.cross_entropy(logits[:, :-1][m], ids[:, 1:][m])  # mean over all supervised tokens

    f, th = flat_fn(model, [BLOCK], loss)
    return torch.autograd.functional.hessian(f, th, vectorize=True)


@pytest.fixture(scope="module")
def lm_reference():
    model = _llama("eager")
    return model, _lm_reference_hessian(model)


@pytest.mark.parametrize("method", METHODS)
def test_hf_llama_hessian_block(lm_reference, method):
    model, R = lm_reference
    H = HessianOperator(model, "cross_entropy", _lm_batches([2, 1]), params=[BLOCK], method=method,
                        forward_fn=causal_lm_forward)
    assert H.dim == 16 * 12 and not H.sdpa_math
    V = torch.randn(H.dim, 3, dtype=DT)
    close(H.matmat(V), R @ V)
    # batch-split invariance with different padding per batch (tokens pooled over the data set)
    H1 = HessianOperator(model, "cross_entropy", _lm_batches([1, 1, 1]), params=[BLOCK], method=method,
                         forward_fn=causal_lm_forward)
    close(H1.matvec(V[:, 0]), R @ V[:, 0])


def test_hf_llama_sdpa_runs_under_math_backend(lm_reference):
    eager, R_eager = lm_reference
    model = _llama("sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(dict(model.named_parameters())[BLOCK], dict(eager.named_parameters())[BLOCK])
    R = _lm_reference_hessian(model)  # eager softmax runs in float32: same weights, Hessian equal to ~1e-7
    close(R, R_eager, rtol=1e-5, atol=1e-9)
    seen = []

    def fwd(m, b):
        seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled()))
        return causal_lm_forward(m, b)

    V = torch.randn(16 * 12, 2, dtype=DT)
    for method in METHODS:
        H = HessianOperator(model, "cross_entropy", _lm_batches([3]), params=[BLOCK], method=method, forward_fn=fwd)
        assert H.sdpa_math and H.info["sdpa_math"]
        close(H.matmat(V), R @ V)
    assert seen and all(s == (True, False, False) for s in seen)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the products
    G = GGNOperator(model, _lm_batches([3]), params=[BLOCK], forward_fn=causal_lm_forward)
    assert torch.isfinite(G.matvec(V[:, 0])).all()


def test_forward_mode_failure_names_the_fix():
    class Square(torch.autograd.Function):  # old-style Function: no functorch support
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return Square.apply(self.lin(x))

    model = M().to(DT)
    batches = [(torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0]))]
    H = HessianOperator(model, "cross_entropy", batches, method="forward_over_reverse")
    with pytest.raises(RuntimeError, match="eager"):
        H.matvec(torch.randn(H.dim, dtype=DT))
    Hd = HessianOperator(model, "cross_entropy", batches, method="double_backward")
    assert torch.isfinite(Hd.matvec(torch.randn(H.dim, dtype=DT))).all()


# ---------------------------------------------------------------------------------------------------------
# bad input and model mode


def test_select_params_errors():
    model = _mlp()
    with pytest.raises(ValueError, match=r"no parameter matches pattern '\^decoder\\.'"):
        select_params(model, pattern=r"^decoder\.")
    with pytest.raises(ValueError, match="unknown parameter"):
        HessianOperator(model, "cross_entropy", [(torch.randn(2, 4), torch.tensor([0, 1]))], params=["nope"])
    with pytest.raises(ValueError, match="nothing|pattern 'xyz'"):
        GGNOperator(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], params="xyz")
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, "cross_entropy", [])
    with pytest.raises(ValueError, match="kind"):
        FisherOperator(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], kind="diag")
    assert [n for n, _ in select_params(model)] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_train_mode_batchnorm_warns_and_runs_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, Y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    model(X * 3 + 1)  # move the running statistics away from the batch statistics
    assert model.training
    with pytest.warns(UserWarning, match="train mode.*BatchNorm1d"):
        H = HessianOperator(model, "cross_entropy", split(X, Y, [8]))
    assert H.switched_to_eval and H.info["switched_to_eval"]
    v = torch.randn(H.dim, dtype=DT)
    Hv = H.matvec(v)
    assert model.training  # the caller's mode is restored after each product
    ref_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval-mode model: no warning
        Href = HessianOperator(ref_model, "cross_entropy", split(X, Y, [8]))
    assert not Href.switched_to_eval
    close(Hv, Href.matvec(v))
    close(Hv, ref_hessian(ref_model, X, Y, "cross_entropy") @ v)
    assert not math.isclose(float(Hv.norm()), 0.0)
