"""`gradsight demo`: fast vs slow thinking on SmolLM2-135M-Instruct with the built-in problems."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory"),
    n_problems: int = typer.Option(60, help="number of built-in word problems (x3 responses)"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec"),
    geometry: bool = typer.Option(True, help="also run the geometry demo into OUT/geometry"),
    geometry_problems: int = typer.Option(30, help="problems of the geometry demo (x8 loss terms)"),
    curvature: bool = typer.Option(True, help="also run the curvature demo into OUT/curvature (digits MLP "
                                              "spectrum and landscapes, SmolLM2 per-block top eigenvalues)"),
    curvature_problems: int = typer.Option(1, help="problems (x3 responses) for the SmolLM2 Hessian"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
):
    """Run the built-in demo (at least 60 problems x {fast, slow, wrong}) and write the reports."""
    from ..demo.run import run_curvature_demo, run_demo, run_geometry_demo
    from ..report import print_summary

    result = run_demo(out, n_problems=n_problems, model=model, progress=not quiet)
    if not quiet:
        print_summary(result.path)
    paths = [result.path / "report.html"]
    if geometry:
        geo = run_geometry_demo(out / "geometry", n_problems=geometry_problems, model=model, progress=not quiet)
        if not quiet:
            print_summary(geo.path)
        paths.append(geo.path / "report.html")
    if curvature:
        runs = run_curvature_demo(out / "curvature", lm_problems=curvature_problems, model=model,
                                  progress=not quiet)
        for p in runs.values():
            if not quiet:
                print_summary(p)
            paths.append(p / "report.html")
    for p in paths:
        typer.echo(f"report: {p}")
