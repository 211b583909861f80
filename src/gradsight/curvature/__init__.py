"""Curvature of the loss: matrix-free Hessian, generalized Gauss-Newton and Fisher operators.

Math only (the `curvature` analysis that runs it lives in `gradsight.analyses.curvature`). Algorithms
(Lanczos, Hutchinson trace, spectral density, spectral criteria) live in sibling modules and use only the
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

__all__ = [
    "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator",
    "select_params", "default_forward", "causal_lm_forward", "LOSSES",
]
