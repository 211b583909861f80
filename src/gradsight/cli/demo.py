"""`gradsight demo`: fast vs slow thinking on SmolLM2-135M-Instruct with the built-in problems."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory"),
    n_problems: int = typer.Option(60, help="number of built-in word problems (x3 responses)"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
):
    """Run the built-in demo (at least 60 problems x {fast, slow, wrong}) and write the report."""
    from ..demo.run import run_demo
    from ..report import print_summary

    result = run_demo(out, n_problems=n_problems, model=model, progress=not quiet)
    if not quiet:
        print_summary(result.path)
    typer.echo(f"report: {result.path / 'report.html'}")
