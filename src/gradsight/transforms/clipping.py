"""Clipping, normalisation, annealed noise and ⊥Grad as gradient transforms.

Every transform here acts per parameter tensor ("layer" = one tensor, biases and norm scales included) and
computes its reductions in float32 at least. Norms stay on the device (no host sync). Gradients are modified
in place. The recommended order in a chain (anchors §2.13): unscale -> `apply_if_finite` -> spike clip ->
global or per-layer clip -> AGC -> noise -> ⊥Grad -> optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GradientTransform, global_norm, stateless, tensor_norms

__all__ = [
    "clip_by_global_norm", "clip_per_layer", "adaptive_grad_clip", "unitwise_norm", "normalize_per_layer",
    "trust_ratio", "add_noise", "noise_std", "orthograd",
]


def _need_params(params, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} reads the parameters: pass params to update() (wrap() does)")


def _scale_(grads: dict[str, Tensor], names: list[str], coefs: list[Tensor]) -> None:
    """g_l *= c_l in place, one foreach call per device."""
    by_dev: dict = {}
    for n, c in zip(names, coefs):
        g = grads[n]
        gs, cs = by_dev.setdefault(g.device, ([], []))
        gs.append(g)
        cs.append(c.to(g.device))
    for gs, cs in by_dev.values():
        torch._foreach_mul_(gs, cs)


def clip_by_global_norm(max_norm: float, stats_key: str = "clip_by_global_norm") -> GradientTransform:
    """Scale all gradients by one factor so that their global L2 norm is at most ``max_norm``.

    g <- g * min(1, C / (||g|| + 1e-6)),  ||g|| = sqrt(sum_l ||g_l||^2).

    The torch convention (``torch.nn.utils.clip_grad_norm_``: +1e-6 in the denominator, coefficient clamped to
    1) is kept, so a wrapped step equals ``clip_grad_norm_`` + step bit for bit; optax divides exactly
    (``C / ||g||`` when ``||g|| > C``), a relative difference of 1e-6/||g||. ``ctx.stats[stats_key]`` gets
    ``{"norm": pre-clip global norm, "coef": the factor}`` (device tensors).

    Args:
        max_norm: C > 0.
        stats_key: where the measurements go in ``ctx.stats``.
    Example:
        >>> clip_by_global_norm(1.0)        # g = (3, 4) -> (0.6, 0.8)
    """

    def fn(grads, params, ctx):
        names = list(grads)
        if not names:
            return grads
        total = global_norm(tensor_norms([grads[n] for n in names]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        _scale_(grads, names, [coef] * len(names))
        if ctx is not None:
            ctx.stats[stats_key] = {"norm": total, "coef": coef}
        return grads

    return stateless(fn)


def clip_per_layer(max_norm: float, split: str = "uniform",
                   stats_key: str = "clip_per_layer") -> GradientTransform:
    """Clip each tensor independently, with bounds whose squares add up to C^2 (sensitivity stays C).

    g_l <- g_l * min(1, C_l / ||g_l||), with C_l = C / sqrt(L) (``split="uniform"``) or
    C_l = C * sqrt(D_l / D) (``split="dim"``); L = number of tensors and D_l = numel of tensor l, D = sum D_l,
    fixed at ``init`` from the parameters given to it (McMahan et al. 2018; optax
    ``per_example_layer_norm_clip``). Tensors under their bound are left unchanged (unlike the released DP-ASR
    code, which rescales every layer to its bound once the global norm exceeds C; METHODS §11.3).
    ``ctx.stats[stats_key] = {"coef": {name: factor}}``.

    Args:
        max_norm: C > 0.
        split: "uniform" or "dim".
    State:
        ``{"max_norms": {name: C_l}}``.
    Example:
        >>> clip_per_layer(1.0)             # norms (3, 4) -> (0.7071, 0.7071); (0.1, 4) -> (0.1, 0.7071)
    """
    if split not in ("uniform", "dim"):
        raise ValueError(f"split must be 'uniform' or 'dim', got {split!r}")

    def init(params):
        L = len(params)
        D = sum(p.numel() for p in params.values())
        if split == "uniform":
            return {"max_norms": {n: max_norm / math.sqrt(L) for n in params}}
        return {"max_norms": {n: max_norm * math.sqrt(p.numel() / D) for n, p in params.items()}}

    def update(grads, state, params=None, ctx=None):
        names = list(grads)
        unknown = [n for n in names if n not in state["max_norms"]]
        if unknown:
            raise KeyError(f"clip_per_layer: no bound for {unknown[:3]} (not among the parameters given to init)")
        norms = tensor_norms([grads[n] for n in names])
        coefs = []
        for n, nrm in zip(names, norms):
            c = state["max_norms"][n]
            coefs.append(c / torch.clamp(nrm, min=c))  # min(1, C_l/||g_l||), 1 for a zero gradient
        _scale_(grads, names, coefs)
        if ctx is not None:
            ctx.stats[stats_key] = {"coef": dict(zip(names, coefs))}
        return grads, state

    return GradientTransform(init, update)


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per unit of a PyTorch weight: over dims 1.. for ndim >= 2 (rows of a Linear (out, in), filters of
    a Conv (out, in, kh, kw)), keepdim; the whole tensor for ndim <= 1 (a bias is one unit). float32 at least.

    This is timm's ``unitwise_norm``. pytorch-optimizer reduces only dim 1 for 3-D tensors; optax (JAX (in, out)
    layout) reduces axis 0 for 2-D: do not port its axes literally.
    """
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def adaptive_grad_clip(clipping: float = 0.01, eps: float = 1e-3) -> GradientTransform:
    """Adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization"), unit-wise.

    For each unit i (see `unitwise_norm`): if ||G_i|| > λ max(||W_i||, ε) then G_i <- λ max(||W_i||, ε) G_i /
    max(||G_i||, 1e-6). Defaults λ = 0.01, ε = 1e-3 (timm; optax has the same ε). The paper does not clip the
    final classifier: exclude it with `masked`.

    Example:
        >>> masked(adaptive_grad_clip(0.01), lambda n, p: not n.startswith("head"))
        >>> # W row (3, 4), G row (0.3, 0.4) -> (0.03, 0.04); a zero row of W -> (6e-6, 8e-6)
    """

    def fn(grads, params, ctx):
        _need_params(params, "adaptive_grad_clip")
        for n, g in grads.items():
            max_norm = unitwise_norm(params[n].detach()).clamp(min=eps) * clipping
            g_norm = unitwise_norm(g)
            g.mul_(torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), 1.0))  # one factor per unit
        return grads

    return stateless(fn)


def normalize_per_layer() -> GradientTransform:
    """g_l <- g_l / ||g_l|| per tensor (a zero gradient stays zero): layer-wise gradient normalisation."""

    def fn(grads, params, ctx):
        names = list(grads)
        norms = tensor_norms([grads[n] for n in names])
        _scale_(grads, names, [1.0 / torch.where(nrm > 0, nrm, 1.0) for nrm in norms])
        return grads

    return stateless(fn)


def trust_ratio() -> GradientTransform:
    """LAMB/LARS trust ratio per tensor: u_l <- u_l * ||w_l|| / ||u_l||, factor 1 if either norm is 0.

    LAMB (You et al. 2020) applies it to the Adam *update*; a pre-step gradient transform can only apply it to
    the gradient, which before SGD gives LARS without its coefficient. Before Adam it would be undone by Adam's
    normalisation. Needs ``params``.
    """

    def fn(grads, params, ctx):
        _need_params(params, "trust_ratio")
        names = list(grads)
        u = tensor_norms([grads[n] for n in names])
        w = tensor_norms([params[n].detach() for n in names])
        coefs = [torch.where((wn > 0) & (un > 0), wn / torch.where(un > 0, un, 1.0), 1.0) for wn, un in zip(w, u)]
        _scale_(grads, names, coefs)
        return grads

    return stateless(fn)


def noise_std(eta: float, gamma: float, t: int) -> float:
    """sigma_t = sqrt(eta / (1 + t)^gamma), t counted from 0."""
    return math.sqrt(eta / (1.0 + t) ** gamma)


def add_noise(eta: float = 0.01, gamma: float = 0.55, seed: int = 0) -> GradientTransform:
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for
    Very Deep Networks").

    g <- g + N(0, sigma_t^2 I), sigma_t^2 = eta / (1 + t)^gamma, t = this transform's update count from 0
    (optax's ``add_noise`` divides by its incremented count, the same sequence). Defaults eta = 0.01,
    gamma = 0.55: sigma_0 = 0.1, sigma_1 = 0.0826, sigma_99 = 0.0282.
    The noise comes from a ``torch.Generator`` on the parameters' device whose state (a CPU ByteTensor) is kept
    in the transform state, so a run resumed from ``state_dict`` draws the same noise. Noise is drawn in
    float32 and added to each gradient in dict order. Put it after clipping. ``ctx.stats["add_noise"]`` gets
    ``{"sigma": sigma_t}``.

    State:
        ``{"count": int, "rng": ByteTensor, "device": str}``.
    """

    def init(params):
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        return {"count": 0, "rng": gen.get_state(), "device": str(dev)}

    def update(grads, state, params=None, ctx=None):
        gen = torch.Generator(device=state["device"])
        gen.set_state(state["rng"])
        sigma = noise_std(eta, gamma, state["count"])
        for g in grads.values():
            z = torch.randn(g.shape, generator=gen, device=gen.device, dtype=torch.float32)
            g.add_(z.to(g.device, g.dtype), alpha=sigma)
        if ctx is not None:
            ctx.stats["add_noise"] = {"sigma": sigma}
        return grads, {"count": state["count"] + 1, "rng": gen.get_state(), "device": state["device"]}

    return GradientTransform(init, update)


def orthograd(eps: float = 1e-30) -> GradientTransform:
    """⊥Grad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"), per parameter tensor.

    g_perp = g - (θ·g / (θ·θ + eps)) θ, then rescaled to the norm of g: g <- g_perp ||g|| / (||g_perp|| + eps).
    Computed in float32 (float64 for float64 tensors) on the flattened tensor. As in pytorch-optimizer's
    ``OrthoGrad`` (not the official code), a gradient parallel to θ (||g_perp|| <= 4 * machine-eps * ||g||)
    gives zero instead of rounding noise blown up to ||g||. Needs ``params``.

    Example:
        >>> orthograd()                    # θ = (1, 0), g = (1, 1) -> (0, 1.414)
    """

    def fn(grads, params, ctx):
        _need_params(params, "orthograd")
        for n, grad in grads.items():
            dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
            w = params[n].detach().reshape(-1).to(dtype)
            g = grad.reshape(-1).to(dtype)
            proj = torch.dot(w, g).div_(torch.dot(w, w).add_(eps))
            g_perp = g.sub(w * proj)
            g_norm, perp_norm = g.norm(2), g_perp.norm(2)
            g_perp.masked_fill_(perp_norm <= 4.0 * torch.finfo(dtype).eps * g_norm, 0.0)
            g_perp.mul_(g_norm / perp_norm.add_(eps))
            grad.copy_(g_perp.view_as(grad))
        return grads

    return stateless(fn)
