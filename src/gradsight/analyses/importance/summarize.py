"""The importance run's final tables (written by `finish` in pruning.py; merged examples from the shards).

    RUN/examples.parquet     every calibration unit: idx, group, status, reason, loss, n_tokens, ...
    RUN/evaluation.parquet   per (method, structure, sparsity) and the dense model: achieved sparsity, group,
                             calibration (sequential / one-shot), in_sample, nll, ppl (LM) or accuracy (module),
                             n_tokens, finite, seconds
    RUN/layers.parquet       per configuration and layer: pruned fraction, overlap of its pruned set with
                             magnitude's at the same structure and sparsity (1 = the same weights)
    RUN/scores.parquet       per method and layer: score mean, q10, median, q90, fraction of exact zeros
    RUN/neurons.parquet      the top MLP neurons per layer by gradient x activation (when collected)
    RUN/scores/METHOD.safetensors   per-weight scores, {layer: (d_out, d_in)} (--save-scores)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ...runs.store import merge_shards, read_manifest
from .pruning import OUT_TABLES, read_tables

__all__ = ["summarize", "result", "ImportanceResult", "load_scores"]


def summarize(run: Path | str, cfg=None, info=None) -> dict[str, pd.DataFrame]:
    run = Path(run)
    out = {"examples": merge_shards(run, "examples")}
    out.update(read_tables(run))
    return out


def load_scores(run: Path | str, method: str) -> dict:
    """{layer: (d_out, d_in) tensor} of a method's per-weight scores (run with --save-scores)."""
    from safetensors.torch import load_file

    p = Path(run) / "scores" / f"{method}.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no scores of {method!r} in this run (was it run with --save-scores and "
                                f"--methods including {method}?)")
    return load_file(str(p))


@dataclass
class ImportanceResult:
    """A finished importance run: .evaluation (the sparsity / perplexity grid), .layers, .score_summary,
    .neurons, .examples, .scores(method) and .report()."""

    path: Path
    tables: dict

    def _t(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def evaluation(self) -> pd.DataFrame | None:
        return self._t("evaluation")

    @property
    def layers(self) -> pd.DataFrame | None:
        return self._t("layers")

    @property
    def score_summary(self) -> pd.DataFrame | None:
        return self._t("scores")

    @property
    def neurons(self) -> pd.DataFrame | None:
        return self._t("neurons")

    @property
    def examples(self) -> pd.DataFrame | None:
        return self._t("examples")

    @property
    def manifest(self) -> dict:
        return read_manifest(self.path)

    def scores(self, method: str) -> dict:
        return load_scores(self.path, method)

    def report(self) -> Path:
        from .report import render

        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> ImportanceResult:
    run = Path(run)
    if tables is None:
        tables = {}
        for t in ("examples", *OUT_TABLES):
            p = run / f"{t}.parquet"
            if p.exists():
                tables[t] = pd.read_parquet(p)
    return ImportanceResult(run, tables)
