"""Evaluating the loss on a landscape: 1-D slices, 2-D grids and checkpoint interpolation.

    f(a)    = L(theta* + a d)                 1-D slice (``slice_1d``)
    f(a, b) = L(theta* + a d1 + b d2)         2-D grid (``grid_2d``)
    g(t)    = L((1 - t) theta_A + t theta_B)  linear interpolation between two checkpoints (``interpolate``)

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

References:
    Li, Xu, Taylor, Studer, Goldstein. "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
    code github tomgoldstein/loss-landscape (``evaluation.py``).
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

from .directions import select_tensors, work_dtype

__all__ = [
    "BatchLoss",
    "LandscapeResult",
    "slice_1d",
    "grid_2d",
    "interpolate",
    "recompute_bn_stats",
]

_BN = nn.modules.batchnorm._BatchNorm
_STOCHASTIC = (_BN, nn.modules.dropout._DropoutNd)


# ---------------------------------------------------------------------------------------------- containers


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
        if len(self.batches) == 1:  # the weighted mean of one batch is its loss (no extra ops per grid point)
            return self._one(forward, self.batches[0])
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


# -------------------------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def eval_mode(model: nn.Module):
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


AUTO_PROBE = 8   # batch_points="auto": sequential points timed first,
AUTO_CHUNK = 32  # then one vectorised chunk of this many points; the vectorised path does the rest only when
AUTO_MARGIN = 0.85  # it took under this fraction of the sequential time per point (the probes are short);
AUTO_MAX_BYTES = 1 << 29  # the chunk's stacked perturbed parameters stay under 512 MB (fewer points if needed)


def check_batch_points(batch_points) -> None:
    """A positive integer or "auto", else a ValueError naming the value."""
    if batch_points != "auto" and not (isinstance(batch_points, int) and batch_points >= 1):
        raise ValueError(f"batch_points must be a positive integer or 'auto', got {batch_points!r}")


def evaluate_points(model, loss_fn, directions, C: torch.Tensor, *, batch_points: int | str, recompute_bn) -> tuple:
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
        # Per point one add per tensor: theta = prefix + c_last * d_last, where prefix = theta* + sum of the other
        # directions' terms (recomputed only when those coefficients change: once per row of a grid) and the
        # products c * d_last are kept per coefficient value while they fit in AUTO_MAX_BYTES / 4 (a grid has
        # one per column). The same float operations in the same order as `_points`, so the sequential and the
        # vectorised paths write identical parameters.
        k = len(directions)
        dts = [ds[0].dtype for ds in per_tensor]
        coef = {dt: C.to(dt) for dt in set(dts)}  # the coefficients in each direction dtype
        prefix = [torch.empty_like(ds[0]) for ds in per_tensor]
        work = [t.detach() if t.dtype == dt else torch.empty_like(ds[0]) for t, ds, dt in zip(live, per_tensor, dts)]
        bytes_last = sum(ds[-1].numel() * ds[-1].element_size() for ds in per_tensor)
        keep_last = bytes_last <= AUTO_MAX_BYTES // 4
        last: dict[float, list[torch.Tensor]] = {}
        head = None
        rows = C.tolist()
        with torch.no_grad():
            for i in range(lo, hi):
                key = tuple(rows[i][:k - 1])
                if key != head:
                    for pre, t0, ds, dt in zip(prefix, theta0, per_tensor, dts):
                        pre.copy_(t0)
                        for j in range(k - 1):
                            pre.add_(ds[j] * coef[dt][i, j])
                    head = key
                c = rows[i][k - 1]
                prods = last.get(c)
                if prods is None:
                    prods = [ds[-1] * coef[dt][i, k - 1] for ds, dt in zip(per_tensor, dts)]
                    if keep_last and len(last) * bytes_last <= AUTO_MAX_BYTES // 4:
                        last[c] = prods
                for t, w, pre, pr in zip(live, work, prefix, prods):
                    torch.add(pre, pr, out=w)
                    if w is not t:
                        t.copy_(w)
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
        with eval_mode(model) as switched:
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
                    if done > AUTO_PROBE and t_vec < AUTO_MARGIN * t_seq:
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


def coefficients(*axes, dtype=torch.float64) -> torch.Tensor:
    """(N, k) grid coefficients: every combination of the k axes' values, the first axis slowest."""
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
    C = coefficients(alphas)
    losses, meta = evaluate_points(model, loss_fn, [direction], C, batch_points=batch_points,
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
    C = coefficients(alphas, betas)
    losses, meta = evaluate_points(model, loss_fn, [d1, d2], C, batch_points=batch_points, recompute_bn=recompute_bn)
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
        with eval_mode(model) as switched, torch.no_grad():
            for i, t in enumerate(ts):
                for k in keys:
                    a, b, dst = state_a[k], state_b[k], live[k]
                    if t == 0 or not dst.is_floating_point() and t < 1:
                        dst.copy_(a)
                    elif t == 1 or not dst.is_floating_point():
                        dst.copy_(b)
                    else:
                        w = work_dtype(dst)
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
            "barrier": interpolation_barrier(ts, losses)}
    return LandscapeResult(frame, meta)


def interpolation_barrier(ts, losses) -> float | None:
    """max_t [g(t) - ((1 - t) g(0) + t g(1))] over finite points; None unless both t = 0 and t = 1 are in ts."""
    i0, i1 = np.flatnonzero(ts == 0), np.flatnonzero(ts == 1)
    if not len(i0) or not len(i1):
        return None
    l0, l1 = losses[i0[0]], losses[i1[0]]
    gap = losses - ((1 - ts) * l0 + ts * l1)
    return float(np.nanmax(gap)) if np.isfinite(gap).any() else math.nan
