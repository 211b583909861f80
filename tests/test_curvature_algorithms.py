"""Curvature algorithms on dense float64 reference matrices: Lanczos, power iteration, Hutchinson, Hutch++, SLQ.

Matrices are Q diag(lam) Q^T with a known spectrum (or diagonal, or a Householder rotation for dim 2000), so
every answer is known. Stochastic estimators are tested statistically (mean within a few standard errors over
many seeds), per METHODS 8 and STYLE habit 4.
"""

import math

import pytest
import torch

from gradsight.curvature import density as density_mod
from gradsight.curvature.density import slq
from gradsight.curvature.lanczos import NonFiniteProductError, lanczos, power_iteration, stability
from gradsight.curvature.trace import hutchinson, hutchpp

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def sym(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(lam) Q^T with a seeded Haar-like orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * lam) @ Q.T


def mv(A):
    return lambda v: A @ v


class Dense:
    """A minimal CurvatureOperator look-alike: .matvec .matmat .dim .dtype .device .n_products."""

    def __init__(self, A):
        self.A, self.dim, self.dtype, self.device, self.n_products = A, A.shape[0], A.dtype, A.device, 0

    def matvec(self, v):
        self.n_products += 1
        return self.A @ v

    def matmat(self, V):
        self.n_products += V.shape[1]
        return self.A @ V


# spectra with clusters and negative eigenvalues at both ends
SPECTRA = {
    "clustered-top": lambda g: torch.cat([torch.tensor([10.0, 9.99, 9.98, 7.0, -4.0, -3.999]),
                                          torch.rand(294, generator=g, dtype=F64) * 2 - 1]),
    "negative-dominant": lambda g: torch.cat([torch.tensor([-50.0, -49.9, -20.0, 3.0, 2.95]),
                                              torch.randn(195, generator=g, dtype=F64)]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("which", ["top", "bottom", "both", "magnitude"])
def test_lanczos_matches_eigvalsh(name, which):
    lam = SPECTRA[name](torch.Generator().manual_seed(1))
    A = sym(lam, seed=2)
    ref = torch.linalg.eigvalsh(A)  # ascending
    k = 3
    r = lanczos(mv(A), dim=A.shape[0], k=k, which=which, dtype=F64, return_eigenvectors=True)
    want = {"top": ref.flip(0)[:k], "bottom": ref[:k], "both": torch.cat([ref.flip(0)[:k], ref[:k]]),
            "magnitude": ref[ref.abs().argsort(descending=True)][:k]}[which]
    torch.testing.assert_close(r.eigenvalues, want, rtol=1e-6, atol=0)
    assert r.converged.all()
    assert r.n_products == r.n_iter < A.shape[0]
    # eigenvectors: unit norm, true residuals small and matching the free Lanczos estimates
    Y = r.eigenvectors
    assert Y.shape == (A.shape[0], len(want))
    torch.testing.assert_close(Y.norm(dim=0), torch.ones(len(want), dtype=F64))
    true_res = (A @ Y - Y * r.eigenvalues).norm(dim=0)
    assert torch.all(true_res <= 2e-6 * r.eigenvalues.abs())
    assert torch.all((true_res - r.residuals).abs() <= 1e-9 * r.eigenvalues.abs().max())


def test_lanczos_few_products_for_outliers_plus_bulk():
    # dim 2000: 5 outliers in [60, 100] above a bulk in [0, 1], A = H diag(lam) H with a Householder reflection H
    n = 2000
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.tensor([100.0, 90.0, 80.0, 70.0, 60.0]), torch.rand(n - 5, generator=g, dtype=F64)])
    lam = lam[torch.randperm(n, generator=g)]
    u = torch.randn(n, generator=g, dtype=F64)
    u /= u.norm()

    def H(v):  # (I - 2 u u^T) v
        return v - 2 * u * (u @ v)

    r = lanczos(lambda v: H(lam * H(v)), dim=n, k=5, which="top", dtype=F64)
    torch.testing.assert_close(r.eigenvalues, torch.tensor([100.0, 90.0, 80.0, 70.0, 60.0], dtype=F64),
                               rtol=1e-6, atol=0)
    assert r.n_products <= 20  # measured: 10 products for the top 5 of a 2000 x 2000 operator


def test_lanczos_accepts_operator_objects_and_is_deterministic():
    A = sym(torch.linspace(-1, 3, 80, dtype=F64), seed=4)
    op = Dense(A)
    r1 = lanczos(op, k=2)
    assert r1.n_products == op.n_products  # our count agrees with the operator's
    r2 = lanczos(mv(A), dim=80, k=2, dtype=F64)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)  # same seed, same start vector
    torch.testing.assert_close(r1.eigenvalues, torch.tensor([3.0, 3.0 - 4 / 79], dtype=F64), rtol=1e-6, atol=0)


def test_lanczos_float32_operator():
    A = sym(torch.cat([torch.tensor([5.0, 4.0]), torch.rand(98, dtype=F64)]), seed=5).float()
    r = lanczos(mv(A), dim=100, k=2, tol=1e-4, dtype=torch.float32, return_eigenvectors=True)
    assert r.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(r.eigenvalues, torch.tensor([5.0, 4.0], dtype=F64), rtol=1e-5, atol=0)


def test_known_answer_diag_5_3_m7_1():
    # METHODS 8.3 test 3: power iteration returns -7 (largest magnitude) then 5; Lanczos gives max 5 and min -7
    D = torch.diag(torch.tensor([5.0, 3.0, -7.0, 1.0], dtype=F64))
    p = power_iteration(mv(D), dim=4, k=2, tol=1e-10, max_iter=1000, dtype=F64)
    # rtol 1e-5: PyHessian normalises by ||v|| + 1e-6, so the Rayleigh quotient is lambda (1 - 1e-6)^2
    torch.testing.assert_close(p.eigenvalues, torch.tensor([-7.0, 5.0], dtype=F64), rtol=1e-5, atol=0)
    assert p.converged.all()
    r = lanczos(mv(D), dim=4, k=1, which="both", dtype=F64)
    torch.testing.assert_close(r.eigenvalues, torch.tensor([5.0, -7.0], dtype=F64), rtol=1e-12, atol=0)
    r = lanczos(mv(D), dim=4, k=1, which="magnitude", dtype=F64)
    torch.testing.assert_close(r.eigenvalues, torch.tensor([-7.0], dtype=F64), rtol=1e-12, atol=0)


def test_power_iteration_reproduces_top_k_and_lanczos_is_cheaper():
    g = torch.Generator().manual_seed(1)
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.rand(297, generator=g, dtype=F64) * 2])  # separated
    A = sym(lam, seed=2)
    top = lam[:3]
    # PyHessian defaults (tol 1e-3 on the relative change): top 3 within a few 1e-3
    p = power_iteration(mv(A), dim=300, k=3, dtype=F64)
    assert torch.all(((p.eigenvalues - top) / top).abs() <= 5e-3)
    # products to reach rtol 1e-3: power iteration needs tol 1e-4, Lanczos residual tol 1e-3
    p = power_iteration(mv(A), dim=300, k=3, tol=1e-4, dtype=F64)
    assert torch.all(((p.eigenvalues - top) / top).abs() <= 1e-3)
    r = lanczos(mv(A), dim=300, k=3, tol=1e-3, dtype=F64)
    assert torch.all(((r.eigenvalues - top) / top).abs() <= 1e-3)
    assert r.n_products <= 0.5 * p.n_products  # measured: ~9-10 vs ~40-50


# ---------------------------------------------------------------------------------------------------------------
# trace


def test_hutchinson_exact_for_diagonal():
    # METHODS 8.2 test: with Rademacher probes every single probe gives tr(A) exactly
    d = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = hutchinson(lambda v: d * v, dim=100, n_probes=5, dtype=F64)
    torch.testing.assert_close(t.samples, torch.full((5,), float(d.sum()), dtype=F64), rtol=1e-12, atol=1e-12)
    assert t.stderr <= 1e-12 and t.n_products == 5


def test_hutchinson_per_probe_variance_2x2():
    # A = [[2, 1], [1, 3]]: z^T A z = 5 + 2 z1 z2 in {3, 7}, per-probe variance 2 (15 - 13) = 4
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    t = hutchinson(mv(A), dim=2, n_probes=2000, dtype=F64)
    assert set(t.samples.tolist()) == {3.0, 7.0}
    assert abs(float(t.samples.var()) - 4.0) < 0.05
    assert abs(t.estimate - 5.0) < 4 * t.stderr


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_and_stderr_covers(distribution):
    A = sym(torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=F64), seed=3)
    truth = float(A.trace())
    est = [hutchinson(mv(A), dim=50, n_probes=20, distribution=distribution, seed=s, dtype=F64)
           for s in range(300)]
    x = torch.tensor([e.estimate for e in est])
    assert abs(float(x.mean()) - truth) < 4 * float(x.std()) / math.sqrt(len(x))
    covered = sum(abs(e.estimate - truth) <= 1.96 * e.stderr for e in est) / len(est)
    assert 0.85 <= covered <= 0.99  # nominal 0.95 (t-quantile with 19 dof is 2.09, so slightly under)


def test_hutchinson_pyhessian_stopping_rule():
    A = sym(torch.rand(40, dtype=F64) + 1.0, seed=6)
    t = hutchinson(mv(A), dim=40, n_probes=100, tol=1e-2, dtype=F64)
    assert 1 < t.n_products < 100 and t.n_probes == t.n_products
    assert abs(t.estimate - float(A.trace())) / float(A.trace()) < 0.1


def test_hutchpp_lower_variance_than_hutchinson_at_equal_budget():
    n = 200
    lam = 1.0 / torch.arange(1, n + 1, dtype=F64) ** 2  # decaying spectrum
    A = sym(lam, seed=3)
    truth = float(lam.sum())
    hp = [hutchpp(Dense(A), n_products=30, seed=s) for s in range(150)]
    h = torch.tensor([hutchinson(mv(A), dim=n, n_probes=30, seed=s, dtype=F64).estimate for s in range(150)])
    x = torch.tensor([e.estimate for e in hp])
    assert all(e.n_products == 30 for e in hp)
    assert abs(float(x.mean()) - truth) < 4 * float(x.std()) / math.sqrt(len(x))  # unbiased
    ratio = float(x.var() / h.var())
    assert ratio <= 0.7  # measured: ~0.002
    covered = sum(abs(e.estimate - truth) <= 1.96 * e.stderr for e in hp) / len(hp)
    assert 0.8 <= covered <= 1.0


def test_hutchpp_exact_when_sketch_spans_space():
    A = sym(torch.randn(10, dtype=F64), seed=7)
    t = hutchpp(mv(A), dim=10, n_products=40, dtype=F64)
    assert t.n_products == 20 and t.stderr == 0.0
    assert abs(t.estimate - float(A.trace())) < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# SLQ


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_slq_moments_unbiased(distribution):
    n = 60
    A = sym(torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=F64), seed=8)
    r = slq(mv(A), dim=n, n_probes=300, n_steps=4, distribution=distribution, dtype=F64)
    assert r.n_products == 1200 and r.nodes.shape == (300, 4)
    M = r.moments(3)  # (300, 4)
    truth = torch.stack([torch.linalg.matrix_power(A, j).trace() / n for j in range(4)])
    se = M.std(0) / math.sqrt(M.shape[0])
    assert torch.allclose(M[:, 0], torch.ones(300, dtype=F64))
    assert torch.all((M.mean(0)[1:] - truth[1:]).abs() < 4 * se[1:])


def test_slq_known_answer_diag_1_to_100():
    # METHODS 8.4 test 4: weights sum to 1, nodes in [1, 100], sum w tau -> 50.5 (exact per Rademacher probe)
    D = torch.arange(1.0, 101.0, dtype=F64)
    r = slq(lambda v: D * v, dim=100, n_probes=3, n_steps=30, dtype=F64)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(3, dtype=F64))
    assert r.nodes.min() >= 1 - 1e-9 and r.nodes.max() <= 100 + 1e-9
    torch.testing.assert_close(r.moments(1)[:, 1], torch.full((3,), 50.5, dtype=F64))
    # the extreme nodes converge to the extreme eigenvalues
    assert abs(float(r.nodes[:, 0].mean()) - 1) < 1e-2 and abs(float(r.nodes[:, -1].mean()) - 100) < 1e-2


def test_slq_recovers_few_distinct_eigenvalues_and_density_integrates_to_one():
    d = torch.tensor([1.0, 1, 1, 2, 2, 5, 5, 5, 5, 9] * 20, dtype=F64)  # fractions 0.3, 0.2, 0.4, 0.1
    r = slq(lambda v: d * v, dim=200, n_probes=2, n_steps=10, dtype=F64)  # Krylov space of dim 4, then restarts
    for tau, w in zip(r.nodes, r.weights):
        keep = w > 1e-10
        torch.testing.assert_close(tau[keep], torch.tensor([1.0, 2.0, 5.0, 9.0], dtype=F64))
        torch.testing.assert_close(w[keep], torch.tensor([0.3, 0.2, 0.4, 0.1], dtype=F64))
    grid, phi = r.density()  # PyHessian grid and kernel
    assert grid.shape == phi.shape == (10_000,)
    assert abs(float(grid[0]) - 0.99) < 1e-9 and abs(float(grid[-1]) - 9.01) < 1e-9  # overhead 0.01
    h = float(grid[1] - grid[0])
    assert abs(float(phi.sum()) * h - 1.0) < 1e-12  # renormalised Riemann sum, as PyHessian
    assert abs(float(torch.trapezoid(phi, grid)) - 1.0) < 1e-2  # the 0.01 overhead clips kernel tails at 1 and 9
    # the raw kernel mixture on a wide grid integrates to 1 and puts mass 0.4 at eigenvalue 5
    wide = torch.linspace(0.0, 10.0, 20_001, dtype=F64)
    _, raw = r.density(wide, normalize=False)
    assert abs(float(torch.trapezoid(raw, wide)) - 1.0) < 1e-6
    near5 = (wide - 5).abs() < 0.1
    assert abs(float(torch.trapezoid(raw[near5], wide[near5])) - 0.4) < 1e-6


def test_slq_bounded_memory(monkeypatch):
    seen = []

    class SpyBasis(density_mod.Basis):
        def push(self, v):
            super().push(v)
            seen.append((len(self), self.V.shape[0]))  # vectors held, rows allocated

    monkeypatch.setattr(density_mod, "Basis", SpyBasis)
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.tensor([20.0, 15.0, -10.0]), torch.randn(397, generator=g, dtype=F64)])
    A = sym(lam, seed=5)
    full = slq(mv(A), dim=400, n_steps=60, dtype=F64)
    assert full.peak_vectors == 60
    for b in (2, 8):
        seen.clear()
        r = slq(mv(A), dim=400, n_steps=60, max_vectors=b, dtype=F64)
        assert seen and max(k for k, _ in seen) <= b and max(rows for _, rows in seen) <= b
        assert r.peak_vectors <= b and r.n_products == 60
        # the extremes are still found (possibly with ghost copies), and the low moments stay accurate
        assert abs(float(r.nodes[0, -1]) - 20.0) < 1e-6 and abs(float(r.nodes[0, 0]) + 10.0) < 1e-6
        torch.testing.assert_close(r.moments(3)[0], full.moments(3)[0], rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# stability and bad input


def test_stability_numbers():
    s = stability(30.0, 200.0, 0.05)
    assert (s.lr_lmax, s.lr_trace, s.threshold, s.stable, s.stable_by_trace) == (1.5, 10.0, 2.0, True, False)
    s = stability(torch.tensor(50.0, dtype=F64), None, lr=0.05)
    assert s.lr_lmax == 2.5 and not s.stable and s.lr_trace is None


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_stability_rejects_bad_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        stability(1.0, 2.0, lr)


def test_stability_rejects_nonfinite_curvature():
    with pytest.raises(ValueError, match="lmax"):
        stability(float("nan"), 1.0, 0.1)


def test_bad_inputs():
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="k=6"):
        lanczos(mv(A), dim=5, k=6, dtype=F64)
    with pytest.raises(ValueError, match="k=3"):
        lanczos(mv(A), dim=5, k=3, which="both", dtype=F64)
    with pytest.raises(ValueError, match="k=6"):
        power_iteration(mv(A), dim=5, k=6, dtype=F64)
    with pytest.raises(ValueError, match="dim is required"):
        hutchinson(mv(A))
    with pytest.raises(ValueError, match="max_vectors"):
        slq(mv(A), dim=5, n_steps=4, max_vectors=1, dtype=F64)
    with pytest.raises(ValueError, match="entries"):
        hutchinson(lambda v: v[:3], dim=5, dtype=F64)
    with pytest.raises(ValueError, match="n_products"):
        hutchpp(mv(A), dim=5, n_products=2, dtype=F64)


@pytest.mark.parametrize("algo", ["lanczos", "power", "hutchinson", "hutchpp", "slq"])
def test_nonfinite_product_raises(algo):
    calls = {"n": 0}
    d = torch.arange(1.0, 21.0, dtype=F64)

    def bad(v):
        calls["n"] += 1
        out = d * v
        if calls["n"] == 3:
            out[0] = float("nan")
        return out

    run = {"lanczos": lambda: lanczos(bad, dim=20, k=2, dtype=F64),
           "power": lambda: power_iteration(bad, dim=20, k=1, dtype=F64),
           "hutchinson": lambda: hutchinson(bad, dim=20, n_probes=5, dtype=F64),
           "hutchpp": lambda: hutchpp(bad, dim=20, n_products=9, dtype=F64),
           "slq": lambda: slq(bad, dim=20, n_steps=5, dtype=F64)}[algo]
    with pytest.raises(NonFiniteProductError, match="NaN/inf"):
        run()


def test_bulk_outliers_finds_separated_top_eigenvalues():
    # 3 outliers (10, 7, 5) over a bulk in [0, 0.1]: the median of the SLQ measure sits in the bulk and the
    # largest log-gap of the top-8 eigenvalues' distance to it is between 5 and the bulk's largest value
    from gradsight.curvature.criteria import bulk_outliers, measure_quantile, outlier_split

    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([10.0, 7.0, 5.0], dtype=F64), torch.rand(997, generator=g, dtype=F64) * 0.1])
    top = lanczos(lambda v: d * v, dim=1000, k=8, tol=1e-10, dtype=F64).eigenvalues
    r = slq(lambda v: d * v, dim=1000, n_probes=3, n_steps=40, dtype=F64)
    b = measure_quantile(r, 0.5)
    assert 0.0 <= b <= 0.1
    s = bulk_outliers(r, top)
    assert s["n_outliers"] == 3 and s["bulk_edge"] == pytest.approx(float(d[3:].max()), rel=1e-8)
    assert not s["saturated"] and s["gap_margin"] > 3.0
    assert s["mass_above_edge"] * 1000 == pytest.approx(3, abs=1.5)  # the density side agrees roughly
    # scale-free, and the computed range bounds the count
    assert outlier_split(5.0 * top, 5.0 * b)["n_outliers"] == 3
    assert outlier_split(top[:4], b)["saturated"]  # split right before the last computed eigenvalue
    with pytest.raises(ValueError, match="quantile"):
        measure_quantile(r, 1.5)
