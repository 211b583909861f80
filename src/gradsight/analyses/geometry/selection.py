"""Selection from a geometry run: pick units by a score, optionally diversity-aware (greedy G-Vendi)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ...runs.store import read_manifest
from ...stats.diversity import greedy_select
from .summarize import model_features

__all__ = ["select", "SCORE_COLUMNS"]

SCORE_COLUMNS = ("grad_norm", "erank", "cos_target", "diversity")


def select(run: str | Path, budget: int, *, by: str = "diversity", ascending: bool = False,
           labels: list[str] | None = None, diverse: bool = False, pool: int | None = None,
           q: float | None = None) -> pd.DataFrame:
    """Pick `budget` units of a geometry run by a score, optionally diversity-aware.

    Args:
        run: geometry run directory (with scores.parquet).
        budget: number of units to pick.
        by: score column: grad_norm, erank, cos_target or diversity (leave-one-out G-Vendi contribution).
        ascending: pick the lowest scores instead of the highest.
        labels: only units with these labels (default: all).
        diverse: among the `pool` best units by the score, pick greedily the set of maximal G-Vendi
            (whole-model features) instead of the top scores.
        pool: candidate pool size for `diverse` (default: min(n, 4 * budget)).
        q: Vendi order (default: the run's).

    Returns:
        DataFrame (rank, idx, id, group, term, label, score) in pick order. Units with a NaN score are
        never picked; asking for more than the candidates raises a ValueError that says how many exist.
    """
    run = Path(run)
    if by not in SCORE_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(SCORE_COLUMNS)}; got {by!r}")
    p = run / "scores.parquet"
    if not p.exists():
        raise FileNotFoundError(f"{run}: no scores.parquet; run `gradsight geometry` into it first")
    sc = pd.read_parquet(p)
    if labels:
        unknown = sorted(set(labels) - set(sc["label"]))
        if unknown:
            raise ValueError(f"unknown label(s) {', '.join(unknown)}; the run has {', '.join(sorted(set(sc['label'])))}")
        sc = sc[sc["label"].isin(labels)]
    n_nan = int(sc[by].isna().sum())
    sc = sc[sc[by].notna()]
    if budget < 1 or budget > len(sc):
        raise ValueError(f"budget must be between 1 and the {len(sc)} candidate units with a '{by}' score "
                         f"({n_nan} have none); got {budget}")
    sc = sc.sort_values([by, "idx"], ascending=[ascending, True], kind="stable").reset_index(drop=True)
    if diverse:
        pool = min(len(sc), pool or 4 * budget)
        if pool < budget:
            raise ValueError(f"pool ({pool}) must be at least the budget ({budget})")
        cand = sc.iloc[:pool]
        F = model_features(run, cand)
        if F is None:
            raise ValueError(f"{run}: no whole-model features stored; cannot select for diversity")
        man = read_manifest(run)
        order = greedy_select(F, budget, q=q if q is not None else _run_q(man))
        chosen = cand.iloc[order]
    else:
        chosen = sc.iloc[:budget]
    out = chosen[["idx", "id", "group", "term", "label"]].copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["score"] = chosen[by].to_numpy()
    out["by"] = by
    return out.reset_index(drop=True)


def _run_q(manifest: dict) -> float:
    """The Vendi order of a run (its geometry block; older manifests: the flat config)."""
    return float((manifest.get("geometry") or {}).get("q", manifest.get("config", {}).get("q", 1.0)))
