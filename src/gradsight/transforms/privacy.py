"""Gradient-privacy defences as gradient transforms: DP-SGD noise, pruning, random masks, top-k, quantisation.

Only `dp_noise` (after per-example clipping, with an accountant) gives formal differential privacy; the others
are the heuristic defences of the gradient-inversion literature, measured against attacks in
`gradsight.privacy`:

- `dp_noise`: Opacus' ``DPOptimizer.add_noise`` + ``scale_grad`` (optimizers/optimizer.py) on the clipped sum.
- `prune_gradients`: DLG's defence (Zhu et al. 2019, "Deep Leakage from Gradients", Sec. 5: zero the smallest
  p% of each tensor; >= 20% stops DLG there).
- `random_mask`: LAMP's ``--defense_pct_mask`` (Balunovic et al. 2022): zero each entry with probability p.
- `top_k`: gradient sparsification (keep the largest entries of the whole model; e.g. Aji & Heafield 2017).
- `quantize`: per-tensor uniform symmetric quantisation (as in QSGD-style compression, deterministic rounding).

All are `GradientTransform`s (init/update on {name: Tensor}); randomised ones keep a ``torch.Generator`` state
in the transform state (as `clipping.add_noise`), so a run resumed from ``Wrapped.state_dict()`` draws the same
numbers. Entries are processed in dict order. ``torch.Generator`` is not a cryptographically secure RNG (Opacus'
``secure_mode`` uses torchcsprng): fine for experiments, not for a deployment's guarantee.

Example:
    >>> import gradsight.transforms as gt
    >>> w = gt.wrap(opt, gt.dp_noise(1.0, 1.0, expected_batch_size=64), model)   # p.grad = clipped sum
    >>> w = gt.wrap(opt, gt.prune_gradients(0.9), model)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .base import GradientTransform, stateless

__all__ = ["dp_noise", "prune_gradients", "random_mask", "top_k", "quantize"]


def _check_fraction(fraction: float, name: str) -> float:
    f = float(fraction)
    if not (0.0 <= f <= 1.0):
        raise ValueError(f"{name}: fraction must be in [0, 1] (got {fraction})")
    return f


def _count(fraction: float, n: int) -> int:
    """round(fraction * n) to the nearest integer (halves up): the exact number of entries selected."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def _rng_init(seed: int):
    def init(params):
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
        return {"count": 0, "rng": gen.get_state(), "device": str(dev)}

    return init


def _rng(state) -> torch.Generator:
    gen = torch.Generator(device=state["device"])
    gen.set_state(state["rng"])
    return gen


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Draw in float64 for float64 gradients, float32 otherwise (bf16/fp16 gradients get float32 draws)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _total_norm(max_grad_norm) -> float:
    """C for flat clipping; sqrt(sum_l C_l^2) for per-layer norms (Opacus perlayeroptimizer.py)."""
    if isinstance(max_grad_norm, Mapping):
        max_grad_norm = list(max_grad_norm.values())
    if isinstance(max_grad_norm, (list, tuple)):
        return math.sqrt(sum(float(c) ** 2 for c in max_grad_norm))
    return float(max_grad_norm)


def dp_noise(noise_multiplier: float, max_grad_norm, expected_batch_size: float, seed: int = 0
             ) -> GradientTransform:
    """DP-SGD's noise and averaging on the clipped SUM of per-example gradients (Opacus ``loss_reduction="mean"``).

    g <- (g + sigma * C * z) / (q N),   z ~ N(0, I) drawn per tensor in dict order,

    where g is sum_e min(1, C / (||g_e|| + 1e-6)) g_e (from `gradsight.privacy.clip.PerExampleClipper`), sigma the
    noise multiplier, C the clipping norm (per-layer: C = sqrt(sum_l C_l^2), Opacus perlayeroptimizer.py) and
    q N the *expected* batch size: Opacus divides by it even when a Poisson batch is larger, smaller or empty
    (opacus #420; an empty batch still gets noise, opacus #161). Reference: opacus/optimizers/optimizer.py
    (``add_noise``: ``p.grad = (p.summed_grad + noise).view_as(p)``; ``scale_grad``:
    ``p.grad /= expected_batch_size * accumulated_iterations``).

    Noise is drawn from a ``torch.Generator`` on the parameters' device (float64 for float64 gradients, float32
    otherwise) whose state is kept in the transform state. ``ctx.stats["dp_noise"] = {"std": sigma * C,
    "expected_batch_size": qN}`` (std of the noise on the sum).

    Args:
        noise_multiplier: sigma >= 0 (0: averaging only).
        max_grad_norm: C > 0 (float), or per-layer norms (a dict or list of C_l).
        expected_batch_size: q N > 0.
        seed: generator seed.
    Returns:
        A transform with state ``{"count", "rng", "device"}``.
    """
    sigma, C, B = float(noise_multiplier), _total_norm(max_grad_norm), float(expected_batch_size)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"dp_noise: noise multiplier must be a finite number >= 0 (got {noise_multiplier})")
    if not C > 0:
        raise ValueError(f"dp_noise: max_grad_norm must be > 0 (got {max_grad_norm})")
    if sigma > 0 and not math.isfinite(C):
        raise ValueError(f"dp_noise: noise multiplier {sigma} with an infinite max_grad_norm has infinite noise")
    if not (B > 0 and math.isfinite(B)):
        raise ValueError(f"dp_noise: expected_batch_size must be > 0 (got {expected_batch_size})")
    std = sigma * C if sigma > 0 else 0.0

    def update(grads, state, params=None, ctx=None):
        gen = _rng(state)
        for g in grads.values():
            if std > 0:
                z = torch.randn(g.shape, generator=gen, device=gen.device, dtype=_draw_dtype(g.dtype))
                g.add_(z.to(g.device, g.dtype), alpha=std)  # sum + N(0, (sigma C)^2)
            g.div_(B)  # / expected batch size
        if ctx is not None:
            ctx.stats["dp_noise"] = {"std": std, "expected_batch_size": B}
        return grads, {"count": state["count"] + 1, "rng": gen.get_state(), "device": state["device"]}

    return GradientTransform(_rng_init(seed), update)


def prune_gradients(fraction: float) -> GradientTransform:
    """Zero the smallest-magnitude entries of each tensor (DLG's pruning defence).

    Per tensor with n entries: k = round(fraction * n) entries are zeroed, those with the smallest |g|; ties
    are broken by a stable sort of |g| on the flattened tensor (the lower flat index is zeroed first), so the
    count is exact. (DLG's code thresholds at a percentile instead, which zeroes more than k on ties.)
    ``ctx.stats["prune_gradients"] = {"zeroed": total entries zeroed}``.

    Args:
        fraction: p in [0, 1].
    """
    p = _check_fraction(fraction, "prune_gradients")

    def fn(grads, params, ctx):
        zeroed = 0
        for g in grads.values():
            k = _count(p, g.numel())
            if k == 0:
                continue
            flat = g.view(-1) if g.is_contiguous() else g.reshape(-1)
            order = torch.sort(flat.abs(), stable=True).indices  # ascending |g|
            flat[order[:k]] = 0.0
            if flat.data_ptr() != g.data_ptr():
                g.copy_(flat.view_as(g))
            zeroed += k
        if ctx is not None:
            ctx.stats["prune_gradients"] = {"zeroed": zeroed}
        return grads

    return stateless(fn)


def random_mask(fraction: float, seed: int = 0) -> GradientTransform:
    """Zero each entry independently with probability ``fraction`` (LAMP's ``--defense_pct_mask``), no rescaling.

    mask = (u >= fraction), u ~ U[0, 1) drawn per tensor in dict order (float32) from a generator kept in the
    state; g <- g * mask. ``ctx.stats["random_mask"] = {"zeroed": count}``.

    Args:
        fraction: p in [0, 1].
        seed: generator seed.
    """
    p = _check_fraction(fraction, "random_mask")

    def update(grads, state, params=None, ctx=None):
        gen = _rng(state)
        zeroed = 0
        for g in grads.values():
            u = torch.rand(g.shape, generator=gen, device=gen.device, dtype=torch.float32)
            drop = (u < p).to(g.device)
            g.masked_fill_(drop, 0.0)
            zeroed += int(drop.sum())
        if ctx is not None:
            ctx.stats["random_mask"] = {"zeroed": zeroed}
        return grads, {"count": state["count"] + 1, "rng": gen.get_state(), "device": state["device"]}

    return GradientTransform(_rng_init(seed), update)


def top_k(fraction: float) -> GradientTransform:
    """Keep the k = round(fraction * N) largest |g| over ALL tensors (N entries in total); zero the rest.

    Ranking is global (the tensors flattened and concatenated in dict order, |g| compared in float64); ties are
    broken by a stable descending sort (the earlier entry is kept). ``ctx.stats["top_k"] = {"kept": k,
    "threshold": smallest kept |g|}``.

    Args:
        fraction: the kept fraction in [0, 1].
    """
    p = _check_fraction(fraction, "top_k")

    def fn(grads, params, ctx):
        tensors = list(grads.values())
        if not tensors:
            return grads
        flat = torch.cat([g.detach().reshape(-1).abs().to(tensors[0].device, torch.float64) for g in tensors])
        k = _count(p, flat.numel())
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)  # (N,)
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:k]] = True
        start = 0
        for g in tensors:
            m = keep[start:start + g.numel()].view(g.shape).to(g.device)
            g.masked_fill_(~m, 0.0)
            start += g.numel()
        if ctx is not None:
            ctx.stats["top_k"] = {"kept": k, "threshold": float(flat[order[k - 1]]) if k > 0 else math.inf}
        return grads

    return stateless(fn)


def quantize(bits: int) -> GradientTransform:
    """Per-tensor uniform symmetric quantisation to 2^(b-1) - 1 levels on each side of zero.

    s = max|g| / (2^(b-1) - 1);  g <- s * round(g / s)   (round half to even, ``torch.round``),

    so the values lie on the grid {-L..L} * s with L = 2^(b-1) - 1 (b = 2: {-s, 0, s}, i.e. ternary) and max|g|
    is kept exactly. A zero tensor stays zero. Deterministic (no stochastic rounding). ``ctx.stats["quantize"] =
    {"scale": {name: s}}``.

    Args:
        bits: b >= 2.
    """
    if int(bits) != bits or int(bits) < 2:
        raise ValueError(f"quantize: bits must be an integer >= 2 (got {bits})")
    levels = 2 ** (int(bits) - 1) - 1

    def fn(grads, params, ctx):
        scales = {}
        for n, g in grads.items():
            s = g.detach().abs().max() / levels
            if float(s) > 0:
                g.copy_(torch.round(g / s) * s)
            scales[n] = s
        if ctx is not None:
            ctx.stats["quantize"] = {"scale": scales}
        return grads

    return stateless(fn)
