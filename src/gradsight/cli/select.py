"""`gradsight select RUN`: pick a subset of a geometry run's examples by a score, optionally diversity-aware."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def select(
    run: Path = typer.Argument(..., help="run directory written by `gradsight geometry`"),
    budget: int = typer.Option(..., "--budget", "-k", help="number of examples (units) to pick"),
    by: str = typer.Option("diversity", help="score: grad_norm, erank, cos_target or diversity"),
    ascending: bool = typer.Option(False, "--ascending", help="pick the lowest scores"),
    labels: Optional[str] = typer.Option(None, help="only these labels (comma-separated)"),
    diverse: bool = typer.Option(False, "--diverse", help="greedy G-Vendi among the best `--pool` by score"),
    pool: Optional[int] = typer.Option(None, help="candidate pool for --diverse (default 4 x budget)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="ids file, one per line (default RUN/selected.txt); a .parquet "
                                            "with ranks and scores is written next to it"),
):
    """Write the chosen example ids (record id, plus :term for multi-term records)."""
    from ..analyses.geometry.selection import select as select_units
    from ..runs.store import atomic_write_text, write_parquet
    from .options import split_csv

    df = select_units(run, budget, by=by, ascending=ascending, labels=list(split_csv(labels)) or None,
                      diverse=diverse, pool=pool)
    out = out or Path(run) / "selected.txt"
    ids = [i if t in ("loss", "rollout") else f"{i}:{t}" for i, t in zip(df["id"], df["term"])]
    atomic_write_text(out, "".join(f"{i}\n" for i in ids))
    write_parquet(df, out.with_suffix(".parquet"))
    typer.echo(f"selected {len(df)} by {by}{' (diversity-aware)' if diverse else ''}: {out}")
