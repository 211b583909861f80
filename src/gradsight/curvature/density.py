"""Spectral density by stochastic Lanczos quadrature (SLQ), with PyHessian's defaults (METHODS 8.4).

For a unit probe u (normalised Rademacher or Gaussian vector), m Lanczos steps started at u build the tridiagonal
T_m = V^T A V; with T_m = S diag(tau) S^T, the nodes tau_k (Ritz values) and weights w_k = S[0, k]^2 (sum to 1)
form the m-point Gauss quadrature of the spectral measure of A seen from u:

    sum_k w_k f(tau_k) ≈ u^T f(A) u,        exactly for polynomials f of degree < 2m.

Since E[u u^T] = I / dim for both probe kinds, E[sum_k w_k tau_k^j] = tr(A^j) / dim (j < 2m), and the average over
probes of sum_k w_k delta(t - tau_k) estimates the normalised spectral density (1/dim) sum_i delta(t - lambda_i).
`SLQResult.density` smooths it with PyHessian's Gaussian kernel (density_plot.py).

Memory: full re-orthogonalisation stores all m Lanczos vectors (m * dim entries: 100 x P floats with PyHessian's
iter = 100). `max_vectors` bounds this (see `slq`).

Reference: Lin, Saad, Yang, "Approximating spectral densities of large matrices", SIAM Review 2016; Ghorbani,
Krishnan, Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density", ICML 2019;
Yao et al., PyHessian (2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .lanczos import Basis, Counted, LanczosProcess, check_positive_int, generator, tridiag_eigh

__all__ = ["SLQResult", "slq"]


@dataclass(frozen=True)
class SLQResult:
    """Quadrature nodes and weights per probe.

    Attributes:
        nodes: (n_probes, m) float64 Ritz values tau_k, ascending per probe.
        weights: (n_probes, m) float64 weights w_k = (first component of the k-th eigenvector of T)^2; rows sum to 1.
        n_products: matrix-vector products used (n_probes * m).
        n_steps: m, Lanczos steps per probe (min(requested, dim)).
        max_vectors: the bound on stored Lanczos vectors (None: full re-orthogonalisation, m stored).
        peak_vectors: the largest number of Lanczos vectors held at once (over all probes).
        distribution: "rademacher" or "gaussian".
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    n_products: int
    n_steps: int
    max_vectors: int | None
    peak_vectors: int
    distribution: str

    def moments(self, max_order: int = 3) -> torch.Tensor:
        """Quadrature moments sum_k w_k tau_k^j for j = 0..max_order, per probe: (n_probes, max_order + 1).

        Each row estimates tr(A^j) / dim without bias (exact quadrature for j < 2m); average over probes.
        """
        j = torch.arange(max_order + 1, dtype=torch.float64)
        return (self.weights[:, :, None] * self.nodes[:, :, None] ** j).sum(dim=1)  # (n_probes, max_order + 1)

    def density(
        self,
        grid: torch.Tensor | None = None,
        *,
        num_bins: int = 10_000,
        sigma_squared: float = 1e-5,
        overhead: float = 0.01,
        normalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian-smoothed spectral density, PyHessian's `density_generate` (density_plot.py).

        Grid: `num_bins` points on [mean_p min tau - overhead, mean_p max tau + overhead] (means over probes);
        kernel variance s^2 = sigma_squared * max(1, grid width) (the width including the overhead);
        phi(t) = mean over probes of sum_k w_k N(t; tau_k, s^2), renormalised so that its Riemann sum on the grid
        is 1 (normalized spectral density; multiply by dim for eigenvalue counts).

        Args:
            grid: optional 1-D grid of evaluation points (then s^2 uses the grid width).
            num_bins, sigma_squared, overhead: PyHessian defaults 10000, 1e-5, 0.01.
            normalize: renormalise by the Riemann sum (PyHessian does); False keeps the raw mixture.

        Returns:
            (grid, phi), both (num_bins,) float64.
        """
        if grid is None:
            lo = float(self.nodes.min(dim=1).values.mean()) - overhead
            hi = float(self.nodes.max(dim=1).values.mean()) + overhead
            grid = torch.linspace(lo, hi, num_bins, dtype=torch.float64)
        else:
            grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
            lo, hi = float(grid.min()), float(grid.max())
        s2 = sigma_squared * max(1.0, hi - lo)
        phi = torch.zeros_like(grid)
        for tau, w in zip(self.nodes, self.weights):  # (m,) each; m x num_bins per probe
            z = (grid[None, :] - tau[:, None]) ** 2 / (2.0 * s2)  # (m, num_bins)
            phi += (w[:, None] * torch.exp(-z)).sum(dim=0) / math.sqrt(2.0 * math.pi * s2)
        phi /= self.nodes.shape[0]
        if normalize and grid.numel() > 1:
            phi = phi / (phi.sum() * (grid[1] - grid[0]))
        return grid, phi


def slq(
    A,
    dim: int | None = None,
    n_probes: int = 1,
    n_steps: int = 100,
    *,
    distribution: str = "rademacher",
    max_vectors: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SLQResult:
    """Stochastic Lanczos quadrature: nodes and weights of the spectral measure, per probe.

    PyHessian defaults: n_probes (n_v) = 1, n_steps (iter) = 100, Rademacher probes, full re-orthogonalisation,
    restart with a random vector orthogonal to the basis when beta = 0. T is decomposed with a symmetric
    tridiagonal solver in float64 (PyHessian uses the general `eig`).

    Bounded memory (`max_vectors=b`, b >= 2): at most b Lanczos vectors are stored, in a ring buffer, and each new
    vector is re-orthogonalised against those b only (b = 2 is plain Lanczos with no re-orthogonalisation beyond
    the three-term recurrence). Caveat: orthogonality to older vectors is lost once Ritz values converge, so
    converged extreme eigenvalues reappear as duplicate ("ghost") nodes that share their weight. The extreme
    nodes still converge to the extreme eigenvalues, and the quadrature stays accurate for smooth functions
    (Greenbaum 1989; Meurant & Strakos 2006: finite-precision Lanczos is exact Lanczos for a nearby larger
    matrix whose eigenvalues cluster at A's), but node multiplicities are not eigenvalue multiplicities and
    the moment identity for j < 2m holds only approximately. Memory: b * dim entries plus a few work vectors.

    Args:
        A: matvec callable on flat (dim,) tensors, or an object with .matvec/.dim/.dtype/.device.
        dim: vector length (taken from A if it has .dim).
        n_probes: independent probes (PyHessian n_v).
        n_steps: Lanczos steps m per probe (PyHessian iter), capped at dim.
        distribution: "rademacher" or "gaussian" start vectors (normalised to unit norm).
        max_vectors: None for full re-orthogonalisation, or the bound b >= 2 on stored vectors.
        seed: seeds the probes and restart vectors.
        dtype, device: working precision and device.

    Returns:
        SLQResult (nodes, weights, n_products = n_probes * m, ...); `.moments()` and `.density()` derive from it.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = slq(lambda v: A @ v, dim=100, n_probes=2, n_steps=30, dtype=A.dtype)
        >>> r.moments(1).mean(0)     # tr(A^0)/dim and tr(A)/dim
        tensor([ 1.0000, 50.5000], dtype=torch.float64)
        >>> grid, phi = r.density()
    """
    op = Counted(A, dim, dtype, device)
    n_probes = check_positive_int("n_probes", n_probes)
    m = min(check_positive_int("n_steps", n_steps), op.dim)
    if max_vectors is not None:
        max_vectors = check_positive_int("max_vectors", max_vectors, minimum=2)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    capacity = None if max_vectors is None or max_vectors >= m else max_vectors
    gen = generator(seed)
    nodes, weights, peak = [], [], 0
    for _ in range(n_probes):
        basis = Basis(op.dim, op.dtype, op.device, capacity=capacity, initial=m)
        proc = LanczosProcess(op, op.probe(gen, distribution), basis, gen)
        for j in range(m):
            proc.step()
            if j < m - 1:
                proc.advance()
        tau, S = tridiag_eigh(proc.alpha, proc.beta)  # (m,), (m, m)
        nodes.append(tau)
        weights.append(S[0] ** 2)
        peak = max(peak, basis.peak)
        del basis, proc
    return SLQResult(
        nodes=torch.as_tensor(np.stack(nodes), dtype=torch.float64),
        weights=torch.as_tensor(np.stack(weights), dtype=torch.float64),
        n_products=op.n_products,
        n_steps=m,
        max_vectors=max_vectors,
        peak_vectors=peak,
        distribution=distribution,
    )
