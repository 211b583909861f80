"""Loss-landscape slices: directions, 1-D / 2-D grids, checkpoint interpolation, spectral criteria.

A slice evaluates the loss on a low-dimensional affine subspace through the trained parameters theta*:

    f(a)    = L(theta* + a d)                 1-D slice
    f(a, b) = L(theta* + a d1 + b d2)         2-D grid
    g(t)    = L((1 - t) theta_A + t theta_B)  linear interpolation between two checkpoints

Directions (each a ``Direction``: a list of tensors shaped like the chosen parameters, with names and
metadata):

- ``random_direction``: d ~ N(0, I), seeded, then normalised (Li et al. 2018). ``norm="filter"`` rescales
  every filter (slice along dim 0: a conv output channel, a row of a linear weight) to the norm of the
  matching filter of theta*:  d[k] <- d[k] * ||theta*[k]|| / (||d[k]|| + 1e-10). Also "layer" (one factor
  per tensor), "weight" (d <- d * theta*), "dfilter" / "dlayer" (unit norm per filter / tensor), None.
  1-D tensors (biases, norm-layer gains/shifts): zero with ``ignore="biasbn"``; otherwise d = theta*
  (the reference code's choice: a proportional rescaling of that tensor).
- ``hessian_directions``: caller-supplied eigenvectors (flat or per-tensor), unflattened and unit-normed.
- ``pca_directions``: top principal components of a checkpoint trajectory (theta_i - theta_final).
- ``gradient_direction``: the (normalised) gradient of a supplied differentiable loss.
- ``target_direction``: theta_B - theta_A, unnormalised.

Evaluation never deep-copies the model: each grid point is written in place as theta* + a d1 + b d2 from a
saved copy of theta* (never accumulated, so there is no drift), and the saved copy is written back at the
end, bit-exactly, even on error. ``batch_points > 1`` with a ``BatchLoss`` evaluates several grid points in
one ``torch.func.vmap`` over ``functional_call``; if that fails for a model (data-dependent control flow,
``.item()``, ...) the run falls back to the sequential in-place path and records why; ``batch_points="auto"``
times both paths on the first points and keeps the faster. Both paths build the
perturbed tensors with the same expression, so they differ only by the forward's floating-point order.

Conventions:

- The model is evaluated in eval mode (BatchNorm uses running statistics, dropout is off). A model in
  train mode is switched to eval for the evaluation (with a warning when it holds BatchNorm or dropout)
  and switched back afterwards; ``meta["switched_from_train"]`` records it.
- BatchNorm: with parameter ("weights") directions the running statistics stay at theta*'s values
  (``meta["bn"] = "stale"``); ``recompute_bn=loader`` recomputes them at every point (cumulative average
  over the loader in train mode, no gradient) and restores the originals at the end (``"recomputed"``).
- Losses are Python floats; a non-finite loss is recorded as NaN with ``finite = False`` and counted in
  ``meta["n_nonfinite"]``, never raised.
- Direction arithmetic runs in float32 (float64 for float64 parameters); norms in float64.

References:
    Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
    code github tomgoldstein/loss-landscape (``net_plotter.py``, ``projection.py``, ``evaluation.py``).
    Yao et al. PyHessian, 2020 (``Hessian_Tutorial.ipynb``: slices along Hessian eigenvectors).
    Gabdullin. "Investigating generalization capabilities of neural networks by means of loss landscapes
    and Hessian analysis" (LLA), arXiv 2412.10146 (Hessian spectral criteria; see ``spectral_criteria``).

Example:
    >>> loss = BatchLoss([(x, y)], torch.nn.functional.cross_entropy)
    >>> d1 = random_direction(model, seed=0)
    >>> d2 = random_direction(model, seed=1)
    >>> res = grid_2d(model, loss, d1, d2, np.linspace(-1, 1, 51), np.linspace(-1, 1, 51), batch_points=16)
    >>> res.frame.head()        # alpha, beta, loss, finite
    >>> res.to_array().shape    # (51, 51)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

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
    "spectral_criteria",
]

NORMS = ("filter", "layer", "weight", "dfilter", "dlayer", None)
_EPS = 1e-10  # the reference code's guard in d[k] * ||w[k]|| / (||d[k]|| + eps)
_BN = nn.modules.batchnorm._BatchNorm
_STOCHASTIC = (_BN, nn.modules.dropout._DropoutNd)


# ---------------------------------------------------------------------------------------------- containers


class Direction(list):
    """A direction in parameter space: a list of tensors shaped like the chosen model tensors.

    Attributes:
        names: the model tensor names (``state_dict`` keys) the entries belong to, or None when unknown;
            an unnamed direction is matched to the model's trainable parameters in order, by shape.
        meta: how it was made (kind, seed, norm, ignore, eigenvalue, explained variance, ...).
    """

    def __init__(self, tensors: Iterable[torch.Tensor], names: Sequence[str] | None = None, **meta):
        super().__init__(tensors)
        self.names = None if names is None else tuple(names)
        if self.names is not None and len(self.names) != len(self):
            raise ValueError(f"{len(self.names)} names for {len(self)} tensors")
        self.meta = dict(meta)

    def flat(self) -> torch.Tensor:
        """All entries concatenated into one 1-D tensor."""
        return torch.cat([d.reshape(-1) for d in self])

    def norm(self) -> float:
        """Global Euclidean norm (float64)."""
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self))


def _batch_size(batch) -> int:
    """Leading size of the batch's first tensor (1 if it has none or it is a scalar)."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for x in items:
        if torch.is_tensor(x):
            return int(x.shape[0]) if x.dim() else 1
    return 1


@dataclass
class BatchLoss:
    """Sample-weighted mean loss over a fixed list of batches; usable as ``loss_fn(model) -> float``.

    Being structured (data + criterion) rather than an opaque callable, it can also be evaluated
    functionally, which is what the vectorised (vmap) grid path needs.

    Batch forms:
        ``(inputs, target)``: ``criterion(model(inputs), target)``.
        ``dict``: ``out = model(**batch)``; the loss is ``out.loss`` (Hugging Face, labels in the dict) when
            ``criterion`` is None, else ``criterion(out, batch)``.

    Reduction: ``criterion`` must return the mean over its batch; batches are combined as
    sum_b n_b L_b / sum_b n_b with n_b the leading size of the batch's first tensor (the reference
    ``evaluation.py`` convention). For token-mean LM losses this weights sequences, not tokens.
    """

    batches: Sequence
    criterion: Callable | None = None

    def __call__(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.value(model))

    def value(self, forward: Callable) -> torch.Tensor:
        """The weighted loss as a 0-dim tensor; ``forward(*args, **kwargs)`` runs the model."""
        total, n = 0.0, 0
        for batch in self.batches:
            n_b = _batch_size(batch)
            total = total + n_b * self._one(forward, batch)
            n += n_b
        if n == 0:
            raise ValueError("BatchLoss has no batches")
        return total / n

    def _one(self, forward, batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            out = forward(**batch)
            return out.loss if self.criterion is None else self.criterion(out, batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            if self.criterion is None:
                raise ValueError("an (inputs, target) batch needs a criterion")
            return self.criterion(forward(batch[0]), batch[1])
        raise TypeError(f"unsupported batch type {type(batch).__name__}: use (inputs, target) or a dict")


@dataclass
class LandscapeResult:
    """A tidy table of losses plus the metadata needed to reproduce and interpret it.

    ``frame`` columns: ``alpha`` (``t`` for interpolation), ``beta`` (2-D grids only), ``loss`` (NaN where
    non-finite), ``finite``. Rows of a 2-D grid are alpha-major.
    """

    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def n_nonfinite(self) -> int:
        return int((~self.frame["finite"]).sum())

    def to_array(self) -> np.ndarray:
        """Losses as (len(alphas),) for a slice or (len(alphas), len(betas)) for a grid."""
        loss = self.frame["loss"].to_numpy()
        if "beta" in self.frame:
            return loss.reshape(self.frame["alpha"].nunique(), self.frame["beta"].nunique())
        return loss


# --------------------------------------------------------------------------------------------- selection


def select_tensors(model: nn.Module, names: Sequence[str] | None = None, *, states: bool = False):
    """The live model tensors a direction acts on, as a list of (name, tensor).

    Args:
        model: the module.
        names: explicit ``state_dict`` keys (parameters or buffers); overrides ``states``.
        states: False (default, "weights"): every parameter with ``requires_grad``; True ("states"): every
            floating-point ``state_dict`` entry, which adds BatchNorm running statistics.

    Returns:
        list of (name, tensor); the tensors are the model's own (writing to them changes the model).
        Tied tensors appear once.
    """
    live = model.state_dict(keep_vars=True)
    if names is not None:
        missing = [n for n in names if n not in live]
        if missing:
            raise KeyError(f"not in the model's state_dict: {missing[:5]}")
        return [(n, live[n]) for n in names]
    if states:
        out, seen = [], set()
        for n, t in live.items():
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                out.append((n, t))
        return out
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _layout(like) -> tuple[list[str] | None, list[torch.Size], list[torch.Tensor] | None]:
    """(names or None, shapes, reference tensors or None) from a model / named list / tensor list / state_dict."""
    if isinstance(like, nn.Module):
        named = select_tensors(like)
        return [n for n, _ in named], [t.shape for _, t in named], [t for _, t in named]
    if isinstance(like, Mapping):
        items = [(n, t) for n, t in like.items() if torch.is_tensor(t) and t.is_floating_point()]
        return [n for n, _ in items], [t.shape for _, t in items], [t for _, t in items]
    like = list(like)
    if like and isinstance(like[0], tuple):
        return [n for n, _ in like], [t.shape for _, t in like], [t for _, t in like]
    return None, [t.shape for t in like], list(like)


def _unflatten(v: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    if v.numel() != sum(sizes):
        raise ValueError(f"flat vector has {v.numel()} entries, the parameters {sum(sizes)}")
    return [c.reshape(s) for c, s in zip(torch.split(v.reshape(-1), sizes), shapes)]


def _resolve(model: nn.Module, direction: Sequence[torch.Tensor]):
    """The live tensors a direction applies to (by name, or by order + shape for unnamed directions)."""
    names = getattr(direction, "names", None)
    named = select_tensors(model, names)
    if len(named) != len(direction):
        raise ValueError(f"direction has {len(direction)} tensors, the model selection {len(named)}")
    for (n, t), d in zip(named, direction):
        if t.shape != d.shape:
            raise ValueError(f"direction shape {tuple(d.shape)} does not match {n} {tuple(t.shape)}")
    return named


# -------------------------------------------------------------------------------------------- directions


def _filter_norms(x: torch.Tensor) -> torch.Tensor:
    """Norm of every slice along dim 0, shaped to broadcast against x (float64)."""
    return x.double().reshape(x.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))


def normalize_direction(direction: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], *,
                        norm: str | None = "filter", ignore: str | None = "biasbn") -> list[torch.Tensor]:
    """Rescale a raw direction against the weights, tensor by tensor (pure: returns new tensors).

    For tensors with >= 2 dims (filters k = slices along dim 0):
        "filter":  d[k] * ||w[k]|| / (||d[k]|| + 1e-10)        "dfilter": d[k] / (||d[k]|| + 1e-10)
        "layer":   d * ||w|| / ||d||                           "dlayer":  d / ||d||
        "weight":  d * w                                       None:      d unchanged
    For 1-D tensors (biases, norm-layer parameters, running statistics): zero with ``ignore="biasbn"``,
    else d = w (reference code, ``normalize_directions_for_weights``), whatever ``norm`` is.

    Args:
        direction: raw direction tensors.
        weights: matching tensors of theta*.
        norm, ignore: as above.

    Returns:
        list of tensors in the direction's dtype.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if ignore not in (None, "biasbn"):
        raise ValueError(f"ignore must be None or 'biasbn', got {ignore!r}")
    out = []
    for d, w in zip(direction, weights):
        w = w.detach()
        if d.dim() <= 1:
            out.append(torch.zeros_like(d) if ignore == "biasbn" else w.to(d.dtype).clone())
            continue
        if norm == "filter":
            s = _filter_norms(w) / (_filter_norms(d) + _EPS)
        elif norm == "dfilter":
            s = 1.0 / (_filter_norms(d) + _EPS)
        elif norm == "layer":
            s = torch.tensor(float(w.double().norm()) / float(d.double().norm()), dtype=torch.float64)
        elif norm == "dlayer":
            s = torch.tensor(1.0 / float(d.double().norm()), dtype=torch.float64)
        elif norm == "weight":
            out.append(d * w.to(d.dtype))
            continue
        else:
            out.append(d.clone())
            continue
        out.append((d.double() * s.to(d.device)).to(d.dtype))
    return out


def random_direction(model: nn.Module, *, seed: int = 0, norm: str | None = "filter",
                     ignore: str | None = "biasbn", states: bool = False,
                     names: Sequence[str] | None = None) -> Direction:
    """A seeded Gaussian direction, normalised against the model's current weights (Li et al. 2018).

    Args:
        model: provides theta* and the shapes.
        seed: seeds a CPU ``torch.Generator`` (device-independent draws), one draw per tensor in order.
        norm: "filter" (paper default), "layer", "weight", "dfilter", "dlayer" or None.
        ignore: "biasbn" (the published commands' choice) zeroes every 1-D tensor; None sets it to theta*.
        states: also perturb floating buffers (BatchNorm running statistics), the reference "states" type.
        names: explicit tensor names instead of the default selection.

    Returns:
        a ``Direction`` (meta: kind="random", seed, norm, ignore, states).

    Example:
        >>> d1, d2 = random_direction(net, seed=0), random_direction(net, seed=1)
    """
    named = select_tensors(model, names, states=states)
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(t.shape, generator=g, dtype=_work_dtype(t)).to(t.device) for _, t in named]
    d = normalize_direction(raw, [t for _, t in named], norm=norm, ignore=ignore)
    return Direction(d, [n for n, _ in named], kind="random", seed=seed, norm=norm, ignore=ignore,
                     states=states)


def hessian_directions(params, vectors, *, eigenvalues: Sequence[float] | None = None,
                       normalize: bool = True) -> list[Direction]:
    """Directions from caller-supplied (Hessian) eigenvectors: d_i = v_i / ||v_i||, no filter normalisation.

    Args:
        params: what the vectors are laid out like: a model (its trainable parameters in order), a list of
            (name, tensor) such as ``list(model.named_parameters())``, a list of tensors, or a state_dict.
        vectors: a sequence of flat vectors (P,) or of per-tensor lists, or a (k, P) tensor.
        eigenvalues: optional matching eigenvalues, stored in ``meta["eigenvalue"]``.
        normalize: rescale each to unit global norm (eigensolvers already return unit vectors; this guards
            against solvers that do not).

    Returns:
        list of ``Direction`` (meta: kind="hessian", index, eigenvalue).

    Note: eigenvector axes are not scale-corrected; do not compare such plots across models whose weight
    norms differ (METHODS section 10).
    """
    names, shapes, refs = _layout(params)
    if torch.is_tensor(vectors) and vectors.dim() == 2:
        vectors = list(vectors)
    out = []
    for i, v in enumerate(vectors):
        parts = _unflatten(v.detach(), shapes) if torch.is_tensor(v) else [t.detach() for t in v]
        parts = [p.to(dtype=_work_dtype(p), device=r.device) for p, r in zip(parts, refs)]
        if normalize:
            n = math.sqrt(sum(float(p.double().pow(2).sum()) for p in parts))
            parts = [p / n for p in parts]
        lam = None if eigenvalues is None else float(eigenvalues[i])
        out.append(Direction(parts, names, kind="hessian", index=i, eigenvalue=lam, norm=None))
    return out


def pca_directions(trajectory: Sequence, *, final=None, like=None, k: int = 2, center: bool = True,
                   ignore: str | None = None) -> tuple[list[Direction], dict]:
    """Top-k principal components of a checkpoint trajectory around the final point.

    Rows of the data matrix are x_i = theta_i - theta_final for every checkpoint except the final one;
    with ``center=True`` (the reference code, which fits ``sklearn.decomposition.PCA``) the rows are
    centred before the SVD. Directions are the unit-norm right singular vectors; explained variance ratio
    s_i^2 / sum_j s_j^2 (over all components).

    Args:
        trajectory: list of state_dicts or of flat vectors, in training order.
        final: theta_final (same form); default ``trajectory[-1]`` (then excluded from the rows).
        like: layout to unflatten flat vectors (model / named list / tensor list), or the model whose
            trainable parameter names select the state_dict entries; default: every floating entry of a
            state_dict, or a single flat tensor for flat vectors.
        k: number of components.
        center: subtract the mean row (reference behaviour) or not (uncentred SVD).
        ignore: "biasbn" zeroes 1-D entries of every row before the decomposition (reference option).

    Returns:
        (directions, info): ``info`` has "explained_variance_ratio" (k,), "singular_values" (k,) and
        "coords", a DataFrame (step, alpha, beta, ...) projecting every checkpoint onto the directions.
    """
    traj = list(trajectory)
    if final is None:
        traj, final = traj[:-1], traj[-1]
    if not traj:
        raise ValueError("the trajectory needs at least one checkpoint besides the final one")

    if isinstance(final, Mapping):
        if isinstance(like, nn.Module):
            names = [n for n, _ in select_tensors(like)]
        else:
            names = _layout(final if like is None else like)[0]
        shapes = [final[n].shape for n in names]
        dtype = _work_dtype(final[names[0]])

        def flat(s):
            return torch.cat([s[n].detach().reshape(-1).double().cpu() for n in names])
    else:
        names, shapes, _ = _layout(like) if like is not None else (None, [final.shape], None)
        dtype = _work_dtype(final if torch.is_tensor(final) else final[0])

        def flat(v):
            v = torch.cat([t.reshape(-1) for t in v]) if not torch.is_tensor(v) else v
            return v.detach().reshape(-1).double().cpu()

    theta_f = flat(final)
    X = torch.stack([flat(s) - theta_f for s in traj])  # (n, P)
    if ignore == "biasbn":
        mask = torch.cat([torch.full((math.prod(s),), len(s) > 1) for s in shapes])
        X = X * mask
    Xc = X - X.mean(0, keepdim=True) if center else X
    # n << P: eigen-decompose the n x n Gram matrix instead of the n x P matrix
    evals, U = torch.linalg.eigh(Xc @ Xc.T)  # ascending
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    k = min(k, int((evals > evals[0] * 1e-12).sum()) if evals[0] > 0 else 0)
    if k == 0:
        raise ValueError("the trajectory does not move: no principal direction")
    s = evals[:k].sqrt()
    V = (Xc.T @ U[:, :k]) / s  # (P, k) orthonormal
    total = float(evals.sum())
    ratio = [float(e) / total for e in evals[:k]]
    dirs = []
    for i in range(k):
        parts = _unflatten(V[:, i].to(dtype), shapes)
        dirs.append(Direction(parts, names, kind="pca", index=i, explained_variance_ratio=ratio[i],
                              center=center, ignore=ignore, norm=None))
    coords = (torch.cat([X, torch.zeros(1, X.shape[1], dtype=X.dtype)]) @ V).numpy()  # (n + 1, k)
    cols = ["alpha", "beta"] + [f"c{i}" for i in range(2, k)]
    frame = pd.DataFrame(coords, columns=cols[:k])
    frame.insert(0, "step", np.arange(len(frame)))
    info = {"explained_variance_ratio": ratio, "singular_values": s.tolist(), "coords": frame}
    return dirs, info


def gradient_direction(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], *,
                       norm: str | None = "unit", ignore: str | None = None,
                       names: Sequence[str] | None = None) -> Direction:
    """The gradient of a differentiable loss as a direction (ascent: the loss rises for alpha > 0).

    Args:
        model: the module at theta*; evaluated in eval mode like the slices.
        loss: ``loss(model) -> scalar tensor`` (differentiable; not a float).
        norm: "unit" divides by the global gradient norm (PyHessian tutorial); any ``normalize_direction``
            norm ("filter", ...) rescales per filter instead; None keeps the raw gradient.
        ignore: passed to ``normalize_direction`` for the per-filter norms.
        names: explicit parameter names (default: every trainable parameter).

    Returns:
        a ``Direction`` (meta: kind="gradient", grad_norm, norm).
    """
    named = select_tensors(model, names)
    with _eval_mode(model) as switched:
        value = loss(model)
        grads = torch.autograd.grad(value, [t for _, t in named], allow_unused=True)
    g = [torch.zeros_like(t) if gi is None else gi.detach().to(_work_dtype(t)) for (_, t), gi in zip(named, grads)]
    gn = math.sqrt(sum(float(x.double().pow(2).sum()) for x in g))
    if norm == "unit":
        g = [x / gn for x in g] if gn > 0 else g
    elif norm is not None:
        g = normalize_direction(g, [t for _, t in named], norm=norm, ignore=ignore)
    return Direction(g, [n for n, _ in named], kind="gradient", grad_norm=gn, norm=norm,
                     switched_from_train=switched)


def target_direction(state_a: Mapping, state_b: Mapping, names: Sequence[str] | None = None) -> Direction:
    """d = theta_B - theta_A over floating state_dict entries (BN statistics included), unnormalised."""
    names = list(names) if names is not None else [n for n, t in state_a.items() if t.is_floating_point()]
    d = [(state_b[n].detach().to(_work_dtype(state_a[n])) - state_a[n].detach().to(_work_dtype(state_a[n])))
         for n in names]
    return Direction(d, names, kind="target", norm=None)


# -------------------------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the duration; yields whether the model had to be switched from train mode."""
    was_training = model.training
    if was_training and any(isinstance(m, _STOCHASTIC) for m in model.modules()):
        warnings.warn("model is in train mode with BatchNorm/dropout; the landscape is evaluated in eval "
                      "mode (recorded as meta['switched_from_train'])", stacklevel=3)
    model.eval()
    try:
        yield was_training
    finally:
        model.train(was_training)


def _points(t0: torch.Tensor, ds: Sequence[torch.Tensor], C: torch.Tensor) -> torch.Tensor:
    """theta* + sum_j C[:, j] d_j for a chunk of G points: (G, *t0.shape) in the work dtype.

    Shared by the sequential and vectorised paths so that both write bit-identical parameters.
    """
    view = (-1,) + (1,) * t0.dim()
    x = t0.to(ds[0].dtype).unsqueeze(0)  # (1, *shape)
    for j, d in enumerate(ds):
        x = x + C[:, j].to(d.dtype).view(view) * d.unsqueeze(0)  # (G, *shape)
    return x


def _finite(v) -> float:
    v = float(v)
    return v if math.isfinite(v) else math.nan


AUTO_PROBE = 4   # batch_points="auto": sequential points timed first,
AUTO_CHUNK = 32  # then one vectorised chunk of this many points; the faster path does the rest;
AUTO_MAX_BYTES = 1 << 29  # the chunk's stacked perturbed parameters stay under 512 MB (fewer points if needed)


def check_batch_points(batch_points) -> None:
    """A positive integer or "auto", else a ValueError naming the value."""
    if batch_points != "auto" and not (isinstance(batch_points, int) and batch_points >= 1):
        raise ValueError(f"batch_points must be a positive integer or 'auto', got {batch_points!r}")


def _evaluate(model, loss_fn, directions, C: torch.Tensor, *, batch_points: int | str, recompute_bn) -> tuple:
    """Losses at theta* + C @ directions for every row of C (N, k); returns (losses (N,), meta)."""
    check_batch_points(batch_points)
    named_lists = [_resolve(model, d) for d in directions]
    names = [n for n, _ in named_lists[0]]
    for nl in named_lists[1:]:
        if [n for n, _ in nl] != names:
            raise ValueError("directions must cover the same tensors in the same order")
    live = [t for _, t in named_lists[0]]
    dirs = [[d.to(device=t.device) for d, t in zip(direction, live)] for direction in directions]
    per_tensor = list(zip(*dirs))  # per tensor: (d_1, ..., d_k)
    theta0 = [t.detach().clone() for t in live]
    buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()} if recompute_bn is not None else {}

    meta: dict[str, Any] = {"path": "sequential", "batch_points": batch_points, "fallback_reason": None,
                            "bn": "recomputed" if recompute_bn is not None else "stale",
                            "n_tensors": len(live), "n_elements": sum(t.numel() for t in live),
                            "dtype": str(live[0].dtype) if live else None}
    losses = np.full(len(C), np.nan)

    def sequential(lo: int, hi: int) -> None:
        with torch.no_grad():
            for i in range(lo, hi):
                for t, t0, ds in zip(live, theta0, per_tensor):
                    t.copy_(_points(t0, ds, C[i:i + 1])[0])
                if recompute_bn is not None:
                    recompute_bn_stats(model, recompute_bn)
                losses[i] = _finite(loss_fn(model))
            for t, t0 in zip(live, theta0):  # back at theta* (the vmap path reads the live tensors)
                t.copy_(t0)

    auto = batch_points == "auto"
    per_point = sum(t.numel() * t.element_size() for t in live)
    G = min(AUTO_CHUNK, AUTO_MAX_BYTES // max(per_point, 1)) if auto else int(batch_points)
    done = 0
    try:
        with _eval_mode(model) as switched:
            meta["switched_from_train"] = switched
            meta["mode"] = "eval"
            if G > 1 and recompute_bn is None and isinstance(loss_fn, BatchLoss):
                if auto and len(C) > AUTO_PROBE + G:
                    # time both paths on the first points and keep the faster (both give the same values)
                    t = time.perf_counter()
                    sequential(0, AUTO_PROBE)
                    t_seq = (time.perf_counter() - t) / AUTO_PROBE
                    t = time.perf_counter()
                    done = _vmap_points(model, loss_fn, names, theta0, per_tensor, C, G, losses, meta,
                                        start=AUTO_PROBE, stop=AUTO_PROBE + G)
                    t_vec = (time.perf_counter() - t) / G
                    meta["auto"] = {"sequential_s_per_point": t_seq, "vmap_s_per_point": t_vec}
                    if done > AUTO_PROBE and t_vec < t_seq:
                        done = _vmap_points(model, loss_fn, names, theta0, per_tensor, C, G, losses, meta,
                                            start=done)
                        meta["path"] = "vmap"
                else:
                    done = _vmap_points(model, loss_fn, names, theta0, per_tensor, C, G, losses, meta)
                    meta["path"] = "vmap" if done == len(C) else "sequential"
            elif G > 1:
                meta["fallback_reason"] = ("recompute_bn needs the sequential path" if recompute_bn is not None
                                           else "loss_fn is not a BatchLoss")
            elif auto:
                meta["fallback_reason"] = "auto: the perturbed tensors are too large to stack (sequential)"
            sequential(done, len(C))
    finally:
        with torch.no_grad():
            for t, t0 in zip(live, theta0):
                t.copy_(t0)
            for n, b in model.named_buffers():
                if n in buffers0:
                    b.copy_(buffers0[n])
    meta["n_points"] = len(C)
    meta["n_nonfinite"] = int(np.isnan(losses).sum())
    return losses, meta


def _vmap_points(model, loss_fn: BatchLoss, names, theta0, per_tensor, C, G, losses, meta, start: int = 0,
                 stop: int | None = None) -> int:
    """Vectorised evaluation of points start..stop-1 of C in chunks of G; returns the index after the last point
    it evaluated (start on fallback). The live parameters must hold theta* (they are read as the base)."""
    from torch.func import functional_call, vmap

    stop = len(C) if stop is None else stop
    base = {n: t.detach() for n, t in model.named_parameters()}
    base.update({n: b.detach() for n, b in model.named_buffers()})

    def point_loss(*perturbed):
        state = dict(base)
        state.update(zip(names, perturbed))
        return loss_fn.value(lambda *a, **kw: functional_call(model, state, a, kw))

    batched = vmap(point_loss)
    with torch.no_grad():
        for s in range(start, stop, G):
            e = min(s + G, stop)
            stacked = [_points(t0, ds, C[s:e]).to(t0.dtype) for t0, ds in zip(theta0, per_tensor)]
            try:
                out = batched(*stacked)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                if s > start:
                    raise
                meta["fallback_reason"] = f"vmap failed: {type(err).__name__}: {err}"[:500]
                warnings.warn(f"vectorised grid evaluation failed, using the sequential path ({err})",
                              stacklevel=4)
                return start
            v = out.detach().double().cpu().numpy()
            losses[s:e] = np.where(np.isfinite(v), v, np.nan)
    return stop


def _coeffs(*axes, dtype=torch.float64) -> torch.Tensor:
    mesh = torch.meshgrid(*[torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in axes], indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1).to(dtype)  # (N, k), first axis slowest


def slice_1d(model: nn.Module, loss_fn: Callable[[nn.Module], float], direction: Sequence[torch.Tensor],
             alphas, *, batch_points: int | str = 1, recompute_bn=None) -> LandscapeResult:
    """f(a) = L(theta* + a d) at every a in ``alphas``.

    Args:
        model: the module at theta*; restored bit-exactly afterwards.
        loss_fn: ``loss_fn(model) -> float`` over a fixed set of batches (a ``BatchLoss`` enables the
            vectorised path); called under ``torch.no_grad()`` in eval mode.
        direction: a ``Direction`` (or plain list matching the trainable parameters).
        alphas: 1-D grid.
        batch_points: grid points per vectorised call (1 = sequential in-place path), or "auto": time 4
            sequential points and one vectorised chunk of up to 32, then finish with the faster path (on a CPU the
            vectorised path wins when a point is cheap, e.g. few rows, and loses for large batches or
            convolutions; ``meta["auto"]`` holds the timings). Grids of at most 36 points go straight to one
            vectorised chunk.
        recompute_bn: a loader; recompute BatchNorm statistics at every point (sequential).

    Returns:
        ``LandscapeResult`` with columns alpha, loss, finite.
    """
    C = _coeffs(alphas)
    losses, meta = _evaluate(model, loss_fn, [direction], C, batch_points=batch_points,
                             recompute_bn=recompute_bn)
    frame = pd.DataFrame({"alpha": C[:, 0].numpy(), "loss": losses, "finite": np.isfinite(losses)})
    meta.update(kind="slice_1d", directions=[dict(getattr(direction, "meta", {}))])
    return LandscapeResult(frame, meta)


def grid_2d(model: nn.Module, loss_fn: Callable[[nn.Module], float], d1: Sequence[torch.Tensor],
            d2: Sequence[torch.Tensor], alphas, betas, *, batch_points: int | str = 1,
            recompute_bn=None) -> LandscapeResult:
    """f(a, b) = L(theta* + a d1 + b d2) on the grid alphas x betas.

    Args: as ``slice_1d``, with two directions (not orthogonalised: in high dimension independent random
    directions are nearly orthogonal, and the paper does not orthogonalise).

    Returns:
        ``LandscapeResult`` with columns alpha, beta, loss, finite (alpha-major); ``to_array()`` gives the
        (len(alphas), len(betas)) surface.
    """
    C = _coeffs(alphas, betas)
    losses, meta = _evaluate(model, loss_fn, [d1, d2], C, batch_points=batch_points, recompute_bn=recompute_bn)
    frame = pd.DataFrame({"alpha": C[:, 0].numpy(), "beta": C[:, 1].numpy(), "loss": losses,
                          "finite": np.isfinite(losses)})
    meta.update(kind="grid_2d", directions=[dict(getattr(d, "meta", {})) for d in (d1, d2)])
    return LandscapeResult(frame, meta)


# ---------------------------------------------------------------------------------- BatchNorm, interpolation


def _forward_batch(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def recompute_bn_stats(model: nn.Module, loader: Iterable, *, forward: Callable | None = None,
                       max_batches: int | None = None) -> int:
    """Recompute BatchNorm running statistics at the current parameters; leaves the model in eval mode.

    Every BatchNorm layer with running statistics is reset, its momentum set to None (cumulative average
    over the batches seen), and the loader is run through the model in train mode without gradient; the
    momenta are then restored. Equivalent to ``torch.optim.swa_utils.update_bn``, plus dict batches.

    Args:
        model: the module.
        loader: iterable of batches: a tensor, an (inputs, ...) tuple (first element fed), or a dict of kwargs.
        forward: optional ``forward(model, batch)`` to override how a batch is fed.
        max_batches: stop after this many batches.

    Returns:
        the number of batches used (0 when the model has no BatchNorm layer with running statistics).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    n = 0
    model.train()
    try:
        with torch.no_grad():
            for batch in loader:
                if max_batches is not None and n >= max_batches:
                    break
                (forward or _forward_batch)(model, batch)
                n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return n


def interpolate(model: nn.Module, state_a: Mapping, state_b: Mapping, loss_fn: Callable[[nn.Module], float],
                ts, *, recompute_bn=None, recompute_endpoints: bool = True) -> LandscapeResult:
    """g(t) = L((1 - t) theta_A + t theta_B) along the segment between two checkpoints (mode connectivity).

    Every floating ``state_dict`` entry is interpolated (BN running statistics included, the reference
    "states" interpolation); integer entries (``num_batches_tracked``) come from A for t < 1 and from B at
    t = 1. At t = 0 and t = 1 the checkpoint tensors are written unchanged, so the endpoints reproduce the
    checkpoints' own losses exactly. The model's original state is restored bit-exactly at the end.

    Args:
        model: a module with the checkpoints' architecture (its state is restored afterwards).
        state_a, state_b: state_dicts with the same keys.
        loss_fn: ``loss_fn(model) -> float``, evaluated in eval mode under ``torch.no_grad()``.
        ts: interpolation coefficients (values outside [0, 1] extrapolate).
        recompute_bn: a loader; recompute BatchNorm statistics at every point (reset, cumulative average
            over the loader in train mode, then eval) instead of interpolating them.
        recompute_endpoints: with ``recompute_bn``, also recompute at t = 0 and 1 (a consistent curve;
            endpoints then equal the checkpoint losses only if the checkpoints' statistics were themselves
            recomputed on the same loader). False keeps the checkpoints' own statistics there.

    Returns:
        ``LandscapeResult`` with columns t, loss, finite; ``meta["barrier"]`` = max_t [g(t) -
        ((1 - t) g(0) + t g(1))] over finite points when both endpoints are in ``ts``.
    """
    if set(state_a) != set(state_b):
        raise KeyError("state_a and state_b have different keys")
    live = model.state_dict(keep_vars=True)
    keys = [k for k in state_a if k in live]
    missing = [k for k in live if k not in state_a]
    if missing:
        raise KeyError(f"model entries missing from the checkpoints: {missing[:5]}")
    saved = {k: t.detach().clone() for k, t in live.items()}
    ts = np.asarray(ts, dtype=np.float64)
    losses = np.full(len(ts), np.nan)
    try:
        with _eval_mode(model) as switched, torch.no_grad():
            for i, t in enumerate(ts):
                for k in keys:
                    a, b, dst = state_a[k], state_b[k], live[k]
                    if t == 0 or not dst.is_floating_point() and t < 1:
                        dst.copy_(a)
                    elif t == 1 or not dst.is_floating_point():
                        dst.copy_(b)
                    else:
                        w = _work_dtype(dst)
                        dst.copy_((1 - t) * a.to(w) + t * b.to(w))
                if recompute_bn is not None and (recompute_endpoints or t not in (0, 1)):
                    recompute_bn_stats(model, recompute_bn)
                losses[i] = _finite(loss_fn(model))
    finally:
        with torch.no_grad():
            for k, t in live.items():
                t.copy_(saved[k])
    frame = pd.DataFrame({"t": ts, "loss": losses, "finite": np.isfinite(losses)})
    meta = {"kind": "interpolate", "n_points": len(ts), "n_nonfinite": int(np.isnan(losses).sum()),
            "mode": "eval", "switched_from_train": switched,
            "bn": "recomputed" if recompute_bn is not None else "interpolated",
            "recompute_endpoints": recompute_endpoints if recompute_bn is not None else None,
            "barrier": _barrier(ts, losses)}
    return LandscapeResult(frame, meta)


def _barrier(ts, losses) -> float | None:
    i0, i1 = np.flatnonzero(ts == 0), np.flatnonzero(ts == 1)
    if not len(i0) or not len(i1):
        return None
    l0, l1 = losses[i0[0]], losses[i1[0]]
    gap = losses - ((1 - ts) * l0 + ts * l1)
    return float(np.nanmax(gap)) if np.isfinite(gap).any() else math.nan


# ---------------------------------------------------------------------------------- spectral criteria


def spectral_criteria(eigs_top=None, eigs_bottom=None, *, density=None, tol: float = 0.0) -> dict:
    """Hessian spectral criteria (LLA, Gabdullin 2024) from extreme eigenvalues and/or a spectral density.

    Definitions used here (the LLA paper's exact estimators could not be verified; these are ours):

        abs_min_max_ratio  = |lambda_min / lambda_max|      (Li et al. 2018's local-convexity ratio:
                                                             ~0 near a convex minimum, large at saddles)
        neg_pos_mass_ratio = sum_{x_j < -tol} w_j / sum_{x_j > tol} w_j
        neg_pos_curvature_ratio = sum_{x_j < -tol} w_j |x_j| / sum_{x_j > tol} w_j x_j

    over the density's nodes x_j and weights w_j (SLQ / Lanczos Ritz values and weights, pooled over
    probe vectors; any positive scale, the ratios are scale-free). Nodes with |x| <= tol count as neither.
    lambda_max = max(eigs_top) (else the largest node); lambda_min = min(eigs_bottom) (else the smallest
    node, the extreme Ritz value; else NaN).

    Args:
        eigs_top: top eigenvalues (largest algebraic), any sequence.
        eigs_bottom: bottom eigenvalues (smallest algebraic).
        density: (nodes, weights), a dict with "nodes"/"weights", an object with ``.nodes`` and ``.weights``
            (``gradsight.curvature.SLQResult``), or PyHessian's
            (eigen_list_full, weight_list_full); nested lists (probes x nodes) are pooled.
        tol: zero band for the mass ratios.

    Returns:
        dict with lambda_max, lambda_min, abs_min_max_ratio, neg_mass, pos_mass (fractions of the total
        weight), neg_pos_mass_ratio, neg_pos_curvature_ratio (NaN where undefined; +inf when the positive
        side is empty and the negative side is not).
    """
    def arr(x):
        if torch.is_tensor(x):
            x = x.detach().cpu().double().numpy()
        return None if x is None else np.asarray(x, dtype=np.float64).reshape(-1)

    top, bottom = arr(eigs_top), arr(eigs_bottom)
    nodes = weights = None
    if density is not None:
        if isinstance(density, Mapping):
            nodes, weights = density["nodes"], density["weights"]
        elif hasattr(density, "nodes") and hasattr(density, "weights"):  # curvature.SLQResult
            nodes, weights = density.nodes, density.weights
        else:
            nodes, weights = density
        nodes, weights = arr(nodes), arr(weights)
        if nodes.shape != weights.shape:
            raise ValueError(f"density nodes {nodes.shape} and weights {weights.shape} differ")
    lam_max = float(top.max()) if top is not None and top.size else (
        float(nodes.max()) if nodes is not None else math.nan)
    lam_min = float(bottom.min()) if bottom is not None and bottom.size else (
        float(nodes.min()) if nodes is not None else math.nan)
    ratio = abs(lam_min / lam_max) if lam_max != 0 and not math.isnan(lam_max) else math.nan

    out = {"lambda_max": lam_max, "lambda_min": lam_min, "abs_min_max_ratio": ratio,
           "neg_mass": math.nan, "pos_mass": math.nan, "neg_pos_mass_ratio": math.nan,
           "neg_pos_curvature_ratio": math.nan}
    if nodes is not None:
        neg, pos = nodes < -tol, nodes > tol
        total = weights.sum()
        out["neg_mass"] = float(weights[neg].sum() / total) if total > 0 else math.nan
        out["pos_mass"] = float(weights[pos].sum() / total) if total > 0 else math.nan
        out["neg_pos_mass_ratio"] = _safe_ratio(weights[neg].sum(), weights[pos].sum())
        out["neg_pos_curvature_ratio"] = _safe_ratio((weights[neg] * -nodes[neg]).sum(),
                                                     (weights[pos] * nodes[pos]).sum())
    return out


def _safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return float(num / den)
    return math.inf if num > 0 else math.nan
