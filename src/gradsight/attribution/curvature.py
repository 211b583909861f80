"""Damped inverse curvature per layer for influence: identity, raw projected Gauss-Newton, K-FAC and EK-FAC.

Influence of training example i on query q (Koh & Liang 2017; Grosse et al. 2023) with a block-diagonal
curvature C (one block per layer) and damping lambda:

    score(i, q) = sum_layers < (C_l + lambda_l I)^{-1} phi_q,l , phi_i,l >

where phi are the (projected) per-example loss gradients of `attribution.features`. Positive = HELPFUL:
up-weighting i by eps lowers q's loss by eps * score to first order, so removing i from N training examples
raises it by about score / N (the reports show that number).

The curvature of each layer is an approximation of the empirical Fisher of the MEAN per-example loss,
F = (1/N) sum_e vec Ghat_e vec Ghat_e^T, in the projected space (P = I for a full-space layer):

* "identity": C = 0 and no damping: the gradient dot product.
* "raw": C = (1/N) sum_e vec phi_e vec phi_e^T (D x D, D = k_out k_in), eigendecomposed (LoGra's "raw"
  projected Hessian; TRAK's Phi^T Phi is the same matrix for its own features).
* "kfac": C = S (x) A with A = A_sum / N_tokens and S = S_sum / N_examples (so that for one token per example
  S (x) A is the usual K-FAC of the mean loss, and for T tokens the token sum of independent tokens).
  Eigendecompositions A = Q_A diag(alpha) Q_A^T, S = Q_S diag(sigma) Q_S^T (float64, symmetrised);
  Lambda = sigma alpha^T.
* "ekfac": the same eigenbases with the eigenvalue correction (George et al. 2018)
  Lambda = (1/N) sum_e (Q_S^T phi_e Q_A)^2, which makes diag(Lambda) exact in the Kronecker eigenbasis
  (sum(Lambda) = tr(F_l) = E ||phi||^2, a free invariant).

For K-FAC and EK-FAC the damped inverse is Q_S [ (Q_S^T X Q_A) / (Lambda + lambda) ] Q_A^T.

Damping conventions differ between tools (act.md A.2): kronfluence absolute 1e-8 by default (or 0.1 x mean
eigenvalue per module when None), LogIX 0.1 x mean eigenvalue, dattri relative to tr(H)/d (1e-5), TRAK an
absolute 0. Here `damping` is RELATIVE by default: lambda_l = damping x mean eigenvalue of C_l (= tr(C_l)/D_l,
scale-free, what kronfluence's and LogIX's heuristics use); `mode="absolute"` takes lambda_l = damping. The
absolute value of every layer is recorded (`info()`).

Everything here is a sum over examples (Lambda, the raw covariance), so shards and ranks add their partial sums
(`CurvatureFit.state` / `load`) before `finalize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from .features import LayerCovariance

__all__ = ["KINDS", "LayerCurvature", "CurvatureFit", "KroneckerOperator", "sym_eigh", "KronStats"]

KINDS = ("identity", "raw", "kfac", "ekfac")


def sym_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of the symmetric part of M, in float64."""
    M = M.double()
    w, Q = torch.linalg.eigh((M + M.T) / 2)
    return w.clamp_min(0.0), Q


@dataclass
class KronStats:
    """Per-example curvature statistics of one-token examples (plain modules), a cheaper form of their
    pseudo-gradient features: with C output directions c, example e's pseudo-gradients at a layer are
    phi_ec = g_ec a_e^T (projected), so sum_c vec phi_ec vec phi_ec^T = (sum_c g_ec g_ec^T) (x) a_e a_e^T.

    Attributes:
        G: {layer: (n, k_out, k_out)} sum over c of g_ec g_ec^T.
        a: {layer: (n, k_in)} the (projected, bias-augmented) inputs.
        n: examples.
    """

    G: dict
    a: dict
    n: int


@dataclass
class LayerCurvature:
    """The fitted damped curvature of one layer (see the module docstring).

    Attributes:
        kind: identity, raw, kfac or ekfac (kfac / ekfac layers without covariances use raw).
        shape: (k_out, k_in) of the layer's features.
        damping: the absolute lambda used.
        Q_A, Q_S, Lam: Kronecker eigenbases and eigenvalues (k_in x k_in, k_out x k_out, k_out x k_in).
        Q, w: raw eigenbasis (D x D) and eigenvalues (D,).
    """

    kind: str
    shape: tuple[int, int]
    damping: float = 0.0
    Q_A: torch.Tensor | None = None
    Q_S: torch.Tensor | None = None
    Lam: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    w: torch.Tensor | None = None
    C: torch.Tensor | None = None   # raw with a positive damping: the matrix and the Cholesky factor of C + lambda
    L: torch.Tensor | None = None

    def eigenvalues(self) -> torch.Tensor:
        """Undamped eigenvalues of C (flat, float64); empty for identity (raw by Cholesky: not computed)."""
        if self.kind in ("kfac", "ekfac"):
            return self.Lam.reshape(-1)
        if self.kind == "raw" and self.w is not None:
            return self.w
        return torch.zeros(0, dtype=torch.float64)

    def mean_eigenvalue(self) -> float:
        if self.kind == "raw" and self.C is not None:
            return float(torch.diagonal(self.C).mean())  # tr(C) / D
        ev = self.eigenvalues()
        return float(ev.mean()) if ev.numel() else 0.0

    def _apply(self, X: torch.Tensor, fn) -> torch.Tensor:
        X = X.double()
        if self.kind == "identity":
            return X.clone()
        if self.kind == "raw":
            flat = X.reshape(X.shape[0], -1)  # (M, D)
            if self.Q is None:  # Cholesky form: only C and (C + lambda)^-1
                out = flat @ self.C if fn is None else torch.cholesky_solve(flat.T, self.L).T
                return out.reshape(X.shape)
            out = (fn(self.w) * (flat @ self.Q)) @ self.Q.T
            return out.reshape(X.shape)
        R = self.Q_S.T @ X @ self.Q_A  # (M, k_out, k_in) in the Kronecker eigenbasis
        return self.Q_S @ (fn(self.Lam) * R) @ self.Q_A.T

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """(C + lambda I)^{-1} X for X (M, k_out, k_in); float64. Identity: X.

        With lambda = 0 a zero eigenvalue is treated as a pseudo-inverse (its direction is dropped)."""
        lam = self.damping

        def inv(w):
            d = w + lam
            return torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))

        return self._apply(X, inv if self.L is None else "solve")

    def matvec(self, X: torch.Tensor) -> torch.Tensor:
        """C X (undamped), for checks against a dense matrix."""
        if self.kind == "identity":
            return torch.zeros_like(X, dtype=torch.float64)
        return self._apply(X, None if self.L is not None else (lambda w: w))

    def info(self) -> dict:
        ev = self.eigenvalues()
        return {"kind": self.kind, "k_out": self.shape[0], "k_in": self.shape[1], "damping": float(self.damping),
                "mean_eigenvalue": self.mean_eigenvalue(),
                "max_eigenvalue": float(ev.max()) if ev.numel() else float("nan")}


@dataclass
class CurvatureFit:
    """Fits the per-layer curvature of one checkpoint from its covariance sums and a pass over its features.

        fit = CurvatureFit("ekfac", covs, shapes)
        for block in train_feature_blocks:          # {layer: (n, k_out, k_in)}; skip if not fit.needs_pass
            fit.update(block)
        layers = fit.finalize(damping=0.1)          # {layer: LayerCurvature}

    Args:
        kind: one of KINDS.
        covs: {layer: LayerCovariance} (kfac / ekfac; layers without one fall back to raw).
        shapes: {layer: (k_out, k_in)}.

    The pass sums (Lambda numerators or raw covariances) in float64; `state()` / `load()` expose them so that
    ranks can all-reduce and shards can add before `finalize`.
    """

    kind: str
    covs: Mapping[str, LayerCovariance]
    shapes: Mapping[str, tuple[int, int]]
    n: int = 0
    sums: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown curvature {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind in ("kfac", "ekfac"):
            for name, cov in self.covs.items():
                if cov.n_tokens <= 0 or cov.n_examples <= 0:
                    raise ValueError(f"layer {name}: empty covariance (no tokens): nothing to fit")
                alpha, Q_A = sym_eigh(cov.A / cov.n_tokens)
                sigma, Q_S = sym_eigh(cov.S / cov.n_examples)
                self.bases[name] = (Q_A, Q_S, alpha, sigma)

    def layer_kind(self, name: str) -> str:
        if self.kind in ("kfac", "ekfac") and name not in self.bases:
            return "raw"
        return self.kind

    @property
    def needs_pass(self) -> bool:
        """Whether `update` must see every training feature (ekfac, raw, or kfac with non-Linear layers)."""
        return any(self.layer_kind(n) in ("raw", "ekfac") for n in self.shapes)

    def update(self, block: Mapping[str, torch.Tensor], n_examples: int | None = None) -> None:
        """Add one block of training features {layer: (n, k_out, k_in)}.

        n_examples: the number of examples the block stands for when it holds several pseudo-gradients per
        example (the GGN's C output directions, whose squares add up within an example); default: its rows."""
        if isinstance(block, KronStats):
            self._update_kron(block)
            return
        rows = 0
        for name, X in block.items():
            rows = X.shape[0]
            kind = self.layer_kind(name)
            if kind in ("identity", "kfac"):
                continue
            # the products run in the features' own precision (float32 features: float32 GEMMs, 2-4x faster on
            # a CPU, relative error ~1e-6 per sum, far below any damping); the sums are kept in float64
            if kind == "ekfac":
                Q_A, Q_S = (q.to(X.dtype) for q in self.bases[name][:2])
                part = (Q_S.T @ X @ Q_A).pow(2).sum(0).double()  # (k_out, k_in)
            else:
                flat = X.reshape(rows, -1)
                part = (flat.T @ flat).double()  # (D, D)
            self.sums[name] = part if name not in self.sums else self.sums[name] + part
        self.n += int(rows if n_examples is None else n_examples)

    def _update_kron(self, st: KronStats) -> None:
        """The same sums from per-example Kronecker statistics: raw sum_e G_e (x) a_e a_e^T (N k_out^2 k_in^2
        instead of N C (k_out k_in)^2 for the C pseudo-gradients), EK-FAC sum_e diag(Q_S^T G_e Q_S) (Q_A^T a_e)^2."""
        for name, G in st.G.items():
            kind = self.layer_kind(name)
            if kind in ("identity", "kfac"):
                continue
            a = st.a[name].double()
            G = G.double()
            if kind == "ekfac":
                Q_A, Q_S = self.bases[name][:2]
                gs = torch.einsum("ij,nik,kj->nj", Q_S, G, Q_S)  # (n, k_out): diag(Q_S^T G_e Q_S)
                part = gs.T @ (a @ Q_A).pow(2)  # (k_out, k_in)
            else:
                n, ko, ki = G.shape[0], G.shape[1], a.shape[1]
                aa = (a.unsqueeze(2) * a.unsqueeze(1)).reshape(n, ki * ki)  # (n, k_in^2)
                part = (G.reshape(n, ko * ko).T @ aa).reshape(ko, ko, ki, ki)  # one GEMM over the examples
                part = part.permute(0, 2, 1, 3).reshape(ko * ki, ko * ki)  # [(i, k), (j, l)]
            self.sums[name] = part if name not in self.sums else self.sums[name] + part
        self.n += int(st.n)

    def state(self) -> dict[str, torch.Tensor]:
        """The pass sums and the example count (tensors; add them across ranks / shards)."""
        return {**{f"sum/{k}": v for k, v in self.sums.items()}, "n": torch.tensor(float(self.n), dtype=torch.float64)}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.sums = {k[4:]: v.double() for k, v in state.items() if k.startswith("sum/")}
        self.n = int(round(float(state["n"])))

    def finalize(self, damping: float = 0.1, mode: str = "relative") -> dict[str, LayerCurvature]:
        """{layer: LayerCurvature} with lambda_l = damping x mean eigenvalue (relative) or damping (absolute)."""
        if mode not in ("relative", "absolute"):
            raise ValueError(f"damping mode must be 'relative' or 'absolute', got {mode!r}")
        if damping < 0 or not math.isfinite(damping):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        out = {}
        for name, shape in self.shapes.items():
            kind = self.layer_kind(name)
            lc = LayerCurvature(kind, tuple(shape))
            if kind in ("raw", "ekfac") and self.n <= 0:
                raise ValueError(f"curvature {kind!r} needs a pass over the training features; none was added")
            if kind == "raw":
                C = self.sums[name] / self.n
                C = (C + C.T) / 2
                lam = damping * float(torch.diagonal(C).mean()) if mode == "relative" else float(damping)
                L, bad = torch.linalg.cholesky_ex(C + lam * torch.eye(C.shape[0], dtype=C.dtype)) if lam > 0 \
                    else (None, 1)
                if lam > 0 and int(bad) == 0:  # positive definite: Cholesky (4-10x cheaper than eigh)
                    lc.C, lc.L, lc.damping = C, L, lam
                    out[name] = lc
                    continue
                lc.w, lc.Q = sym_eigh(C)
            elif kind in ("kfac", "ekfac"):
                Q_A, Q_S, alpha, sigma = self.bases[name]
                lc.Q_A, lc.Q_S = Q_A, Q_S
                lc.Lam = self.sums[name] / self.n if kind == "ekfac" else torch.outer(sigma, alpha)
            if kind != "identity":
                ev = lc.eigenvalues()
                lc.damping = float(damping * ev.mean()) if mode == "relative" else float(damping)
            out[name] = lc
        return out


class KroneckerOperator:
    """A fitted block-diagonal curvature in the FULL parameter space as a CurvatureOperator-like object.

    Exposes the interface of `gradsight.curvature.operators.CurvatureOperator` (dim, dtype, names, shapes,
    numels, flatten, unflatten, matvec, matmat, dense) plus `solve(v)`, the damped inverse, so that K-FAC /
    EK-FAC / raw curvature can be compared with the exact GGN, Fisher or Hessian of the same block, and handed
    to the curvature algorithms (Lanczos, trace, density).

    Args:
        model: the module whose Linear layers were featurised with P = I (r_in = r_out = None).
        layers: {layer name: LayerCurvature} in the order of the layers' parameters.
        bias: whether the features included the biases (must match the Featurizer).

    The parameter block is, per layer, its weight then (if featurised) its bias, in `model.named_parameters()`
    order; the layer feature [W | b] (k_out x (d_in + 1)) maps to these.
    """

    kind = "kronecker"

    def __init__(self, model: torch.nn.Module, layers: Mapping[str, LayerCurvature], bias: bool = True):
        mods = dict(model.named_modules())
        self.layers = dict(layers)
        self.params, self._slots = [], []
        for name, lc in self.layers.items():
            mod = mods[name]
            transposed = type(mod).__name__ == "Conv1D"
            W = mod.weight
            d_out, d_in = (W.shape[1], W.shape[0]) if transposed else tuple(W.shape)
            has_b = bias and getattr(mod, "bias", None) is not None
            if lc.shape != (d_out, d_in + int(has_b)):
                raise ValueError(f"layer {name}: curvature shape {lc.shape} is not the full space "
                                 f"({d_out}, {d_in + int(has_b)}); featurise with r_in = r_out = None")
            prefix = f"{name}." if name else ""  # "" is the model itself (a bare nn.Linear)
            self.params.append((f"{prefix}weight", W))
            if has_b:
                self.params.append((f"{prefix}bias", mod.bias))
            self._slots.append((name, transposed, has_b, d_out, d_in))
        self.names = [n for n, _ in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.numels = [p.numel() for _, p in self.params]
        self.dim = sum(self.numels)
        self.dtype, self.device = torch.float64, torch.device("cpu")
        self.n_products = 0

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes)]

    def _to_layers(self, v: torch.Tensor) -> list[torch.Tensor]:
        parts, i, out = self.unflatten(v.double()), 0, []
        for name, transposed, has_b, d_out, d_in in self._slots:
            W = parts[i].T if transposed else parts[i]  # (d_out, d_in)
            i += 1
            if has_b:
                W = torch.cat([W, parts[i].reshape(d_out, 1)], dim=1)
                i += 1
            out.append(W.unsqueeze(0))  # (1, d_out, d_in~)
        return out

    def _from_layers(self, Xs: list[torch.Tensor]) -> torch.Tensor:
        flat = []
        for (name, transposed, has_b, d_out, d_in), X in zip(self._slots, Xs):
            X = X[0]
            flat.append((X[:, :d_in].T if transposed else X[:, :d_in]).reshape(-1))
            if has_b:
                flat.append(X[:, d_in])
        return torch.cat(flat)

    def _map(self, v: torch.Tensor, op: str) -> torch.Tensor:
        Xs = self._to_layers(v)
        lcs = list(self.layers.values())
        return self._from_layers([getattr(lc, op)(X) for lc, X in zip(lcs, Xs)])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C v (undamped), (dim,) float64."""
        self.n_products += 1
        return self._map(torch.as_tensor(v), "matvec")

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """(C + lambda I)^{-1} v with each layer's own damping, (dim,) float64."""
        return self._map(torch.as_tensor(v), "solve")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def dense(self) -> torch.Tensor:
        return self.matmat(torch.eye(self.dim, dtype=torch.float64))

    @property
    def info(self) -> dict:
        return {"operator": type(self).__name__, "kind": self.kind, "dim": self.dim, "params": list(self.names),
                "layers": {n: lc.info() for n, lc in self.layers.items()}}
