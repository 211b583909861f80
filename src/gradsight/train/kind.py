"""Registers the training monitor's run directories as the run kind "train" (see runs.registry.RunKind), so
that `gradsight report RUN`, the index page of a run tree and `gradsight.report` show them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..runs.registry import ReportSpec, RunKind, lazy, register_kind
from ..runs.store import read_manifest

__all__ = ["TrainRun", "open_train", "KIND"]


@dataclass
class TrainRun:
    """A monitor run read back: its manifest and summary tables (schemas in `train.schema`)."""

    path: Path
    manifest: dict
    series: pd.DataFrame
    alerts: pd.DataFrame
    diagnoses: pd.DataFrame

    def metric(self, metric: str, layer: str = "") -> pd.Series:
        """One metric over steps (model-wide by default, or of one parameter tensor)."""
        s = self.series
        return s[(s["metric"] == metric) & (s["layer"] == layer)].set_index("step")["value"].sort_index()

    def report(self) -> Path:
        from .report import render

        return render(self.path)


def open_train(path: str | Path) -> TrainRun:
    """Read a monitor run directory (summarised first when its summary tables are missing)."""
    from .summarize import summarize

    path = Path(path)
    if not all((path / f"{t}.parquet").exists() for t in ("series", "alerts", "diagnoses")):
        summarize(path)
    return TrainRun(path, read_manifest(path), *(pd.read_parquet(path / f"{t}.parquet")
                                                 for t in ("series", "alerts", "diagnoses")))


KIND = register_kind(RunKind(
    name="train",
    summarize=lazy("gradsight.train.summarize:summarize"),
    report=ReportSpec(render=lazy("gradsight.train.report:render"),
                      summary=lazy("gradsight.train.report:print_summary"),
                      findings=lazy("gradsight.train.report:run_findings")),
    open=open_train,
))
