"""Layer-by-layer (sequential) pruning of a decoder LM, as in Wanda / SparseGPT / GBLM.

Algorithm (wanda lib/prune.py ``prune_wanda`` / ``prune_sparsegpt``, GBLM lib/prune.py ``prune_gblm``):

    1. run the calibration windows up to block 0 and catch its inputs (hidden states + the kwargs the model
       passes: causal mask, rotary position embeddings, ...) with a forward pre-hook that raises (Wanda's
       ``Catcher``); model.config.use_cache = False meanwhile.
    2. for each block b: hooks on its Linear layers accumulate, over every calibration batch,
           sq_in_j = sum_seq sum_t x_tj^2,  n_seq = sequences seen         (Wanda's scaler_row * n_seq)
           H = (2 / n_seq) sum_seq sum_t x_t x_t^T  as a running average    (SparseGPT ``add_batch``, sparsegpt only)
       score every layer of the block (scores.py), choose the mask (masks.py: magnitude per tensor, Wanda / GBLM /
       Fisher per output row, N:M per group of M inputs; SparseGPT its own OBS blocks), zero the pruned weights;
    3. re-run the PRUNED block on the same inputs: its outputs are block b+1's calibration inputs.

All layers of a block are scored from one pass (as the references do), so a layer's statistics come from the
outputs of the already-pruned previous blocks but the dense earlier layers of its own block. Only one block's
inputs are held at a time. Gradient statistics (GBLM's g_sq, Fisher) are computed beforehand on the dense model
(GBLM gradient_computation.py), e.g. with `stats.calibration_stats(..., want=("g_sq",))`.

recon_err of a layer = ||W X - W' X||_F^2 / ||W X||_F^2 over the layer's calibration inputs X in the pass that
chose its mask (W dense, W' pruned; bias excluded). It is computed on the first `recon_samples` sequences.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .evaluate import apply_masks
from .masks import make_mask, parse_structure
from .scores import fisher_obd, gblm, magnitude, wanda
from .sparsegpt import sparsegpt

__all__ = ["METHODS", "prune_sequential", "prune_oneshot", "block_linears"]

METHODS = ("magnitude", "wanda", "gblm", "sparsegpt", "fisher")
_GROUP = {"magnitude": "layer", "wanda": "row", "gblm": "row", "fisher": "row"}  # the references' groups
_COLUMNS = ["layer", "block", "method", "structure", "sparsity_target", "sparsity", "recon_err", "seconds"]


class _Caught(Exception):
    """Raised by the block-0 pre-hook to stop the forward once the inputs are stored (Wanda's Catcher)."""


def _blocks(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder blocks at model.model.layers")
    return layers


def block_linears(model: nn.Module, layers: Sequence[str] | None = None) -> list[list[str]]:
    """Names of the Linear modules to prune, per block (default: every nn.Linear inside model.model.layers)."""
    blocks = _blocks(model)
    full = {id(m): n for n, m in model.named_modules()}
    prefix = {id(b): full[id(b)] + "." for b in blocks}
    per: list[list[str]] = [[] for _ in blocks]
    owner: dict[str, int] = {}
    for i, b in enumerate(blocks):
        for sub, m in b.named_modules():
            if isinstance(m, nn.Linear):
                owner[prefix[id(b)] + sub] = i
    if layers is None:
        for name, i in owner.items():
            per[i].append(name)
        return per
    named = dict(model.named_modules())
    for name in layers:
        if name not in named:
            raise ValueError(f"layer {name!r} is not a module of the model")
        if name not in owner:
            raise ValueError(f"layer {name!r} is not an nn.Linear inside a decoder block (model.model.layers)")
        per[owner[name]].append(name)
    return per


def _target(structure: str, sparsity: float) -> float:
    kind, nm = parse_structure(structure)
    return nm[0] / nm[1] if kind == "nm" else float(sparsity)


def _row(name, block, method, structure, sparsity, W, recon, secs) -> dict:
    return {"layer": name, "block": block, "method": method, "structure": structure,
            "sparsity_target": _target(structure, sparsity), "sparsity": float((W == 0).double().mean()),
            "recon_err": recon, "seconds": secs}


def _check_g_sq(model: nn.Module, names: list[str], g_sq: Mapping[str, torch.Tensor] | None, method: str) -> None:
    if method not in ("gblm", "fisher"):
        return
    if g_sq is None:
        raise ValueError(f"method {method!r} needs g_sq (layer name -> sum of squared per-example gradients)")
    named = dict(model.named_modules())
    for n in names:
        if n not in g_sq:
            raise ValueError(f"g_sq has no entry for layer {n!r}")
        if tuple(g_sq[n].shape) != tuple(named[n].weight.shape):
            raise ValueError(f"g_sq[{n!r}] has shape {tuple(g_sq[n].shape)}, expected {tuple(named[n].weight.shape)}")


# ------------------------------------------------------------------------------ calibration-free methods


@torch.no_grad()
def _prune_direct(model, per_block, method, structure, sparsity, g_sq, n_seq, progress) -> pd.DataFrame:
    """Magnitude (|W| per tensor) and Fisher-OBD (0.5 g_sq/n W^2 per row): no activations needed."""
    named = dict(model.named_modules())
    rows = []
    for b, names in enumerate(per_block):
        for name in names:
            t0 = time.perf_counter()
            W = named[name].weight
            s = magnitude(W) if method == "magnitude" else fisher_obd(W, g_sq[name].to(W.device), n_seq)
            apply_masks(model, {name: make_mask(s, structure, sparsity, _GROUP[method])})
            rows.append(_row(name, b, method, structure, sparsity, W, float("nan"), time.perf_counter() - t0))
        if progress is not None and names:
            progress(f"{method} {structure}: block {b + 1}/{len(per_block)} pruned")
    return pd.DataFrame(rows, columns=_COLUMNS)


# ---------------------------------------------------------------------------------- sequential driver


def _catch_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states (B, T, d), kwargs) that block 0 receives, per calibration batch."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hs.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    h = _blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]  # (B, T)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Caught:
                pass
    finally:
        h.remove()
    return caught


def _run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for hs, kw in inputs:
        o = block(hs, **kw)
        outs.append(o[0] if isinstance(o, (tuple, list)) else o)  # (B, T, d); older transformers return tuples
    return outs


class _Recorder:
    """Forward hooks on one block's Linear layers: sq_in, n_seq, H (sparsegpt) and the recon_err inputs."""

    def __init__(self, modules: dict[str, nn.Linear], want_h: bool, recon_seq: int):
        self.modules, self.want_h, self.recon_seq = modules, want_h, recon_seq
        self.sq_in = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
        self.n_seq = {n: 0 for n in modules}
        self.H = {n: torch.zeros(m.in_features, m.in_features, dtype=m.weight.dtype) for n, m in modules.items()
                  } if want_h else {}
        self.X: dict[str, list[torch.Tensor]] = {n: [] for n in modules}  # inputs kept for recon_err
        self.wx2 = {n: 0.0 for n in modules}  # ||W X||^2 over the kept inputs
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input object, its Gram matrix)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def fn(module, args, out):
            x = args[0].detach()  # (B, T, d_in)
            x = x.unsqueeze(0) if x.dim() == 2 else x
            B = x.shape[0]
            self.sq_in[name] += x.double().pow(2).sum((0, 1))  # Wanda: ||X_j||^2 summed over sequences
            if self.want_h:  # SparseGPT add_batch: running average H = (2 / n) sum x x^T, n = sequences
                n_old = self.n_seq[name]
                self.H[name] *= n_old / (n_old + B)
                self.H[name] += (2.0 / (n_old + B)) * self._gram(args[0], x, self.H[name].dtype)
            if self.n_seq[name] < self.recon_seq:
                keep = min(B, self.recon_seq - self.n_seq[name])
                y = out.detach()[:keep]
                if module.bias is not None:
                    y = y - module.bias
                self.X[name].append(x[:keep])
                self.wx2[name] += float(y.double().pow(2).sum())
            self.n_seq[name] += B
        return fn

    def _gram(self, key: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum_t x_t x_t^T (d_in, d_in) of this batch; computed once for layers fed the same tensor (q/k/v,
        gate/up read one input object), which gives the same H as separate add_batch calls."""
        if self._last is None or self._last[0] is not key:
            flat = x.reshape(-1, x.shape[-1]).to(dtype)  # (B*T, d_in)
            self._last = (key, flat.T @ flat)
        return self._last[1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None

    def recon_err(self, name: str, W_dense: torch.Tensor, W_new: torch.Tensor) -> float:
        """||(W - W') X||^2 / ||W X||^2 over the kept inputs (NaN when none were kept)."""
        if not self.X[name] or self.wx2[name] == 0:
            return float("nan")
        D = (W_dense - W_new).to(self.X[name][0].dtype)  # (d_out, d_in)
        err = sum(float((x @ D.T).double().pow(2).sum()) for x in self.X[name])
        return err / self.wx2[name]


def _prune_layer(name, W, rec: _Recorder, method, structure, sparsity, g_sq, alpha) -> torch.Tensor:
    """The pruned weight W' of one layer from its block statistics (W is not modified)."""
    n = rec.n_seq[name]
    if method == "sparsegpt":
        W_new, _ = sparsegpt(W, rec.H[name], sparsity=sparsity, structure=structure)
        return W_new.to(W.dtype)
    if method == "wanda":
        s = wanda(W, rec.sq_in[name], n)
    elif method == "gblm":
        s = gblm(W, rec.sq_in[name], n, g_sq[name].to(W.device), alpha=alpha)
    else:
        raise ValueError(f"method {method!r} is not a calibrated method")
    mask = make_mask(s, structure, sparsity, _GROUP[method])
    return W.masked_fill(~mask, 0)


@torch.no_grad()
def prune_sequential(model: nn.Module, windows: torch.Tensor | None, method: str, structure: str = "unstructured",
                     sparsity: float = 0.5, *, g_sq: Mapping[str, torch.Tensor] | None = None, alpha: float = 100.0,
                     layers: Sequence[str] | None = None, batch_size: int = 4, recon_samples: int | None = None,
                     progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Prune the Linear layers of a decoder LM in place, block by block on calibration windows.

    Args:
        model: a Hugging Face decoder LM with blocks at model.model.layers (e.g. Llama); eval mode.
        windows: (N, T) calibration token ids (`text.token_windows(..., n, seed=0)`); unused (may be None) for
            magnitude, and for fisher only N is used (g_sq / N is the Fisher diagonal).
        method: "magnitude" (|W|, per tensor), "wanda" (|W| sqrt(sq_in/n), per row), "gblm" (|W| (sqrt(sq_in/n)
            + alpha sqrt(g_sq)), per row), "sparsegpt" (OBS update, own blocks), "fisher" (OBD 0.5 g_sq/n W^2, per
            row, no activations).
        structure: "unstructured" or "N:M" (N pruned of every M consecutive inputs of a row).
        sparsity: pruned fraction for "unstructured" (N/M otherwise).
        g_sq: layer name -> (d_out, d_in) sum over calibration sequences of the squared per-example gradient of
            the DENSE model (gblm, fisher).
        alpha: GBLM's gradient scale (reference 100).
        layers: names of the Linear modules to prune (default: every nn.Linear inside the blocks).
        batch_size: sequences per block forward.
        recon_samples: calibration sequences used for recon_err (None: all; 0: skip, NaN).
        progress: called with a one-line message after each block.

    Returns:
        DataFrame, one row per pruned layer: layer, block, method, structure, sparsity_target, sparsity (exact
        zeros after pruning), recon_err, seconds (time spent choosing and applying the layer's mask; for
        calibrated methods the block's forward passes are shared and not included).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    kind, _ = parse_structure(structure)
    if kind == "unstructured" and not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in the open interval (0, 1), got {sparsity!r}")
    per_block = block_linears(model, layers)
    names = [n for b in per_block for n in b]
    _check_g_sq(model, names, g_sq, method)
    if method == "magnitude" or method == "fisher":
        n_seq = int(windows.shape[0]) if windows is not None else 0
        if method == "fisher" and n_seq < 1:
            raise ValueError("method 'fisher' needs the calibration windows (their count N scales g_sq)")
        return _prune_direct(model, per_block, method, structure, sparsity, g_sq, n_seq, progress)
    if windows is None or windows.dim() != 2 or windows.shape[0] < 1:
        raise ValueError(f"method {method!r} needs calibration windows of shape (N, T)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    recon_seq = int(windows.shape[0]) if recon_samples is None else int(recon_samples)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        return _sequential(model, windows, method, structure, sparsity, g_sq, alpha, per_block, batch_size,
                           recon_seq, progress)
    finally:
        model.config.use_cache = use_cache


def _sequential(model, windows, method, structure, sparsity, g_sq, alpha, per_block, batch_size, recon_seq,
                progress) -> pd.DataFrame:
    named = dict(model.named_modules())
    inputs = _catch_inputs(model, windows, batch_size)
    rows = []
    blocks = _blocks(model)
    for b, block in enumerate(blocks):
        t_block = time.perf_counter()
        if per_block[b]:
            mods = {n: named[n] for n in per_block[b]}
            rec = _Recorder(mods, want_h=method == "sparsegpt", recon_seq=recon_seq)
            try:
                _run_block(block, inputs)  # calibration pass on the dense block
            finally:
                rec.remove()
            for name, m in mods.items():
                t0 = time.perf_counter()
                W = m.weight.detach().clone()  # (d_out, d_in) dense copy
                W_new = _prune_layer(name, W, rec, method, structure, sparsity, g_sq, alpha)
                m.weight.copy_(W_new)
                secs = time.perf_counter() - t0
                rows.append(_row(name, b, method, structure, sparsity, m.weight, rec.recon_err(name, W, W_new), secs))
            del rec
        if b + 1 < len(blocks):
            outs = _run_block(block, inputs)  # the pruned block's outputs feed the next block
            inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs)]
        if progress is not None:
            progress(f"{method} {structure}: block {b + 1}/{len(blocks)} ({time.perf_counter() - t_block:.1f} s)")
    return pd.DataFrame(rows, columns=_COLUMNS)


@torch.no_grad()
def prune_oneshot(model: nn.Module, scores: Mapping[str, torch.Tensor], structure: str = "unstructured",
                  sparsity: float = 0.5, group: str = "row") -> pd.DataFrame:
    """Apply masks chosen from precomputed scores (name -> (d_out, d_in)), without recalibration.

    Args:
        scores: module name -> score tensor shaped like its weight (higher = keep).
        structure, sparsity: as in `prune_sequential`. group: "row" or "layer" for unstructured masks.

    Returns:
        DataFrame with the columns of `prune_sequential` (method "oneshot", block -1 outside the blocks,
        recon_err NaN).
    """
    named = dict(model.named_modules())
    try:
        owner = {n: b for b, ns in enumerate(block_linears(model)) for n in ns}
    except ValueError:  # not a decoder LM: no block index
        owner = {}
    rows = []
    for name, s in scores.items():
        if name not in named or not isinstance(getattr(named[name], "weight", None), torch.Tensor):
            raise ValueError(f"scores name {name!r} is not a module with a weight")
        t0 = time.perf_counter()
        apply_masks(model, {name: make_mask(s, structure, sparsity, group)})
        rows.append(_row(name, owner.get(name, -1), "oneshot", structure, sparsity, named[name].weight,
                         float("nan"), time.perf_counter() - t0))
    return pd.DataFrame(rows, columns=_COLUMNS)
