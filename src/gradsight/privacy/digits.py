"""The digits attack grid (CPU experiment): how much of a batch the shared gradient gives away, per defence level.

Setting (act.md C.4): scikit-learn's bundled 8x8 digits as X / 16 in [0, 1] (float64); an MLP 64-32-10, Sigmoid
for DLG (weights and biases U(-0.5, 0.5) as mit-han-lab/dlg `weights_init`), ReLU for Inverting Gradients and the
analytic attack (PyTorch default init). For each batch size B, noise level sigma and draw:

    1. B images are drawn (the same images for every sigma of a (B, draw), so sigma is the only change);
    2. per-example gradients g_e (torch.func vmap over grad) are clipped at C:
       c_e = min(1, C / (||g_e|| + 1e-6)) (Opacus), C = the median per-example gradient norm of the model over a
       fixed reference sample of 256 images (one C per model, like DP-SGD's fixed C);
    3. the observed target is g* = (sum_e c_e g_e + N(0, (sigma C)^2 I)) / B (Opacus, loss_reduction "mean");
    4. attacks: "analytic" (first Linear of the ReLU net: every candidate dW_i / db_i), "dlg" (Sigmoid net, joint
       labels), "ig" (ReLU net, labels recovered from g*: iDLG at B = 1, `batch_labels` otherwise);
    5. scores: reconstructions clamped to [0, 1] (the attacker knows the data range), Hungarian-matched to the
       true images (metrics.match), PSNR averaged over the B images; label accuracy = multiset overlap / B
       (analytic / ig: the recovered labels; dlg: argmax of its soft labels on the matched pairs); a random
       baseline = B other digits from the data set, matched the same way.

`trained=True` trains each net for one epoch first (Adam 1e-3, batch 32, all 1797 images): converged models leak
less (GradAttack, Improved-DLG). No I/O; `progress(str)` is called once per batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import analytic_linear, batch_labels, dlg, idlg_label, inverting_gradients
from .metrics import match, psnr

__all__ = ["load_digits01", "digits_net", "train_one_epoch", "per_example_grads", "clipped_noisy_mean",
           "median_norm", "digits_attack_grid"]

ATTACKS = ("analytic", "dlg", "ig")


def load_digits01(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """All 1797 digits as (X (N, 64) = pixels / 16 in [0, 1], y (N,) int64); bundled with scikit-learn."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16
    return torch.as_tensor(X / 16.0, dtype=dtype), torch.as_tensor(y, dtype=torch.long)


def digits_net(activation: str = "relu", seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """MLP 64-32-10; "sigmoid" uses DLG's U(-0.5, 0.5) init for every parameter, "relu" PyTorch's default.

    Seeded without touching the global RNG state (torch.random.fork_rng)."""
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"activation must be 'relu' or 'sigmoid', got {activation!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 32), acts[activation](), nn.Linear(32, 10)).to(dtype)
        if activation == "sigmoid":
            for p in net.parameters():
                nn.init.uniform_(p, -0.5, 0.5)
    return net.eval()


def train_one_epoch(model: nn.Module, X: Tensor, y: Tensor, *, seed: int = 0, lr: float = 1e-3,
                    batch_size: int = 32) -> nn.Module:
    """One epoch of Adam(lr) on mean cross-entropy, seeded shuffling; trains in place, returns the model (eval)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y), batch_size):
        idx = perm[i:i + batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def per_example_grads(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{name: (B, *shape)} per-example cross-entropy gradients via torch.func.vmap(grad(functional_call))."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        return F.cross_entropy(functional_call(model, p, (x[None],)), t[None])

    return vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)


def _flat_norms(pe: dict[str, Tensor]) -> Tensor:
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in pe.values()))  # (B,)


def median_norm(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Median over rows of the whole-model per-example gradient norm (the clip bound C of the grid)."""
    return float(_flat_norms(per_example_grads(model, X, y)).median())


def clipped_noisy_mean(pe: dict[str, Tensor], C: float, sigma: float, gen: torch.Generator) -> dict[str, Tensor]:
    """g* = (sum_e min(1, C / (||g_e|| + 1e-6)) g_e + N(0, (sigma C)^2 I)) / B  (Opacus flat clipping, "mean").

    Args:
        pe: {name: (B, *shape)} per-example gradients.  C: clip bound.  sigma: noise multiplier.
        gen: generator for the noise (drawn per tensor in dict order).
    """
    B = next(iter(pe.values())).shape[0]
    coef = (C / (_flat_norms(pe) + 1e-6)).clamp(max=1.0)  # (B,)
    out = {}
    for n, g in pe.items():
        s = (coef.reshape(-1, *([1] * (g.dim() - 1))) * g).sum(0)  # (*shape)
        if sigma > 0:
            s = s + sigma * C * torch.randn(s.shape, generator=gen, dtype=s.dtype)
        out[n] = s / B
    return out


def _label_acc(pred: Tensor, true: Tensor) -> float:
    """Multiset overlap / B: sum_c min(#pred == c, #true == c) / B."""
    C = int(max(pred.max(), true.max())) + 1
    return float(torch.minimum(torch.bincount(pred, minlength=C), torch.bincount(true, minlength=C)).sum()) / len(true)


def _scored(x_hat: Tensor, x: Tensor, fill: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp to [0, 1], pad with `fill` rows when K < B, Hungarian-match.

    Returns:
        (psnr (B,), x_hat rows aligned with x (B, D), rows_hat (B,) indices into the padded x_hat).
    """
    xh = x_hat.detach().clamp(0.0, 1.0).nan_to_num(0.0)
    if len(xh) < len(x):
        xh = torch.cat([xh, fill.expand(len(x) - len(xh), -1)])
    rh, rt = match(xh, x)
    return psnr(xh[rh], x[rt]), xh[rh], rh


def _cell(nets, targets, xb, yb, attacks, *, dlg_iters, ig_iters, fill, draw):
    """Run the attacks on one (B, sigma, draw); returns {attack: (psnr, label_acc, seconds, x_hat aligned)}."""
    B = len(yb)
    out = {}
    g_relu = targets.get("relu")
    labels = None
    if g_relu is not None:
        labels = (torch.tensor([idlg_label(g_relu["2.weight"])]) if B == 1
                  else batch_labels(g_relu["2.weight"], g_relu["2.bias"], B))
    if "analytic" in attacks:
        t = time.perf_counter()
        cand, _ = analytic_linear(g_relu["0.weight"], g_relu["0.bias"])
        sec = time.perf_counter() - t
        p, xa, _ = _scored(cand, xb, fill)
        out["analytic"] = (float(p.mean()), _label_acc(labels, yb), sec, xa)
    if "dlg" in attacks:
        t = time.perf_counter()
        xh, ys = dlg(nets["sigmoid"], targets["sigmoid"], (B, 64), 10, iters=dlg_iters, seed=draw)
        sec = time.perf_counter() - t
        p, xa, rh = _scored(xh, xb, fill)
        out["dlg"] = (float(p.mean()), float((ys[rh].argmax(1) == yb).double().mean()), sec, xa)
    if "ig" in attacks:
        t = time.perf_counter()
        xh = inverting_gradients(nets["relu"], g_relu, labels, (B, 64), iters=ig_iters, seed=draw)
        sec = time.perf_counter() - t
        p, xa, _ = _scored(xh, xb, fill)
        out["ig"] = (float(p.mean()), _label_acc(labels, yb), sec, xa)
    return out


def digits_attack_grid(batch_sizes: Sequence[int] = (1, 2, 4, 8, 16), sigmas: Sequence[float] = (0.0, 0.01, 0.1, 1.0),
                       attacks: Sequence[str] = ATTACKS, n_images: int = 3, *, trained: bool = False,
                       dlg_iters: int = 300, ig_iters: int = 2000, seed: int = 0,
                       progress: Callable[[str], None] | None = None):
    """Run the attack grid described in the module docstring.

    Args:
        batch_sizes, sigmas: the grid.  attacks: subset of ("analytic", "dlg", "ig").
        n_images: draws (batches) per (B, sigma) cell.  trained: one epoch of training first.
        dlg_iters, ig_iters: L-BFGS outer steps and Adam steps.  seed: everything derives from it.
        progress: called with a short string after each batch size.

    Returns:
        (rows, extra): rows = pandas DataFrame with columns attack, batch_size, sigma, draw, psnr, label_acc,
        random_psnr (the random-digit baseline of the same draw); extra = dict(seconds = DataFrame(attack,
        batch_size, sigma, draw, seconds), examples = {f"{attack}/{B}/{sigma}": (x_true (B, 64), x_hat (B, 64)
        Hungarian-aligned with x_true)} for draw 0, C = {"relu": C, "sigmoid": C}, config = the arguments).
    """
    import pandas as pd

    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ValueError(f"attacks must be a non-empty subset of {ATTACKS}, got {tuple(attacks)}")
    if n_images < 1 or any(b < 1 for b in batch_sizes) or any(s < 0 for s in sigmas):
        raise ValueError(f"need n_images >= 1, batch sizes >= 1, sigmas >= 0; got {n_images}, {batch_sizes}, {sigmas}")
    X, y = load_digits01()
    kinds = [k for k, used in (("relu", {"analytic", "ig"} & set(attacks)), ("sigmoid", "dlg" in attacks)) if used]
    nets = {k: digits_net(k, seed) for k in kinds}
    if trained:
        for k in kinds:
            train_one_epoch(nets[k], X, y, seed=seed)
    ref = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))[:256]
    C = {k: median_norm(nets[k], X[ref], y[ref]) for k in kinds}
    fill = X.mean(0, keepdim=True)  # (1, 64) the data-set mean image: pads K < B candidate sets
    rows, secs, examples = [], [], {}
    for B in batch_sizes:
        for draw in range(n_images):
            g_img = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * B + draw)
            perm = torch.randperm(len(y), generator=g_img)
            idx, other = perm[:B], perm[B:2 * B]
            xb, yb = X[idx], y[idx]  # (B, 64), (B,)
            pe = {k: per_example_grads(nets[k], xb, yb) for k in kinds}
            rand_psnr = float(_scored(X[other], xb, fill)[0].mean())
            for si, sigma in enumerate(sigmas):
                g_noise = torch.Generator().manual_seed(seed * 1_000_003 + 104729 * B + 31 * si + draw)
                targets = {k: clipped_noisy_mean(pe[k], C[k], float(sigma), g_noise) for k in kinds}
                res = _cell(nets, targets, xb, yb, attacks, dlg_iters=dlg_iters, ig_iters=ig_iters, fill=fill,
                            draw=draw)
                for a, (p, acc, sec, xa) in res.items():
                    rows.append(dict(attack=a, batch_size=B, sigma=float(sigma), draw=draw, psnr=p, label_acc=acc,
                                     random_psnr=rand_psnr))
                    secs.append(dict(attack=a, batch_size=B, sigma=float(sigma), draw=draw, seconds=sec))
                    if draw == 0:
                        examples[f"{a}/{B}/{float(sigma)}"] = (xb.clone(), xa)
        if progress is not None:
            progress(f"B={B} done ({len(rows)} rows)")
    cfg = dict(batch_sizes=list(batch_sizes), sigmas=[float(s) for s in sigmas], attacks=list(attacks),
               n_images=n_images, trained=trained, dlg_iters=dlg_iters, ig_iters=ig_iters, seed=seed)
    return pd.DataFrame(rows), dict(seconds=pd.DataFrame(secs), examples=examples, C=C, config=cfg)
