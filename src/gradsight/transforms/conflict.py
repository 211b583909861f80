"""Multi-objective gradient aggregation (PCGrad, MGDA, CAGrad, UPGrad, ODICE, GCond) as functions of the Gram matrix.

With m losses L_1..L_m over shared parameters, stack their gradients as the rows of J (m, P). Every aggregator
here returns weights w (m,), and the update is

    d = w^T J = sum_i w_i g_i.

MGDA, CAGrad, UPGrad and PCGrad (for a fixed projection order) depend on J only through the Gram matrix
K = J J^T (m, m): each projection or min-norm step replaces a vector by a linear combination of the g_i, and
every inner product it needs is an entry of K. So each method is a small function ``weights(K) -> w`` (float64,
on the CPU: m is small), and the P-dimensional work is one Gram and one weighted sum. That is why:

* K may come from anywhere: per-loss gradients (`aggregate_backward`), a Jacobian (`aggregate`), or
  gradsight's factored per-example gradients, without ever forming J;
* the update can be applied without J: d = grad(sum_i w_i L_i) is one more backward of the weighted loss, or
  ``w @ J`` when J is at hand;
* the same K gives the conflict diagnostics (`conflict_stats`: cosines, conflict rate, magnitude similarity)
  that a monitor can log without changing the update.

Methods and conventions (peers differ; each docstring says how):

=============  =======================================================================================
`pcgrad`       Yu et al. 2020. h_i <- h_i - (h_i^T g_j / |g_j|^2) g_j when h_i^T g_j < 0; projections use
               the current h_i and the ORIGINAL g_j (as Pytorch-PCGrad, pytorch_optimizer and torchjd);
               reduction "mean" (Pytorch-PCGrad, pytorch_optimizer) or "sum" (paper, official TF code,
               torchjd).
`mgda`         Sener & Koltun 2018. The min-norm point of the convex hull of the g_i, solved exactly.
`cagrad`       Liu et al. 2021. d = g0 + (c |g0| / |g_w|) g_w; ``rescale=1`` divides by 1 + c^2 (official
               code and LibMTL default), torchjd does not rescale (``rescale=0``).
`upgrad`       Quinton & Rey 2024 (torchjd). Mean of the projections of the g_i onto the dual cone of the
               rows of J, from the dual QP on the trace-normalised, regularised K.
`odice`        Mao et al. 2024. d = g_f + eta (g_b - (g_b^T g_f / |g_f|^2) g_f), two objectives.
`GCond`        Limarenko et al. 2025. Accumulate, then resolve the worst pairs by cosine zones (our reading
               of the reference code; see the class docstring).
=============  =======================================================================================

The QPs (MGDA, CAGrad, UPGrad) are solved exactly by reduction to non-negative least squares
(`scipy.optimize.nnls`, an active-set method): the results satisfy the KKT conditions to ~1e-14, whereas
torchjd's MGDA stops its Frank-Wolfe loop at a step of 1e-3.

Example:
    >>> import torch
    >>> from gradsight.transforms.conflict import pcgrad, aggregate
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> pcgrad(J @ J.T)            # h_1 = g_1 + 0.5 g_2 = (0.5, 0.5), h_2 = g_1 + g_2 = (0, 1); mean
    tensor([1.0000, 0.7500], dtype=torch.float64)
    >>> aggregate(J, "pcgrad")
    tensor([0.2500, 0.7500], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from scipy.optimize import brentq, nnls
from torch import Tensor

__all__ = [
    "pcgrad", "mgda", "cagrad", "upgrad", "odice", "mean_weights", "sum_weights",
    "aggregate", "aggregate_backward", "conflict_stats", "GCond", "AGGREGATORS",
]

Aggregator = Union[str, Callable[[Tensor], Any]]
Order = Union[None, torch.Generator, Sequence[Sequence[int]]]


# ----------------------------------------------------------------------------------------------- helpers

def _gram(K: Any, name: str = "K") -> np.ndarray:
    """K as a symmetric float64 numpy array; ValueError if it is not a finite square matrix."""
    if isinstance(K, Tensor):
        K = K.detach().to("cpu", torch.float64).numpy()
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
        raise ValueError(f"{name} must be a square (m, m) Gram matrix with m >= 1, got shape {tuple(K.shape)}")
    if not np.isfinite(K).all():
        raise ValueError(f"{name} has non-finite entries: {K.tolist()}")
    return (K + K.T) / 2


def _out(w: np.ndarray, like: Any) -> Tensor:
    """Weights as a float64 tensor on the device of the input Gram (CPU for numpy input)."""
    device = like.device if isinstance(like, Tensor) else "cpu"
    return torch.as_tensor(np.asarray(w, dtype=np.float64), device=device)


def _normalise(K: np.ndarray) -> np.ndarray:
    """K / trace(K) (the Gram of J / |J|_F), or K itself when the trace is 0. Scale-invariant methods use it so
    that the solvers work on numbers of order 1 whatever the gradient scale."""
    tr = float(np.trace(K))
    return K / tr if tr > 0 else K


def _nonneg_qp(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin_{u >= 0} 1/2 u^T A u - b^T u for a PSD A (m, m) and b in the range of A, exactly.

    Factor A = Q diag(lam) Q^T (positive eigenvalues only), R = diag(sqrt lam) Q^T, t = diag(1/sqrt lam) Q^T b;
    then |R u - t|^2 = u^T A u - 2 b^T u + const, a non-negative least-squares problem (Lawson-Hanson active
    set, scipy.optimize.nnls). A singular A (duplicate gradients) is fine as long as b lies in its range.
    """
    lam, Q = np.linalg.eigh(A)
    keep = lam > max(float(lam.max()), 0.0) * 1e-13
    if not keep.any():
        return np.zeros(A.shape[0])
    lam, Q = lam[keep], Q[:, keep]
    R = np.sqrt(lam)[:, None] * Q.T                                       # (r, m)
    t = (Q.T @ b) / np.sqrt(lam)                                          # (r,)
    u, _ = nnls(R, t, maxiter=100 * A.shape[0])
    return u


def _ldp(K: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-distance programming in Gram form: min |J^T mu| subject to K mu >= h (i.e. g_i^T y >= h_i).

    Lawson & Hanson (1974, ch. 23): with E = [J^T; h^T] and f = e_last, solve u = argmin_{u>=0} |E u - f|
    (only E^T E = K + h h^T and E^T f = h are needed). Returns (u, s) with s = h^T u in [0, 1]:
    s = 1 means infeasible; otherwise mu = u / (1 - s) and the distance is |J^T mu| = sqrt(s / (1 - s)).
    """
    u = _nonneg_qp(K + np.outer(h, h), h)
    return u, float(h @ u)


def _check_m(K: np.ndarray, m: int, method: str) -> None:
    if K.shape[0] != m:
        raise ValueError(f"{method} needs exactly {m} objectives, got a Gram of shape {K.shape}")


# ----------------------------------------------------------------------------------------------- aggregators

def mean_weights(K: Tensor) -> Tensor:
    """Weights 1/m (the mean of the task gradients). ``K`` (m, m) is read only for m and the device."""
    m = _gram(K).shape[0]
    return _out(np.full(m, 1.0 / m), K)


def sum_weights(K: Tensor) -> Tensor:
    """Weights 1 (plain summation of the losses, ``sum(losses).backward()``)."""
    m = _gram(K).shape[0]
    return _out(np.ones(m), K)


def _orders(order: Order, m: int) -> list[list[int]]:
    if order is None:
        return [list(range(m)) for _ in range(m)]
    if isinstance(order, torch.Generator):
        return [torch.randperm(m, generator=order).tolist() for _ in range(m)]
    orders = [list(map(int, o)) for o in order]
    if len(orders) != m or any(sorted(set(o) | {i}) != list(range(m)) or len(set(o)) != len(o)
                               for i, o in enumerate(orders)):
        raise ValueError(f"order must be None, a torch.Generator, or m={m} sequences, the i-th a permutation of "
                         f"range(m) (or of range(m) without i); got {order!r}")
    return orders


def pcgrad(K: Tensor, order: Order = None, reduction: str = "mean") -> Tensor:
    """PCGrad weights from the Gram matrix: d = w^T J equals the projected-and-reduced PCGrad update.

    For each task i, h_i starts as g_i; for j over the other tasks in ``order[i]``: if h_i^T g_j < 0,
    h_i <- h_i - (h_i^T g_j / |g_j|^2) g_j. **Projections use the current h_i and the original g_j** (as in the
    paper's Algorithm 1, Pytorch-PCGrad's ``pcgrad.py``, pytorch_optimizer and torchjd). In Gram form h_i = C_i J
    with coefficients C (m, m): h_i^T g_j = (C_i K)_j, and the projection subtracts (C_i K)_j / K_jj from C_ij.

    Args:
        K: Gram matrix (m, m) of the task gradients, K_ij = g_i^T g_j.
        order: the order in which each h_i visits the other tasks. ``None``: 0, 1, ..., m-1 (deterministic,
            like the official TF code whose shuffle is discarded). A ``torch.Generator``: the paper's random
            order, one ``torch.randperm(m, generator=...)`` drawn per i, for i = 0..m-1 in turn. Or m explicit
            sequences. j = i is skipped (paper, torchjd); Pytorch-PCGrad and pytorch_optimizer also visit the
            original g_i, which changes h_i only in the rare case h_i^T g_i < 0 (m >= 3).
        reduction: ``"mean"`` (default; Pytorch-PCGrad and pytorch_optimizer, whose ``reduction="sum"`` branch
            was unreachable, Pytorch-PCGrad #14) or ``"sum"`` (the paper's Algorithm 1, the official TF code and
            torchjd's ``PCGrad``). They differ by a factor m in the step size only.

    Returns:
        w (m,) float64 with d = sum_i w_i g_i; for m = 2 the order does not matter.

    Example: g_1 = (1, 0), g_2 = (-1, 1) gives h_1 = g_1 + 0.5 g_2 = (0.5, 0.5) and h_2 = g_1 + g_2 = (0, 1):
    ``pcgrad`` returns (1, 0.75) (mean; d = (0.25, 0.75)) or (2, 1.5) with ``reduction="sum"`` (d = (0.5, 1.5)).

    Reference: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    Kn = _gram(K)
    m = Kn.shape[0]
    C = np.eye(m)                                                         # h_i = C[i] @ J
    for i, js in enumerate(_orders(order, m)):
        for j in js:
            if j == i or Kn[j, j] <= 0:
                continue
            ip = C[i] @ Kn[:, j]                                          # h_i^T g_j
            if ip < 0:
                C[i, j] -= ip / Kn[j, j]
    w = C.sum(axis=0)
    return _out(w / m if reduction == "mean" else w, K)


def mgda(K: Tensor) -> Tensor:
    """MGDA weights: the min-norm point of the convex hull of the task gradients, min_{w in simplex} |w^T J|.

    m = 2 uses the closed form alpha = clip((g_2 - g_1)^T g_2 / |g_1 - g_2|^2, 0, 1), w = (alpha, 1 - alpha)
    (alpha = 1/2 when g_1 = g_2). m > 2 is solved exactly through the least-distance problem
    min |x| s.t. g_i^T x >= 1 (Lawson-Hanson NNLS on K + 1 1^T): if u is its NNLS solution, w = u / sum(u), and
    the result satisfies the optimality conditions g_i^T d >= |d|^2 (equality where w_i > 0) to rounding error.
    When 0 is in the hull (a Pareto-stationary point) d = 0.

    Peers: torchjd's ``MGDA`` runs Frank-Wolfe until the step is below ``epsilon=1e-3`` (so agrees to ~1e-3);
    LibMTL's solver returns 0.999/0.001 instead of 1/0 on the boundary. Scale-invariant: mgda(cK) = mgda(K).

    Returns: w (m,) float64 on the simplex. Example: (2, 0), (0, 1) -> alpha = 0.2, d = (0.4, 0.8), and
    d^T g_1 = d^T g_2 = 0.8.

    Reference: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018; Désidéri 2012.
    """
    Kn = _normalise(_gram(K))
    m = Kn.shape[0]
    if m == 1:
        return _out(np.ones(1), K)
    if m == 2:
        den = Kn[0, 0] + Kn[1, 1] - 2 * Kn[0, 1]                          # |g_1 - g_2|^2
        alpha = 0.5 if den <= 1e-15 else float(np.clip((Kn[1, 1] - Kn[0, 1]) / den, 0.0, 1.0))
        return _out(np.array([alpha, 1.0 - alpha]), K)
    return _out(_mgda_ldp(Kn), K)


def _mgda_ldp(Kn: np.ndarray) -> np.ndarray:
    """The general-m MGDA solver (also checked against the m = 2 closed form in the tests)."""
    u, s = _ldp(Kn, np.ones(Kn.shape[0]))
    if s <= 0:                                                            # all g_i = 0
        return np.full(Kn.shape[0], 1.0 / Kn.shape[0])
    return u / u.sum()


def cagrad(K: Tensor, c: float = 0.5, rescale: int = 1) -> Tensor:
    """CAGrad weights: d = g0 + (c |g0| / |g_w|) g_w, with g0 the mean gradient and w the simplex minimiser of
    F(w) = g_w^T g0 + c |g0| |g_w|, optionally rescaled.

    Solved through the dual: d maximises min_i g_i^T d over the ball |d - g0| <= rho = c |g0|. For a level lam,
    the distance from g0 to {d : g_i^T d >= lam for all i} is a least-distance problem (NNLS in Gram form) and
    grows with lam; a bracketed root search (Brent) finds the lam where it equals rho, and the LDP multipliers
    mu give w = 1/m + mu (here mu = rho w_F / |g_w| in the paper's terms). This is exact up to the root tolerance
    (KKT residuals ~1e-14), unlike the official SLSQP solve.

    Args:
        K: Gram matrix (m, m).
        c: the radius scale, c >= 0 (paper and LibMTL default 0.5; c = 0 gives the mean).
        rescale: 1 (default; official code and LibMTL ``rescale=1``) divides d by 1 + c^2; 2 divides by 1 + c;
            0 leaves d as it is, which is torchjd's ``CAGrad(c)`` convention. For g_1 = g_2 = g and c = 0.5:
            rescale 0 -> 1.5 g (torchjd), rescale 1 -> 1.2 g (LibMTL), rescale 2 -> 1.0 g.

    Returns: w (m,) float64, d = w^T J. The weights are scale-invariant (d scales like sqrt(K)). If the mean
    gradient is 0, d = 0.

    Reference: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
    """
    if not (c >= 0 and math.isfinite(c)):
        raise ValueError(f"c must be a finite number >= 0, got {c!r}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
    Kn = _normalise(_gram(K))
    m = Kn.shape[0]
    w = np.full(m, 1.0 / m)
    b = Kn @ w                                                            # g_i^T g0
    rho = c * math.sqrt(max(float(w @ b), 0.0))                           # c |g0|
    if rho > 0:
        w = w + _cagrad_mu(Kn, b, rho)
    scale = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return _out(w / scale, K)


def _cagrad_mu(Kn: np.ndarray, b: np.ndarray, rho: float) -> np.ndarray:
    target = rho * rho / (1.0 + rho * rho)                                # s at distance rho: s / (1 - s) = rho^2

    def s_of(lam: float) -> float:
        return _ldp(Kn, lam - b)[1]

    lo = float(b.min())                                                   # d = g0 already reaches this level
    hi = float((b + rho * np.sqrt(np.clip(np.diag(Kn), 0.0, None))).min())  # min_i max_ball g_i^T d
    if s_of(hi) <= target:                                                # optimum on a single-task face
        lam = hi
    else:
        lam = brentq(lambda x: s_of(x) - target, lo, hi, xtol=1e-15, rtol=8.9e-16, maxiter=200)
    u, s = _ldp(Kn, lam - b)
    if s >= 1.0:                                                          # infeasible level (0 in the hull)
        return np.zeros_like(b)
    return u / (1.0 - s)


def upgrad(K: Tensor, reg: float = 1e-4, norm: bool = True) -> Tensor:
    """UPGrad weights: the mean of the projections of each g_i onto the dual cone {x : g_j^T x >= 0 for all j}.

    In Gram form the projection of J^T u onto the dual cone is J^T v with v = argmin v^T A v s.t. v >= u
    (torchjd, Proposition 1 of the paper); with u = e_i / m and A = K / trace(K) + reg I the weights are
    w = sum_i v_i. Each QP is solved exactly (v = u + z, z >= 0 an NNLS problem).

    Args:
        K: Gram matrix (m, m).
        reg: added to the diagonal of the (normalised) Gram, as torchjd's ``reg_eps=1e-4``; 0 gives the exact
            projections (K must then be non-singular enough for the projection to be unique).
        norm: divide K by its trace first (torchjd's ``norm_eps`` normalisation), so the weights do not depend on
            the gradient scale. torchjd replaces K by 0 when trace(K) < 1e-4, which turns UPGrad into the mean
            for small gradients; we normalise whenever trace(K) > 0.

    Returns: w (m,) float64, d = w^T J; the mean when no pair conflicts. Example: (1, 0), (-1, 1) -> d close to
    (0.25, 0.75) (exactly that with ``reg=0``).

    Reference: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (torchjd ``UPGrad``).
    """
    if not (reg >= 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    Kg = _gram(K)
    A = (_normalise(Kg) if norm else Kg) + reg * np.eye(Kg.shape[0])
    m = A.shape[0]
    w = np.zeros(m)
    for i in range(m):
        u = np.zeros(m)
        u[i] = 1.0 / m
        w += u + _nonneg_qp(A, -(A @ u))
    return _out(w, K)


def odice(K: Tensor, eta: float = 1.0) -> Tensor:
    """ODICE orthogonal-gradient weights for two objectives, index 0 = forward (g_f), 1 = backward (g_b).

    d = g_f + eta * (g_b - (g_b^T g_f / |g_f|^2) g_f), so w = (1 - eta K_fb / |g_f|^2, eta). The parallel
    component is always removed, not only on conflict (as the reference code ``odice.py``), so
    g_f^T d = |g_f|^2: the backward term never slows progress along g_f. |g_f|^2 is floored at 1e-10 as in the
    reference code.

    Returns: w (2,) float64. Example: g_f = (1, 0), g_b = (-1, 1), eta = 1 -> d = (1, 1).

    Reference: Mao et al., "ODICE: Revealing the Mystery of Distribution Correction Estimation via
    Orthogonal-gradient Update", ICLR 2024.
    """
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    Kg = _gram(K)
    _check_m(Kg, 2, "odice")
    return _out(np.array([1.0 - eta * Kg[0, 1] / max(Kg[0, 0], 1e-10), eta]), K)


AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "mean": mean_weights, "sum": sum_weights, "pcgrad": pcgrad, "mgda": mgda, "cagrad": cagrad,
    "upgrad": upgrad, "odice": odice,
}
"""Name -> ``weights(K, **kwargs)``; `aggregate` and `aggregate_backward` accept these names."""


def _weights_of(aggregator: Aggregator, K: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
    if isinstance(aggregator, str):
        if aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)} or a callable K -> w, "
                             f"got {aggregator!r}")
        fn: Callable[..., Any] = AGGREGATORS[aggregator]
    elif callable(aggregator):
        fn = aggregator
    else:
        raise ValueError(f"aggregator must be a name or a callable K -> w, got {aggregator!r}")
    w = torch.as_tensor(fn(K, **kwargs), dtype=torch.float64).reshape(-1).cpu()
    if w.shape[0] != K.shape[0] or not torch.isfinite(w).all():
        raise ValueError(f"aggregator {aggregator!r} returned {w.tolist()}, expected {K.shape[0]} finite weights")
    return w


def aggregate(J: Tensor, aggregator: Aggregator = "upgrad", **kwargs: Any) -> Tensor:
    """d = w(J J^T) @ J for a Jacobian J (m, ...) of m task gradients; the Gram is formed in float64.

    Args:
        J: (m, ...) task gradients, one per row (trailing dims are flattened for the Gram and restored).
        aggregator: a name in `AGGREGATORS` or a callable ``K (m, m) float64 -> w (m,)``.
        **kwargs: passed to the aggregator, e.g. ``reduction="sum"`` for PCGrad.

    Returns: d with the shape J.shape[1:] and J's dtype and device.
    """
    if not isinstance(J, Tensor) or J.ndim < 2 or J.shape[0] < 1:
        raise ValueError(f"J must be a tensor of shape (m, ...) with m >= 1, got {getattr(J, 'shape', J)!r}")
    Jf = J.reshape(J.shape[0], -1)                                        # (m, P)
    J64 = Jf.to(torch.float64)
    w = _weights_of(aggregator, J64 @ J64.T, kwargs)
    return (w.to(J.device, J.dtype) @ Jf).reshape(J.shape[1:])


# ----------------------------------------------------------------------------------------------- diagnostics

def _cosines(Kg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Norms (m,) and cosines (m, m) from a checked Gram; 0 where a gradient is 0."""
    n = np.sqrt(np.clip(np.diag(Kg), 0.0, None))
    den = np.outer(n, n)
    cos = np.divide(Kg, den, out=np.zeros_like(Kg), where=den > 0)
    np.fill_diagonal(cos, np.where(n > 0, 1.0, 0.0))
    return n, np.clip(cos, -1.0, 1.0)


def conflict_stats(K: Tensor) -> dict[str, Any]:
    """Pairwise conflict diagnostics from a Gram matrix (the monitor's view; the update is not changed).

    Returns a dict:
        ``norms`` (m,): |g_i|;
        ``cosines`` (m, m): g_i^T g_j / (|g_i| |g_j|), 0 where a gradient is 0;
        ``conflict_rate``: the share of pairs i < j with cosine < 0;
        ``min_cosine``: the smallest pairwise cosine;
        ``magnitude_similarity`` (m, m): SAM-GS's S_ij = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2) in [0, 1]
            (1 for equal norms, also when both are 0);
        ``mean_magnitude_similarity``: the mean of S_ij over i < j (SAM-GS's s-bar).
    All tensors are float64 on the CPU. m must be at least 2.
    """
    Kg = _gram(K)
    m = Kg.shape[0]
    if m < 2:
        raise ValueError(f"conflict_stats needs at least 2 gradients, got a Gram of shape {Kg.shape}")
    n, cos = _cosines(Kg)
    sq = n * n
    den = np.outer(n, n)
    ssum = sq[:, None] + sq[None, :]
    S = np.divide(2 * den, ssum, out=np.ones_like(Kg), where=ssum > 0)
    iu = np.triu_indices(m, 1)
    return {
        "norms": torch.from_numpy(n),
        "cosines": torch.from_numpy(cos),
        "conflict_rate": float((cos[iu] < 0).mean()),
        "min_cosine": float(cos[iu].min()),
        "magnitude_similarity": torch.from_numpy(S),
        "mean_magnitude_similarity": float(S[iu].mean()),
    }


# ----------------------------------------------------------------------------------------------- backward

def aggregate_backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor],
    params: Iterable[Tensor] | Mapping[str, Tensor],
    aggregator: Aggregator = "upgrad",
    *,
    task_params: Sequence[Iterable[Tensor]] | None = None,
    retain_graph: bool = False,
) -> dict[str, Any]:
    """Backward of m losses with an aggregator: p.grad += sum_i w_i dL_i/dp, with w = aggregator(K).

    Computes each loss's gradient with ``torch.autograd.grad`` (the graph is kept between them), the Gram
    K_ij = sum_p <g_i,p, g_j,p> in float64 (parameters concatenated in groups of at most ~4M elements), the
    weights, and then sets ``p.grad`` (or adds to it, like ``.backward()``, when it already exists). Memory: the
    m per-loss gradients are held at once, as in torchjd's autojac and Pytorch-PCGrad. The same update is
    grad(sum_i w_i L_i): with K from elsewhere (e.g. gradsight's factored per-example gradients), one backward
    of the weighted loss applies it without storing the m gradients.

    Parameters in ``params`` that only some losses reach (task heads) get a zero gradient from the others, so
    head i receives w_i g_i and enters K only through |g_i|^2. Peers differ: torchjd's ``mtl_backward``
    aggregates over the shared parameters only and gives each head its own unweighted gradient, which is what
    ``task_params`` does here; Pytorch-PCGrad sums (does not average) on parameters without a gradient from
    every task.

    Args:
        losses: m >= 2 scalar losses, as a sequence or a name -> loss mapping (names appear in errors).
        params: the parameters to differentiate (an iterable or a name -> parameter mapping); each must
            require grad.
        aggregator: a name in `AGGREGATORS` or a callable ``K (m, m) float64 -> w (m,)`` (e.g. a `GCond`).
        task_params: optional, one iterable per loss: parameters that receive that loss's own unweighted
            gradient (computed in the same ``autograd.grad`` call) and stay out of K, as torchjd's
            ``mtl_backward(tasks_params=...)``. They must not appear in ``params``.
        retain_graph: keep the graph after the last loss's backward.

    Returns:
        ``{"weights": w (m,), "gram": K (m, m), "cosines": (m, m), "conflict_rate": float}`` (float64, CPU).

    Raises:
        ValueError: fewer than 2 losses, a non-scalar loss, a loss that does not require grad, a parameter that
            does not require grad, or a non-finite gradient (the message names the loss).
    """
    if isinstance(losses, Mapping):
        names, loss_list = [str(k) for k in losses], list(losses.values())
    else:
        loss_list = list(losses)
        names = [f"losses[{i}]" for i in range(len(loss_list))]
    if len(loss_list) < 2:
        raise ValueError(f"losses must hold at least 2 losses, got {len(loss_list)}")
    for name, loss in zip(names, loss_list):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss {name} must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        if not loss.requires_grad:
            raise ValueError(f"loss {name} does not require grad (it depends on no trainable parameter)")
    plist = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not plist:
        raise ValueError("params is empty")
    for k, p in enumerate(plist):
        if not (isinstance(p, Tensor) and p.requires_grad):
            raise ValueError(f"params[{k}] must be a tensor that requires grad")

    m = len(loss_list)
    own: list[list[Tensor]] = [[] for _ in range(m)]
    if task_params is not None:
        own = [list(tp) for tp in task_params]
        if len(own) != m:
            raise ValueError(f"task_params must hold one iterable per loss ({m}), got {len(own)}")
        shared_ids = {id(p) for p in plist}
        for i, tp in enumerate(own):
            if any(id(p) in shared_ids or not (isinstance(p, Tensor) and p.requires_grad) for p in tp):
                raise ValueError(f"task_params[{i}] must hold tensors that require grad and are not in params")
    grads: list[list[Tensor | None]] = []
    own_grads: list[list[Tensor]] = []
    for i, loss in enumerate(loss_list):
        keep = retain_graph or i < m - 1
        g = torch.autograd.grad(loss.reshape(()), plist + own[i], retain_graph=keep, allow_unused=True)
        grads.append(list(g[:len(plist)]))
        own_grads.append([gp for gp in g[len(plist):] if gp is not None])
        own[i] = [p for p, gp in zip(own[i], g[len(plist):]) if gp is not None]
        norms = [n.to(torch.float64) for n in torch._foreach_norm(own_grads[i])] if own_grads[i] else []
        if norms and not math.isfinite(float(torch.stack(norms).sum())):      # one host sync per loss
            raise ValueError(f"non-finite gradient from loss {names[i]} (in task_params[{i}])")

    K = _gram_of_grads(grads, plist).cpu()                               # (m, m) float64
    bad = [names[i] for i in range(m) if not math.isfinite(float(K[i, i]))]
    if bad:
        raise ValueError(f"non-finite gradient from loss {', '.join(bad)}")

    w = _weights_of(aggregator, K, {})
    wl = w.tolist()
    with torch.no_grad():
        for i in range(m):
            _accumulate_grads(own[i], own_grads[i])
        live = [k for k in range(len(plist)) if any(grads[i][k] is not None for i in range(m))]
        d: list[Tensor] | None = None
        for i in range(m):
            gi = [grads[i][k] if grads[i][k] is not None else torch.zeros_like(plist[k]) for k in live]
            if d is None:
                d = torch._foreach_mul(gi, wl[i])
            else:
                torch._foreach_add_(d, gi, alpha=wl[i])
        _accumulate_grads([plist[k] for k in live], d or [])
    _, cos = _cosines(K.numpy())
    rate = float((cos[np.triu_indices(m, 1)] < 0).mean())
    return {"weights": w, "gram": K, "cosines": torch.from_numpy(cos), "conflict_rate": rate}


def _gram_of_grads(grads: list[list[Tensor | None]], plist: list[Tensor], group: int = 1 << 22) -> Tensor:
    """K_ij = sum_p <g_i,p, g_j,p> in float64. Parameters are concatenated in groups of about ``group``
    elements (a missing gradient counts as zero), so a small model costs one matmul and a large one never
    holds more than m x group float64 numbers at once."""
    m = len(grads)
    K = torch.zeros(m, m, dtype=torch.float64, device=plist[0].device)
    start = 0
    while start < len(plist):
        stop, size = start, 0
        while stop < len(plist) and (stop == start or size + plist[stop].numel() <= group):
            size += plist[stop].numel()
            stop += 1
        rows = [torch.cat([(grads[i][k] if grads[i][k] is not None else torch.zeros_like(plist[k]))
                           .reshape(-1).to(K.device, torch.float64) for k in range(start, stop)])
                for i in range(m)]
        G = torch.stack(rows)                                             # (m, size)
        K += G @ G.T
        start = stop
    return K


def _accumulate_grads(params: list[Tensor], updates: list[Tensor]) -> None:
    """p.grad = u, or p.grad += u when a gradient is already there (as ``.backward()`` accumulates)."""
    for p, u in zip(params, updates):
        if p.grad is None:
            p.grad = u.to(p.dtype) if u.dtype != p.dtype else u
        else:
            p.grad.add_(u.to(p.grad.dtype))


# ----------------------------------------------------------------------------------------------- GCond

class GCond:
    """GCond-style conflict resolution: accumulate each loss's gradient, then resolve conflicts by cosine zones.

    After ``accumulation_steps`` micro-batches (`accumulate`), or on one Gram (``gcond(K)``, no accumulation),
    repeat at most ``max_iters`` times (default 2m): take the pair (i, j) with the smallest cosine among the
    current (already resolved) gradients; stop if it is >= t_weak; otherwise resolve it. With
    ``thresholds = (t_crit, t_main, t_weak)`` and d = h_i^T h_j < 0 taken before the update:

    ``mode="zones"`` (the four zones the GCond README describes, the code's legacy mode):
        * t_main <= cos < t_weak (weak): symmetric PCGrad, h_i -= d/|h_j|^2 h_j and h_j -= d/|h_i|^2 h_i, both
          from the pre-update vectors (afterwards each is orthogonal to the other's old vector);
        * t_crit <= cos < t_main (strong): PCGrad on the loser only, h_l -= d/|h_w|^2 h_w;
        * cos < t_crit (critical): winner takes all, h_l = 0.
    ``mode="smooth"`` (the reference code's default): the cosine is remapped to an angle alpha in [0, pi]
        (alpha = pi/2 (1 - u), u = (c - t_main)/(t_weak - t_main) clipped to [0, 1], for c >= t_main;
        alpha = pi/2 + pi/2 ((c - t_main)/(t_crit - t_main))^2 between t_crit and t_main; pi below t_crit), and
        h_w -= sin(alpha) d/|h_l|^2 h_l, h_l -= sin(min(alpha, pi/2)) d/|h_w|^2 h_w: symmetric partial
        projection for mild conflicts, full at t_main, the winner progressively spared towards t_crit.
    The update is the sum of the resolved gradients, so the weights satisfy d = w^T J (Gram form: h = C J).

    Arbitration (winner w, loser l of a pair): if the last ``dominance_window`` winners are all i, j wins (and
    vice versa); otherwise the higher score wins, ties to the lower index, where
    score_k = w_stab * max(0, cos(h_k, prev_k)) + w_str * r_k / (r_i + r_j), (w_stab, w_str) =
    ``tie_breaking_weights``, prev_k the task's resolved gradient of the previous step (only `accumulate` keeps
    it; on a bare Gram the stability term is 0), and the strength r_k is chosen by ``strength``:
    ``"ratio"`` (code): |h_k| / e_k with e_k an EMA (``norm_decay``, initial 1.0) of |acc_k|; ``"ema"``: e_k;
    ``"norm"``: |h_k|. Every resolved pair is arbitrated and recorded.

    Our reading vs the reference (AlevLab-dev/GCond ``grad_conductor.py``; the paper body was not read, its
    formulas are unverified): the zones, the smooth remap and the arbitration follow the code as summarised in
    METHODS.md §7b. Default thresholds are the code's (-0.8, -0.5, 0.0) (README: -0.85; a survey quoted -0.75).
    Norms count as zero below ``eps`` times the largest squared norm (the code: an absolute 1e-8). Left out:
    GCond's internal momentum (beta 0.85), Lion mode, trust ratio, norm cap, stochastic micro-batch assignment,
    bf16 accumulators (ours are float64 for the Gram, the input dtype for the vectors) and DDP all-reduce; pair
    this with an optimizer of your choice (the reference recommends Adam with beta1 = 0).

    Example:
        >>> gc = GCond(accumulation_steps=2)
        >>> J = torch.tensor([[1.0, 0.0], [-0.9, 0.1]])   # cosine -0.994: critical zone
        >>> gc.accumulate(J) is None                      # first micro-batch: nothing yet
        True
        >>> gc.accumulate(J)                              # task 0 is stronger and takes all
        tensor([1., 0.])
        >>> gc.last_info[0]["zone"], gc.last_info[0]["winner"]
        ('critical', 0)
    """

    ZONES = ("none", "weak", "strong", "critical")

    def __init__(
        self,
        accumulation_steps: int = 1,
        thresholds: tuple[float, float, float] = (-0.8, -0.5, 0.0),
        *,
        mode: str = "zones",
        strength: str = "ratio",
        norm_decay: float = 0.95,
        dominance_window: int = 3,
        tie_breaking_weights: tuple[float, float] = (0.8, 0.2),
        max_iters: int | None = None,
        eps: float = 1e-8,
    ) -> None:
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        t = tuple(float(x) for x in thresholds)
        if len(t) != 3 or not (-1.0 <= t[0] < t[1] < t[2] <= 1.0):
            raise ValueError(f"thresholds must be (critical, main, weak) with -1 <= critical < main < weak <= 1, "
                             f"got {thresholds!r}")
        if mode not in ("zones", "smooth"):
            raise ValueError(f"mode must be 'zones' or 'smooth', got {mode!r}")
        if strength not in ("ratio", "ema", "norm"):
            raise ValueError(f"strength must be 'ratio', 'ema' or 'norm', got {strength!r}")
        if not 0.0 <= norm_decay < 1.0:
            raise ValueError(f"norm_decay must be in [0, 1), got {norm_decay!r}")
        if not (isinstance(dominance_window, int) and dominance_window >= 0):
            raise ValueError(f"dominance_window must be an int >= 0 (0 disables it), got {dominance_window!r}")
        if len(tie_breaking_weights) != 2 or min(tie_breaking_weights) < 0:
            raise ValueError(f"tie_breaking_weights must be two numbers >= 0, got {tie_breaking_weights!r}")
        if max_iters is not None and max_iters < 0:
            raise ValueError(f"max_iters must be None or >= 0, got {max_iters!r}")
        self.accumulation_steps = accumulation_steps
        self.thresholds = t
        self.mode, self.strength = mode, strength
        self.norm_decay, self.dominance_window = norm_decay, dominance_window
        self.tie_breaking_weights = (float(tie_breaking_weights[0]), float(tie_breaking_weights[1]))
        self.max_iters, self.eps = max_iters, eps
        self.reset()

    def reset(self) -> None:
        """Forget accumulators, norm EMAs, the dominance history and the previous resolved gradients."""
        self._acc: Tensor | None = None
        self._count = 0
        self._prev: Tensor | None = None
        self.norm_ema: np.ndarray | None = None
        self.history: deque[int] = deque(maxlen=max(self.dominance_window, 1))
        self.last_info: list[dict[str, Any]] = []

    # -- public entry points
    def __call__(self, K: Tensor) -> Tensor:
        """Resolve one Gram (m, m) and return w (m,) with d = w^T J; updates the norm EMAs and the history."""
        Kg = _gram(K)
        return _out(self._resolve(Kg, None)[0], K)

    def accumulate(self, J: Tensor) -> Tensor | None:
        """Add the per-loss gradients J (m, P) of one micro-batch (the accumulator is their mean); after
        ``accumulation_steps`` calls resolve the accumulated gradients and return d (P,), else None."""
        if not isinstance(J, Tensor) or J.ndim != 2:
            raise ValueError(f"J must be a (m, P) tensor of per-loss gradients, got {getattr(J, 'shape', J)!r}")
        if not torch.isfinite(J).all():
            rows = (~torch.isfinite(J)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"J has non-finite gradients in rows {rows}")
        if self._acc is not None and self._acc.shape != J.shape:
            raise ValueError(f"J shape {tuple(J.shape)} differs from the accumulator's {tuple(self._acc.shape)}")
        self._acc = J.detach().clone() if self._acc is None else self._acc.add_(J.detach())
        self._count += 1
        if self._count < self.accumulation_steps:
            return None
        acc = self._acc / self.accumulation_steps                         # (m, P)
        self._acc, self._count = None, 0
        m = acc.shape[0]
        use_prev = self._prev is not None and self.tie_breaking_weights[0] > 0 and self._prev.shape == acc.shape
        X = torch.cat([acc, self._prev]) if use_prev else acc             # (m or 2m, P)
        X64 = X.to(torch.float64)
        w, C = self._resolve(_gram(X64 @ X64.T), m if use_prev else None)
        Ct = torch.as_tensor(C, dtype=acc.dtype, device=acc.device)
        if self.tie_breaking_weights[0] > 0:
            self._prev = Ct @ acc                                         # resolved gradients, (m, P)
        return torch.as_tensor(w, dtype=acc.dtype, device=acc.device) @ acc

    # -- the resolution on a Gram
    def _zone(self, c: float) -> str:
        t_crit, t_main, t_weak = self.thresholds
        if c >= t_weak:
            return "none"
        return "weak" if c >= t_main else ("strong" if c >= t_crit else "critical")

    def _alpha(self, c: float) -> float:
        t_crit, t_main, t_weak = self.thresholds
        if c >= t_main:
            u = min(max((c - t_main) / (t_weak - t_main), 0.0), 1.0)
            return math.pi / 2 * (1.0 - u)
        if c > t_crit:
            return math.pi / 2 + math.pi / 2 * ((c - t_main) / (t_crit - t_main)) ** 2
        return math.pi

    def _resolve(self, Kx: np.ndarray, m_prev: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Kx: Gram of the current accumulators, or of [current; previous resolved] when m_prev = m."""
        m = m_prev if m_prev is not None else Kx.shape[0]
        K = Kx[:m, :m]
        if self.norm_ema is None or self.norm_ema.shape[0] != m:
            if self.norm_ema is not None:
                raise ValueError(f"GCond was used with {self.norm_ema.shape[0]} losses, now {m}; call reset()")
            self.norm_ema = np.ones(m)
        raw = np.sqrt(np.clip(np.diag(K), 0.0, None))
        self.norm_ema = np.maximum(self.norm_decay * self.norm_ema + (1 - self.norm_decay) * raw, self.eps)
        C = np.eye(m)                                                     # h = C @ acc
        zero = self.eps * max(float(np.diag(K).max()), 0.0)
        self.last_info = []
        for _ in range(2 * m if self.max_iters is None else self.max_iters):
            H = C @ K @ C.T                                               # Gram of the current h
            sq = np.diag(H)
            live = sq > zero
            best, pair = math.inf, None
            for i in range(m):
                for j in range(i + 1, m):
                    if live[i] and live[j]:
                        c = H[i, j] / math.sqrt(sq[i] * sq[j])
                        if c < best:
                            best, pair = c, (i, j)
            if pair is None or best >= self.thresholds[2] - 1e-12:
                break
            i, j = pair
            win = self._arbitrate(i, j, H, C, Kx, m_prev)
            lose = j if win == i else i
            d = H[i, j]
            Ci, Cw, Cl = C[i].copy(), C[win].copy(), C[lose].copy()
            zone = self._zone(best)
            if self.mode == "smooth":
                a = self._alpha(best)
                C[win] = Cw - math.sin(a) * d / sq[lose] * Cl
                C[lose] = Cl - math.sin(min(a, math.pi / 2)) * d / sq[win] * Cw
            elif zone == "weak":
                C[i] = Ci - d / sq[j] * C[j]
                C[j] = C[j] - d / sq[i] * Ci
            elif zone == "strong":
                C[lose] = Cl - d / sq[win] * Cw
            else:
                C[lose] = 0.0
            self.last_info.append({"pair": (i, j), "cosine": best, "zone": zone, "winner": win})
        return C.sum(axis=0), C

    def _arbitrate(self, i: int, j: int, H: np.ndarray, C: np.ndarray, Kx: np.ndarray, m_prev: int | None) -> int:
        hist = list(self.history)
        if self.dominance_window > 0 and len(hist) == self.dominance_window and len(set(hist)) == 1:
            if hist[0] == i:
                self.history.append(j)
                return j
            if hist[0] == j:
                self.history.append(i)
                return i
        w_stab, w_str = self.tie_breaking_weights
        norms = np.sqrt(np.clip(np.diag(H), 0.0, None))
        assert self.norm_ema is not None
        r = {"ratio": norms / self.norm_ema, "ema": self.norm_ema, "norm": norms}[self.strength]
        score = []
        for k in (i, j):
            stab = 0.0
            if m_prev is not None:
                m = m_prev
                cross = float(C[k] @ Kx[:m, m + k])                       # h_k^T prev_k
                den = norms[k] * math.sqrt(max(Kx[m + k, m + k], 0.0))
                stab = max(0.0, cross / den) if den > 0 else 0.0
            share = r[k] / (r[i] + r[j]) if r[i] + r[j] > 0 else 0.5
            score.append(w_stab * stab + w_str * share)
        win = i if score[0] >= score[1] else j
        if self.dominance_window > 0:
            self.history.append(win)
        return win
