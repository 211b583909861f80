"""Where a monitor's numbers go: a run directory (parquet shards, resumable) and TensorBoard event files.

A sink receives flushed blocks of rows (`schema.SCALAR_COLUMNS` and `schema.ALERT_COLUMNS` DataFrames) and,
on schedule, raw gradient tensors for histograms. Sinks run on rank 0 only; the monitor reduces first.

`RunSink` uses the engine's store (`runs.store.RunStore`): each flush is one commit (scalars, alerts, then
the steps marker, each written atomically), so a killed run loses at most the steps since the last flush and
a rerun into the same directory with the same identity resumes: rows written again for a step replace the
old ones when the run is summarised (the newest commit wins). Another configuration in the same directory is
refused, naming the differing keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from ..runs.store import Layout, RunStore, check_run_dir, versions
from . import schema

__all__ = ["Sink", "RunSink", "TensorBoardSink", "LAYOUT"]

LAYOUT = Layout(tables=(schema.SCALARS, schema.ALERTS, schema.STEPS), unit_column="step")


class Sink:
    """The sink protocol (every method optional): write rows, histograms, close."""

    def write(self, scalars: pd.DataFrame, alerts: pd.DataFrame) -> None:  # pragma: no cover - protocol
        pass

    def histograms(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        pass

    def close(self, **fields) -> None:
        pass


class RunSink(Sink):
    """A monitor run directory: manifest.json + scalars/, alerts/, steps/ shards (see `train.schema`).

    Args:
        out: the run directory (created; refused if it holds another configuration or foreign files).
        identity: what defines the run (monitor configuration, parameter names and shapes).
        meta: informational manifest fields (optimizer, batch size, world size, ...).
    """

    def __init__(self, out: str | Path, identity: Mapping[str, Any], meta: Mapping[str, Any] | None = None):
        self.path = Path(out)
        check_run_dir(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.store = RunStore(self.path, layout=LAYOUT)
        extra = {"analysis": "train", "versions": versions(), **(meta or {})}
        self.manifest = self.store.open({"analysis": "train", **identity}, extra)
        removed = self.store.cleanup()
        self.resumed = bool(self.store.done()) or removed > 0
        if self.manifest.get("finished"):
            self.store.update_manifest(finished=False)

    def write(self, scalars: pd.DataFrame, alerts: pd.DataFrame) -> None:
        if scalars.empty and alerts.empty:
            return
        steps = sorted(set(scalars["step"].tolist()) | set(alerts["step"].tolist()))
        self.store.commit({schema.SCALARS: scalars, schema.ALERTS: alerts,
                           schema.STEPS: pd.DataFrame({"step": pd.Series(steps, dtype="int64")})})

    def close(self, **fields) -> None:
        self.store.update_manifest(**fields)


class TensorBoardSink(Sink):
    """TensorBoard event files (the real `tensorboard` package through torch.utils.tensorboard).

    Scalars are tagged ``METRIC/LAYER`` (model-wide values ``METRIC``); histograms ``grad/PARAM`` use 64 equal
    bins between the tensor's min and max (wandb.watch's binning), written with `add_histogram_raw`.
    """

    def __init__(self, logdir: str | Path, bins: int = 64):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard not installed
            raise ImportError("the TensorBoard sink needs the `tensorboard` package: pip install tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.bins = bins

    def write(self, scalars: pd.DataFrame, alerts: pd.DataFrame) -> None:
        for step, layer, metric, value in scalars[schema.SCALAR_COLUMNS].itertuples(index=False):
            if value == value:  # NaN is not plotted
                self.writer.add_scalar(metric if not layer else f"{metric}/{layer}", float(value), int(step))
        for row in alerts.itertuples(index=False):
            self.writer.add_text("alerts", f"{row.rule}: {row.message}", int(row.step))
        self.writer.flush()

    def histograms(self, step: int, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            counts, lo, hi = histogram(t, self.bins)
            if counts is None:
                continue
            edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)[1:]
            x = t.detach().double().flatten()
            self.writer.add_histogram_raw(
                f"grad/{name}", min=lo, max=hi, num=int(x.numel()), sum=float(x.sum()),
                sum_squares=float((x * x).sum()), bucket_limits=edges.tolist(), bucket_counts=counts.tolist(),
                global_step=int(step))
        self.writer.flush()

    def close(self, **fields) -> None:
        self.writer.close()


def histogram(t: torch.Tensor, bins: int = 64) -> tuple[torch.Tensor | None, float, float]:
    """(counts (bins,), min, max) of the finite entries of `t` with `bins` equal bins (torch.histc, as
    wandb.watch); (None, nan, nan) when no entry is finite."""
    x = t.detach().float().flatten()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return None, float("nan"), float("nan")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return torch.histc(x, bins=bins, min=lo, max=hi).to(torch.int64), lo, hi


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True)
