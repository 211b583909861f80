"""The landscape analysis' table: RUN/landscape.parquet (alpha, beta, loss, finite) from the points shards.

beta is NaN for 1-D slices and interpolations (alpha is then t); loss is NaN where it was not finite. The
directions' metadata, the centre loss and, for interpolations, the barrier are in the manifest's
"landscape" block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...runs.store import read_manifest, write_parquet
from .compute import read_points
from .report import render

__all__ = ["summarize", "LandscapeRunResult", "result"]


def summarize(run: Path | str, cfg=None, info=None) -> dict[str, pd.DataFrame]:
    run = Path(run)
    pts = read_points(run)
    loss = pts["loss"].to_numpy(dtype=np.float64)
    finite = np.isfinite(loss)
    frame = pd.DataFrame({"alpha": pts["alpha"].to_numpy(dtype=np.float64),
                          "beta": pts["beta"].to_numpy(dtype=np.float64),
                          "loss": np.where(finite, loss, np.nan), "finite": finite})
    write_parquet(frame, run / "landscape.parquet")
    return {"landscape": frame}


@dataclass
class LandscapeRunResult:
    """A landscape run: its path, the table and the manifest's landscape block."""

    path: Path
    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def report(self) -> Path:
        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> LandscapeRunResult:
    run = Path(run)
    frame = tables["landscape"] if tables is not None else pd.read_parquet(run / "landscape.parquet")
    return LandscapeRunResult(run, frame, read_manifest(run).get("landscape") or {})
