"""Options of `gradsight curvature`."""

from __future__ import annotations

import math

from ...config import (Batching, EncodeOptions, LayerSelection, Objective, RunOptions, config,
                       csv_tuple, group, option)
from ...scopes import SCOPE_TYPES

__all__ = ["CurvatureConfig", "OPERATORS", "OBJECTIVE"]

OPERATORS = ("hessian", "ggn", "fisher_true", "fisher_mc", "fisher_empirical")
OBJECTIVE = "token-mean cross-entropy over all supervised tokens of the data set (pooled across examples)"


@config
class CurvatureConfig:
    """Options of `gradsight curvature` (Hessian / GGN / Fisher spectra, trace, density, stability).

    The objective is the token-mean cross-entropy over ALL supervised tokens of the (capped) data set,
    pooled across examples (`curvature.operators` "rows" convention). Scopes are parameter blocks made of
    the weights of the selected linear layers: the whole selection ("model"), each layer, each kind, each
    transformer block.
    """

    omit = ("flush_every",)  # every scope is committed as soon as it is done

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    batching: Batching = group(Batching, resume=False)
    objective: Objective = group(Objective)
    operator: str = option("hessian", "curvature matrix: hessian, ggn, fisher_true, fisher_mc, fisher_empirical",
                           choices=OPERATORS)
    method: str = option("double_backward", "product method: double_backward (reverse over reverse; GGN/Fisher: "
                                            "double-vjp) or forward_over_reverse (forward-mode AD)",
                         choices=("double_backward", "forward_over_reverse"))
    per: tuple[str, ...] = option(("model", "block"), "scopes: model, layer, kind, block (comma-separated)")
    top_k: int = option(5, "largest eigenvalues per scope (Lanczos)")
    bottom_k: int = option(0, "smallest eigenvalues per scope (same Krylov space; 0 = none)")
    tol: float = option(1e-4, "Lanczos stopping rule: residual <= tol * |eigenvalue| (eigenvalue error ~ tol^2)")
    max_iter: int | None = option(None, "maximum Lanczos products per scope (default min(dim, max(300, 20 k)))")
    n_products: int = option(99, "Hutch++ trace budget (products) per scope")
    trace_scopes: tuple[str, ...] = option(("model", "layer", "kind", "block"), "scope types with a Hutch++ trace")
    density_scopes: tuple[str, ...] = option(("model",), "scope types with an SLQ spectral density")
    n_probes: int = option(3, "SLQ probe vectors")
    n_steps: int = option(60, "SLQ Lanczos steps per probe")
    max_vectors: int | None = option(None, "SLQ: bound on stored Lanczos vectors (default: all, full "
                                           "re-orthogonalisation)")
    mc_samples: int = option(1, "fisher_mc: sampled labels per token")
    lr: float | None = option(None, "learning rate: report the stability numbers lr * lambda_max and lr * trace "
                                    "against 2")

    def __post_init__(self):
        for name in ("per", "density_scopes", "trace_scopes"):
            object.__setattr__(self, name, csv_tuple(getattr(self, name)))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"curvature needs dtype float32 or float64 (half-precision products overflow); "
                             f"got {self.dtype!r}")
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {', '.join(OPERATORS)}; got {self.operator!r}")
        if self.method not in ("double_backward", "forward_over_reverse"):
            raise ValueError(f"method must be double_backward or forward_over_reverse; got {self.method!r}")
        for name in ("per", "density_scopes", "trace_scopes"):
            bad = [s for s in getattr(self, name) if s not in SCOPE_TYPES]
            if bad:
                raise ValueError(f"{name}: unknown scope type {bad[0]!r}; expected some of {', '.join(SCOPE_TYPES)}")
        if not self.per:
            raise ValueError("per: choose at least one scope type (model, layer, kind, block)")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.bottom_k < 0:
            raise ValueError(f"bottom_k must be >= 0, got {self.bottom_k}")
        if not (self.tol > 0):
            raise ValueError(f"tol must be > 0, got {self.tol}")
        for name, lo in (("n_products", 3), ("n_probes", 1), ("n_steps", 1), ("mc_samples", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be at least {lo}, got {getattr(self, name)}")
        if self.max_iter is not None and self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.max_vectors is not None and self.max_vectors < 2:
            raise ValueError(f"max_vectors must be at least 2, got {self.max_vectors}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite learning rate > 0, got {self.lr!r}")
