"""Per-example gradient types: what capture() produces and statistics consume.

Capture decides HOW per-example gradients are obtained; statistics (stats/) only see the objects defined
here. Two representations share one interface:

- FactoredGrad: (A, G, tokens) for Linear-like layers; the per-example weight gradient is G_e^T A_e.
- DenseGrad: materialised per-example gradients (B, *param_shape) from the torch.func backend or the
  per-example-backward reference.

Both offer sq_norms(), inner(other), singular_values(), project(...), materialize().
Reduction convention: each example's gradient is the gradient of ITS OWN loss (token-mean over its
supervised targets by default); the batch loss that is backpropagated is the SUM of per-example losses,
so G at e's tokens is exactly dL_e/d(outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import linalg

__all__ = ["FactoredGrad", "DenseGrad", "CaptureError"]


class CaptureError(RuntimeError):
    """Raised when a layer cannot be captured (unsupported call signature, missing backward...)."""


@dataclass
class FactoredGrad:
    """Per-example gradients of a Linear-like weight as factors.

    Attributes:
        A: (B, T, d_in) layer inputs.
        G: (B, T, d_out) gradients of the per-example losses w.r.t. the layer outputs.
        tokens: (B, T) bool, True at real (non-padded) tokens.
        transposed: True when the parameter is stored (d_in, d_out) (transformers' Conv1D).
    """

    A: torch.Tensor
    G: torch.Tensor
    tokens: torch.Tensor
    transposed: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.A.shape[0]

    @property
    def param_shape(self) -> tuple[int, int]:
        d_in, d_out = self.A.shape[-1], self.G.shape[-1]
        return (d_in, d_out) if self.transposed else (d_out, d_in)

    def masked(self, X: torch.Tensor) -> torch.Tensor:
        """X (A or G, (B, T, d)) with padding positions zeroed."""
        return X * self.tokens.unsqueeze(-1).to(X.dtype)

    def K_a(self) -> torch.Tensor:
        """(B, T, T) float64 Gram of the inputs, zero at padded tokens."""
        if "K_a" not in self._cache:
            m = self.tokens.unsqueeze(-1) & self.tokens.unsqueeze(-2)
            self._cache["K_a"] = linalg.gram(self.A) * m
        return self._cache["K_a"]

    def K_g(self) -> torch.Tensor:
        if "K_g" not in self._cache:
            m = self.tokens.unsqueeze(-1) & self.tokens.unsqueeze(-2)
            self._cache["K_g"] = linalg.gram(self.G) * m
        return self._cache["K_g"]

    def sq_norms(self, route: str = "auto", shared: "linalg.InputGrams | None" = None) -> torch.Tensor:
        """(B,) float64 squared Frobenius norms of the per-example gradients.

        Per example by the cheaper of the ghost sum(K_a * K_g) and ||G^T A||_F^2 at its real length
        (`linalg.factored_sq_norms`; route "auto", "ghost" or "dense"); when this object already holds both
        padded Grams (K_a(), K_g()), the ghost sum over them is free and used. shared: the InputGrams of A
        (K_a shared with the other layers reading A).
        """
        if route in ("auto", "ghost") and "K_a" in self._cache and "K_g" in self._cache:
            return (self._cache["K_a"] * self._cache["K_g"]).sum(dim=(-1, -2))
        return linalg.factored_sq_norms(self.A, self.G, tokens=self.tokens, route=route, shared=shared)

    def inner(self, other: "FactoredGrad") -> torch.Tensor:
        """(B, B') float64 inner products between this batch's and other's per-example gradients."""
        if other.transposed != self.transposed:
            raise ValueError("inner(): both gradients must belong to layers of the same layout")
        return linalg.factored_inner(self.masked(self.A), self.masked(self.G),
                                     other.masked(other.A), other.masked(other.G))

    def singular_values(self, route: str = "auto", shared: "linalg.InputGrams | None" = None) -> torch.Tensor:
        """(B, r) float64 singular values per example, descending, r = min(T, d_in, d_out) (zero padded).

        Each example by its own route at its real length (`linalg.singular_values`): "auto" (the cheapest
        eigenproblem by `linalg.spectra_costs`), "gram" (T x T), "out" (d_out x d_out), "in" (d_in x d_in) or
        "dense" (materialise + svdvals). shared: the InputGrams of A, to share K_a and its Cholesky factor with
        the other layers reading the same input (q/k/v, gate/up).
        """
        return linalg.singular_values(self.A, self.G, self.tokens, route=route, shared=shared)

    def project(self, P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """(B, r_out, r_in) Kronecker projection P_out M_e P_in^T (M_e in (d_out, d_in) orientation)."""
        return linalg.project_factored(self.masked(self.A), self.masked(self.G), P_in, P_out)

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, *param_shape) per-example gradients."""
        dtype = dtype or self.A.dtype
        A, G = self.masked(self.A).to(dtype), self.masked(self.G).to(dtype)
        M = G.transpose(-1, -2) @ A  # (B, d_out, d_in)
        return M.transpose(-1, -2) if self.transposed else M

    def zero_examples(self, rows: list[int]) -> None:
        """Replace the factors of the given batch positions by zeros (e.g. non-finite ones, to be skipped)."""
        if rows:
            self.A, self.G = self.A.clone(), self.G.clone()
            self.A[rows] = 0
            self.G[rows] = 0
            self._cache.clear()

    def finite(self) -> torch.Tensor:
        """(B,) bool: the example's factors are all finite at its real tokens.

        One read of each factor: per-token sums accumulated in float64 (a NaN or an infinity propagates; float32
        or narrower values cannot overflow a float64 sum), padded positions left out."""
        def ok(X: torch.Tensor) -> torch.Tensor:
            s = X.sum(-1, dtype=torch.float64)  # (B, T)
            return torch.isfinite(torch.where(self.tokens.bool(), s, torch.zeros((), dtype=s.dtype)).sum(1))

        return ok(self.A) & ok(self.G)


@dataclass
class DenseGrad:
    """Materialised per-example gradients g: (B, *param_shape)."""

    g: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.g.shape[0]

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.g.shape[1:])

    def sq_norms(self) -> torch.Tensor:
        return self.g.double().flatten(1).pow(2).sum(1)

    def inner(self, other: "DenseGrad") -> torch.Tensor:
        return self.g.double().flatten(1) @ other.g.double().flatten(1).T

    def singular_values(self, route: str = "auto", shared=None) -> torch.Tensor:
        """(B, k) float64 singular values by svdvals of the materialised gradients (route and shared ignored)."""
        if route not in linalg.ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {linalg.ROUTES}")
        g = self.g.double()
        if g.dim() == 2:  # vector parameter: a single singular value, its norm
            return g.norm(dim=1, keepdim=True)
        return torch.linalg.svdvals(g.flatten(2) if g.dim() > 3 else g)

    def project(self, P: torch.Tensor) -> torch.Tensor:
        """(B, r) dense projection P vec(g_e)."""
        return self.g.flatten(1).to(P.dtype) @ P.T

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.g if dtype is None else self.g.to(dtype)

    def zero_examples(self, rows: list[int]) -> None:
        if rows:
            self.g = self.g.clone()
            self.g[rows] = 0

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.g).flatten(1).all(1)
