"""Singular values and squared norms by every route (T x T, d_out x d_out, d_in x d_in, dense, auto) against
svdvals / ||G^T A||_F^2 of the materialised gradient, per example of padded batches (property tests), the cost
model's choices, and K_a sharing across layers that read one input."""

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from gradsight.capture import linalg
from gradsight.capture.grads import DenseGrad, FactoredGrad
from gradsight.measures.spectra import batch_spectra, batch_sq_norms

pytestmark = pytest.mark.usefixtures("one_thread")

# The eigen-routes square the singular values: eigenvalues are exact to ~n eps sigma_1^2, so a numerically
# zero singular value comes out at up to ~sqrt(n eps) sigma_1 (n <= 24 here: <= 7e-8 sigma_1; observed
# <= 2.1e-8 over 3000 random cases) while svdvals gives ~eps sigma_1. Hence atol 1e-7 sigma_1; rtol 1e-8.
RTOL, ATOL = 1e-8, 1e-7


@st.composite
def padded_factors(draw):
    """(A, G, tokens, kind): a padded batch whose full-length example's cheapest route is `kind`."""
    kind = draw(st.sampled_from(["gram", "out", "in"]))
    small, big = draw(st.integers(1, 4)), draw(st.integers(5, 16))
    if kind == "gram":
        T = draw(st.integers(1, 6))
        d_in, d_out = draw(st.integers(2 * T, 16)), draw(st.integers(max(2 * T, 2), 16))
    else:
        T = draw(st.integers(small + 6, 24))
        d_in, d_out = (big, small) if kind == "out" else (small, big)
    if draw(st.booleans()):
        d_out = 1
    assume(linalg.choose_routes([T], d_in, d_out)[0] == kind or d_out == 1)
    B = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    if T > 1 and draw(st.booleans()):  # repeated tokens: rank deficiency (and a singular K_a or K_g)
        A[:, -1] = A[:, 0]
        if draw(st.booleans()):
            G[:, -1] = G[:, 0]
    if draw(st.booleans()):  # a zero output gradient at a token (the last position of a causal LM)
        G[:, -1] = 0
    if B > 1 and draw(st.booleans()):  # a zero example with real tokens (zero K_a: no Cholesky factor)
        (G if draw(st.booleans()) else A)[1] = 0
    tokens = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = T if b == 0 else draw(st.integers(0, T))  # 0: an example without real tokens
        layout = draw(st.sampled_from(["right", "left", "scattered"]))
        if layout == "right":
            tokens[b, :n] = True
        elif layout == "left":
            tokens[b, T - n:] = True
        else:
            tokens[b, torch.randperm(T, generator=g)[:n]] = True
    A = A * 10.0 ** draw(st.integers(-6, 3))
    return A, G, tokens, kind  # A and G are nonzero at padded tokens: FactoredGrad masks them


def _reference(fg):
    return torch.linalg.svdvals(fg.materialize())  # (B, min(d_in, d_out)), padded tokens masked


@settings(max_examples=120, deadline=None)
@given(padded_factors())
def test_every_route_equals_svdvals(case):
    A, G, tokens, kind = case
    fg = FactoredGrad(A, G, tokens)
    ref = _reference(fg)
    s1 = ref[:, :1]
    B, T, d_in, d_out = A.shape[0], A.shape[1], A.shape[-1], G.shape[-1]
    lengths = tokens.sum(1)
    rank = torch.minimum(lengths, torch.tensor(min(d_in, d_out))).unsqueeze(1)
    for route in linalg.ROUTES:
        got = fg.singular_values(route=route)
        assert got.shape == (B, min(T, d_in, d_out)) and got.dtype == torch.float64
        k = got.shape[-1]
        assert torch.all((got[:, :k] - ref[:, :k]).abs() <= RTOL * ref[:, :k] + ATOL * s1), route
        assert torch.all(ref[:, k:] <= ATOL * s1)  # beyond r = min(T, d): zero in the reference too
        assert torch.all(got[torch.arange(k) >= rank] == 0), route  # beyond the rank bound: exactly zero
        assert torch.all(got[:, :-1] >= got[:, 1:]), route  # descending


@settings(max_examples=60, deadline=None)
@given(padded_factors(), st.integers(1, 20), st.lists(st.sampled_from(linalg.ROUTES), min_size=4, max_size=4))
def test_layers_sharing_one_input_grams_in_any_order(case, d_out2, routes):
    """K_a and its factors kept by one InputGrams serve layers with other outputs, routes and chunkings."""
    A, G, tokens, _ = case
    G2 = torch.randn(A.shape[0], A.shape[1], d_out2, dtype=torch.float64)
    shared = linalg.InputGrams(A, tokens, share=4)
    for Gx, route in zip((G, G2, G, G2), routes):
        fg = FactoredGrad(A, Gx, tokens)
        got, ref = fg.singular_values(route=route, shared=shared), _reference(fg)
        k = got.shape[-1]
        assert torch.all((got - ref[:, :k]).abs() <= RTOL * ref[:, :k] + ATOL * ref[:, :1]), route
        torch.testing.assert_close(fg.sq_norms(shared=shared), fg.materialize().flatten(1).pow(2).sum(1),
                                   rtol=1e-10, atol=0)


@settings(max_examples=300, deadline=None)
@given(padded_factors())
def test_both_norm_routes_equal_dense(case):
    A, G, tokens, _ = case
    fg = FactoredGrad(A, G, tokens)
    want = fg.materialize().flatten(1).pow(2).sum(1)
    # the ghost sum adds T^2 terms (a_t.a_s)(g_t.g_s) whose size is up to (sum_t |a_t| |g_t|)^2: when the tokens'
    # contributions cancel (||M|| much smaller), its rounding is eps times that scale, not times ||M||^2
    m = tokens.unsqueeze(-1).to(A.dtype)
    scale = ((A * m).norm(dim=-1) * (G * m).norm(dim=-1)).sum(-1).pow(2)

    def close(got, msg):
        err = (got - want).abs()
        assert bool((err <= 1e-10 * want + 1e-13 * scale).all()), (msg, err, want, scale)

    for route in linalg.NORM_ROUTES:
        close(linalg.factored_sq_norms(A, G, tokens=tokens, route=route), route)
        close(fg.sq_norms(route=route), route)
    fg.K_a(), fg.K_g()  # with both padded Grams cached, the ghost sum over them
    close(fg.sq_norms(), "cached Grams")


def test_float32_norms_are_as_exact_as_the_float32_gradient():
    """float32 factors: the dense route squares float32 row norms in float64 (no float64 copy of M); it agrees
    with the float64 sum of squares of the same float32 M to ~n eps32, and huge entries fall back to float64."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 40, 300, generator=g)
    G = torch.randn(5, 40, 200, generator=g)
    tokens = torch.ones(5, 40, dtype=torch.bool)
    tokens[1, 25:] = False
    M = (G * tokens[..., None]).transpose(-1, -2) @ (A * tokens[..., None])  # float32, like the route's own
    want = M.double().pow(2).sum(dim=(-1, -2))
    got = linalg.factored_sq_norms(A, G, tokens=tokens, route="dense")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    big = 1e20 * A  # row norms overflow in float32, the norm itself is finite in float64
    got = linalg.factored_sq_norms(big, G, tokens=tokens, route="dense")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want * 1e40, rtol=1e-5, atol=0)


def test_cost_model_short_sequences_gram_long_ones_the_smaller_side():
    # SmolLM2 attention (576 -> 576, 576 -> 192) and MLP (576 -> 1536, 1536 -> 576)
    for d_in, d_out in [(576, 576), (576, 192), (576, 1536), (1536, 576)]:
        for share in (1, 2, 3):
            assert linalg.choose_routes([32, 128], d_in, d_out, share=share) == ["gram", "gram"]
            long_route = "in" if d_in < d_out else "out"
            assert linalg.choose_routes([843, 2000], d_in, d_out, share=share) == [long_route] * 2
    c = linalg.spectra_costs(843, 576, 192)
    assert c["out"] < c["gram"] and c["out"] < c["dense"] and c["out"] < c["in"]
    assert linalg.prefer_gram_route(64, 4096, 4096) and not linalg.prefer_gram_route(8192, 64, 64)
    assert linalg.choose_routes([5, 900], 576, 192, route="dense") == ["dense", "dense"]
    with pytest.raises(ValueError, match="unknown route"):
        linalg.choose_routes([5], 4, 4, route="svd")
    n = linalg.norm_costs(32, 576, 576)
    assert n["ghost"] < n["dense"]
    n = linalg.norm_costs(2000, 576, 192, share=3)
    assert n["dense"] < n["ghost"]


def test_short_example_padded_next_to_a_long_one_takes_its_own_route(monkeypatch):
    d_in, d_out, T = 40, 6, 60
    assert linalg.choose_routes([3, T], d_in, d_out) == ["gram", "out"]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, T, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(2, T, d_out, generator=g, dtype=torch.float64)
    tokens = torch.ones(2, T, dtype=torch.bool)
    tokens[0, 3:] = False  # example 0: 3 real tokens, padded to 60
    sizes = []
    eig = linalg.eigvalsh

    def spy(S):
        sizes.append(tuple(S.shape))
        return eig(S)

    monkeypatch.setattr(linalg, "eigvalsh", spy)
    fg = FactoredGrad(A, G, tokens)
    got = fg.singular_values()
    assert sorted(sizes) == [(1, 3, 3), (1, d_out, d_out)]  # a 3 x 3 problem, not 60 x 60; 6 x 6 for the long
    ref = _reference(fg)
    assert torch.all((got - ref).abs() <= RTOL * ref + ATOL * ref[:, :1])
    assert torch.all(got[0, 3:] == 0)


@pytest.mark.parametrize("padded", [True, False])
def test_input_grams_serve_any_grouping_of_examples(padded):
    g = torch.Generator().manual_seed(2)
    B, T, d_in = 3, 7, 5  # T > d_in: rank-deficient K_a, Cholesky fails for the full-length examples
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    tokens = None
    if padded:
        tokens = torch.ones(B, T, dtype=torch.bool)
        tokens[0, :5] = False  # left padding: 2 real tokens, gathered to the front
        tokens[2, [1, 4]] = False  # scattered: 5 real tokens
    ig = linalg.InputGrams(A, tokens)
    lengths = ig.lengths
    for rows in ([0], [1, 2], [0, 1, 2], [2, 0], [0, 2]):
        Tc = max(lengths[e] for e in rows) + (1 if rows == [0, 2] else 0)  # one chunk longer than any row
        K, L = ig.K(rows, Tc), ig.L(rows, Tc)
        for i, e in enumerate(rows):
            n = lengths[e]
            a = A[e] if tokens is None else A[e][tokens[e]]
            torch.testing.assert_close(K[i, :n, :n], a @ a.T, rtol=1e-12, atol=1e-12)
            assert torch.all(K[i, n:] == 0) and torch.all(K[i, :, n:] == 0)
            want = torch.block_diag(a @ a.T, torch.eye(Tc - n, dtype=torch.float64))
            torch.testing.assert_close(L[i] @ L[i].T, want, rtol=1e-10, atol=1e-10)
    assert ig.computed == {"K": B, "L": B}


class _Recording(linalg.InputGrams):
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _Recording.made.append(self)


@pytest.mark.parametrize("route", ["gram", "out", "auto"])
def test_batch_spectra_shares_K_a_across_layers_reading_one_input(monkeypatch, route):
    B, T, d_in = 3, 6, 40
    g = torch.Generator().manual_seed(1)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    tokens = torch.ones(B, T, dtype=torch.bool)
    tokens[1, 4:] = False
    tokens[2, 2:] = False
    # q/k/v-like: one input tensor, three outputs; plus a layer with its own input
    grads = {f"p{d}": FactoredGrad(A, torch.randn(B, T, d, generator=g, dtype=torch.float64), tokens)
             for d in (3, 4, 5)}
    grads["other"] = FactoredGrad(A.clone(), torch.randn(B, T, 4, generator=g, dtype=torch.float64), tokens)
    lengths = tokens.sum(1).tolist()
    if route != "gram":  # the d_out x d_out matrices G^T K_a G go through the shared K_a at these sizes
        assert all(linalg.choose_routes(lengths, d_in, d, route="out", share=3) == ["out"] * B for d in (3, 4, 5))
        assert all(linalg.via_gram("out", t, d_in, d, share=3) for t in lengths for d in (3, 4, 5))
    plans = [linalg.choose_routes(lengths, d_in, d, route=route, share=3) for d in (3, 4, 5)]
    with_gram = {e for plan in plans for e, r in enumerate(plan) if r == "gram"}
    if route == "auto":  # mixed: the 6-token example by d_out x d_out, the shorter ones by T x T
        assert plans[-1] == ["out", "gram", "gram"]
    _Recording.made = []
    monkeypatch.setattr(linalg, "InputGrams", _Recording)
    stats = batch_spectra(grads, route=route)
    assert [ig.share for ig in _Recording.made] == [3, 1]
    shared = _Recording.made[0]
    assert shared.computed["K"] == B  # each example's K_a once for the three layers
    assert shared.computed["L"] == len(with_gram)  # and the Cholesky factor once, where a T x T route needs it
    for name, fg in grads.items():  # sharing changes nothing
        alone = batch_spectra({name: FactoredGrad(fg.A.clone(), fg.G, tokens)}, route=route)[name]
        for m, v in stats[name].items():
            torch.testing.assert_close(v, alone[m], rtol=1e-12, atol=1e-14)
    _Recording.made = []
    norms = batch_sq_norms(grads)
    assert _Recording.made[0].computed["K"] == B  # the ghost route reuses the shared K_a too
    for name, fg in grads.items():
        torch.testing.assert_close(norms[name], fg.materialize().flatten(1).pow(2).sum(1), rtol=1e-10, atol=0)


def test_dense_grad_keeps_svdvals_for_every_route():
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    for route in linalg.ROUTES:
        torch.testing.assert_close(DenseGrad(g).singular_values(route=route), torch.linalg.svdvals(g))
    with pytest.raises(ValueError, match="unknown route"):
        DenseGrad(g).singular_values(route="svd")
    with pytest.raises(ValueError, match="unknown route"):
        batch_spectra({"x": FactoredGrad(torch.ones(1, 2, 3), torch.ones(1, 2, 2), torch.ones(1, 2).bool())},
                      route="svd")
