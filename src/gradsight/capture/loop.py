"""Per-example-backward reference backend (slow, obviously correct; used by tests and benchmarks).

For each example alone (no padding, no batch companions): forward, its own loss, backward, read .grad of
each selected layer's weight.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .grads import DenseGrad

__all__ = ["loop_grads"]


def _slice_example(batch: Mapping[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    n = int(batch["attention_mask"][e].sum())  # right padding: real tokens first
    return {k: v[e : e + 1, :n] for k, v in batch.items()}


def loop_grads(model: nn.Module, layers: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor],
               loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
               param: str = "weight") -> tuple[dict[str, DenseGrad], torch.Tensor]:
    """Per-example gradients by one backward per example.

    Args:
        model: the model.
        layers: {name: module} whose `param` gradients are wanted.
        batch: dict with (B, T) input_ids, attention_mask (right padded), target_mask.
        loss_fn: (model, batch) -> (B,) per-example losses.

    Returns:
        ({name: DenseGrad (B, *param_shape)}, (B,) losses).
    """
    B = batch["input_ids"].shape[0]
    params = {n: getattr(m, param) for n, m in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    losses = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for e in range(B):
            one = _slice_example(batch, e)
            for p in params.values():
                p.grad = None
            loss = loss_fn(model, one)[0]
            loss.backward()
            losses.append(loss.detach())
            for n, p in params.items():
                out[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    finally:
        for p in params.values():
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: DenseGrad(torch.stack(v)) for n, v in out.items()}, torch.stack(losses)
