"""Options of `gradsight landscape`."""

from __future__ import annotations

import numpy as np

from ...config import (Batching, EncodeOptions, LayerSelection, Objective, RunOptions, config, csv_tuple, group,
                       option)

__all__ = ["LandscapeConfig", "KINDS", "NORM_CHOICES"]

KINDS = ("random", "hessian", "interpolate", "pca", "gradient")
NORM_CHOICES = ("filter", "layer", "weight", "dfilter", "dlayer", "none")


@config
class LandscapeConfig:
    """Options of `gradsight landscape` (loss along 1-D slices / 2-D grids of the selected layers' weights).

    The loss is the curvature objective (token-mean over all supervised tokens, pooled), evaluated in eval
    mode at theta* + alpha d1 (+ beta d2); non-finite points are recorded as NaN.
    """

    omit = ("flush_every",)  # every chunk of points is committed as soon as it is done

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    batching: Batching = group(Batching, resume=False)
    objective: Objective = group(Objective)
    kind: str = option("random", "directions: random (filter-normalised Gaussian), hessian (top-2 eigenvectors of "
                                 "a curvature run, --from-curvature), interpolate (towards --to), pca (principal "
                                 "components of --trajectory), gradient (unit gradient; 2-D: plus a random axis)",
                       choices=KINDS)
    dims: int = option(2, "1 (slice) or 2 (grid)")
    steps: int = option(11, "points per axis")
    span: float = option(1.0, "alpha, beta range: [-span, span] (interpolate: t in [0, 1] widened by span - 1 "
                              "on both sides when span > 1)")
    from_curvature: str | None = option(None, "curvature run directory holding the eigenvectors (kind hessian)")
    to: str | None = option(None, "second model for kind interpolate (same architecture)")
    trajectory: tuple[str, ...] = option((), "kind pca: earlier checkpoints of the model in training order "
                                             "(comma-separated model specs; the model itself is the final point)")
    norm: str = option("filter", "random direction normalisation: filter, layer, weight, dfilter, dlayer, none",
                       choices=NORM_CHOICES)

    def __post_init__(self):
        object.__setattr__(self, "trajectory", csv_tuple(self.trajectory))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be random, hessian, interpolate, pca or gradient; got {self.kind!r}")
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {self.dims}")
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if not (self.span > 0):
            raise ValueError(f"span must be > 0, got {self.span}")
        if self.kind == "hessian" and not self.from_curvature:
            raise ValueError("kind hessian needs --from-curvature RUN (a curvature run with eigenvectors)")
        if self.kind == "interpolate" and not self.to:
            raise ValueError("kind interpolate needs --to MODEL (the other end of the segment)")
        if self.kind == "pca" and not self.trajectory:
            raise ValueError("kind pca needs --trajectory CKPT1,CKPT2,... (earlier checkpoints of the model)")
        if self.norm not in NORM_CHOICES:
            raise ValueError(f"norm must be filter, layer, weight, dfilter, dlayer or none; got {self.norm!r}")

    def axis(self):
        """The grid coordinates of one axis: steps points in [-span, span]."""
        return np.linspace(-self.span, self.span, self.steps)

    def ts(self):
        """Interpolation coefficients: steps points in [0, 1] (widened by span - 1 when span > 1), 0 and 1 kept."""
        lo, hi = (1 - self.span, self.span) if self.span > 1 else (0.0, 1.0)
        return np.union1d(np.linspace(lo, hi, self.steps), [0.0, 1.0])
