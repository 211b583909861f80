"""Pruning masks from importance scores: per row (Wanda/GBLM), per tensor (magnitude), global (GAPrune, SalUn),
N:M, and per neuron.

A mask is a bool tensor shaped like its scores, True = KEEP, False = pruned. Sparsity s in (0, 1) is the pruned
fraction; a group of n entries loses exactly floor(s * n) of them (``int(s * n)``, as the references do).
Ties are broken by index order: every selection uses a stable sort (``torch.sort(stable=True)``), so among
equal scores the earlier index is pruned first. Dequantised GGUF weights have many exactly equal magnitudes;
``tie_fraction`` reports how much of a mask was decided by that order.

References: wanda lib/prune.py (per-row stable sort, N:M per group of M input columns, magnitude per tensor);
GAPrune SparseModel.py (global bottom-k); Unlearn-Saliency generate_mask.py (global rank-based top fraction).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Mapping

import torch

__all__ = ["parse_structure", "check_sparsity", "row_mask", "layer_mask", "global_masks", "nm_mask",
           "neuron_mask", "make_mask", "mask_stats", "tie_fraction"]


# --------------------------------------------------------------------------------------------- checks


def check_sparsity(s) -> float:
    """The pruned fraction as a float; ValueError unless 0 < s < 1."""
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (0.0 < float(s) < 1.0):
        raise ValueError(f"sparsity must be a number in the open interval (0, 1), got {s!r}")
    return float(s)


def parse_structure(s: str) -> tuple[str, tuple[int, int] | None]:
    """Parse "unstructured" -> ("unstructured", None) or "N:M" -> ("nm", (N, M)).

    N:M means: in every row, in each block of M consecutive input columns, exactly N are pruned; 1 <= N < M
    (N = M would prune everything).
    """
    if not isinstance(s, str):
        raise ValueError(f"structure must be a string like 'unstructured' or '2:4', got {s!r}")
    t = s.strip().lower()
    if t == "unstructured":
        return "unstructured", None
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", t)
    if not m:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' (e.g. '2:4'), got {s!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"structure {s!r}: N must be at least 1, got {n}")
    if n >= mm:
        raise ValueError(f"structure {s!r}: N must be smaller than M (N pruned of every M), got N={n}, M={mm}")
    return "nm", (n, mm)


def _check_scores(scores: torch.Tensor, dim: int | None = None) -> None:
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {type(scores).__name__}"
                         f"{'' if not torch.is_tensor(scores) else ' of dtype ' + str(scores.dtype)}")
    if dim is not None and scores.dim() != dim:
        raise ValueError(f"scores must be {dim}-D, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; a mask would silently keep them")


def _n_prune(s: float, n: int) -> int:
    return int(s * n)  # floor for s, n > 0 (the references' int(numel * sparsity))


def _prune_lowest(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Keep-mask pruning the k lowest entries along ``dim`` (stable: ties pruned in index order)."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)  # k lowest per slice
        mask.scatter_(dim, idx, False)
    return mask


# ---------------------------------------------------------------------------------------------- masks


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune the floor(s * d_in) lowest scores (Wanda / GBLM comparison group).

    Args:
        scores: (d_out, d_in). sparsity: pruned fraction in (0, 1).
    Returns:
        (d_out, d_in) bool keep-mask.
    """
    s = check_sparsity(sparsity)
    _check_scores(scores, 2)
    return _prune_lowest(scores, _n_prune(s, scores.shape[1]), dim=1)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per tensor, prune the floor(s * numel) lowest scores (magnitude pruning's comparison group)."""
    s = check_sparsity(sparsity)
    _check_scores(scores)
    flat = scores.reshape(-1)  # (numel,)
    return _prune_lowest(flat, _n_prune(s, flat.numel()), dim=0).reshape(scores.shape)


def _kth_smallest(cat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, reordering ``cat`` in place (no extra copy on CPU).

    numpy's introselect partitions in place, while torch.kthvalue / torch.sort allocate another copy plus an
    int64 index tensor (12 bytes per float32 entry).
    """
    if cat.device.type == "cpu" and cat.dtype in (torch.float32, torch.float64):
        arr = cat.numpy()  # shares memory
        arr.partition(k - 1)
        return torch.tensor(arr[k - 1], dtype=cat.dtype)
    return torch.kthvalue(cat, k).values


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: prune exactly k = floor(s * total) lowest scores overall.

    Rank-based ties (like a stable sort of the concatenation in dict order): every score below the k-th
    smallest value t is pruned, and among the scores equal to t, the first k - #(scores < t) in concatenation
    order. Memory: one concatenated copy of the scores (float32, or float64 if any input is float64) plus the
    bool masks; the k-th value is found by an in-place partition.

    Args:
        scores: name -> score tensor (any shapes). sparsity: pruned fraction in (0, 1).
    Returns:
        name -> bool keep-mask shaped like its scores.
    """
    s = check_sparsity(sparsity)
    if not scores:
        raise ValueError("global_masks needs at least one score tensor")
    for name, t in scores.items():
        try:
            _check_scores(t)
        except ValueError as e:
            raise ValueError(f"scores[{name!r}]: {e}") from None
    dt = torch.float64 if any(t.dtype == torch.float64 for t in scores.values()) else torch.float32
    total = sum(t.numel() for t in scores.values())
    k = _n_prune(s, total)
    masks = {name: torch.ones(t.shape, dtype=torch.bool) for name, t in scores.items()}
    if k == 0:
        return masks
    cat = torch.empty(total, dtype=dt)  # (total,) the only full copy
    o = 0
    for t in scores.values():
        cat[o:o + t.numel()].copy_(t.detach().reshape(-1))
        o += t.numel()
    thr = _kth_smallest(cat, k)
    del cat
    n_less = sum(int((t.detach().to(dt) < thr).sum()) for t in scores.values())
    ties_left = k - n_less  # >= 1: thr itself is among the k lowest
    for name, t in scores.items():
        flat = t.detach().reshape(-1).to(dt)  # (numel,)
        m = masks[name].reshape(-1)
        m[flat < thr] = False
        if ties_left > 0:
            tie_idx = torch.nonzero(flat == thr).reshape(-1)[:ties_left]  # ascending index order
            m[tie_idx] = False
            ties_left -= tie_idx.numel()
    return masks


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every row, in each block of M consecutive input columns, prune the N lowest scores.

    Args:
        scores: (d_out, d_in) with d_in % M == 0. n, m: 1 <= N < M.
    Returns:
        (d_out, d_in) bool keep-mask with exactly N False per block.
    """
    parse_structure(f"{n}:{m}")  # validates N and M
    _check_scores(scores, 2)
    d_out, d_in = scores.shape
    if d_in % m != 0:
        raise ValueError(f"N:M pruning needs d_in divisible by M; got d_in={d_in}, M={m}")
    blocks = scores.reshape(d_out, d_in // m, m)  # (d_out, d_in / M, M)
    return _prune_lowest(blocks, n, dim=2).reshape(d_out, d_in)


def neuron_mask(neuron_scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask over d units: prune the floor(s * d) lowest neuron scores (stable ties)."""
    s = check_sparsity(sparsity)
    _check_scores(neuron_scores, 1)
    return _prune_lowest(neuron_scores, _n_prune(s, neuron_scores.numel()), dim=0)


def make_mask(scores: torch.Tensor, structure: str = "unstructured", sparsity: float = 0.5, group: str = "row"
              ) -> torch.Tensor:
    """Dispatch: "N:M" -> nm_mask (sparsity is then N/M and the argument is ignored); "unstructured" ->
    row_mask (group="row", Wanda/GBLM) or layer_mask (group="layer", magnitude)."""
    kind, nm = parse_structure(structure)
    if kind == "nm":
        return nm_mask(scores, *nm)
    if group == "row":
        return row_mask(scores, sparsity)
    if group == "layer":
        return layer_mask(scores, sparsity)
    raise ValueError(f"group must be 'row' or 'layer', got {group!r}")


# -------------------------------------------------------------------------------------------- reports


def mask_stats(mask: torch.Tensor) -> dict:
    """Counts of a keep-mask: sparsity (pruned fraction), n, n_pruned, n_kept; for 2-D masks also the min and
    max number of pruned entries per row."""
    n = mask.numel()
    kept = int(mask.sum())
    out = {"sparsity": (n - kept) / n if n else float("nan"), "n": n, "n_pruned": n - kept, "n_kept": kept}
    if mask.dim() == 2 and n:
        per_row = (~mask).sum(1)  # (d_out,)
        out.update(row_pruned_min=int(per_row.min()), row_pruned_max=int(per_row.max()))
    return out


def tie_fraction(scores, mask, group: str = "layer") -> float:
    """Fraction of kept entries whose score equals the threshold (the largest pruned score) of their group.

    These entries were kept rather than pruned only because of index order (their equals were pruned).
    group "layer": one threshold per tensor; "row": one per row (2-D, for row masks). Dicts of tensors
    (global masks) share one threshold over all of them.

    Returns:
        the fraction in [0, 1] (0.0 when nothing is kept or nothing pruned).
    """
    if isinstance(scores, Mapping):
        pruned_max = [scores[k][~mask[k]].max() for k in scores if (~mask[k]).any()]
        n_kept = sum(int(mask[k].sum()) for k in scores)
        if not pruned_max or n_kept == 0:
            return 0.0
        thr = torch.stack([p.double() for p in pruned_max]).max()
        ties = sum(int((mask[k] & (scores[k].double() == thr)).sum()) for k in scores)
        return ties / n_kept
    if group not in ("layer", "row"):
        raise ValueError(f"group must be 'row' or 'layer', got {group!r}")
    n_kept = int(mask.sum())
    if n_kept == 0 or bool(mask.all()):
        return 0.0
    if group == "row":
        thr = scores.masked_fill(mask, -math.inf).amax(dim=1, keepdim=True)  # (d_out, 1) per-row threshold
    else:
        thr = scores[~mask].max()
    return int((mask & (scores == thr)).sum()) / n_kept
