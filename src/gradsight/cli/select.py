"""`gradsight select RUN`: pick a subset of a run's examples, or allocate rollouts across prompts.

The run's manifest decides: a geometry run selects units by a per-unit score (optionally diversity-aware);
an attribution run selects training examples for a target (its validation queries, `--target` groups) by
influence, TracIn or LESS; `--allocate gvm|cures` allocates a rollout budget across the prompts of a geometry
run of rewarded rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def select(
    run: Path = typer.Argument(..., help="run directory written by `gradsight geometry` or `gradsight attribute`"),
    budget: int = typer.Option(..., "--budget", "-k", help="number of examples (units) to pick, or rollouts to "
                                                           "allocate with --allocate"),
    by: str = typer.Option("diversity", help="score: geometry runs grad_norm, erank, cos_target or diversity; "
                                             "attribution runs influence, tracin or less (required there)"),
    target: Optional[str] = typer.Option(None, help="attribution runs: the query groups to select for "
                                                    "(comma-separated; default all queries)"),
    method: Optional[str] = typer.Option(None, help="attribution runs: the method behind --by (default: ekfac / "
                                                    "kfac / raw for influence, tracin / grad_dot for tracin, "
                                                    "grad_cos for less; fitted if the run lacks it)"),
    ascending: bool = typer.Option(False, "--ascending", help="pick the lowest scores"),
    labels: Optional[str] = typer.Option(None, help="only these labels (geometry) or training groups "
                                                    "(attribution), comma-separated"),
    diverse: bool = typer.Option(False, "--diverse", help="greedy G-Vendi among the best `--pool` by score"),
    pool: Optional[int] = typer.Option(None, help="candidate pool for --diverse (default 4 x budget)"),
    allocate: Optional[str] = typer.Option(None, help="allocate --budget rollouts across the prompts of a geometry "
                                                      "run of rewarded rollouts: gvm or cures"),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="ids file, one per line (default RUN/selected.txt); a .parquet "
                                            "with ranks and scores is written next to it (--allocate: the "
                                            "table, default RUN/allocation.parquet)"),
):
    """Write the chosen example ids (record id, plus :term for multi-term records), or an allocation table."""
    from ..runs.store import atomic_write_text, read_manifest, write_parquet
    from .options import split_csv

    analysis = read_manifest(run).get("analysis")
    if allocate is not None:
        _allocate(run, budget, allocate, out, write_parquet)
        return
    if analysis == "attribute":
        from ..analyses.attribution.selection import select as select_attr

        if by == "diversity":  # the geometry default: an attribution run needs an explicit choice
            raise ValueError(f"{run} is an attribution run: choose --by influence, tracin or less")
        df = select_attr(run, budget, by=by, target=list(split_csv(target)) or None, diverse=diverse, pool=pool,
                         ascending=ascending, method=method, groups=list(split_csv(labels)) or None)
        ids = df["id"].astype(str).tolist()
        what = f"{by} ({df['method'].iloc[0]}) for {', '.join(split_csv(target)) or 'all queries'}"
    else:
        if target or method:
            raise ValueError(f"--target / --method apply to attribution runs; {run} is a {analysis!r} run")
        from ..analyses.geometry.selection import select as select_units

        df = select_units(run, budget, by=by, ascending=ascending, labels=list(split_csv(labels)) or None,
                          diverse=diverse, pool=pool)
        ids = [i if t in ("loss", "rollout") else f"{i}:{t}" for i, t in zip(df["id"], df["term"])]
        what = by
    out = out or Path(run) / "selected.txt"
    atomic_write_text(out, "".join(f"{i}\n" for i in ids))
    write_parquet(df, out.with_suffix(".parquet"))
    typer.echo(f"selected {len(df)} by {what}{' (diversity-aware)' if diverse else ''}: {out}")


def _allocate(run: Path, budget: int, rule: str, out: Optional[Path], write_parquet) -> None:
    """Write and print the per-prompt rollout allocation of a geometry run of rewarded rollouts."""
    from ..stats.allocation import allocation_table

    t = allocation_table(run, budget, rule)
    path = (out if out is not None and out.suffix == ".parquet" else
            out.with_suffix(".parquet") if out is not None else Path(run) / "allocation.parquet")
    write_parquet(t, path)
    cols = ["prompt", "group", "n_rollouts", "n_accepted", "p", "G"] + (["sigma", "sampling_prob"]
                                                                        if rule == "cures" else []) + ["n"]
    show = t[cols].copy()
    show["prompt"] = show["prompt"].astype(str).map(lambda s: " ".join(s.split())[:40])
    limit = 40
    typer.echo(show.head(limit).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(show) > limit:
        typer.echo(f"... {len(show) - limit} more prompts")
    typer.echo(f"allocated {int(t['n'].sum())} rollouts over {len(t)} prompts by {rule} (G: mean gradient norm of "
               f"the accepted rollouts over the run's selected layers): {path}")
