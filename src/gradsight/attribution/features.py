"""Attribution features: each example's gradient per layer, Kronecker-projected, plus the layer covariances.

For a Linear-like layer with inputs a_t (d_in) and output gradients g_t (d_out) at example e's tokens, the
gradient of e's loss w.r.t. (W, b) is

    Ghat_e = sum_t g_t [a_t; 1]^T          (d_out x (d_in + 1); the column of ones only when the layer has a bias)

and its attribution feature is the Kronecker projection (LoGra; Choe et al. 2024)

    phi_e = P_out Ghat_e P_in^T = (P_out G_e^T)(A_e P_in^T)            (k_out x k_in)

with P_in (k_in x (d_in + 1)) and P_out (k_out x d_out) seeded Gaussian matrices with entries N(0, 1/k), so
that E<phi_e, phi_f> = <Ghat_e, Ghat_f>. A side whose dimension is at most its projection size is kept exact
(P = I): with `r_in = r_out = None` every layer is in the full parameter space and every method below is exact.

Projection keeps K-FAC structure exactly: (P_out x P_in)(S x A)(P_out x P_in)^T = (P_out S P_out^T) x
(P_in A P_in^T), so the covariances needed by K-FAC / EK-FAC are accumulated in the projected space in the
same pass:

    A_sum = sum_tokens (P_in a~)(P_in a~)^T    (k_in x k_in),      a~ = [a; 1]
    S_sum = sum_tokens (P_out g)(P_out g)^T    (k_out x k_out)

with the token counts, in float64 (`LayerCovariance`; sums, so shards and ranks add). Padding never enters.

Layers without the Linear structure (torch.func backend, `DenseGrad`) get a dense seeded projection of their
flattened gradient to `r_dense` (shape (1, r_dense), no covariances: the curvature methods treat them with the
"raw" projected Gauss-Newton, see `attribution.curvature`).

Sign and scale: features are gradients of each example's LOSS as the input adapter defines it (for language
models the attribution analysis uses the token SUM, i.e. the sequence negative log-likelihood, as
kronfluence requires). Projections derive from (seed, layer name), so features are reproducible from the
manifest and identical across ranks, runs and query sets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping

import torch

from ..capture.grads import DenseGrad, FactoredGrad

__all__ = ["FeatureSpec", "Featurizer", "LayerCovariance", "augment"]


@dataclass(frozen=True)
class FeatureSpec:
    """How per-example gradients become attribution features (stored in the run manifest).

    Attributes:
        r_in, r_out: projection sizes of the input and output sides; None keeps that side exact (full space).
        r_dense: projection size of dense (non-Linear) layers' flattened gradients.
        seed: base seed; each layer's matrices derive from (seed, layer name, side).
        bias: include the bias in the gradient (a column of ones appended to the inputs).
    """

    r_in: int | None = 32
    r_out: int | None = 32
    r_dense: int = 256
    seed: int = 0
    bias: bool = True

    def __post_init__(self):
        for name in ("r_in", "r_out", "r_dense"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the full space), got {v}")

    def to_dict(self) -> dict:
        return {"r_in": self.r_in, "r_out": self.r_out, "r_dense": self.r_dense, "seed": self.seed,
                "bias": self.bias, "kind": "gaussian"}


@dataclass
class LayerCovariance:
    """Projected K-FAC covariance sums of one layer (float64; add across batches, shards and ranks).

    Attributes:
        A: (k_in, k_in) sum over tokens of (P_in a~)(P_in a~)^T.
        S: (k_out, k_out) sum over tokens of (P_out g)(P_out g)^T.
        n_tokens: tokens summed; n_examples: examples summed.
    """

    A: torch.Tensor
    S: torch.Tensor
    n_tokens: int
    n_examples: int

    def __add__(self, other: "LayerCovariance") -> "LayerCovariance":
        return LayerCovariance(self.A + other.A, self.S + other.S, self.n_tokens + other.n_tokens,
                               self.n_examples + other.n_examples)


def augment(A: torch.Tensor, tokens: torch.Tensor, bias: bool) -> torch.Tensor:
    """(B, T, d_in [+1]) inputs zeroed at padding, with a column of ones at real tokens when `bias`."""
    m = tokens.unsqueeze(-1).to(A.dtype)
    A = A * m
    return torch.cat([A, m], dim=-1) if bias else A


def _seed(base: int, name: str, side: str) -> int:
    return (base * 1_000_003 + zlib.crc32(f"attr|{name}|{side}".encode())) % (2**63 - 1)


class Featurizer:
    """Per-layer Kronecker-projected gradients and covariance sums from a captured step.

    Args:
        spec: the FeatureSpec.
        bias: {layer: True if the layer has a bias} (ignored when spec.bias is False).
        dtype: dtype of the features (float32 default; float64 for exact comparisons).
    """

    def __init__(self, spec: FeatureSpec, bias: Mapping[str, bool] | None = None, dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.bias = dict(bias or {})
        self.dtype = dtype
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def has_bias(self, name: str) -> bool:
        return self.spec.bias and self.bias.get(name, False)

    def matrix(self, name: str, side: str, d: int, device=None) -> torch.Tensor | None:
        """(k, d) projection of one side, or None when the side is kept exact (k = d)."""
        r = {"in": self.spec.r_in, "out": self.spec.r_out, "dense": self.spec.r_dense}[side]
        key = (name, side, d, device)
        if key not in self._cache:
            if r is None or d <= r:
                self._cache[key] = None
            else:
                g = torch.Generator().manual_seed(_seed(self.spec.seed, name, side))
                P = torch.randn(r, d, generator=g, dtype=torch.float64) / r**0.5  # (k, d), E[P^T P] = I
                self._cache[key] = P.to(self.dtype).to(device)
        return self._cache[key]

    def shape(self, name: str, g: FactoredGrad | DenseGrad) -> tuple[int, int]:
        """(k_out, k_in) of a layer's features."""
        if isinstance(g, DenseGrad):
            d = g.g[0].numel()
            return 1, (d if self.matrix(name, "dense", d) is None else self.spec.r_dense)
        d_in = g.A.shape[-1] + int(self.has_bias(name))
        d_out = g.G.shape[-1]
        P_in, P_out = self.matrix(name, "in", d_in), self.matrix(name, "out", d_out)
        return (d_out if P_out is None else P_out.shape[0]), (d_in if P_in is None else P_in.shape[0])

    def _sides(self, name: str, g: FactoredGrad) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected factors (B, T, k_in) and (B, T, k_out), zero at padding."""
        A = augment(g.A.to(self.dtype), g.tokens, self.has_bias(name))  # (B, T, d_in~)
        G = g.masked(g.G).to(self.dtype)  # (B, T, d_out)
        P_in = self.matrix(name, "in", A.shape[-1], A.device)
        P_out = self.matrix(name, "out", G.shape[-1], G.device)
        AP = A if P_in is None else A @ P_in.T  # (B, T, k_in)
        GP = G if P_out is None else G @ P_out.T  # (B, T, k_out)
        return AP, GP

    def layer(self, name: str, g: FactoredGrad | DenseGrad, covariance: bool = False
              ) -> tuple[torch.Tensor, LayerCovariance | None]:
        """(B, k_out, k_in) features of one layer and, with `covariance`, its covariance sums."""
        if isinstance(g, DenseGrad):
            flat = g.g.reshape(g.g.shape[0], -1).to(self.dtype)  # (B, d)
            P = self.matrix(name, "dense", flat.shape[1], flat.device)
            phi = flat if P is None else flat @ P.T
            return phi.unsqueeze(1), None
        AP, GP = self._sides(name, g)
        phi = GP.transpose(-1, -2) @ AP  # (B, k_out, k_in)
        cov = None
        if covariance:
            a = AP.reshape(-1, AP.shape[-1]).double()  # (B*T, k_in); padded rows are zero
            s = GP.reshape(-1, GP.shape[-1]).double()
            cov = LayerCovariance(a.T @ a, s.T @ s, int(g.tokens.sum()), int(g.A.shape[0]))
        return phi, cov

    def __call__(self, grads: Mapping[str, FactoredGrad | DenseGrad], covariance: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict[str, LayerCovariance]]:
        """({layer: (B, k_out, k_in)}, {layer: LayerCovariance}) of a captured step's gradients."""
        feats, covs = {}, {}
        for name, g in grads.items():
            phi, cov = self.layer(name, g, covariance)
            feats[name] = phi
            if cov is not None:
                covs[name] = cov
        return feats, covs

    def token_features(self, name: str, g: FactoredGrad) -> torch.Tensor:
        """(B, T, k_out, k_in) per-token features (g_t a~_t^T projected): their sum over t is `layer()`'s.
        Used for per-token breakdowns of a query's score (zero at padding)."""
        AP, GP = self._sides(name, g)
        return GP.unsqueeze(-1) * AP.unsqueeze(-2)
