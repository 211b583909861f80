"""Gradient noise: the simple noise scale B_simple, per-coordinate gradient SNR, GVM-RAFT sample allocation.

Per-example gradients g_n (rows of a feature matrix F, shape (n, D), all at the SAME parameters) have mean
G = E[g_n] and covariance Sigma. From them:

    B_simple = tr(Sigma) / |G|^2                  (McCandlish et al. 2018; the batch size at which the
                                                   gradient noise equals the signal)
    GSNR_j   = mean_n(g_nj)^2 / (Var_n(g_nj) + eps)   (Liu et al. 2020, cockpit's convention)

Conventions shared by every function here:

- Inputs are float tensors or arrays; computation is in float64.
- Rows with a non-finite entry are SKIPPED and counted (``n_skipped``); zero rows are valid gradients.
- ``unbiased=True`` (default for the noise scale): tr(Sigma) from the 1/(n-1) sample covariance, and
  |G|^2 from |gbar|^2 - tr(Sigma)/n (because E|gbar|^2 = |G|^2 + tr(Sigma)/n). That |G|^2 estimate is
  negative with positive probability when the signal is weak; B_simple is then reported as +inf with
  ``signal_detected = False`` (NaN when tr(Sigma) is also 0).
- A ratio of unbiased estimators is not unbiased: average numerator and denominator separately (over
  steps, ranks or bootstrap samples) before dividing.

References:
    McCandlish, Kaplan, Amodei et al. "An Empirical Model of Large-Batch Training", arXiv 1812.06162, 2018
    (eq. 2.9, appendix A.1: B_simple and the two-batch estimators).
    Liu et al. "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters", ICLR 2020;
    cockpit (Schneider, Dangel, Hennig, NeurIPS 2021) ``cockpit/quantities/mean_gsnr.py``.
    Yao et al. "Optimizing Chain-of-Thought Reasoners via Gradient Variance Minimization in Rejection
    Sampling and RL" (GVM-RAFT), arXiv 2505.02391, 2025; code github RLHFlow/GVM
    ``em/stage_2_calc_sample_size.py``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..measures.moments import MomentAccumulator, as_f64, ratio

__all__ = [
    "noise_scale",
    "noise_scale_ci",
    "noise_scale_two_batch",
    "two_batch_estimates",
    "noise_scale_microbatches",
    "gsnr",
    "per_layer_noise",
    "gvm_allocation",
]

PER_LAYER_COLUMNS = ["layer", "n", "trace_sigma", "g_sq", "b_simple", "gsnr_mean"]


def noise_scale(F, *, unbiased: bool = True) -> dict:
    """Simple gradient noise scale B_simple = tr(Sigma) / |G|^2 from per-example gradients at fixed parameters.

    Args:
        F: (n, D) per-example gradients (exact or projected; projections with E[P^T P] = I keep both
            tr(Sigma) and |G|^2 unbiased). n >= 2.
        unbiased: unbiased estimators (default) or the plug-in ones (1/n covariance, |gbar|^2).

    Returns:
        dict with ``b_simple`` (float; +inf when the |G|^2 estimate is <= 0, NaN when tr(Sigma) is 0 too),
        ``trace_sigma``, ``g_sq`` (the |G|^2 estimate), ``gbar_sq`` (= |gbar|^2, plug-in), ``n`` (valid rows),
        ``n_skipped`` (rows with non-finite entries), ``signal_detected`` (g_sq > 0).

    Formula:
        gbar = (1/n) sum_n g_n;  tr(Sigma)^ = (1/(n-1)) sum_n |g_n - gbar|^2;
        |G|^2^ = |gbar|^2 - tr(Sigma)^ / n   (unbiased: E|gbar|^2 = |G|^2 + tr(Sigma)/n);
        B_simple = tr(Sigma)^ / |G|^2^.

    Reference: McCandlish et al. 2018, eq. 2.9 and appendix A.1.
    Reduction: mean over examples (gbar), sums over coordinates (traces and squared norms).
    """
    return MomentAccumulator().update(F).noise_scale(unbiased)


def noise_scale_ci(F, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, *, unbiased: bool = True) -> dict:
    """Bootstrap (over examples) percentile confidence interval of B_simple.

    Args:
        F: (n, D) per-example gradients.
        n_boot: bootstrap resamples (with replacement, n rows each).
        ci: coverage of the interval, in (0, 1).
        seed: numpy seed of the resampling.
        unbiased: as in ``noise_scale``.

    Returns:
        dict ``estimate`` (B_simple on all rows), ``lo``, ``hi`` (percentiles of the bootstrap B_simple,
        taken as order statistics, so +inf replicates give hi = +inf rather than NaN), ``n_boot``,
        ``frac_no_signal`` (share of replicates with |G|^2 estimate <= 0).

    Formula:
        for resample weights w (multinomial counts, sum n): gbar_w = (1/n) sum w_i g_i,
        tr(Sigma)_w = (sum w_i |g_i|^2 - n |gbar_w|^2) / (n - 1), then B as in ``noise_scale``.

    Reference: Efron & Tibshirani 1993 (percentile bootstrap); McCandlish et al. 2018 (B_simple).
    Reduction: as ``noise_scale``, per resample.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    F = as_f64(F)
    F = F[torch.isfinite(F).all(dim=1)]
    est = noise_scale(F, unbiased=unbiased)
    n = F.shape[0]
    rng = np.random.default_rng(seed)
    W = torch.as_tensor(rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot), dtype=torch.float64)
    # centre first: the trace formula below then has little cancellation
    Fc = F - F.mean(0)
    sq = Fc.pow(2).sum(1)
    mu0 = F.mean(0)
    mc = W @ Fc / n  # (n_boot, D): resample mean minus the full-sample mean
    ddof = 1 if unbiased else 0
    tr = ((W @ sq) - n * mc.pow(2).sum(1)) / (n - ddof)
    gbar_sq = (mc + mu0).pow(2).sum(1)
    gsq = gbar_sq - tr / n if unbiased else gbar_sq
    b = torch.where(gsq > 0, tr / gsq, torch.where(tr > 0, math.inf, math.nan)).numpy()
    b = np.where(np.isnan(b), np.inf, b)  # only when tr == 0 and gsq <= 0: no signal either
    a = (1 - ci) / 2
    lo, hi = np.quantile(b, [a, 1 - a], method="inverted_cdf")
    return {"estimate": est["b_simple"], "lo": float(lo), "hi": float(hi), "n_boot": int(n_boot),
            "frac_no_signal": float((gsq <= 0).double().mean())}


def two_batch_estimates(S_small, S_big, B_small: float, B_big: float):
    """The unbiased (|G|^2, tr Sigma) of McCandlish et al. from squared batch-gradient norms (formula in
    `noise_scale_two_batch`), by arithmetic only: floats, numpy arrays or torch tensors (which stay on their
    device; the training monitor uses it per step without a host sync). No argument checks."""
    g_sq = (B_big * S_big - B_small * S_small) / (B_big - B_small)
    trace = (S_small - S_big) / (1.0 / B_small - 1.0 / B_big)
    return g_sq, trace


def noise_scale_two_batch(S_small, S_big, B_small, B_big) -> dict:
    """McCandlish two-batch estimators of |G|^2 and tr(Sigma) from squared norms of two batch gradients.

    Args:
        S_small: |G_{B_small}|^2, squared norm of a mean gradient over B_small examples (scalar or array
            over steps / ranks).
        S_big: |G_{B_big}|^2 for B_big examples, at the same parameters (e.g. the all-reduced batch).
        B_small, B_big: the batch sizes, 0 < B_small < B_big.

    Returns:
        dict ``g_sq`` and ``trace_sigma`` (float for scalar input, else arrays, one estimate per entry), and
        ``b_simple`` = mean(trace_sigma) / mean(g_sq) over the entries (numerator and denominator averaged
        separately; +inf when the mean |G|^2 estimate is <= 0).

    Formula:
        |G|^2^ = (B_big S_big - B_small S_small) / (B_big - B_small);
        tr(Sigma)^ = (S_small - S_big) / (1/B_small - 1/B_big)
        (both unbiased because E S_B = |G|^2 + tr(Sigma)/B).

    Reference: McCandlish et al. 2018, appendix A.1; EleutherAI/gpt-neox ``gradient_noise_scale.py``
    (which further smooths both with EMAs).
    Reduction: a mean over the given entries for ``b_simple``.
    """
    B_small, B_big = float(B_small), float(B_big)
    if not (0 < B_small < B_big):
        raise ValueError(f"need 0 < B_small < B_big, got B_small={B_small}, B_big={B_big}")
    s_small = np.asarray(S_small, dtype=np.float64)
    s_big = np.asarray(S_big, dtype=np.float64)
    if s_small.shape != s_big.shape:
        raise ValueError(f"S_small and S_big shapes differ: {s_small.shape} vs {s_big.shape}")
    g_sq, tr = two_batch_estimates(s_small, s_big, B_small, B_big)
    b = ratio(float(np.mean(tr)), float(np.mean(g_sq)))
    if s_small.ndim == 0:
        return {"g_sq": float(g_sq), "trace_sigma": float(tr), "b_simple": b}
    return {"g_sq": g_sq, "trace_sigma": tr, "b_simple": b}


def noise_scale_microbatches(G_k, b: int) -> dict:
    """B_simple from K micro-batch mean gradients of b examples each, all at the same parameters.

    Args:
        G_k: (K, D) micro-batch mean gradients, K >= 2.
        b: examples per micro-batch.

    Returns:
        dict ``b_simple``, ``trace_sigma`` (per-EXAMPLE tr(Sigma) = b * s2), ``g_sq``, ``K``, ``b``,
        ``signal_detected``.

    Formula:
        gbar = (1/K) sum_k g_k;  s2 = (1/(K-1)) sum_k |g_k - gbar|^2   (estimates tr(Sigma) / b);
        B_simple = b s2 / (|gbar|^2 - s2 / K)   (the denominator removes the noise in |gbar|^2).

    Reference: McCandlish et al. 2018 (B_simple); METHODS.md section 9.1 (K micro-batch form).
    Reduction: mean over micro-batches, sums over coordinates.
    """
    b = int(b)
    if b < 1:
        raise ValueError(f"micro-batch size b must be >= 1, got {b}")
    G = as_f64(G_k)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("micro-batch gradients contain inf/NaN (skip such steps before estimating)")
    K = G.shape[0]
    if K < 2:
        raise ValueError(f"need at least 2 micro-batch gradients, got {K}")
    gbar = G.mean(0)
    s2 = float((G - gbar).pow(2).sum()) / (K - 1)
    g_sq = float(gbar.pow(2).sum()) - s2 / K
    return {"b_simple": ratio(b * s2, g_sq), "trace_sigma": b * s2, "g_sq": g_sq, "K": K, "b": b,
            "signal_detected": g_sq > 0}


def gsnr(F, eps: float = 1e-5, unbiased: bool = False) -> tuple[torch.Tensor, float]:
    """Per-coordinate gradient signal-to-noise ratio over per-example gradients, and its mean.

    Args:
        F: (n, D) per-example gradients.
        eps: added to the variance (cockpit default 1e-5; it sets the scale below which coordinates count
            as noise-free, so it is NOT scale invariant).
        unbiased: False (cockpit): population variance (1/n) and mean^2; True: sample variance s^2 (1/(n-1))
            and the unbiased mu^2 estimate mean^2 - s^2/n (can be negative).

    Returns:
        (gsnr (D,) float64 tensor, mean over coordinates as float).

    Formula:
        GSNR_j = (mean_n g_nj)^2 / (Var_n g_nj + eps).

    Reference: Liu et al., ICLR 2020; cockpit ``MeanGSNR`` (Schneider et al. 2021).
    Reduction: mean over examples per coordinate, then the mean over coordinates.
    """
    return MomentAccumulator().update(F).gsnr(eps, unbiased)


def per_layer_noise(features: Mapping[str, "torch.Tensor"], *, unbiased: bool = True,
                    eps: float = 1e-5) -> pd.DataFrame:
    """Noise scale and mean GSNR per layer, plus a ``total`` row over all layers together.

    Args:
        features: {layer: (n, D_l) per-example gradients}, the same n examples (same row order) in each.
        unbiased: as in ``noise_scale``.
        eps: as in ``gsnr`` (cockpit convention, population variance).

    Returns:
        DataFrame with columns layer, n, trace_sigma, g_sq, b_simple, gsnr_mean; one row per layer then
        ``total``: the concatenation of all layers' coordinates, so its trace_sigma and g_sq are the sums
        of the layers' and b_simple = sum tr / sum |G|^2 (not a mean of ratios); its gsnr_mean is the
        mean over all coordinates. Rows with a non-finite entry in ANY layer are dropped from every layer.

    Reference: McCandlish et al. 2018; cockpit MeanGSNR.
    Reduction: per layer over its coordinates; ``total`` over all coordinates.
    """
    if not features:
        raise ValueError("no layers given")
    if "total" in features:
        raise ValueError("a layer is named 'total', the name of the summary row")
    mats = {name: as_f64(f) for name, f in features.items()}
    ns = {f.shape[0] for f in mats.values()}
    if len(ns) != 1:
        raise ValueError(f"every layer needs the same number of examples, got {sorted(ns)}")
    ok = torch.stack([torch.isfinite(f).all(dim=1) for f in mats.values()]).all(0)
    mats = {k: v[ok] for k, v in mats.items()}
    rows = []
    for name, f in list(mats.items()) + [("total", torch.cat(list(mats.values()), dim=1))]:
        acc = MomentAccumulator().update(f)
        ns_ = acc.noise_scale(unbiased)
        rows.append({"layer": name, "n": ns_["n"], "trace_sigma": ns_["trace_sigma"], "g_sq": ns_["g_sq"],
                     "b_simple": ns_["b_simple"], "gsnr_mean": acc.gsnr(eps)[1]})
    return pd.DataFrame(rows, columns=PER_LAYER_COLUMNS)


def _largest_remainder(frac: np.ndarray, budget: int) -> np.ndarray:
    """Integers summing to budget: floor(budget * frac) plus one for the largest remainders (ties: lowest index)."""
    x = frac * budget
    base = np.floor(x).astype(np.int64)
    short = budget - int(base.sum())
    if short > 0:
        order = np.argsort(-(x - base), kind="stable")
        base[order[:short]] += 1
    return base


def gvm_allocation(grad_norms: Sequence[float], accept_rates: Sequence[float], budget: int,
                   alpha: float = 1e-3, beta: float = 2.0, filter_threshold: float = 1.0,
                   filter_insufficient: float = 0.0) -> np.ndarray:
    """GVM-RAFT per-prompt sample counts minimising the stochastic-gradient variance under a budget.

    Args:
        grad_norms: G_i >= 0 per prompt, the mean gradient norm of its accepted samples (0 if none).
        accept_rates: p_i in [0, 1] per prompt (stage-1 acceptance rates).
        budget: total samples N >= 0.
        alpha: regulariser weight (>= 0), default 1e-3.
        beta: regulariser exponent, default 2 (denominator sqrt(p + alpha / p)).
        filter_threshold: prompts with p_i > filter_threshold get 0 (default 1.0: none). Unlike the released
            script, where 0 disables the filter, 0 here drops every prompt with p_i > 0.
        filter_insufficient: prompts whose expected accepted count p_i * n_i (with n_i = N * the
            first-pass fraction) is below this get 0 (default 0: none).

    Returns:
        (m,) int64 counts summing to ``budget`` exactly.

    Formula:
        raw_i = G_i / sqrt(p_i + alpha / p_i^(beta - 1))   (raw_i = 0 if G_i = 0 or p_i = 0);
        f_i = raw_i / sum_k raw_k; apply the filters; renormalise; n_i = largest-remainder rounding of N f_i
        (floor, then +1 to the largest fractional parts, ties to the lowest index).

    Reference: Yao et al. 2025 (GVM-RAFT), code RLHFlow/GVM ``em/stage_2_calc_sample_size.py``.
    Reduction: none (per prompt); the budget is shared by normalisation.

    Raises:
        ValueError: mismatched lengths, rates outside [0, 1], negative or non-finite norms, a negative or
            non-integer budget, or (budget > 0) no prompt left with positive weight.
    """
    G = np.asarray(grad_norms, dtype=np.float64)
    p = np.asarray(accept_rates, dtype=np.float64)
    if G.ndim != 1 or p.ndim != 1:
        raise ValueError(f"grad_norms and accept_rates must be 1-D, got shapes {G.shape} and {p.shape}")
    if G.shape != p.shape:
        raise ValueError(f"grad_norms has {G.size} entries but accept_rates has {p.size}")
    if not np.all(np.isfinite(G)) or np.any(G < 0):
        raise ValueError("grad_norms must be finite and non-negative")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("accept_rates must lie in [0, 1]")
    if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    budget = int(budget)
    if not (alpha >= 0) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    if not (filter_insufficient >= 0):
        raise ValueError(f"filter_insufficient must be >= 0, got {filter_insufficient}")
    if budget == 0:
        return np.zeros(G.size, dtype=np.int64)
    active = (G > 0) & (p > 0)
    raw = np.zeros_like(G)
    pa = p[active]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # alpha / p^(beta-1) written as alpha * p^(1-beta); it overflows to inf for tiny p (raw -> 0)
        denom = pa if alpha == 0 else pa + alpha * np.power(pa, 1.0 - beta)
        raw[active] = G[active] / np.sqrt(denom)
    if not np.all(np.isfinite(raw)):
        raise ValueError("a raw allocation weight overflowed (huge G_i with a tiny p_i); rescale grad_norms")
    if not raw.sum() > 0:
        raise ValueError("no prompt has positive weight (every prompt has G_i = 0 or p_i = 0)")
    frac = raw / raw.sum()
    frac = np.where(p > filter_threshold, 0.0, frac)
    if filter_insufficient > 0:
        frac = np.where(p * frac * budget >= filter_insufficient, frac, 0.0)
    if not frac.sum() > 0:
        raise ValueError("the filters (filter_threshold / filter_insufficient) removed every prompt")
    frac = frac / frac.sum()
    return _largest_remainder(frac, budget)
