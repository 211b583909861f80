"""`gradsight curvature`: Hessian / GGN / Fisher eigenvalues, trace, spectral density and stability per scope.

The command takes the `gradsight layers` options that matter here (data formats, models, layer selection,
batching; see `layers.py`) plus the curvature options below; its signature is assembled from both, as
`gradsight geometry` does.
"""

from __future__ import annotations

import inspect
import typing
from typing import Optional

import typer

from ..config import CurvatureConfig
from ._common import split_csv
from .layers import _print_summary_on_main, config_kwargs, layers

_H = {f: CurvatureConfig.__dataclass_fields__[f].metadata["help"] for f in CurvatureConfig.__dataclass_fields__}

# layers options without meaning for curvature (gradient spectra, group statistics, per-example losses)
NOT_SHARED = ("reference", "n_perm", "n_boot", "route", "erank_weights", "rel_tol", "flush_every", "reduction")


def _own(operator: str = typer.Option("hessian", help=_H["operator"]),
         method: str = typer.Option("double_backward", help=_H["method"]),
         per: str = typer.Option("model,block", help=_H["per"]),
         top_k: int = typer.Option(5, help=_H["top_k"]),
         bottom_k: int = typer.Option(0, help=_H["bottom_k"]),
         tol: float = typer.Option(1e-4, help=_H["tol"]),
         max_iter: Optional[int] = typer.Option(None, help=_H["max_iter"]),
         n_products: int = typer.Option(99, help=_H["n_products"]),
         trace_scopes: str = typer.Option("model,layer,kind,block", help=_H["trace_scopes"] + " (comma-separated)"),
         density_scopes: str = typer.Option("model", help=_H["density_scopes"] + " (comma-separated)"),
         n_probes: int = typer.Option(3, help=_H["n_probes"]),
         n_steps: int = typer.Option(60, help=_H["n_steps"]),
         max_vectors: Optional[int] = typer.Option(None, help=_H["max_vectors"]),
         mc_samples: int = typer.Option(1, help=_H["mc_samples"]),
         lr: Optional[float] = typer.Option(None, help=_H["lr"]),
         n_examples: Optional[int] = typer.Option(None, help=_H["n_examples"])):
    """The curvature-only options (their signature is merged into the command's)."""


def curvature(**kw):
    """Curvature of the loss: top/bottom eigenvalues (Lanczos), trace (Hutch++), spectral density (SLQ),
    spectral criteria and gradient-descent stability, for the whole layer selection and per block/kind/layer."""
    from ..curvature.pipeline import run_curvature

    out, quiet, no_report = kw.pop("out"), kw.pop("quiet"), kw.pop("no_report")
    own = {k: kw.pop(k) for k in inspect.signature(_own).parameters}
    own["per"] = split_csv(own["per"])
    own["density_scopes"] = split_csv(own["density_scopes"])
    own["trace_scopes"] = split_csv(own["trace_scopes"])
    cfg = CurvatureConfig(**config_kwargs(kw), **own)
    result = run_curvature(cfg, out, progress=not quiet, report=not no_report)
    _print_summary_on_main(result.path, quiet)


def _params(fn, skip=()):
    """fn's parameters with resolved annotations (typer reads the types to tell flags from options)."""
    hints = typing.get_type_hints(fn)
    return [p.replace(annotation=hints[name]) for name, p in inspect.signature(fn).parameters.items()
            if name not in skip]


curvature.__signature__ = inspect.Signature(_params(layers, NOT_SHARED) + _params(_own))
