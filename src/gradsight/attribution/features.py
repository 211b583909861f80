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

__all__ = ["FeatureSpec", "Featurizer", "LayerCovariance", "augment", "AdamPreconditioner"]


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


@dataclass
class AdamPreconditioner:
    """LESS's Adam-preconditioned training gradients (Xia et al. 2024), in factored form.

    LESS (princeton-nlp/LESS, `obtain_gradients_with_adam`) replaces a training example's gradient g by the
    Adam update it would cause from the checkpoint's optimizer state (m, v), with no bias correction:

        u = (beta1 m + (1 - beta1) g) / sqrt(beta2 v + (1 - beta2) g^2 + eps)

    Here, per layer, with D = 1 / sqrt(beta2 v + eps) (the example's own g^2 term left out: with beta2 = 0.999
    it is 1000x smaller than v unless g dwarfs the running average):

        u ~ beta1 m * D  +  (1 - beta1) (D * g),        D * g ~ diag(r) g diag(c)

    with D approximated by its rank-1 factorisation r c^T (r = row sums of D, c = column sums / total; exact when
    D is rank-1, Adafactor's assumption). So G_e -> (1 - beta1) G_e diag(r) and A_e -> A_e diag(c) stay factored,
    and the constant beta1 m * D (the same for every example) is projected once and added to every feature.
    Queries keep plain gradients (LESS's validation gradients are SGD gradients).

    Attributes:
        factors: {layer: (r (d_out,), c (d_in [+1],))}.
        offset: {layer: (d_out, d_in [+1]) beta1 m * D}.
        scale: 1 - beta1.
    """

    factors: dict
    offset: dict
    scale: float = 0.1

    @classmethod
    def from_state(cls, layers: Mapping, state: Mapping, bias: bool = True, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8) -> "AdamPreconditioner":
        """From per-parameter Adam moments ``{param name: {"exp_avg": m, "exp_avg_sq": v}}`` of the layers'
        weights (and biases); ``layers`` = {layer name: module} (names as in `model.named_modules()`)."""
        factors, offset = {}, {}
        for name, mod in layers.items():
            prefix = f"{name}." if name else ""
            w = state.get(f"{prefix}weight")
            if w is None:
                raise ValueError(f"Adam state: no moments for {prefix}weight (have e.g. {list(state)[:3]})")
            transposed = type(mod).__name__ == "Conv1D"
            m, v = (w["exp_avg"].double(), w["exp_avg_sq"].double())
            if transposed:
                m, v = m.T, v.T
            b = state.get(f"{prefix}bias") if bias and getattr(mod, "bias", None) is not None else None
            if b is not None:
                m = torch.cat([m, b["exp_avg"].double().reshape(-1, 1)], 1)
                v = torch.cat([v, b["exp_avg_sq"].double().reshape(-1, 1)], 1)
            D = 1.0 / torch.sqrt(beta2 * v + eps)  # (d_out, d_in~)
            factors[name] = (D.sum(1), D.sum(0) / D.sum())
            offset[name] = beta1 * m * D
        return cls(factors, offset, 1.0 - beta1)

    @classmethod
    def from_optimizer(cls, model, optimizer, layers: Mapping, bias: bool = True) -> "AdamPreconditioner":
        """From a torch Adam / AdamW optimizer of `model` (its betas and eps)."""
        names = {p: n for n, p in model.named_parameters()}
        state = {names[p]: s for p, s in optimizer.state.items() if p in names and "exp_avg_sq" in s}
        g = optimizer.param_groups[0]
        b1, b2 = g.get("betas", (0.9, 0.999))
        return cls.from_state(layers, state, bias=bias, beta1=b1, beta2=b2, eps=g.get("eps", 1e-8))


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

    def _sides(self, name: str, g: FactoredGrad, pre: AdamPreconditioner | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected factors (B, T, k_in) and (B, T, k_out), zero at padding (Adam-preconditioned with
        `pre`: G diag(r) (1 - beta1) and A diag(c))."""
        A = augment(g.A.to(self.dtype), g.tokens, self.has_bias(name))  # (B, T, d_in~)
        G = g.masked(g.G).to(self.dtype)  # (B, T, d_out)
        if pre is not None:
            r, c = pre.factors[name]
            G = G * (pre.scale * r).to(self.dtype)
            A = A * c.to(self.dtype)
        P_in = self.matrix(name, "in", A.shape[-1], A.device)
        P_out = self.matrix(name, "out", G.shape[-1], G.device)
        AP = A if P_in is None else A @ P_in.T  # (B, T, k_in)
        GP = G if P_out is None else G @ P_out.T  # (B, T, k_out)
        return AP, GP

    def layer(self, name: str, g: FactoredGrad | DenseGrad, covariance: bool = False,
              pre: AdamPreconditioner | None = None) -> tuple[torch.Tensor, LayerCovariance | None]:
        """(B, k_out, k_in) features of one layer and, with `covariance`, its covariance sums (`pre`: LESS's
        Adam preconditioning, see `AdamPreconditioner`; covariances are then of the preconditioned factors)."""
        if isinstance(g, DenseGrad):
            flat = g.g.reshape(g.g.shape[0], -1).to(self.dtype)  # (B, d)
            P = self.matrix(name, "dense", flat.shape[1], flat.device)
            phi = flat if P is None else flat @ P.T
            return phi.unsqueeze(1), None
        if pre is not None and isinstance(g, DenseGrad):
            raise ValueError(f"layer {name}: Adam preconditioning needs a Linear-like layer")
        AP, GP = self._sides(name, g, pre)
        phi = GP.transpose(-1, -2) @ AP  # (B, k_out, k_in)
        if pre is not None:  # the example-independent momentum part, projected once
            C0 = pre.offset[name].to(self.dtype).to(phi.device)  # (d_out, d_in~)
            P_in = self.matrix(name, "in", C0.shape[1], phi.device)
            P_out = self.matrix(name, "out", C0.shape[0], phi.device)
            C0 = C0 if P_out is None else P_out @ C0
            C0 = C0 if P_in is None else C0 @ P_in.T
            phi = phi + C0
        cov = None
        if covariance:
            a = AP.reshape(-1, AP.shape[-1]).double()  # (B*T, k_in); padded rows are zero
            s = GP.reshape(-1, GP.shape[-1]).double()
            cov = LayerCovariance(a.T @ a, s.T @ s, int(g.tokens.sum()), int(g.A.shape[0]))
        return phi, cov

    def __call__(self, grads: Mapping[str, FactoredGrad | DenseGrad], covariance: bool = False,
                 pre: AdamPreconditioner | None = None) -> tuple[dict[str, torch.Tensor], dict[str, LayerCovariance]]:
        """({layer: (B, k_out, k_in)}, {layer: LayerCovariance}) of a captured step's gradients."""
        feats, covs = {}, {}
        for name, g in grads.items():
            phi, cov = self.layer(name, g, covariance, pre)
            feats[name] = phi
            if cov is not None:
                covs[name] = cov
        return feats, covs

    def token_scores(self, name: str, g: FactoredGrad, W: torch.Tensor) -> torch.Tensor:
        """(Q, B, T) inner products <W_q, g_t a~_t^T (projected)> of each token's feature with Q weight matrices
        W (Q, k_out, k_in), without forming the per-token features: (GP_t^T W_q AP_t). Zero at padding."""
        AP, GP = self._sides(name, g)
        W = W.to(AP.dtype)
        return torch.einsum("bto,qoi,bti->qbt", GP, W, AP)

    def token_features(self, name: str, g: FactoredGrad) -> torch.Tensor:
        """(B, T, k_out, k_in) per-token features (g_t a~_t^T projected): their sum over t is `layer()`'s.
        Used for per-token breakdowns of a query's score (zero at padding)."""
        AP, GP = self._sides(name, g)
        return GP.unsqueeze(-1) * AP.unsqueeze(-2)
