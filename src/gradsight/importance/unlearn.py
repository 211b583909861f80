"""SalUn: gradient-based weight saliency for machine unlearning (Fan et al., ICLR 2024), for plain modules.

Reference: github OPTML-Group/Unlearn-Saliency, `Classification/generate_mask.py` (saliency and mask),
`Classification/unlearn/RL.py` (random labelling with the mask), `Classification/evaluation/SVC_MIA.py` (MIA);
gradsight's METHODS.md section 5.

    saliency s = |sum_b grad_theta lbar_f(theta_o; B_b)|        lbar_f = batch-mean CE on forget batch B_b (eval mode)
    mask m     = top fraction q of s over ALL parameters        rank-based, exactly floor(q P) entries True
    update     theta_u = m * (theta_o + Delta) + (1 - m) * theta_o
    objective  min_theta E_{D_f} CE(theta; x, y') + alpha E_{D_r} CE(theta; x, y),  y' a random label != y

The masked update is implemented like the code: gradients are multiplied by m after backward; after every
optimizer step the entries with m = 0 are reset to theta_o (bitwise) and their momentum-buffer entries zeroed,
since SGD's coupled weight decay and momentum would otherwise move them.

Choices (documented departures): random labels are drawn uniformly from the OTHER classes (y' != y, as the
paper states; the code's `torch.randint` can return y). Mask ties are broken by position (the earlier entry in
`named_parameters` order wins) so the density is exact; the code's `argsort` is not stable.

Data: a "batches" argument is a sequence of (x, y) pairs, or one (X, y) pair of tensors (a single batch).
Accuracies and MIA are in percent, like SalUn's tables. `digits_unlearning` is the offline CPU experiment
(act.md B.4): SalUn against Retrain on scikit-learn's digits.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["saliency", "saliency_mask", "unlearn", "unlearning_metrics", "accuracy", "mia_efficacy",
           "make_batches", "DigitsSetup", "digits_setup", "digits_unlearning", "METHODS", "DIGITS_DEFAULTS"]

METHODS = ("random_label", "finetune", "grad_ascent")


def _as_batches(data) -> list[tuple[Tensor, Tensor]]:
    """A list of (x, y) batches from a sequence of pairs or from one (X, y) pair of tensors."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    out = list(data)
    if not out:
        raise ValueError("got an empty set of batches")
    return out


def make_batches(X: Tensor, y: Tensor, batch_size: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Split (X, y) into batches of `batch_size` rows (the last smaller) after a seeded permutation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))  # (N,)
    return [(X[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


# -------------------------------------------------------------------------------------------------- saliency

def saliency(model: nn.Module, forget_batches, loss: str = "ce") -> dict[str, Tensor]:
    """SalUn's weight saliency |g|, g = sum over forget batches of the gradient of the batch-mean loss.

    Args:
        model: classifier returning logits (B, C); evaluated in eval mode (its mode is restored afterwards).
        forget_batches: batches of D_f, see module docstring.
        loss: "ce" or "neg_ce" (the code's l_f = -CE); only |g| is kept, so both give the same map.

    Returns:
        {name: |g|} for every entry of `named_parameters()` (frozen or unused parameters get zeros), accumulated
        in float64 for float64 parameters and float32 otherwise (fp16 gradients would create many ties).
    """
    if loss not in ("ce", "neg_ce"):
        raise ValueError(f"loss must be 'ce' or 'neg_ce', got {loss!r}")
    sign = -1.0 if loss == "neg_ce" else 1.0
    named = list(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
           for n, p in named}
    live = [(n, p) for n, p in named if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for x, y in _as_batches(forget_batches):
            lf = sign * F.cross_entropy(model(x), y)  # batch mean, as the code's criterion
            grads = torch.autograd.grad(lf, [p for _, p in live], allow_unused=True)
            for (n, _), g in zip(live, grads):
                if g is not None:
                    acc[n] += g.to(acc[n].dtype)
    finally:
        model.train(was_training)
    return {n: g.abs() for n, g in acc.items()}


def saliency_mask(sal: dict[str, Tensor], fraction: float = 0.5) -> dict[str, Tensor]:
    """Global rank-based hard threshold: the top `fraction` of all entries by saliency are editable (True).

    m_j = 1[rank(s_j) < floor(q P)], ranks over the P entries of all tensors concatenated in dict order,
    descending saliency, ties broken by position (stable sort), so exactly floor(q P) entries are True.
    q = 0.5 is the code's default (gamma = the median); q = 1.0 makes everything editable.
    Cost O(P log P) (one stable sort of P values).

    Args:
        sal: {name: saliency tensor}, non-negative, finite.
        fraction: q in (0, 1].

    Returns:
        {name: bool tensor shaped like sal[name]}.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not sal:
        raise ValueError("saliency_mask got an empty saliency dict")
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in sal.values()])  # (P,)
    if not torch.isfinite(flat).all():
        raise ValueError("saliency holds non-finite values (NaN or inf)")
    k = int(np.floor(fraction * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices  # (P,), equal values keep index order
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for name, s in sal.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


# --------------------------------------------------------------------------------------------------- unlearn

def _check_mask(model: nn.Module, mask: dict | None) -> dict[str, Tensor] | None:
    if mask is None:
        return None
    params = dict(model.named_parameters())
    unknown = sorted(set(mask) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in mask)
    if unknown or missing:
        raise ValueError(f"mask names must match the trainable parameters: unknown {unknown}, missing {missing}")
    for n, m in mask.items():
        if m.shape != params[n].shape:
            raise ValueError(f"mask {n!r} has shape {tuple(m.shape)}, parameter has {tuple(params[n].shape)}")
    return {n: m.to(torch.bool) for n, m in mask.items()}


def _masked_step(opt: torch.optim.Optimizer, named: list, mask: dict | None, theta_o: dict | None) -> None:
    """grad *= m; optimizer step; theta[m == 0] = theta_o and momentum[m == 0] = 0 (RL.py's restore)."""
    if mask is not None:
        for n, p in named:
            if p.grad is not None:
                p.grad.mul_(mask[n])
    opt.step()
    if mask is None:
        return
    with torch.no_grad():
        for n, p in named:
            p.copy_(torch.where(mask[n], p, theta_o[n]))  # exact theta_o where m = 0 (no arithmetic)
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.masked_fill_(~mask[n], 0.0)


def unlearn(model: nn.Module, mask: dict[str, Tensor] | None, forget, retain, *, method: str = "random_label",
            epochs: int = 10, lr: float = 0.013, momentum: float = 0.9, weight_decay: float = 5e-4,
            alpha: float = 1.0, n_classes: int | None = None, seed: int = 0,
            callback: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Unlearn D_f from `model` in place with SGD, optionally restricted to the saliency mask.

    Methods (per epoch; the order of the batches in each pass is a seeded permutation):
      - "random_label" (RL.py, CIFAR-10 path): one pass over D_f with labels y' ~ Uniform({0..C-1} minus {y}),
        redrawn every pass, loss CE(x, y'); then one pass over D_r with loss alpha * CE(x, y).
      - "finetune": one pass over D_r with CE (FT baseline; D_f unused).
      - "grad_ascent": one pass over D_f with loss -CE(x, y) (GA baseline; D_r unused).
    SGD is PyTorch's (coupled weight decay, buf = mu buf + g + wd theta, theta -= lr buf). With a mask, see
    `_masked_step`: after every step theta = m * theta + (1 - m) * theta_o holds exactly.

    Args:
        model: classifier returning logits; trained in train mode, returned in eval mode.
        mask: {name: bool, True = editable} for every trainable parameter (`saliency_mask`), or None.
        forget, retain: batches of D_f and D_r.
        method: one of METHODS.
        epochs, lr, momentum, weight_decay: SGD settings (defaults: the README's CIFAR-10 example).
        alpha: weight of the retain loss in "random_label".
        n_classes: C (required for "random_label").
        seed: seeds the batch orders and the random labels.
        callback: called as callback(step, model) after every (masked) step.

    Returns:
        the same model, in eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "random_label" and (n_classes is None or n_classes < 2):
        raise ValueError(f"random_label needs n_classes >= 2, got {n_classes!r}")
    if epochs < 0 or lr <= 0:
        raise ValueError(f"need epochs >= 0 and lr > 0, got epochs={epochs!r}, lr={lr!r}")
    mask = _check_mask(model, mask)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta_o = {n: p.detach().clone() for n, p in named} if mask is not None else None
    opt = torch.optim.SGD([p for _, p in named], lr=lr, momentum=momentum, weight_decay=weight_decay)
    fb = _as_batches(forget) if method != "finetune" else []
    rb = _as_batches(retain) if method != "grad_ascent" else []
    gen = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for _ in range(epochs):
        passes = {"random_label": [(fb, "random"), (rb, "retain")], "finetune": [(rb, "retain")],
                  "grad_ascent": [(fb, "ascent")]}[method]
        for batches, kind in passes:
            for i in torch.randperm(len(batches), generator=gen).tolist():
                x, y = batches[i]
                logits = model(x)  # (B, C)
                if kind == "random":  # y' = y + U{1..C-1} mod C: uniform over the other classes
                    y = (y + torch.randint(1, n_classes, y.shape, generator=gen)) % n_classes
                    loss = F.cross_entropy(logits, y)
                elif kind == "retain":
                    loss = (alpha if method == "random_label" else 1.0) * F.cross_entropy(logits, y)
                else:
                    loss = -F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _masked_step(opt, named, mask, theta_o)
                step += 1
                if callback is not None:
                    callback(step, model)
    opt.zero_grad(set_to_none=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------- metrics

@torch.no_grad()
def _probs(model: nn.Module, data) -> tuple[Tensor, Tensor]:
    was_training = model.training
    model.eval()
    try:
        pairs = _as_batches(data)
        p = torch.cat([F.softmax(model(x).double(), -1) for x, _ in pairs])  # (N, C)
        y = torch.cat([y for _, y in pairs])  # (N,)
    finally:
        model.train(was_training)
    return p, y


def accuracy(model: nn.Module, data) -> float:
    """Top-1 accuracy in percent on batches `data` (eval mode)."""
    p, y = _probs(model, data)
    return 100.0 * float((p.argmax(1) == y).double().mean())


def mia_efficacy(model: nn.Module, forget, retain, test) -> float:
    """SalUn's MIA-efficacy (percent): the share of D_f that a confidence attack calls NON-members.

    As `SVC_MIA.py` ("confidence", the number the README reports): feature = p_y, the softmax probability of
    the true class; an RBF SVC (C = 3, gamma = "auto") is fit on the first len(test) retain examples as members
    (label 1) against the test set as non-members (label 0); efficacy = 100 * (1 - mean prediction on D_f).
    Higher = D_f looks less like training data.
    """
    from sklearn.svm import SVC

    pr, yr = _probs(model, retain)
    pt, yt = _probs(model, test)
    pf, yf = _probs(model, forget)
    conf = lambda p, y: p.gather(1, y[:, None]).numpy()  # noqa: E731  (N, 1)
    n = min(len(yt), len(yr))
    X = np.concatenate([conf(pr[:n], yr[:n]), conf(pt, yt)])  # (n + N_test, 1)
    lab = np.concatenate([np.ones(n), np.zeros(len(yt))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(X, lab)
    return 100.0 * float(1.0 - clf.predict(conf(pf, yf)).mean())


def unlearning_metrics(model: nn.Module, forget, retain, test) -> dict[str, float]:
    """UA = 100 - FA, RA, TA, FA (accuracy on D_f) and MIA (`mia_efficacy`), all in percent."""
    fa = accuracy(model, forget)
    return {"UA": 100.0 - fa, "RA": accuracy(model, retain), "TA": accuracy(model, test), "FA": fa,
            "MIA": mia_efficacy(model, forget, retain, test)}


# ------------------------------------------------------------------------------------------- digits experiment

DIGITS_DEFAULTS = {
    # per scenario, chosen on unreported tuning seeds by benchmarks/unlearning.py (grid in benchmarks/UNLEARNING.md)
    "train_epochs": 20, "batch_size": 32, "fraction": 0.5,
    "random10": {"finetune": {"epochs": 10, "lr": 0.05}, "random_label": {"epochs": 5, "lr": 0.002},
                 "salun": {"epochs": 2, "lr": 0.01}},
    "class": {"finetune": {"epochs": 10, "lr": 0.05}, "random_label": {"epochs": 10, "lr": 0.002},
              "salun": {"epochs": 10, "lr": 0.002}},
}


def _split_forget(y: Tensor, forget: str, seed: int) -> Tensor:
    """Bool (N,) forget indicator: "random10" = a seeded random 10% of rows, "class:N" = every row of class N."""
    n = len(y)
    if forget == "random10":
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:round(0.1 * n)]
        out = torch.zeros(n, dtype=torch.bool)
        out[pick] = True
        return out
    if forget.startswith("class:") and forget[6:].isdigit() and int(forget[6:]) in set(y.tolist()):
        return y == int(forget[6:])
    raise ValueError(f"forget must be 'random10' or 'class:N' with N a class id, got {forget!r}")


@dataclass
class DigitsSetup:
    """The fixed part of a digits unlearning experiment: splits, batches, the original and Retrain models."""

    forget: str
    seed: int
    hidden: int
    train_epochs: int
    batch_size: int
    forget_set: tuple  # (X_f (N_f, 64), y_f (N_f,))
    retain_set: tuple  # (X_r, y_r)
    test_set: tuple  # (X_t, y_t); class forgetting: the other classes only
    forget_batches: list
    retain_batches: list
    original: nn.Module
    retrain: nn.Module
    rows: dict = field(default_factory=dict)  # {"original": metrics + seconds, "retrain": ...}


def digits_setup(forget: str = "random10", seed: int = 0, *, hidden: int = 32, train_epochs: int = 20,
                 batch_size: int = 32, data=None) -> DigitsSetup:
    """Split D_f / D_r, train the original (all rows) and Retrain (D_r only) with `train_digits_mlp`, seed `seed`,
    and measure both (see `digits_unlearning`). Reusable across unlearning settings (tuning grids)."""
    from ..demo.digits import DigitsData, load_digits_tensors, train_digits_mlp

    d = load_digits_tensors() if data is None else data
    f = _split_forget(d.y_train, forget, seed)  # (N,) bool
    Xf, yf, Xr, yr = d.X_train[f], d.y_train[f], d.X_train[~f], d.y_train[~f]
    keep_t = d.y_test != int(forget[6:]) if forget.startswith("class:") else torch.ones_like(d.y_test, dtype=torch.bool)
    test = (d.X_test[keep_t], d.y_test[keep_t])

    def fit(D):
        with torch.random.fork_rng(devices=[]):  # train_digits_mlp seeds the global RNG
            t0 = time.perf_counter()
            return train_digits_mlp(hidden, train_epochs, seed, data=D)[0], time.perf_counter() - t0

    (orig, t_o), (re, t_r) = fit(d), fit(DigitsData(Xr, yr, d.X_test, d.y_test))
    st = DigitsSetup(forget, seed, hidden, train_epochs, batch_size, (Xf, yf), (Xr, yr), test,
                     make_batches(Xf, yf, batch_size, seed), make_batches(Xr, yr, batch_size, seed + 1), orig, re)
    st.rows = {k: {**unlearning_metrics(m, st.forget_set, st.retain_set, test), "seconds": t}
               for k, m, t in (("original", orig, t_o), ("retrain", re, t_r))}
    return st


def digits_unlearning(forget: str = "random10", seed: int = 0, *, hidden: int = 32, settings: dict | None = None,
                      data=None, setup: DigitsSetup | None = None) -> "pandas.DataFrame":  # noqa: F821
    """SalUn vs Retrain, fine-tuning and unmasked random labelling on scikit-learn's digits (offline, CPU).

    The original model is `gradsight.demo.digits.train_digits_mlp` (64-h-h-10 ReLU MLP, Adam, batch 64, float64)
    on the 1,257-row training split; Retrain is the same recipe and seed on D_r only. The unlearning methods
    start from a copy of the original and use SGD (momentum 0.9, weight decay 5e-4, batch `batch_size`) with
    the per-method epochs and lr of `settings` (default DIGITS_DEFAULTS); SalUn = random labelling with the
    saliency mask at `fraction`. For "class:N", TA is measured on the test rows of the other classes.

    Args:
        forget: "random10" (a seeded random 10% of the training rows) or "class:N" (every row of class N).
        seed: seeds the original and retrained models, the forget split, the batches and the random labels.
        hidden: MLP width.
        settings: overrides: "train_epochs", "batch_size", "fraction", or a method name -> {"epochs": .., "lr": ..}
            merged over that method's DIGITS_DEFAULTS entry for the scenario ("random10" or "class").
        data: a `DigitsData` (default `load_digits_tensors()`).
        setup: a `digits_setup` result to reuse (must match forget, seed, hidden and the training settings).

    Returns:
        DataFrame indexed by method (original, retrain, finetune, random_label, salun) with UA, RA, TA, FA, MIA
        (percent), seconds (training or unlearning time, SalUn including its saliency pass) and gap = mean
        |metric - Retrain's| over UA, RA, TA, MIA. `.attrs` holds the settings and the set sizes.
    """
    import pandas as pd

    kind = "class" if forget.startswith("class:") else "random10"
    cfg = {k: v for k, v in DIGITS_DEFAULTS.items() if k not in ("random10", "class")}
    cfg.update({m: dict(DIGITS_DEFAULTS[kind][m]) for m in ("finetune", "random_label", "salun")})
    unknown = sorted(set(settings or {}) - set(cfg))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(cfg)}")
    for k, v in (settings or {}).items():  # a method's dict updates that method's epochs / lr; others replace
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    want = (forget, seed, hidden, cfg["train_epochs"], cfg["batch_size"])
    if setup is None:
        setup = digits_setup(forget, seed, hidden=hidden, train_epochs=want[3], batch_size=want[4], data=data)
    have = (setup.forget, setup.seed, setup.hidden, setup.train_epochs, setup.batch_size)
    if have != want:
        raise ValueError(f"setup was built for (forget, seed, hidden, train_epochs, batch_size) = {have}, not {want}")
    fb, rb = setup.forget_batches, setup.retain_batches
    rows = {k: dict(v) for k, v in setup.rows.items()}
    for name, method in (("finetune", "finetune"), ("random_label", "random_label"), ("salun", "random_label")):
        m = copy.deepcopy(setup.original)
        t0 = time.perf_counter()
        mask = saliency_mask(saliency(m, fb), cfg["fraction"]) if name == "salun" else None
        unlearn(m, mask, fb, rb, method=method, n_classes=10, seed=seed, **cfg[name])
        t = time.perf_counter() - t0
        rows[name] = {**unlearning_metrics(m, setup.forget_set, setup.retain_set, setup.test_set), "seconds": t}
    df = pd.DataFrame.from_dict(rows, orient="index")
    keys = ["UA", "RA", "TA", "MIA"]
    df["gap"] = (df[keys] - df.loc["retrain", keys]).abs().mean(axis=1)
    df.attrs = {"forget": forget, "seed": seed, "hidden": hidden, "n_forget": len(setup.forget_set[1]),
                "n_retain": len(setup.retain_set[1]), "n_test": len(setup.test_set[1]), "settings": cfg}
    return df
