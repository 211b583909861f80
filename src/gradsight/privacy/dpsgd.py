"""DP-SGD as Opacus runs it, from gradsight pieces, and what it costs in accuracy on digits.

One DP-SGD step (Abadi et al. 2016; opacus/optimizers/optimizer.py, ``loss_reduction="mean"``):

    B_t ~ Poisson(q): each of the n examples is in the batch with probability q (may be empty),
    g_t = ( sum_{e in B_t} min(1, C / (||g_e|| + 1e-6)) g_e  +  N(0, sigma^2 C^2 I) ) / (q n),
    theta <- optimizer step with g_t,

built here from `gradsight.privacy.clip.PerExampleClipper` (the clipped sum, ghost norms, no per-example
gradients materialised), ``wrap(optimizer, dp_noise(sigma, C, q n))`` (noise and the division by the EXPECTED
batch size, opacus #420) and an `Accountant` (epsilon at delta). An empty batch still adds noise and steps
(opacus #161: skipping it would leak that the batch was empty and break the accountant's Poisson assumption).
Per-layer clipping bounds each parameter tensor by C_l, with noise std sigma sqrt(sum_l C_l^2)
(perlayeroptimizer.py).

`train_digits` trains the digits MLP 64-32-10 under one defence with the same Poisson batches for every defence
and reports test accuracy with epsilon; `utility_grid` tabulates defences x seeds.

Example:
    >>> dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0, max_grad_norm=1.0,
    ...            sample_rate=0.05, n=len(X), delta=1e-5)
    >>> for idx in poisson_batches(len(X), 0.05, steps=200, seed=0):
    ...     dp.step(lambda: F.cross_entropy(model(X[idx]), y[idx], reduction="none"), len(idx))
    >>> dp.epsilon()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms.base import identity, wrap
from ..transforms.privacy import dp_noise
from .accountant import Accountant

__all__ = ["poisson_batches", "DPSGD", "train_defended", "train_digits", "utility_grid", "digits_mlp_1h"]


def poisson_batches(n: int, sample_rate: float, steps: int, seed: int = 0) -> Iterator[Tensor]:
    """Poisson-sampled batches of row indices, as Opacus' ``UniformWithReplacementSampler``.

    Each step draws u ~ U[0, 1)^n from a ``torch.Generator`` seeded with ``seed`` and yields the rows with
    u_i < q (opacus/utils/uniform_sampler.py): batch sizes are Binomial(n, q), and a batch may be empty.

    Args:
        n: dataset size >= 1.
        sample_rate: q in (0, 1].
        steps: number of batches >= 0.
        seed: generator seed.
    Yields:
        LongTensor (|B_t|,) of sorted row indices.
    """
    if int(n) < 1:
        raise ValueError(f"poisson_batches: n must be >= 1 (got {n})")
    if not (0.0 < float(sample_rate) <= 1.0):
        raise ValueError(f"poisson_batches: sample rate must be in (0, 1] (got {sample_rate})")
    if int(steps) < 0:
        raise ValueError(f"poisson_batches: steps must be >= 0 (got {steps})")
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(int(steps)):
        mask = torch.rand(int(n), generator=gen) < float(sample_rate)  # (n,)
        yield mask.nonzero().reshape(-1)


def _layer_bounds(names: list[str], max_grad_norm, per_layer: bool):
    """Flat: C. Per-layer: {name: C_l}; a float C is split equally, C_l = C / sqrt(L), so sqrt(sum C_l^2) = C."""
    if isinstance(max_grad_norm, dict):
        return {n: float(max_grad_norm[n]) for n in names}
    if per_layer:
        return {n: float(max_grad_norm) / math.sqrt(len(names)) for n in names}
    return float(max_grad_norm)


class DPSGD:
    """Drives DP-SGD steps on ``model`` / ``optimizer`` (see the module docstring for the formula).

    Args:
        model: the network (examples must not interact in its forward: no BatchNorm in train mode).
        optimizer: any torch optimizer over the model's parameters (SGD for DP-SGD proper; Adam gives DP-Adam).
        noise_multiplier: sigma >= 0 (0: clipping only, epsilon infinite).
        max_grad_norm: C > 0 (inf: no clipping; then sigma must be 0), or {param name: C_l} for per-layer.
        sample_rate: q, the Poisson rate the batches were drawn with.
        n: dataset size; q n is the expected batch size every step divides by.
        delta: the accountant's delta (< 1/n).
        accountant: "rdp", "prv" or "gdp".
        per_layer: per-layer clipping (a float C is split equally over the L trainable tensors).
        seed: seed of the noise generator.
        log: optional callable(str) for the clipper's one-time notes.

    Attributes:
        clipper (PerExampleClipper), wrapped (`gradsight.transforms.Wrapped`), accountant (`Accountant`),
        steps (taken), last (the last `ClipResult` or None for an empty batch).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm, sample_rate: float, n: int, delta: float = 1e-5, accountant: str = "rdp",
                 per_layer: bool = False, seed: int = 0, log: Callable[[str], None] | None = None):
        from .clip import PerExampleClipper

        if not (0.0 < float(sample_rate) <= 1.0):
            raise ValueError(f"DPSGD: sample rate must be in (0, 1] (got {sample_rate})")
        self.model, self.optimizer = model, optimizer
        self.noise_multiplier, self.sample_rate, self.n = float(noise_multiplier), float(sample_rate), int(n)
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.max_grad_norm = _layer_bounds(list(self.params), max_grad_norm, per_layer)
        self.expected_batch_size = self.sample_rate * self.n
        self.accountant = Accountant(accountant, delta=delta, n=self.n)  # validates delta < 1/n
        self.clipper = PerExampleClipper(model, self.max_grad_norm, params=list(self.params), log=log)
        self.wrapped = wrap(optimizer, dp_noise(self.noise_multiplier, self.max_grad_norm,
                                                self.expected_batch_size, seed), model)
        self.steps = 0
        self.last = None

    def step(self, per_example_loss_fn: Callable[[], Tensor], batch_size: int):
        """One DP-SGD step on the current Poisson batch.

        Args:
            per_example_loss_fn: no-argument callable returning the (B,) per-example losses of the batch.
            batch_size: B = |batch|; 0 for an empty batch (then the function is not called, the gradient is
                zero + noise, and the step still counts).
        Returns:
            the `ClipResult` (per-example norms and clip factors), or None for an empty batch.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if int(batch_size) == 0:
            for p in self.params.values():
                p.grad = torch.zeros_like(p)  # the noise still goes in (opacus #161)
            self.last = None
        else:
            self.last = self.clipper.step(per_example_loss_fn)  # p.grad = clipped sum
        self.optimizer.step()  # wrap's pre-hook: (sum + N(0, sigma^2 C^2)) / (q n)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.steps += 1
        return self.last

    def epsilon(self, delta: float | None = None) -> float:
        """epsilon at ``delta`` (default the constructor's) after the steps taken; inf when sigma = 0."""
        return self.accountant.epsilon(delta)

    def remove(self) -> None:
        """Detach the noise transform from the optimizer."""
        self.wrapped.remove()


# ----------------------------------------------------------------------------------------------- digits

def digits_mlp_1h(hidden: int = 32, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """The 64 -> hidden -> 10 ReLU MLP of the privacy experiments (hidden 32: 2,410 parameters)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


def train_digits(defence: str = "none", *, epochs: int = 30, sample_rate: float = 0.05, lr: float = 0.5,
                 seed: int = 0, delta: float = 1e-5, max_grad_norm: float = 1.0, hidden: int = 32,
                 accountant: str = "rdp", data=None) -> dict:
    """Train the digits MLP 64-32-10 (ReLU, float64, plain SGD) under one defence; test accuracy and epsilon.

    Data: `gradsight.demo.digits.load_digits_tensors()` (1257 train / 540 test, inputs STANDARDISED with the
    training mean and sd). Batches: `poisson_batches(n, q, epochs * int(1 / q), seed)`, the same for every
    defence at a seed (Opacus' steps per epoch: int(1/q)). The model init is seeded with ``seed``. Every defence
    divides the batch's gradient SUM by the expected batch size q n (as DP-SGD), so they differ only by:

    - "none": nothing else (no formal DP: epsilon inf).
    - "clip": per-example clipping at C, no noise (epsilon inf).
    - "dp:S": DP-SGD, flat clipping at C, noise multiplier S (epsilon from the accountant).
    - "dp-layer:S": DP-SGD with per-layer clipping C_l = C / sqrt(4) for the 4 tensors (total C), noise S.
    - "prune:P": `prune_gradients(P)` on the averaged gradient (DLG's defence; epsilon inf).
    - "noise:S": N(0, S^2) added to each coordinate of the averaged gradient, no clipping (LAMP's
      ``--defense_noise``; unbounded sensitivity, so epsilon inf).

    Returns:
        dict(defence, accuracy (test), train_accuracy, epsilon, delta, steps, sample_rate, noise_multiplier,
        max_grad_norm, lr, epochs, seed, accountant, seconds).
    """
    from ..demo.digits import load_digits_tensors

    data = load_digits_tensors() if data is None else data
    X, y = data.X_train, data.y_train
    torch.manual_seed(seed)
    model = digits_mlp_1h(hidden, X.dtype)
    out = train_defended(model, lambda idx: F.cross_entropy(model(X[idx]), y[idx], reduction="none"), len(y),
                         defence, steps=int(epochs) * int(1 / sample_rate), sample_rate=sample_rate, lr=lr, seed=seed,
                         delta=delta, max_grad_norm=max_grad_norm, accountant=accountant)
    with torch.no_grad():
        acc = float((model(data.X_test).argmax(1) == data.y_test).double().mean())
        tr_acc = float((model(X).argmax(1) == y).double().mean())
    return {"defence": defence, "accuracy": acc, "train_accuracy": tr_acc, **out, "epochs": epochs}


def train_defended(model: nn.Module, per_example_loss: Callable[[Tensor], Tensor], n: int, defence: str, *,
                   steps: int, sample_rate: float, lr: float, seed: int = 0, delta: float = 1e-5,
                   max_grad_norm: float = 1.0, accountant: str = "rdp", log: Callable[[str], None] | None = None
                   ) -> dict:
    """Train `model` in place with plain SGD on Poisson batches (`poisson_batches(n, q, steps, seed)`, the same
    batches for every defence) under one defence (`gradsight.privacy.defences`); every defence divides the batch's
    gradient SUM by the expected batch size q n, as DP-SGD does, so they differ only by:

    - none: nothing else; clip: per-example clipping at C (`DPSGD` with sigma 0);
    - dp:S / dp-layer:S: DP-SGD (`DPSGD`), flat or per-layer clipping (C_l = C / sqrt(L)), noise multiplier S;
    - prune / topk / random / quantize / noise: the gradient transform on the averaged gradient.

    Args:
        per_example_loss: ``f(idx) -> (|idx|,)`` the losses of the rows idx (LongTensor) of the training data.
    Returns:
        dict(epsilon (inf without a formal guarantee), delta, steps, sample_rate, noise_multiplier,
        max_grad_norm, lr, seed, accountant, seconds).
    """
    from .defences import FORMAL, parse_defence, transform_for

    kind, val = parse_defence(defence)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sigma = val if kind in FORMAL else (0.0 if kind == "clip" else None)
    C = max_grad_norm if sigma is not None else None
    t0 = time.perf_counter()
    if sigma is not None:
        dp = DPSGD(model, opt, noise_multiplier=sigma, max_grad_norm=C, sample_rate=sample_rate, n=n, delta=delta,
                   accountant=accountant, per_layer=kind == "dp-layer", seed=seed, log=log)
        for idx in poisson_batches(n, sample_rate, steps, seed):
            dp.step(lambda idx=idx: per_example_loss(idx), len(idx))
        eps = dp.epsilon() if sigma > 0 else math.inf
        dp.remove()
    else:
        tx = transform_for(kind, val, seed) or identity()
        w = wrap(opt, tx, model)
        for idx in poisson_batches(n, sample_rate, steps, seed):
            opt.zero_grad(set_to_none=False)
            if len(idx):
                (per_example_loss(idx).sum() / (sample_rate * n)).backward()  # sum / (q n)
            else:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            opt.step()
        w.remove()
        eps = math.inf
    return {"epsilon": eps, "delta": delta, "steps": steps, "sample_rate": sample_rate,
            "noise_multiplier": sigma if sigma is not None else math.nan,
            "max_grad_norm": C if C is not None else math.inf, "lr": lr, "seed": seed, "accountant": accountant,
            "seconds": time.perf_counter() - t0}


def utility_grid(defences: Sequence[str], seeds: Sequence[int] = (0,), log: Callable[[str], None] | None = None,
                 **kw):
    """`train_digits` for every (defence, seed): a pandas DataFrame with one row each (columns as its dict).

    ``kw`` goes to `train_digits` (epochs, sample_rate, lr, delta, max_grad_norm, ...); the data are loaded once.
    ``log`` (callable(str)) gets one line per run.
    """
    import pandas as pd

    from ..demo.digits import load_digits_tensors

    kw.setdefault("data", load_digits_tensors())
    rows = []
    for d in defences:
        for s in seeds:
            r = train_digits(d, seed=s, **kw)
            rows.append(r)
            if log is not None:
                log(f"{d:>12} seed {s}: accuracy {r['accuracy']:.3f}  epsilon {r['epsilon']:.3g}  "
                    f"({r['seconds']:.1f} s)")
    return pd.DataFrame(rows)
