"""Group comparisons of layer-wise gradient statistics: curves, bootstrap CIs, MAD, RD, permutation tests.

Everything here is pure numpy/pandas and works on the long-format ``layer_stats`` table
(columns idx, group, layer, block, kind, metric, value; one row per example x layer x metric).

Conventions shared by every function:

- A *cell* is (group, kind, block, metric). Its values are the finite ``value`` entries of its rows;
  non-finite values (NaN, inf) are left out and ``n`` counts what remains.
- A *depth curve* of (group, kind, metric) is the per-block mean ordered by block, over the cells with at
  least one finite value. Layers outside the
  transformer blocks (block == -1, e.g. ``lm_head``) are left out of the curve whenever the kind also has
  blocks >= 0; a kind that only lives outside the blocks is a one-point curve at block -1.
- Randomness (bootstrap, permutations) is seeded from ``seed`` plus the *names* involved (group, pair,
  kind, metric) through ``numpy.random.SeedSequence``, so a result never depends on dict ordering nor on
  which other groups are present.

References:
    Li, Li, Zhou. "What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking: A Gradient
    Perspective", ACL 2025 (MAD across layers, depth thirds, Relative Difference).
    Li, Li, Li, Zhou. "How Instruction and Reasoning Data shape Post-Training: Data Quality through the
    Lens of Layer-wise Gradients", arXiv 2504.10766 (same-layer comparison of group means).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from gradsight.stats import resample

__all__ = [
    "PAPER_SEGMENT_BOUNDS",
    "depth_segments",
    "mad",
    "relative_difference",
    "bootstrap_ci",
    "benjamini_hochberg",
    "group_curves",
    "mad_table",
    "rd_table",
    "permutation_tests",
    "summarize",
]

#: Depth-third boundaries (b1, b2) hard-coded in the Layer_Gradient code for the depths it studied.
PAPER_SEGMENT_BOUNDS: dict[int, tuple[int, int]] = {32: (10, 20), 28: (7, 21), 26: (7, 20), 42: (12, 30)}

LAYER_STATS_COLUMNS = ("idx", "group", "layer", "block", "kind", "metric", "value")
SUMMARY_COLUMNS = ["group", "kind", "block", "metric", "mean", "sd", "n", "ci_lo", "ci_hi"]
MAD_COLUMNS = ["group", "kind", "metric", "segment", "start", "stop", "value", "rel_value"]
RD_COLUMNS = ["reference", "group", "kind", "metric", "rd", "top_blocks"]
TESTS_COLUMNS = [
    "group_a", "group_b", "kind", "metric", "block", "test", "statistic", "p_value", "q_value",
    "n_perm", "n_a", "n_b", "n_dropped", "note",
]
DEFAULT_TEST_METRICS = ("nuclear", "sigma1_ratio", "erank")


# ----------------------------------------------------------------------------------------------------
# small helpers


def _check_columns(df: pd.DataFrame, required: Iterable[str], name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; has {list(df.columns)}")


def _depth_mask(blocks: np.ndarray) -> np.ndarray:
    """Which entries belong to the depth curve: blocks >= 0, or everything if there are none."""
    inside = blocks >= 0
    return inside if inside.any() else np.ones_like(inside)


# ----------------------------------------------------------------------------------------------------
# scalar building blocks


def depth_segments(n_blocks: int, bounds: tuple[int, int] | None = None) -> list[tuple[str, int, int]]:
    """Split block indices 0..L-1 into early / middle / late thirds.

    Args:
        n_blocks: L, the number of transformer blocks.
        bounds: optional (b1, b2) with 0 < b1 < b2 < L. Default: the Layer_Gradient boundaries for
            L in {32, 28, 26, 42} (e.g. L=32 -> 10, 20), otherwise b1 = round(L/3), b2 = round(2L/3).

    Returns:
        ``[("early", 0, b1), ("middle", b1, b2), ("late", b2, L)]`` (stop exclusive). For L < 3 thirds are
        undefined and the list is empty (callers then report the whole-depth value only).

    Raises:
        ValueError: negative L, or bounds that do not satisfy 0 < b1 < b2 < L.

    Reference: Li, Li, Zhou, ACL 2025 (MAD on early / middle / late layers).
    """
    L = int(n_blocks)
    if L < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    if bounds is not None:
        if len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (b1, b2), got {bounds!r}")
        b1, b2 = (int(b) for b in bounds)
        if not 0 < b1 < b2 < L:
            raise ValueError(f"segment bounds must satisfy 0 < b1 < b2 < n_blocks; got b1={b1}, b2={b2}, "
                             f"n_blocks={L}")
    elif L < 3:
        return []
    elif L in PAPER_SEGMENT_BOUNDS:
        b1, b2 = PAPER_SEGMENT_BOUNDS[L]
    else:
        # L/3 has fractional part 0, 1/3 or 2/3: no .5 ties, so round() is unambiguous.
        b1, b2 = round(L / 3), round(2 * L / 3)
    return [("early", 0, b1), ("middle", b1, b2), ("late", b2, L)]


def mad(curve: Sequence[float] | np.ndarray) -> float:
    """Mean absolute difference of adjacent entries (flatness of a depth curve).

    MAD(c) = (1 / (L - 1)) * sum_{l=0}^{L-2} |c[l+1] - c[l]|

    Args:
        curve: 1-D sequence c of length L (NaN entries propagate).

    Returns:
        MAD as a float; NaN when L < 2.

    Example: ``mad([1, 3, 2]) == 1.5``.

    Reference: Li, Li, Zhou, ACL 2025 ("Mean Absolute Difference" across layers).
    """
    c = np.asarray(curve, dtype=np.float64).ravel()
    if c.size < 2:
        return float("nan")
    return float(np.abs(np.diff(c)).mean())


def relative_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                        eps: float = 1e-10, top: int = 5) -> tuple[float, np.ndarray, list[int]]:
    """Layer-wise relative difference of curve b from reference curve a, averaged over layers.

    RD(a, b) = (1/L) * sum_l |a_l - b_l| / |a_l|,   with |a_l| replaced by eps where a_l == 0.

    Args:
        a: reference curve (length L).
        b: compared curve (length L).
        eps: denominator used where a_l == 0 (the Layer_Gradient code uses 1e-10).
        top: how many of the largest per-layer ratios to index.

    Returns:
        (rd, ratios, top_idx): the mean ratio (NaN for L = 0), the per-layer ratios (L,), and the positions
        of the ``top`` largest ratios, largest first (ties: lower position first; NaN ratios last).

    Example: ``relative_difference([1, 2], [2, 1])[0] == 0.75``.

    Reference: Li, Li, Zhou, ACL 2025 ("Relative Difference").
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"curves must have the same length, got {a.size} and {b.size}")
    if a.size == 0:
        return float("nan"), np.empty(0), []
    denom = np.where(a == 0, eps, np.abs(a))
    ratios = np.abs(a - b) / denom  # (L,)
    order = np.argsort(-ratios, kind="stable")  # NaN sorts last
    return float(ratios.mean()), ratios, [int(i) for i in order[: max(int(top), 0)]]


def _boot_means(M: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of every row of M, all rows sharing the same resamples.

    Args:
        M: (c, n) values, c cells of n finite values each.

    Returns:
        (c, n_boot) means of the resampled rows.
    """
    c, n = M.shape
    # W[r, j] = how often position j is drawn in resample r; then mean_r = (M @ W[r]) / n
    W = resample.boot_weights(n, n_boot, rng)  # (n_boot, n)
    out = np.empty((c, n_boot))
    step = max(1, 2**22 // max(n_boot, 1))  # bound memory of the (chunk, n_boot) block
    for s in range(0, c, step):
        out[s:s + step] = M[s:s + step] @ W.T / n
    return out


def bootstrap_ci(x: Sequence[float] | np.ndarray, n_boot: int = 1000, ci: float = 0.95,
                 rng: np.random.Generator | int | None = None) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Resample the n finite values with replacement n_boot times; the interval is the ((1-ci)/2, (1+ci)/2)
    quantiles of the resampled means.

    Args:
        x: values (non-finite entries are ignored).
        n_boot: number of resamples.
        ci: coverage level in (0, 1).
        rng: a numpy Generator, or a seed for ``numpy.random.default_rng``.

    Returns:
        (lo, hi); (NaN, NaN) when fewer than 2 finite values.
    """
    resample.check_boot_args(n_boot, ci)
    v = np.asarray(x, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan"), float("nan")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    means = _boot_means(v[None, :], int(n_boot), gen)[0]
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate adjusted p-values).

    With the m finite p-values sorted p_(1) <= ... <= p_(m):
        q_(i) = min_{j >= i} min(1, m * p_(j) / j)

    Args:
        p: p-values; NaN entries are ignored (do not count in m) and stay NaN.

    Returns:
        q-values in the input order, same shape.

    Reference: Benjamini and Hochberg, JRSS-B 1995.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    flat = p.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    m = ok.size
    if m == 0:
        return q
    order = ok[np.argsort(flat[ok], kind="stable")]
    scaled = flat[order] * m / np.arange(1, m + 1)
    qs = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    qflat = q.ravel()
    qflat[order] = qs
    return qflat.reshape(p.shape)


# ----------------------------------------------------------------------------------------------------
# group curves


def group_curves(layer_stats: pd.DataFrame, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Mean, sd and bootstrap CI of every (group, kind, block, metric) cell.

    mean = (1/n) sum_e v_e,  sd = sqrt(sum_e (v_e - mean)^2 / (n - 1)),  CI = percentile bootstrap of the mean
    (as ``bootstrap_ci``), over the n finite values of the cell.

    The bootstrap is vectorised: the cells of one group that have the same n share one set of resampled
    positions (values are ordered by example idx inside a cell, so with complete data a resample is a
    resample of examples and the replicate curves are coherent across blocks). The generator of a
    (group, n) batch is seeded from (seed, group name, n), so output depends only on the data and seed.

    Args:
        layer_stats: long table with columns idx, group, block, kind, metric, value (layer is not used).
        n_boot: bootstrap resamples per cell.
        ci: coverage level of the interval.
        seed: base seed.

    Returns:
        DataFrame with columns group, kind, block, metric, mean, sd, n, ci_lo, ci_hi; one row per cell,
        sorted by (group, kind, block, metric). sd is NaN for n < 2, CI NaN for n < 2, mean NaN for n = 0.

    Reference: per-(layer, projection) example means as in Li, Li, Zhou, ACL 2025; Li et al. 2504.10766.
    """
    _check_columns(layer_stats, ("idx", "group", "block", "kind", "metric", "value"), "layer_stats")
    resample.check_boot_args(n_boot, ci)
    if len(layer_stats) == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            SUMMARY_COLUMNS, [object, object, "int64", object, float, float, "int64", float, float])})

    g_codes, g_uni = pd.factorize(layer_stats["group"].astype(str), sort=True)
    k_codes, k_uni = pd.factorize(layer_stats["kind"].astype(str), sort=True)
    m_codes, m_uni = pd.factorize(layer_stats["metric"].astype(str), sort=True)
    block = layer_stats["block"].to_numpy(dtype=np.int64)
    idx = layer_stats["idx"].to_numpy(dtype=np.int64)
    value = layer_stats["value"].to_numpy(dtype=np.float64)

    order = np.lexsort((idx, m_codes, block, k_codes, g_codes))  # last key is primary
    g, k, b, m, v = g_codes[order], k_codes[order], block[order], m_codes[order], value[order]
    new_cell = np.ones(len(v), dtype=bool)
    new_cell[1:] = (g[1:] != g[:-1]) | (k[1:] != k[:-1]) | (b[1:] != b[:-1]) | (m[1:] != m[:-1])
    cell_of_row = np.cumsum(new_cell) - 1  # (rows,) cell id, cells in sorted order
    first = np.flatnonzero(new_cell)
    n_cells = first.size

    finite = np.isfinite(v)
    vf = v[finite]  # still sorted, so each cell's finite values are contiguous
    counts = np.bincount(cell_of_row[finite], minlength=n_cells)  # (cells,)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cell_group = g[first]

    mean = np.full(n_cells, np.nan)
    sd = np.full(n_cells, np.nan)
    lo = np.full(n_cells, np.nan)
    hi = np.full(n_cells, np.nan)
    alpha = (1.0 - ci) / 2.0
    # batch cells by (group, n): one (c, n) matrix per batch
    batch_key = cell_group.astype(np.int64) * (counts.max() + 1) + counts
    for key in np.unique(batch_key[counts > 0]):
        cells = np.flatnonzero(batch_key == key)
        n = int(counts[cells[0]])
        M = vf[starts[cells][:, None] + np.arange(n)]  # (c, n)
        mean[cells] = M.mean(axis=1)
        if n < 2:
            continue
        sd[cells] = M.std(axis=1, ddof=1)
        rng = resample.rng(seed, "bootstrap", g_uni[cell_group[cells[0]]], n)
        boots = _boot_means(M, int(n_boot), rng)  # (c, n_boot)
        q = np.quantile(boots, [alpha, 1.0 - alpha], axis=1)  # (2, c)
        lo[cells], hi[cells] = q[0], q[1]

    return pd.DataFrame({
        "group": np.asarray(g_uni, dtype=object)[cell_group],
        "kind": np.asarray(k_uni, dtype=object)[k[first]],
        "block": b[first].astype(np.int64),
        "metric": np.asarray(m_uni, dtype=object)[m[first]],
        "mean": mean, "sd": sd, "n": counts.astype(np.int64), "ci_lo": lo, "ci_hi": hi,
    })


def _curves(summary: pd.DataFrame) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """(group, kind, metric) -> (blocks, mean curve): depth blocks with a finite mean, sorted."""
    _check_columns(summary, ("group", "kind", "block", "metric", "mean"), "summary")
    out = {}
    for (grp, kind, metric), df in summary.groupby(["group", "kind", "metric"], sort=True):
        df = df.sort_values("block", kind="stable")
        blocks = df["block"].to_numpy(dtype=np.int64)
        means = df["mean"].to_numpy(dtype=np.float64)
        keep = _depth_mask(blocks) & np.isfinite(means)  # cells without any finite value are no curve point
        out[(str(grp), str(kind), str(metric))] = (blocks[keep], means[keep])
    return out


# ----------------------------------------------------------------------------------------------------
# MAD and RD tables


def mad_table(summary: pd.DataFrame, bounds: tuple[int, int] | None = None) -> pd.DataFrame:
    """MAD of every group mean curve, over the whole depth and over its early / middle / late thirds.

    MAD(c) = (1/(L-1)) sum_l |c[l+1] - c[l]| over the curve's blocks in order; a segment's MAD uses only the
    blocks in [start, stop) (no difference across a segment boundary).

    Args:
        summary: output of ``group_curves`` (group, kind, block, metric, mean).
        bounds: (b1, b2) for ``depth_segments``; default as there. L = largest block in the summary + 1,
            shared by all curves.

    Returns:
        DataFrame with columns group, kind, metric, segment ('all', 'early', 'middle', 'late'), start, stop
        (block range, stop exclusive), value (MAD), rel_value (MAD / mean |curve|, scale-free). The 'all' row spans the curve's first to last block + 1.
        When L < 3 (or for a kind outside the blocks) only the 'all' row is given (see ``depth_segments``).
        A segment holding fewer than 2 of the curve's blocks has value NaN.

    Raises:
        ValueError: bounds that do not satisfy 0 < b1 < b2 < L.

    Reference: Li, Li, Zhou, ACL 2025 (MAD on whole depth and on early / middle / late layers).
    """
    curves = _curves(summary)
    # One depth L for the whole model (not per kind), so every kind is cut at the same blocks.
    top_block = max((int(bl.max()) for bl, _ in curves.values() if bl.size), default=-1)
    segments = depth_segments(top_block + 1, bounds) if top_block >= 0 else []
    rows = []
    for (grp, kind, metric), (blocks, curve) in curves.items():
        if blocks.size == 0:
            continue
        rows.append((grp, kind, metric, "all", int(blocks[0]), int(blocks[-1]) + 1, mad(curve), _rel(curve)))
        if blocks.max() < 0:  # a kind outside the blocks (e.g. lm_head) has no thirds
            continue
        for name, start, stop in segments:
            inside = (blocks >= start) & (blocks < stop)
            rows.append((grp, kind, metric, name, start, stop, mad(curve[inside]), _rel(curve[inside])))
    out = pd.DataFrame(rows, columns=MAD_COLUMNS)
    return out.astype({"start": "int64", "stop": "int64", "value": "float64", "rel_value": "float64"})


def _rel(curve: np.ndarray) -> float:
    """Scale-free flatness: MAD(c) / mean |c| (NaN when fewer than 2 points or an all-zero curve)."""
    c = np.asarray(curve, dtype=np.float64)
    if c.size < 2 or not np.abs(c).mean() > 0:
        return float("nan")
    return mad(c) / float(np.abs(c).mean())


def rd_table(summary: pd.DataFrame, reference: str | None = None, top: int = 5,
             metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Relative Difference of every group's mean curve from a reference group's curve.

    RD(a, b) = (1/L) sum_l |a_l - b_l| / |a_l| with a the reference curve (a_l -> 1e-10 where a_l == 0),
    over the blocks present in both curves.

    Args:
        summary: output of ``group_curves``.
        reference: reference group; default the first group in sorted order.
        top: how many blocks with the largest per-layer ratio to list.
        metrics: metrics to compare (default all).

    Returns:
        DataFrame with columns reference, group, kind, metric, rd, top_blocks (comma-separated block
        indices, largest ratio first); one row per other group x kind x metric present in both groups.

    Raises:
        ValueError: unknown reference group.

    Reference: Li, Li, Zhou, ACL 2025 ("Relative Difference").
    """
    curves = _curves(summary)
    groups = sorted({k[0] for k in curves})
    if reference is None:
        if not groups:
            return pd.DataFrame({c: pd.Series(dtype=float if c == "rd" else object) for c in RD_COLUMNS})
        reference = groups[0]
    elif reference not in groups:
        raise ValueError(f"reference group {reference!r} not in summary; groups are {groups}")
    wanted = None if metrics is None else set(metrics)
    rows = []
    for (grp, kind, metric), (blocks, curve) in curves.items():
        if grp == reference or (wanted is not None and metric not in wanted):
            continue
        ref = curves.get((reference, kind, metric))
        if ref is None:
            continue
        common, ia, ib = np.intersect1d(ref[0], blocks, return_indices=True)
        rd, _, top_pos = relative_difference(ref[1][ia], curve[ib], top=top)
        rows.append((reference, grp, kind, metric, rd, ",".join(str(int(common[i])) for i in top_pos)))
    out = pd.DataFrame(rows, columns=RD_COLUMNS).astype({"rd": "float64"})
    return out.sort_values(["group", "kind", "metric"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# permutation tests


def _example_matrices(layer_stats: pd.DataFrame, metrics: Sequence[str] | None):
    """Per (kind, metric): blocks (B,), and per group an (n_g, B) matrix of complete examples + drop count.

    Duplicate (example, block) entries (several layers with the same kind in one block) are averaged.
    Blocks without a single finite value (in any group) are not part of the block set.
    """
    df = layer_stats
    if metrics is not None:
        df = df[df["metric"].astype(str).isin([str(m) for m in metrics])]
    out: dict[tuple[str, str], tuple[np.ndarray, dict[str, tuple[np.ndarray, int]]]] = {}
    for (kind, metric), d in df.groupby(["kind", "metric"], sort=True):
        blocks_all = d["block"].to_numpy(dtype=np.int64)
        d = d[_depth_mask(blocks_all)]
        # a block with no finite value in any group is left out (instead of dropping every example)
        d = d[d["block"].isin(d.loc[np.isfinite(d["value"].to_numpy(dtype=np.float64)), "block"].unique())]
        if len(d) == 0:
            continue
        blk_codes, blocks = pd.factorize(d["block"].to_numpy(dtype=np.int64), sort=True)
        B = len(blocks)
        per_group = {}
        for grp, dg in d.groupby("group", sort=True):
            rows = blk_codes[d["group"].to_numpy() == grp]
            ex_codes, ex_uni = pd.factorize(dg["idx"].to_numpy(dtype=np.int64), sort=True)
            n_ex = len(ex_uni)
            vals = dg["value"].to_numpy(dtype=np.float64)
            S = np.zeros((n_ex, B))
            C = np.zeros((n_ex, B))
            np.add.at(S, (ex_codes, rows), vals)
            np.add.at(C, (ex_codes, rows), 1.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                X = S / C  # (n_ex, B); NaN where missing (0/0) or a value was NaN
            ok = np.isfinite(X).all(axis=1)
            per_group[str(grp)] = (X[ok], int(n_ex - ok.sum()))
        out[(str(kind), str(metric))] = (np.asarray(blocks, dtype=np.int64), per_group)
    return out


def _label_matrix(n_a: int, n_b: int, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """(n_perm, n_a + n_b) float matrix; each row marks a uniformly random subset of n_a positions as 'a'."""
    n = n_a + n_b
    ranks = rng.random((n_perm, n)).argsort(axis=1).argsort(axis=1)  # each row a random permutation
    return (ranks < n_a).astype(np.float64)


def _perm_p(t_obs: np.ndarray, t_perm: np.ndarray) -> np.ndarray:
    """Two-sided permutation p-value p = (1 + #{|T_perm| >= |T_obs|}) / (1 + n_perm), per column.

    A tiny tolerance makes relabellings whose |T| equals |T_obs| in exact arithmetic count despite rounding.
    """
    a_obs = np.abs(t_obs)
    scale = np.nanmax(np.abs(t_perm), axis=0, initial=0.0) if t_perm.size else 0.0
    tol = 1e-9 * a_obs + 1e-12 * scale
    hits = (np.abs(t_perm) >= a_obs - tol).sum(axis=0)
    p = (1.0 + hits) / (1.0 + t_perm.shape[0])
    return np.where(np.isfinite(t_obs), p, np.nan)


def _mad_rows(curves: np.ndarray) -> np.ndarray:
    """MAD of each row of an (r, B) matrix of curves; NaN when B < 2."""
    if curves.shape[-1] < 2:
        return np.full(curves.shape[:-1], np.nan)
    return np.abs(np.diff(curves, axis=-1)).mean(axis=-1)


def _rel_mad_rows(M: np.ndarray) -> np.ndarray:
    """MAD of each row divided by the row's mean absolute level (NaN for an all-zero row)."""
    level = np.abs(M).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(level > 0, _mad_rows(M) / level, np.nan)


def permutation_tests(layer_stats: pd.DataFrame, pairs: Sequence[tuple[str, str]] | None = None,
                      metrics: Sequence[str] = DEFAULT_TEST_METRICS, n_perm: int = 2000,
                      seed: int = 0) -> pd.DataFrame:
    """Label-permutation tests of group differences in depth mean, curve flatness (MAD) and per block.

    For a pair (a, b), a kind and a metric, X[e, l] is example e's value at block l (examples missing a
    block or with a non-finite value are dropped; a block with no finite value in either group is left out
    instead). With group mean curves m_a[l], m_b[l]:

    - ``mean_diff``:       T = mean_l m_a[l] - mean_l m_b[l]  (difference of per-example depth means)
    - ``mad_diff``:        T = MAD(m_a) - MAD(m_b)            (the "flatness" claim of Li, Li, Zhou 2025)
    - ``rel_mad_diff``:    T = MAD(m_a)/mean|m_a| - MAD(m_b)/mean|m_b|  (flatness net of the curve's level:
      with token-mean losses a group of short responses has larger gradients everywhere, which alone
      inflates its MAD; this scale-free version asks whether the SHAPE is less flat)
    - ``layer_mean_diff``: T_l = m_a[l] - m_b[l] for each block, with Benjamini-Hochberg q-values across
      the blocks of the (pair, kind, metric).

    Example labels are permuted (each example's whole vector moves with it); all three tests reuse the
    same n_perm relabellings, and p = (1 + #{|T_perm| >= |T_obs|}) / (1 + n_perm) (two-sided).

    Args:
        layer_stats: long table (idx, group, block, kind, metric, value).
        pairs: (group_a, group_b) pairs; default all unordered pairs of groups in sorted order.
        metrics: metrics to test; metrics absent from the data are skipped.
        n_perm: number of random relabellings.
        seed: base seed; the relabellings of a test are seeded from (seed, group_a, group_b, n_a, n_b).

    Returns:
        DataFrame with columns group_a, group_b, kind, metric, block (-1 for the whole-depth tests), test,
        statistic, p_value, q_value (NaN except for layer_mean_diff), n_perm (0 when no permutation was
        run), n_a, n_b (examples used), n_dropped (incomplete examples dropped, both groups), note (empty,
        or why p_value is NaN: a group with fewer than 2 usable examples, or fewer than 2 blocks for MAD).

    Raises:
        ValueError: a pair names a group absent from the data, or n_perm < 1.
    """
    _check_columns(layer_stats, ("idx", "group", "block", "kind", "metric", "value"), "layer_stats")
    if int(n_perm) < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    n_perm = int(n_perm)
    groups = sorted(layer_stats["group"].astype(str).unique())
    if pairs is None:
        pairs = list(itertools.combinations(groups, 2))
    for pa in pairs:
        for gname in pa:
            if str(gname) not in groups:
                raise ValueError(f"group {gname!r} is not in layer_stats; groups are {groups}")

    data = _example_matrices(layer_stats, list(metrics))
    cols: dict[str, list] = {c: [] for c in TESTS_COLUMNS}

    def emit(ga, gb, kind, metric, block, test, stat, p, q, used_perm, n_a, n_b, n_drop, note):
        for c, val in zip(TESTS_COLUMNS, (ga, gb, kind, metric, block, test, stat, p, q, used_perm,
                                          n_a, n_b, n_drop, note)):
            cols[c].append(val)

    label_cache: dict[tuple, np.ndarray] = {}
    nan = float("nan")
    for ga, gb in pairs:
        ga, gb = str(ga), str(gb)
        for (kind, metric), (blocks, per_group) in data.items():
            B = blocks.size
            empty = (np.empty((0, B)), 0)
            Xa, drop_a = per_group.get(ga, empty)
            Xb, drop_b = per_group.get(gb, empty)
            if ga not in per_group and gb not in per_group:
                continue
            n_a, n_b = Xa.shape[0], Xb.shape[0]
            n_drop = drop_a + drop_b
            m_a = Xa.mean(axis=0) if n_a else np.full(B, nan)  # (B,) mean curves
            m_b = Xb.mean(axis=0) if n_b else np.full(B, nan)
            d_obs = m_a - m_b  # (B,)
            t_mean = float(d_obs.mean()) if B else nan
            t_mad = float(_mad_rows(m_a[None])[0] - _mad_rows(m_b[None])[0])
            t_rel = float(_rel_mad_rows(m_a[None])[0] - _rel_mad_rows(m_b[None])[0])

            small = [f"group {g!r} has {n} usable example(s), need at least 2"
                     for g, n in ((ga, n_a), (gb, n_b)) if n < 2]
            if small:
                note = "; ".join(small)
                emit(ga, gb, kind, metric, -1, "mean_diff", t_mean, nan, nan, 0, n_a, n_b, n_drop, note)
                emit(ga, gb, kind, metric, -1, "mad_diff", t_mad, nan, nan, 0, n_a, n_b, n_drop, note)
                emit(ga, gb, kind, metric, -1, "rel_mad_diff", t_rel, nan, nan, 0, n_a, n_b, n_drop, note)
                for l in range(B):
                    emit(ga, gb, kind, metric, int(blocks[l]), "layer_mean_diff", float(d_obs[l]), nan, nan, 0,
                         n_a, n_b, n_drop, note)
                continue

            key = (ga, gb, n_a, n_b)
            if key not in label_cache:
                label_cache[key] = _label_matrix(n_a, n_b, n_perm,
                                                 resample.rng(seed, "permutation", ga, gb, n_a, n_b))
            Lab = label_cache[key]  # (n_perm, n)
            X = np.concatenate([Xa, Xb], axis=0)  # (n, B) pooled, a first
            S_a = Lab @ X  # (n_perm, B) sums of the relabelled 'a' group
            pm_a = S_a / n_a
            pm_b = (X.sum(axis=0) - S_a) / n_b
            D = pm_a - pm_b  # (n_perm, B) permuted per-block differences

            p_mean = float(_perm_p(np.array([t_mean]), D.mean(axis=1)[:, None])[0])
            emit(ga, gb, kind, metric, -1, "mean_diff", t_mean, p_mean, nan, n_perm, n_a, n_b, n_drop, "")
            if B < 2:
                for test, t in (("mad_diff", t_mad), ("rel_mad_diff", t_rel)):
                    emit(ga, gb, kind, metric, -1, test, t, nan, nan, 0, n_a, n_b, n_drop,
                         f"{B} block(s): MAD needs at least 2")
            else:
                t_perm = _mad_rows(pm_a) - _mad_rows(pm_b)  # (n_perm,)
                p_mad = float(_perm_p(np.array([t_mad]), t_perm[:, None])[0])
                emit(ga, gb, kind, metric, -1, "mad_diff", t_mad, p_mad, nan, n_perm, n_a, n_b, n_drop, "")
                r_perm = _rel_mad_rows(pm_a) - _rel_mad_rows(pm_b)  # (n_perm,)
                p_rel = float(_perm_p(np.array([t_rel]), r_perm[:, None])[0])
                emit(ga, gb, kind, metric, -1, "rel_mad_diff", t_rel, p_rel, nan, n_perm, n_a, n_b, n_drop, "")
            p_layer = _perm_p(d_obs, D)  # (B,)
            q_layer = benjamini_hochberg(p_layer)
            for l in range(B):
                emit(ga, gb, kind, metric, int(blocks[l]), "layer_mean_diff", float(d_obs[l]), float(p_layer[l]),
                     float(q_layer[l]), n_perm, n_a, n_b, n_drop, "")

    out = pd.DataFrame(cols)
    return out.astype({"block": "int64", "statistic": "float64", "p_value": "float64", "q_value": "float64",
                       "n_perm": "int64", "n_a": "int64", "n_b": "int64", "n_dropped": "int64",
                       "group_a": object, "group_b": object, "kind": object, "metric": object,
                       "test": object, "note": object})


# ----------------------------------------------------------------------------------------------------
# everything at once


def summarize(layer_stats: pd.DataFrame, *, reference: str | None = None, n_boot: int = 1000,
              n_perm: int = 2000, seed: int = 0, bounds: tuple[int, int] | None = None,
              metrics: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """All comparison tables of a run: group curves, MAD, RD and permutation tests.

    Args:
        layer_stats: long table (idx, group, layer, block, kind, metric, value).
        reference: RD reference group (default: first group in sorted order).
        n_boot: bootstrap resamples per cell of the summary.
        n_perm: relabellings per permutation test.
        seed: base seed for bootstrap and permutations.
        bounds: (b1, b2) depth-third boundaries for the MAD table.
        metrics: metrics for RD and the tests. None: RD on every metric, tests on
            ``DEFAULT_TEST_METRICS`` (nuclear, sigma1_ratio, erank) that are present.

    Returns:
        {"summary": group_curves(...), "mad": mad_table(...), "rd": rd_table(...),
         "tests": permutation_tests(...)}.
    """
    summary = group_curves(layer_stats, n_boot=n_boot, seed=seed)
    return {
        "summary": summary,
        "mad": mad_table(summary, bounds=bounds),
        "rd": rd_table(summary, reference=reference, metrics=metrics),
        "tests": permutation_tests(layer_stats, metrics=DEFAULT_TEST_METRICS if metrics is None else metrics,
                                   n_perm=n_perm, seed=seed),
    }
