"""Gradient-inversion attacks on images: analytic Linear recovery, label recovery, DLG, Inverting Gradients.

The attacker sees a "target gradient" g* = {parameter name: tensor}: the gradient of the MEAN loss over a batch
of B examples (FedSGD), possibly after a defence. Every attack differentiates the model's gradient with respect
to its input (torch.autograd.grad(..., create_graph=True)) over the parameters listed in the target, in the
target's order. Nothing here changes the model's parameters or their .grad.

References:
    - analytic Linear: breaching `attacks/analytic_attack.py` (`invert_fc_layer`: dW_i / db_i for db_i != 0).
    - iDLG label: Zhao et al. 2020; breaching `attacks/base_attack.py` (label = argmin_i sum_j dW^last_ij).
    - batch labels: breaching `_recover_label_information` ("yin", "wainakh-simple", "bias-corrected");
      this module's count estimator is documented in `batch_labels`.
    - DLG: Zhu et al. 2019, mit-han-lab/dlg `main.py` (L-BFGS lr 1, 300 steps, squared-L2 match, joint labels).
    - Inverting Gradients: Geiping et al. 2020, JonasGeiping/invertinggradients
      `inversefed/reconstruction_algorithms.py` (`_run_trial`, `_gradient_closure`, `_score_trial`) and
      `inversefed/metrics.py::total_variation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["analytic_linear", "analytic_linear_single", "idlg_label", "batch_labels", "dlg",
           "inverting_gradients", "total_variation", "model_gradient", "gradient_distance"]

LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- analytic / labels
def analytic_linear(grad_w: Tensor, grad_b: Tensor, min_rel: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Every candidate input a Linear layer's gradient gives away.

    For y = W x + b with per-example output gradient delta_e, the mean-loss gradients are
    dW = (1/B) sum_e delta_e x_e^T and db = (1/B) sum_e delta_e, so row i gives
    x_hat_i = dW_i / db_i = sum_e w_ei x_e with w_ei = delta_ei / sum_e' delta_e'i.
    At B = 1 every row with delta_i != 0 is x exactly. At B > 1 a row driven by ONE example (the others have
    delta_ei = 0, e.g. a ReLU unit active for one example only, or a last-layer row of a label unique in the
    batch under a loss whose output gradient is zero off the label) is that example exactly; other rows are
    convex-like mixtures. All candidates are returned; pair them with `metrics.match`.

    Args:
        grad_w: (d_out, d_in) weight gradient.  grad_b: (d_out,) bias gradient.
        min_rel: keep rows with |db_i| > min_rel * max_i |db_i| (a row with db_i ~ 0 divides noise by ~0).

    Returns:
        (x_hat (K, d_in), rows (K,) LongTensor): candidates and the rows they came from (K = 0 when db = 0).
    """
    if grad_w.dim() != 2 or grad_b.dim() != 1 or grad_w.shape[0] != grad_b.shape[0]:
        raise ValueError(f"analytic_linear needs grad_w (d_out, d_in) and grad_b (d_out,), got "
                         f"{tuple(grad_w.shape)} and {tuple(grad_b.shape)}")
    gw, gb = grad_w.detach(), grad_b.detach()
    scale = gb.abs().max()
    if not torch.isfinite(scale) or scale == 0:
        return gw.new_zeros((0, gw.shape[1])), torch.zeros(0, dtype=torch.long)
    rows = torch.nonzero(gb.abs() > min_rel * scale).flatten()  # (K,)
    return gw[rows] / gb[rows, None], rows  # (K, d_in)


def analytic_linear_single(grad_w: Tensor, grad_b: Tensor) -> Tensor:
    """Batch-1 least-squares inversion over all rows: x = sum_i db_i dW_i / sum_i db_i^2 (exact at B = 1).

    It minimises sum_i ||dW_i - db_i x||^2 (dW = db x^T at B = 1), so it uses every row at once and is stable
    when some db_i are tiny.

    Returns:
        (d_in,) reconstruction.
    """
    gw, gb = grad_w.detach(), grad_b.detach()
    den = gb.pow(2).sum()
    if den == 0:
        raise ValueError("analytic_linear_single needs a non-zero bias gradient, got all zeros")
    return (gb[:, None] * gw).sum(0) / den  # (d_in,)


def idlg_label(grad_last_w: Tensor) -> int:
    """iDLG label at batch 1: argmin_c sum_j dW^last_cj.

    With softmax-CE, dW^last_c = (p_c - y_c) h^T; only the true class has p_c - 1 < 0, so with non-negative
    features h (ReLU / sigmoid) its row sum is the only negative one (Zhao et al. 2020; breaching iDLG).
    """
    return int(grad_last_w.detach().reshape(grad_last_w.shape[0], -1).sum(1).argmin())


def batch_labels(grad_last_w: Tensor, grad_last_b: Tensor, B: int) -> Tensor:
    """Label multiset of a batch from the last layer's bias gradient ("bias-count" strategy, documented here).

    With softmax-CE and a mean over B examples, db_c = pbar_c - n_c / B (pbar_c = mean_e p_ec, n_c = count of
    label c). So (1) every class with db_c < 0 is present (breaching's "analytic"/iDLG idea); (2) for the classes
    that are absent db_c = pbar_c exactly, so the mean of the non-negative db_c estimates pbar for all classes
    (the assumption of wainakh-simple: similar predicted probabilities, true near initialisation); (3) the
    counts are n_hat_c = B (p_hat - db_c). Allocation: one slot for each present class (most negative db first,
    at most B), then the remaining slots greedily to the largest n_hat_c - assigned_c. Exact at B = 1.
    `grad_last_w` is accepted for API symmetry and used only when a bias gradient is missing (None): then
    the row sums of dW^last replace db (the yin ordering).

    Args:
        grad_last_w: (C, d) last-layer weight gradient.  grad_last_b: (C,) bias gradient or None.  B: batch size.

    Returns:
        (B,) LongTensor of labels, sorted ascending.
    """
    if B < 1:
        raise ValueError(f"batch_labels needs B >= 1, got B={B}")
    db = (grad_last_b if grad_last_b is not None else grad_last_w.reshape(grad_last_w.shape[0], -1).sum(1))
    db = db.detach().double()  # (C,)
    C = db.numel()
    absent = db[db >= 0]
    p_hat = float(absent.mean()) if absent.numel() > 0 else 1.0 / C
    est = (B * (p_hat - db)).clamp(min=0.0)  # (C,) estimated counts
    assigned = torch.zeros(C, dtype=torch.double)
    neg = torch.nonzero(db < 0).flatten()
    neg = neg[db[neg].argsort()][:B]  # most negative first
    assigned[neg] = 1.0
    for _ in range(B - len(neg)):
        assigned[int((est - assigned).argmax())] += 1.0
    return torch.repeat_interleave(torch.arange(C), assigned.long())  # (B,)


# ---------------------------------------------------------------------------------------------- shared helpers
def _params(model: nn.Module, target: dict) -> list[Tensor]:
    named = dict(model.named_parameters())
    missing = [n for n in target if n not in named]
    if missing:
        raise ValueError(f"target names parameters the model does not have: {missing}")
    return [named[n] for n in target]


def model_gradient(model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str] | None = None,
                   loss_fn: LossFn | None = None, create_graph: bool = False) -> dict[str, Tensor]:
    """Gradient of loss_fn(model(x), y) (a mean loss) over the named parameters (default all), as a dict."""
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    g = torch.autograd.grad(loss_fn(model(x), y), [named[n] for n in names], create_graph=create_graph)
    return {n: (gi if create_graph else gi.detach()) for n, gi in zip(names, g)}


def gradient_distance(grads: Sequence[Tensor], target: Sequence[Tensor], kind: str = "l2") -> Tensor:
    """"l2": sum_l ||g_l - g*_l||^2 (DLG).  "cos": 1 - <g, g*> / (||g|| ||g*||) over all tensors (inversefed 'sim')."""
    if kind == "l2":
        return sum(((a - b) ** 2).sum() for a, b in zip(grads, target))
    if kind == "cos":
        dot = sum((a * b).sum() for a, b in zip(grads, target))
        na = sum(a.pow(2).sum() for a in grads).sqrt()
        nb = sum(b.pow(2).sum() for b in target).sqrt()
        return 1 - dot / (na * nb)
    raise ValueError(f"gradient distance must be 'l2' or 'cos', got {kind!r}")


def total_variation(x: Tensor, image_hw: tuple[int, int] | None = None) -> Tensor:
    """Mean-based anisotropic TV (inversefed metrics.total_variation):

    TV(x) = mean |x[..., :, 1:] - x[..., :, :-1]| + mean |x[..., 1:, :] - x[..., :-1, :]|.

    Args:
        x: images (B, C, H, W), (B, H, W), or flat (B, H*W) with image_hw=(H, W).
    """
    if image_hw is not None:
        x = x.reshape(x.shape[0], -1, *image_hw)  # (B, C, H, W)
    if x.dim() < 3:
        raise ValueError(f"total_variation needs images (B, [C,] H, W) or image_hw, got shape {tuple(x.shape)}")
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


# ---------------------------------------------------------------------------------------------- DLG
def dlg(model: nn.Module, target: dict, x_shape: Sequence[int], n_classes: int, *, iters: int = 300,
        lr: float = 1.0, seed: int = 0, loss: str = "l2", loss_fn: LossFn | None = None) -> tuple[Tensor, Tensor]:
    """Deep Leakage from Gradients: joint L-BFGS over a dummy input and dummy label logits.

    min_{x', y'} D(grad_theta L(f(x'), softmax(y')), g*), D = sum_l ||.||^2 ("l2", DLG) or 1 - cosine ("cos").
    As mit-han-lab/dlg main.py: x', y' ~ N(0, 1); torch.optim.LBFGS(lr=1) with its defaults (max_iter 20 per
    step, history 100, no line search), `iters` outer steps, soft-label cross-entropy. Added safeguards: the
    iterate with the lowest observed loss is returned, and the run stops at a non-finite loss (L-BFGS with lr 1
    can blow up).

    Args:
        model: a twice-differentiable classifier (Sigmoid MLP in DLG); its dtype sets the dtype of x'.
        target: {param name: observed mean gradient}.
        x_shape: (B, *input shape).  n_classes: number of label logits per example.
        iters, lr, seed, loss: see above.  loss_fn(logits, probs) -> mean loss (default F.cross_entropy, which
            accepts class probabilities).

    Returns:
        (x_hat (x_shape), y_soft (B, n_classes) = softmax of the label logits), detached.
    """
    if iters < 1:
        raise ValueError(f"dlg needs iters >= 1, got {iters}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    params = _params(model, target)
    tgt = [t.detach().to(params[0].dtype) for t in target.values()]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(x_shape), generator=gen, dtype=params[0].dtype).requires_grad_(True)
    yl = torch.randn((x_shape[0], n_classes), generator=gen, dtype=params[0].dtype).requires_grad_(True)
    opt = torch.optim.LBFGS([x, yl], lr=lr)

    def closure():
        opt.zero_grad()
        g = torch.autograd.grad(loss_fn(model(x), F.softmax(yl, dim=-1)), params, create_graph=True)
        d = gradient_distance(g, tgt, loss)
        x.grad, yl.grad = torch.autograd.grad(d, [x, yl])  # not d.backward(): leave the model's .grad alone
        return d.detach()

    best = (float("inf"), x.detach().clone(), yl.detach().clone())
    for _ in range(iters):
        before = (x.detach().clone(), yl.detach().clone())
        val = float(opt.step(closure))  # the loss at `before`
        if val < best[0]:
            best = (val, *before)
        if not (torch.isfinite(x).all() and torch.isfinite(yl).all()) or not val == val:
            break
    else:
        with torch.enable_grad():
            val = float(gradient_distance(torch.autograd.grad(loss_fn(model(x), F.softmax(yl, -1)), params),
                                          tgt, loss))
        if val < best[0]:
            best = (val, x.detach().clone(), yl.detach().clone())
    return best[1], F.softmax(best[2], dim=-1)


# ---------------------------------------------------------------------------------------------- Inverting Gradients
def _ig_trial(model, params, tgt, labels, x0, *, iters, lr, tv, signed, box, image_hw, loss_fn, lr_decay):
    """One inversefed `_run_trial`: Adam on x (signed gradient), MultiStepLR at 3/8, 5/8, 7/8, box projection."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = None
    if lr_decay:  # inversefed milestones: max_iterations // 2.667, // 1.6, // 1.142, gamma 0.1
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(iters // 2.667), int(iters // 1.6), int(iters // 1.142)], gamma=0.1)
    for _ in range(iters):
        opt.zero_grad()
        g = torch.autograd.grad(loss_fn(model(x), labels), params, create_graph=True)
        rec = gradient_distance(g, tgt, "cos")
        if tv > 0:
            rec = rec + tv * total_variation(x, image_hw)
        (x.grad,) = torch.autograd.grad(rec, [x])
        if signed:
            x.grad.sign_()
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            if box is not None:
                x.clamp_(box[0], box[1])
    x = x.detach()
    with torch.enable_grad():  # inversefed _score_trial('loss'): the reconstruction cost without TV
        g = torch.autograd.grad(loss_fn(model(x), labels), params)
    score = float(gradient_distance(g, tgt, "cos"))
    return x, (score if score == score else float("inf"))


def inverting_gradients(model: nn.Module, target: dict, labels: Tensor, x_shape: Sequence[int], *,
                        iters: int = 2000, lr: float = 0.1, tv: float = 1e-2, restarts: int = 1,
                        signed: bool = True, box: tuple[float, float] | None = (0.0, 1.0),
                        image_hw: tuple[int, int] | None = (8, 8), seed: int = 0,
                        loss_fn: LossFn | None = None, lr_decay: bool = True) -> Tensor:
    """Inverting Gradients (Geiping et al. 2020) with known (or recovered) labels.

    min_x 1 - <grad L(x, y), g*> / (||grad L(x, y)|| ||g*||) + tv * TV(x), the cosine taken over ALL target
    tensors at once (inversefed reconstruction_costs 'sim'); x ~ N(0, 1) per restart (inversefed init 'randn'),
    Adam(lr) stepping on sign(d loss / dx) when `signed` (breaching "hard" signed; inversefed's DEFAULT_CONFIG is
    unsigned), MultiStepLR(gamma 0.1) at iters // 2.667, // 1.6, // 1.142 (3/8, 5/8, 7/8), x clamped into `box`
    after every step; the restart with the lowest final cosine loss (no TV: `_score_trial` 'loss') wins.

    Args:
        model: classifier (ReLU is fine: only first derivatives of the gradient in x are needed).
        target: {param name: observed mean gradient}.  labels: (B,) class ids (or what loss_fn expects).
        x_shape: (B, *input shape).  iters, lr, tv, restarts, signed, box, seed, lr_decay: see above.
        image_hw: (H, W) to reshape flat inputs for TV (None when x_shape already has H, W).
        loss_fn(logits, labels) -> mean loss (default F.cross_entropy).

    Returns:
        x_hat with shape x_shape, detached.
    """
    if iters < 1 or restarts < 1:
        raise ValueError(f"inverting_gradients needs iters >= 1 and restarts >= 1, got {iters} and {restarts}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    params = _params(model, target)
    tgt = [t.detach().to(params[0].dtype) for t in target.values()]
    gen = torch.Generator().manual_seed(seed)
    best_x, best_s = None, float("inf")
    for _ in range(restarts):
        x0 = torch.randn(tuple(x_shape), generator=gen, dtype=params[0].dtype)
        x, s = _ig_trial(model, params, tgt, labels, x0, iters=iters, lr=lr, tv=tv, signed=signed, box=box,
                         image_hw=image_hw, loss_fn=loss_fn, lr_decay=lr_decay)
        if best_x is None or s < best_s:
            best_x, best_s = x, s
    return best_x
