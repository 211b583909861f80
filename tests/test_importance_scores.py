"""Known-answer tests of gradsight.importance: scores, masks, SparseGPT (hand computations and independent
references, float64). Specs: docs METHODS.md sections 3-5, anchors act.md section B."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradsight.importance import masks as M
from gradsight.importance import scores as S
from gradsight.importance.sparsegpt import sparsegpt, sparsegpt_reference

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


# ------------------------------------------------------------------------- 1. two-layer toy, every score


def _toy():
    """Linear(3,4) -> tanh -> Linear(4,2) with fixed small weights; 3 examples of 2 tokens each."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.2, -0.1, 0.3], [0.05, 0.4, -0.2], [-0.3, 0.1, 0.1], [0.25, 0.0, -0.15]]))
        net[0].bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.05]))
        net[2].weight.copy_(torch.tensor([[0.3, -0.2, 0.1, 0.4], [-0.1, 0.25, 0.35, -0.05]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.1]))
    x = torch.tensor([[[1.0, 0.5, -1.0], [0.2, -0.3, 0.8]],
                      [[-0.5, 1.5, 0.3], [0.9, 0.1, -0.4]],
                      [[0.3, -0.7, 1.2], [-1.1, 0.6, 0.0]]], dtype=D)  # (3 examples, 2 tokens, 3)
    y = torch.tensor([[[0.5, -0.5], [1.0, 0.0]], [[0.0, 1.0], [-0.5, 0.5]], [[1.0, 1.0], [0.0, -1.0]]], dtype=D)
    return net, x, y


def _per_example(net, x, y):
    """Plain per-example autograd loop: for each layer, the inputs a_e (T, d_in), the weight gradients G_e of
    the example's token-mean loss, and the gradients of that loss w.r.t. the layer inputs."""
    out = {0: {"a": [], "G": [], "da": []}, 2: {"a": [], "G": [], "da": []}}
    for e in range(x.shape[0]):
        a0 = x[e].clone().requires_grad_(True)  # (T, 3)
        h = torch.tanh(net[0](a0))
        a2 = h.detach().clone().requires_grad_(True)  # (T, 4), input of the second layer
        pred = net[2](a2)
        loss = ((pred - y[e]) ** 2).sum(-1).mean()  # token-mean loss of example e
        g_a2, G2 = torch.autograd.grad(loss, [a2, net[2].weight])
        # chain into the first layer through h = tanh(net[0](a0)), by a second graph with h itself
        G0, g_a0 = torch.autograd.grad(h, [net[0].weight, a0], grad_outputs=g_a2)
        for li, a, G, da in ((0, a0, G0, g_a0), (2, a2, G2, g_a2)):
            out[li]["a"].append(a.detach().numpy())
            out[li]["G"].append(G.detach().numpy())
            out[li]["da"].append(da.detach().numpy())
    return {li: {k: np.stack(v) for k, v in d.items()} for li, d in out.items()}


def test_toy_scores_match_hand_formulas():
    from gradsight.importance.stats import LayerStats

    net, x, y = _toy()
    pe = _per_example(net, x, y)
    for li in (0, 2):
        W = net[li].weight.detach()
        Wn = W.numpy()
        A, G, dA = pe[li]["a"], pe[li]["G"], pe[li]["da"]  # (E, T, d_in), (E, d_out, d_in), (E, T, d_in)
        E = A.shape[0]
        # the statistics, summed in torch (the LayerStats definitions)
        At, Gt, dAt = (torch.from_numpy(v) for v in (A, G, dA))
        st = LayerStats(sq_in=(At ** 2).sum((0, 1)), n_seq=E, n_tok=E * A.shape[1], g_sum=Gt.sum(0),
                        g_sq=(Gt ** 2).sum(0), neuron=(At * dAt).sum(1).abs().sum(0))
        # hand formulas in numpy, from the stacked per-example arrays
        Xall = A.reshape(-1, A.shape[-1])  # (E*T, d_in) every token
        act = np.linalg.norm(Xall, axis=0) / math.sqrt(E)  # ||X_j|| / sqrt(N_seq)
        hand = {
            "magnitude": np.abs(Wn),
            "wanda": np.abs(Wn) * act[None, :],
            "gblm": np.abs(Wn) * act[None, :] + np.abs(Wn) * np.sqrt(((100.0 * G) ** 2).sum(0)),
            "fisher": 0.5 * (G ** 2).mean(0) * Wn ** 2,
            "taylor": np.abs(G.mean(0) * Wn),
            "salun": np.abs(G.sum(0)),
            "neuron": np.mean([np.abs((A[e] * dA[e]).sum(0)) for e in range(E)], axis=0),
        }
        direct = {"magnitude": S.magnitude(W), "wanda": S.wanda(W, st.sq_in, E),
                  "gblm": S.gblm(W, st.sq_in, E, st.g_sq), "fisher": S.fisher_obd(W, st.g_sq, E),
                  "taylor": S.taylor(W, st.g_sum, E), "salun": S.salun(st.g_sum), "neuron": S.neuron(st.neuron, E)}
        assert set(hand) == set(S.SCORES)
        for name, ref in hand.items():
            assert np.abs(ref).max() > 0, name  # a non-degenerate check
            np.testing.assert_allclose(direct[name].numpy(), ref, rtol=1e-12, atol=1e-15, err_msg=name)
            np.testing.assert_allclose(S.score(name, W, st).numpy(), ref, rtol=1e-12, atol=1e-15, err_msg=name)
            assert direct[name].dtype == D
    # float32 weight with float32 stats computes in float32; W itself is untouched
    W32 = net[2].weight.detach().float()
    before = W32.clone()
    assert S.wanda(W32, torch.ones(4), 2).dtype == torch.float32
    assert torch.equal(W32, before)


def test_score_registry_errors():
    W = torch.randn(3, 4, dtype=D)
    st = type("St", (), {"sq_in": torch.ones(4, dtype=D), "n_seq": 2, "g_sq": None, "g_sum": None, "neuron": None})()
    assert S.SCORES["gblm"].needs == ("sq_in", "g_sq") and S.SCORES["magnitude"].needs == ()
    with pytest.raises(ValueError, match="g_sq"):
        S.score("gblm", W, st)
    with pytest.raises(ValueError, match="unknown score"):
        S.score("nope", W, st)
    with pytest.raises(ValueError, match="n_seq"):
        S.wanda(W, torch.ones(4, dtype=D), 0)
    with pytest.raises(ValueError, match="sq_in"):
        S.wanda(W, torch.ones(5, dtype=D), 2)


# ---------------------------------------------------------------------------------------- 2. Wanda masks


def _row_mask_ref(scores: np.ndarray, s: float) -> np.ndarray:
    keep = np.ones(scores.shape, dtype=bool)
    k = int(s * scores.shape[1])
    for i in range(scores.shape[0]):
        keep[i, np.argsort(scores[i], kind="stable")[:k]] = False
    return keep


def test_row_mask_matches_per_row_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    sc = torch.randint(0, 5, (7, 12), generator=g).to(D)  # many ties
    for s in (0.25, 0.5, 0.7):
        m = M.row_mask(sc, s)
        np.testing.assert_array_equal(m.numpy(), _row_mask_ref(sc.numpy(), s))
        assert ((~m).sum(1) == int(s * 12)).all()


def test_wanda_handmade_2x8_outlier_channel():
    W = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                      [0.8, -0.7, 0.6, -0.5, 0.4, -0.3, 0.2, -0.1]], dtype=D)
    X = torch.tensor(np.random.default_rng(1).normal(size=(16, 8)), dtype=D)
    X = X / X.norm(dim=0, keepdim=True)  # equal column norms ...
    X[:, 0] *= 1000.0  # ... except one channel scaled x1000
    wm = M.row_mask(S.wanda(W, (X ** 2).sum(0), 16), 0.5)
    mm = M.row_mask(S.magnitude(W), 0.5)
    assert wm[0, 0] and not mm[0, 0]  # Wanda keeps the outlier channel, magnitude drops it
    assert not M.layer_mask(S.magnitude(W), 0.5)[0, 0]
    assert ((~wm).sum(1) == 4).all()
    nm = M.nm_mask(S.wanda(W, (X ** 2).sum(0), 16), 2, 4)
    assert ((~nm).reshape(2, 2, 4).sum(-1) == 2).all()
    # equal ||X_j|| for all j: Wanda's mask equals the per-row magnitude mask
    Wr = torch.randn(6, 16, dtype=D, generator=torch.Generator().manual_seed(2))
    Xe = torch.randn(40, 16, dtype=D, generator=torch.Generator().manual_seed(3))
    Xe = 3.0 * Xe / Xe.norm(dim=0, keepdim=True)
    assert torch.equal(M.row_mask(S.wanda(Wr, (Xe ** 2).sum(0), 5), 0.5), M.row_mask(S.magnitude(Wr), 0.5))


# ------------------------------------------------------------------------------------------- 3. N:M masks


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_counts_and_reference(n, m):
    sc = torch.randn(9, 32, dtype=D, generator=torch.Generator().manual_seed(n * 10 + m))
    sc[0] = 1.0  # a row of ties: the first N of each block go
    mask = M.nm_mask(sc, n, m)
    assert ((~mask).reshape(9, 32 // m, m).sum(-1) == n).all()
    ref = np.ones((9, 32), dtype=bool)
    for i in range(9):
        for b in range(0, 32, m):
            ref[i, b + np.argsort(sc[i, b:b + m].numpy(), kind="stable")[:n]] = False
    np.testing.assert_array_equal(mask.numpy(), ref)
    assert torch.equal(M.make_mask(sc, f"{n}:{m}"), mask)


def test_structure_errors():
    sc = torch.randn(4, 10, dtype=D)
    with pytest.raises(ValueError, match="divisible"):
        M.nm_mask(sc, 2, 4)
    with pytest.raises(ValueError, match="N must be smaller"):
        M.nm_mask(torch.randn(4, 8), 5, 4)
    with pytest.raises(ValueError, match="N must be smaller"):
        M.parse_structure("5:4")
    for junk in ("2-4", "0:4", "half", "2:4:8"):
        with pytest.raises(ValueError):
            M.parse_structure(junk)
    assert M.parse_structure(" 2:4 ") == ("nm", (2, 4)) and M.parse_structure("unstructured") == ("unstructured", None)
    with pytest.raises(ValueError, match="NaN"):
        M.row_mask(torch.tensor([[1.0, float("nan")]]), 0.5)


# ------------------------------------------------------------------------------------------- 4. GBLM


def test_gblm_zero_gradients_equals_wanda():
    g = torch.Generator().manual_seed(4)
    W, sq = torch.randn(8, 16, dtype=D, generator=g), torch.rand(16, dtype=D, generator=g) * 5
    sw, sg = S.wanda(W, sq, 7), S.gblm(W, sq, 7, torch.zeros(8, 16, dtype=D))
    assert torch.equal(sw, sg)
    for st in ("unstructured", "2:4", "4:8"):
        assert torch.equal(M.make_mask(sw, st, 0.5), M.make_mask(sg, st, 0.5))
    # and a non-zero gradient does change the score by exactly alpha |W| sqrt(g_sq)
    gs = torch.rand(8, 16, dtype=D, generator=g)
    torch.testing.assert_close(S.gblm(W, sq, 7, gs, alpha=3.0) - sw, 3.0 * W.abs() * gs.sqrt(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- 5. DAI


def test_dai_arithmetic_and_identical_fisher():
    one = torch.ones(1, 1, dtype=D)
    v = S.dai(0.25 * one, 2.0 * one, 1.0 * one, 0.5 * one, beta=1.0, gamma=0.5)
    # R = 0.25, A = 1.1, inner = 0.275 + 0.5 * sqrt(0.25 + 1e-8), DAI = ln(1 + e^inner)
    assert abs(float(v) - 0.98971) < 1e-5
    assert abs(float(v) - math.log1p(math.exp(0.275 + 0.5 * math.sqrt(0.25 + 1e-8)))) < 1e-12
    g = torch.Generator().manual_seed(5)
    W = torch.randn(20, 30, dtype=D, generator=g)
    Fi = torch.rand(20, 30, dtype=D, generator=g)
    al = S.alignment(torch.randn(20, 30, dtype=D, generator=g), torch.randn(20, 30, dtype=D, generator=g))
    order_mag = torch.argsort(W.abs().reshape(-1), stable=True)
    for mode in ("code", "scaled"):
        d = S.dai(W, Fi, Fi, al, beta=1.0, gamma=0.5, mode=mode)
        assert torch.equal(torch.argsort(d.reshape(-1), stable=True), order_mag), mode


def test_alignment_definition_and_smoothing():
    g = torch.Generator().manual_seed(6)
    gr = torch.randn(5, 7, dtype=D, generator=g)
    a = S.alignment(gr, 3.0 * gr, smooth=False)  # identical directions
    assert (a >= 0).all() and abs(float(a.sum()) - 1.0) < 1e-6
    assert (S.alignment(gr, gr) >= 0).all()
    # the smoothed alignment against a hand 3x3 zero-padded mean filter
    g2 = torch.randn(5, 7, dtype=D, generator=g)
    raw = (gr / (gr.norm() + 1e-8) * (g2 / (g2.norm() + 1e-8))).numpy()
    pad = np.pad(raw, 1)
    hand = np.array([[pad[i:i + 3, j:j + 3].mean() for j in range(7)] for i in range(5)])
    np.testing.assert_allclose(S.alignment(gr, g2).numpy(), hand, rtol=1e-12, atol=1e-18)
    assert S.alignment(gr[:1], g2[:1]).shape == (1, 7)  # k = 1: no smoothing, shape kept
    assert S.alignment(gr[:2], g2[:2]).shape == (2, 7)  # k = 2: cropped to the input shape
    assert torch.equal(S.alignment(torch.zeros(3, 3), torch.ones(3, 3)), torch.zeros(3, 3))


def test_dai_terms_and_scaled_mode_activates_alignment():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 64, generator=g) * 0.02  # float32, like the stored model
    Fd = torch.rand(64, 64, generator=g) * 1e-9 + 1e-8
    Fg = torch.rand(64, 64, generator=g) * 1e-9 + 1e-8
    al = S.alignment(torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g))
    t = S.dai_terms(W, Fd, Fg, al, mode="code")
    # hand values of the three terms
    assert abs(t["regulariser"] - float((0.5 * torch.sqrt(W.double().abs() + 1e-8)).mean())) < 1e-6
    assert abs(t["fisher"] - float(((Fd.double() - Fg.double()) * W.double().abs()).abs().mean())) < 1e-15
    assert t["fisher_over_reg"] < 1e-6 and t["align"] < 1e-3  # the degenerate regime of METHODS 3
    ts = S.dai_terms(W, Fd, Fg, al, mode="scaled")
    assert abs(ts["regulariser"] - 0.5) < 1e-5 and ts["fisher"] > 1e-3 and ts["align"] > 10 * t["align"]
    # code mode ranks like magnitude here (Spearman ~ 1, the diagnostic of METHODS 3); scaled mode does not
    def spearman(a, b):
        ra, rb = (torch.argsort(torch.argsort(t.reshape(-1))).double() for t in (a, b))
        ra, rb = ra - ra.mean(), rb - rb.mean()
        return float((ra * rb).sum() / (ra.norm() * rb.norm()))

    assert spearman(S.dai(W, Fd, Fg, al), W.abs()) > 0.99999
    assert spearman(S.dai(W, Fd, Fg, al, mode="scaled"), W.abs()) < 0.995
    with pytest.raises(ValueError, match="mode"):
        S.dai(W, Fd, Fg, al, mode="other")


# ----------------------------------------------------------------------------------- 6. global/layer masks


def test_global_and_layer_masks_exact_counts():
    g = torch.Generator().manual_seed(8)
    sc = {"a": torch.randint(0, 6, (5, 7), generator=g).float(), "b": torch.randint(0, 6, (11,), generator=g).float(),
          "c": torch.randint(0, 6, (3, 2, 4), generator=g).float()}
    total = sum(t.numel() for t in sc.values())
    cat = np.concatenate([t.numpy().ravel() for t in sc.values()])
    for s in (0.1, 0.5, 0.77):
        k = int(math.floor(s * total))
        ms = M.global_masks(sc, s)
        assert sum(int((~m).sum()) for m in ms.values()) == k
        ref = np.ones(total, dtype=bool)
        ref[np.argsort(cat, kind="stable")[:k]] = False  # rank-based ties in concatenation order
        np.testing.assert_array_equal(np.concatenate([ms[n].numpy().ravel() for n in sc]), ref)
        assert all(ms[n].shape == sc[n].shape for n in sc)
        for n, t in sc.items():
            lm = M.layer_mask(t, s)
            assert int((~lm).sum()) == int(s * t.numel())
            ref_l = np.ones(t.numel(), dtype=bool)
            ref_l[np.argsort(t.numpy().ravel(), kind="stable")[:int(s * t.numel())]] = False
            np.testing.assert_array_equal(lm.numpy().ravel(), ref_l)
    ms = M.global_masks({"x": torch.ones(10), "y": torch.ones(10)}, 0.5)  # all tied: the first 10 go
    assert not ms["x"].any() and ms["y"].all()
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="sparsity"):
            M.global_masks(sc, bad)
        with pytest.raises(ValueError, match="sparsity"):
            M.layer_mask(sc["a"], bad)


def test_neuron_mask_stats_and_tie_fraction():
    nm = M.neuron_mask(torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]), 0.4)
    assert nm.tolist() == [True, False, True, False, True]
    st = M.mask_stats(torch.tensor([[True, False, False, True], [True, True, True, False]]))
    assert st["n"] == 8 and st["n_pruned"] == 3 and st["sparsity"] == 3 / 8
    assert st["row_pruned_min"] == 1 and st["row_pruned_max"] == 2
    sc = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0, 4.0]])  # prune 3: 1, 2, 2; one 2 kept by index order
    m = M.layer_mask(sc, 0.5)
    assert m.tolist() == [[False, False, False, True, True, True]]
    assert M.tie_fraction(sc, m) == pytest.approx(1 / 3)
    assert M.tie_fraction(sc, m, group="row") == pytest.approx(1 / 3)
    assert M.tie_fraction({"a": sc}, {"a": m}) == pytest.approx(1 / 3)
    distinct = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert M.tie_fraction(distinct, M.layer_mask(distinct, 0.5)) == 0.0


# ------------------------------------------------------------------------------------------- 7. SparseGPT


def _layer(d_out, d_in, n, seed, dtype=D):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, dtype=dtype, generator=g)
    mix = torch.randn(d_in, d_in, dtype=dtype, generator=g) / math.sqrt(d_in)
    X = torch.randn(n, d_in, dtype=dtype, generator=g) @ (torch.eye(d_in, dtype=dtype) + mix)  # correlated
    # unequal channel scales in random order: scales sorted by column index would favour Wanda's per-row choice,
    # since SparseGPT prunes exactly s of every column block (its mask adapts only inside a block)
    X = X * torch.exp(0.5 * torch.randn(d_in, dtype=dtype, generator=g))
    return W, X, (2.0 / n) * X.T @ X


@pytest.mark.parametrize("structure,exact", [("unstructured", True), ("unstructured", False), ("2:4", True),
                                             ("4:8", True)])
def test_sparsegpt_matches_float64_reference(structure, exact):
    W, X, H = _layer(16, 64, 256, seed=9)
    W0, H0 = W.clone(), H.clone()
    Wn, m = sparsegpt(W, H, 0.5, structure, blocksize=16, exact=exact)
    Wr, mr = sparsegpt_reference(W, H, 0.5, structure, blocksize=16, exact=exact)
    assert torch.equal(W, W0) and torch.equal(H, H0)  # inputs untouched
    assert torch.equal(m, mr)
    torch.testing.assert_close(Wn, Wr, rtol=0, atol=1e-8)
    assert torch.equal(Wn == 0, ~m)  # pruned weights are exactly zero, the others moved but stay non-zero
    if structure == "unstructured" and exact:
        assert int((~m).sum()) == 4 * int(16 * 16 * 0.5)  # 4 blocks, exact count each
    elif structure == "unstructured":
        assert int((~m).sum()) == 4 * (int(16 * 16 * 0.5) + 1)  # the reference's "<= k-th" rule: one more
    else:
        n, mm = map(int, structure.split(":"))
        assert ((~m).reshape(16, 64 // mm, mm).sum(-1) == n).all()
    assert not torch.equal(Wn[m], W[m])  # the OBS update did change the kept weights


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_beats_mask_only(structure):
    W, X, H = _layer(32, 64, 256, seed=10)
    W32, H32 = W.float(), H.float()
    Wn, m = sparsegpt(W32, H32, 0.5, structure, blocksize=32)
    assert Wn.dtype == torch.float32
    err = lambda Wh: float(((W @ X.T - Wh.double() @ X.T) ** 2).sum())  # ||W X^T - W_new X^T||^2
    wanda_mask = M.make_mask(S.wanda(W, (X ** 2).sum(0), 256), structure, 0.5)
    assert int((~m).sum()) == int((~wanda_mask).sum())  # same sparsity (exact counts)
    e_sgpt, e_wanda, e_own = err(Wn), err(W * wanda_mask), err(W * m)
    assert e_sgpt < 0.9 * e_wanda and e_sgpt < 0.9 * e_own, (e_sgpt, e_wanda, e_own)


def test_sparsegpt_dead_input_and_errors():
    W, X, _ = _layer(8, 16, 64, seed=11)
    X[:, 3] = 0.0  # a dead input channel: H_33 = 0
    H = (2.0 / 64) * X.T @ X
    for structure in ("unstructured", "2:4"):
        Wn, m = sparsegpt(W.float(), H.float(), 0.5, structure, blocksize=8)
        assert torch.isfinite(Wn).all() and (Wn[:, 3] == 0).all()
        Wr, mr = sparsegpt_reference(W, H, 0.5, structure, blocksize=8)
        torch.testing.assert_close(Wn.double(), Wr, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="blocksize divisible"):
        sparsegpt(W, H, structure="4:8", blocksize=12)
    with pytest.raises(ValueError, match="shape"):
        sparsegpt(W, H[:8, :8])
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt(W, H, sparsity=1.0)
