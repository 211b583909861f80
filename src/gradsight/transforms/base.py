"""The gradient-transform protocol, its combinators, and `wrap` (any torch.optim optimizer).

A transform is a pair of functions in the manner of optax (``GradientTransformation``), run on PyTorch tensors:

    state = tx.init(named_params)                              # {name: Parameter} -> state
    grads, state = tx.update(grads, state, params, ctx)        # grads: {name: Tensor}

``update`` may modify the gradient tensors in place and/or return new ones; the returned dict is what counts.
A value of ``None`` in the returned dict means "no gradient for this parameter this step" (`wrap` then sets
``p.grad = None`` so that the optimizer skips the parameter, which is how `apply_if_finite` skips a step).
``params`` (the same names -> Parameters) is needed by transforms that read the weights (AGC, trust ratio,
⊥Grad); ``ctx`` (`Context`) carries the step, the optimizer (for transforms that read or reset its moments),
the lr scale a transform may lower, and a dict where transforms leave measurements.

State holds only tensors, numbers, strings, ``None``, lists and dicts, so ``torch.save(wrapped.state_dict())``
loads back with ``torch.load(..., weights_only=True)``. State tensors may be updated in place: treat the state
passed to ``update`` as consumed.

Example:
    >>> import gradsight.transforms as gt
    >>> tx = gt.chain(gt.snapshot("pre"), gt.clip_by_global_norm(1.0), gt.snapshot("post"))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> w = gt.wrap(opt, tx, model)        # runs tx on p.grad inside every opt.step()
    >>> loss.backward(); opt.step()
    >>> w.last_stats["pre"]["global_norm"] # device tensor, no host sync
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Context", "GradientTransform", "identity", "stateless", "chain", "named_chain", "masked", "partition",
    "reset_state", "snapshot", "apply_if_finite", "wrap", "Wrapped", "tensor_norms", "global_norm", "replace_where_",
]

Grads = dict[str, Tensor]


@dataclass
class Context:
    """What `GradientTransform.update` may read besides gradients and parameters.

    Attributes:
        step: 0-based count of optimizer steps taken before this one (`wrap` counts the calls of
            ``optimizer.step()`` that reached its pre-hook; steps a GradScaler skips are not counted).
        lr: the lr of the first parameter group, before any ``lr_scale``.
        optimizer: the wrapped optimizer (momentum reset and SPAM read ``optimizer.state[p]``).
        scaler: a ``torch.amp.GradScaler`` or None.
        losses: named loss values the caller recorded on `Wrapped.losses`.
        params: name -> Parameter, to reach ``optimizer.state[p]``.
        lr_scale: a transform may multiply it (SPAM's post-reset warm-up); `wrap` multiplies every group's lr
            by it for this step only and restores the lr in the step post-hook.
        stats: transforms write measurements here (device tensors; `Wrapped.last_stats` keeps the last step's).
    """

    step: int = 0
    lr: float | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: Any = None
    losses: dict[str, float] = field(default_factory=dict)
    params: dict[str, torch.nn.Parameter] | None = None
    lr_scale: float = 1.0
    stats: dict = field(default_factory=dict)


class GradientTransform(NamedTuple):
    """``init(named_params) -> state`` and ``update(grads, state, params=None, ctx=None) -> (grads, state)``."""

    init: Callable[[dict[str, Tensor]], Any]
    update: Callable[..., tuple[dict[str, Tensor], Any]]


# ----------------------------------------------------------------------------------------------- helpers

def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norm of each tensor as a 0-d device tensor, in float32 at least (bf16/fp16 are upcast); no host sync.

    float32/float64 tensors go through one ``torch._foreach_norm`` per (device, dtype) group, as
    ``torch.nn.utils.clip_grad_norm_`` does, so the norms are bitwise those of torch.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dtype in (torch.float32, torch.float64) and t.layout == torch.strided:
            groups.setdefault((t.device, t.dtype), []).append(i)
        else:
            out[i] = torch.linalg.vector_norm(t.float())
    for idx in groups.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx])):
            out[i] = n
    return out  # type: ignore[return-value]


def global_norm(norms: list[Tensor]) -> Tensor:
    """sqrt(sum_l n_l^2) of per-tensor norms (on the first tensor's device; float64 if any norm is)."""
    if not norms:
        return torch.tensor(0.0)
    dev = norms[0].device
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(dev, dtype) for n in norms]))


def replace_where_(g: Tensor, mask: Tensor, value: Callable[[Any], Tensor]) -> Tensor:
    """g[mask] = value(mask) in place, where ``value(ix)`` computes the new entries from tensors indexed by ix.

    On CPU (host syncs are free) only the masked entries are computed, and nothing when the mask is empty; on
    accelerators ``value(...)`` is computed over the whole tensor and selected by ``torch.where``, with no
    host sync.
    """
    if g.device.type == "cpu":
        if mask.any():
            g[mask] = value(mask)
    else:
        torch.where(mask, value(...), g, out=g)
    return g


def _live(grads: Mapping[str, Tensor | None]) -> Grads:
    return {n: g for n, g in grads.items() if g is not None}


def _selector(select) -> Callable[[str, Any], bool]:
    """A regex string (re.search on the name), a collection of names, or a callable (name, param) -> bool."""
    if isinstance(select, str):
        rx = re.compile(select)
        return lambda name, p: rx.search(name) is not None
    if isinstance(select, (set, frozenset, list, tuple)):
        names = frozenset(select)
        return lambda name, p: name in names
    if callable(select):
        return select
    raise TypeError(f"select must be a regex string, a set of names or a callable (name, param) -> bool, "
                    f"got {type(select).__name__}")


def _sub(params: Mapping[str, Tensor] | None, names: Iterable[str]) -> dict[str, Tensor] | None:
    return None if params is None else {n: params[n] for n in names if n in params}


# ----------------------------------------------------------------------------------------------- combinators

def identity() -> GradientTransform:
    """Leaves gradients unchanged; state ``{}``."""
    return GradientTransform(lambda params: {}, lambda grads, state, params=None, ctx=None: (grads, state))


def stateless(fn: Callable[[Grads, dict | None, Context | None], Grads]) -> GradientTransform:
    """A transform with no state from ``fn(grads, params, ctx) -> grads``."""

    def update(grads, state, params=None, ctx=None):
        return fn(grads, params, ctx), state

    return GradientTransform(lambda params: {}, update)


def chain(*txs: GradientTransform) -> GradientTransform:
    """Apply ``txs`` in order; state is the list of their states.

    Gradients set to None by one transform (e.g. `apply_if_finite`) are not passed to the next ones; when every
    gradient is None the remaining transforms are not run (their state is unchanged).
    """

    def init(params):
        return [tx.init(params) for tx in txs]

    def update(grads, state, params=None, ctx=None):
        new_state = list(state)
        for i, tx in enumerate(txs):
            live = _live(grads)
            if not live and grads:
                break
            out, new_state[i] = tx.update(live, state[i], params, ctx)
            grads = {n: out.get(n, g) if n in live else None for n, g in grads.items()}
        return grads, new_state

    return GradientTransform(init, update)


def named_chain(**txs: GradientTransform) -> GradientTransform:
    """`chain` whose state is a dict by name (``state["clip"]``), in keyword order."""
    names, inner = list(txs), chain(*txs.values())

    def init(params):
        return dict(zip(names, inner.init(params)))

    def update(grads, state, params=None, ctx=None):
        grads, s = inner.update(grads, [state[n] for n in names], params, ctx)
        return grads, dict(zip(names, s))

    return GradientTransform(init, update)


def masked(tx: GradientTransform, select) -> GradientTransform:
    """Apply ``tx`` to the selected parameters only; the others pass through untouched (the same tensors).

    Args:
        tx: the inner transform (its state covers the selected parameters only).
        select: a callable ``(name, param) -> bool`` (e.g. ``lambda n, p: p.ndim > 1``), a regex string
            (``re.search`` on the name), or a set of names. The callable gets the parameter when ``params`` is
            given to ``update`` and the gradient (same shape) otherwise.
    Returns:
        A transform with state ``{"inner": tx_state}``.
    """
    sel = _selector(select)

    def init(params):
        return {"inner": tx.init({n: p for n, p in params.items() if sel(n, p)})}

    def update(grads, state, params=None, ctx=None):
        chosen = {n: g for n, g in grads.items()
                  if g is not None and sel(n, params[n] if params is not None and n in params else g)}
        new, inner = tx.update(chosen, state["inner"], _sub(params, chosen), ctx)
        out = dict(grads)
        out.update(new)
        return out, {"inner": inner}

    return GradientTransform(init, update)


def partition(transforms: Mapping[str, GradientTransform], label_fn) -> GradientTransform:
    """Route each parameter to one transform by label (optax ``partition``, formerly ``multi_transform``).

    Args:
        transforms: label -> transform. Labels are strings (they become state-dict keys).
        label_fn: ``(name, param) -> label`` or a mapping name -> label. A label without a transform raises
            KeyError.
    Returns:
        A transform with state ``{"partition": {label: state}}``. `reset_state` sets one label's state to None;
        the next ``update`` re-initialises it from that label's parameters (optax #1371).

    Example:
        >>> tx = partition({"decay": clip_by_global_norm(1.0), "rest": identity()},
        ...                lambda n, p: "decay" if p.ndim > 1 else "rest")
    """
    label_of = (lambda n, p: label_fn[n]) if isinstance(label_fn, Mapping) else label_fn

    def split(tensors: Mapping[str, Any], params) -> dict[str, dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = {lab: {} for lab in transforms}
        for n, t in tensors.items():
            lab = label_of(n, params[n] if params is not None and n in params else t)
            if lab not in transforms:
                raise KeyError(f"partition: parameter {n!r} has label {lab!r}, which has no transform "
                               f"(labels: {sorted(transforms)})")
            groups[lab][n] = t
        return groups

    def init(params):
        groups = split(params, params)
        return {"partition": {lab: transforms[lab].init(groups[lab]) for lab in transforms}}

    def update(grads, state, params=None, ctx=None):
        states = dict(state["partition"])
        out = dict(grads)
        for lab, sub in split(_live(grads), params).items():
            if states[lab] is None:  # reset by reset_state: re-initialise from this label's parameters
                states[lab] = transforms[lab].init(_sub(params, sub) if params is not None else sub)
            new, states[lab] = transforms[lab].update(sub, states[lab], _sub(params, sub), ctx)
            out.update(new)
        return out, {"partition": states}

    return GradientTransform(init, update)


def reset_state(state, label: str):
    """A copy of ``state`` in which every `partition` holding ``label`` has that label's state reset.

    The reset state is None and is re-initialised by the next ``update`` (so counters, EMAs and generators
    start over). Works on any nesting (chain lists, named_chain dicts, masked). Raises KeyError if no partition
    has the label.

    Example:
        >>> wrapped.state = reset_state(wrapped.state, "head")
    """
    found = [False]

    def walk(s):
        if isinstance(s, dict):
            if "partition" in s and isinstance(s["partition"], dict) and label in s["partition"]:
                found[0] = True
                return {**s, "partition": {k: (None if k == label else walk(v))
                                           for k, v in s["partition"].items()}}
            return {k: walk(v) for k, v in s.items()}
        if isinstance(s, list):
            return [walk(v) for v in s]
        return s

    new = walk(state)
    if not found[0]:
        raise KeyError(f"no partition state has the label {label!r}")
    return new


def snapshot(key: str) -> GradientTransform:
    """Record the global and per-tensor L2 norms at this point of a chain into ``ctx.stats[key]``.

    ``ctx.stats[key] = {"global_norm": 0-d tensor, "norms": {name: 0-d tensor}}``, device tensors in float32
    at least (no host sync). Gradients pass through unchanged; without a ``ctx`` nothing is recorded.

    Example:
        >>> chain(snapshot("pre"), clip_by_global_norm(1.0), snapshot("post"))
    """

    def fn(grads, params, ctx):
        if ctx is not None:
            names = list(grads)
            norms = tensor_norms([grads[n] for n in names])
            ctx.stats[key] = {"global_norm": global_norm(norms), "norms": dict(zip(names, norms))}
        return grads

    return stateless(fn)


def apply_if_finite(tx: GradientTransform) -> GradientTransform:
    """Run ``tx`` only if every gradient is finite; otherwise skip the step and count it (optax semantics).

    On a non-finite step every gradient is returned as None, so under `wrap` the optimizer skips all
    parameters (no moment update, no weight decay: optax returns zero *updates*; a zero *gradient* would still
    move Adam), and the inner state is left unchanged. Costs one host sync per step (the finiteness test).

    State: ``{"inner", "notfinite_count" (consecutive), "last_finite", "total_notfinite"}``; the same values
    go to ``ctx.stats["apply_if_finite"]``.
    """

    def init(params):
        return {"inner": tx.init(params), "notfinite_count": 0, "last_finite": True, "total_notfinite": 0}

    def update(grads, state, params=None, ctx=None):
        live = _live(grads)
        flags = [torch.isfinite(g).all() for g in live.values()]
        finite = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True  # 1 sync
        if finite:
            out, inner = tx.update(grads, state["inner"], params, ctx)
            new = {"inner": inner, "notfinite_count": 0, "last_finite": True,
                   "total_notfinite": state["total_notfinite"]}
        else:
            out = {n: None for n in grads}
            new = {"inner": state["inner"], "notfinite_count": state["notfinite_count"] + 1,
                   "last_finite": False, "total_notfinite": state["total_notfinite"] + 1}
        if ctx is not None:
            ctx.stats["apply_if_finite"] = {k: v for k, v in new.items() if k != "inner"}
        return out, new

    return GradientTransform(init, update)


# ----------------------------------------------------------------------------------------------- wrap

def _named(model_or_named_params) -> dict[str, torch.nn.Parameter]:
    if isinstance(model_or_named_params, torch.nn.Module):
        return dict(model_or_named_params.named_parameters())
    if isinstance(model_or_named_params, Mapping):
        return dict(model_or_named_params)
    return dict(model_or_named_params)


def _load_like(current, loaded, path: str = "state"):
    """``loaded`` checked against the structure of ``current``; tensors moved to ``current``'s device."""
    if current is None or loaded is None:
        return loaded
    if isinstance(current, Tensor):
        if not isinstance(loaded, Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(loaded).__name__}")
        return loaded.to(current.device, current.dtype)
    if isinstance(current, dict):
        if not isinstance(loaded, dict) or set(current) != set(loaded):
            got = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
            raise ValueError(f"{path}: keys {sorted(current)} expected, got {got}")
        return {k: _load_like(current[k], loaded[k], f"{path}[{k!r}]") for k in current}
    if isinstance(current, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(current):
            raise ValueError(f"{path}: a sequence of length {len(current)} expected")
        return type(current)(_load_like(c, v, f"{path}[{i}]") for i, (c, v) in enumerate(zip(current, loaded)))
    return loaded


class Wrapped:
    """A transform attached to an optimizer by step pre/post hooks (see `wrap`).

    Attributes:
        state: the transform state (replace it freely, e.g. with `reset_state`).
        step: optimizer steps taken so far (``ctx.step`` of the next step).
        losses: a dict the caller may fill; copied into ``ctx.losses`` at each step.
        last_stats: ``ctx.stats`` of the last step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tx: GradientTransform,
                 params: dict[str, torch.nn.Parameter], scaler: Any = None):
        self.optimizer, self.tx, self.params, self.scaler = optimizer, tx, params, scaler
        self.step = 0
        self.losses: dict[str, float] = {}
        self.last_stats: dict = {}
        self._saved_lr: list | None = None
        with torch.no_grad():
            self.state = tx.init(params)
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs):
        groups = optimizer.param_groups
        ctx = Context(step=self.step, lr=groups[0]["lr"] if groups else None, optimizer=optimizer,
                      scaler=self.scaler, losses=dict(self.losses), params=self.params)
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        out, self.state = self.tx.update(grads, self.state, self.params, ctx)
        for n, g in grads.items():
            new = out.get(n, g)
            p = self.params[n]
            if new is None:
                p.grad = None
            elif new is not g:
                if new.shape != g.shape:
                    raise ValueError(f"transform returned shape {tuple(new.shape)} for {n!r}, "
                                     f"gradient shape {tuple(g.shape)}")
                g.copy_(new)
        if ctx.lr_scale != 1.0:
            self._saved_lr = [gr["lr"] for gr in groups]
            for gr in groups:
                gr["lr"] = gr["lr"] * ctx.lr_scale
        self.last_stats = ctx.stats

    def _post(self, optimizer, args, kwargs):
        if self._saved_lr is not None:
            for gr, lr in zip(optimizer.param_groups, self._saved_lr):
                gr["lr"] = lr
            self._saved_lr = None
        self.step += 1

    def state_dict(self) -> dict:
        """``{"step": int, "state": transform state}`` (references, as ``Optimizer.state_dict``)."""
        return {"step": self.step, "state": self.state}

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore `state_dict` output (checked against this transform's state structure)."""
        self.state = _load_like(self.state, sd["state"])
        self.step = int(sd["step"])

    def reset_state(self, label: str) -> None:
        """Reset one `partition` label's state (see `reset_state`)."""
        self.state = reset_state(self.state, label)

    def remove(self) -> None:
        """Remove both hooks: the optimizer behaves as before `wrap`."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Wrapped:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def wrap(optimizer: torch.optim.Optimizer, tx: GradientTransform, model_or_named_params,
         scaler: Any = None) -> Wrapped:
    """Run ``tx`` on the parameters' ``.grad`` inside every ``optimizer.step()``.

    A step pre-hook builds a `Context` (step counter kept in the returned `Wrapped`), gathers ``{name: p.grad}``
    for the optimizer's parameters that have a gradient, runs ``tx.update`` and writes the result back into
    ``p.grad`` (in-place copy; ``None`` sets ``p.grad = None`` so the optimizer skips the parameter). If a
    transform lowered ``ctx.lr_scale``, every group's lr is multiplied by it for this step and restored by a
    step post-hook.

    Under fp16 AMP, call ``scaler.step(optimizer)`` as usual: it unscales the gradients first, so the pre-hook
    sees *unscaled* gradients; when the scaler found inf/NaN it skips ``optimizer.step()``, so the hooks do not
    run and the step is not counted. Closure-based optimizers (LBFGS) are not supported: the closure would
    recompute the gradients after the pre-hook.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        tx: the transform.
        model_or_named_params: an ``nn.Module`` or name -> Parameter pairs. Only the parameters the optimizer
            holds are used; every optimizer parameter must have a name.
        scaler: optional GradScaler, passed to transforms as ``ctx.scaler``.
    Returns:
        `Wrapped` (``.state``, ``.state_dict()``, ``.load_state_dict()``, ``.remove()``, ``.last_stats``); it
        is also a context manager that removes the hooks on exit.

    Example:
        >>> w = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6), spam(), model)
    """
    named = _named(model_or_named_params)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = {n: p for n, p in named.items() if id(p) in held}
    missing = len(held) - len({id(p) for p in params.values()})
    if missing:
        raise ValueError(f"{missing} optimizer parameter(s) have no name in model_or_named_params")
    return Wrapped(optimizer, tx, params, scaler)
