"""Importance scores of weights: pure functions of a weight and its calibration statistics (no I/O).

Weights are (d_out, d_in) like ``nn.Linear.weight``; every score is a float tensor shaped like the weight,
higher = more important (``neuron`` is the exception: one score per input unit, shape (d_in,)).
The statistics are the sums of ``stats.LayerStats`` (sq_in, g_sum, g_sq over the calibration examples).

Precision: a score is computed in float64 when any tensor input is float64, else in float32; the weight is
never modified (no in-place operation on a caller's tensor).

References:
    Wanda: Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for LLMs", ICLR 2024
        (locuslab/wanda lib/prune.py, lib/layerwrapper.py).
    GBLM-Pruner: Das, Sun, Ma, Shen, "Beyond Size: How Gradients Shape Pruning Decisions in LLMs", 2023
        (VILA-Lab/GBLM-Pruner gradient_computation.py, lib/prune.py).
    OBD: LeCun, Denker, Solla, "Optimal Brain Damage", NeurIPS 1989 (with the empirical Fisher diagonal).
    Taylor: Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019.
    SalUn: Fan et al., ICLR 2024 (OPTML-Group/Unlearn-Saliency Classification/generate_mask.py).
    GAPrune: Tang and Yang, arXiv 2509.10844 (yixuantt/GAPrune gaprune/features/gradient.py
        ``compute_local_gradient_alignment``, gaprune/model/SparseModel.py ``compute_dai_importance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["magnitude", "wanda", "gblm", "fisher_obd", "taylor", "salun", "alignment", "dai", "dai_terms",
           "neuron", "ScoreSpec", "SCORES", "score"]

_EPS = 1e-8  # GAPrune's epsilon (unit normalisation, sqrt(|W| + eps))


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any tensor input is float64, else float32 (the compute dtype of every score)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _f(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype)  # a new tensor whenever the dtype changes; never written in place below


def _check_n(n: int, what: str) -> None:
    if not n or n <= 0:
        raise ValueError(f"{what} must be a positive count of calibration examples, got {n!r}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# ------------------------------------------------------------------------------------ the simple scores


def magnitude(W: torch.Tensor) -> torch.Tensor:
    """Magnitude score |W_ij| (compared per tensor in the reference: wanda lib/prune.py ``prune_magnitude``)."""
    return _f(W, _dtype(W)).abs()


def wanda(W: torch.Tensor, sq_in: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Wanda score S_ij = |W_ij| * sqrt(sq_in_j / n_seq).

    sq_in_j / n_seq is Wanda's ``scaler_row``: the sum over sequences and tokens of x_tj^2 divided by the number
    of sequences (lib/layerwrapper.py), so sqrt of it is ||X_j||_2 / sqrt(N_seq).

    Args:
        W: (d_out, d_in) weight. sq_in: (d_in,) sum of squared inputs. n_seq: calibration sequences.
    Returns:
        (d_out, d_in) score.
    """
    _check_n(n_seq, "n_seq")
    _check_shape("sq_in", sq_in, (W.shape[1],))
    dt = _dtype(W, sq_in)
    act = torch.sqrt(_f(sq_in, dt) / n_seq)  # (d_in,)
    return _f(W, dt).abs() * act[None, :]  # (d_out, d_in)


def gblm(W: torch.Tensor, sq_in: torch.Tensor, n_seq: int, g_sq: torch.Tensor, alpha: float = 100.0
         ) -> torch.Tensor:
    """GBLM-Pruner score S_ij = |W_ij| * (sqrt(sq_in_j / n_seq) + alpha * sqrt(g_sq_ij)).

    g_sq = sum_n G_n^2 over calibration sequences, so alpha * sqrt(g_sq) = sqrt(sum_n (alpha G_n)^2) is the
    reference's l2 accumulator (gradient_computation.py, scale 100). alpha = 0 recovers Wanda exactly.

    Args:
        W: (d_out, d_in). sq_in: (d_in,). n_seq: sequences. g_sq: (d_out, d_in) sum of squared per-sequence
            gradients. alpha: the reference's ``--scale``.
    Returns:
        (d_out, d_in) score.
    """
    _check_n(n_seq, "n_seq")
    _check_shape("sq_in", sq_in, (W.shape[1],))
    _check_shape("g_sq", g_sq, tuple(W.shape))
    dt = _dtype(W, sq_in, g_sq)
    act = torch.sqrt(_f(sq_in, dt) / n_seq)  # (d_in,)
    return _f(W, dt).abs() * (act[None, :] + alpha * torch.sqrt(_f(g_sq, dt)))  # (d_out, d_in)


def fisher_obd(W: torch.Tensor, g_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Optimal Brain Damage with the empirical Fisher diagonal: S = 0.5 * (g_sq / n) * W^2.

    F_ii = (1/N) sum_e g_ei^2 approximates the Hessian diagonal; 0.5 F_ii w_i^2 is the loss increase of
    zeroing w_i in a quadratic model with a zero gradient.
    """
    _check_n(n, "n")
    _check_shape("g_sq", g_sq, tuple(W.shape))
    dt = _dtype(W, g_sq)
    w = _f(W, dt)
    return 0.5 * (_f(g_sq, dt) / n) * w * w


def taylor(W: torch.Tensor, g_sum: torch.Tensor, n: int) -> torch.Tensor:
    """First-order Taylor score S = |(g_sum / n) * W|: |change of the mean loss| when zeroing each weight."""
    _check_n(n, "n")
    _check_shape("g_sum", g_sum, tuple(W.shape))
    dt = _dtype(W, g_sum)
    return ((_f(g_sum, dt) / n) * _f(W, dt)).abs()


def salun(g_sum: torch.Tensor) -> torch.Tensor:
    """SalUn saliency |g| of the summed forget-loss gradient (sign-free, so -CE and CE give the same map)."""
    return _f(g_sum, _dtype(g_sum)).abs()


def neuron(neuron_sum: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per-input-unit score: mean over examples of |sum_t a_tj (W^T g_t)_j| = LayerStats.neuron / n_seq."""
    _check_n(n_seq, "n_seq")
    return _f(neuron_sum, _dtype(neuron_sum)) / n_seq


# ------------------------------------------------------------------------------------------- GAPrune


def _box_filter(a: torch.Tensor) -> torch.Tensor:
    """k x k mean filter, k = min(3, min(a.shape)), zero padding k // 2, output cropped to a's shape.

    The reference (``compute_local_gradient_alignment``) uses conv2d with padding k // 2; for k = 2 that yields
    (n+1, m+1) (an unusable shape there); we crop to the first (n, m), i.e. out_ij = mean of a over rows
    i-1..i and columns j-1..j (zeros outside).
    """
    k = min(3, min(a.shape))
    if k <= 1:
        return a
    kernel = torch.full((1, 1, k, k), 1.0 / (k * k), dtype=a.dtype)  # (1, 1, k, k)
    out = F.conv2d(a[None, None], kernel, padding=k // 2)[0, 0]  # (n + 1 - k + 2*(k//2), ...)
    return out[: a.shape[0], : a.shape[1]]


def alignment(g_gen: torch.Tensor, g_dom: torch.Tensor, smooth: bool = True, eps: float = _EPS) -> torch.Tensor:
    """GAPrune element-wise gradient alignment a = u * v, smoothed by a k x k box filter for 2-D tensors.

    u = gbar_gen / (||gbar_gen|| + eps), v = gbar_dom / (||gbar_dom|| + eps) (norms over the whole tensor), so
    sum_j u_j v_j = cos(gbar_gen, gbar_dom) (up to eps) and each |a_j| is O(1/numel). If either norm is <= eps
    the alignment is all zeros (as in the reference). 1-D tensors are not smoothed (reference behaviour).

    Args:
        g_gen, g_dom: mean (or summed: the scale cancels) gradients on general and domain data, same shape.
        smooth: apply the box filter (k = min(3, smallest dimension), zero padding) to 2-D tensors.
    Returns:
        alignment tensor shaped like the gradients.
    """
    if g_gen.shape != g_dom.shape:
        raise ValueError(f"g_gen has shape {tuple(g_gen.shape)} but g_dom has {tuple(g_dom.shape)}")
    dt = _dtype(g_gen, g_dom)
    gg, gd = _f(g_gen, dt), _f(g_dom, dt)
    ng, nd = torch.linalg.vector_norm(gg), torch.linalg.vector_norm(gd)
    if ng <= eps or nd <= eps:
        return torch.zeros_like(gg)
    a = (gg / (ng + eps)) * (gd / (nd + eps))
    if not smooth or a.dim() < 2:
        return a
    if a.dim() > 2:
        raise ValueError(f"alignment smoothing needs a 1-D or 2-D tensor, got shape {tuple(a.shape)}")
    return _box_filter(a)


def _dai_parts(W, F_dom, F_gen, align, mode):
    """The three DAI ingredients (fisher_dom, fisher_gen, regulariser base, alignment) in the chosen mode."""
    if mode not in ("code", "scaled"):
        raise ValueError(f"dai mode must be 'code' or 'scaled', got {mode!r}")
    for name, t in (("F_dom", F_dom), ("F_gen", F_gen), ("align", align)):
        _check_shape(name, t, tuple(W.shape))
    dt = _dtype(W, F_dom, F_gen, align)
    w = _f(W, dt).abs()
    fd, fg = _f(F_dom, dt) * w, _f(F_gen, dt) * w  # task relevance, input complexity
    reg = torch.sqrt(w + _EPS)
    a = _f(align, dt)
    if mode == "scaled":
        scale = fd.mean()
        if not scale > 0:  # all-zero domain term: fall back to the general one, then to 1
            scale = fg.mean() if fg.mean() > 0 else torch.ones((), dtype=dt)
        fd, fg = fd / scale, fg / scale
        reg = reg / reg.mean()
        a = a * a.numel()  # mean |a_j| <= 1/numel (Cauchy-Schwarz): rescale to O(1)
    return fd, fg, reg, a


def dai(W: torch.Tensor, F_dom: torch.Tensor, F_gen: torch.Tensor, align: torch.Tensor, beta: float = 1.0,
        gamma: float = 0.5, mode: str = "code") -> torch.Tensor:
    """GAPrune Domain Alignment Importance.

    mode "code" (SparseModel.py ``compute_dai_importance``, gamma = the CLI's compression_weight 0.5):

        DAI = softplus((F_dom |W| - beta F_gen |W|) * clamp(1 + 0.2 a, 0.8, 1.2) + gamma sqrt(|W| + 1e-8))

    (F already includes the reference's +1e-8; taken as given.)

    mode "scaled" (ours; METHODS.md section 3, numerical pitfalls): in the code formula the alignment is inert
    (|a_j| <= 1/numel, so 1 + 0.2 a rounds to 1 in float32 for big tensors) and the Fisher term is dwarfed by
    gamma sqrt(|W|) (F ~ 1e-8..1e-12), which makes DAI a monotone function of |W|. Per tensor we therefore use

        fd = F_dom|W| / m,  fg = F_gen|W| / m,  m = mean(F_dom|W|)       (so the domain term has mean 1)
        r  = sqrt(|W| + 1e-8) / mean(sqrt(|W| + 1e-8))                  (mean 1)
        a' = numel * a                                                   (mean |a'| <= 1)
        DAI = softplus((fd - beta fg) * clamp(1 + 0.2 a', 0.8, 1.2) + gamma r)

    Args:
        W: weight; F_dom, F_gen: per-weight Fisher diagonals (domain, general); align: ``alignment(...)``,
            all shaped like W. beta, gamma: the reference's beta and compression_weight. mode: "code"|"scaled".
    Returns:
        DAI tensor shaped like W (higher = keep).
    """
    fd, fg, reg, a = _dai_parts(W, F_dom, F_gen, align, mode)
    factor = torch.clamp(1.0 + 0.2 * a, 0.8, 1.2)
    return F.softplus((fd - beta * fg) * factor + gamma * reg)


def dai_terms(W: torch.Tensor, F_dom: torch.Tensor, F_gen: torch.Tensor, align: torch.Tensor, beta: float = 1.0,
              gamma: float = 0.5, mode: str = "code") -> dict[str, float]:
    """Relative magnitudes of the three DAI terms, to log the degenerate regime (METHODS.md 3, pitfalls).

    Returns:
        dict with fisher = mean |F_dom|W| - beta F_gen|W||, regulariser = mean gamma sqrt(|W| + 1e-8),
        align = mean |0.2 a| (all in the mode's scaling), fisher_over_reg = fisher / regulariser, and
        align_inert = fraction of weights whose factor clamp(1 + 0.2 a, 0.8, 1.2) is exactly 1 in float32
        (near 1: the alignment cannot change anything).
    """
    fd, fg, reg, a = _dai_parts(W, F_dom, F_gen, align, mode)
    fisher = float((fd - beta * fg).abs().mean())
    regul = float((gamma * reg).abs().mean())
    factor32 = torch.clamp(1.0 + 0.2 * a.to(torch.float32), 0.8, 1.2)
    return {"fisher": fisher, "regulariser": regul, "align": float((0.2 * a).abs().mean()),
            "fisher_over_reg": fisher / regul if regul > 0 else float("inf"),
            "align_inert": float((factor32 == 1.0).to(torch.float64).mean())}


# ----------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score: ``fn`` and the LayerStats fields it needs; ``per`` is "weight" or "input"."""

    fn: Callable[..., torch.Tensor]
    needs: tuple[str, ...]
    per: str = "weight"


SCORES: dict[str, ScoreSpec] = {
    "magnitude": ScoreSpec(magnitude, ()),
    "wanda": ScoreSpec(wanda, ("sq_in",)),
    "gblm": ScoreSpec(gblm, ("sq_in", "g_sq")),
    "fisher": ScoreSpec(fisher_obd, ("g_sq",)),
    "taylor": ScoreSpec(taylor, ("g_sum",)),
    "salun": ScoreSpec(salun, ("g_sum",)),
    "neuron": ScoreSpec(neuron, ("neuron",), per="input"),
}


def score(name: str, W: torch.Tensor, stats: Any, **opts) -> torch.Tensor:
    """Compute the registered score ``name`` from a LayerStats-like object.

    Args:
        name: a key of SCORES. W: (d_out, d_in) weight.
        stats: object with attributes sq_in, n_seq, g_sq, g_sum, neuron (``stats.LayerStats``).
        opts: extra keyword options of the score (e.g. alpha for gblm).
    Returns:
        the score: (d_out, d_in), or (d_in,) for "neuron".
    """
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; expected one of {', '.join(SCORES)}")
    missing = [f for f in SCORES[name].needs if getattr(stats, f, None) is None]
    if missing:
        raise ValueError(f"score {name!r} needs the statistic(s) {', '.join(missing)}, which were not collected")
    n = getattr(stats, "n_seq", 0)
    if name == "magnitude":
        return magnitude(W, **opts)
    if name == "wanda":
        return wanda(W, stats.sq_in, n, **opts)
    if name == "gblm":
        return gblm(W, stats.sq_in, n, stats.g_sq, **opts)
    if name == "fisher":
        return fisher_obd(W, stats.g_sq, n, **opts)
    if name == "taylor":
        return taylor(W, stats.g_sum, n, **opts)
    if name == "salun":
        return salun(stats.g_sum, **opts)
    return neuron(stats.neuron, n, **opts)
