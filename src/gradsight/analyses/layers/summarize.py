"""The layers analysis' final tables: group curves with bootstrap CIs, MAD, RD and permutation tests.

Computed from the run directory only (layer_stats shards and the examples table), so `gradsight report`
can recompute them with other summary options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ...runs.store import merge_shards, read_examples, read_layer_stats, read_manifest, write_parquet
from ...stats.compare import summarize as compare_groups
from .config import LayersConfig
from .report import render

__all__ = ["summarize", "LayersResult", "result"]


def summarize(run: Path | str, cfg: LayersConfig | None = None, info=None) -> dict[str, pd.DataFrame]:
    """(Re)compute summary, MAD, RD and test tables of a run from its layer stats; write them.

    Returns {"examples", "summary", "mad", "rd", "tests"}.
    """
    run = Path(run)
    if cfg is None:
        cfg = LayersConfig.from_dict(read_manifest(run)["config"])
    ex = merge_shards(run, "examples")
    ls = read_layer_stats(run)
    ok = set(ex.loc[ex["status"] == "ok", "idx"].astype(int))
    ls = ls[ls["idx"].isin(ok)]
    s = cfg.summary
    tables = compare_groups(ls, reference=s.reference, n_boot=s.n_boot, n_perm=s.n_perm, seed=cfg.seed,
                            bounds=s.bounds)
    for name, df in tables.items():
        write_parquet(df, run / f"{name}.parquet")
    return {"examples": ex, **tables}


@dataclass
class LayersResult:
    """Where a finished layers run lives and its main tables."""

    path: Path
    examples: pd.DataFrame
    summary: pd.DataFrame | None

    @property
    def layer_stats(self) -> pd.DataFrame:
        return read_layer_stats(self.path)

    def report(self) -> Path:
        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> LayersResult:
    """The LayersResult of a run directory (tables read from it unless given)."""
    run = Path(run)
    if tables is not None:
        return LayersResult(run, tables["examples"], tables.get("summary"))
    summ = run / "summary.parquet"
    return LayersResult(run, read_examples(run), pd.read_parquet(summ) if summ.exists() else None)
