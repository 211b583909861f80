"""The layers analysis per batch: one captured forward/backward -> per-example, per-layer spectra.

Units are examples: a record of an LM's data (tokenized; a record that cannot be encoded or parsed becomes
a flagged row without a forward), or one row of a plain module's batches. Each batch yields two tables:
``layer_stats`` (example x layer x metric, long format) and ``examples`` (one row per example, the done
marker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch

from ...inputs.data import encode
from ...inputs.lm import Source, bad_record_row, batches_of, collate_units, example_row
from ...inputs.losses import loss_fn_for
from ...inputs.module import batch_rows, module_rows, row_batches, row_losses, take_rows
from ...measures.spectra import spectra, spectra_frame
from ...measures.step import backward_step
from ...runs.registry import Plan, Unit

__all__ = ["setup", "compute", "batch_layer_stats", "LayersState"]


@dataclass
class LayersState:
    source: Source
    modules: dict[str, torch.nn.Module]
    losses_fn: Callable
    measure: Any
    cfg: Any


def batch_layer_stats(model, layers, batch: dict[str, torch.Tensor], loss_fn: Callable, svd) -> tuple:
    """One forward/backward: (losses (B,), {layer: {metric: (B,)}}, {batch position: skip reason}).

    `svd`: a Config or SpectraOptions (route, erank_weights, rel_tol).
    """
    modules = dict(model.named_modules())
    step = backward_step(model, {li.name: modules[li.name] for li in layers}, batch, loss_fn,
                         tokens=batch["attention_mask"])
    stats = spectra(route=svd.route, erank_weights=svd.erank_weights, rel_tol=svd.rel_tol)(step)
    return step.losses, stats, step.bad


def setup(cfg, source: Source, info) -> Plan:
    modules = dict(source.model.named_modules())
    state = LayersState(source, {li.name: modules[li.name] for li in source.layers}, None,
                        spectra(route=cfg.route, erank_weights=cfg.erank_weights, rel_tol=cfg.rel_tol), cfg)
    if source.kind == "lm":
        units = lm_units(source, cfg)
        state.losses_fn = loss_fn_for(source.model, cfg.reduction)
        batches = lambda us: batches_of(us, lambda u: u.payload[1], cfg.token_budget, cfg.max_batch)  # noqa: E731
    else:
        if cfg.reduction != "mean":
            raise ValueError("reduction 'sum' is for token sequences; a module row's loss is its own")
        units = [Unit(i, row) for i, row in enumerate(module_rows(source))]
        state.losses_fn = row_losses(source.loss, source.forward)
        batches = row_batches
    return Plan(units, state, batches=batches)


def lm_units(source: Source, cfg) -> list[Unit]:
    """One unit per record (encoded; bad records and encoding skips are flagged units), in idx order."""
    units = [Unit(r.idx, (r, e), ready=e.ok) for r in source.records
             for e in [encode(r, source.tokenizer, cfg.encode)]]
    units += [Unit(int(d["idx"]), (d, None), ready=False) for d in source.bad]
    return sorted(units, key=lambda u: u.key)


def compute(plan: Plan, units: list[Unit]) -> dict[str, pd.DataFrame]:
    st: LayersState = plan.state
    src = st.source
    if src.kind == "lm" and not units[0].ready:
        return {"examples": pd.DataFrame([flagged_row(u) for u in units])}
    if src.kind == "lm":
        encs = [u.payload[1] for u in units]
        batch = collate_units(encs, src.pad_id, src.device)
        step = backward_step(src.model, st.modules, batch, st.losses_fn, tokens=batch["attention_mask"])
        groups = [u.payload[0].group for u in units]
        rows = [example_row(u.payload[0], u.payload[1], "ok" if p not in step.bad else "skipped",
                            step.bad.get(p, ""), float(step.losses[p])) for p, u in enumerate(units)]
    else:
        b = units[0].payload["batch"]
        idx = torch.tensor([u.payload["row"] for u in units], dtype=torch.long)
        batch = src.batches[b] if len(units) == batch_rows(src.batches[b]) else take_rows(src.batches[b], idx)
        step = backward_step(src.model, st.modules, batch, st.losses_fn)
        groups = [u.payload["group"] for u in units]
        rows = [dict(u.payload["row_meta"], status="ok" if p not in step.bad else "skipped",
                     reason=step.bad.get(p, ""), loss=float(step.losses[p])) for p, u in enumerate(units)]
    stats = st.measure(step)
    frame = spectra_frame(stats, src.layers, step.keep, [u.key for u in units], groups)
    return {"layer_stats": frame, "examples": pd.DataFrame(rows)}


def flagged_row(u: Unit) -> dict:
    rec, enc = u.payload
    if enc is None:
        return bad_record_row(rec)
    return example_row(rec, enc, "skipped", enc.reason, float("nan"))


__all__ += ["lm_units", "flagged_row"]
