"""One captured forward/backward: per-example gradients of selected layers, with non-finite rows flagged.

`backward_step` is the single place where a batch's per-example gradients are recorded, for every analysis
(layers, geometry, and next attribution, importance, privacy) and for the training monitor:

    losses = losses_fn(model, batch) * scale      # (B,) each example's own loss
    sum over the finite losses .backward()        # G at e's tokens is exactly dL_e/d(outputs)
    grads = tape.grads()                          # {layer: FactoredGrad | DenseGrad}

A non-finite loss, or a non-finite gradient of an example in any layer, flags that example (with the
reason: "non-finite loss", "non-finite gradient in LAYER") and zeroes its gradient rows in every layer, so
that its companions' batched eigensolvers and projections are unaffected (examples are independent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..capture import capture

__all__ = ["Step", "backward_step"]


@dataclass
class Step:
    """What one captured forward/backward yields.

    Attributes:
        losses: (B,) the examples' losses (detached; scaled when a scale was given).
        grads: {layer: FactoredGrad | DenseGrad} per-example gradients (flagged rows zeroed).
        bad: {batch position: reason} of the flagged examples.
        ids: the examples' ids (unit keys) in batch order, when the caller gave them.
    """

    losses: torch.Tensor
    grads: dict[str, Any]
    bad: dict[int, str] = field(default_factory=dict)
    ids: list | None = None

    @property
    def keep(self) -> list[int]:
        """Batch positions of the examples that were not flagged."""
        return [p for p in range(self.losses.shape[0]) if p not in self.bad]


def backward_step(model: nn.Module, layers: Mapping[str, nn.Module] | Sequence[str], batch: Any,
                  losses_fn: Callable[[nn.Module, Any], torch.Tensor], *, tokens: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, ids: list | None = None) -> Step:
    """Per-example gradients of `layers` from ONE batched forward/backward.

    Args:
        model: the model (examples must not interact in its forward: eval mode).
        layers: {name: module} or module names.
        batch: whatever `losses_fn` takes.
        losses_fn: ``losses_fn(model, batch) -> (B,)`` each example's own loss.
        tokens: (B, T) bool mask of real tokens (padding is excluded from the factors); None: every
            position of 3-D inputs, one token per row of 2-D inputs.
        scale: (B,) per-example factors applied to the losses (e.g. 1 / n_target to turn sequence sums into
            token means); None: 1.
        ids: the examples' ids, kept on the Step for accumulating measures.

    Returns:
        a `Step` (its grads stay valid after the call).
    """
    if not isinstance(layers, Mapping):
        named = dict(model.named_modules())
        layers = {n: named[n] for n in layers}
    with capture(model, dict(layers)) as tape:
        if tokens is not None:
            tape.set_tokens(tokens.bool())
        losses = losses_fn(model, batch)  # (B,)
        if scale is not None:
            losses = losses * scale.to(losses.dtype)
        bad: dict[int, str] = {}
        for b in torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist():
            bad[b] = "non-finite loss"
        # a non-finite loss poisons nothing else (examples are independent), but keep it out of backward
        torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses)).sum().backward()
        grads = tape.grads()
        for name, g in grads.items():
            for b in torch.nonzero(~g.finite()).flatten().tolist():
                bad.setdefault(b, f"non-finite gradient in {name}")
        if bad:  # flagged examples must not break the batched eigensolvers of their companions
            for g in grads.values():
                g.zero_examples(sorted(bad))
    return Step(losses.detach(), grads, bad, ids)
