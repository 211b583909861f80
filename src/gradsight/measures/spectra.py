"""Spectral statistics of per-example, per-layer gradients.

For a gradient matrix with singular values s_1 >= ... >= s_r >= 0:

    frobenius    sqrt(sum s_i^2)
    nuclear      sum s_i                               (Li, Li, Zhou, ACL 2025)
    spectral     s_1
    sigma1_ratio s_1 / sum s_i                         (in (0, 1]; 1 = rank one)
    erank        exp(-sum p_i ln p_i), p_i = s_i / sum s_j   (Roy & Vetterli 2007; "sv" weights, as the
                 data-quality paper's code); weights="energy" uses p_i = s_i^2 / sum s_j^2
    stable_rank  sum s_i^2 / s_1^2

All in float64. A zero gradient has undefined ratios: sigma1_ratio, erank and stable_rank are NaN there
(and the pipeline flags the example).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

import torch

from ..capture import linalg
from ..capture.grads import DenseGrad, FactoredGrad
from .base import Measure, stateless

__all__ = ["METRICS", "spectral_stats", "batch_spectra", "batch_sq_norms", "shared_inputs", "spectra", "sq_norms",
           "spectra_frame"]

METRICS = ("frobenius", "nuclear", "spectral", "sigma1_ratio", "erank", "stable_rank")


def spectral_stats(s: torch.Tensor, erank_weights: str = "sv", rel_tol: float = 0.0) -> dict[str, torch.Tensor]:
    """Statistics from singular values.

    Args:
        s: (B, k) singular values (any order, zero padded), float64 preferred.
        erank_weights: "sv" (p_i proportional to s_i) or "energy" (to s_i^2).
        rel_tol: drop s_i < rel_tol * s_1 before the ratios (0 keeps all, the reproduction default).

    Returns:
        {metric: (B,) float64}.
    """
    s = s.double().clamp_min(0)
    s1 = s.max(dim=-1).values  # (B,)
    if rel_tol > 0:
        s = torch.where(s >= rel_tol * s1.unsqueeze(-1), s, torch.zeros_like(s))
    nuc = s.sum(-1)
    sq = s.pow(2).sum(-1)
    if erank_weights == "sv":
        w = s
    elif erank_weights == "energy":
        w = s.pow(2)
    else:
        raise ValueError(f"unknown erank_weights {erank_weights!r}; expected 'sv' or 'energy'")
    p = w / w.sum(-1, keepdim=True)  # NaN rows for a zero gradient
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    ent = torch.where(nuc > 0, ent, torch.full_like(ent, float("nan")))
    nan = torch.full_like(nuc, float("nan"))
    return {
        "frobenius": sq.sqrt(),
        "nuclear": nuc,
        "spectral": s1,
        "sigma1_ratio": torch.where(nuc > 0, s1 / nuc, nan),
        "erank": ent.exp(),
        "stable_rank": torch.where(s1 > 0, sq / s1.pow(2), nan),
    }


def _input_key(g: FactoredGrad) -> tuple:
    return (g.A.data_ptr(), tuple(g.A.shape), g.A.stride(), g.A.dtype)


def shared_inputs(grads: Mapping[str, FactoredGrad | DenseGrad]) -> Iterator[tuple[str, object, object]]:
    """(name, grad, InputGrams or None) over `grads`, one InputGrams per distinct input tensor of the factored
    layers (q/k/v, gate/up read one), its `share` the number of layers reading it. Each InputGrams is
    released after the last layer that reads it, so at most the inputs in flight hold their K_a / factors."""
    keys = {name: _input_key(g) for name, g in grads.items() if isinstance(g, FactoredGrad)}
    left = Counter(keys.values())
    held: dict[tuple, linalg.InputGrams] = {}
    for name, g in grads.items():
        if name not in keys:
            yield name, g, None
            continue
        k = keys[name]
        if k not in held:
            held[k] = linalg.InputGrams(g.A, g.tokens, share=left[k])
        yield name, g, held[k]
        left[k] -= 1
        if left[k] == 0:
            del held[k]


def batch_spectra(grads: Mapping[str, FactoredGrad | DenseGrad], route: str = "auto",
                  erank_weights: str = "sv", rel_tol: float = 0.0) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {metric: (B,)}} for one captured batch.

    route: one of `linalg.ROUTES` ("auto", "gram", "out", "in", "dense"); per example and layer, "auto" takes
    the cheapest eigenproblem by `linalg.spectra_costs` at the example's real length. Layers that read the same
    input tensor (q/k/v, gate/up) share one `linalg.InputGrams`: each example's K_a = A A^T and its Cholesky
    factor are computed once for all of them (and the cost model amortises them over the sharing layers).
    DenseGrad layers use svdvals; vector parameters (DenseGrad of a 1-D weight) get only the Frobenius norm.
    """
    if route not in linalg.ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {linalg.ROUTES}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, g, shared in shared_inputs(grads):
        if isinstance(g, DenseGrad) and g.g.dim() == 2:
            out[name] = {"frobenius": g.sq_norms().sqrt()}
            continue
        s = g.singular_values(route=route, shared=shared) if shared is not None else g.singular_values(route=route)
        out[name] = spectral_stats(s, erank_weights, rel_tol)
    return out


def batch_sq_norms(grads: Mapping[str, FactoredGrad | DenseGrad]) -> dict[str, torch.Tensor]:
    """{layer: (B,)} squared per-example norms; factored layers per example by the cheaper of the ghost and
    the materialised route (`linalg.norm_costs`), sharing K_a across layers that read the same input."""
    return {name: g.sq_norms(shared=shared) if shared is not None else g.sq_norms()
            for name, g, shared in shared_inputs(grads)}


# ----------------------------------------------------------------------------------------------------------
# as measures (per-batch kernels over a captured step; see measures.base)


def spectra(route: str = "auto", erank_weights: str = "sv", rel_tol: float = 0.0) -> Measure:
    """Per-example spectra of every captured layer: out = {layer: {metric: (B,)}} (see `batch_spectra`)."""
    return stateless("spectra", lambda step: batch_spectra(step.grads, route=route, erank_weights=erank_weights,
                                                           rel_tol=rel_tol))


def sq_norms() -> Measure:
    """Per-example squared gradient norms: out = {layer: (B,)} (Frobenius of G_e^T A_e, float64 for factors)."""
    return stateless("sq_norms", lambda step: batch_sq_norms(step.grads))


def spectra_frame(stats: Mapping[str, Mapping[str, torch.Tensor]], layers: Sequence, keep: Sequence[int],
                  idx: Sequence[int], groups: Sequence[str]) -> pd.DataFrame:
    """Long-format rows (idx, group, layer, block, kind, metric, value) of the kept batch positions.

    Args:
        stats: a `spectra` output. layers: LayerInfo of the captured layers (for block and kind).
        keep: batch positions to keep (flagged examples left out). idx, groups: per batch position.
    """
    info = {li.name: li for li in layers}
    k = np.asarray(keep, dtype=np.int64)
    n = len(keep)
    names, metrics, values = [], [], []
    for name, per_metric in stats.items():
        for metric in METRICS:
            if metric in per_metric:
                names.append(name)
                metrics.append(metric)
                values.append(per_metric[metric].detach().cpu().numpy().astype(np.float64)[k])
    if not values or n == 0:
        return pd.DataFrame({"idx": pd.Series(dtype=np.int64), "group": pd.Series(dtype=object),
                             "layer": pd.Series(dtype=object), "block": pd.Series(dtype=np.int64),
                             "kind": pd.Series(dtype=object), "metric": pd.Series(dtype=object),
                             "value": pd.Series(dtype=np.float64)})
    m = len(values)  # one block of n rows per (layer, metric), in stats order then METRICS order
    return pd.DataFrame({
        "idx": np.tile(np.asarray(idx, dtype=np.int64)[k], m),
        "group": np.tile(np.asarray(groups, dtype=object)[k], m),
        "layer": np.repeat(np.asarray(names, dtype=object), n),
        "block": np.repeat(np.asarray([info[x].block for x in names], dtype=np.int64), n),
        "kind": np.repeat(np.asarray([info[x].kind for x in names], dtype=object), n),
        "metric": np.repeat(np.asarray(metrics, dtype=object), n),
        "value": np.concatenate(values),
    })
