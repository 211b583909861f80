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
from ...inputs.examples import (example_batches, example_losses, example_step, example_units, layer_modules,
                                unit_group)
from ...inputs.lm import Source, bad_record_row, example_row
from ...measures.spectra import spectra, spectra_frame
from ...measures.step import backward_step
from ...runs.registry import Plan, Unit

__all__ = ["setup", "compute", "batch_layer_stats", "LayersState", "flagged_row"]


@dataclass
class LayersState:
    source: Source
    modules: dict[str, torch.nn.Module]
    losses: Callable
    spectra: Any


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
    """One unit per record (encoded; bad records and encoding skips flagged), or per row of a module's batches."""
    entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in source.records]
    units = example_units(source, entries, [(int(d["idx"]), d) for d in source.bad])
    state = LayersState(source, layer_modules(source), example_losses(source, cfg.reduction),
                        spectra(route=cfg.route, erank_weights=cfg.erank_weights, rel_tol=cfg.rel_tol))
    return Plan(units, state, batches=example_batches(source, cfg))


def compute(plan: Plan, units: list[Unit]) -> dict[str, pd.DataFrame]:
    st: LayersState = plan.state
    if not units[0].ready:
        return {"examples": pd.DataFrame([flagged_row(u) for u in units])}
    step = example_step(st.source, units, st.modules, st.losses)
    rows = [dict(_row(u), status="ok" if p not in step.bad else "skipped", reason=step.bad.get(p, ""),
                 loss=float(step.losses[p])) for p, u in enumerate(units)]
    frame = spectra_frame(st.spectra(step), st.source.layers, step.keep, [u.key for u in units],
                          [unit_group(u) for u in units])
    return {"layer_stats": frame, "examples": pd.DataFrame(rows)}


def _row(u: Unit) -> dict:
    """The examples-table fields of a unit that do not depend on the step."""
    if isinstance(u.payload, dict):
        return dict(u.payload["row_meta"])
    return example_row(u.payload[0], u.payload[1], "ok", "", float("nan"))


def flagged_row(u: Unit) -> dict:
    rec, enc = u.payload
    if enc is None:
        return bad_record_row(rec)
    return example_row(rec, enc, "skipped", enc.reason, float("nan"))
