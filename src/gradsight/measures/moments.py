"""Streaming moments of per-example outputs: per-coordinate mean and centred sum of squares.

`MomentAccumulator` holds (n, mean, m2) of the rows seen so far in float64 (Chan et al. parallel update, so
chunks of any size and merges across ranks give the numbers of one pass over all rows): enough for the noise
scale B_simple and the GSNR without storing the rows, O(D) memory. `moments(measure)` streams the per-example
outputs of another measure (e.g. `projection` features) through one accumulator per key; it is how a training
monitor tracks gradient noise every N steps, and what `stats.noise` computes its tables with.

Reference: Chan, Golub, LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances", 1979; McCandlish et al. 2018 (B_simple); cockpit (GSNR).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .base import Measure

__all__ = ["MomentAccumulator", "moments", "as_f64", "ratio"]


def as_f64(F, what: str = "gradients") -> torch.Tensor:
    """(n, D) float64 CPU tensor from a tensor / array / nested list (`what` names the rows in the error)."""
    t = torch.as_tensor(F) if not isinstance(F, torch.Tensor) else F
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{what} must be a 2-D (n, D) array, got shape {tuple(t.shape)}")
    return t


def ratio(num: float, den: float) -> float:
    """num / den for the noise scale: +inf when den <= 0 < num, NaN when both are <= 0."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


class MomentAccumulator:
    """Streaming per-coordinate mean and centred sum of squares (Chan et al. parallel update), float64.

    Enough for the noise scale and GSNR without storing the rows: O(D) memory. Merge across ranks by
    gathering ``state_dict()`` (n, mean, m2, n_skipped) and calling ``merge``; means are not summable, so
    do not all_reduce them directly.

    Reference: Chan, Golub, LeVeque, "Updating formulae and a pairwise algorithm for computing sample
    variances", 1979.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.n_skipped = 0
        self.mean = torch.zeros(dim, dtype=torch.float64) if dim is not None else None
        self.m2 = torch.zeros(dim, dtype=torch.float64) if dim is not None else None

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / n)
        self.n = n

    def update(self, F_chunk) -> "MomentAccumulator":
        """Add a chunk (b, D) of per-example gradients; rows with non-finite entries are skipped. Returns self."""
        F = as_f64(F_chunk)
        if self.dim is None:
            self.dim = F.shape[1]
            self.mean = torch.zeros(self.dim, dtype=torch.float64)
            self.m2 = torch.zeros(self.dim, dtype=torch.float64)
        if F.shape[1] != self.dim:
            raise ValueError(f"gradient dimension {F.shape[1]} does not match the accumulator's {self.dim}")
        ok = torch.isfinite(F).all(dim=1)
        self.n_skipped += int((~ok).sum())
        F = F[ok]
        if F.shape[0]:
            mb = F.mean(0)
            self._combine(F.shape[0], mb, (F - mb).pow(2).sum(0))
        return self

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Add another accumulator's rows. Returns self."""
        if other.dim is not None and self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dimensions {self.dim} and {other.dim}")
        if self.dim is None and other.dim is not None:
            self.dim = other.dim
            self.mean = torch.zeros(other.dim, dtype=torch.float64)
            self.m2 = torch.zeros(other.dim, dtype=torch.float64)
        if other.dim is not None:
            self._combine(other.n, other.mean, other.m2)
        self.n_skipped += other.n_skipped
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"n", "n_skipped": int64 scalars, "mean", "m2": (D,) float64}."""
        if self.dim is None:
            raise ValueError("empty accumulator without a dimension has no state; construct it with dim=D")
        return {"n": torch.tensor(self.n, dtype=torch.int64), "n_skipped": torch.tensor(self.n_skipped),
                "mean": self.mean.clone(), "m2": self.m2.clone()}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "MomentAccumulator":
        mean = torch.as_tensor(state["mean"]).detach().cpu().double().reshape(-1)
        acc = cls(mean.numel())
        acc.n = int(state["n"])
        acc.n_skipped = int(state.get("n_skipped", 0))
        acc.mean = mean.clone()
        acc.m2 = torch.as_tensor(state["m2"]).detach().cpu().double().reshape(-1).clone()
        return acc

    def noise_scale(self, unbiased: bool = True) -> dict:
        """B_simple and its parts from the rows seen so far; see ``noise_scale``."""
        n = self.n
        if n < 2:
            raise ValueError(f"the noise scale needs at least 2 valid per-example gradients, got {n}")
        ddof = 1 if unbiased else 0
        trace_sigma = float(self.m2.sum()) / (n - ddof)
        gbar_sq = float(self.mean.pow(2).sum())
        g_sq = gbar_sq - trace_sigma / n if unbiased else gbar_sq
        return {"b_simple": ratio(trace_sigma, g_sq), "trace_sigma": trace_sigma, "g_sq": g_sq,
                "gbar_sq": gbar_sq, "n": n, "n_skipped": self.n_skipped, "signal_detected": g_sq > 0}

    def gsnr(self, eps: float = 1e-5, unbiased: bool = False) -> tuple[torch.Tensor, float]:
        """Per-coordinate GSNR and its mean over coordinates; see ``gsnr``."""
        n = self.n
        if n < (2 if unbiased else 1):
            raise ValueError(f"GSNR needs at least {2 if unbiased else 1} valid per-example gradients, got {n}")
        if unbiased:
            var = self.m2 / (n - 1)
            num = self.mean.pow(2) - var / n
        else:
            var = self.m2 / n
            num = self.mean.pow(2)
        g = num / (var + eps)
        return g, float(g.mean())


def moments(of: Measure) -> Measure:
    """Streaming per-coordinate moments of `of`'s per-example outputs {key: (B, D)}.

    ``finalize`` gives {key: MomentAccumulator} (``.noise_scale()``, ``.gsnr()``, ``.mean``, ``.n``). Rows with a
    non-finite entry are skipped and counted; the wrapped measure's own state is carried along.
    """

    def init():
        return of.init(), {}

    def update(state, step):
        inner, accs = state
        inner, out = of.update(inner, step)
        for key, F in out.items():
            accs.setdefault(key, MomentAccumulator()).update(F)
        return (inner, accs), out

    return Measure(f"moments({of.name})", init, update, finalize=lambda state: state[1])
