"""SPAM and Stable-SPAM as gradient transforms in front of any Adam-like torch optimizer.

SPAM (Huang et al. 2025, arXiv 2501.06842; code TianjinYellow/SPAM-Optimizer) = Adam + spike-aware element
clipping against Adam's second moment + a periodic momentum reset with a cosine lr warm-up after each reset.
Stable-SPAM (arXiv 2502.17055; code TianjinYellow/StableSPAM) = Adam + AdaClip (clip at an EMA of max|g|) +
AdaGN (rescale each tensor's gradient by EMAs of its norm) + momentum reset. Here the pieces are separate
transforms; the optimizer-coupled ones (`spam_clip`, `momentum_reset`) read and zero ``optimizer.state[p]``
(``exp_avg``, ``exp_avg_sq``), so they need ``ctx.optimizer`` and ``ctx.params`` (`wrap` provides both):

    >>> w = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0), spam(), model)
    >>> w = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), stable_spam(), model)

Step counting: k = ctx.step + 1 is the 1-based index of the optimizer step about to be taken (SPAM's
``total_step + 1``).

Differences from the peers, all measured against pytorch-optimizer 4.1.0 (benchmarks/transforms.py):
- torch's Adam adds eps to sqrt(v / (1 - beta2^t)), SPAM (HF-style AdamW) to sqrt(v) before the bias
  correction; the effective eps differs by sqrt(1 - beta2^t) (a factor 31.6 at t = 1, 1 after a few thousand
  steps). With eps << sqrt(v) the trajectories agree to float rounding.
- SPAM decays weights after the Adam update with the *unscaled* lr; torch's AdamW decays before the update
  with the lr of the step, which `wrap` multiplies by the post-reset warm-up factor. Identical with
  weight_decay = 0.
- Stable-SPAM skips the Adam update of a tensor whose (clipped) gradient is exactly zero; torch's Adam still
  decays its moments and moves it by momentum.
"""

from __future__ import annotations

import math

import torch

from .base import Context, GradientTransform, chain, replace_where_

__all__ = ["spam_clip", "momentum_reset", "warmup_scale", "spam", "ada_clip", "ada_norm", "stable_spam"]


def _require(ctx: Context | None, who: str) -> torch.optim.Optimizer:
    if ctx is None or ctx.optimizer is None or ctx.params is None:
        raise ValueError(f"{who} reads the optimizer's Adam moments: use it through wrap(optimizer, tx, model), "
                         f"or pass ctx=Context(step=..., optimizer=..., params={{name: Parameter}})")
    opt = ctx.optimizer
    if not any("betas" in g for g in opt.param_groups):
        raise ValueError(f"{who} needs an Adam-like optimizer (exp_avg / exp_avg_sq state, betas), "
                         f"got {type(opt).__name__}")
    return opt


def _moments(opt: torch.optim.Optimizer, p, name: str, who: str, keys=("exp_avg_sq",)) -> dict | None:
    """``opt.state[p]``, or None before the optimizer's first step for p; ValueError if it lacks ``keys``."""
    st = opt.state.get(p)
    if not st:
        return None
    missing = [k for k in keys if k not in st]
    if missing:
        raise ValueError(f"{who}: {type(opt).__name__} keeps no {missing} for {name!r}; "
                         f"it needs an Adam-like optimizer (Adam, AdamW, NAdam, RAdam)")
    return st


def spam_clip(threshold: float = 5000.0, skip_first: int = 20, reset_every: int | None = 500,
              stats_key: str = "spam_clip") -> GradientTransform:
    """SPAM's spike-aware clipping against Adam's second moment v *before* this step's update.

    Entries with g_i^2 > θ v_i become sign(g_i) sqrt(θ v_i) (θ = 5000: |g| > 70.7 sqrt(v)). Active only when
    k >= skip_first and, with ``reset_every``, k mod reset_every >= skip_first (not during the first
    ``skip_first`` steps after each momentum reset, while v is rebuilt); k = ctx.step + 1. Parameters the
    optimizer has no state for yet (before their first step) are not clipped; SPAM would compare against v = 0
    and zero the whole gradient, which only matters with skip_first = 0.
    ``ctx.stats[stats_key] = {"clipped": {name: count tensor}, "active": bool}``.

    Args:
        threshold: θ (SPAM default 5000); 0 disables.
        skip_first: SPAM's ``grad_accu_steps`` (20).
        reset_every: the momentum-reset period ΔT of the `momentum_reset` it runs with (500), or None.
    Raises:
        ValueError: no ``ctx.optimizer``/``ctx.params``, or an optimizer without ``exp_avg_sq``.
    Example:
        >>> # v = 1, θ = 5000, g = [1000, 50, -1000] -> [70.71, 50, -70.71]
    """

    def update(grads, state, params=None, ctx=None):
        opt = _require(ctx, "spam_clip")
        k = ctx.step + 1
        active = threshold != 0 and k >= skip_first and (not reset_every or k % reset_every >= skip_first)
        counts = {}
        if active:
            for n, g in grads.items():
                st = _moments(opt, ctx.params[n], n, "spam_clip")
                if st is None:
                    continue
                limit = st["exp_avg_sq"] * threshold
                mask = g.square() > limit
                replace_where_(g, mask, lambda ix: g[ix].sign() * limit[ix].sqrt())
                counts[n] = mask.sum()
        ctx.stats[stats_key] = {"clipped": counts, "active": active}
        return grads, state

    return GradientTransform(lambda params: {}, update)


def warmup_scale(c: int, warmup: int, start: float = 0.99) -> float:
    """SPAM's post-reset lr factor at c steps after a reset: 1 - CosineDecay(start -> 0 over ``warmup``)(c).

    s(c) = 1 - start (1 + cos(π (c + 1) / (warmup + 1))) / 2 for c < warmup, else 1; s(0) ≈ 0.01 and
    s(warmup) = 1 (SPAM's ``CosineDecay`` built on ``CosineAnnealingLR(T_max = warmup + 1)``, stepped once per
    call; closed form checked against it).
    """
    if c >= warmup:
        return 1.0
    return 1.0 - start * (1.0 + math.cos(math.pi * (c + 1) / (warmup + 1))) / 2.0


def momentum_reset(every: int = 500, warmup: int = 150, reset_step: bool = False,
                   stats_key: str = "momentum_reset") -> GradientTransform:
    """Zero Adam's moments periodically, then warm the lr up again (SPAM; Stable-SPAM with ``reset_step``).

    On every step whose 1-based index k = ctx.step + 1 is a multiple of ``every``, ``exp_avg`` and
    ``exp_avg_sq`` (and ``max_exp_avg_sq`` if present) of every parameter in ``grads`` are zeroed before the
    optimizer's update. SPAM keeps the optimizer's step counter, so bias correction stays about 1 after a
    reset; ``reset_step=True`` sets ``state['step']`` to 0 so the update of the reset step uses t = 1
    (Stable-SPAM, which sets its step to 1 on the reset step).

    Warm-up: for c = k mod every < ``warmup`` steps after a reset (k >= every), ``ctx.lr_scale`` is multiplied
    by `warmup_scale` (c, warmup): 0.0101 on the reset step, 1 from c = warmup on. No warm-up before the first
    reset (SPAM starts its counter at warmup + 1). Under `wrap` the factor scales every group's lr for the step,
    so AdamW's decoupled weight decay is scaled too (SPAM decays with the unscaled lr).

    Official Stable-SPAM rebinds the state to fresh zeros *after* binding the moments it updates, so its reset
    step still uses the pre-reset moments (with t = 1) and the zeros take effect one step later (anchors §2.7).
    This transform, like pytorch-optimizer, resets before the update; the official timing is not reproduced.

    ``ctx.stats[stats_key] = {"reset": bool, "lr_scale": float}``. State ``{"resets": int}``.
    """

    def update(grads, state, params=None, ctx=None):
        opt = _require(ctx, "momentum_reset")
        k = ctx.step + 1
        reset = bool(every) and k % every == 0
        if reset:
            for n in grads:
                st = _moments(opt, ctx.params[n], n, "momentum_reset", ("exp_avg", "exp_avg_sq"))
                if st is None:
                    continue
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in st and torch.is_tensor(st[key]):
                        st[key].zero_()
                if reset_step:
                    st["step"] = st["step"].zero_() if torch.is_tensor(st["step"]) else 0
        scale = warmup_scale(k % every, warmup) if every and k >= every and warmup > 0 else 1.0
        ctx.lr_scale *= scale
        ctx.stats[stats_key] = {"reset": reset, "lr_scale": scale}
        return grads, {"resets": state["resets"] + int(reset)}

    return GradientTransform(lambda params: {"resets": 0}, update)


def spam(threshold: float = 5000.0, reset_every: int = 500, warmup: int = 150,
         skip_first: int = 20) -> GradientTransform:
    """SPAM = chain(momentum_reset(reset_every, warmup), spam_clip(threshold, skip_first, reset_every)).

    Defaults are SPAM's (threshold 5000, DeltaT 500, warmup_steps 150, grad_accu_steps 20; use AdamW with
    betas (0.9, 0.999), eps 1e-6). pytorch-optimizer's ``SPAM`` defaults ``warmup_epoch=50``: pass
    ``warmup=50`` to match it. The sparse-momentum ``density < 1`` variant is not provided.

    Example:
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        >>> w = wrap(opt, spam(), model)
    """
    return chain(momentum_reset(reset_every, warmup), spam_clip(threshold, skip_first, reset_every))


def _f32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def ada_clip(gamma3: float = 0.999) -> GradientTransform:
    """Stable-SPAM's AdaClip, per tensor: clip at a bias-corrected EMA of max|g|.

    M = max_i |g_i|; m <- γ3 m + (1 - γ3) M (lerp); m̂ = m / (1 - γ3^t); entries with |g_i| > m̂ become
    g_i m̂ / M (rescaled relative to the current maximum, so the order is kept). t = this transform's update
    count from 1 (Stable-SPAM's global step). At t = 1, m̂ = M: nothing is clipped.

    State:
        ``{"count": int, "m_max": {name: 0-d tensor}}`` (float32 at least).
    Example:
        >>> # step 1 max|g| = 1: unchanged; step 2 g = [100, 0.5] -> m̂ = 50.525, g -> [50.525, 0.5]
    """

    def init(params):
        return {"count": 0, "m_max": {n: torch.zeros((), dtype=_f32(p.dtype), device=p.device)
                                      for n, p in params.items()}}

    def update(grads, state, params=None, ctx=None):
        t = state["count"] + 1
        bc = 1.0 - gamma3 ** t
        m_max = state["m_max"]
        for n, g in grads.items():
            if g.numel() == 0:
                continue
            if n not in m_max:
                m_max[n] = torch.zeros((), dtype=_f32(g.dtype), device=g.device)
            lo, hi = torch.aminmax(g)
            M = torch.maximum(lo.abs(), hi.abs())  # max |g_i| in one pass (vector_norm(inf) is 10x slower on CPU)
            m_max[n].lerp_(M.to(m_max[n].dtype), 1.0 - gamma3)
            m_hat = (m_max[n] / bc).to(g.dtype)
            if g.device.type != "cpu" or M > m_hat:  # on CPU the test is free and skips the usual no-clip case
                replace_where_(g, g.abs() > m_hat, lambda ix: g[ix] / M * m_hat)  # |g| > m_hat >= 0: M > 0
        return grads, {"count": t, "m_max": m_max}

    return GradientTransform(init, update)


def ada_norm(gamma1: float = 0.7, gamma2: float = 0.9, eps: float = 1e-8) -> GradientTransform:
    """Stable-SPAM's AdaGN, per tensor: rescale g to a norm from EMAs of its norm.

    n = ||g||; a <- γ1 a + (1 - γ1) n; b <- γ2 b + (1 - γ2) n^2; â = a / (1 - γ1^t), b̂ = b / (1 - γ2^t);
    g <- (g / n) â / (sqrt(b̂) + eps). At t = 1 the result has norm n / (n + eps) (unit norm); in steady state
    about E[n] / sqrt(E[n^2]) <= 1. A zero gradient is left alone and does not update the EMAs. t = this
    transform's update count from 1. Defaults: the constructor's γ1 0.7, γ2 0.9, eps 1e-8 (the BF16 script
    uses 0.85, 0.99999). The optional ``total_T`` cosine decay of γ1 and β1 is not provided.

    State:
        ``{"count": int, "m": {name: 0-d}, "v": {name: 0-d}}`` (float32 at least).
    """

    def init(params):
        z = {n: torch.zeros((), dtype=_f32(p.dtype), device=p.device) for n, p in params.items()}
        return {"count": 0, "m": z, "v": {n: t.clone() for n, t in z.items()}}

    def update(grads, state, params=None, ctx=None):
        t = state["count"] + 1
        bc1, bc2 = 1.0 - gamma1 ** t, 1.0 - gamma2 ** t
        m, v = state["m"], state["v"]
        for n, g in grads.items():
            if n not in m:
                m[n] = torch.zeros((), dtype=_f32(g.dtype), device=g.device)
                v[n] = torch.zeros_like(m[n])
            nrm = torch.linalg.vector_norm(g.to(m[n].dtype))
            active = nrm > 0
            m[n].copy_(torch.where(active, m[n].lerp(nrm, 1.0 - gamma1), m[n]))
            v[n].copy_(torch.where(active, v[n].lerp(nrm.square(), 1.0 - gamma2), v[n]))
            c = torch.where(active, (m[n] / bc1) / ((v[n] / bc2).sqrt() + eps), 1.0)
            g.div_(torch.where(active, nrm, 1.0)).mul_(c)  # g / n * c, in Stable-SPAM's order
        return grads, {"count": t, "m": m, "v": v}

    return GradientTransform(init, update)


def stable_spam(gamma1: float = 0.7, gamma2: float = 0.9, gamma3: float = 0.999, reset_every: int = 1000,
                eps: float = 1e-8) -> GradientTransform:
    """Stable-SPAM = chain(momentum_reset(reset_every, warmup=0, reset_step=True), ada_clip(γ3), ada_norm(γ1, γ2)).

    Defaults are the constructor's (γ1 0.7, γ2 0.9, γ3 0.999, update_proj_gap 1000, eps 1e-8). Use AdamW with
    betas (0.9, 0.999) and eps 1e-8, weight decay as wanted (Stable-SPAM decays before the update, as AdamW).
    The reset zeroes the moments before this step's update (pytorch-optimizer's behaviour, not the official
    code's one-step-late reset; see `momentum_reset`).

    Example:
        >>> w = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), stable_spam(), model)
    """
    return chain(momentum_reset(reset_every, warmup=0, reset_step=True), ada_clip(gamma3),
                 ada_norm(gamma1, gamma2, eps))
