"""Curvature of the loss: matrix-free Hessian, generalized Gauss-Newton and Fisher operators.

Algorithms (Lanczos, Hutchinson trace, spectral density) live in sibling modules and use only the
`CurvatureOperator` interface: `dim`, `dtype`, `device`, `n_products`, `matvec`, `matmat`, `dense`,
`params`, `flatten`, `unflatten`.
"""

from __future__ import annotations

from .operators import (
    LOSSES,
    CurvatureOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    causal_lm_forward,
    default_forward,
    select_params,
)

_PIPELINE = ("run_curvature", "curvature_of", "run_landscape", "summarize_curvature", "load_eigenvectors",
             "CurvatureResult", "LandscapeRunResult", "Scope", "lm_scopes", "module_scopes")


def __getattr__(name):  # the pipeline imports the data / model / store layers: load it on first use
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_PIPELINE,
    "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator",
    "select_params", "default_forward", "causal_lm_forward", "LOSSES",
]
