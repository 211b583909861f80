"""`gradsight lds`: grade attribution methods by the linear datamodeling score on the offline digits task.

The ground truth (subsets x runs retrainings, numpy, one thread) is cached and resumable; the results go to a run
directory (lds.parquet, ceiling.parquet, loo.parquet for --model lr, manifest.json, log.txt, report.html).
See `gradsight.attribution.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEFAULT_CACHE = Path("~/.cache/gradsight/lds")


# The short names of `attribution.evaluate.PRESETS`, written out so that `import gradsight.cli` stays light (no
# torch / pandas / scipy at start); tests/test_attribution_eval.py checks that every preset is listed here.
METHODS_HELP = (
    "comma-separated short names (full parameter space; d = damping relative to the mean eigenvalue): "
    "grad_dot, grad_cos; tracin = TracIn over 5 checkpoints; raw = influence with the exact per-layer GGN, d 1; "
    "kfac = K-FAC, d 0.3; ekfac = EK-FAC with the GGN, d 0.3; trak1 / trak / trak50 = TRAK-1 / -10 / -50 as "
    "published (k 512, lambda 0); trak_tuned = TRAK-10, k 512, d 1; raw3 / raw5 = raw over 3 / 5 "
    "independently trained models; kfac5 / kfac10 = K-FAC over 5 / 10 models, d 0.1; ekfac5 = EK-FAC (GGN) over "
    "5 models, d 0.1"
)


def lds(
    model: str = typer.Option("mlp", "--model", help="digits model: mlp (64-32-10, SGD) or lr (convex, L-BFGS)"),
    methods: str = typer.Option("ekfac,trak", "--methods",
                                help=METHODS_HELP),
    subsets: int = typer.Option(100, "--subsets", "-m", help="ground truth: random half-subsets retrained"),
    runs: int = typer.Option(3, "--runs", help="trainings per subset (>= 2 for the noise ceiling)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (refused if it holds another configuration)"),
    seed: int = typer.Option(0, "--seed", help="subsets, the full-data model and projections"),
    cache: Optional[Path] = typer.Option(None, "--cache",
                                         help=f"ground-truth cache directory (default {DEFAULT_CACHE}; e.g. "
                                              "OUT/cache to keep it with the run)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines and no table"),
):
    """Grade attribution methods by LDS against retraining on sklearn's digits (offline, CPU)."""
    from ..attribution.evaluate import evaluate_lds

    if model not in ("mlp", "lr"):
        raise ValueError(f"--model must be mlp or lr, got {model!r}")
    if subsets < 2:
        raise ValueError(f"--subsets must be >= 2 (a rank correlation over subsets), got {subsets}")
    rep = evaluate_lds(model, methods, m=subsets, runs=runs, seed=seed, cache=cache or DEFAULT_CACHE, out=out,
                       progress=None if quiet else typer.echo, bar=not quiet)
    if not quiet:
        typer.echo(rep.text())
    typer.echo(f"report: {Path(out) / 'report.html'}")
