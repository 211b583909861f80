"""Loss-landscape slices: directions, 1-D / 2-D grids, checkpoint interpolation.

A slice evaluates the loss on a low-dimensional affine subspace through the trained parameters theta*:

    f(a)    = L(theta* + a d)                 1-D slice
    f(a, b) = L(theta* + a d1 + b d2)         2-D grid
    g(t)    = L((1 - t) theta_A + t theta_B)  linear interpolation between two checkpoints

- ``directions``: the directions d (each a ``Direction``: a list of tensors shaped like the chosen
  parameters, with names and metadata): ``random_direction`` (seeded, filter-normalised, Li et al. 2018),
  ``hessian_directions``, ``pca_directions``, ``gradient_direction``, ``target_direction``.
- ``evaluate``: the evaluation, in place and restored bit-exactly, sequential or vectorised with
  ``torch.func.vmap`` (``batch_points``): ``slice_1d``, ``grid_2d``, ``interpolate``, ``recompute_bn_stats``,
  with the losses in a ``LandscapeResult``; ``BatchLoss`` is the structured loss the vectorised path needs.

References:
    Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
    code github tomgoldstein/loss-landscape (``net_plotter.py``, ``projection.py``, ``evaluation.py``).
    Yao et al. PyHessian, 2020 (``Hessian_Tutorial.ipynb``: slices along Hessian eigenvectors).

Example:
    >>> loss = BatchLoss([(x, y)], torch.nn.functional.cross_entropy)
    >>> d1 = random_direction(model, seed=0)
    >>> d2 = random_direction(model, seed=1)
    >>> res = grid_2d(model, loss, d1, d2, np.linspace(-1, 1, 51), np.linspace(-1, 1, 51), batch_points=16)
    >>> res.frame.head()        # alpha, beta, loss, finite
    >>> res.to_array().shape    # (51, 51)
"""

from __future__ import annotations

from .directions import (
    NORMS,
    Direction,
    gradient_direction,
    hessian_directions,
    normalize_direction,
    pca_directions,
    random_direction,
    select_tensors,
    target_direction,
)
from .evaluate import (
    AUTO_CHUNK,
    AUTO_MAX_BYTES,
    AUTO_PROBE,
    BatchLoss,
    LandscapeResult,
    check_batch_points,
    coefficients,
    evaluate_points,
    grid_2d,
    interpolate,
    interpolation_barrier,
    recompute_bn_stats,
    slice_1d,
)

__all__ = [
    "Direction",
    "BatchLoss",
    "LandscapeResult",
    "select_tensors",
    "normalize_direction",
    "random_direction",
    "hessian_directions",
    "pca_directions",
    "gradient_direction",
    "target_direction",
    "slice_1d",
    "grid_2d",
    "interpolate",
    "recompute_bn_stats",
    "check_batch_points",
    "coefficients",
    "evaluate_points",
    "interpolation_barrier",
    "NORMS",
    "AUTO_PROBE",
    "AUTO_CHUNK",
    "AUTO_MAX_BYTES",
]
