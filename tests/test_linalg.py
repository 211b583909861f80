"""Gram-route singular values and factored products against dense references (property tests)."""

import math

import torch
from hypothesis import given, settings, strategies as st

from gradsight.capture import linalg
from gradsight.capture.grads import FactoredGrad
from gradsight.measures.spectra import spectral_stats


@st.composite
def factor_pairs(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    d_in = draw(st.integers(1, 10))
    d_out = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # rank deficiency: repeated tokens
        A[:, -1] = A[:, 0]
    if draw(st.booleans()):  # zero output gradient at a token (e.g. the last position of a causal LM)
        G[:, -1] = 0
    lengths = [draw(st.integers(1, T)) for _ in range(B)]
    tokens = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        tokens[b, :n] = True
    scale = 10.0 ** draw(st.integers(-6, 3))
    return A * scale, G, tokens


@settings(max_examples=150, deadline=None)
@given(factor_pairs())
def test_gram_route_equals_svdvals(pair):
    A, G, tokens = pair
    fg = FactoredGrad(A, G, tokens)
    M = fg.materialize()  # (B, d_out, d_in), padded tokens masked
    ref = torch.linalg.svdvals(M)
    got = fg.singular_values(route="gram")
    k = min(ref.shape[-1], got.shape[-1])
    s1 = ref[:, :1].clamp_min(1e-300)
    # the Gram route is exact up to a floor of ~sqrt(eps) * sigma_1 for (numerically) zero values
    assert torch.all((got[:, :k] - ref[:, :k]).abs() <= 1e-6 * s1 + 1e-12 * ref[:, :k])
    assert torch.all(got[:, k:] <= 1e-6 * s1)
    assert torch.all(ref[:, k:] <= 1e-6 * s1)
    a, b = spectral_stats(got), spectral_stats(ref)
    for m in ("frobenius", "nuclear", "spectral"):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-300)
    torch.testing.assert_close(fg.sq_norms(), M.flatten(1).pow(2).sum(1), rtol=1e-10, atol=1e-300)


@settings(max_examples=50, deadline=None)
@given(factor_pairs())
def test_inner_products_equal_dense(pair):
    A, G, tokens = pair
    fg = FactoredGrad(A, G, tokens)
    M = fg.materialize().flatten(1)
    torch.testing.assert_close(fg.inner(fg), M @ M.T, rtol=1e-10, atol=1e-12)


def test_known_effective_ranks():
    """METHODS §2 test 1 and 2: erank of (1,1,1,1) is 4, of (1,0,0) is 1, of (3,1) is 1.75477."""
    s = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0], [3, 1, 0, 0]], dtype=torch.float64)
    st_ = spectral_stats(s)
    torch.testing.assert_close(st_["erank"], torch.tensor([4.0, 1.0, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))],
                                                         dtype=torch.float64))
    assert abs(float(st_["erank"][2]) - 1.75477) < 1e-5
    scaled = spectral_stats(7.5 * s)
    torch.testing.assert_close(scaled["erank"], st_["erank"])
    torch.testing.assert_close(scaled["nuclear"], 7.5 * st_["nuclear"])
    torch.testing.assert_close(st_["stable_rank"], torch.tensor([4.0, 1.0, 10 / 9], dtype=torch.float64))


def test_zero_gradient_gives_nan_ratios():
    st_ = spectral_stats(torch.zeros(1, 3, dtype=torch.float64))
    assert st_["nuclear"].item() == 0
    assert math.isnan(st_["sigma1_ratio"].item()) and math.isnan(st_["erank"].item())


def test_route_choice_prefers_dense_for_long_sequences():
    assert linalg.prefer_gram_route(64, 4096, 4096)
    assert not linalg.prefer_gram_route(8192, 64, 64)


def test_eigvalsh_equals_torch_on_both_sides_of_the_one_thread_size():
    """numpy's LAPACK runs on one thread below ONE_THREAD_BELOW and on its own pool above: same eigenvalues."""
    g = torch.Generator().manual_seed(0)
    for n in (7, linalg.ONE_THREAD_BELOW - 1, linalg.ONE_THREAD_BELOW + 1):
        X = torch.randn(2, n, n, dtype=torch.float64, generator=g)
        S = X + X.transpose(-1, -2)
        torch.testing.assert_close(linalg.eigvalsh(S), torch.linalg.eigvalsh(S), rtol=1e-10, atol=1e-10 * n)
