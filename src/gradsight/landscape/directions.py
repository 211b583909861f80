"""Directions in parameter space for loss-landscape slices.

Each is a ``Direction``: a list of tensors shaped like the chosen parameters, with names and metadata.

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

Direction arithmetic runs in float32 (float64 for float64 parameters); norms in float64.

References:
    Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
    code github tomgoldstein/loss-landscape (``net_plotter.py``, ``projection.py``).
    Yao et al. PyHessian, 2020 (``Hessian_Tutorial.ipynb``: slices along Hessian eigenvectors).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "Direction",
    "select_tensors",
    "normalize_direction",
    "random_direction",
    "hessian_directions",
    "pca_directions",
    "gradient_direction",
    "target_direction",
]

NORMS = ("filter", "layer", "weight", "dfilter", "dlayer", None)
_EPS = 1e-10  # the reference code's guard in d[k] * ||w[k]|| / (||d[k]|| + eps)


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


def work_dtype(t: torch.Tensor) -> torch.dtype:
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
    raw = [torch.randn(t.shape, generator=g, dtype=work_dtype(t)).to(t.device) for _, t in named]
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
        parts = [p.to(dtype=work_dtype(p), device=r.device) for p, r in zip(parts, refs)]
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
        dtype = work_dtype(final[names[0]])

        def flat(s):
            return torch.cat([s[n].detach().reshape(-1).double().cpu() for n in names])
    else:
        names, shapes, _ = _layout(like) if like is not None else (None, [final.shape], None)
        dtype = work_dtype(final if torch.is_tensor(final) else final[0])

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
    from .evaluate import eval_mode  # local import: evaluate depends on this module

    named = select_tensors(model, names)
    with eval_mode(model) as switched:
        value = loss(model)
        grads = torch.autograd.grad(value, [t for _, t in named], allow_unused=True)
    g = [torch.zeros_like(t) if gi is None else gi.detach().to(work_dtype(t)) for (_, t), gi in zip(named, grads)]
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
    d = [(state_b[n].detach().to(work_dtype(state_a[n])) - state_a[n].detach().to(work_dtype(state_a[n])))
         for n in names]
    return Direction(d, names, kind="target", norm=None)
