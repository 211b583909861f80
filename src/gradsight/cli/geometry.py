"""`gradsight geometry`: alignment, conflict, entanglement, diversity and noise of per-example gradients.

The command takes every option of `gradsight layers` (same data formats, models, layer selection and
batching; see `layers.py`) plus the geometry options below; its signature is assembled from both so the
shared options are declared once.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from ..config import GeometryConfig
from .layers import _print_summary_on_main, config_kwargs, layers

_H = {f: GeometryConfig.__dataclass_fields__[f].metadata["help"] for f in GeometryConfig.__dataclass_fields__}


def _own(r_in: int = typer.Option(16, help=_H["r_in"]),
         r_out: int = typer.Option(16, help=_H["r_out"]),
         r_dense: int = typer.Option(256, help=_H["r_dense"]),
         proj_kind: str = typer.Option("gaussian", help=_H["proj_kind"]),
         r_model: int = typer.Option(512, help=_H["r_model"]),
         feature_dtype: str = typer.Option("float32", help=_H["feature_dtype"]),
         exact: bool = typer.Option(False, "--exact", help=_H["exact"]),
         spectra: bool = typer.Option(True, help=_H["spectra"]),
         target: Optional[str] = typer.Option(None, help=_H["target"]),
         threshold: float = typer.Option(0.5, help=_H["threshold"]),
         lam: float = typer.Option(0.1, help=_H["lam"]),
         q: float = typer.Option(1.0, help=_H["q"])):
    """The geometry-only options (their signature is merged into the command's)."""


def geometry(**kw):
    """Gradient geometry: group / term alignment and conflict, entanglement of preference pairs, PSR/NSR of
    rewarded rollouts, G-Vendi diversity, gradient noise scale and a per-example score table."""
    from ..geometry import run_geometry

    out, quiet, no_report = kw.pop("out"), kw.pop("quiet"), kw.pop("no_report")
    own = {k: kw.pop(k) for k in inspect.signature(_own).parameters}
    cfg = GeometryConfig(**config_kwargs(kw), **own)
    result = run_geometry(cfg, out, progress=not quiet, report=not no_report)
    if not quiet:
        import os

        if os.environ.get("RANK", "0") == "0":
            from ..report import print_summary

            print_summary(result.path)


def _params(fn, skip=()):
    """fn's parameters with resolved annotations (typer reads the types to tell flags from options)."""
    hints = typing.get_type_hints(fn)
    return [p.replace(annotation=hints[name]) for name, p in inspect.signature(fn).parameters.items()
            if name not in skip]


geometry.__signature__ = inspect.Signature(_params(layers, ("reference", "n_perm")) + _params(_own))
