"""The summary tables of a training-monitor run: merged series and alerts, and their diagnoses.

`summarize(run_dir)` reads only the run directory, so it can run after the training, on a copy, or again with
other thresholds:

1. Committed shards only. A monitor commit writes scalars/KEY.parquet and alerts/KEY.parquet, then the marker
   steps/KEY.parquet last (each atomically). A shard whose KEY has no marker belongs to a commit that was
   cut short; it is ignored (a resumed monitor deletes it anyway).
2. Key order. Shards are concatenated by (rank, sequence) parsed from "r{rank}-{seq:05d}" (numerically, so
   r10 comes after r2).
3. The newest write wins. A training resumed from a checkpoint redoes the steps after the checkpoint, and its
   monitor writes them again in later commits. SERIES keeps the last write of each (step, layer, metric) in
   key order, and ALERTS the last of each (step, layer, rule). Caveat: steps that the killed run reached but
   the resumed run has not (yet) redone keep the killed run's values; so does an alert of the killed run at a
   step where the redone step raised none.
4. `diagnose(series, alerts, manifest)`, then RUN/series.parquet, RUN/alerts.parquet and
   RUN/diagnoses.parquet are written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..runs.store import Layout, read_manifest, write_parquet
from . import schema as S
from .diagnose import DiagnosisThresholds, diagnose

__all__ = ["summarize", "committed_shards", "read_table"]

_KEY = re.compile(r"^r(\d+)-(\d+)$")
_LAYOUT = Layout(tables=(S.SCALARS, S.ALERTS, S.STEPS), unit_column="step")
_DTYPES = {"step": "int64", "layer": object, "metric": object, "value": "float64", "rule": object,
           "threshold": "float64", "message": object}


def committed_shards(run_dir: Path | str, table: str) -> list[Path]:
    """The parquet shards of `table` whose key also has a marker shard in steps/, in (rank, seq) order."""
    run = Path(run_dir)
    done = {k for k in _LAYOUT.shards(run, S.STEPS) if _KEY.match(k)}
    shards = {k: p for k, p in _LAYOUT.shards(run, table).items()
              if k in done and p.suffix == ".parquet"}
    order = sorted(shards, key=lambda k: tuple(int(g) for g in _KEY.match(k).groups()))
    return [shards[k] for k in order]


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES.get(c, object)) for c in columns})


def read_table(run_dir: Path | str, table: str, columns: list[str], key: list[str]) -> pd.DataFrame:
    """One shard table merged: committed shards in key order, last row of each `key` kept, sorted by key.

    Columns beyond `columns` are kept after them; a shard missing one of `columns` is refused."""
    parts = []
    for path in committed_shards(run_dir, table):
        df = pd.read_parquet(path)
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (expected {columns})")
        parts.append(df)
    parts = [p for p in parts if len(p)]
    if not parts:
        return _empty(columns)
    df = pd.concat(parts, ignore_index=True)
    df = df[columns + [c for c in df.columns if c not in columns]]
    df = df.astype({c: t for c, t in _DTYPES.items() if c in columns})
    for c in columns:
        if _DTYPES.get(c) is object:
            df[c] = df[c].astype(str)
    df = df.drop_duplicates(key, keep="last")  # the newest write of a (step, layer, ...) wins
    return df.sort_values(key, kind="stable", ignore_index=True)


def summarize(run_dir: Path | str, cfg=None, info=None, *,
              thresholds: DiagnosisThresholds | None = None) -> dict[str, pd.DataFrame]:
    """Merge a monitor run's shards, diagnose them, write the summary tables; returns them.

    Args:
        run_dir: the run directory (must hold manifest.json).
        cfg, info: accepted for the analysis registry's ``summarize(run_dir, cfg, info)`` protocol; unused,
            everything is read from the run directory.
        thresholds: the diagnosis thresholds (default `DiagnosisThresholds()`).

    Returns:
        {"series": SERIES (SCALAR_COLUMNS), "alerts": ALERTS merged (ALERT_COLUMNS), "diagnoses": DIAGNOSES}.
        A run without committed shards gives empty tables with these columns.
    """
    run = Path(run_dir)
    manifest = read_manifest(run)
    series = read_table(run, S.SCALARS, S.SCALAR_COLUMNS, ["step", "layer", "metric"])
    alerts = read_table(run, S.ALERTS, S.ALERT_COLUMNS, ["step", "layer", "rule"])
    diagnoses = diagnose(series, alerts, manifest, thresholds=thresholds)
    write_parquet(series, run / f"{S.SERIES}.parquet")
    write_parquet(alerts, run / f"{S.ALERTS}.parquet")
    write_parquet(diagnoses, run / f"{S.DIAGNOSES}.parquet")
    return {"series": series, "alerts": alerts, "diagnoses": diagnoses}
