"""Rollout allocation across prompts from measured accuracies and gradient norms (GVM-RAFT, CurES).

An RL fine-tuning step samples n_i rollouts of prompt i under a total budget N = sum_i n_i. Both rules below
spend more rollouts where they reduce the variance of the stochastic gradient most, from each prompt's
accuracy p_i (share of rollouts with reward > threshold) and gradient norms of its rollouts.

GVM-RAFT (Yao et al. 2025; `stats.noise.gvm_allocation`, reused here):

    n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta - 1)),    G_i = mean gradient norm of prompt i's ACCEPTED rollouts.

CurES (Zeng et al. 2025, "CurES: From Gradient Analysis to Efficient Curriculum Learning for Reasoning LLMs",
arXiv 2510.01037; code github.com/ZexuSun/CurES at commit eccf298, read for this module):

* Rollout counts (epic/stage_0_init_difficulty_sample_size.py, `init_sample_size`, lines 166-177): with
  p = the share of correct rollouts among the first-pass rollouts, q = 1 - p, and g the gradient norms of the
  correct (+) and wrong (-) rollouts,

      sigma_i^2 = p q^2 E[g_+^2] + p^2 q E[g_-^2] - p^2 q^2 (E[g_+] - E[g_-])^2,     n_i ~ sigma_i.

  sigma_i^2 is the variance of the scalar surrogate (r - p) g of the policy-gradient term with a binary
  reward r and baseline p (our reading: E[(r-p)^2 g^2] - E[(r-p) g]^2 with the norms standing in for the
  vectors); it vanishes when p is 0 or 1 (all rollouts wrong or all right: no signal), and it is >= 0
  (>= p q (q E[g_+] + p E[g_-])^2 by Jensen). The code's comment calls it "eq. 127 in our paper" and notes
  that it differs from GVM; the paper's equation itself was NOT verified here (only the code was read).
  A group without rollouts has E[g] = E[g^2] = 0 there (lines 225-228); so here. The code computes g as the
  norm of d(-sum_t log pi(y_t | x, y_<t)) / d(embedding matrix) (lines 160-163, 210-220: `act_params`
  "embed_tokens", first parameter only) and rounds with ``np.round(budget * sigma / sum sigma)``; the
  budget is ``batch_size * num_rollout_max``. HERE: largest-remainder rounding (as gvm_allocation), so the
  counts sum to the budget exactly.

* Prompt sampling probabilities (epic/epic_sampler.py, `EpicSampler.update_difficulty` lines 16-28 and
  `__iter__` lines 30-37; the same posterior in stage_0 lines 120-143): with a accepted of m rollouts so far,
  the Beta(a + 1, m - a + 1) posterior mean d = (a + 1) / (m + 2) (the code names it "difficulty"; it is an
  accuracy) and a per-prompt temperature t = (a + 1) / 0.01,

      P(prompt i) = exp(sqrt(d_i (1 - d_i)) / t_i) / sum_j exp(sqrt(d_j (1 - d_j)) / t_j).

  With t >= 100 the exponents are at most 0.005, so this is within 0.5 % of uniform; the sampler's
  `entropy_param` (1.0 in runs/scripts/run_epic.sh) is stored but not used in that formula. Whether the
  paper's closed-form distribution has this temperature is NOT verified; `scale` exposes the 0.01.

`allocation_table` applies either rule to a `gradsight geometry` run of rewarded rollouts (records
``{"prompt", "response", "reward"}``: one unit each, role "rollout"): rollouts are grouped by prompt text,
accepted = reward > the run's threshold (manifest geometry.threshold), and the gradient norm of a rollout is
sqrt(sq_norm): the exact norm of the gradient of its sequence negative log-likelihood over the run's
SELECTED layers (a proxy for the full-model norm GVM uses and for CurES' embedding-matrix norm).

Reduction: none (per prompt); budgets are shared by normalisation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .noise import gvm_allocation

__all__ = ["cures_sigma", "cures_allocation", "cures_sampling_probs", "allocation_table", "RULES"]

RULES = ("gvm", "cures")


def _vec(name: str, v, n: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} entries, expected {n} (one per prompt)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _budget(budget) -> int:
    if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    return int(budget)


def cures_sigma(accuracy: Sequence[float], mean_pos: Sequence[float], mean_sq_pos: Sequence[float],
                mean_neg: Sequence[float], mean_sq_neg: Sequence[float]) -> np.ndarray:
    """CurES' per-prompt gradient standard deviation sigma_i (see the module docstring).

    Args:
        accuracy: p_i in [0, 1], the share of correct rollouts.
        mean_pos, mean_sq_pos: E[g] and E[g^2] of the gradient norms of the correct rollouts (0 if none).
        mean_neg, mean_sq_neg: the same for the wrong rollouts.

    Returns:
        (m,) float64 sigma_i >= 0 (rounding below 0 clamped).

    Raises:
        ValueError: mismatched lengths, p outside [0, 1], negative or non-finite statistics.
    """
    p = _vec("accuracy", accuracy)
    stats = {name: _vec(name, v, p.size) for name, v in (("mean_pos", mean_pos), ("mean_sq_pos", mean_sq_pos),
                                                         ("mean_neg", mean_neg), ("mean_sq_neg", mean_sq_neg))}
    if np.any((p < 0) | (p > 1)):
        raise ValueError("accuracy must lie in [0, 1]")
    for name, v in stats.items():
        if np.any(v < 0):
            raise ValueError(f"{name} must be >= 0 (norms)")
    q = 1.0 - p
    var = (p * q**2 * stats["mean_sq_pos"] + p**2 * q * stats["mean_sq_neg"]
           - p**2 * q**2 * (stats["mean_pos"] - stats["mean_neg"]) ** 2)
    return np.sqrt(np.clip(var, 0.0, None))


def cures_allocation(accuracy: Sequence[float], mean_pos: Sequence[float], mean_sq_pos: Sequence[float],
                     mean_neg: Sequence[float], mean_sq_neg: Sequence[float], budget: int) -> np.ndarray:
    """CurES rollout counts n_i ~ sigma_i summing to `budget` (largest remainder, ties to the lowest index).

    Args: as `cures_sigma`, plus budget: total rollouts N >= 0.

    Returns:
        (m,) int64 counts summing to ``budget`` exactly; 0 for prompts with sigma_i = 0 (p_i in {0, 1}).

    Raises:
        ValueError: as `cures_sigma`; a bad budget; (budget > 0) every sigma_i = 0.
    """
    sigma = cures_sigma(accuracy, mean_pos, mean_sq_pos, mean_neg, mean_sq_neg)
    budget = _budget(budget)
    if budget == 0:
        return np.zeros(sigma.size, dtype=np.int64)
    if not sigma.sum() > 0:
        raise ValueError("no prompt has positive CurES weight (every prompt has accuracy 0 or 1, or zero norms)")
    return _proportional(sigma, budget)


def _proportional(weights: np.ndarray, budget: int) -> np.ndarray:
    """Counts summing to budget, proportional to weights >= 0 (largest remainder, ties to the lowest index).

    This is gvm_allocation's rounding: with every p_i = 1 and alpha = 0 its raw weights are G_i themselves
    (G_i / sqrt(1)) and no filter applies, so it reduces to rounding budget * w_i / sum w exactly."""
    return gvm_allocation(weights, np.ones_like(weights), budget, alpha=0.0)


def cures_sampling_probs(n_accepted: Sequence[float], n_total: Sequence[float], scale: float = 1e-2) -> np.ndarray:
    """CurES' prompt sampling probabilities from the Beta posterior of each prompt's accuracy.

    Args:
        n_accepted: a_i, correct rollouts seen so far (>= 0).
        n_total: m_i >= a_i, rollouts seen so far.
        scale: t_i = (a_i + 1) / scale (the released code's 1e-2).

    Returns:
        (m,) float64 probabilities summing to 1:
        softmax_i( sqrt(d_i (1 - d_i)) / t_i ), d_i = (a_i + 1) / (m_i + 2).
    """
    a = _vec("n_accepted", n_accepted)
    m = _vec("n_total", n_total, a.size)
    if np.any(a < 0) or np.any(m < a):
        raise ValueError("need 0 <= n_accepted <= n_total for every prompt")
    if not (scale > 0) or not math.isfinite(scale):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    d = (a + 1.0) / (m + 2.0)
    z = np.sqrt(d * (1.0 - d)) / ((a + 1.0) / scale)
    w = np.exp(z - z.max())  # shift-invariant; avoids overflow for large scale
    return w / w.sum()


def _threshold(run: Path) -> float:
    from ..runs.store import read_manifest

    man = read_manifest(run)
    geo = man.get("geometry") or {}
    if "threshold" in geo:
        return float(geo["threshold"])
    if "threshold" in man.get("config", {}):
        return float(man["config"]["threshold"])
    raise ValueError(f"{run}: the manifest has no geometry.threshold; pass threshold= explicitly")


def allocation_table(run_dir: str | Path, budget: int, rule: str = "gvm", *, threshold: float | None = None,
                     key: str = "prompt", scale: float = 1e-2, **options) -> pd.DataFrame:
    """Per-prompt rollout allocation from a geometry run of rewarded rollouts.

    Args:
        run_dir: a `gradsight geometry` run whose data had rewarded rollouts (examples role == "rollout").
        budget: total rollouts N to allocate.
        rule: "gvm" (stats.noise.gvm_allocation) or "cures" (cures_allocation).
        threshold: accepted = reward > threshold (default: the run's manifest geometry.threshold).
        key: examples column identifying a prompt (default the prompt text; each rollout is its own record).
        scale: CurES' sampling temperature constant (`cures_sampling_probs`).
        **options: passed to gvm_allocation (alpha, beta, filter_threshold, filter_insufficient).

    Returns:
        DataFrame, one row per prompt in order of first appearance: prompt (the key), group, n_rollouts,
        n_accepted, p (accepted share), G (mean norm of accepted rollouts, 0 if none), n (allocated rollouts,
        summing to budget), share (n / budget); for cures also mean_pos, mean_sq_pos, mean_neg, mean_sq_neg,
        sigma and sampling_prob. Norms are sqrt(sq_norm) over the run's selected layers. Skipped rollouts
        (status != ok or non-finite sq_norm / reward) are left out.

    Raises:
        ValueError: unknown rule, no rollouts, or the rule's own errors (no prompt with positive weight).
    """
    from ..runs.store import read_examples

    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    if options and rule != "gvm":
        raise ValueError(f"options {sorted(options)} apply to rule 'gvm' only")
    run = Path(run_dir)
    ex = read_examples(run)
    if "role" not in ex.columns or not (ex["role"] == "rollout").any():
        raise ValueError(f"{run}: no rewarded rollouts (examples with role 'rollout'); allocation needs a geometry "
                         "run of records {prompt, response, reward}")
    if key not in ex.columns:
        raise ValueError(f"key: no column {key!r} in {run}'s examples; have {', '.join(ex.columns)}")
    thr = _threshold(run) if threshold is None else float(threshold)
    ro = ex[(ex["role"] == "rollout") & (ex["status"] == "ok")].copy()
    ro = ro[np.isfinite(ro["sq_norm"].astype(float)) & np.isfinite(ro["reward"].astype(float))]
    if ro.empty:
        raise ValueError(f"{run}: every rollout was skipped; nothing to allocate")
    ro["norm"] = np.sqrt(ro["sq_norm"].astype(float).clip(lower=0))
    ro["acc"] = ro["reward"].astype(float) > thr
    ro = ro.sort_values("idx", kind="stable")
    rows = []
    for k, d in ro.groupby(key, sort=False):
        pos, neg = d.loc[d["acc"], "norm"], d.loc[~d["acc"], "norm"]
        rows.append({"prompt": k, "group": str(d["group"].iloc[0]), "n_rollouts": len(d), "n_accepted": len(pos),
                     "p": len(pos) / len(d), "G": float(pos.mean()) if len(pos) else 0.0,
                     "mean_pos": float(pos.mean()) if len(pos) else 0.0,
                     "mean_sq_pos": float((pos**2).mean()) if len(pos) else 0.0,
                     "mean_neg": float(neg.mean()) if len(neg) else 0.0,
                     "mean_sq_neg": float((neg**2).mean()) if len(neg) else 0.0})
    t = pd.DataFrame(rows)
    if rule == "gvm":
        t["n"] = gvm_allocation(t["G"], t["p"], budget, **options)
        t = t.drop(columns=["mean_pos", "mean_sq_pos", "mean_neg", "mean_sq_neg"])
    else:
        t["sigma"] = cures_sigma(t["p"], t["mean_pos"], t["mean_sq_pos"], t["mean_neg"], t["mean_sq_neg"])
        t["n"] = cures_allocation(t["p"], t["mean_pos"], t["mean_sq_pos"], t["mean_neg"], t["mean_sq_neg"], budget)
        t["sampling_prob"] = cures_sampling_probs(t["n_accepted"], t["n_rollouts"], scale)
    t["n"] = t["n"].astype(np.int64)
    t["share"] = t["n"] / budget if budget else 0.0
    t.insert(0, "rule", rule)
    return t
