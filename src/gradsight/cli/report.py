"""`gradsight report RUN`: recompute a run's summary tables (from its shards only) and write report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    run: Path = typer.Argument(..., help="run directory written by any gradsight analysis or `gradsight demo`"),
    reference: Optional[str] = typer.Option(None, help="reference group for relative differences (layers)"),
    n_boot: Optional[int] = typer.Option(None, help="bootstrap resamples (default: the run's)"),
    n_perm: Optional[int] = typer.Option(None, help="permutations (default: the run's; layers)"),
    recompute: bool = typer.Option(True, help="recompute summary tables from the run's shards"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no terminal summary"),
):
    """Write RUN/report.html (self-contained) and print a terminal summary."""
    from ..runs import registry
    from ..runs.distributed import DistInfo
    from ..runs.store import read_manifest
    from .common import err_console

    manifest = read_manifest(run)
    name = manifest.get("analysis", "layers")
    kind = registry.kind(name)
    if kind is not None:  # a run written outside the engine (the training monitor)
        asked = [k for k, v in {"reference": reference, "n_boot": n_boot, "n_perm": n_perm}.items() if v is not None]
        if asked:
            err_console.print(f"note: --{', --'.join(k.replace('_', '-') for k in asked)} does not apply to "
                              f"{name} runs (ignored)", highlight=False)
        if recompute:
            kind.summarize(run)
        path = kind.report.render(run)
        if not quiet:
            kind.report.summary(run)
        typer.echo(f"report: {path}")
        return
    spec = registry.get(name)
    if recompute:
        cfg = spec.Config.from_dict(manifest.get("config") or {})
        asked = {"reference": reference, "n_boot": n_boot, "n_perm": n_perm}
        overrides = {k: v for k, v in asked.items() if v is not None and k in spec.recompute}
        ignored = [k for k, v in asked.items() if v is not None and k not in spec.recompute]
        if ignored:
            err_console.print(f"note: --{', --'.join(k.replace('_', '-') for k in ignored)} does not apply to "
                              f"{spec.name} runs (ignored)", highlight=False)
        spec.summarize(run, cfg.updated(**overrides) if overrides else cfg, DistInfo())
    path = spec.report.render(run)
    if not quiet:
        spec.report.summary(run)
    typer.echo(f"report: {path}")
