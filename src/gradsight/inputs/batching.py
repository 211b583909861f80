"""Batches of encoded sequences: right padding, and the batch composition a cost model says is fastest.

    make_batches(encoded, token_budget, max_batch)               greedy length buckets under a token budget
    make_batches(encoded, token_budget, max_batch, cost=c)       the cheapest contiguous split (dynamic programming)
    model_cost(model, device)                                    c from the model's shape and the device type
    fit_batch_cost(time_batch, lengths)                          c measured by timing the model (benchmarks)
    collate(batch, pad_id)                                       right-padded tensors for one forward/backward

Why a cost model: one padded batch pays every sequence at the padded length, and attention grows with T^2;
on a CPU the per-call overhead that batching saves is small, so a mixed-length batch can be slower than the same
sequences one at a time (measured: plain fwd+bwd of 40 sequences of 63-843 tokens took 147 s in sorted batches
of 10 and 86 s one by one). On a GPU the overhead is large and batching wins. `model_cost` writes the three
numbers in floating-point operations from the model's configuration, with the per-call overhead of the device
type, so the same code picks large batches there and small ones here; `fit_batch_cost` measures them by timing
(the benchmarks use it to check `model_cost` on this CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # data.py re-exports this module's entry points
    from .data import Encoded

__all__ = ["BatchCost", "make_batches", "collate", "model_cost", "fit_batch_cost", "LAYER_OVERHEAD"]

# Per-call overhead of one transformer block's forward/backward, as the floating-point operations the device
# could have done in that time (Python dispatch, autograd bookkeeping, kernel launches; nearly independent of
# the block's width). CPU: measured on the 2-core machine of issue 10 with SmolLM2-135M (30 blocks, capture
# step): the fixed cost of a call is ~0.2 s, as much as ~20 tokens of work, i.e. 20 * 6 * 106e6 / 30 = 4.2e8
# per block (the plain training step: ~7e8). GPUs run ~100x more operations in the same launch latency; the
# cuda and mps values are estimates, not measured here. A larger value makes larger batches.
LAYER_OVERHEAD = {"cpu": 5e8, "cuda": 3e10, "mps": 1e10}


@dataclass(frozen=True)
class BatchCost:
    """Predicted seconds of one forward/backward of B sequences right-padded to T tokens:

        cost(B, T) = overhead + per_token * B * T + per_pair * B * T^2

    ``overhead``: the per-call cost that batching amortises (kernel launches on a GPU, Python and autograd
    bookkeeping everywhere); ``per_token``: the layers that act token by token (projections, MLPs, the LM
    head, norms); ``per_pair``: attention scores and values, quadratic in T. Padding is paid at the padded
    length: a batch of one long and several short sequences costs as much as that many long ones.
    `fit_batch_cost` measures the three numbers on the real model and device.
    """

    overhead: float
    per_token: float
    per_pair: float

    def __call__(self, B: int, T: int) -> float:
        return self.overhead + self.per_token * B * T + self.per_pair * B * T * T


def model_cost(model, device: torch.device | str | None = None) -> BatchCost | None:
    """The forward/backward cost of a transformer in floating-point operations, from its configuration.

        per_token = 6 P        P: parameters outside the embedding modules (every token passes every weight
                               once forward and twice backward; a tied LM head, applied only at supervised
                               positions, is left out with its embedding)
        per_pair  = 12 d L     d: width of the attention (heads x head dim), L: blocks; the scores Q K^T and
                               the mix A V, d multiply-adds each per (query, key) pair, forward and backward
        overhead  = L * LAYER_OVERHEAD[device type]

    Measured on this CPU (SmolLM2-135M, 2 cores) the attention term equals the per-token term at T ~ 3000 tokens
    (per_token / per_pair here: 106e6 / (2 * 576 * 30) = 3067) and the per-call overhead is ~20 tokens; the
    whole model predicts the measured step times of B x T shapes from 1 x 32 to 16 x 64 and 2 x 840 within 5%.
    None for a model without a transformer configuration (then batches fill up to the token budget).
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    L = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not L or not width:
        return None
    head_dim = getattr(cfg, "head_dim", None) or (width // heads if heads else width)
    d_attn = (heads or 1) * head_dim
    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    P = sum(p.numel() for p in model.parameters() if id(p) not in embedded)
    kind = torch.device(device).type if device is not None else "cpu"
    return BatchCost(overhead=float(L * LAYER_OVERHEAD.get(kind, LAYER_OVERHEAD["cuda"])), per_token=6.0 * P,
                     per_pair=12.0 * d_attn * L)


def _greedy(order: list[int], lengths: list[int], token_budget: int, max_batch: int) -> list[list[int]]:
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else 0  # sorted: the first is the longest
        if cur and (len(cur) + 1 > max_batch or (len(cur) + 1) * longest > token_budget):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _cheapest(order: list[int], lengths: list[int], token_budget: int, max_batch: int,
              cost: BatchCost) -> list[list[int]]:
    """The split of the length-sorted order into contiguous batches with the least predicted total cost
    (dynamic programming; every batch within max_batch and, unless it is a single sequence, the token budget).

    Contiguous in the sorted order is enough: an optimal batching never interleaves lengths (swapping two
    sequences between batches so that each batch holds a run of the sorted order never raises a padded length).
    """
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sequences
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for b in range(1, min(max_batch, j) + 1):  # the last batch is order[j-b:j]; its longest is order[j-b]
            T = lengths[order[j - b]]
            if b > 1 and b * T > token_budget:
                break
            c = best[j - b] + cost(b, T)
            if c < best[j]:
                best[j], cut[j] = c, j - b
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


def make_batches(encoded: Sequence[Encoded], token_budget: int = 8192, max_batch: int = 64,
                 cost: BatchCost | None = None) -> list[list[int]]:
    """Length-bucketed batches of indices into ``encoded`` (ok examples only).

    Sorted by length descending (ties by idx). Without a cost model, filled greedily while
    ``batch_size * longest_in_batch <= token_budget`` (the padded size) and ``batch_size <= max_batch``. With
    a `BatchCost`, the contiguous split of that order with the least predicted time under the same limits
    (very long sequences may then run alone, short ones in large batches). An example longer than the budget
    gets a batch of its own. Deterministic; every ok example appears once.
    """
    if token_budget < 1 or max_batch < 1:
        raise ValueError(f"token_budget and max_batch must be >= 1, got {token_budget}, {max_batch}")
    lengths = [len(e.input_ids) for e in encoded]
    order = sorted((i for i, e in enumerate(encoded) if e.status == "ok"),
                   key=lambda i: (-lengths[i], encoded[i].idx, i))
    if cost is None:
        return _greedy(order, lengths, token_budget, max_batch)
    return _cheapest(order, lengths, token_budget, max_batch, cost)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids (B, T) long, attention_mask (B, T) long, target_mask (B, T) bool."""
    if not batch:
        raise ValueError("collate: empty batch")
    for e in batch:
        if e.status != "ok" or not e.input_ids:
            raise ValueError(f"collate: example {e.idx} is {e.status} ({e.reason or 'no tokens'})")
    B, T = len(batch), max(len(e.input_ids) for e in batch)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    target_mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        target_mask[b, :n] = torch.tensor(e.target_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def fit_batch_cost(time_batch: Callable[[int, int], float], lengths: Sequence[int], *, max_batch: int = 32,
                   token_budget: int = 4096) -> BatchCost:
    """Measure a `BatchCost` on the real model: time a few (B, T) shapes and fit the three numbers (>= 0).

    Args:
        time_batch: ``time_batch(B, T) -> seconds`` of one forward/backward of B sequences of T tokens (the caller
            builds the batch; the first call is a warm-up and is not used).
        lengths: the data's sequence lengths (the shapes are taken from them: a short and a long T, B = 1 and a
            batch the budget allows).

    The fit is non-negative least squares on the relative error of each shape (so short and long shapes
    weigh alike); it costs about seven forward/backward passes.
    """
    from scipy.optimize import nnls

    L = np.sort(np.asarray(lengths, dtype=np.int64))
    t_short = int(max(8, np.quantile(L, 0.25)))
    t_long = int(max(t_short + 8, L[-1]))
    b_short = int(max(2, min(max_batch, token_budget // t_short)))
    shapes = [(1, t_short), (b_short, t_short), (1, t_long), (2, t_long), (1, (t_short + t_long) // 2)]
    time_batch(1, t_short)  # warm-up
    rows, y = [], []
    for B, T in shapes:
        t = min(time_batch(B, T) for _ in range(2))
        rows.append([1.0 / t, B * T / t, B * T * T / t])
        y.append(1.0)
    coef, _ = nnls(np.asarray(rows), np.asarray(y))
    return BatchCost(overhead=float(coef[0]), per_token=float(coef[1]), per_pair=float(coef[2]))


def timer(fn: Callable[[], object]) -> float:
    """Seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
