"""Composable gradient transforms for PyTorch (optax semantics), and `wrap` to run them in any optimizer's step.

    >>> import gradsight.transforms as gt
    >>> tx = gt.chain(gt.apply_if_finite(gt.spam()), gt.snapshot("post"))
    >>> w = gt.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0), tx, model)

Modules: `base` (protocol, combinators, wrap), `clipping` (global / per-layer / AGC clipping, normalisation,
trust ratio, noise, ⊥Grad), `spam` (SPAM and Stable-SPAM pieces, optimizer-coupled), `privacy` (DP noise on a
clipped sum, gradient pruning, top-k, random masks, quantisation), `conflict` (multi-task
aggregators).
"""

from .base import (Context, GradientTransform, Wrapped, apply_if_finite, chain, global_norm, identity, masked,
                   named_chain, partition, replace_where_, reset_state, snapshot, stateless, tensor_norms, wrap)
from .clipping import (adaptive_grad_clip, add_noise, clip_by_global_norm, clip_per_layer, noise_std,
                       normalize_per_layer, orthograd, trust_ratio, unitwise_norm)
from .privacy import dp_noise, prune_gradients, quantize, random_mask, top_k
from .spam import ada_clip, ada_norm, momentum_reset, spam, spam_clip, stable_spam, warmup_scale

__all__ = [
    "Context", "GradientTransform", "Wrapped", "wrap", "identity", "stateless", "chain", "named_chain", "masked",
    "partition", "reset_state", "snapshot", "apply_if_finite", "tensor_norms", "global_norm", "replace_where_",
    "clip_by_global_norm", "clip_per_layer", "adaptive_grad_clip", "unitwise_norm", "normalize_per_layer",
    "trust_ratio", "add_noise", "noise_std", "orthograd",
    "dp_noise", "prune_gradients", "random_mask", "top_k", "quantize",
    "spam_clip", "momentum_reset", "warmup_scale", "spam", "ada_clip", "ada_norm", "stable_spam",
]

try:  # conflict.py (PCGrad, MGDA, CAGrad, UPGrad, ...) is written separately; only its absence is tolerated
    from . import conflict as _conflict
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.conflict":
        raise
else:
    from .conflict import *  # noqa: F401,F403

    __all__ += [n for n in _conflict.__all__ if n not in __all__]
