"""torch.func backend: per-example parameter gradients of ANY module from the same forward/backward.

During the forward the module's input x is recorded; during the backward the gradient G of the summed
per-example loss w.r.t. the module's output. Because examples do not interact, example e's parameter
gradient is the vector-Jacobian product of the module restricted to e's slice:

    g_e = vjp(theta -> module(theta, x_e), theta)(G_e)

computed for all examples at once with vmap over the batch dimension (layer-local, exact, no second
forward of the whole model). Works for modules whose forward maps one batched tensor to one tensor with
examples independent along dim 0 (norms, embeddings, custom elementwise layers, Linear too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .grads import DenseGrad

__all__ = ["dense_from_calls", "per_example_param_grads"]


def per_example_param_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                            param_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per-example gradients {param name: (B, *shape)} of `module` for one recorded call.

    Args:
        module: the module (its parameters are read, not modified).
        x: (B, ...) the recorded input.
        g: (B, ...) the gradient w.r.t. the module output (same shape as the output).
        param_names: parameters to differentiate (default: all direct parameters of the module).
    """
    params = dict(module.named_parameters())
    names = param_names or list(params)
    theta = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in theta}

    def one(x_e: torch.Tensor, g_e: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(th):
            return functional_call(module, {**frozen, **th}, (x_e.unsqueeze(0),))

        _, pullback = vjp(f, theta)
        (grads,) = pullback(g_e.unsqueeze(0).to(x_e.dtype))
        return grads

    return vmap(one)(x.detach(), g.detach())


def dense_from_calls(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]],
                     param: str = "weight") -> DenseGrad:
    """DenseGrad of `module.<param>` summed over the module's calls in one forward."""
    total = None
    for x, g in calls:
        gr = per_example_param_grads(module, x, g, [param])[param]
        total = gr if total is None else total + gr
    return DenseGrad(total)
