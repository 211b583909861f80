"""Reports of a saved run: a self-contained HTML page and a compact terminal summary.

Both read the run directory only (manifest.json and the parquet tables); neither loads a model nor
recomputes statistics. The manifest's "analysis" field picks the renderer (layers, geometry, curvature
or landscape).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_html", "print_summary", "analysis_of"]


def analysis_of(run_dir: Path | str) -> str:
    from ..runs.store import read_manifest

    return read_manifest(Path(run_dir)).get("analysis", "layers")


def render_html(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write RUN/report.html (or `out`) for a layers or geometry run; returns the path."""
    if analysis_of(run_dir) in ("curvature", "landscape"):
        from .curvature import render_curvature_html

        return render_curvature_html(run_dir, out)
    if analysis_of(run_dir) == "geometry":
        from .geometry import render_geometry_html

        return render_geometry_html(run_dir, out)
    from .html import render_html as render_layers

    return render_layers(run_dir, out)


def print_summary(run_dir: Path | str, console=None) -> None:
    """Terminal summary of a layers or geometry run."""
    if analysis_of(run_dir) in ("curvature", "landscape"):
        from .curvature import print_curvature_summary

        return print_curvature_summary(run_dir, console)
    if analysis_of(run_dir) == "geometry":
        from .geometry import print_geometry_summary

        return print_geometry_summary(run_dir, console)
    from .terminal import print_summary as print_layers

    return print_layers(run_dir, console)
