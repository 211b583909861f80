"""Gradient geometry from Gram matrices: group cosines, cosine distributions, coherence, loss-term
alignment, gradient entanglement of preference pairs, and the PSR / NSR split of RLVR gradients.

Everything here starts from a GRAM MATRIX of per-example gradients,

    K (n x n, float64),   K[i, j] = <g_i, g_j>,

so the same code serves the exact mode (K from factored gradients, no projection) and the projected mode
(K = F F^T from projected features). A per-layer, per-kind or whole-model Gram is just a Gram; the
whole-model Gram is the sum of the per-layer Grams (inner products add over disjoint parameter blocks).
Every statistic below is a quadratic form u^T K v with indicator / weight vectors u, v:

    <mean_{i in A} g_i, mean_{j in B} g_j> = mean of K[A, B]
    cos(g_i, g_j)                          = K[i, j] / sqrt(K[i, i] K[j, j])
    ||sum_i w_i g_i||^2                    = w^T K w

Conventions shared by every function here:

- Labels (``groups``) are a sequence of n group names; they are compared as ``str``. Group and term
  names are processed in sorted order.
- An example is *invalid* when its squared norm K[i, i] is zero, negative or non-finite, or its row of K
  (restricted to the other examples with a usable diagonal) holds a non-finite entry. Invalid examples
  carry no direction: they are excluded from every cosine / coherence statistic and counted
  (``n_excluded`` / ``n_excluded_zero``). Exception: ``psr_nsr`` keeps zero-norm rollouts (a zero
  gradient is a legitimate summand) and only drops non-finite ones.
- Within-group pairs are unordered pairs i < j (never i == j); between-group pairs are all (i, j) with i
  in A and j in B.
- Bootstrap CIs resample EXAMPLES (with replacement) and recompute the statistic over their pairs; pairs
  of two copies of the same example are left out of a resample (a U-statistic bootstrap: with duplicates
  kept, self-pairs would add spurious cos = 1 terms). Intervals are percentile intervals. Randomness is
  seeded from ``seed`` plus the names involved (statistic, group / term names) through
  ``resample.rng``, so results never depend on dict ordering, and every scope of ``geometry_table``
  reuses the same resamples of a group (its CIs are coherent across layers).

References:
    Chatterjee, Zielinski. "On the Generalization Mystery in Deep Learning", arXiv 2203.10036, 2022
    (coherence alpha = ||E g||^2 / E||g||^2 and the orthogonal baseline alpha_perp = 1/m).
    Yuan et al. "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
    arXiv 2410.13828, 2024 (METHODS §7d; the first-order conditions are our derivation).
    Zhu et al. "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", NeurIPS 2025
    (PSR / NSR / W-REINFORCE, METHODS §12).
"""

from __future__ import annotations

import itertools
from typing import Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from gradsight.stats import resample
from gradsight.stats.compare import bootstrap_ci

__all__ = [
    "valid_examples",
    "group_mean_cosines",
    "pairwise_cosines",
    "cosine_distributions",
    "coherence",
    "coherence_by_group",
    "geometry_table",
    "term_alignment",
    "entanglement_general",
    "entanglement",
    "entanglement_summary",
    "psr_nsr",
]

PAIRS_COLUMNS = [
    "group_a", "group_b", "n_a", "n_b", "n_pairs", "mean", "mean_ci_lo", "mean_ci_hi", "median", "q05", "q95",
    "conflict_rate", "conflict_ci_lo", "conflict_ci_hi", "n_excluded_zero", "note",
]
COHERENCE_COLUMNS = ["group", "n", "n_excluded", "coherence", "expected", "alignment", "ci_lo", "ci_hi", "note"]
GROUP_COSINES_COLUMNS = ["group_a", "group_b", "cosine"]
TERM_COLUMNS = [
    "term_a", "term_b", "n_examples", "n_excluded", "mean", "ci_lo", "ci_hi", "median", "conflict_rate",
    "conflict_ci_lo", "conflict_ci_hi", "mean_gradient_cosine", "note",
]
REGIMES = ("ideal", "both_up", "both_down")

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------------
# small helpers


def _as_gram(K, name: str = "K") -> np.ndarray:
    """(n, n) float64 array from an array / tensor; raises on a non-square shape."""
    if hasattr(K, "detach"):  # torch tensor without importing torch
        K = K.detach().cpu().numpy()
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) Gram matrix, got shape {K.shape}")
    return K


def _labels(groups: Sequence, n: int, name: str = "groups") -> np.ndarray:
    g = np.asarray([str(x) for x in groups], dtype=object)
    if g.shape != (n,):
        raise ValueError(f"{name} must have one label per row of K ({n}), got {len(g)}")
    return g


def valid_examples(K) -> np.ndarray:
    """Boolean mask of the examples that carry a direction.

    Valid means: K[i, i] finite and > 0, and K[i, j] finite for every j whose diagonal is usable (so one
    NaN example does not invalidate everyone else through its NaN column).

    Args:
        K: (n, n) Gram matrix.

    Returns:
        (n,) boolean mask.
    """
    K = _as_gram(K)
    d = np.diag(K)
    ok = np.isfinite(d) & (d > 0)
    if ok.any():
        ok = ok & np.isfinite(K[:, ok]).all(axis=1)
    return ok


def _cos_block(K: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Cosines of K[rows, cols] (all rows / cols valid), clipped to [-1, 1] against round-off."""
    d = np.diag(K)
    C = K[np.ix_(rows, cols)] / np.sqrt(np.outer(d[rows], d[cols]))
    return np.clip(C, -1.0, 1.0)


def _pair_means_within(V: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mean of V[i, j] over the ordered position pairs of each resample whose examples differ.

    V is (n, n) symmetric with a zero diagonal; for multiplicities w the sum over position pairs (p, q)
    with different examples is w^T V w and their number is (sum w)^2 - sum w^2.
    Returns (n_boot,), NaN for a resample that drew a single distinct example.
    """
    num = np.einsum("ri,ri->r", W @ V, W)
    den = W.sum(axis=1) ** 2 - (W ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _pair_means_between(V: np.ndarray, Wa: np.ndarray, Wb: np.ndarray) -> np.ndarray:
    """Mean of V[i, j] (i in A, j in B) over the resampled pairs: w_a^T V w_b / (sum w_a sum w_b)."""
    return np.einsum("ri,ri->r", Wa @ V, Wb) / (Wa.sum(axis=1) * Wb.sum(axis=1))


def _pct(boots: np.ndarray, ci: float) -> tuple[float, float]:
    b = boots[np.isfinite(boots)]
    if b.size == 0:
        return _NAN, _NAN
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(b, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------
# cosines


def pairwise_cosines(K) -> tuple[np.ndarray, np.ndarray, int]:
    """Cosine of every pair of examples.

    C[i, j] = K[i, j] / sqrt(K[i, i] K[j, j]), clipped to [-1, 1].

    Args:
        K: (n, n) Gram matrix.

    Returns:
        (C, valid, n_invalid): C (n, n) with NaN rows and columns for invalid examples (zero or
        non-finite norm, see ``valid_examples``), the (n,) validity mask, and the number of invalid
        examples.
    """
    K = _as_gram(K)
    valid = valid_examples(K)
    C = np.full(K.shape, np.nan)
    v = np.flatnonzero(valid)
    C[np.ix_(v, v)] = _cos_block(K, v, v)
    return C, valid, int((~valid).sum())


def group_mean_cosines(K, groups: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Cosine between the mean gradients of every pair of groups.

    With m_a = mean_{i in a} g_i:  <m_a, m_b> = mean of K[a-rows, b-cols], and
    M[a, b] = <m_a, m_b> / sqrt(<m_a, m_a> <m_b, m_b>). Invalid examples are left out (a zero-norm
    example only rescales a mean, which a cosine ignores; a non-finite one would poison it).

    Args:
        K: (n, n) Gram matrix.
        groups: n group names.

    Returns:
        (names, M): sorted group names and the (G, G) symmetric cosine matrix (diagonal 1); NaN for a
        group without valid examples or whose mean gradient is zero.
    """
    K = _as_gram(K)
    g = _labels(groups, K.shape[0])
    valid = valid_examples(K)
    names = sorted(set(g.tolist()))
    # U[a, i] = 1/n_a for valid members i of a: the Gram of the group means is U K U^T
    U = np.zeros((len(names), K.shape[0]))
    for a, name in enumerate(names):
        m = valid & (g == name)
        if m.any():
            U[a, m] = 1.0 / m.sum()
    v = np.flatnonzero(valid)
    Kv = K[np.ix_(v, v)]
    Uv = U[:, v]
    Gm = Uv @ Kv @ Uv.T  # (G, G) inner products of group means
    d = np.diag(Gm)
    with np.errstate(invalid="ignore", divide="ignore"):
        M = Gm / np.sqrt(np.outer(d, d))
    M[~np.isfinite(M)] = np.nan
    return names, np.clip(M, -1.0, 1.0)


def cosine_distributions(K, groups: Sequence[str], *, n_boot: int = 1000, ci: float = 0.95,
                         seed: int = 0) -> pd.DataFrame:
    """Distribution of pairwise cosines within every group and between every pair of groups.

    For groups a <= b (sorted names; a == b is the within-group distribution over pairs i < j):
    mean, median, 5% / 95% quantiles of cos(g_i, g_j) over the pairs, and the conflict rate (share of
    pairs with cos < 0). The mean and the conflict rate get percentile bootstrap CIs over EXAMPLES:
    examples of a (and independently of b) are resampled with replacement and the statistic is
    recomputed over the resampled pairs, leaving out pairs of two copies of one example. Resamples of
    (a, b) are seeded from (seed, "cosines", a, b).

    Args:
        K: (n, n) Gram matrix.
        groups: n group names.
        n_boot: bootstrap resamples.
        ci: coverage of the intervals.
        seed: base seed.

    Returns:
        DataFrame with columns group_a, group_b, n_a, n_b (valid examples), n_pairs, mean, mean_ci_lo,
        mean_ci_hi, median, q05, q95, conflict_rate, conflict_ci_lo, conflict_ci_hi, n_excluded_zero
        (invalid examples of a and b, counted once when a == b), note (why statistics or CIs are NaN).

    Raises:
        ValueError: bad shapes, n_boot < 1 or ci outside (0, 1).
    """
    K = _as_gram(K)
    n_boot = resample.check_boot_args(n_boot, ci)
    g = _labels(groups, K.shape[0])
    valid = valid_examples(K)
    names = sorted(set(g.tolist()))
    rows = []
    for a, b in itertools.combinations_with_replacement(names, 2):
        ia = np.flatnonzero(valid & (g == a))
        ib = np.flatnonzero(valid & (g == b))
        n_ex = int((~valid & (g == a)).sum()) + (0 if a == b else int((~valid & (g == b)).sum()))
        C = _cos_block(K, ia, ib)
        if a == b:
            vals = C[np.triu_indices(ia.size, k=1)]
        else:
            vals = C.ravel()
        rec = dict(group_a=a, group_b=b, n_a=ia.size, n_b=ib.size, n_pairs=vals.size, mean=_NAN,
                   mean_ci_lo=_NAN, mean_ci_hi=_NAN, median=_NAN, q05=_NAN, q95=_NAN, conflict_rate=_NAN,
                   conflict_ci_lo=_NAN, conflict_ci_hi=_NAN, n_excluded_zero=n_ex, note="")
        if vals.size == 0:
            rec["note"] = (f"group {a!r} has {ia.size} valid example(s): no within-group pairs" if a == b
                           else "no pairs: " + "; ".join(f"group {x!r} has no valid examples"
                                                         for x, m in ((a, ia.size), (b, ib.size)) if m == 0))
            rows.append(rec)
            continue
        q05, med, q95 = np.quantile(vals, [0.05, 0.5, 0.95])
        rec.update(mean=float(vals.mean()), median=float(med), q05=float(q05), q95=float(q95),
                   conflict_rate=float((vals < 0).mean()))
        rng = resample.rng(seed, "cosines", a, b)
        N = (C < 0).astype(np.float64)
        if a == b:
            C0 = C.copy()
            np.fill_diagonal(C0, 0.0)
            np.fill_diagonal(N, 0.0)
            W = resample.boot_weights(ia.size, n_boot, rng)
            bm, bc = _pair_means_within(C0, W), _pair_means_within(N, W)
        elif ia.size < 2 or ib.size < 2:
            small = [f"group {x!r} has {m} valid example(s)" for x, m in ((a, ia.size), (b, ib.size)) if m < 2]
            rec["note"] = "; ".join(small) + ", need at least 2 for a bootstrap CI"
            rows.append(rec)
            continue
        else:
            Wa = resample.boot_weights(ia.size, n_boot, rng)
            Wb = resample.boot_weights(ib.size, n_boot, rng)
            bm, bc = _pair_means_between(C, Wa, Wb), _pair_means_between(N, Wa, Wb)
        rec["mean_ci_lo"], rec["mean_ci_hi"] = _pct(bm, ci)
        rec["conflict_ci_lo"], rec["conflict_ci_hi"] = _pct(bc, ci)
        rows.append(rec)
    return _frame(rows, PAIRS_COLUMNS, ints=("n_a", "n_b", "n_pairs", "n_excluded_zero"))


def _frame(rows: list[dict], columns: list[str], ints: Sequence[str] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    types = {c: ("int64" if c in ints else object if c in ("group_a", "group_b", "group", "term_a", "term_b",
                                                               "note", "scope") else "float64") for c in columns}
    return df.astype(types)


# ----------------------------------------------------------------------------------------------------
# coherence


def coherence(K, idx: Sequence[int] | np.ndarray | None = None) -> dict:
    """Gradient coherence of a set of examples and its value under no alignment.

    coherence = ||mean_i g_i||^2 / mean_i ||g_i||^2 = sum(K_SS) / (n * trace(K_SS)),  in [0, 1].

    No-alignment baseline: E||sum_i g_i||^2 = sum_i ||g_i||^2 + sum_{i != j} E<g_i, g_j>, and the cross
    terms vanish when the directions are independent and isotropic (or exactly orthogonal), so
    E||mean g||^2 = (1/n^2) sum_i ||g_i||^2 = (1/n) mean ||g||^2 and the expected coherence is 1/n.
    The alignment factor coherence / (1/n) = sum(K_SS) / trace(K_SS) is 1 for orthogonal gradients and
    n for identical ones (Chatterjee & Zielinski's alpha / alpha_perp).

    Args:
        K: (n_all, n_all) Gram matrix.
        idx: positions of the examples (default: all). Invalid examples among them are left out.

    Returns:
        dict with n (valid examples used), n_excluded, coherence, expected (1/n), alignment,
        mean_sq_norm (mean ||g||^2), sq_norm_mean (||mean g||^2), note. With n = 0 every value is NaN;
        with n = 1 coherence = alignment = 1 trivially (the note says so).
    """
    K = _as_gram(K)
    sel = np.arange(K.shape[0]) if idx is None else np.asarray(idx, dtype=np.int64).ravel()
    valid = valid_examples(K)
    S = sel[valid[sel]]
    n = int(S.size)
    out = dict(n=n, n_excluded=int(sel.size - n), coherence=_NAN, expected=_NAN, alignment=_NAN,
               mean_sq_norm=_NAN, sq_norm_mean=_NAN, note="")
    if n == 0:
        out["note"] = "no valid examples"
        return out
    Kss = K[np.ix_(S, S)]
    tr, tot = float(np.trace(Kss)), float(Kss.sum())
    out.update(coherence=tot / (n * tr), expected=1.0 / n, alignment=tot / tr, mean_sq_norm=tr / n,
               sq_norm_mean=tot / n ** 2)
    if n == 1:
        out["note"] = "1 example: coherence is 1 by definition"
    return out


def coherence_by_group(K, groups: Sequence[str], n_boot: int = 1000, seed: int = 0, *,
                       ci: float = 0.95) -> pd.DataFrame:
    """Coherence of every group with a bootstrap CI over examples.

    Write coherence = 1/n + ((n-1)/n) rho with rho = mean_{i != j} K[i, j] / mean_i K[i, i] (the mean
    off-diagonal inner product in units of the mean squared norm). A resample (multiplicities w)
    recomputes rho from its pairs of DIFFERENT examples and its squared norms, with n fixed, so
    duplicated examples do not masquerade as alignment (orthogonal gradients give a zero-width CI at 1/n,
    identical ones at 1). Resamples of a group are seeded from (seed, "coherence", group).

    Args:
        K: (n, n) Gram matrix.
        groups: n group names.
        n_boot: bootstrap resamples.
        seed: base seed.
        ci: coverage of the interval.

    Returns:
        DataFrame with columns group, n, n_excluded, coherence, expected, alignment, ci_lo, ci_hi (of
        coherence; multiply by n for the alignment CI), note (why a CI is NaN, e.g. a group with one
        example).
    """
    K = _as_gram(K)
    n_boot = resample.check_boot_args(n_boot, ci)
    g = _labels(groups, K.shape[0])
    valid = valid_examples(K)
    rows = []
    for name in sorted(set(g.tolist())):
        members = np.flatnonzero(g == name)
        c = coherence(K, members)
        rec = {k: c[k] for k in ("n", "n_excluded", "coherence", "expected", "alignment", "note")}
        rec.update(group=name, ci_lo=_NAN, ci_hi=_NAN)
        n = c["n"]
        if n < 2:
            rec["note"] = (f"group has {n} valid example(s); a CI needs at least 2"
                           + (" (coherence of one example is 1 by definition)" if n == 1 else ""))
        else:
            S = members[valid[members]]
            Kss = K[np.ix_(S, S)]
            K0 = Kss.copy()
            np.fill_diagonal(K0, 0.0)
            W = resample.boot_weights(n, n_boot, resample.rng(seed, "coherence", name))
            off = _pair_means_within(K0, W)  # mean inner product over distinct-example pairs
            sq = (W @ np.diag(Kss)) / W.sum(axis=1)  # mean squared norm of the resample
            boots = 1.0 / n + (n - 1.0) / n * off / sq
            rec["ci_lo"], rec["ci_hi"] = _pct(boots, ci)
        rows.append(rec)
    return _frame(rows, COHERENCE_COLUMNS, ints=("n", "n_excluded"))


# ----------------------------------------------------------------------------------------------------
# everything per scope


def geometry_table(grams: Mapping[str, np.ndarray], groups: Sequence[str], *, n_boot: int = 1000,
                   seed: int = 0) -> dict[str, pd.DataFrame]:
    """Group cosines, pairwise-cosine distributions and coherence for every scope.

    Args:
        grams: scope name (a layer name, "kind:q", "all", ...) -> (n, n) Gram over the same n examples.
            The whole-model Gram is the caller's sum of per-layer Grams. Each scope excludes its own
            invalid examples (a gradient can vanish in one layer only).
        groups: n group names.
        n_boot: bootstrap resamples.
        seed: base seed (the resamples do not depend on the scope name, so every scope reuses them).

    Returns:
        {"group_cosines": scope, group_a, group_b, cosine (every ordered pair incl. a == b),
         "pairs": scope + the columns of ``cosine_distributions``,
         "coherence": scope + the columns of ``coherence_by_group``}; scopes in the dict's order.
    """
    gc, pairs, coh = [], [], []
    n = None
    for scope, K in grams.items():
        K = _as_gram(K, f"grams[{scope!r}]")
        if n is not None and K.shape[0] != n:
            raise ValueError(f"grams[{scope!r}] is {K.shape[0]} x {K.shape[0]}, other scopes have n = {n}")
        n = K.shape[0]
        names, M = group_mean_cosines(K, groups)
        G = len(names)
        gc.append(pd.DataFrame({"scope": str(scope), "group_a": np.repeat(np.asarray(names, dtype=object), G),
                                "group_b": np.tile(np.asarray(names, dtype=object), G), "cosine": M.ravel()}))
        p = cosine_distributions(K, groups, n_boot=n_boot, seed=seed)
        p.insert(0, "scope", str(scope))
        pairs.append(p)
        c = coherence_by_group(K, groups, n_boot=n_boot, seed=seed)
        c.insert(0, "scope", str(scope))
        coh.append(c)

    def cat(parts, columns, ints=()):
        if parts:
            return pd.concat(parts, ignore_index=True)
        return _frame([], ["scope"] + columns, ints)

    return {"group_cosines": cat(gc, GROUP_COSINES_COLUMNS),
            "pairs": cat(pairs, PAIRS_COLUMNS, ("n_a", "n_b", "n_pairs", "n_excluded_zero")),
            "coherence": cat(coh, COHERENCE_COLUMNS, ("n", "n_excluded"))}


# ----------------------------------------------------------------------------------------------------
# loss terms


def term_alignment(K, terms: Sequence[str], example_ids: Sequence[Hashable], *, n_boot: int = 1000,
                   ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Alignment of the gradients of named loss terms on the same example.

    Rows of K are (example, term) gradients g_{e,t}. For each pair of term names t1 < t2 (sorted) and the
    examples e having a valid row for both: c_e = cos(g_{e,t1}, g_{e,t2}); reported are the mean of c_e
    with a percentile bootstrap CI over examples (``compare.bootstrap_ci``), the median, the conflict rate
    (share of examples with c_e < 0) with its CI, and the cosine between the term-mean gradients
    m_t = mean over the valid rows of term t (all examples carrying t, not only the common ones).

    Args:
        K: (R, R) Gram over (example, term) rows.
        terms: R term names.
        example_ids: R example identifiers (any hashable; compared as given).
        n_boot: bootstrap resamples.
        ci: coverage of the intervals.
        seed: base seed; the CIs of (t1, t2) are seeded from (seed, "terms", t1, t2).

    Returns:
        DataFrame with columns term_a, term_b, n_examples, n_excluded (examples with both terms where one
        row is invalid), mean, ci_lo, ci_hi, median, conflict_rate, conflict_ci_lo, conflict_ci_hi,
        mean_gradient_cosine, note.

    Raises:
        ValueError: label lengths differ from R, or an (example, term) pair occurs twice.
    """
    K = _as_gram(K)
    n_boot = resample.check_boot_args(n_boot, ci)
    R = K.shape[0]
    t = _labels(terms, R, "terms")
    ex = list(example_ids)
    if len(ex) != R:
        raise ValueError(f"example_ids must have one entry per row of K ({R}), got {len(ex)}")
    where: dict[tuple, int] = {}
    for r, key in enumerate(zip(ex, t.tolist())):
        if key in where:
            raise ValueError(f"(example, term) {key!r} occurs in rows {where[key]} and {r}")
        where[key] = r
    valid = valid_examples(K)
    names = sorted(set(t.tolist()))
    tnames, M = group_mean_cosines(K, t)
    pos = {name: i for i, name in enumerate(tnames)}
    order = list(dict.fromkeys(ex))  # examples in first-appearance order
    rows = []
    for t1, t2 in itertools.combinations(names, 2):
        both = [(where[(e, t1)], where[(e, t2)]) for e in order if (e, t1) in where and (e, t2) in where]
        ok = [(r1, r2) for r1, r2 in both if valid[r1] and valid[r2]]
        r1 = np.asarray([p[0] for p in ok], dtype=np.int64)
        r2 = np.asarray([p[1] for p in ok], dtype=np.int64)
        c = np.clip(K[r1, r2] / np.sqrt(K[r1, r1] * K[r2, r2]), -1.0, 1.0) if ok else np.empty(0)
        rec = dict(term_a=t1, term_b=t2, n_examples=len(ok), n_excluded=len(both) - len(ok), mean=_NAN,
                   ci_lo=_NAN, ci_hi=_NAN, median=_NAN, conflict_rate=_NAN, conflict_ci_lo=_NAN,
                   conflict_ci_hi=_NAN, mean_gradient_cosine=float(M[pos[t1], pos[t2]]), note="")
        if c.size:
            conf = (c < 0).astype(np.float64)
            rec.update(mean=float(c.mean()), median=float(np.median(c)), conflict_rate=float(conf.mean()))
            rng = resample.rng(seed, "terms", t1, t2)
            state = rng.bit_generator.state
            rec["ci_lo"], rec["ci_hi"] = bootstrap_ci(c, n_boot=n_boot, ci=ci, rng=rng)
            rng.bit_generator.state = state  # same resamples for the conflict rate
            rec["conflict_ci_lo"], rec["conflict_ci_hi"] = bootstrap_ci(conf, n_boot=n_boot, ci=ci, rng=rng)
        if c.size < 2:
            rec["note"] = f"{c.size} example(s) with valid gradients for both terms; a CI needs at least 2"
        rows.append(rec)
    return _frame(rows, TERM_COLUMNS, ints=("n_examples", "n_excluded"))


# ----------------------------------------------------------------------------------------------------
# gradient entanglement (METHODS §7d)


def _vec(x, n: int | None, name: str) -> np.ndarray:
    v = np.atleast_1d(np.asarray(x, dtype=np.float64))
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if n is not None and v.size != n:
        if v.size == 1:
            return np.full(n, v[0])
        raise ValueError(f"{name} has length {v.size}, expected {n}")
    return v


def entanglement_general(K_aa, K_bb, K_ab, d_w, d_l) -> pd.DataFrame:
    """First-order change of the chosen and rejected log-probabilities after one gradient step.

    For a loss L = ell(log pi_w, log pi_l) with a = grad log pi_w, b = grad log pi_l, grad L = d_w a + d_l b
    (d_w = dL/d log pi_w, d_l = dL/d log pi_l). The step theta' = theta - eta grad L changes, to first
    order and for eta = 1:

        delta_chosen   = -(d_w ||a||^2 + d_l <a, b>)
        delta_rejected = -(d_w <a, b> + d_l ||b||^2)

    Args:
        K_aa: (P,) ||a||^2 per pair.
        K_bb: (P,) ||b||^2 per pair.
        K_ab: (P,) <a, b> per pair.
        d_w: scalar or (P,) loss derivative with respect to log pi_w (< 0 for margin losses).
        d_l: scalar or (P,) loss derivative with respect to log pi_l (> 0 for margin losses).

    Returns:
        DataFrame with columns inner, sq_norm_chosen, sq_norm_rejected, cos, d_w, d_l, delta_chosen,
        delta_rejected, sign_chosen, sign_rejected (-1, 0, +1; 0 also for non-finite), regime: "ideal"
        (chosen up, rejected down), "both_up", "both_down", "reversed" (chosen down, rejected up),
        "tie" (a predicted change is exactly 0) or "invalid" (non-finite input).
    """
    aa = _vec(K_aa, None, "K_aa")
    P = aa.size
    bb, ab = _vec(K_bb, P, "K_bb"), _vec(K_ab, P, "K_ab")
    dw, dl = _vec(d_w, P, "d_w"), _vec(d_l, P, "d_l")
    dc = -(dw * aa + dl * ab)
    dr = -(dw * ab + dl * bb)
    finite = np.isfinite(aa) & np.isfinite(bb) & np.isfinite(ab) & np.isfinite(dw) & np.isfinite(dl)
    sc = np.where(finite, np.sign(dc), 0).astype(np.int64)
    sr = np.where(finite, np.sign(dr), 0).astype(np.int64)
    regime = np.full(P, "tie", dtype=object)
    regime[(sc > 0) & (sr < 0)] = "ideal"
    regime[(sc > 0) & (sr > 0)] = "both_up"
    regime[(sc < 0) & (sr < 0)] = "both_down"
    regime[(sc < 0) & (sr > 0)] = "reversed"
    regime[~finite] = "invalid"
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip(ab / np.sqrt(aa * bb), -1.0, 1.0)
    cos = np.where((aa > 0) & (bb > 0), cos, np.nan)
    return pd.DataFrame({"inner": ab, "sq_norm_chosen": aa, "sq_norm_rejected": bb, "cos": cos, "d_w": dw,
                         "d_l": dl, "delta_chosen": dc, "delta_rejected": dr, "sign_chosen": sc,
                         "sign_rejected": sr, "regime": regime})


def entanglement(K_aa, K_bb, K_ab) -> pd.DataFrame:
    """Gradient entanglement of preference pairs under a DPO-style loss (|d_w| = d_l), METHODS §7d.

    With d_w = -1, d_l = +1 (any common scale only rescales the step):
    delta_chosen = ||a||^2 - <a, b> and delta_rejected = <a, b> - ||b||^2, so

        ideal (chosen up, rejected down)  iff  <a, b> < min(||a||^2, ||b||^2)
        both_up                           iff  ||b||^2 < <a, b> < ||a||^2
        both_down                         iff  ||a||^2 < <a, b> < ||b||^2

    ("reversed" needs <a, b> > max(||a||^2, ||b||^2), impossible by Cauchy-Schwarz for a real Gram.)

    Args:
        K_aa: (P,) ||a||^2, a = grad log pi(y_w|x) (chosen).
        K_bb: (P,) ||b||^2, b = grad log pi(y_l|x) (rejected).
        K_ab: (P,) <a, b>.

    Returns:
        The columns of ``entanglement_general`` plus threshold_chosen (= ||a||^2: chosen increases iff
        <a, b> is below it), threshold_rejected (= ||b||^2: rejected decreases iff <a, b> is below it) and
        ratio = <a, b> / min(||a||^2, ||b||^2) (>= 1 means at least one probability moves the wrong way;
        NaN when a norm is 0).
    """
    df = entanglement_general(K_aa, K_bb, K_ab, -1.0, 1.0)
    aa, bb = df["sq_norm_chosen"].to_numpy(), df["sq_norm_rejected"].to_numpy()
    m = np.minimum(aa, bb)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(m > 0, df["inner"].to_numpy() / np.where(m > 0, m, 1.0), np.nan)
    df["threshold_chosen"] = aa
    df["threshold_rejected"] = bb
    df["ratio"] = ratio
    return df


def entanglement_summary(df: pd.DataFrame, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Share of pairs per regime and the mean entanglement ratio with a bootstrap CI.

    Args:
        df: output of ``entanglement``.
        n_boot: bootstrap resamples.
        ci: coverage of the interval.
        seed: seed of the bootstrap (``compare.bootstrap_ci`` over the finite ratios).

    Returns:
        dict with n_pairs, n_invalid, share_ideal, share_both_up, share_both_down, share_other (tie or
        reversed) -- shares over the non-invalid pairs --, mean_ratio, ratio_ci_lo, ratio_ci_hi,
        median_ratio, mean_cos.
    """
    regime = df["regime"].astype(str).to_numpy()
    ok = regime != "invalid"
    n_ok = int(ok.sum())
    out: dict = {"n_pairs": int(len(df)), "n_invalid": int((~ok).sum())}
    for r in REGIMES:
        out[f"share_{r}"] = float((regime[ok] == r).mean()) if n_ok else _NAN
    out["share_other"] = float((~np.isin(regime[ok], REGIMES)).mean()) if n_ok else _NAN
    ratio = df["ratio"].to_numpy(dtype=np.float64)
    ratio = ratio[np.isfinite(ratio)]
    out["mean_ratio"] = float(ratio.mean()) if ratio.size else _NAN
    out["ratio_ci_lo"], out["ratio_ci_hi"] = bootstrap_ci(ratio, n_boot=n_boot, ci=ci,
                                                          rng=resample.rng(seed, "entanglement"))
    out["median_ratio"] = float(np.median(ratio)) if ratio.size else _NAN
    cos = df["cos"].to_numpy(dtype=np.float64)
    cos = cos[np.isfinite(cos)]
    out["mean_cos"] = float(cos.mean()) if cos.size else _NAN
    return out


# ----------------------------------------------------------------------------------------------------
# PSR / NSR (METHODS §12)


def psr_nsr(K, rewards, threshold: float = 0.5, lam: float = 0.1) -> dict:
    """Split the RLVR gradient of rewarded rollouts into positive and negative sample reinforcement.

    Rows of K are h_i = grad log pi(y_i|x_i) (sequence sums). Positive rollouts have reward > threshold.
    The parts are the gradients of the (summed, not averaged) loss terms of METHODS §12:

        L_PSR = -sum_{i pos} log pi(y_i|x_i)   ->  g+ = -sum_{i pos} h_i = K-form with u+ = -1[pos]
        L_NSR = +sum_{i neg} log pi(y_i|x_i)   ->  g- = +sum_{i neg} h_i = K-form with u- = +1[neg]

    so with r in {-1, +1} the RLVR gradient -sum_i r_i h_i equals g+ + g-. Descent moves along -g+
    (raising correct rollouts) and -g- (lowering incorrect ones). Norms: ||g+||^2 = u+^T K u+,
    <g+, g-> = u+^T K u-, W-REINFORCE ||lam g+ + g-|| = sqrt(w^T K w) with w = lam u+ + u-. Averaging
    over N rollouts (the expectation form) scales every norm by 1/N and leaves the cosine unchanged.

    Rollouts with a non-finite row of K are dropped and counted; zero-norm rollouts are kept.

    Args:
        K: (N, N) Gram of the per-rollout log-probability gradients.
        rewards: N finite rewards (0/1, +-1 or real).
        threshold: positive iff reward > threshold.
        lam: W-REINFORCE weight of the positive part (0.1 recommended by Zhu et al.).

    Returns:
        dict with n, n_positive, n_negative, n_excluded, sq_norm_psr, sq_norm_nsr, inner, cos (NaN when a
        part is zero), lam, w_reinforce_norm, rlvr_norm (= ||g+ + g-||).

    Raises:
        ValueError: rewards not a 1-D sequence of N finite numbers.
    """
    K = _as_gram(K)
    N = K.shape[0]
    try:
        r = np.asarray(rewards, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rewards must be numbers, got {rewards!r:.80}") from exc
    if r.ndim != 1 or r.size != N:
        raise ValueError(f"rewards must be a 1-D sequence of length {N} (rows of K), got shape {r.shape}")
    if not np.isfinite(r).all():
        bad = np.flatnonzero(~np.isfinite(r))
        raise ValueError(f"rewards must be finite; non-finite at position(s) {bad[:10].tolist()}")
    if not np.isfinite(threshold) or not np.isfinite(lam):
        raise ValueError(f"threshold and lam must be finite, got {threshold}, {lam}")
    d = np.diag(K)
    ok = np.isfinite(d)
    if ok.any():
        ok &= np.isfinite(K[:, ok]).all(axis=1)
    v = np.flatnonzero(ok)
    Kv = K[np.ix_(v, v)]
    pos = r[v] > threshold
    u_pos = -pos.astype(np.float64)
    u_neg = (~pos).astype(np.float64)
    pp, nn, pn = u_pos @ Kv @ u_pos, u_neg @ Kv @ u_neg, u_pos @ Kv @ u_neg
    w = lam * u_pos + u_neg
    cos = pn / np.sqrt(pp * nn) if pp > 0 and nn > 0 else _NAN
    return {"n": int(v.size), "n_positive": int(pos.sum()), "n_negative": int((~pos).sum()),
            "n_excluded": int(N - v.size), "sq_norm_psr": float(pp), "sq_norm_nsr": float(nn),
            "inner": float(pn), "cos": float(np.clip(cos, -1.0, 1.0)) if np.isfinite(cos) else _NAN,
            "lam": float(lam), "w_reinforce_norm": float(np.sqrt(max(w @ Kv @ w, 0.0))),
            "rlvr_norm": float(np.sqrt(max(pp + nn + 2 * pn, 0.0)))}
