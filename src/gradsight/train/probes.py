"""Scheduled curvature and numerics probes of the training monitor: sharpness vs its stability threshold, and
softmax collapse.

Why: two failure modes of training are visible only through second-order or floating-point quantities.

- Edge of stability (Cohen et al. 2021, 2022). Under full-batch gradient descent the top Hessian eigenvalue
  (the "sharpness") rises during training ("progressive sharpening") until it reaches the stability threshold
  of the optimizer, 2/lr for plain GD, and then hovers there while the loss keeps falling non-monotonically.
  A sharpness far above its threshold means the step is unstable along the top direction; the monitor logs
  the ratio sharpness / threshold.
- Softmax collapse (Prieto et al. 2025, "Grokking at the edge of numerical stability"). When the logit gap
  grows, sum_j exp(z_j - max z) rounds to exactly 1 in the working precision: the loss of those rows is
  exactly 0, their gradient vanishes and only the "naive loss minimisation" direction (scaling the logits)
  remains. The share of such rows is measured exactly as in the paper's `logger.py`.

Contents:
    stability_threshold(optimizer)      the threshold of torch SGD (plain, heavy ball, Nesterov), Adam, AdamW
    adam_preconditioner(optimizer, ps)  the diagonal P with Adam's update = -lr P^{-1} m
    SharpnessProbe(...).measure(opt)    lambda_max of H (or of P^{-1/2} H P^{-1/2} under Adam) on a fixed
                                        probe batch, by Lanczos warm-started from the previous eigenvector
    softmax_collapse, zero_loss_fraction, SoftmaxCollapseProbe (a one-shot forward hook on e.g. lm_head)

The Hessian-vector products and the eigen-solver are those of `gradsight.curvature` (HessianOperator,
lanczos); this module only adapts them to a training loop (loss_fn(model, batch) signature, preconditioning,
warm starts, state hygiene).

References: J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, "Gradient descent on neural networks
typically occurs at the edge of stability" (ICLR 2021); J. Cohen, B. Ghorbani, S. Krishnan, N. Agarwal et al.,
"Adaptive gradient methods at the edge of stability" (2022); L. Prieto, M. Barsbey, P. Mediano, T. Birdal,
"Grokking at the edge of numerical stability" (ICLR 2025).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.lanczos import lanczos
from ..curvature.operators import HessianOperator

__all__ = [
    "stability_threshold",
    "adam_preconditioner",
    "SharpnessProbe",
    "softmax_collapse",
    "zero_loss_fraction",
    "SoftmaxCollapseProbe",
]

LossFn = Callable[[nn.Module, Any], Tensor]


# --------------------------------------------------------------------------------------------------------
# stability thresholds


def _is_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _group_index(optimizer, group: int | None, keys: Sequence[str]) -> int:
    """The param group whose hyper-parameters apply: `group`, or 0 when all groups agree on `keys`."""
    groups = optimizer.param_groups
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(groups):
            raise ValueError(f"group must be an index in [0, {len(groups)}), got {group!r}")
        return group
    for key in keys:
        values = [_as_float(g.get(key)) for g in groups]
        if len(set(values)) > 1:
            raise ValueError(f"the param groups of {type(optimizer).__name__} differ in {key!r} ({values}): "
                             "choose one with group=<index>, or pass threshold=")
    return 0


def _as_float(x):
    if isinstance(x, (tuple, list)):
        return tuple(_as_float(v) for v in x)
    return None if x is None else float(x)


def stability_threshold(optimizer=None, *, group: int | None = None, threshold: float | None = None) -> dict:
    """The sharpness above which the optimizer's step is unstable on the local quadratic model.

    On L(theta) ~ 0.5 theta^T H theta, each optimizer below is a linear recursion per eigen-direction of H
    (of P^{-1} H for Adam); it is stable iff lr * lambda < c, which gives the threshold c / lr:

    - SGD, momentum 0 ("gd"): 2 / lr.
    - SGD heavy ball ("momentum"; torch: buf = beta buf + (1 - dampening) g, theta -= lr buf):
      (2 + 2 beta) / ((1 - dampening) lr). Dampening 0 (torch's default) gives (2 + 2 beta) / lr.
    - SGD Nesterov ("momentum", torch's form theta -= lr (g + beta buf)): (2 + 2 beta) / ((1 + 2 beta) lr),
      from the root -1 of x^2 - (1 + beta)(1 - a) x + beta (1 - a), a = lr lambda. Note: LOWER than the
      heavy-ball threshold (1.357 / lr at beta 0.9 instead of 3.8 / lr).
    - Adam / AdamW ("adam", preconditioned): (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at beta1 = 0.9, to be
      compared with lambda_max(P^{-1} H), P from `adam_preconditioner` (Cohen et al. 2022: Adam is EMA momentum
      on the preconditioned gradient; the threshold treats P as frozen).

    Weight decay is not included: the thresholds apply to the Hessian of the loss the probe measures. (With
    coupled SGD weight decay wd, the Hessian of the optimised objective is H + wd I; for AdamW the decoupled
    decay adds a factor (1 - lr wd) to each step; both are negligible when lr wd << 1.)

    Args:
        optimizer: a torch.optim.SGD, Adam or AdamW (subclasses too). Any other class needs `threshold`.
            May be None when `threshold` is given.
        group: index of the param group whose lr and betas/momentum apply. Default: group 0, and an error if
            the groups differ in those hyper-parameters.
        threshold: a threshold chosen by the caller (kind "custom", not preconditioned); it overrides the rule.

    Returns:
        {"kind": "gd" | "momentum" | "adam" | "custom", "threshold": float, "preconditioned": bool,
         "lr": float | None, "beta": float | None (SGD momentum or Adam beta1), "rule": readable formula}.

    Raises:
        ValueError: unknown optimizer class without `threshold`; lr <= 0; groups differ and `group` is None.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.25)
        >>> stability_threshold(opt)["threshold"]
        8.0
    """
    if threshold is not None:
        thr = float(threshold)
        if not (math.isfinite(thr) and thr > 0):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
        lr = None
        if optimizer is not None:
            lr = _as_float(optimizer.param_groups[_group_index(optimizer, group, ["lr"])]["lr"])
        return {"kind": "custom", "threshold": thr, "preconditioned": False, "lr": lr, "beta": None,
                "rule": "given by the caller"}
    if optimizer is None:
        raise ValueError("optimizer is None: pass an optimizer or threshold=")
    if _is_adam(optimizer):
        g = optimizer.param_groups[_group_index(optimizer, group, ["lr", "betas"])]
    elif isinstance(optimizer, torch.optim.SGD):
        g = optimizer.param_groups[_group_index(optimizer, group, ["lr", "momentum", "dampening", "nesterov"])]
    else:
        raise ValueError(f"no stability threshold is known for optimizer class {type(optimizer).__name__} "
                         "(known: SGD, Adam, AdamW); pass threshold=<value> to compare the sharpness with yours")
    lr = float(g["lr"])
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate must be > 0 to define a stability threshold, got lr={lr}")
    if _is_adam(optimizer):
        b1 = float(g["betas"][0])
        return {"kind": "adam", "threshold": (2 + 2 * b1) / ((1 - b1) * lr), "preconditioned": True, "lr": lr,
                "beta": b1, "rule": "(2 + 2 beta1) / ((1 - beta1) lr) on lambda_max(P^-1 H)"}
    beta, damp = float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))
    if beta == 0.0:
        return {"kind": "gd", "threshold": 2 / lr, "preconditioned": False, "lr": lr, "beta": 0.0,
                "rule": "2 / lr"}
    if g.get("nesterov", False):
        return {"kind": "momentum", "threshold": (2 + 2 * beta) / ((1 + 2 * beta) * lr), "preconditioned": False,
                "lr": lr, "beta": beta, "rule": "(2 + 2 beta) / ((1 + 2 beta) lr) (Nesterov)"}
    return {"kind": "momentum", "threshold": (2 + 2 * beta) / ((1 - damp) * lr), "preconditioned": False,
            "lr": lr, "beta": beta, "rule": "(2 + 2 beta) / ((1 - dampening) lr) (heavy ball)"}


def adam_preconditioner(optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """The diagonal preconditioner P of torch Adam/AdamW: the last update was theta -= lr * m / P.

    torch.optim.Adam (non-fused and fused alike) updates, after t steps,

        theta <- theta - (lr / (1 - beta1^t)) * m / (sqrt(v / (1 - beta2^t)) + eps)

    with m = exp_avg and v = exp_avg_sq (max_exp_avg_sq under amsgrad), the UN-corrected EMAs. Hence

        P = (1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps)          (same shape as the parameter)

    and Adam is EMA momentum m = beta1 m + (1 - beta1) g on the preconditioned gradient, the form whose
    threshold is (2 + 2 beta1) / ((1 - beta1) lr) for lambda_max(P^{-1} H) (see `stability_threshold`). The
    (1 - beta1^t) factor folds the first-moment bias correction into P (as in Cohen et al. 2022); it -> 1
    after a few tens of steps. P is the preconditioner of the step already taken; the next step uses v
    updated with the next gradient.

    Args:
        optimizer: torch.optim.Adam or AdamW (subclasses too) that has taken at least one step.
        params: parameter tensors managed by the optimizer, in the order wanted.

    Returns:
        list of P, one detached tensor per parameter, same shape and dtype as the parameter, all > 0 if eps > 0.

    Raises:
        ValueError: not an Adam optimizer, a parameter not managed by it, or no state yet (before the first
            `optimizer.step()`, or a parameter that never received a gradient).
    """
    if not _is_adam(optimizer):
        raise ValueError(f"adam_preconditioner needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for i, p in enumerate(params):
        g = group_of.get(id(p))
        if g is None:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not managed by the optimizer")
        st = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq"
        if key not in st or "step" not in st:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) has no Adam state yet: the preconditioner "
                             "exists only after the first optimizer.step() that saw its gradient")
        t = float(st["step"])
        beta1, beta2 = (float(b) for b in g["betas"])
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        v = st[key].detach()
        P = bc1 * (v.sqrt() / math.sqrt(bc2) + float(g["eps"]))
        out.append(P.to(dtype=p.dtype, device=p.device))
    return out


# --------------------------------------------------------------------------------------------------------
# sharpness


class _LossForward:
    """forward_fn for HessianOperator: the caller's scalar loss as the "outputs" (targets unused)."""

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch) -> tuple[Tensor, None]:
        loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn(model, batch) must return a scalar tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
        return loss.reshape(()), None


def _identity_loss(outputs: Tensor, targets) -> Tensor:
    return outputs


def _unit_weight(outputs: Tensor, targets) -> float:
    return 1.0


def _block_names(model: nn.Module, params):
    """params as HessianOperator takes them: None, a regex, or names; a list of parameter tensors -> names."""
    if params is None or isinstance(params, str):
        return params
    params = list(params)
    if params and all(isinstance(p, Tensor) for p in params):
        name_of = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in name_of]
        if missing:
            raise ValueError(f"params[{missing[0]}] (shape {tuple(params[missing[0]].shape)}) is not a parameter "
                             f"of the model ({len(missing)} such)")
        return [name_of[id(p)] for p in params]
    return params


class SharpnessProbe:
    """lambda_max of the loss Hessian on a fixed probe batch, warm-started across calls.

    The operator is H = d^2 loss_fn(model, probe_batch) / d theta^2 (theta: the parameter block), or, under
    Adam/AdamW, the symmetric preconditioned A = P^{-1/2} H P^{-1/2}, which has the eigenvalues of P^{-1} H
    (P from `adam_preconditioner`). Its top eigenvalue is found by `gradsight.curvature.lanczos` started from
    the previous call's top eigenvector (plus a small random component, `warm_noise`, so that a start vector
    that happens to be an exact eigenvector of a no longer top eigenvalue cannot stop the search at once);
    at nearly unchanged parameters this takes 2-5 Hessian-vector products instead of 10-20 (small MLPs).

    Conventions and state hygiene:
    - Products run in eval mode (dropout off, BatchNorm running statistics): the sharpness is that of the
      deterministic network. The model's train/eval mode is restored after every product.
    - Products use `torch.func.functional_call` on detached copies of the parameters: no `.grad` is written,
      no `requires_grad` flag changes, no autograd graph of the training step is touched. Autocast is
      disabled during the probe (products run in the parameters' dtype); it may be called under no_grad.
    - The probe batch is fixed at construction (the same examples at every probe, so consecutive values are
      comparable); `loss_fn(model, probe_batch)` must return the scalar loss (a mean, as in training).
    - Single-vector Lanczos can miss an eigenvalue that overtakes the tracked one if the start vector has
      almost no component along it; `reset()` forces a cold start.

    Args:
        model: the trained module.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, differentiable twice.
        probe_batch: one batch, passed unchanged to loss_fn.
        params: the block: None (all requires_grad parameters), a regex, a list of parameter names, or a list of
            the model's parameter tensors.
        iters: maximum Hessian-vector products per probe (default 20).
        tol: Lanczos residual tolerance ||A y - theta y|| <= tol |theta| (default 1e-3; the eigenvalue error is
            about residual^2 / gap, far below tol).
        precondition: None (auto: precondition iff the optimizer passed to `measure` is Adam/AdamW), True or
            False.
        warm_noise: norm of the random component added to the unit warm-start vector (default 0.01).
        seed: seeds the cold start vector and the warm-start noise.

    Example (in a training loop; the numbers are those of the full-batch GD test at lr 0.3 on the plateau):
        probe = SharpnessProbe(model, lambda m, b: 0.5 * (m(b[0]) - b[1]).pow(2).sum(-1).mean(), (x, y))
        if step % 20 == 0:
            r = probe.measure(optimizer)   # {'lmax': 6.7, 'threshold': 6.67, 'ratio': 1.01, 'hvps': 2, ...}
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, probe_batch, params=None, iters: int = 20,
                 tol: float = 1e-3, precondition: bool | None = None, warm_noise: float = 1e-2, seed: int = 0):
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a positive finite number, got {tol!r}")
        if precondition not in (None, True, False):
            raise ValueError(f"precondition must be None, True or False, got {precondition!r}")
        if not (isinstance(warm_noise, (int, float)) and math.isfinite(warm_noise) and warm_noise >= 0):
            raise ValueError(f"warm_noise must be a finite number >= 0, got {warm_noise!r}")
        params = _block_names(model, params)
        with warnings.catch_warnings():  # the eval-mode convention is documented above; no warning per probe
            warnings.filterwarnings("ignore", message=".*curvature products are computed in eval mode.*")
            self.op = HessianOperator(model, _identity_loss, [probe_batch], params=params,
                                      forward_fn=_LossForward(loss_fn), weight_fn=_unit_weight)
        self.model = model
        self.iters, self.tol, self.precondition = iters, float(tol), precondition
        self.warm_noise, self.seed = float(warm_noise), int(seed)
        self.v: Tensor | None = None  # (dim,) last top eigenvector (of the operator last used)
        self._v_preconditioned: bool | None = None
        self.n_probes = 0
        self.total_hvps = 0

    @property
    def dim(self) -> int:
        return self.op.dim

    def reset(self) -> None:
        """Forget the warm-start vector: the next probe starts from a seeded random vector."""
        self.v, self._v_preconditioned = None, None

    def _start_vector(self, preconditioned: bool) -> Tensor | None:
        if self.v is None or self._v_preconditioned != preconditioned:
            return None
        v = self.v / torch.linalg.vector_norm(self.v)
        if self.warm_noise > 0:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n_probes + 1)
            r = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(dtype=v.dtype, device=v.device)
            v = v + self.warm_noise * r / torch.linalg.vector_norm(r)
        return v

    def measure(self, optimizer=None, *, threshold: float | None = None, group: int | None = None) -> dict:
        """One probe at the current parameters.

        Args:
            optimizer: the training optimizer (SGD, Adam, AdamW) for the threshold and, under Adam, the
                preconditioner; None for the raw sharpness only.
            threshold, group: passed to `stability_threshold` (a custom threshold, or the param group).

        Returns:
            {"lmax": top eigenvalue (float), "threshold": float or NaN, "ratio": lmax / threshold or NaN,
             "iters_used": Lanczos steps, "hvps": Hessian-vector products of this probe, "converged": bool,
             "residual": ||A y - lmax y||, "warm": started from the previous eigenvector,
             "preconditioned": bool, "kind": the threshold's kind or None}.
            The threshold (and ratio) is NaN without an optimizer and threshold, and when an Adam optimizer
            is probed with precondition=False (the raw Hessian has no stability threshold under Adam).

        Raises:
            ValueError: see `stability_threshold` and `adam_preconditioner`; precondition=True without an
                Adam optimizer.
        """
        info = None
        if optimizer is not None or threshold is not None:
            info = stability_threshold(optimizer, group=group, threshold=threshold)
        adam = optimizer is not None and _is_adam(optimizer)
        pre = adam if self.precondition is None else self.precondition
        if pre and not adam:
            raise ValueError("precondition=True needs an Adam/AdamW optimizer passed to measure(); got "
                             f"{type(optimizer).__name__ if optimizer is not None else None}")
        op = self.op
        if pre:
            P = adam_preconditioner(optimizer, [p for _, p in op.params])
            d = op.flatten(P).to(op.dtype).rsqrt()  # (dim,) P^{-1/2}

            def A(v: Tensor) -> Tensor:
                return d * op.matvec(d * v)
        else:
            A = op.matvec
        v0 = self._start_vector(pre)
        with torch.inference_mode(False), torch.autocast(device_type=op.device.type, enabled=False):
            r = lanczos(A, dim=op.dim, k=1, which="top", tol=self.tol, max_iter=self.iters, seed=self.seed,
                        v0=v0, return_eigenvectors=True, dtype=op.dtype, device=op.device)
        self.v, self._v_preconditioned = r.eigenvectors[:, 0].detach(), pre
        self.n_probes += 1
        self.total_hvps += r.n_products
        lmax = float(r.eigenvalues[0])
        thr = math.nan
        if info is not None and not (info["kind"] == "adam" and not pre):
            thr = info["threshold"]
        return {"lmax": lmax, "threshold": thr, "ratio": lmax / thr,
                "iters_used": r.n_iter, "hvps": r.n_products, "converged": bool(r.converged[0]),
                "residual": float(r.residuals[0]), "warm": v0 is not None, "preconditioned": pre,
                "kind": None if info is None else info["kind"]}


# --------------------------------------------------------------------------------------------------------
# softmax collapse


def _rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """(N, C) rows of logits (..., C) (leading dims flattened), restricted to mask (...,) if given."""
    if not isinstance(logits, Tensor) or logits.ndim < 1:
        raise ValueError(f"logits must be a tensor (..., C), got {getattr(logits, 'shape', type(logits))}")
    z = logits.detach().reshape(-1, logits.shape[-1])  # (N, C)
    if mask is not None:
        m = torch.as_tensor(mask, device=z.device).reshape(-1).bool()
        if m.numel() != z.shape[0]:
            raise ValueError(f"mask has {m.numel()} entries, expected one per row: {z.shape[0]} "
                             f"(logits {tuple(logits.shape)})")
        z = z[m]
    return z


def _collapsed(z: Tensor, dtype: torch.dtype) -> Tensor:
    """(N,) bool: sum_j exp(z_j - max z) == 1 exactly, all arithmetic in dtype (the paper's logger.py)."""
    z = z.to(dtype)
    z = z - z.amax(dim=-1, keepdim=True)  # (N, C)
    return torch.exp(z).sum(dim=-1) == 1  # (N,)


def _zero_loss(z: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """(N,) bool: -log_softmax(z, dtype)[y] == 0 exactly (the paper's `zero_terms`)."""
    lp = F.log_softmax(z, dim=-1, dtype=dtype)  # (N, C)
    return lp.gather(-1, y.reshape(-1, 1)).squeeze(-1) == 0


def softmax_collapse(logits: Tensor, dtype: torch.dtype = torch.float32, mask: Tensor | None = None) -> float:
    """Share of rows whose softmax has collapsed: sum_j exp(z_j - max_j z) == 1 exactly in `dtype`.

    Exactly the measurement of Prieto et al. 2025 (`logger.py`, `compute_softmax_collapse`): cast the logits to
    `dtype`, z' = z - max z, S = sum exp(z'), SC = mean over rows of [S == 1]. In such a row every non-max
    probability underflows relative to 1, the cross-entropy is exactly 0 for a correct prediction, and
    its gradient vanishes.

    Args:
        logits: (N, C) or (B, T, C), any float dtype; rows are the last dimension, leading dims are flattened.
        dtype: working precision (float32 default, as the paper; bfloat16/float16/float64 accepted).
        mask: optional bool (N,) or (B, T): rows to include.

    Returns:
        SC in [0, 1]; NaN if no row is included.

    Example:
        >>> softmax_collapse(torch.tensor([[0.0] + [-30.0] * 112]))   # 1 + 112 e^-30 == 1 in float32
        1.0
    """
    z = _rows(logits, mask)
    if z.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        return int(_collapsed(z, dtype).sum()) / z.shape[0]


def zero_loss_fraction(logits: Tensor, targets: Tensor, dtype: torch.dtype = torch.float32,
                       ignore_index: int = -100, mask: Tensor | None = None) -> float:
    """Share of rows whose cross-entropy -log_softmax(z, dtype=dtype)[y] is exactly 0 (the paper's `zero_terms`).

    Args:
        logits: (N, C) or (B, T, C); targets: (N,) or (B, T) class ids, aligned with the rows of logits (for a
            causal LM pass the shifted labels). Rows with target == ignore_index are excluded.
        dtype: precision of the log-softmax (float32 default).
        mask: optional bool rows to include (same shape as targets).

    Returns:
        the share in [0, 1]; NaN if no row is included.
    """
    z = logits.detach().reshape(-1, logits.shape[-1])  # (N, C)
    y = torch.as_tensor(targets, device=z.device).reshape(-1)  # (N,)
    if y.numel() != z.shape[0]:
        raise ValueError(f"targets has {y.numel()} entries, expected one per row of logits "
                         f"{tuple(logits.shape)}: {z.shape[0]}")
    keep = y != ignore_index
    if mask is not None:
        m = torch.as_tensor(mask, device=z.device).reshape(-1).bool()
        if m.numel() != z.shape[0]:
            raise ValueError(f"mask has {m.numel()} entries, expected {z.shape[0]}")
        keep = keep & m
    if not bool(keep.any()):
        return float("nan")
    with torch.no_grad():
        return int(_zero_loss(z[keep], y[keep], dtype).sum()) / int(keep.sum())


def _logits_of(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"SoftmaxCollapseProbe: the hooked module returned {type(output).__name__}; expected "
                     "logits (a tensor, a tuple starting with one, or an object with .logits)")


class SoftmaxCollapseProbe:
    """A one-shot forward hook on an output module (e.g. `lm_head`) measuring softmax collapse.

    After `arm()`, the NEXT forward of the module is measured (then the probe disarms itself: under gradient
    accumulation only the first micro-batch of an armed step is read). On a seeded random sample of at most
    `max_rows` rows it records SC in float32 and in bfloat16 (`softmax_collapse`) and, if targets were given,
    the share of exactly-zero float32 cross-entropy losses (`zero_loss_fraction`). Everything runs under
    no_grad on detached logits, in chunks of `chunk_rows` rows (memory: chunk_rows x C floats, not the whole
    logits tensor); only 0-d counters are kept, never the logits, and the hook never changes the output.

    Args:
        module: the module whose output are the logits (..., C).
        max_rows: rows sampled per measurement (default 4096).
        seed: seeds the row sampler (one generator, advanced at every measurement).
        ignore_index: target value of rows excluded when targets are given (default -100).
        chunk_rows: rows processed at once.

    Methods:
        arm(targets=None, mask=None, shift=False): measure the next forward. targets (..., ) class ids
            aligned with the logit rows; with shift=True they are the unshifted labels of a causal LM
            (logits[..., :-1, :] are compared with targets[..., 1:], mask[..., 1:]). mask: rows to include.
            Rows whose target is ignore_index are excluded from all three measures.
        read() -> dict: the last measurement as floats (one device sync), then cleared; {} if nothing was
            measured. Keys: "fp32", "bf16" (SC in that precision; schema SC_FP32 / SC_BF16), "zero_loss" (only
            with targets; schema ZERO_LOSS), "rows" (rows measured), "rows_total" (rows eligible).
        remove(): remove the hook (also on leaving a `with` block).
    """

    def __init__(self, module: nn.Module, max_rows: int = 4096, seed: int = 0, ignore_index: int = -100,
                 chunk_rows: int = 256):
        for name, x in (("max_rows", max_rows), ("chunk_rows", chunk_rows)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {x!r}")
        self.max_rows, self.ignore_index, self.chunk_rows = max_rows, int(ignore_index), chunk_rows
        self._gen = torch.Generator().manual_seed(int(seed))
        self._spec: dict | None = None
        self._result: dict | None = None
        self._handle = module.register_forward_hook(self._hook)

    @property
    def armed(self) -> bool:
        return self._spec is not None

    def arm(self, targets: Tensor | None = None, mask: Tensor | None = None, shift: bool = False) -> None:
        self._spec = {"targets": None if targets is None else targets.detach(),
                      "mask": None if mask is None else mask.detach(), "shift": bool(shift)}

    def disarm(self) -> None:
        self._spec = None

    def _hook(self, module, inputs, output) -> None:
        if self._spec is None:
            return None
        spec, self._spec = self._spec, None
        with torch.no_grad():
            self._result = self._measure(_logits_of(output).detach(), **spec)
        return None

    def _measure(self, logits: Tensor, targets: Tensor | None, mask: Tensor | None, shift: bool) -> dict:
        if shift:
            if logits.ndim < 3:
                raise ValueError(f"shift=True needs logits (B, T, C), got {tuple(logits.shape)}")
            logits = logits[..., :-1, :]  # (B, T-1, C): position t predicts token t+1
            targets = None if targets is None else targets[..., 1:]
            mask = None if mask is None else mask[..., 1:]
        z = logits.reshape(-1, logits.shape[-1])  # (N, C), a view
        n, dev = z.shape[0], z.device
        keep = None
        if mask is not None:
            keep = mask.to(dev).reshape(-1).bool()
            if keep.numel() != n:
                raise ValueError(f"mask has {keep.numel()} entries after shift={shift}, expected {n} rows "
                                 f"(logits {tuple(logits.shape)})")
        y = None
        if targets is not None:
            y = targets.to(dev).reshape(-1)
            if y.numel() != n:
                raise ValueError(f"targets has {y.numel()} entries after shift={shift}, expected {n} rows "
                                 f"(logits {tuple(logits.shape)})")
            valid = y != self.ignore_index
            keep = valid if keep is None else keep & valid
        idx = torch.arange(n, device=dev) if keep is None else keep.nonzero().squeeze(1)  # (M,)
        total = idx.numel()
        if total > self.max_rows:
            pick = torch.randperm(total, generator=self._gen)[: self.max_rows].to(dev)
            idx = idx[pick]
        counts = {"fp32": torch.zeros((), device=dev), "bf16": torch.zeros((), device=dev)}
        if y is not None:
            counts["zero_loss"] = torch.zeros((), device=dev)
        for j in range(0, idx.numel(), self.chunk_rows):
            rows = idx[j:j + self.chunk_rows]
            zc = z[rows]  # (chunk, C), a copy of chunk rows only
            counts["fp32"] += _collapsed(zc, torch.float32).sum()
            counts["bf16"] += _collapsed(zc, torch.bfloat16).sum()
            if y is not None:
                counts["zero_loss"] += _zero_loss(zc, y[rows], torch.float32).sum()
        return {"counts": counts, "rows": idx.numel(), "rows_total": total}

    def read(self) -> dict:
        r, self._result = self._result, None
        if r is None:
            return {}
        m = r["rows"]
        out = {k: (float(c) / m if m else float("nan")) for k, c in r["counts"].items()}
        out.update(rows=float(m), rows_total=float(r["rows_total"]))
        return out

    def remove(self) -> None:
        self._handle.remove()
        self._spec = None

    def __enter__(self) -> SoftmaxCollapseProbe:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
