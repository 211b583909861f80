"""The importance analysis per batch: calibration examples -> summed layer statistics.

Units are the calibration examples (`--data` records, or a module's rows). Each batch is one captured
forward/backward (`inputs.examples.example_step`); `importance.stats.accumulate` turns its factors into the sums
every score needs (sum x^2 per input, per-example gradient sums and squares, x x^T, gradient x activation per
input unit), never keeping a per-example gradient. A commit writes the sums of `--batches-per-shard` batches as a
"stats" shard (safetensors) and their rows to "examples"; shards add up, across commits and ranks, so a killed
run resumes and torchrun splits the examples. Scores, masks, pruning and evaluation run once at the end
(`finish`, in `pruning.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ...importance.stats import accumulate, new_stats, to_tensors
from ...inputs.data import encode
from ...inputs.examples import example_batches, example_step, example_units, layer_modules, unit_row
from ...inputs.lm import Source
from ...inputs.losses import loss_fn_for
from ...inputs.module import row_losses
from ...runs.registry import Plan, Unit
from ...runs.store import Tensors
from .config import NEEDS

__all__ = ["setup", "compute", "ImpState", "wanted", "is_decoder_lm"]


@dataclass
class ImpState:
    source: Source
    cfg: Any
    modules: dict
    losses: Any
    want: tuple
    dtype: torch.dtype
    chunks: dict = field(default_factory=dict)  # tuple of unit keys -> the batches of that compute call


def is_decoder_lm(model) -> bool:
    """A Hugging Face decoder whose blocks the sequential calibration can walk (model.model.layers)."""
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None) is not None and hasattr(model, "lm_head")


def wanted(cfg, source: Source) -> tuple[str, ...]:
    """The statistics the methods need from the pass (sequential calibration collects Wanda's and SparseGPT's
    activation sums itself, on the pruned model, so the pass only needs the gradients)."""
    sequential = cfg.sequential and source.kind == "lm" and is_decoder_lm(source.model)
    out = []
    for m in cfg.methods:
        if sequential and m in ("sparsegpt",):
            continue
        out += NEEDS[m]
    if "neuron" in cfg.structures and "neuron" in cfg.methods:
        out.append("neuron")
    return tuple(dict.fromkeys(out))


def _prunable(source: Source) -> dict:
    mods = layer_modules(source)
    out = {}
    for name, m in mods.items():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and type(m).__name__ in ("Linear", "Conv1D"):
            out[name] = m
    if not out:
        raise ValueError("the layer selection holds no Linear layer to score (check --kinds / --blocks / --pattern "
                         f"/ --exclude; selected: {', '.join(mods) or 'nothing'})")
    return out


def setup(cfg, source: Source, info) -> Plan:
    modules = _prunable(source)
    dtype = next(iter(modules.values())).weight.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if source.kind == "lm":
        losses = loss_fn_for(source.model, "mean")
        entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in source.records]
        if not any(e.ok and e.n_target > 0 for _, _, e in entries):
            raise ValueError(f"calibration data {cfg.data or '<in-memory>'}: no example has a supervised token "
                             f"({len(entries)} encoded, {len(source.bad)} bad); with plain text use --loss-on all")
        units = example_units(source, entries, [(int(d["idx"]), d) for d in source.bad])
    else:
        losses = row_losses(source.loss, source.forward)
        units = example_units(source)
    st = ImpState(source, cfg, modules, losses, wanted(cfg, source), acc)
    from .pruning import finish

    return Plan(units, st, batches=_chunks(st), finish=finish)


def _chunks(st: ImpState):
    """Batches as the input adapter makes them, `--batches-per-shard` of them per compute call (one commit)."""
    per = int(st.cfg.batches_per_shard)

    def batches(units: list[Unit]):
        buf: list[list[Unit]] = []
        for b in example_batches(st.source, st.cfg)(units):
            if not b[0].ready:  # flagged rows: a commit of their own
                st.chunks[tuple(u.key for u in b)] = [b]
                yield b
                continue
            buf.append(b)
            if len(buf) == per:
                flat = [u for x in buf for u in x]
                st.chunks[tuple(u.key for u in flat)] = buf
                yield flat
                buf = []
        if buf:
            flat = [u for x in buf for u in x]
            st.chunks[tuple(u.key for u in flat)] = buf
            yield flat
    return batches


def _row(st: ImpState, u: Unit, status: str, reason: str, loss: float) -> dict:
    return unit_row(u.payload, u.key, status, reason, loss)


def compute(plan: Plan, units: list[Unit]) -> dict[str, Any]:
    st: ImpState = plan.state
    sub = st.chunks.get(tuple(u.key for u in units), [units])
    if not units[0].ready:
        rows = [_row(st, u, "skipped", u.payload[1].reason if u.payload[1] is not None else "", float("nan"))
                for u in units]
        return {"examples": pd.DataFrame(rows)}
    delta = new_stats(st.modules, st.want, st.dtype)
    rows = []
    for batch in sub:
        step = example_step(st.source, batch, st.modules, st.losses, ids=[u.key for u in batch])
        accumulate(delta, step.grads, st.modules, keep=step.keep)
        for p, u in enumerate(batch):
            bad = step.bad.get(p)
            rows.append(_row(st, u, "skipped" if bad else "ok", bad or "", float(step.losses[p])))
    tensors = {k: v.unsqueeze(0) for k, v in to_tensors(delta).items()}  # (1, ...): shards add up
    return {"stats": Tensors(tensors), "examples": pd.DataFrame(rows)}
