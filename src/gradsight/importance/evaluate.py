"""Evaluation and safe saving of pruned causal LMs.

* `perplexity`: exp of the token-mean next-token negative log-likelihood over fixed-length windows (every
  predicted position of every window counts once: T-1 per window of T tokens). The standard WikiText-2 protocol of
  Wanda / SparseGPT / GBLM (``lib/eval.py::eval_ppl_wikitext``) with the windows of `text.token_windows`.
* `check_finite`: a pruned model must still give finite logits (a NaN from an unstable OBS update or a bad mask
  must not be reported as a perplexity or written to disk).
* `save_pruned`: `save_pretrained(safe_serialization=True)` into a temporary directory, reload it offline with
  transformers, check every tensor is bit-identical (so the pruned zeros are zeros), then move it into place.
* `apply_masks` / `sparsity_of`: zero pruned weights in place, count zeros.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedModelError", "perplexity", "check_finite", "save_pruned", "apply_masks", "sparsity_of"]


class PrunedModelError(RuntimeError):
    """A pruned model that must not be evaluated or saved (non-finite forward, failed round trip)."""


def _batches(windows: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (N, T) LongTensor with T >= 2, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for s in range(0, windows.shape[0], batch_size):
        yield windows[s:s + batch_size]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # (B, T, V)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Perplexity of `model` on token windows.

    nll = (1 / N(T-1)) sum_w sum_{t=1}^{T-1} -log p(x_{w,t} | x_{w,<t}),  ppl = exp(nll)
    (per-token cross-entropy in the logits' dtype, at least float32; the sum accumulates in float64).

    Args:
        model: a causal LM returning `.logits` (B, T, V).
        windows: (N, T) token ids, e.g. `token_windows(tok, sample_text("heldout"), 256)`.
        batch_size: windows per forward.

    Returns:
        dict(ppl=float, nll=float, n_tokens=int).

    Raises:
        PrunedModelError: a non-finite logit (the perplexity would be meaningless).
    """
    total = torch.zeros((), dtype=torch.float64)
    n_tok = 0
    for ids in _batches(windows, batch_size):
        logits = _logits(model, ids)[:, :-1]  # (B, T-1, V): position t predicts token t+1
        logits = logits if logits.dtype == torch.float64 else logits.float()
        bad = int((~torch.isfinite(logits)).sum())
        if bad:
            raise PrunedModelError(f"{bad} non-finite logits in a perplexity batch: the model is broken")
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        total += nll.double().sum()
        n_tok += nll.numel()
    nll = float(total / n_tok)
    return {"ppl": math.exp(nll), "nll": nll, "n_tokens": n_tok}


@torch.no_grad()
def check_finite(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> None:
    """Raise `PrunedModelError` if any logit of `model` on `windows` (N, T) is NaN or infinite."""
    bad = total = 0
    for ids in _batches(windows, batch_size):
        logits = _logits(model, ids)  # (B, T, V)
        bad += int((~torch.isfinite(logits)).sum())
        total += logits.numel()
    if bad:
        raise PrunedModelError(f"the model's forward is not finite: {bad} of {total} logits are NaN or infinite")


def _probe_windows(tokenizer) -> torch.Tensor:
    """A short held-out probe for `save_pruned`'s forward check (64 tokens, fewer if the text is short)."""
    from .text import sample_text, token_windows

    text = sample_text("heldout")[:2000]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return token_windows(tokenizer, text, min(64, n), n=1)  # (1, <=64)


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, windows: torch.Tensor | None = None,
                overwrite: bool = False) -> Path:
    """Save a pruned model (and tokenizer) as safetensors, atomically, after checking it.

    Steps: every parameter finite and a finite forward on `windows` (default: 64 held-out tokens) ->
    `save_pretrained(tmp, safe_serialization=True)` -> reload `tmp` with ``AutoModelForCausalLM`` (local files
    only) -> every tensor of the state dict bit-identical (the pruned zeros are zeros) -> rename tmp to out_dir.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer (saved alongside), or None.
        out_dir: the target directory; it must not exist unless `overwrite`.
        windows: (N, T) token ids for the forward check.
        overwrite: replace an existing out_dir.

    Returns:
        the Path of out_dir.

    Raises:
        PrunedModelError: non-finite weights or forward, or the reloaded model differs.
        FileExistsError: out_dir exists and overwrite is False.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise PrunedModelError(f"refusing to save: {len(bad)} tensors have non-finite values (first: {bad[0]})")
    if tokenizer is None and windows is None:
        raise ValueError("save_pruned needs a tokenizer or explicit windows for its forward check")
    check_finite(model, windows if windows is not None else _probe_windows(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _verify_reload(model, tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _verify_reload(model: nn.Module, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    back = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    mine, theirs = model.state_dict(), back.state_dict()
    for name, t in mine.items():
        if name not in theirs:
            raise PrunedModelError(f"the reloaded model has no tensor {name}")
        r = theirs[name]
        if r.shape != t.shape or r.dtype != t.dtype or not torch.equal(r, t):
            raise PrunedModelError(f"tensor {name} differs after the save/reload round trip")
        if t.is_floating_point() and bool(((t == 0) & (r != 0)).any()):  # covered by equal; said explicitly
            raise PrunedModelError(f"pruned zeros of {name} are not zeros after reloading")


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of module `name` (or the parameter `name` itself)."""
    named = dict(model.named_modules())
    if name in named and isinstance(getattr(named[name], "weight", None), torch.Tensor):
        return named[name].weight
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    raise ValueError(f"{name!r} is neither a module with a weight nor a parameter of the model")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place: W <- W * mask (mask True = keep), for each {module name: bool mask}."""
    for name, mask in masks.items():
        w = _weight_of(model, name)
        if mask.dtype != torch.bool or mask.shape != w.shape:
            raise ValueError(f"mask of {name} must be a bool tensor of shape {tuple(w.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        w.masked_fill_(~mask.to(w.device), 0)


@torch.no_grad()
def sparsity_of(model: nn.Module, names: Iterable[str]) -> dict:
    """Exact-zero fraction of the weights of `names`.

    Returns:
        dict(overall=zeros/total, n_zero=int, n=int, per_layer={name: fraction}).
    """
    per, nz, n = {}, 0, 0
    for name in names:
        w = _weight_of(model, name)
        z = int((w == 0).sum())
        per[name] = z / w.numel()
        nz, n = nz + z, n + w.numel()
    return {"overall": nz / n if n else float("nan"), "n_zero": nz, "n": n, "per_layer": per}
