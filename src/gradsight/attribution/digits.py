"""Offline CPU ground truth for attribution on scikit-learn's digits: LDS retraining targets and leave-one-out.

Nothing downloads: the 1797 8x8 digits ship inside scikit-learn. The protocol follows act.md §A.3 and dattri's
``retrain_lds``:

- Data (``load_task``): stratified split of the 1797 images into 1000 train / 500 test (seed 0; the other 297
  are unused), standardised with the train mean and sd (constant pixels: sd 1). float64 by default.
  (``gradsight.demo.digits.load_digits_tensors`` splits by a test fraction and standardises on all remaining
  rows, so it cannot give this 1000/500 split.)
- Models (``make_model``): "lr" = Linear(64, 10), 650 parameters, multinomial logistic regression;
  "mlp" = Linear(64, 32)-ReLU-Linear(32, 10), 2410 parameters. PyTorch's default init under
  ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).
- Recipes (``Recipe``; ``train``):
  * LR: minimise mean CE + (l2 / 2) * ||W||^2 (bias not penalised), l2 = 1e-3, full batch, L-BFGS with a
    strong-Wolfe (More-Thuente) line search (scipy L-BFGS-B without bounds), float64, until max |grad| <= 1e-10
    or the objective stops decreasing in float64 (that floor is max |grad| ~2e-10 on 500-1000 rows). The
    objective is convex, so two inits agree to ~1e-7 in W and LOO deltas are reproducible to ~1e-8. Softmax
    is blind to a common shift of the 10 biases and the bias is not penalised, so that shift is fixed by
    centring the bias (mean 0); the Hessian is singular along it (damp, or use a pseudo-inverse, for IF).
  * MLP: SGD, lr 0.05, momentum 0.9 (PyTorch's rule: buf = 0.9 buf + g, first buf = g; p -= lr buf),
    30 epochs, batch 32 (last batch smaller), mean CE per batch, no weight decay; init from
    ``torch.manual_seed(seed)``, epoch orders from ``np.random.default_rng(seed).permutation``.
  Both loops are written in numpy with hand-derived gradients, ~20x faster than eager autograd on tiny
  batches; tests check them against autograd (the loss and the torch.optim.SGD trajectory).
- Targets (``targets``): margin = logit_y - logsumexp_{c != y} logit_c, and neg_loss = -CE (higher = better).
  Both are increasing functions of p_y (margin = log(p_y / (1 - p_y)), neg_loss = log p_y), so with one run per
  subset their LDS (a rank correlation) is identical; they differ only once R runs are averaged.
- Ground truth (``ground_truth``): subsets ``lds.subsets(1000, m, alpha, seed)``; subset j, run r is trained
  with seed ``seed + j * runs + r`` (dattri's seeding); arrays margin / neg_loss (R, m, N_test).
- Leave-one-out (``loo_ground_truth``): convex LR retrained without each chosen example, warm-started from
  the full-data optimum; delta = CE_test(without i) - CE_test(full), positive = example i helped.

Example:
    >>> task = load_task()
    >>> gt = ground_truth(task, "mlp", m=100, runs=3, cache="~/.cache/gradsight/lds")
    >>> lds.lds(scores, gt.subsets, gt.target("margin")).mean, gt.ceiling("margin")
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import lds as _lds

__all__ = ["DigitsTask", "Recipe", "TrainResult", "GroundTruth", "load_task", "make_model", "train", "targets",
           "ground_truth", "loo_ground_truth", "epoch_orders"]

KINDS = ("lr", "mlp")
_FORMAT = 1  # bump when stored arrays or training semantics change: it is part of the cache key


@dataclass(frozen=True)
class DigitsTask:
    """Standardised digits split: X (N, 64) float, y (N,) int64 class ids."""

    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor

    @property
    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the four tensors' dtypes and bytes (the cache key's task part)."""
        h = hashlib.sha256()
        for t in (self.X_train, self.y_train, self.X_test, self.y_test):
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters (defaults: act.md §A.3). Part of the ground-truth cache key."""

    l2: float = 1e-3  # LR: (l2 / 2) ||W||^2 added to the mean CE
    lbfgs_gtol: float = 1e-10  # LR: stop when max |grad| <= this
    lbfgs_history: int = 20
    lbfgs_max_iter: int = 5000
    lr: float = 0.05  # MLP: SGD
    momentum: float = 0.9
    epochs: int = 30
    batch_size: int = 32


@dataclass
class TrainResult:
    """A trained model, optional checkpoints [(state_dict, lr)] (the last is the final model), and info."""

    model: nn.Module
    checkpoints: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GroundTruth:
    """LDS retraining targets: subsets (m, k); margin and neg_loss (R, m, N_test); seeds (m, R) (all numpy)."""

    subsets: np.ndarray
    margin: np.ndarray
    neg_loss: np.ndarray
    seeds: np.ndarray
    meta: dict
    n_trained: int = 0  # runs trained by this call (0 when everything came from the cache)

    def target(self, name: str = "margin") -> np.ndarray:
        """(m, N_test) target averaged over the R runs ("margin" or "neg_loss")."""
        return self._runs(name).mean(0)

    def ceiling(self, name: str = "margin") -> float:
        """Run-vs-run noise ceiling (``lds.noise_ceiling``); needs R >= 2."""
        return _lds.noise_ceiling(self._runs(name))

    def lds(self, scores, name: str = "margin") -> _lds.LDSResult:
        """LDS of ``scores`` (N_train, N_test) against the run-averaged ``name`` target."""
        return _lds.lds(scores, self.subsets, self.target(name))

    def _runs(self, name: str) -> np.ndarray:
        if name not in ("margin", "neg_loss"):
            raise ValueError(f"name must be 'margin' or 'neg_loss', got {name!r}")
        return getattr(self, name)


def load_task(n_train: int = 1000, n_test: int = 500, seed: int = 0, dtype: torch.dtype = torch.float64
              ) -> DigitsTask:
    """The stratified 1000/500 digits split, standardised with the training mean and sd.

    Args:
        n_train, n_test: split sizes (n_train + n_test <= 1797).
        seed: ``random_state`` of scikit-learn's ``train_test_split``.
        dtype: torch.float64 (default) or torch.float32 for the inputs.

    Returns:
        DigitsTask.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    X, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    if n_train < 10 or n_test < 10 or n_train + n_test > len(y):
        raise ValueError(f"need 10 <= n_train, n_test and n_train + n_test <= {len(y)}, got {n_train}, {n_test}")
    Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=n_train, test_size=n_test, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0
    t = lambda a: torch.as_tensor((a - mu) / sd, dtype=dtype)  # noqa: E731
    return DigitsTask(t(Xtr), torch.as_tensor(ytr, dtype=torch.long), t(Xte), torch.as_tensor(yte, dtype=torch.long))


def make_model(kind: str, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A fresh "lr" (Linear(64, 10)) or "mlp" (Linear(64, 32)-ReLU-Linear(32, 10)) with PyTorch's default init.

    Args:
        kind: "lr" or "mlp".
        seed: init seed (``torch.manual_seed`` inside ``torch.random.fork_rng``: the caller's RNG is untouched).
        dtype: parameter dtype.

    Returns:
        nn.Linear or nn.Sequential, in eval mode.
    """
    _check_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(64, 10) if kind == "lr" else nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model.to(dtype).eval()


def epoch_orders(n: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs, n) example orders of the MLP recipe: ``np.random.default_rng(seed).permutation(n)`` per epoch."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(epochs)])


def train(task_or_XY, kind: str, idx=None, seed: int = 0, checkpoints: int = 0, *, recipe: Recipe | None = None,
          init: nn.Module | None = None) -> TrainResult:
    """Train a digits model with the recipe of the module docstring.

    Args:
        task_or_XY: a DigitsTask (its training split is used) or a pair (X (N, 64), y (N,)).
        kind: "lr" or "mlp".
        idx: training rows to use (default: all), any integer array-like.
        seed: init seed (and, for the MLP, the epoch-order seed).
        checkpoints: k > 0 also returns k state dicts with the learning rate in force: the MLP after epochs
            round(E (i + 1) / k), the LR at evenly spaced L-BFGS iterations with lr 1.0 (L-BFGS has no step
            size; use uniform weights). The last checkpoint is the final model.
        recipe: hyper-parameters (default ``Recipe()``).
        init: LR only: warm-start from this model's parameters instead of a fresh init (leave-one-out).

    Returns:
        TrainResult(model in eval mode, checkpoints, info): info has "seconds" and, for LR, "n_iter" and
        "grad_max" (max |grad| of the objective at the returned parameters).
    """
    _check_kind(kind)
    recipe = recipe or Recipe()
    X, y = (task_or_XY.X_train, task_or_XY.y_train) if isinstance(task_or_XY, DigitsTask) else task_or_XY
    if idx is not None:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        X, y = X[idx], y[idx]
    if checkpoints < 0:
        raise ValueError(f"checkpoints must be >= 0, got {checkpoints!r}")
    if init is not None and kind != "lr":
        raise ValueError(f"init (warm start) is supported for kind='lr' only, got kind={kind!r}")
    t0 = time.perf_counter()
    model = make_model(kind, seed, X.dtype) if init is None else _clone(init)
    params = [p.detach().numpy().copy() for p in model.parameters()]  # [W1, b1, (W2, b2)] as numpy
    Xn, yn = X.detach().numpy(), y.numpy()
    if kind == "lr":
        params, snaps, info = _fit_lr(Xn, yn, params, recipe, checkpoints)
    else:
        params, snaps, info = _fit_mlp(Xn, yn, params, recipe, seed, checkpoints)
    _load(model, params)
    ckpts = [(_state_dict(model, s), lr) for s, lr in snaps]
    info["seconds"] = time.perf_counter() - t0
    return TrainResult(model.eval(), ckpts, info)


def targets(model: nn.Module, X: Tensor, y: Tensor) -> dict:
    """Per-example targets of a classifier (higher = the example is better served).

    Returns:
        {"margin": (N,), "neg_loss": (N,)} float64 numpy: margin = logit_y - logsumexp_{c != y} logit_c,
        neg_loss = log softmax(logits)_y = -CE.
    """
    with torch.no_grad():
        z = model(X).double()  # (N, C)
        zy = z.gather(1, y[:, None]).squeeze(1)  # (N,)
        others = z.scatter(1, y[:, None], float("-inf"))  # (N, C), true class masked
        margin = zy - torch.logsumexp(others, 1)
        neg_loss = zy - torch.logsumexp(z, 1)
    return {"margin": margin.numpy(), "neg_loss": neg_loss.numpy()}


def ground_truth(task: DigitsTask, kind: str, m: int = 100, alpha: float = 0.5, runs: int = 3, seed: int = 0,
                 cache: str | Path | None = None, progress: Callable[[int, int], None] | None = None, *,
                 recipe: Recipe | None = None) -> GroundTruth:
    """Retrain on m random subsets, R runs each, and record the test targets (the LDS ground truth).

    Args:
        task: the data.
        kind: "lr" or "mlp".
        m, alpha, seed: subsets ``lds.subsets(N_train, m, alpha, seed)``; run r of subset j uses seed
            seed + j * runs + r.
        runs: R >= 1 trainings per subset (R >= 2 for a noise ceiling).
        cache: a directory. The result is stored as ``{kind}-{key}.safetensors`` (key: hash of kind, m, alpha,
            runs, seed, the task fingerprint, the recipe and the format version) and loaded on a rerun. While
            running, each finished subset is written to ``{kind}-{key}.parts/`` so an interrupted run resumes;
            the parts are removed once the final file is written. All writes are atomic (temp file, os.replace).
        progress: called as progress(done_runs, total_runs) after each subset.
        recipe: training hyper-parameters (default ``Recipe()``).

    Returns:
        GroundTruth.
    """
    _check_kind(kind)
    recipe = recipe or Recipe()
    if int(runs) != runs or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    S = _lds.subsets(len(task.y_train), m, alpha, seed)  # (m, k)
    seeds = seed + np.arange(m)[:, None] * runs + np.arange(runs)[None, :]  # (m, R)
    meta = {"kind": kind, "m": int(m), "alpha": float(alpha), "runs": int(runs), "seed": int(seed),
            "task": task.fingerprint, "recipe": asdict(recipe), "format": _FORMAT}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    final = parts = None
    if cache is not None:
        cache = Path(cache).expanduser()
        final, parts = cache / f"{kind}-{key}.safetensors", cache / f"{kind}-{key}.parts"
        got = _read(final, meta)
        if got is not None:
            return GroundTruth(got["subsets"], got["margin"], got["neg_loss"], got["seeds"], got["_meta"])
    n_test = len(task.y_test)
    margin = np.empty((runs, m, n_test))
    neg_loss = np.empty((runs, m, n_test))
    trained, t0 = 0, time.perf_counter()
    for j in range(m):
        part = None if parts is None else _read(parts / f"{j:05d}.safetensors", meta)
        if part is not None and np.array_equal(part["subset"], S[j]):
            margin[:, j], neg_loss[:, j] = part["margin"], part["neg_loss"]
        else:
            for r in range(runs):
                out = targets(train(task, kind, S[j], int(seeds[j, r]), recipe=recipe).model, task.X_test,
                              task.y_test)
                margin[r, j], neg_loss[r, j] = out["margin"], out["neg_loss"]
                trained += 1
            if parts is not None:
                _write(parts / f"{j:05d}.safetensors", meta,
                       subset=S[j], margin=margin[:, j], neg_loss=neg_loss[:, j])
        if progress is not None:
            progress((j + 1) * runs, m * runs)
    meta = {**meta, "seconds": time.perf_counter() - t0}
    if final is not None:
        _write(final, meta, subsets=S, margin=margin, neg_loss=neg_loss, seeds=seeds)
        shutil.rmtree(parts, ignore_errors=True)
    return GroundTruth(S, margin, neg_loss, seeds, meta, trained)


def loo_ground_truth(task: DigitsTask, test_idx, train_idx_subset, kind: str = "lr", seed: int = 0, *,
                     recipe: Recipe | None = None) -> np.ndarray:
    """Exact leave-one-out changes of test losses for the convex LR.

    Args:
        task: the data.
        test_idx: test rows whose CE is measured.
        train_idx_subset: training rows i to leave out, one retraining each (warm-started from the full optimum).
        kind: "lr" only (a non-convex model's LOO change is below its seed-to-seed noise).
        seed: init seed of the full-data model.
        recipe: hyper-parameters; lower ``lbfgs_gtol`` for deltas far below 1e-6.

    Returns:
        (len(train_idx_subset), len(test_idx)) float64: CE_test(trained without i) - CE_test(trained on all),
        the mean-CE objective renormalised to N - 1 rows. Positive = example i helped that test point.
    """
    if kind != "lr":
        raise ValueError(f"loo_ground_truth supports kind='lr' only, got kind={kind!r}")
    test_idx = torch.as_tensor(np.asarray(test_idx), dtype=torch.long)
    Xq, yq = task.X_test[test_idx], task.y_test[test_idx]
    full = train(task, "lr", seed=seed, recipe=recipe).model
    base = -targets(full, Xq, yq)["neg_loss"]  # (T,)
    n = len(task.y_train)
    out = []
    for i in np.asarray(train_idx_subset).ravel():
        if not 0 <= i < n:
            raise ValueError(f"train_idx_subset holds {i}, outside [0, {n})")
        keep = np.delete(np.arange(n), i)
        model = train(task, "lr", keep, seed, recipe=recipe, init=full).model
        out.append(-targets(model, Xq, yq)["neg_loss"] - base)
    return np.stack(out) if out else np.empty((0, len(test_idx)))


# -- numpy training loops ---------------------------------------------------------------------------------------

def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _lr_objective(w: np.ndarray, Xa: np.ndarray, Y: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean CE + (l2 / 2) ||W||^2 and its gradient; w = [W | b] flattened (10 x 65), Xa = [X | 1] (N, 65)."""
    n, C = Y.shape
    Wb = w.reshape(C, Xa.shape[1])  # (C, 65)
    z = Xa @ Wb.T  # (N, C)
    zmax = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]  # (N,)
    W = Wb[:, :-1]
    loss = (lse - (z * Y).sum(1)).mean() + 0.5 * l2 * (W * W).sum()
    G = (np.exp(z - lse[:, None]) - Y).T @ Xa / n  # (C, 65)
    G[:, :-1] += l2 * W
    return float(loss), G.ravel()


def _fit_lr(X, y, params, recipe: Recipe, k: int):
    from scipy.optimize import minimize

    W, b = params
    C = W.shape[0]
    Xa = np.hstack([X, np.ones((len(X), 1))]).astype(np.float64)  # (N, 65); LR is always optimised in float64
    Y = np.eye(C)[y]  # (N, C) one-hot
    iterates = []
    res = minimize(_lr_objective, np.hstack([W, b[:, None]]).astype(np.float64).ravel(), args=(Xa, Y, recipe.l2),
                   jac=True, method="L-BFGS-B", callback=(lambda xk: iterates.append(xk.copy())) if k else None,
                   options={"maxcor": recipe.lbfgs_history, "gtol": recipe.lbfgs_gtol, "ftol": 0.0,
                            "maxiter": recipe.lbfgs_max_iter, "maxfun": 2 * recipe.lbfgs_max_iter})
    # keep W's and b's dtypes; centre b: softmax ignores a common bias shift, which no term of the objective fixes
    split = lambda w: [w.reshape(C, -1)[:, :-1].astype(W.dtype),  # noqa: E731
                       (w.reshape(C, -1)[:, -1] - w.reshape(C, -1)[:, -1].mean()).astype(b.dtype)]
    snaps = []
    if k:
        iterates[-1:] = [res.x]  # the last checkpoint is the returned optimum
        picks = [round(len(iterates) * (i + 1) / k) - 1 for i in range(k)]
        snaps = [(split(iterates[max(p, 0)]), 1.0) for p in picks]
    grad_max = float(np.abs(_lr_objective(res.x, Xa, Y, recipe.l2)[1]).max())
    return split(res.x), snaps, {"n_iter": int(res.nit), "grad_max": grad_max, "message": str(res.message)}


def _fit_mlp(X, y, params, recipe: Recipe, seed: int, k: int):
    W1, b1, W2, b2 = params
    lr, mom, B = recipe.lr, recipe.momentum, recipe.batch_size
    Y = np.eye(W2.shape[0], dtype=X.dtype)[y]  # (N, C)
    orders = epoch_orders(len(X), recipe.epochs, seed)  # (E, N)
    save_at = {round(recipe.epochs * (i + 1) / k) for i in range(k)} if k else set()
    bufs, snaps = None, []
    for e, order in enumerate(orders):
        Xp, Yp = X[order], Y[order]  # one gather per epoch, then contiguous slices
        for s in range(0, len(X), B):
            xb, Yb = Xp[s:s + B], Yp[s:s + B]  # (b, 64), (b, C)
            h = xb @ W1.T + b1  # (b, 32)
            a = np.maximum(h, 0)
            dz = (_softmax(a @ W2.T + b2) - Yb) / len(xb)  # (b, C): d mean-CE / d logits
            da = dz @ W2  # (b, 32)
            da[h <= 0] = 0  # ReLU'(0) = 0, as autograd
            grads = (da.T @ xb, da.sum(0), dz.T @ a, dz.sum(0))
            if bufs is None:
                bufs = [g.copy() for g in grads]
            else:
                for buf, g in zip(bufs, grads):
                    buf *= mom
                    buf += g
            for p, buf in zip((W1, b1, W2, b2), bufs):
                p -= lr * buf
        if e + 1 in save_at:
            snaps.append(([W1.copy(), b1.copy(), W2.copy(), b2.copy()], lr))
    return [W1, b1, W2, b2], snaps, {}


# -- helpers ----------------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _clone(model: nn.Module) -> nn.Module:
    out = make_model("lr", 0, next(model.parameters()).dtype)
    out.load_state_dict(model.state_dict())
    return out


def _load(model: nn.Module, params: list) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(torch.from_numpy(np.ascontiguousarray(v)))


def _state_dict(model: nn.Module, params: list) -> dict:
    names = [n for n, _ in model.named_parameters()]
    return {n: torch.from_numpy(np.ascontiguousarray(v)).clone() for n, v in zip(names, params)}


def _write(path: Path, meta: dict, **arrays) -> None:
    from ..runs.store import write_safetensors

    write_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path,
                      metadata={"meta": json.dumps(meta, sort_keys=True)})


def _read(path: Path, meta: dict) -> dict | None:
    """The arrays (and "_meta") of a cache file whose stored meta matches ``meta`` (ignoring timings), else None."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            stored = json.loads((f.metadata() or {}).get("meta", "{}"))
            stored.pop("seconds", None)
            if stored != json.loads(json.dumps(meta, sort_keys=True)):
                return None
            return {**{k: f.get_tensor(k) for k in f.keys()},
                    "_meta": json.loads(f.metadata()["meta"])}
    except (OSError, ValueError, SafetensorError):  # a truncated or foreign file is recomputed, never trusted
        return None
