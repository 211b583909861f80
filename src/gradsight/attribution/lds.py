"""Linear datamodeling score (LDS), its noise ceiling, and leave-one-out correlation: how attributions are graded.

LDS (Park et al., "TRAK", 2023; dattri ``metric.lds``) asks whether the scores predict what retraining does.
Given a score matrix ``scores`` (N_train, N_test), m random training subsets S_j and, for each subset, a target
y_j(x) measured on a model retrained on S_j only (margin or -loss: HIGHER = the test point x is better served):

    g_j(x)  = sum_{i in S_j} scores[i, x]                    (the additive prediction, (m, N_test))
    LDS(x)  = Spearman_j( g_j(x), y_j(x) )                   (rank correlation over the m subsets)
    LDS     = mean over x of LDS(x), ignoring NaN             (constant columns have no ranks to correlate)

Sign convention: a positive score means "training example i helps test point x" (dattri's convention; it flips
its loss targets to -loss for the same reason). Scores with the opposite sign give LDS near -1.

Subsets (``subsets``) are dattri's ``retrain_lds`` draw exactly: subset j is
``np.random.default_rng(seed + j).choice(n, floor(alpha * n), replace=False)``, kept in the generator's order
(not sorted), so an index file written by dattri and one written here are byte-for-byte the same rows.

The standard error is the sample standard deviation of the per-test LDS over sqrt(n_valid). It treats test
points as independent, which they are not quite (all share the same m retrained models), so it measures the
spread over test points, not the uncertainty from the finite set of subsets.

Noise ceiling (``noise_ceiling``): with R >= 2 independent training runs per subset, the Spearman correlation
between two runs' targets bounds what any attribution can reach against ONE run's targets. Targets averaged over
R runs are less noisy, so a method graded against the R-run mean can exceed this single-run ceiling.

Everything here is numpy/scipy; no torch.

Example:
    >>> S = subsets(1000, m=100, alpha=0.5, seed=0)       # (100, 500)
    >>> res = lds(scores, S, targets)                     # scores (1000, 500), targets (100, 500)
    >>> res.mean, res.se, res.ci(0.95)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["LDSResult", "LOOResult", "subsets", "lds", "noise_ceiling", "loo_correlation", "spearman_columns"]


@dataclass(frozen=True)
class LDSResult:
    """The LDS of one score matrix.

    Attributes:
        mean: mean of the per-test LDS over the valid (non-NaN) test points.
        se: standard error of that mean, std(ddof=1) / sqrt(n_valid) (NaN when n_valid < 2).
        per_test: (N_test,) Spearman correlation per test point; NaN where either column is constant.
        n_valid: number of non-NaN entries of ``per_test``.
    """

    mean: float
    se: float
    per_test: np.ndarray
    n_valid: int

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """Normal-approximation confidence interval mean +- z_{(1+level)/2} * se over test points.

        Args:
            level: coverage in (0, 1).

        Returns:
            (lo, hi). The approximation ignores the correlation between test points (see the module docstring).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        z = float(stats.norm.ppf(0.5 + level / 2.0))
        return self.mean - z * self.se, self.mean + z * self.se


@dataclass(frozen=True)
class LOOResult:
    """Agreement between predicted and actual leave-one-out changes.

    Attributes:
        pearson, spearman: means over test points (NaN ignored) of the per-test correlations.
        per_test_pearson, per_test_spearman: (N_test,) correlations over the removed examples.
    """

    pearson: float
    spearman: float
    per_test_pearson: np.ndarray
    per_test_spearman: np.ndarray


def subsets(n: int, m: int = 100, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The m training subsets of the LDS protocol, drawn exactly as dattri's ``retrain_lds``.

    Args:
        n: number of training examples.
        m: number of subsets.
        alpha: subset fraction in (0, 1]; each subset has k = floor(alpha * n) distinct indices.
        seed: subset j uses ``np.random.default_rng(seed + j)``.

    Returns:
        (m, k) int64 indices, each row in the generator's order (not sorted), like dattri's index files.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    k = int(n * alpha)  # dattri: int(data_length * subset_ratio), i.e. floor for positive values
    if k < 1:
        raise ValueError(f"alpha * n must be >= 1, got alpha={alpha!r}, n={n!r}")
    rows = [np.random.default_rng(seed + j).choice(n, k, replace=False) for j in range(m)]
    return np.stack(rows).astype(np.int64)  # (m, k)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (average ranks for ties).

    Equals ``scipy.stats.spearmanr(a[:, x], b[:, x]).correlation`` column by column: Pearson correlation of the
    ranks. A constant column (zero rank variance) or a column holding NaN gives NaN.

    Args:
        a, b: (m, T) arrays, m observations of T variables.

    Returns:
        (T,) float64.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be 2-D arrays of the same shape, got {a.shape} and {b.shape}")
    bad = np.isnan(a).any(0) | np.isnan(b).any(0)  # (T,)
    ra = stats.rankdata(np.where(np.isnan(a), 0.0, a), axis=0)  # (m, T) average ranks
    rb = stats.rankdata(np.where(np.isnan(b), 0.0, b), axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    num = (ra * rb).sum(0)
    den = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / den
    rho[bad | (den == 0)] = np.nan
    return np.clip(rho, -1.0, 1.0)  # rounding can push |rho| a hair above 1, as scipy also clips


def _summary(per_test: np.ndarray) -> tuple[float, float, int]:
    ok = per_test[~np.isnan(per_test)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    se = float(ok.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan")
    return mean, se, n


def lds(scores: np.ndarray, subsets: np.ndarray, targets: np.ndarray) -> LDSResult:
    """Linear datamodeling score of ``scores`` against retraining targets.

    Args:
        scores: (N_train, N_test) attribution scores, positive = helpful (torch tensors are accepted).
        subsets: (m, k) training indices of the retrained models (rows of ``subsets(...)``).
        targets: (m, N_test) output of the model retrained on subset j at test point x, higher = better
            (margin, or -loss); average the R runs first if there are several.

    Returns:
        LDSResult; ``per_test`` equals dattri ``metric.lds(scores, (targets, subsets))[0]`` (to ~1e-16 for
        float64 inputs; inputs are summed in float64 here, while dattri sums float32 scores in float32).
    """
    scores = _as_array(scores, "scores")
    idx = np.asarray(_as_array(subsets, "subsets"))
    y = _as_array(targets, "targets")
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N_train, N_test), got shape {scores.shape}")
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"subsets must be a 2-D integer array (m, k), got shape {idx.shape}, dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= scores.shape[0]):
        raise ValueError(f"subsets hold indices outside [0, {scores.shape[0]}): range {idx.min()}..{idx.max()}")
    if y.shape != (idx.shape[0], scores.shape[1]):
        raise ValueError(f"targets must be (m, N_test) = {(idx.shape[0], scores.shape[1])}, got {y.shape}")
    # g[j, x] = sum_{i in S_j} scores[i, x], summed row by row as dattri does (same rounding, same ties)
    g = np.stack([scores[row].sum(0) for row in idx])  # (m, N_test)
    per_test = spearman_columns(g, y)  # (N_test,)
    mean, se, n = _summary(per_test)
    return LDSResult(mean, se, per_test, n)


def noise_ceiling(targets_runs: np.ndarray) -> float:
    """Mean over test points of the Spearman correlation (over subsets) between two runs' targets.

    Args:
        targets_runs: (R, m, N_test), R >= 2 independent trainings per subset. With R > 2 the per-pair ceilings
            are averaged over all R(R-1)/2 pairs of runs.

    Returns:
        The ceiling for grading against ONE run's targets (NaN test points ignored). Against the R-run mean
        the attainable LDS is higher (a less noisy target).
    """
    t = _as_array(targets_runs, "targets_runs")
    if t.ndim != 3 or t.shape[0] < 2:
        raise ValueError(f"targets_runs must be (R >= 2, m, N_test), got shape {t.shape}")
    pairs = [(a, b) for a in range(t.shape[0]) for b in range(a + 1, t.shape[0])]
    return float(np.mean([_summary(spearman_columns(t[a], t[b]))[0] for a, b in pairs]))


def loo_correlation(scores_col: np.ndarray, loo_deltas: np.ndarray) -> LOOResult:
    """Pearson and Spearman correlation between predicted and actual leave-one-out changes.

    Args:
        scores_col: (n,) or (n, T) predicted change for each removed training example (rows) and test point
            (columns), in the same sign convention as ``loo_deltas``: with positive = helpful scores, use
            delta = loss(without i) - loss(full), as ``digits.loo_ground_truth`` returns.
        loo_deltas: same shape, the actual changes after retraining.

    Returns:
        LOOResult: per-test correlations over the n removed examples (dattri ``loo_corr`` is the Pearson one)
        and their means over test points.
    """
    p = _as_array(scores_col, "scores_col")
    d = _as_array(loo_deltas, "loo_deltas")
    if p.shape != d.shape or p.ndim not in (1, 2):
        raise ValueError(f"scores_col and loo_deltas must have the same 1-D or 2-D shape, got {p.shape}, {d.shape}")
    if p.ndim == 1:
        p, d = p[:, None], d[:, None]
    if p.shape[0] < 3:
        raise ValueError(f"need at least 3 removed examples, got {p.shape[0]}")
    pc, dc = p - p.mean(0), d - d.mean(0)
    den = np.sqrt((pc * pc).sum(0) * (dc * dc).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        pear = np.clip((pc * dc).sum(0) / den, -1.0, 1.0)  # (T,)
    pear[den == 0] = np.nan
    spear = spearman_columns(p, d)
    return LOOResult(_summary(pear)[0], _summary(spear)[0], pear, spear)


def _as_array(a, name: str) -> np.ndarray:
    """numpy view of an array-like or a (CPU, detached) torch tensor, without importing torch."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    return a if a.dtype.kind in "iu" else a.astype(np.float64, copy=False)
