"""Stochastic trace estimation from matrix-vector products: Hutchinson and Hutch++.

Hutchinson: tr(A) ≈ (1/m) sum_i z_i^T A z_i with i.i.d. probes z_i, E[z z^T] = I. Unbiased; the per-probe variance
is 2 (||A||_F^2 - sum_j A_jj^2) for Rademacher (±1) probes, 2 ||A||_F^2 for Gaussian ones, so Rademacher probes
are exact (zero variance) for diagonal matrices.

Hutch++ (Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021, Algorithm 1),
with a budget of m products: S, G with m/3 random ±1 columns each; Q = orth(A S);

    tr(A) ≈ tr(Q^T A Q) + (3/m) tr(G^T (I - Q Q^T) A (I - Q Q^T) G)

The first term is exact on the sketched subspace (it captures the large eigenvalues), the second is Hutchinson on
the deflated remainder, whose Frobenius norm is much smaller when the spectrum decays. Error O(1/m) instead of
Hutchinson's O(1/sqrt(m)) for PSD matrices.

Both take the operator as in `lanczos.py` (a matvec callable plus `dim`, or an object with .matvec/.dim/.dtype/
.device) and return a `TraceEstimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lanczos import Counted, check_positive_int, generator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp"]


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        estimate: the trace estimate (float).
        stderr: its standard error: std(samples, ddof=1) / sqrt(len(samples)) (NaN with one sample). For
            Hutch++ it is conditional on the sketch Q (the exact part has no variance given Q).
        n_products: matrix-vector products used.
        samples: (n,) float64 per-probe quadratic forms z^T A z (Hutch++: z^T P A P z on the deflated part).
        exact_part: tr(Q^T A Q) for Hutch++, 0.0 for Hutchinson.
        method: "hutchinson" or "hutch++".
        distribution: probe distribution, "rademacher" or "gaussian".
    """

    estimate: float
    stderr: float
    n_products: int
    samples: torch.Tensor
    exact_part: float
    method: str
    distribution: str

    @property
    def n_probes(self) -> int:
        return int(self.samples.numel())


def _stderr(samples: torch.Tensor) -> float:
    n = samples.numel()
    return float(samples.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def hutchinson(
    A,
    dim: int | None = None,
    n_probes: int = 100,
    *,
    distribution: str = "rademacher",
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson trace estimate, streaming: one probe and one product at a time (memory: a few vectors).

    Args:
        A: matvec callable on flat (dim,) tensors, or an object with .matvec/.dim/.dtype/.device.
        dim: vector length (taken from A if it has .dim).
        n_probes: number of probes (the maximum when tol is given; PyHessian's maxIter = 100).
        distribution: "rademacher" (±1, lower variance, exact for diagonal A) or "gaussian".
        tol: None (default) spends exactly n_probes products. A float reproduces PyHessian's `trace` stopping
            rule: stop when |mean - previous mean| / (|previous mean| + 1e-6) < tol (previous mean starts at 0);
            PyHessian's default is 1e-3. Data-dependent stopping makes the estimate slightly biased.
        seed: seeds the probes (drawn on the CPU, so the result does not depend on the device).
        dtype, device: working precision and device.

    Returns:
        TraceEstimate with estimate = mean of the samples and stderr = std / sqrt(n).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> hutchinson(lambda v: A @ v, dim=100, n_probes=1, dtype=A.dtype).estimate   # exact for diagonal A
        5050.0
    """
    op = Counted(A, dim, dtype, device)
    n_probes = check_positive_int("n_probes", n_probes)
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number or None, got {tol!r}")
    gen = generator(seed)
    samples: list[float] = []
    mean_prev = 0.0
    for _ in range(n_probes):
        z = op.probe(gen, distribution)
        samples.append(float(z @ op(z)))
        if tol is not None:
            mean = math.fsum(samples) / len(samples)
            if abs(mean - mean_prev) / (abs(mean_prev) + 1e-6) < tol:
                break
            mean_prev = mean
    s = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(
        estimate=math.fsum(samples) / len(samples),
        stderr=_stderr(s),
        n_products=op.n_products,
        samples=s,
        exact_part=0.0,
        method="hutchinson",
        distribution=distribution,
    )


def hutchpp(
    A,
    dim: int | None = None,
    n_products: int = 99,
    *,
    distribution: str = "rademacher",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ trace estimate with a budget of `n_products` matrix-vector products (Meyer et al. 2021, Alg. 1).

    Budget split as in the paper: s = n_products // 3 sketch columns (A S, then A Q), the remaining
    n_products - 2 s go to Hutchinson probes on the deflated operator (I - QQ^T) A (I - QQ^T). If s >= dim
    the sketch spans the whole space: the trace is exact and only 2 dim products are spent.

    Memory: about 2 s vectors of length dim (S, then Q and A Q); the sketch products go through `.matmat`
    when the operator has one.

    Args:
        A: matvec callable on flat (dim,) tensors, or an object with .matvec/.dim/.dtype/.device (.matmat used
            if present).
        dim: vector length (taken from A if it has .dim).
        n_products: total product budget, >= 3.
        distribution: probe distribution for S and G, "rademacher" (the paper's choice) or "gaussian".
        seed: seeds S and G.
        dtype, device: working precision and device.

    Returns:
        TraceEstimate with estimate = tr(Q^T A Q) + mean of the deflated samples, exact_part = tr(Q^T A Q), and
        stderr of the deflated Hutchinson part (conditional on Q).

    Example:
        >>> lam = 1.0 / torch.arange(1, 201, dtype=torch.float64) ** 2
        >>> Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
        >>> A = Q @ torch.diag(lam) @ Q.T
        >>> t = hutchpp(lambda v: A @ v, dim=200, n_products=30, dtype=A.dtype)
        >>> abs(t.estimate - float(lam.sum())) < 0.05        # tr = 1.640; Hutchinson's sd at 30 products: 0.28
        True
    """
    op = Counted(A, dim, dtype, device)
    m = check_positive_int("n_products", n_products, minimum=3)
    gen = generator(seed)
    s = min(m // 3, op.dim)
    n_g = 0 if s == op.dim else m - 2 * s

    S = op.probe(gen, distribution, s)  # (dim, s)
    Q, _ = torch.linalg.qr(op.matmat(S))  # (dim, s), orthonormal columns even if A S is rank deficient
    AQ = op.matmat(Q)  # (dim, s)
    exact = float((Q * AQ).sum())  # tr(Q^T A Q)

    samples = []
    for _ in range(n_g):
        g = op.probe(gen, distribution)
        g = g - Q @ (Q.T @ g)  # P g with P = I - Q Q^T
        g = g - Q @ (Q.T @ g)  # twice: keeps P g orthogonal to Q to working precision
        samples.append(float(g @ op(g)))  # g^T P A P g
    x = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(
        estimate=exact + (math.fsum(samples) / n_g if n_g else 0.0),
        stderr=_stderr(x) if n_g else 0.0,
        n_products=op.n_products,
        samples=x,
        exact_part=exact,
        method="hutch++",
        distribution=distribution,
    )
