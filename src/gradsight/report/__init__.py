"""Reports of a saved run: a self-contained HTML page and a compact terminal summary.

Both read the run directory only (manifest.json and the parquet tables); neither loads a model nor
recomputes statistics. The manifest's "analysis" field picks the registered analysis, whose page and
summary live in its folder (``gradsight/analyses/<name>/report.py``); the shared kit is `report.kit`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_html", "print_summary", "analysis_of"]


def analysis_of(run_dir: Path | str) -> str:
    from ..runs.store import read_manifest

    return read_manifest(Path(run_dir)).get("analysis", "layers")


def _report(run_dir):
    from ..runs import registry

    return registry.report_of(analysis_of(run_dir))


def render_html(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write RUN/report.html (or `out`) for a run of any registered analysis or run kind; returns the path."""
    return _report(run_dir).render(run_dir, out)


def print_summary(run_dir: Path | str, console=None) -> None:
    """The terminal summary of a run of any registered analysis or run kind."""
    return _report(run_dir).summary(run_dir, console)
