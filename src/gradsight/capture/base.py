"""Per-example gradient types and the capture() context manager.

Capture decides HOW per-example gradients are obtained; statistics (stats/) only see the objects defined
here. Two representations share one interface:

- FactoredGrad: (A, G, tokens) for Linear-like layers; the per-example weight gradient is G_e^T A_e.
- DenseGrad: materialised per-example gradients (B, *param_shape) from the torch.func backend or the
  per-example-backward reference.

Both offer sq_norms(), inner(other), singular_values(), project(...), materialize().
Reduction convention: each example's gradient is the gradient of ITS OWN loss (token-mean over its
supervised targets by default); the batch loss that is backpropagated is the SUM of per-example losses,
so G at e's tokens is exactly dL_e/d(outputs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import linalg

__all__ = ["FactoredGrad", "DenseGrad", "Tape", "capture", "CaptureError"]


class CaptureError(RuntimeError):
    """Raised when a layer cannot be captured (unsupported call signature, missing backward...)."""


@dataclass
class FactoredGrad:
    """Per-example gradients of a Linear-like weight as factors.

    Attributes:
        A: (B, T, d_in) layer inputs.
        G: (B, T, d_out) gradients of the per-example losses w.r.t. the layer outputs.
        tokens: (B, T) bool, True at real (non-padded) tokens.
        transposed: True when the parameter is stored (d_in, d_out) (transformers' Conv1D).
    """

    A: torch.Tensor
    G: torch.Tensor
    tokens: torch.Tensor
    transposed: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.A.shape[0]

    @property
    def param_shape(self) -> tuple[int, int]:
        d_in, d_out = self.A.shape[-1], self.G.shape[-1]
        return (d_in, d_out) if self.transposed else (d_out, d_in)

    def _masked(self, X: torch.Tensor) -> torch.Tensor:
        return X * self.tokens.unsqueeze(-1).to(X.dtype)

    def K_a(self) -> torch.Tensor:
        """(B, T, T) float64 Gram of the inputs, zero at padded tokens."""
        if "K_a" not in self._cache:
            m = self.tokens.unsqueeze(-1) & self.tokens.unsqueeze(-2)
            self._cache["K_a"] = linalg.gram(self.A) * m
        return self._cache["K_a"]

    def K_g(self) -> torch.Tensor:
        if "K_g" not in self._cache:
            m = self.tokens.unsqueeze(-1) & self.tokens.unsqueeze(-2)
            self._cache["K_g"] = linalg.gram(self.G) * m
        return self._cache["K_g"]

    def sq_norms(self) -> torch.Tensor:
        """(B,) float64 squared Frobenius norms of the per-example gradients."""
        return (self.K_a() * self.K_g()).sum(dim=(-1, -2))

    def inner(self, other: "FactoredGrad") -> torch.Tensor:
        """(B, B') float64 inner products between this batch's and other's per-example gradients."""
        if other.transposed != self.transposed:
            raise ValueError("inner(): both gradients must belong to layers of the same layout")
        return linalg.factored_inner(self._masked(self.A), self._masked(self.G),
                                     other._masked(other.A), other._masked(other.G))

    def singular_values(self, L_a: torch.Tensor | None = None, route: str = "auto") -> torch.Tensor:
        """(B, k) float64 singular values per example, descending (zero padded).

        route: "gram" (T x T eigenproblem), "dense" (materialise + svdvals) or "auto" (cheaper one).
        """
        T, d_in, d_out = self.A.shape[1], self.A.shape[-1], self.G.shape[-1]
        if route == "auto":
            route = "gram" if linalg.prefer_gram_route(T, d_in, d_out) else "dense"
        if route == "gram":
            if L_a is None:
                L_a = linalg._sym_sqrt_factor(self.K_a(), self.tokens)
            return linalg.factored_singular_values(self.A, self.G, self.tokens, L_a=L_a, K_g=self.K_g())
        if route == "dense":
            return linalg.dense_singular_values(self.materialize(torch.float64))
        raise ValueError(f"unknown route {route!r}; expected 'auto', 'gram' or 'dense'")

    def project(self, P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
        """(B, r_out, r_in) Kronecker projection P_out M_e P_in^T (M_e in (d_out, d_in) orientation)."""
        return linalg.project_factored(self._masked(self.A), self._masked(self.G), P_in, P_out)

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, *param_shape) per-example gradients."""
        dtype = dtype or self.A.dtype
        A, G = self._masked(self.A).to(dtype), self._masked(self.G).to(dtype)
        M = G.transpose(-1, -2) @ A  # (B, d_out, d_in)
        return M.transpose(-1, -2) if self.transposed else M

    def zero_examples(self, rows: list[int]) -> None:
        """Replace the factors of the given batch positions by zeros (e.g. non-finite ones, to be skipped)."""
        if rows:
            self.A, self.G = self.A.clone(), self.G.clone()
            self.A[rows] = 0
            self.G[rows] = 0
            self._cache.clear()

    def finite(self) -> torch.Tensor:
        """(B,) bool: the example's factors are all finite."""
        ok_a = torch.isfinite(self._masked(self.A)).flatten(1).all(1)
        ok_g = torch.isfinite(self._masked(self.G)).flatten(1).all(1)
        return ok_a & ok_g


@dataclass
class DenseGrad:
    """Materialised per-example gradients g: (B, *param_shape)."""

    g: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.g.shape[0]

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.g.shape[1:])

    def sq_norms(self) -> torch.Tensor:
        return self.g.double().flatten(1).pow(2).sum(1)

    def inner(self, other: "DenseGrad") -> torch.Tensor:
        return self.g.double().flatten(1) @ other.g.double().flatten(1).T

    def singular_values(self, L_a=None, route: str = "auto") -> torch.Tensor:
        g = self.g.double()
        if g.dim() == 2:  # vector parameter: a single singular value, its norm
            return g.norm(dim=1, keepdim=True)
        return torch.linalg.svdvals(g.flatten(2) if g.dim() > 3 else g)

    def project(self, P: torch.Tensor) -> torch.Tensor:
        """(B, r) dense projection P vec(g_e)."""
        return self.g.flatten(1).to(P.dtype) @ P.T

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.g if dtype is None else self.g.to(dtype)

    def zero_examples(self, rows: list[int]) -> None:
        if rows:
            self.g = self.g.clone()
            self.g[rows] = 0

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.g).flatten(1).all(1)


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

    def set_tokens(self, tokens: torch.Tensor) -> None:
        """Declare the (B, T) bool mask of real tokens of the next forward."""
        self.tokens = tokens.bool()

    def clear(self) -> None:
        for n in self.layers:
            self._inputs[n].clear()
            self._grads[n].clear()
        self.tokens = None

    # recording -------------------------------------------------------------------------------------
    def _record(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:
            # Nothing upstream needs a gradient (weights are frozen during capture): start the graph here.
            out = out.detach().requires_grad_(True)
        call = len(self._inputs[name])
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
        missing = [i for i in range(len(xs)) if i not in gs]
        if missing:
            raise CaptureError(f"layer {name}: no output gradient for call(s) {missing}; "
                               "did the loss depend on it and was backward() called?")
        return [(xs[i], gs[i]) for i in range(len(xs))]

    def grads(self) -> dict[str, FactoredGrad | DenseGrad]:
        """Per-layer per-example gradients of the last backward."""
        from . import func  # local import: func depends on this module

        out: dict[str, FactoredGrad | DenseGrad] = {}
        for name, module in self.layers.items():
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
