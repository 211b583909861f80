"""Extreme eigenpairs of a symmetric operator known only through products v -> A v.

Two solvers:

- `lanczos`: Lanczos with full re-orthogonalisation. After j products it holds an orthonormal basis V_j of the
  Krylov space K_j(A, v_0) and the tridiagonal T_j = V_j^T A V_j; the Ritz pairs (theta_i, y_i = V_j s_i) of T_j
  approximate the extreme eigenpairs, and their residuals are free:

      ||A y_i - theta_i y_i|| = beta_{j+1} |s_i[j]|          (s_i[j]: last component of T_j's i-th eigenvector)

  It stops when every wanted Ritz pair has residual <= tol * |theta_i|. Convergence depends on the gaps
  (roughly like Chebyshev polynomials of the gap ratio), so a few outliers above a bulk need a few tens of
  products, far below `dim`.
- `power_iteration`: PyHessian's power iteration with projection deflation (METHODS 8.3), kept for
  compatibility and benchmarks; it converges like |lambda_2 / lambda_1|^t and finds the eigenvalues of LARGEST
  MAGNITUDE, so "top" can be a large negative eigenvalue.

Plus `stability(lmax, trace, lr)`: the gradient-descent stability numbers lr * lambda_max and lr * tr vs 2.

Every algorithm in `gradsight.curvature` takes the operator the same way: either a callable `matvec` on flat
vectors of length `dim` (then pass `dim`, and optionally `dtype`, `device`), or an object with `.matvec`,
`.dim`, `.dtype`, `.device` (a `CurvatureOperator`). Products are counted by the algorithm itself
(`n_products` in every result), and a product containing NaN/inf raises `NonFiniteProductError`.

Reference: Y. Saad, "Numerical Methods for Large Eigenvalue Problems" (2nd ed., 2011), ch. 6 (Lanczos, residual
estimate, re-orthogonalisation); Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural Networks Through
the Lens of the Hessian" (2020), power iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "LanczosResult",
    "NonFiniteProductError",
    "PowerIterationResult",
    "Stability",
    "lanczos",
    "power_iteration",
    "stability",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteProductError(FloatingPointError):
    """A matrix-vector product returned NaN or inf."""


# ---------------------------------------------------------------------------------------------------------------
# shared plumbing (also used by trace.py and density.py)


class Counted:
    """The operator as the algorithms see it: a checked, counted product on flat (dim,) vectors.

    Accepts a callable or an object with `.matvec` (and `.dim`, `.dtype`, `.device`); explicit arguments
    override the object's attributes. The callable must not modify its input; its output is never modified.
    """

    def __init__(self, A, dim=None, dtype=None, device=None):
        if hasattr(A, "matvec"):
            self._matvec = A.matvec
            self._matmat = getattr(A, "matmat", None)
            dim = getattr(A, "dim", None) if dim is None else dim
            dtype = getattr(A, "dtype", None) if dtype is None else dtype
            device = getattr(A, "device", None) if device is None else device
        elif callable(A):
            self._matvec, self._matmat = A, None
        else:
            raise TypeError(f"expected a callable matvec or an object with .matvec, got {type(A).__name__}")
        if dim is None:
            raise ValueError("dim is required when passing a bare matvec callable")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.dtype = torch.get_default_dtype() if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.n_products = 0

    def _check(self, r: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"matvec must return a tensor, got {type(r).__name__}")
        if r.numel() != self.dim * n:
            raise ValueError(f"matvec returned {tuple(r.shape)}, expected {self.dim * n} entries")
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteProductError(
                f"matvec returned NaN/inf (product #{self.n_products}); check the loss and model for overflow "
                "(fp16/bf16 Hessian-vector products overflow easily: use float32 or float64)")
        return r.to(dtype=self.dtype, device=self.device)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        return self._check(self._matvec(v), 1).reshape(self.dim)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """A V for V of shape (dim, n); counts n products."""
        n = V.shape[1]
        if self._matmat is not None:
            self.n_products += n
            return self._check(self._matmat(V), n).reshape(self.dim, n)
        return torch.stack([self(V[:, i]) for i in range(n)], dim=1)  # (dim, n)

    # random vectors: drawn on the CPU from a seeded generator, so results do not depend on the device
    def rademacher(self, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
        shape = (self.dim,) if n is None else (self.dim, n)
        z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
        return (2 * z - 1).to(dtype=self.dtype, device=self.device)

    def gaussian(self, gen: torch.Generator, n: int | None = None) -> torch.Tensor:
        shape = (self.dim,) if n is None else (self.dim, n)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=self.dtype, device=self.device)

    def probe(self, gen: torch.Generator, distribution: str, n: int | None = None) -> torch.Tensor:
        if distribution == "rademacher":
            return self.rademacher(gen, n)
        if distribution == "gaussian":
            return self.gaussian(gen, n)
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def check_positive_int(name: str, x, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {x!r}")
    return int(x)


class Basis:
    """Stored Lanczos vectors, as rows of one buffer that grows by doubling (or a ring of fixed capacity).

    With `capacity=None` every vector is kept (full re-orthogonalisation). With a capacity, at most that many
    vectors are ever stored: the buffer is allocated once with `capacity` rows and the oldest vector is
    overwritten. `peak` is the largest number of vectors held at once.
    """

    def __init__(self, dim: int, dtype, device, capacity: int | None = None, initial: int = 16):
        self.capacity = capacity
        rows = capacity if capacity is not None else initial
        self.V = torch.empty(rows, dim, dtype=dtype, device=device)  # (rows, dim)
        self.n = 0  # vectors pushed so far
        self.peak = 0

    def push(self, v: torch.Tensor) -> None:
        if self.capacity is None:
            if self.n == self.V.shape[0]:
                grown = torch.empty(2 * self.n, self.V.shape[1], dtype=self.V.dtype, device=self.V.device)
                grown[: self.n] = self.V
                self.V = grown
            self.V[self.n] = v
        else:
            self.V[self.n % self.capacity] = v
        self.n += 1
        self.peak = max(self.peak, len(self))

    def __len__(self) -> int:
        return self.n if self.capacity is None else min(self.n, self.capacity)

    def stored(self) -> torch.Tensor:
        """The stored vectors, (len, dim) (ring order when bounded; order does not matter for projections)."""
        return self.V[: len(self)]

    def last(self, i: int = 1) -> torch.Tensor:
        """The i-th most recent vector (i = 1: newest)."""
        j = self.n - i
        return self.V[j if self.capacity is None else j % self.capacity]

    def orthogonalize(self, w: torch.Tensor) -> torch.Tensor:
        """w minus its projection on the stored vectors, classical Gram-Schmidt applied twice ("CGS2")."""
        V = self.stored()  # (n, dim)
        for _ in range(2):
            w = w - V.T @ (V @ w)
        return w


def tridiag_eigh(alpha: list[float], beta: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the symmetric tridiagonal T (diagonal alpha, off-diagonal beta), float64, ascending."""
    d = np.asarray(alpha, dtype=np.float64)
    e = np.asarray(beta[: len(alpha) - 1], dtype=np.float64)
    if len(d) == 1:
        return d.copy(), np.ones((1, 1))
    try:
        from scipy.linalg import eigh_tridiagonal

        return eigh_tridiagonal(d, e)
    except Exception:  # stemr can fail on pathological inputs; the dense solver always works
        T = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
        return np.linalg.eigh(T)


class LanczosProcess:
    """Lanczos three-term recurrence with (full or windowed) re-orthogonalisation and restart on breakdown.

    After `step()` number j (1-based) the process holds alpha_1..alpha_j, beta_1..beta_j, where beta_j couples
    v_j to the next vector v_{j+1} (0 after a breakdown, in which case v_{j+1} is a fresh random vector
    orthogonal to the stored ones and T is block diagonal).
    """

    def __init__(self, op: Counted, v0: torch.Tensor, basis: Basis, gen: torch.Generator):
        self.op, self.basis, self.gen = op, basis, gen
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.scale = 0.0  # running lower bound on ||A||: max |alpha|, beta seen
        self.eps = torch.finfo(op.dtype).eps
        nrm = float(torch.linalg.vector_norm(v0))
        if not math.isfinite(nrm) or nrm == 0.0:
            raise ValueError("the start vector must be finite and nonzero")
        self.w: torch.Tensor | None = None  # the unnormalised next vector (beta_j * v_{j+1})
        self.basis.push(v0 / nrm)

    def step(self) -> None:
        q = self.basis.last(1)  # v_j
        w = self.op(q)
        a = float(q @ w)
        w = w - a * q  # out of place: never modify what matvec returned
        if self.beta and self.basis.n >= 2 and self.beta[-1] != 0.0:
            w = w - self.beta[-1] * self.basis.last(2)
        w = self.basis.orthogonalize(w)
        b = float(torch.linalg.vector_norm(w))
        self.alpha.append(a)
        self.scale = max(self.scale, abs(a), b)
        if b <= 10.0 * math.sqrt(self.op.dim) * self.eps * self.scale:
            b = 0.0  # invariant subspace found: every current Ritz pair is exact
        self.beta.append(b)
        self.w = w

    def advance(self) -> None:
        """Push v_{j+1}: w / beta_j, or a random vector orthogonal to the stored ones after a breakdown."""
        b = self.beta[-1]
        if b > 0.0:
            self.basis.push(self.w / b)
            return
        for _ in range(3):
            r = self.basis.orthogonalize(self.op.gaussian(self.gen))
            nrm = float(torch.linalg.vector_norm(r))
            if nrm > 1e-3:  # a standard normal vector has norm ~ sqrt(dim - n) before projection
                self.basis.push(r / nrm)
                return
        raise RuntimeError("Lanczos restart failed: the stored basis already spans the space")


# ---------------------------------------------------------------------------------------------------------------
# Lanczos for extreme eigenpairs


@dataclass(frozen=True)
class LanczosResult:
    """Extreme eigenpairs from `lanczos`.

    Attributes:
        eigenvalues: (k,) float64; "top": descending, "bottom": ascending, "magnitude": by decreasing |theta|,
            "both": the top k (descending) followed by the bottom k (ascending).
        eigenvectors: (dim, k) in the operator dtype (unit norm, column i pairs with eigenvalues[i]), or None.
        residuals: (k,) float64 Lanczos residual estimates beta_{j+1} |s_i[j]| = ||A y_i - theta_i y_i||
            (exact in exact arithmetic; with float32 products the true residual cannot go below ~eps ||A||).
        converged: (k,) bool, residual <= tol * max(|theta_i|, sqrt(eps) * ||T||).
        n_products: matrix-vector products used.
        n_iter: Lanczos steps (= n_products).
        which: the requested end of the spectrum.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    n_products: int
    n_iter: int
    which: str


def _wanted(theta: np.ndarray, which: str, k: int) -> np.ndarray:
    """Indices into the ascending Ritz values theta, in output order."""
    n = len(theta)
    if which == "top":
        return np.arange(n - 1, n - 1 - min(k, n), -1)
    if which == "bottom":
        return np.arange(min(k, n))
    if which == "magnitude":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    top = np.arange(n - 1, n - 1 - min(k, n), -1)  # both: top k, then the bottom k not already taken
    bottom = np.arange(min(k, max(n - k, 0)))
    return np.concatenate([top, bottom])


def lanczos(
    A,
    dim: int | None = None,
    k: int = 1,
    *,
    which: str = "top",
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    return_eigenvectors: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Top-k / bottom-k eigenpairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    One Krylov space serves both ends of the spectrum: `which="both"` returns the k largest and the k smallest
    eigenvalues (e.g. lambda_max and lambda_min of a Hessian) for the price of one run.

    Args:
        A: matvec callable on flat (dim,) tensors, or an object with .matvec/.dim/.dtype/.device.
        dim: vector length (taken from A if it has .dim).
        k: number of eigenpairs wanted at each requested end; 1 <= k <= dim (2k <= dim for "both").
        which: "top" (algebraically largest), "bottom" (smallest), "magnitude" (largest |lambda|), or "both".
        tol: stop when every wanted Ritz pair has ||A y - theta y|| <= tol * |theta|. For eigenvalues near zero
            (|theta| < sqrt(eps) ||A||) the scale sqrt(eps) ||A|| is used instead of |theta|. The eigenvalue error
            is at most the residual, and about residual^2 / gap once the pair is separated from the rest.
        max_iter: maximum products (= stored vectors, the memory: max_iter * dim entries); default
            min(dim, max(300, 20 k)).
        seed: seeds the Gaussian start vector (and restart vectors after a breakdown).
        v0: optional start vector (dim,), overrides the seeded one.
        return_eigenvectors: also form the Ritz vectors y_i = V s_i.
        dtype, device: working precision and device of the vectors (default: A's, else float default / cpu);
            the tridiagonal eigenproblem is always solved in float64.

    Returns:
        LanczosResult (eigenvalues, eigenvectors or None, residuals, converged, n_products, n_iter, which).

    Caveat: a single-vector Krylov space sees an exactly repeated eigenvalue once; its other copies appear only
    through rounding, late and unreliably (a block method is needed for exact multiplicities). Close but distinct
    eigenvalues are resolved.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, -7.0, 1.0], dtype=torch.float64))
        >>> r = lanczos(lambda v: A @ v, dim=4, k=1, which="both", dtype=torch.float64)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()]   # [max, min]
        [5.0, -7.0]
    """
    op = Counted(A, dim, dtype, device)
    n = op.dim
    if which not in ("top", "bottom", "magnitude", "both"):
        raise ValueError(f"which must be 'top', 'bottom', 'magnitude' or 'both', got {which!r}")
    k = check_positive_int("k", k)
    n_wanted = 2 * k if which == "both" else k
    if n_wanted > n:
        raise ValueError(f"k={k} eigenpairs ({which}) requested but dim={n}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    m_max = min(n, max(300, 20 * k)) if max_iter is None else check_positive_int("max_iter", max_iter)
    m_max = min(max(m_max, n_wanted), n)
    gen = generator(seed)
    if v0 is None:
        v0 = op.gaussian(gen)
    else:
        v0 = v0.reshape(-1).to(dtype=op.dtype, device=op.device)
        if v0.numel() != n:
            raise ValueError(f"v0 has {v0.numel()} entries, expected dim={n}")
    proc = LanczosProcess(op, v0, Basis(n, op.dtype, op.device), gen)
    floor_rel = math.sqrt(torch.finfo(op.dtype).eps)

    while True:
        proc.step()
        j = len(proc.alpha)
        theta, S = tridiag_eigh(proc.alpha, proc.beta)  # ascending; S: (j, j)
        idx = _wanted(theta, which, k)
        res = proc.beta[-1] * np.abs(S[-1, idx])
        scale = max(proc.scale, float(np.max(np.abs(theta))))
        conv = res <= tol * np.maximum(np.abs(theta[idx]), floor_rel * scale)
        if (len(idx) == n_wanted and conv.all()) or j >= m_max:
            break
        proc.advance()

    Y = None
    if return_eigenvectors:
        V = proc.basis.stored()[:j]  # (j, dim)
        Y = V.T @ torch.as_tensor(S[:, idx], dtype=op.dtype, device=op.device)  # (dim, k)
        Y = Y / torch.linalg.vector_norm(Y, dim=0, keepdim=True)
    return LanczosResult(
        eigenvalues=torch.as_tensor(theta[idx].copy(), dtype=torch.float64),
        eigenvectors=Y,
        residuals=torch.as_tensor(res, dtype=torch.float64),
        converged=torch.as_tensor(conv),
        n_products=op.n_products,
        n_iter=j,
        which=which,
    )


# ---------------------------------------------------------------------------------------------------------------
# PyHessian power iteration


@dataclass(frozen=True)
class PowerIterationResult:
    """Eigenpairs from `power_iteration`, in the order found (largest magnitude first, then after deflation).

    Attributes:
        eigenvalues: (k,) float64 Rayleigh quotients (PyHessian returns the estimate before the last product).
        eigenvectors: (dim, k), each the normalised last product w / (||w|| + 1e-6), as in PyHessian.
        residuals: (k,) ||A v - <Av, v> v|| for the last vector v multiplied (a free by-product; the eigenvalue
            tolerance does not bound it, METHODS 8.3).
        converged: (k,) bool, the relative-change rule was met before max_iter.
        n_iter: (k,) products spent on each eigenpair.
        n_products: total products.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_iter: torch.Tensor
    n_products: int


def power_iteration(
    A,
    dim: int | None = None,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PowerIterationResult:
    """PyHessian's top-k eigenvalues: power iteration with Gram-Schmidt projection deflation (METHODS 8.3).

    For each eigenpair: v = normalised Gaussian; repeat up to max_iter times: orthogonalise v against the
    eigenvectors already found (modified Gram-Schmidt) and renormalise; w = A v; estimate = <w, v>;
    v = w / (||w|| + 1e-6); stop when |previous - estimate| / (|previous| + 1e-6) < tol, keeping the PREVIOUS
    estimate (PyHessian's bookkeeping). The + 1e-6 makes ||v|| = 1 - 1e-6 when <w, v> is taken, so the
    estimate is lambda (1 - 1e-6)^2: a relative bias of 2e-6, kept for fidelity. Converges like |lambda_2 / lambda_1| per product, to the eigenvalues
    of largest magnitude; use `lanczos` for anything but compatibility runs.

    Args:
        A: matvec callable on flat (dim,) tensors, or an object with .matvec/.dim/.dtype/.device.
        dim: vector length (taken from A if it has .dim).
        k: number of eigenpairs (PyHessian `top_n`), 1 <= k <= dim.
        tol: relative-change tolerance on the eigenvalue estimate (PyHessian default 1e-3).
        max_iter: products per eigenpair (PyHessian default 100).
        seed: seeds the Gaussian start vectors.
        dtype, device: working precision and device.

    Returns:
        PowerIterationResult.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, -7.0, 1.0], dtype=torch.float64))
        >>> power_iteration(lambda v: A @ v, dim=4, k=2, tol=1e-10, max_iter=500, dtype=A.dtype).eigenvalues
        tensor([-7.0000,  5.0000], dtype=torch.float64)
    """
    op = Counted(A, dim, dtype, device)
    n = op.dim
    k = check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested but dim={n}")
    max_iter = check_positive_int("max_iter", max_iter)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    gen = generator(seed)

    def normalization(x: torch.Tensor) -> torch.Tensor:
        return x / (float(torch.linalg.vector_norm(x)) + 1e-6)

    vals, vecs, res, conv, iters = [], [], [], [], []
    for _ in range(k):
        eigenvalue = None
        converged = False
        v = normalization(op.gaussian(gen))
        r = float("nan")
        it = 0
        for it in range(1, max_iter + 1):
            for u in vecs:  # orthnormal(v, eigenvectors): modified Gram-Schmidt, then normalise
                v = v - float(v @ u) * u
            v = normalization(v)
            Hv = op(v)
            tmp = float(Hv @ v)
            r = float(torch.linalg.vector_norm(Hv - tmp * v))
            v = normalization(Hv)
            if eigenvalue is None:
                eigenvalue = tmp
            elif abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
                converged = True
                break
            else:
                eigenvalue = tmp
        vals.append(eigenvalue)
        vecs.append(v)
        res.append(r)
        conv.append(converged)
        iters.append(it)
    return PowerIterationResult(
        eigenvalues=torch.tensor(vals, dtype=torch.float64),
        eigenvectors=torch.stack(vecs, dim=1),  # (dim, k)
        residuals=torch.tensor(res, dtype=torch.float64),
        converged=torch.tensor(conv),
        n_iter=torch.tensor(iters),
        n_products=op.n_products,
    )


# ---------------------------------------------------------------------------------------------------------------
# stability indicators


@dataclass(frozen=True)
class Stability:
    """Gradient-descent stability numbers.

    On the quadratic model L(theta + d) ≈ L + g^T d + 0.5 d^T H d, gradient descent with step lr is stable along
    eigen-direction i iff |1 - lr lambda_i| < 1, i.e. lr * lambda_i < 2 for lambda_i > 0: `lr_lmax < 2` is the
    exact condition (the "edge of stability" is lr * lambda_max = 2). For a PSD H, lambda_max <= tr(H), so
    `lr_trace < 2` is a sufficient (conservative) condition.

    Attributes:
        lr_lmax: lr * lambda_max.
        lr_trace: lr * tr(H), or None if no trace was given.
        threshold: 2.0.
        stable: lr_lmax < 2.
        stable_by_trace: lr_trace < 2 (None without a trace).
    """

    lr_lmax: float
    lr_trace: float | None
    threshold: float
    stable: bool
    stable_by_trace: bool | None


def _finite_float(name: str, x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a real number, got {x!r}") from e
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def stability(lmax, trace=None, lr: float | None = None) -> Stability:
    """lr * lambda_max and lr * tr(H) compared with 2 (the gradient-descent stability threshold).

    Args:
        lmax: largest Hessian eigenvalue (float or 0-d tensor), e.g. `lanczos(H, k=1).eigenvalues[0]`.
        trace: Hessian trace (e.g. `hutchinson(H).estimate`), or None.
        lr: learning rate, finite and > 0.

    Returns:
        Stability(lr_lmax, lr_trace, threshold=2.0, stable, stable_by_trace).

    Raises:
        ValueError: lr <= 0, or any input non-finite.

    Example:
        >>> stability(lmax=30.0, trace=200.0, lr=0.05)
        Stability(lr_lmax=1.5, lr_trace=10.0, threshold=2.0, stable=True, stable_by_trace=False)
    """
    if lr is None:
        raise ValueError("lr is required")
    lr = _finite_float("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    lmax = _finite_float("lmax", lmax)
    lr_trace = None if trace is None else lr * _finite_float("trace", trace)
    return Stability(
        lr_lmax=lr * lmax,
        lr_trace=lr_trace,
        threshold=2.0,
        stable=lr * lmax < 2.0,
        stable_by_trace=None if lr_trace is None else lr_trace < 2.0,
    )
