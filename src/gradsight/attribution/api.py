"""In-memory attribution for plain modules: features of a few thousand examples, every method, one call.

    S, info = attribute(model, "cross_entropy", (X_train, y_train), (X_test, y_test), method="ekfac")
    S[i, q] > 0: training on example i helps query q (lowers its loss / raises its margin)

For checkpoint ensembles (TracIn, TRAK) pass `checkpoints=[(state_dict, lr), ...]` (the model is loaded with
each in turn and restored afterwards). The run-directory analysis (`gradsight attribute`) streams the same
features from disk with the same `Scorer`; this front keeps everything in memory (tests, the LDS benchmark).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..capture.hooks import is_factorable
from ..inputs.module import row_losses
from ..curvature.operators import default_forward
from ..measures.step import backward_step
from ..capture.grads import FactoredGrad
from .curvature import KronStats
from .features import FeatureSpec, Featurizer, LayerCovariance
from .methods import Block, Checkpoint, Scorer

__all__ = ["featurize", "attribute", "as_batches", "linear_layers", "save_adam_state", "load_adam_state"]


def save_adam_state(model: nn.Module, optimizer, path) -> None:
    """Write an Adam / AdamW optimizer's moments as safetensors ("<param>.exp_avg", "<param>.exp_avg_sq", plus
    betas and eps in the metadata): what `gradsight attribute --adam-state` reads for LESS."""
    from ..runs.store import write_safetensors

    names = {p: n for n, p in model.named_parameters()}
    t = {}
    for p, st in optimizer.state.items():
        if p in names and "exp_avg_sq" in st:
            t[f"{names[p]}.exp_avg"] = st["exp_avg"]
            t[f"{names[p]}.exp_avg_sq"] = st["exp_avg_sq"]
    if not t:
        raise ValueError("the optimizer holds no Adam moments (has it taken a step?)")
    g = optimizer.param_groups[0]
    b1, b2 = g.get("betas", (0.9, 0.999))
    write_safetensors(t, path, metadata={"beta1": str(b1), "beta2": str(b2), "eps": str(g.get("eps", 1e-8))})


def load_adam_state(path, layers: dict, bias: bool = True):
    """An `AdamPreconditioner` from a file written by `save_adam_state` (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    from .features import AdamPreconditioner

    state: dict = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            name, _, moment = k.rpartition(".")
            state.setdefault(name, {})[moment] = f.get_tensor(k)
    return AdamPreconditioner.from_state(layers, state, bias=bias, beta1=float(meta.get("beta1", 0.9)),
                                         beta2=float(meta.get("beta2", 0.999)), eps=float(meta.get("eps", 1e-8)))


def linear_layers(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """{name: module} of the model's Linear-like layers (optionally those whose name matches `pattern`)."""
    import re

    rx = re.compile(pattern) if pattern else None
    out = {n: m for n, m in model.named_modules() if is_factorable(m) and (rx is None or rx.search(n))}  # '' = root
    if not out:
        raise ValueError(f"no Linear layer{' matches ' + repr(pattern) if pattern else ''} in "
                         f"{type(model).__name__}")
    return out


def as_batches(data, batch_size: int = 256) -> list:
    """A list of batches from (X, y) tensors (split into `batch_size` rows) or a list of batches as is."""
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        X, y = data
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
        if X.shape[0] == 0:
            raise ValueError("the data set is empty")
        return [(X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    batches = list(data)
    if not batches:
        raise ValueError("the data set is empty (no batches)")
    return batches


FISHER = ("empirical", "sampled", "ggn")


def fisher_losses(mode: str, loss, forward, generator: torch.Generator) -> list:
    """The per-row pseudo-losses whose gradients estimate the curvature, ``[fn(model, batch) -> (B,)]``.

    empirical: the true-label loss (one function). sampled: the loss at targets drawn from the model's own
    predictive distribution (cross-entropy: y ~ softmax(z); mse: t = f + N(0, I)); the true Fisher, in
    expectation (kronfluence's default). ggn: one function per output coordinate c, <f, s_c> with s_c the c-th
    column of a square root of the loss Hessian in the outputs (mse: e_c; cross-entropy: sqrt(p_c)(e_c - p)),
    so that the sum over c of the squared gradients is EXACTLY the generalized Gauss-Newton (C backwards).
    """
    if mode not in FISHER:
        raise ValueError(f"fisher must be one of {', '.join(FISHER)}, got {mode!r}")
    if mode == "empirical":
        return [row_losses(loss, forward)]
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"fisher={mode!r} needs the loss 'cross_entropy' or 'mse' (its predictive distribution); "
                         f"a custom loss supports fisher='empirical' only")

    def outputs(model, batch):
        out, _ = forward(model, batch)
        return out.reshape(out.shape[0], -1)  # (B, C)

    if mode == "sampled":
        def sampled(model, batch):
            z = outputs(model, batch)
            if loss == "cross_entropy":
                y = torch.multinomial(torch.softmax(z.detach().double(), -1), 1, generator=generator).squeeze(1)
                return torch.nn.functional.cross_entropy(z, y.to(z.device), reduction="none")
            t = z.detach() + torch.randn(z.shape, generator=generator, dtype=z.dtype)
            return 0.5 * (z - t).pow(2).sum(-1)
        return [sampled]

    def ggn(c):
        def fn(model, batch):
            z = outputs(model, batch)
            if loss == "mse":
                return z[:, c]
            p = torch.softmax(z.detach(), -1)  # (B, C)
            s = -p * p[:, c:c + 1].sqrt()
            s[:, c] += p[:, c].sqrt()
            return (z * s).sum(-1)
        return fn

    return ggn


def _kron_stats(model, layers, batch, fns, fz: Featurizer, add, B: int) -> KronStats:
    """KronStats of one batch of one-token rows over the pseudo-losses `fns`, and their covariance sums."""
    G: dict[str, torch.Tensor] = {}
    a: dict[str, torch.Tensor] = {}
    for fn in fns:
        for n, g in backward_step(model, layers, batch, fn).grads.items():
            AP, GP = fz._sides(n, g)  # (B, 1, k_in), (B, 1, k_out)
            gp = GP[:, 0].double()
            G[n] = gp.unsqueeze(2) * gp.unsqueeze(1) + (G[n] if n in G else 0)  # (B, k_out, k_out)
            a[n] = AP[:, 0].double()
    add({n: LayerCovariance(a[n].T @ a[n], G[n].sum(0), B, B) for n in G})
    return KronStats(G, a, B)


def featurize(model: nn.Module, loss, batches: Sequence, *, layers: dict[str, nn.Module] | None = None,
              spec: FeatureSpec | None = None, dtype: torch.dtype = torch.float32, covariance: bool = True,
              forward=None, fisher: str = "empirical", seed: int = 0, pre=None) -> tuple:
    """Features of every row of `batches` (ids 0..N-1 in order), the curvature statistics and shapes.

    Each row's gradient is the gradient of ITS OWN loss (`loss` on its one-row slice), captured in one batched
    forward/backward per batch (eval mode). Rows with a non-finite loss or gradient raise a ValueError naming
    them (attribution has no meaningful score for them).

    Returns:
        (block, covs, shapes, fisher): block the features (`Block`), covs {layer: LayerCovariance} of the
        curvature's pseudo-gradients (the features themselves for fisher="empirical"), shapes
        {layer: (k_out, k_in)}, fisher None (empirical) or a list of ({layer: (n * C, k_out, k_in)}, n) blocks
        of pseudo-gradient features for the EK-FAC / raw pass (see `fisher_losses`).
    """
    layers = layers or linear_layers(model)
    spec = spec or FeatureSpec()
    forward = forward or default_forward
    fz = Featurizer(spec, {n: getattr(m, "bias", None) is not None for n, m in layers.items()}, dtype)
    losses_fn = row_losses(loss, forward)
    gen = torch.Generator().manual_seed(seed)
    pseudo = None if fisher == "empirical" else fisher_losses(fisher, loss, forward, gen)
    was = model.training
    model.eval()
    feats: dict[str, list] = {n: [] for n in layers}
    covs: dict[str, LayerCovariance] = {}
    fisher_blocks: list | None = None if pseudo is None else []
    all_losses, offset = [], 0

    def add(c: dict) -> None:
        for n, cv in c.items():
            covs[n] = cv if n not in covs else covs[n] + cv

    try:
        for batch in batches:
            step = backward_step(model, layers, batch, losses_fn)
            if step.bad:
                rows = {offset + p: r for p, r in step.bad.items()}
                raise ValueError(f"non-finite loss or gradient at row(s) {dict(list(rows.items())[:5])}")
            f, c = fz(step.grads, covariance=covariance and pseudo is None, pre=pre)
            for n, X in f.items():
                feats[n].append(X.detach().cpu())
            add(c)
            B = step.losses.shape[0]
            if pseudo is not None and covariance:
                fns = pseudo if isinstance(pseudo, list) else \
                    [pseudo(c) for c in range(forward(model, batch)[0].reshape(B, -1).shape[1])]
                one_token = all(isinstance(g, FactoredGrad) and g.A.shape[1] == 1 for g in step.grads.values())
                if one_token:  # per-example Kronecker statistics (C x cheaper than C pseudo-feature rows)
                    fisher_blocks.append(_kron_stats(model, layers, batch, fns, fz, add, B))
                else:
                    parts: dict[str, list] = {n: [] for n in layers}
                    for fn in fns:
                        fs, cs = fz(backward_step(model, layers, batch, fn).grads, covariance=True)
                        for n, X in fs.items():
                            parts[n].append(X.detach().cpu())
                        add({n: LayerCovariance(cv.A, cv.S, cv.n_tokens if fn is fns[0] else 0,
                                                cv.n_examples if fn is fns[0] else 0) for n, cv in cs.items()})
                    fisher_blocks.append(({n: torch.cat(v) for n, v in parts.items()}, B))
            all_losses.append(step.losses.double().cpu())
            offset += B
    finally:
        model.train(was)
    block = Block({n: torch.cat(v) for n, v in feats.items()}, torch.cat(all_losses), torch.arange(offset))
    shapes = {n: tuple(X.shape[1:]) for n, X in block.feats.items()}
    return block, covs, shapes, fisher_blocks


def attribute(model: nn.Module, loss, train, queries, *, method: str = "ekfac",
              checkpoints: Sequence[tuple[dict, float]] | None = None, spec: FeatureSpec | None = None,
              layers: str | None = None, damping: float | None = None, damping_mode: str = "relative",
              trak_dim: int = 2048, out: str | None = None, batch_size: int = 256, dtype: torch.dtype = torch.float32,
              forward=None, fisher: str = "empirical", seed: int = 0, adam=None) -> tuple[np.ndarray, dict]:
    """Scores (N_train, N_query) of one method, in memory, and the method's info (damping used, conventions).

    Args:
        model: the trained module (its current weights are the single checkpoint unless `checkpoints`).
        loss: "cross_entropy", "mse" or ``loss(outputs, targets)`` (mean over rows).
        train, queries: (X, y) tensors or lists of batches.
        method: grad_dot, grad_cos, tracin, raw, kfac, ekfac or trak (see `attribution.methods`).
        checkpoints: [(state_dict, lr)] loaded in turn (TracIn weights, TRAK / influence ensembles).
        spec: FeatureSpec (default: full space for layers up to 32 x 32 per side, else projected to 32).
        layers: regex of the Linear layers to use (default: all).
        damping, damping_mode: see `attribution.curvature`.
        out: TRAK's output: "margin" for cross-entropy (default) or "loss".
        fisher: the curvature's gradients for raw / kfac / ekfac: "empirical" (true labels), "sampled" (labels
            from the model, kronfluence's default) or "ggn" (exact generalized Gauss-Newton, C backwards).
        adam: an `AdamPreconditioner` (or a list, one per checkpoint): LESS's Adam-preconditioned TRAINING
            features (queries keep plain gradients); for the first-order methods (grad_dot, grad_cos, tracin).
    """
    if adam is not None and method not in ("grad_dot", "grad_cos", "tracin"):
        raise ValueError(f"Adam preconditioning (LESS) is for grad_dot, grad_cos and tracin, not {method!r}")
    tb, qb = as_batches(train, batch_size), as_batches(queries, batch_size)
    mods = linear_layers(model, layers)
    out = out or ("margin" if loss == "cross_entropy" else "loss")
    ckpts, qs = [], []
    saved = copy.deepcopy(model.state_dict()) if checkpoints else None
    try:
        for k, (state, lr) in enumerate(checkpoints or [(None, 1.0)]):
            pre = adam[k] if isinstance(adam, (list, tuple)) else adam
            if state is not None:
                model.load_state_dict(state)
            curv = method in ("raw", "kfac", "ekfac")
            tr, covs, shapes, fb = featurize(model, loss, tb, layers=mods, spec=spec, dtype=dtype, forward=forward,
                                             fisher=fisher if curv else "empirical", seed=seed, covariance=curv,
                                             pre=pre)
            q = featurize(model, loss, qb, layers=mods, spec=spec, dtype=dtype, covariance=False,
                          forward=forward)[0]
            ckpts.append(Checkpoint(lambda tr=tr: [tr], covs, shapes, lr=float(lr),
                                    fisher=None if fb is None else (lambda fb=fb: fb)))
            qs.append(q)
    finally:
        if saved is not None:
            model.load_state_dict(saved)
    sc = Scorer(method, damping=damping, damping_mode=damping_mode, trak_dim=trak_dim, out=out, seed=seed)
    sc.fit(ckpts)
    prep = sc.prepare(qs)
    S = sum(sc.score(prep, k, ck.blocks()[0]) for k, ck in enumerate(ckpts))
    return S.numpy(), sc.info()
