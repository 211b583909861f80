"""Spectral criteria of the curvature: outliers against the bulk of an SLQ density, and Hessian ratios.

- ``measure_quantile``, ``outlier_split``, ``bulk_outliers``: split the top eigenvalues into outliers and bulk
  at the largest log-gap of their distance to a bulk reference (a quantile of the SLQ measure).
- ``spectral_criteria``: Hessian spectral criteria from extreme eigenvalues and/or a spectral density
  (ratios of negative to positive mass and curvature, |lambda_min / lambda_max|).

References:
    Gabdullin. "Investigating generalization capabilities of neural networks by means of loss landscapes
    and Hessian analysis" (LLA), arXiv 2412.10146 (Hessian spectral criteria; see ``spectral_criteria``).
    Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018
    (|lambda_min / lambda_max| as a local-convexity ratio).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

if TYPE_CHECKING:
    from .density import SLQResult

__all__ = ["measure_quantile", "outlier_split", "bulk_outliers", "spectral_criteria"]


# ---------------------------------------------------------------------------------- bulk and outliers


def measure_quantile(result: SLQResult, q: float) -> float:
    """The q-quantile of the probe-averaged SLQ spectral measure (weights / n_probes: total mass 1)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    x = result.nodes.reshape(-1).numpy()
    w = (result.weights / result.weights.shape[0]).reshape(-1).numpy()
    o = np.argsort(x, kind="stable")
    cdf = np.cumsum(w[o])
    return float(x[o][min(int(np.searchsorted(cdf, q * cdf[-1])), len(x) - 1)])


def outlier_split(eigenvalues, bulk_ref: float) -> dict:
    """Split the top eigenvalues into outliers and bulk at the largest log-gap of their distance to the bulk.

    Keeping the eigenvalues l_1 >= ... >= l_k above the bulk reference b, the outliers are l_1..l_n with

        n = argmax_{1 <= i <= k-1} log((l_i - b) / (l_{i+1} - b)),

    the split with the largest ratio of consecutive distances to the bulk (scale-free: multiplying the
    operator by a constant changes nothing). The bulk edge is l_{n+1}, the largest eigenvalue left in the bulk.
    The rule always finds 1 <= n <= k-1: `saturated` (n = k-1) says the split sits at the end of the computed
    range (compute more eigenvalues), and `gap_margin` (largest log-gap minus the second largest) says how
    pronounced it is (near 0: a smooth decay, no real separation).

    Args:
        eigenvalues: top-k eigenvalues (any order; sorted descending here).
        bulk_ref: the bulk reference b (`bulk_outliers` uses the median of the SLQ measure).

    Returns:
        dict: n_outliers (k' if fewer than 2 of the eigenvalues exceed b), bulk_edge (b if none does),
        log_gaps (split i = 1..k'-1), saturated, gap_margin.
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    lam = lam[lam > bulk_ref]
    k = len(lam)
    if k < 2:
        return {"n_outliers": k, "bulk_edge": float(bulk_ref), "log_gaps": [], "saturated": k == 1,
                "gap_margin": 0.0}
    dist = lam - bulk_ref  # (k,) > 0
    gaps = np.log(dist[:-1] / dist[1:])  # (k - 1,)
    n = int(np.argmax(gaps)) + 1
    second = float(np.sort(gaps)[-2]) if k > 2 else 0.0
    return {"n_outliers": n, "bulk_edge": float(lam[n]), "log_gaps": gaps.tolist(), "saturated": n == k - 1,
            "gap_margin": float(gaps[n - 1]) - second}


def bulk_outliers(result: SLQResult, top_eigenvalues, bulk_quantile: float = 0.5) -> dict:
    """Outliers of the top eigenvalues against the bulk seen by SLQ (the rule of `outlier_split`).

    The bulk reference b is the `bulk_quantile` quantile of the SLQ measure (default the median: the centre
    of the bulk, close to zero for a trained network). An upper quantile such as 0.99 would put b among the
    top eigenvalues of a small network (1% of 3,000 parameters is 30 eigenvalues) and distort the gaps.

    Returns:
        `outlier_split`'s dict plus bulk_ref, bulk_quantile and mass_above_edge (the fraction of the SLQ
        measure above the bulk edge; times dim, a density-side cross-check of the count).
    """
    b = measure_quantile(result, bulk_quantile)
    split = outlier_split(top_eigenvalues, b)
    x = result.nodes.reshape(-1).numpy()
    w = (result.weights / result.weights.shape[0]).reshape(-1).numpy()
    return {**split, "bulk_ref": b, "bulk_quantile": float(bulk_quantile),
            "mass_above_edge": float(w[x > split["bulk_edge"]].sum())}


# ---------------------------------------------------------------------------------- spectral criteria


def spectral_criteria(eigs_top=None, eigs_bottom=None, *, density=None, tol: float = 0.0) -> dict:
    """Hessian spectral criteria (LLA, Gabdullin 2024) from extreme eigenvalues and/or a spectral density.

    Definitions used here (the LLA paper's exact estimators could not be verified; these are ours):

        abs_min_max_ratio  = |lambda_min / lambda_max|      (Li et al. 2018's local-convexity ratio:
                                                             ~0 near a convex minimum, large at saddles)
        neg_pos_mass_ratio = sum_{x_j < -tol} w_j / sum_{x_j > tol} w_j
        neg_pos_curvature_ratio = sum_{x_j < -tol} w_j |x_j| / sum_{x_j > tol} w_j x_j

    over the density's nodes x_j and weights w_j (SLQ / Lanczos Ritz values and weights, pooled over
    probe vectors; any positive scale, the ratios are scale-free). Nodes with |x| <= tol count as neither.
    lambda_max = max(eigs_top) (else the largest node); lambda_min = min(eigs_bottom) (else the smallest
    node, the extreme Ritz value; else NaN).

    Args:
        eigs_top: top eigenvalues (largest algebraic), any sequence.
        eigs_bottom: bottom eigenvalues (smallest algebraic).
        density: (nodes, weights), a dict with "nodes"/"weights", an object with ``.nodes`` and ``.weights``
            (``gradsight.curvature.SLQResult``), or PyHessian's
            (eigen_list_full, weight_list_full); nested lists (probes x nodes) are pooled.
        tol: zero band for the mass ratios.

    Returns:
        dict with lambda_max, lambda_min, abs_min_max_ratio, neg_mass, pos_mass (fractions of the total
        weight), neg_pos_mass_ratio, neg_pos_curvature_ratio (NaN where undefined; +inf when the positive
        side is empty and the negative side is not).
    """
    def arr(x):
        if torch.is_tensor(x):
            x = x.detach().cpu().double().numpy()
        return None if x is None else np.asarray(x, dtype=np.float64).reshape(-1)

    top, bottom = arr(eigs_top), arr(eigs_bottom)
    nodes = weights = None
    if density is not None:
        if isinstance(density, Mapping):
            nodes, weights = density["nodes"], density["weights"]
        elif hasattr(density, "nodes") and hasattr(density, "weights"):  # curvature.SLQResult
            nodes, weights = density.nodes, density.weights
        else:
            nodes, weights = density
        nodes, weights = arr(nodes), arr(weights)
        if nodes.shape != weights.shape:
            raise ValueError(f"density nodes {nodes.shape} and weights {weights.shape} differ")
    lam_max = float(top.max()) if top is not None and top.size else (
        float(nodes.max()) if nodes is not None else math.nan)
    lam_min = float(bottom.min()) if bottom is not None and bottom.size else (
        float(nodes.min()) if nodes is not None else math.nan)
    ratio = abs(lam_min / lam_max) if lam_max != 0 and not math.isnan(lam_max) else math.nan

    out = {"lambda_max": lam_max, "lambda_min": lam_min, "abs_min_max_ratio": ratio,
           "neg_mass": math.nan, "pos_mass": math.nan, "neg_pos_mass_ratio": math.nan,
           "neg_pos_curvature_ratio": math.nan}
    if nodes is not None:
        neg, pos = nodes < -tol, nodes > tol
        total = weights.sum()
        out["neg_mass"] = float(weights[neg].sum() / total) if total > 0 else math.nan
        out["pos_mass"] = float(weights[pos].sum() / total) if total > 0 else math.nan
        out["neg_pos_mass_ratio"] = _safe_ratio(weights[neg].sum(), weights[pos].sum())
        out["neg_pos_curvature_ratio"] = _safe_ratio((weights[neg] * -nodes[neg]).sum(),
                                                     (weights[pos] * nodes[pos]).sum())
    return out


def _safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return float(num / den)
    return math.inf if num > 0 else math.nan
