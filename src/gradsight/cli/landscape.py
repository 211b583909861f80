"""`gradsight landscape`: the loss on a 1-D slice or 2-D grid around the weights (random or Hessian axes), or
along the segment towards a second model. Shares the `gradsight layers` options like `curvature` does."""

from __future__ import annotations

import inspect
from typing import Optional

import typer

from ..config import LandscapeConfig
from ._common import split_csv
from .curvature import NOT_SHARED, _params
from .layers import _print_summary_on_main, config_kwargs, layers

_H = {f: LandscapeConfig.__dataclass_fields__[f].metadata["help"] for f in LandscapeConfig.__dataclass_fields__}


def _own(kind: str = typer.Option("random", help=_H["kind"]),
         dims: int = typer.Option(2, help=_H["dims"]),
         steps: int = typer.Option(11, help=_H["steps"]),
         span: float = typer.Option(1.0, help=_H["span"]),
         from_curvature: Optional[str] = typer.Option(None, help=_H["from_curvature"]),
         to: Optional[str] = typer.Option(None, help=_H["to"]),
         trajectory: Optional[str] = typer.Option(None, help=_H["trajectory"]),
         norm: str = typer.Option("filter", help=_H["norm"]),
         n_examples: Optional[int] = typer.Option(None, help=_H["n_examples"])):
    """The landscape-only options (merged into the command's signature)."""


def landscape(**kw):
    """Loss landscape: filter-normalised random directions, top Hessian eigenvectors of a curvature run
    (--kind hessian --from-curvature RUN), principal components of a checkpoint trajectory (--kind pca
    --trajectory A,B,...), the gradient direction (--kind gradient), or linear interpolation towards another
    model (--kind interpolate --to MODEL)."""
    from ..curvature.pipeline import run_landscape

    out, quiet, no_report = kw.pop("out"), kw.pop("quiet"), kw.pop("no_report")
    own = {k: kw.pop(k) for k in inspect.signature(_own).parameters}
    own["trajectory"] = split_csv(own["trajectory"] or "")
    cfg = LandscapeConfig(**config_kwargs(kw), **own)
    result = run_landscape(cfg, out, progress=not quiet, report=not no_report)
    _print_summary_on_main(result.path, quiet)


landscape.__signature__ = inspect.Signature(_params(layers, NOT_SHARED) + _params(_own))
