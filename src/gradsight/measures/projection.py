"""Gradient features: seeded projections of per-example gradients, and exact Grams for small problems.

For a factored layer, example e's gradient M_e = G_e^T A_e (d_out x d_in) is projected without being
materialised (Kronecker structure, as in LoGra):

    phi_e = vec(P_out M_e P_in^T) = vec((P_out G_e^T)(A_e P_in^T))      (r_out x r_in)

with P_in (r_in x d_in) and P_out (r_out x d_out) entries i.i.d. N(0, 1/r) (or Rademacher +-1/sqrt(r)).
Because E[P^T P] = I for each factor, E<phi_e, phi_f> = <M_e, M_f>: projected inner products are unbiased,
with an error that shrinks like 1/sqrt(r). Layers no larger than the projection are kept exactly
(phi_e = vec(M_e)). Dense gradients (torch.func backend) get a dense projection P (r x numel).

Projections are generated from (seed, layer name), so features are reproducible from the manifest alone and
identical across ranks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..capture.grads import DenseGrad, FactoredGrad
from .base import Measure, stateless

__all__ = ["ProjectionSpec", "Projector", "exact_gram", "ExactGramAccumulator", "projection", "exact_grams"]


@dataclass(frozen=True)
class ProjectionSpec:
    """How gradients become features (saved in the run manifest)."""

    r_in: int = field(default=16, metadata={"help": "input-side projection size per layer"})
    r_out: int = field(default=16, metadata={"help": "output-side projection size per layer"})
    r_dense: int = field(default=256, metadata={"help": "projection size for dense (torch.func) gradients"})
    kind: str = field(default="gaussian", metadata={"help": "gaussian or rademacher entries"})
    seed: int = field(default=0, metadata={"help": "base seed; each layer's matrices derive from (seed, name)"})

    def __post_init__(self):
        if self.kind not in ("gaussian", "rademacher"):
            raise ValueError(f"projection kind must be 'gaussian' or 'rademacher', got {self.kind!r}")
        for name in ("r_in", "r_out", "r_dense"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _matrix(r: int, d: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(r, d, generator=g, dtype=torch.float64) / r**0.5
    return (torch.randint(0, 2, (r, d), generator=g, dtype=torch.int8).double() * 2 - 1) / r**0.5


class Projector:
    """Seeded per-layer projections; `features(grads)` maps a captured batch to (B, D_layer) features."""

    def __init__(self, spec: ProjectionSpec | None = None, dtype: torch.dtype = torch.float32):
        self.spec = spec or ProjectionSpec()
        self.dtype = dtype
        self._cache: dict[tuple, torch.Tensor] = {}

    def _seed(self, name: str, side: str) -> int:
        return (self.spec.seed * 1_000_003 + zlib.crc32(f"{name}|{side}".encode())) % (2**63 - 1)

    def matrix(self, name: str, side: str, r: int, d: int, device=None) -> torch.Tensor:
        key = (name, side, r, d, device)
        if key not in self._cache:
            self._cache[key] = _matrix(r, d, self.spec.kind, self._seed(name, side)).to(self.dtype).to(device)
        return self._cache[key]

    def is_exact(self, g: FactoredGrad | DenseGrad) -> bool:
        if isinstance(g, FactoredGrad):
            d_in, d_out = g.A.shape[-1], g.G.shape[-1]
            return d_in * d_out <= self.spec.r_in * self.spec.r_out
        return g.g[0].numel() <= self.spec.r_dense

    def layer_features(self, name: str, g: FactoredGrad | DenseGrad) -> torch.Tensor:
        """(B, D) features of one layer's per-example gradients (float `dtype`)."""
        if self.is_exact(g):
            M = g.materialize(self.dtype)
            if isinstance(g, FactoredGrad) and g.transposed:  # always (d_out, d_in) orientation
                M = M.transpose(-1, -2)
            return M.reshape(M.shape[0], -1)
        dev = g.A.device if isinstance(g, FactoredGrad) else g.g.device
        if isinstance(g, FactoredGrad):
            d_in, d_out = g.A.shape[-1], g.G.shape[-1]
            P_in = self.matrix(name, "in", self.spec.r_in, d_in, dev)
            P_out = self.matrix(name, "out", self.spec.r_out, d_out, dev)
            A = g.masked(g.A).to(self.dtype)
            G = g.masked(g.G).to(self.dtype)
            phi = (G @ P_out.T).transpose(-1, -2) @ (A @ P_in.T)  # (B, r_out, r_in)
            return phi.reshape(phi.shape[0], -1)
        P = self.matrix(name, "dense", self.spec.r_dense, g.g[0].numel(), dev)
        return g.g.reshape(g.g.shape[0], -1).to(self.dtype) @ P.T

    def features(self, grads: Mapping[str, FactoredGrad | DenseGrad]) -> dict[str, torch.Tensor]:
        return {name: self.layer_features(name, g) for name, g in grads.items()}


def exact_gram(a: FactoredGrad | DenseGrad, b: FactoredGrad | DenseGrad | None = None) -> torch.Tensor:
    """(B_a, B_b) float64 exact inner products of per-example gradients, from factors when possible."""
    b = a if b is None else b
    return a.inner(b)


class ExactGramAccumulator:
    """Exact n x n Gram matrices per layer over several batches (small problems: keeps every batch's factors).

    The whole-model Gram is the sum over layers. Memory: the factors of all examples (like one big batch).
    """

    def __init__(self):
        self.batches: list[dict[str, FactoredGrad | DenseGrad]] = []
        self.idx: list[int] = []

    def add(self, grads: Mapping[str, FactoredGrad | DenseGrad], idx: list[int]) -> None:
        kept = {}
        for name, g in grads.items():
            if isinstance(g, FactoredGrad):
                kept[name] = FactoredGrad(g.A.detach().cpu(), g.G.detach().cpu(), g.tokens.cpu(), g.transposed)
            else:
                kept[name] = DenseGrad(g.g.detach().cpu())
        self.batches.append(kept)
        self.idx.extend(int(i) for i in idx)

    def grams(self) -> dict[str, torch.Tensor]:
        """{layer: (n, n) float64}, rows/cols in the order of `self.idx`."""
        if not self.batches:
            return {}
        out = {}
        for name in self.batches[0]:
            rows = []
            for bi in self.batches:
                rows.append(torch.cat([exact_gram(bi[name], bj[name]) for bj in self.batches], dim=1))
            out[name] = torch.cat(rows, dim=0)
        return out


# ----------------------------------------------------------------------------------------------------------
# as measures (per-batch kernels over a captured step; see measures.base)


def projection(projector: Projector, r_model: int | None = None, model_key: str = "__model__") -> Measure:
    """Per-example gradient features: out = {layer: (B, D_layer)} and, with `r_model`, the whole-model feature
    {model_key: (B, r_model)} = sum over layers of a second seeded projection of each layer's features
    (detached, on the CPU)."""

    def fn(step):
        feats = projector.features(step.grads)
        model = None
        if r_model is not None:
            for name, F in feats.items():
                P = projector.matrix(name, "model", r_model, F.shape[1], F.device)
                part = F @ P.T
                model = part if model is None else model + part
        out = {k: v.detach().cpu() for k, v in feats.items()}
        if model is not None:
            out[model_key] = model.detach().cpu()
        return out

    return stateless("features", fn)


def exact_grams() -> Measure:
    """Exact cross-example Grams over every step seen: finalize -> (ids, {layer: (n, n) float64}).

    The steps must carry their example ids (`backward_step(..., ids=...)`)."""

    def update(acc, step):
        acc.add(step.grads, list(step.ids))
        return acc, None

    return Measure("exact_grams", init=ExactGramAccumulator, update=update,
                   finalize=lambda acc: (list(acc.idx), acc.grams()))
