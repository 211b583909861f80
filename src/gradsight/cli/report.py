"""`gradsight report RUN`: recompute the group comparison of a run and write report.html."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer


def report(
    run: Path = typer.Argument(..., help="run directory written by `gradsight layers`, `geometry`, `curvature`, `landscape` or `demo`"),
    reference: Optional[str] = typer.Option(None, help="reference group for relative differences"),
    n_boot: Optional[int] = typer.Option(None, help="bootstrap resamples (default: the run's)"),
    n_perm: Optional[int] = typer.Option(None, help="permutations (default: the run's)"),
    recompute: bool = typer.Option(True, help="recompute summary tables from the layer statistics"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no terminal summary"),
):
    """Write RUN/report.html (self-contained) and print a terminal summary."""
    from ..config import LayersConfig
    from ..pipeline import summarize_run
    from ..report import print_summary, render_html
    from ..runs.store import read_manifest

    manifest = read_manifest(run)
    analysis = manifest.get("analysis", "layers")
    if analysis in ("curvature", "landscape"):
        pass  # their tables are final when the run ends (nothing is resampled); the report renders them
    elif recompute and analysis == "geometry":
        from ..config import GeometryConfig
        from ..geometry import summarize_geometry

        cfg = GeometryConfig.from_dict(manifest["config"])
        summarize_geometry(run, replace(cfg, summary=replace(cfg.summary, n_boot=n_boot or cfg.summary.n_boot)))
    elif recompute:
        cfg = LayersConfig.from_dict(manifest["config"])
        s = cfg.summary
        s = replace(s, reference=reference if reference is not None else s.reference,
                    n_boot=n_boot or s.n_boot, n_perm=n_perm or s.n_perm)
        summarize_run(run, replace(cfg, summary=s))
    path = render_html(run)
    if not quiet:
        print_summary(run)
    typer.echo(f"report: {path}")
