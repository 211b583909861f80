"""`gradsight unlearn`: SalUn (saliency-masked random labelling) against Retrain, fine-tuning and unmasked
random labelling on scikit-learn's digits (offline, CPU seconds). See `gradsight.importance.unlearning_run`."""

from __future__ import annotations

from pathlib import Path

import typer


def unlearn(
    out: Path = typer.Option(..., "--out", "-o", help="run directory (refused if it holds another configuration)"),
    forget: str = typer.Option("random10", "--forget", help="forget set: random10 (a random 10% of the training "
                                                            "rows) or class:N (every row of class N)"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="comma-separated seeds (model, split, labels)"),
    fraction: float = typer.Option(0.5, "--fraction", help="SalUn: fraction of weights the mask leaves editable "
                                                           "(the top |gradient| of the forget loss; 0.5 = median)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines and no table"),
):
    """Machine unlearning with SalUn on digits, graded against retraining from scratch."""
    from ..importance.unlearning_run import run_unlearning

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    table = run_unlearning(out, forget, seed_list, fraction=fraction, progress=None if quiet else typer.echo)
    if not quiet:
        import pandas as pd

        s = pd.read_parquet(Path(out) / "summary.parquet")
        typer.echo(s[["method", "n_seeds", "UA_mean", "RA_mean", "TA_mean", "MIA_mean", "gap_mean"]]
                   .to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    del table
    typer.echo(f"report: {Path(out) / 'report.html'}")
