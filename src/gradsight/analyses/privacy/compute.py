"""The privacy audit per batch: one audited gradient, its defended versions, and the leakage probes.

Units are audited batches: for each size B of ``--batch-sizes``, ``--batches-per-size`` batches of B usable
examples taken from the data in order. For one batch:

1. one forward/backward through `privacy.clip.PerExampleClipper` with C = inf gives the per-example gradient norms
   and the plain summed gradient (the clipper's hooks record the input embedding's output gradient and the first
   Linear layer's input, which the probes need); C is ``--clip-norm`` or the batch's median norm;
2. a second pass with that C gives the clipped sum (ghost norms and book-keeping sums, no per-example gradient);
3. each defence gives the gradient an observer sees (the batch MEAN, as in federated SGD): plain, clipped,
   clipped + N(0, (sigma C)^2) on the sum, or the plain gradient pruned / sparsified / quantised (the transforms of
   `gradsight.transforms.privacy`);
4. the probes run on it (`probes.py`); the stored-artefact probe runs once per batch, on the first example.

Rows go to the "recovery" table (the marker); reconstructions worth showing go to "samples" (safetensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from ...inputs.data import encode
from ...inputs.examples import example_units
from ...inputs.lm import Source, collate_units
from ...inputs.losses import causal_lm_losses, loss_fn_for
from ...inputs.module import row_losses, take_rows
from ...runs.registry import Plan, Unit
from ...runs.store import Tensors
from .config import parse_defence

__all__ = ["setup", "compute", "PrivState", "COLUMNS", "usable_examples", "cat_batches", "make_batch", "lm_losses"]

# every recovery row has these columns (NaN / 0 / "" where a probe does not measure it)
COLUMNS = {"unit": 0, "batch_size": 0, "batch": 0, "defence": "", "noise_multiplier": math.nan,
           "clip_norm": math.nan, "probe": "", "projection": 0, "psnr": math.nan, "cosine": math.nan,
           "label_acc": math.nan, "precision": math.nan, "recall": math.nan, "f1": math.nan, "exact": math.nan,
           "rouge1": math.nan, "rouge2": math.nan,
           "n_true": 0, "n_found": 0, "sample": "", "truth": ""}


@dataclass
class PrivState:
    source: Source
    cfg: Any
    losses: Callable
    n_examples: int
    defences: list
    notes: list = field(default_factory=list)
    said: set = field(default_factory=set)

    def say_once(self, msg: str) -> None:
        if msg not in self.said:
            self.said.add(msg)
            self.notes.append(msg)


def usable_examples(source: Source, cfg) -> tuple[list[Unit], int]:
    """(the units that can be audited, the number left out: bad records, encoding skips, no supervised token)."""
    if source.kind == "lm":
        entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in source.records]
        units = example_units(source, entries, [(int(d["idx"]), d) for d in source.bad])
        ok = [u for u in units if u.ready and u.payload[1].n_target > 0]
    else:
        units = example_units(source)
        ok = list(units)
    return ok, len(units) - len(ok)


def setup(cfg, source: Source, info) -> Plan:
    ready, skipped = usable_examples(source, cfg)
    n = len(ready)
    if n == 0:
        raise ValueError(f"data {cfg.data or '<in-memory>'}: no usable example to audit ({skipped} skipped)")
    if cfg.delta >= 1.0 / n:
        raise ValueError(f"--delta {cfg.delta:g} must be < 1/N = {1.0 / n:.3g} (N = {n} examples): with delta >= "
                         "1/N a mechanism may publish one example in the clear and still be (0, delta)-DP")
    big = [b for b in cfg.batch_sizes if b > n]
    if big:
        raise ValueError(f"--batch-sizes {big[0]} is larger than the {n} usable examples")
    losses = lm_losses(source.model) if source.kind == "lm" else row_losses(source.loss, source.forward)
    units, k = [], 0
    for B in cfg.batch_sizes:
        for j in range(cfg.batches_per_size):
            members = [ready[(j * B + i) % n] for i in range(B)]
            units.append(Unit(k, {"batch_size": B, "batch": j, "members": members}))
            k += 1
    st = PrivState(source, cfg, losses, n, [(d, *parse_defence(d)) for d in cfg.defences])
    if skipped:
        st.say_once(f"{skipped} example(s) left out of the audit (bad records, encoding skips or no supervised "
                    "token)")
    from .summarize import finish

    return Plan(units, st, finish=finish)


def lm_losses(model) -> Callable:
    """Per-example token-mean losses with the LM head applied to every position (B, T, d), not gathered across
    the batch: per-example clipping needs each module's inputs laid out per example."""
    fn = loss_fn_for(model, "mean")
    if fn.__code__.co_names and "causal_lm_losses" in fn.__code__.co_names:
        return lambda m, b: causal_lm_losses(m, b, "mean", gather_head=False)
    return fn


# ------------------------------------------------------------------------------------------------ batches

def cat_batches(parts: list):
    """Batches (tensors, or dicts / tuples of them) concatenated row-wise."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, dict):
        return {k: cat_batches([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_batches([p[i] for p in parts]) for i in range(len(first)))
    return first


def make_batch(st: PrivState, members: list[Unit]):
    """The audited batch: LM encodings collated (right padding), or the module rows gathered in member order."""
    src = st.source
    if src.kind == "lm":
        return collate_units([u.payload[1] for u in members], src.pad_id, src.device)
    parts = [take_rows(src.batches[u.payload["batch"]], torch.tensor([u.payload["row"]])) for u in members]
    return cat_batches(parts)


def input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, nn.Embedding) else None


def first_last_linear(model: nn.Module) -> tuple[tuple[str, nn.Linear] | None, tuple[str, nn.Linear] | None]:
    """The first Linear layer with a bias (its input is recoverable analytically) and the last Linear layer (the
    classifier whose gradient gives the labels), in registration order."""
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = next(((n, m) for n, m in lins if m.bias is not None), None)
    return first, (lins[-1] if lins else None)


# ------------------------------------------------------------------------------------------------- compute

def compute(plan: Plan, units: list[Unit]) -> dict[str, Any]:
    from .probes import audit_batch

    st: PrivState = plan.state
    rows, tensors = [], {}
    for u in units:
        r, t = audit_batch(st, u)
        rows += r
        tensors.update(t)
    out: dict[str, Any] = {"recovery": pd.DataFrame([{**COLUMNS, **r} for r in rows], columns=list(COLUMNS))}
    if tensors:
        out["samples"] = Tensors(tensors)
    return out
