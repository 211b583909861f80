"""Calibration statistics of Linear layers, from the factors of one captured forward/backward per batch.

Every importance score of `scores.py` is a function of a few sums over the calibration set, per layer with
weight W (d_out, d_in), inputs a_t (d_in) and output gradients g_t (d_out) of each example e's own loss:

    sq_in[j]   = sum_e sum_t a_etj^2                         Wanda's activation norm (squared, not averaged)
    g_sum      = sum_e G_e,      G_e = sum_t g_et a_et^T     first-order Taylor, SalUn saliency
    g_sq       = sum_e G_e^2     (elementwise)               GBLM's l2 accumulator, the empirical Fisher diagonal
    xtx        = sum_e sum_t a_et a_et^T                     SparseGPT's layer Hessian (before its 2/N)
    neuron[j]  = sum_e |sum_t a_etj (W^T g_et)_j|            gradient x activation of input unit j (an MLP
                                                              neuron when the layer is a down projection)

G_e is the gradient of example e's loss alone (`measures.step.backward_step`: one batched backward gives
every example's G_e exactly, padding excluded). `g_sq` needs each G_e: it is formed per batch, (B, d_out, d_in),
as one batched matmul over the tokens — the cost of the weight gradient itself — and never stored. For
one-token rows (plain modules) it is one matmul of the squared factors: sum_e (g_e^2)(a_e^2)^T.
`neuron` needs no per-example gradient: (W^T g_et)_j is the gradient w.r.t. the input a_etj.

When only `sq_in` / `xtx` are wanted no backward runs: a forward with hooks is enough (Wanda's calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..capture.grads import FactoredGrad
from ..measures.step import backward_step

__all__ = ["LayerStats", "STAT_FIELDS", "GRADIENT_FIELDS", "new_stats", "accumulate", "calibration_stats",
           "activation_stats", "merge", "to_tensors", "from_tensors"]

STAT_FIELDS = ("sq_in", "g_sum", "g_sq", "xtx", "neuron")
GRADIENT_FIELDS = ("g_sum", "g_sq", "neuron")  # the fields that need a backward pass


@dataclass
class LayerStats:
    """Sums over the calibration set for one Linear layer (see the module docstring for the formulas).

    Attributes:
        sq_in: (d_in,) sum of squared inputs over examples and real tokens.
        n_seq: examples (sequences) seen; n_tok: real tokens seen.
        g_sum, g_sq: (d_out, d_in) sums of per-example gradients / their squares (None when not wanted).
        xtx: (d_in, d_in) sum of input outer products (None when not wanted).
        neuron: (d_in,) sum over examples of |gradient x activation| per input unit (None when not wanted).
    """

    sq_in: torch.Tensor | None = None
    n_seq: int = 0
    n_tok: int = 0
    g_sum: torch.Tensor | None = None
    g_sq: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    neuron: torch.Tensor | None = None
    fields: tuple[str, ...] = field(default=("sq_in",))


def _check_want(want: Iterable[str]) -> tuple[str, ...]:
    want = tuple(dict.fromkeys(want))
    bad = [w for w in want if w not in STAT_FIELDS]
    if bad:
        raise ValueError(f"unknown statistic {bad[0]!r}; expected some of {', '.join(STAT_FIELDS)}")
    return want


def new_stats(layers: Mapping[str, nn.Module], want: Iterable[str], dtype: torch.dtype = torch.float64
              ) -> dict[str, LayerStats]:
    """Zeroed accumulators for every layer (weights (d_out, d_in); transformers' Conv1D is transposed)."""
    want = _check_want(want)
    out = {}
    for name, m in layers.items():
        d_out, d_in = _linear_shape(name, m)
        z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
        out[name] = LayerStats(sq_in=z(d_in), g_sum=z(d_out, d_in) if "g_sum" in want else None,
                               g_sq=z(d_out, d_in) if "g_sq" in want else None,
                               xtx=z(d_in, d_in) if "xtx" in want else None,
                               neuron=z(d_in) if "neuron" in want else None, fields=("sq_in", *want))
    return out


def _linear_shape(name: str, m: nn.Module) -> tuple[int, int]:
    w = getattr(m, "weight", None)
    if w is None or w.dim() != 2:
        raise ValueError(f"layer {name} ({type(m).__name__}) has no 2-D weight: importance scores are for Linear "
                         "layers (select them with --kinds / --pattern)")
    if type(m).__name__ == "Conv1D":  # transformers' Conv1D stores (d_in, d_out)
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.t() if type(m).__name__ == "Conv1D" else w  # (d_out, d_in)


def accumulate(stats: dict[str, LayerStats], grads: Mapping[str, FactoredGrad], layers: Mapping[str, nn.Module],
               keep: list[int] | None = None) -> None:
    """Add one captured batch (`Step.grads`) to the accumulators; `keep`: batch positions to count (flagged
    examples are zeroed in the grads but must not be counted either)."""
    for name, st in stats.items():
        g = grads[name]
        if not isinstance(g, FactoredGrad):
            raise ValueError(f"layer {name}: importance statistics need a Linear-like layer (factored gradient)")
        rows = keep if keep is not None else list(range(g.batch_size))
        if not rows:
            continue
        A, G, tok = g.A, g.G, g.tokens
        if len(rows) < g.batch_size:  # flagged examples: drop them (their rows are zeroed, but not counted)
            idx = torch.tensor(rows, dtype=torch.long, device=A.device)
            A, G, tok = A[idx], G[idx], tok[idx]
        if not bool(tok.all()):  # padding: zero the padded positions (no copy when there is none)
            A, G = A * tok.unsqueeze(-1).to(A.dtype), G * tok.unsqueeze(-1).to(G.dtype)
        A, G = A.to(st.sq_in.dtype), G.to(st.sq_in.dtype)  # (B, T, d_in), (B, T, d_out)
        st.n_seq += len(rows)
        st.n_tok += int(tok.sum())
        st.sq_in += A.pow(2).sum((0, 1))
        _add_gradient_sums(st, A, G, layers[name])


def _add_gradient_sums(st: LayerStats, A: torch.Tensor, G: torch.Tensor, module: nn.Module) -> None:
    if st.xtx is not None:
        flat = A.reshape(-1, A.shape[-1])  # (B*T, d_in)
        st.xtx += flat.T @ flat
    if st.neuron is not None:
        W = _weight(module).to(A.dtype)  # (d_out, d_in)
        st.neuron += (A * (G @ W)).sum(1).abs().sum(0)  # (B, d_in) -> (d_in,)
    if st.g_sum is None and st.g_sq is None:
        return
    if A.shape[1] == 1:  # one token per row: G_e is an outer product, its square factorises
        a, g = A[:, 0], G[:, 0]  # (B, d_in), (B, d_out)
        if st.g_sum is not None:
            st.g_sum += g.T @ a
        if st.g_sq is not None:
            st.g_sq += g.pow(2).T @ a.pow(2)
        return
    # per-example gradients one example at a time: G_e = sum_t g_t a_t^T, (d_out, d_in), the cost of the weight
    # gradient itself; never a (B, d_out, d_in) stack, the square is accumulated in place
    for e in range(A.shape[0]):
        Ge = G[e].T @ A[e]  # (d_out, d_in)
        if st.g_sum is not None:
            st.g_sum += Ge
        if st.g_sq is not None:
            st.g_sq.addcmul_(Ge, Ge)


def calibration_stats(model: nn.Module, batches: Iterable, layers: Mapping[str, nn.Module],
                      loss_fn: Callable[[nn.Module, object], torch.Tensor], *, want: Iterable[str] = ("g_sq",),
                      tokens_of: Callable | None = None, dtype: torch.dtype = torch.float64,
                      stats: dict[str, LayerStats] | None = None) -> dict[str, LayerStats]:
    """Accumulate the statistics of `layers` over `batches` (one captured forward/backward per batch; a
    forward only when no gradient statistic is wanted).

    Args:
        batches: LM batches (dicts with input_ids, attention_mask, target_mask) or whatever `loss_fn` takes.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` each example's own loss (GBLM: the token-mean cross-entropy
            of the sequence, `inputs.losses.loss_fn_for(model, "mean")` with every token supervised).
        want: statistics besides sq_in: g_sum, g_sq, xtx, neuron.
        tokens_of: ``tokens_of(batch) -> (B, T)`` real-token mask (default: the batch's attention_mask, or every
            position for non-dict batches).
        stats: accumulators to add to (default: new ones).

    Returns:
        {layer: LayerStats}.
    """
    want = _check_want(want)
    stats = stats if stats is not None else new_stats(layers, want, dtype)
    if not any(w in GRADIENT_FIELDS for w in want):
        return activation_stats(model, batches, layers, tokens_of=tokens_of, stats=stats)
    tokens_of = tokens_of or _default_tokens
    for batch in batches:
        tok = tokens_of(batch)
        step = backward_step(model, layers, batch, loss_fn, tokens=tok)
        accumulate(stats, step.grads, layers, keep=step.keep)
    return stats


def _default_tokens(batch) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def activation_stats(model: nn.Module, batches: Iterable, layers: Mapping[str, nn.Module], *,
                     tokens_of: Callable | None = None, stats: dict[str, LayerStats] | None = None,
                     forward: Callable | None = None) -> dict[str, LayerStats]:
    """sq_in (and xtx when the accumulators have it) from forwards with input hooks, no backward.

    Args:
        forward: ``forward(model, batch)`` (default: ``model(**batch)`` without labels for dicts, ``model(x)``
            for (x, y) tuples).
    """
    stats = stats if stats is not None else new_stats(layers, (), torch.float64)
    tokens_of = tokens_of or _default_tokens
    current: dict = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            st = stats[name]
            if x.dim() == 2:
                x = x.unsqueeze(1)  # (B, 1, d_in)
            tok = current.get("tok")
            if tok is not None and tuple(tok.shape) == tuple(x.shape[:2]):
                x = x * tok.unsqueeze(-1).to(x.dtype)
            else:
                tok = torch.ones(x.shape[:2], dtype=torch.bool)
            x = x.to(st.sq_in.dtype)
            st.sq_in += x.pow(2).sum((0, 1))
            st.n_tok += int(tok.sum())
            st.n_seq += x.shape[0]
            if st.xtx is not None:
                flat = x.reshape(-1, x.shape[-1])
                st.xtx += flat.T @ flat
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                tok = tokens_of(batch)
                current["tok"] = tok.bool() if tok is not None else None
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
                else:
                    model(batch[0])
    finally:
        for h in handles:
            h.remove()
    return stats


def merge(into: dict[str, LayerStats], other: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Add `other`'s sums to `into` (shards, ranks)."""
    for name, st in into.items():
        o = other[name]
        st.n_seq += o.n_seq
        st.n_tok += o.n_tok
        for f in STAT_FIELDS:
            a, b = getattr(st, f), getattr(o, f)
            if a is not None and b is not None:
                a += b
    return into


def to_tensors(stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Flat {"FIELD/layer": tensor} (counts as int64 "n/layer" = [n_seq, n_tok]) for a safetensors shard."""
    out = {}
    for name, st in stats.items():
        out[f"n/{name}"] = torch.tensor([st.n_seq, st.n_tok], dtype=torch.int64)
        for f in STAT_FIELDS:
            v = getattr(st, f)
            if v is not None:
                out[f"{f}/{name}"] = v.contiguous()
    return out


def from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, LayerStats]:
    """The inverse of `to_tensors`."""
    out: dict[str, LayerStats] = {}
    for key, v in tensors.items():
        f, _, name = key.partition("/")
        st = out.setdefault(name, LayerStats(fields=()))
        if f == "n":
            st.n_seq, st.n_tok = int(v[0]), int(v[1])
        else:
            setattr(st, f, v)
            st.fields = (*st.fields, f)
    return out
