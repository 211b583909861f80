"""The capture() context manager: forward hooks that record per-layer inputs and output gradients.

capture() installs the hooks and yields a Tape; after the backward, `tape.grads()` turns what was recorded
into the per-example gradient types of `grads.py` (FactoredGrad for Linear-like layers, DenseGrad through
the torch.func backend for any other module).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from . import func
from .grads import CaptureError, DenseGrad, FactoredGrad

__all__ = ["Tape", "capture"]


class Tape:
    """What capture() records during one forward/backward: per layer, per call, inputs and output grads.

    Use `tape.grads()` after the backward and `tape.clear()` before the next batch (capture's batch()
    helper does both).
    """

    def __init__(self, layers: dict[str, nn.Module], backends: dict[str, str]):
        self.layers = layers
        self.backends = backends
        self.tokens: torch.Tensor | None = None
        self._inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self._grads: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}
        self._recomputed: dict[str, set[int]] = {n: set() for n in layers}

    def set_tokens(self, tokens: torch.Tensor) -> None:
        """Declare the (B, T) bool mask of real tokens of the next forward."""
        self.tokens = tokens.bool()

    def clear(self) -> None:
        for n in self.layers:
            self._inputs[n].clear()
            self._grads[n].clear()
            self._recomputed[n].clear()
        self.tokens = None

    # recording -------------------------------------------------------------------------------------
    def _record(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:
            # Nothing upstream needs a gradient (weights are frozen during capture): start the graph here.
            out = out.detach().requires_grad_(True)
        call = len(self._inputs[name])
        if torch._C._current_autograd_node() is not None:
            self._recomputed[name].add(call)  # a forward re-run inside backward (activation checkpointing)
        self._inputs[name].append(x.detach())
        store = self._grads[name]

        def hook(g: torch.Tensor) -> None:
            store[call] = g.detach()

        out.register_hook(hook)
        return out

    def _tokens_for(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (B, d): one token per example
            return torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        if self.tokens is not None and tuple(self.tokens.shape) == tuple(x.shape[:2]):
            return self.tokens.to(x.device)
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    # reading ---------------------------------------------------------------------------------------
    def _calls(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xs, gs = self._inputs[name], self._grads[name]
        if not xs:
            raise CaptureError(f"layer {name} was not called in the forward pass")
        # activation checkpointing: a forward re-run inside backward whose output received no gradient is a
        # recomputation (non-reentrant checkpointing; the original call holds the gradient): not an example
        keep = [i for i in range(len(xs)) if i in gs or i not in self._recomputed[name]]
        xs = [xs[i] for i in keep]
        gs = {j: gs[i] for j, i in enumerate(keep) if i in gs}
        missing = [i for i in range(len(xs)) if i not in gs]
        if missing:
            raise CaptureError(f"layer {name}: no output gradient for call(s) {missing}; "
                               "did the loss depend on it and was backward() called?")
        return [(xs[i], gs[i]) for i in range(len(xs))]

    def grads(self, skip_uncalled: bool = False) -> dict[str, FactoredGrad | DenseGrad]:
        """Per-layer per-example gradients of the last backward.

        Args:
            skip_uncalled: leave out layers the forward did not call (e.g. a head whose weight the loss uses
                directly); by default that is an error.
        """
        out: dict[str, FactoredGrad | DenseGrad] = {}
        for name, module in self.layers.items():
            if skip_uncalled and not self._inputs[name]:
                continue
            calls = self._calls(name)
            if self.backends[name] == "factored":
                out[name] = _factored_from_calls(module, calls, self._tokens_for)
            else:
                out[name] = func.dense_from_calls(module, calls)
        return out


def _as_btd(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.flatten(1, -2)  # (B, ..., d) -> (B, T', d)


def _factored_from_calls(module, calls, tokens_for) -> FactoredGrad:
    As, Gs, Ms = [], [], []
    for x, g in calls:
        Ms.append(tokens_for(x) if x.dim() <= 3 else torch.ones(x.shape[0], x[0, ..., 0].numel(),
                                                                 dtype=torch.bool, device=x.device))
        As.append(_as_btd(x))
        Gs.append(_as_btd(g))
    A = As[0] if len(As) == 1 else torch.cat(As, dim=1)  # several calls: tokens concatenate
    G = Gs[0] if len(Gs) == 1 else torch.cat(Gs, dim=1)
    tokens = Ms[0] if len(Ms) == 1 else torch.cat(Ms, dim=1)
    return FactoredGrad(A=A, G=G.to(A.dtype), tokens=tokens, transposed=is_conv1d(module))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: y = x @ W + b with W stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_factorable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def resolve_backend(module: nn.Module, backend: str) -> str:
    if backend == "auto":
        return "factored" if is_factorable(module) else "func"
    if backend == "factored" and not is_factorable(module):
        raise CaptureError(f"backend 'factored' needs nn.Linear or Conv1D, got {type(module).__name__}")
    if backend not in ("factored", "func"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'factored' or 'func'")
    return backend


@contextlib.contextmanager
def capture(model: nn.Module, layers: dict[str, nn.Module] | Sequence[str], *, backend: str = "auto",
            freeze: bool = True) -> Iterator[Tape]:
    """Record per-example gradients of `layers` during forward/backward passes of `model`.

    Args:
        model: any nn.Module whose examples do not interact in the forward pass (eval mode, no BatchNorm
            in train mode).
        layers: {name: module} or module names of `model`.
        backend: "auto" (factored for Linear / Conv1D, torch.func for other modules), "factored" or "func".
        freeze: set requires_grad=False on every parameter while capturing (restored on exit). The
            factored backend needs no weight gradients, which saves the weight-gradient GEMMs of the
            backward pass. The func backend computes its own parameter gradients.

    Yields:
        a Tape. Call `tape.set_tokens(attention_mask)` before each forward, backpropagate the SUM of the
        per-example losses, read `tape.grads()`, then `tape.clear()`.

    Every hook is removed and every requires_grad flag restored on exit, also on error.

    Example:
        >>> with capture(model, ["model.layers.0.mlp.down_proj"]) as tape:
        ...     tape.set_tokens(batch["attention_mask"])
        ...     losses = per_example_losses(model, batch)   # (B,)
        ...     losses.sum().backward()
        ...     grads = tape.grads()
    """
    if not isinstance(layers, dict):
        named = dict(model.named_modules())
        unknown = [n for n in layers if n not in named]
        if unknown:
            raise CaptureError(f"no module named {unknown[0]!r} in the model")
        layers = {n: named[n] for n in layers}
    backends = {n: resolve_backend(m, backend) for n, m in layers.items()}
    tape = Tape(dict(layers), backends)
    handles = []
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        if freeze:
            for p in flags:
                p.requires_grad_(False)
        for name, module in layers.items():
            def fwd_hook(mod, args, output, _name=name):
                if not torch.is_grad_enabled():
                    return None  # no backward will follow (e.g. the no-grad first pass of reentrant checkpointing)
                if not args or not torch.is_tensor(args[0]):
                    raise CaptureError(f"layer {_name}: expected a tensor as first positional input")
                if not torch.is_tensor(output):
                    raise CaptureError(f"layer {_name}: expected a tensor output, got {type(output).__name__}")
                return tape._record(_name, args[0], output)

            handles.append(module.register_forward_hook(fwd_hook))
        yield tape
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        tape.clear()
