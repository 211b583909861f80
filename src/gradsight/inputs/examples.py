"""Examples as units: the per-example loop every per-example analysis shares, on either input adapter.

    units = example_units(source, entries)        LM: (key, item, Encoded) per entry; module: one unit per row
    for us in example_batches(source, cfg)(units):
        step = example_step(source, us, modules, losses)    # ONE captured forward/backward

A unit's payload is ``(item, Encoded)`` for a language model (item: a Record, a loss term, or a bad record's
dict with no encoding; units that cannot be computed are `ready=False` and are batched first, alone), or the
row dict of `inputs.module.module_rows` for a plain module (batch, row, group, row_meta). `layers`,
`geometry` and analyses to come (attribution, importance, privacy) build on these, so the loop is written
once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..measures.step import Step, backward_step
from ..runs.registry import Unit
from .lm import Source, bad_record_row, batch_cost, batches_of, collate_units, example_row
from .losses import loss_fn_for
from .module import batch_rows, module_rows, row_batches, row_losses, take_rows

__all__ = ["example_units", "example_batches", "example_step", "example_losses", "unit_group", "layer_modules",
           "unit_row"]


def example_units(source: Source, entries: Iterable[tuple[Any, Any, Any]] = (), bad: Iterable[tuple[Any, dict]] = ()
                  ) -> list[Unit]:
    """The units of a run, sorted by key.

    Args:
        entries: LM only: (key, item, Encoded) per computable example (a not-ok encoding becomes a flagged unit).
        bad: LM only: (key, bad-record dict) per record that failed to parse (flagged units).
    """
    if source.kind == "module":
        return [Unit(i, row) for i, row in enumerate(module_rows(source))]
    units = [Unit(k, (item, enc), ready=enc.ok) for k, item, enc in entries]
    units += [Unit(k, (d, None), ready=False) for k, d in bad]
    return sorted(units, key=lambda u: u.key)


def example_batches(source: Source, cfg) -> Callable[[list[Unit]], Iterable[list[Unit]]]:
    """How pending units group into batches: token-budget batches of sequences (flagged units first), or the
    rows of each of the module's batches."""
    if source.kind == "module":
        return row_batches
    cost = batch_cost(cfg, source)
    return lambda units: batches_of(units, lambda u: u.payload[1], cfg.token_budget, cfg.max_batch, cost)


def example_losses(source: Source, reduction: str = "mean") -> Callable:
    """``losses(model, batch) -> (B,)`` each example's own loss (LM: token-mean or sum over its targets)."""
    if source.kind == "module":
        if reduction != "mean":
            raise ValueError("reduction 'sum' is for token sequences; a module row's loss is its own")
        return row_losses(source.loss, source.forward)
    return loss_fn_for(source.model, reduction)


def layer_modules(source: Source) -> dict[str, torch.nn.Module]:
    """{name: module} of the source's selected layers."""
    mods = dict(source.model.named_modules())
    return {li.name: mods[li.name] for li in source.layers}


def example_step(source: Source, units: list[Unit], modules, losses: Callable, *, scale: Callable | None = None,
                 ids: list | None = None) -> Step:
    """One captured forward/backward over ready units (see `measures.step.backward_step`).

    Args:
        scale: LM only: ``scale(item, encoded) -> float`` per unit (e.g. 1 / n_target for token means of sums).
    """
    if source.kind == "lm":
        batch = collate_units([u.payload[1] for u in units], source.pad_id, source.device)
        s = None
        if scale is not None:
            s = torch.tensor([scale(*u.payload) for u in units], dtype=torch.float64, device=source.device)
        return backward_step(source.model, modules, batch, losses, tokens=batch["attention_mask"], scale=s, ids=ids)
    b = source.batches[units[0].payload["batch"]]
    rows = torch.tensor([u.payload["row"] for u in units], dtype=torch.long)
    return backward_step(source.model, modules, b if len(units) == batch_rows(b) else take_rows(b, rows), losses,
                         ids=ids)


def unit_group(u: Unit) -> str:
    """The group of an example unit (LM: its record's; module: its row's)."""
    if isinstance(u.payload, dict):
        return u.payload["group"]
    item = u.payload[0]
    return item.record.group if hasattr(item, "record") else item.group


def unit_row(payload: Any, key: Any, status: str, reason: str, loss: float) -> dict:
    """The examples-table row of an example unit (its `example_units` payload): a module row's metadata, a bad
    record's flagged row, or a record's row with its encoding; `idx` is the unit key. A unit flagged before
    compute (a skipped encoding or a bad record) keeps its own status and reason."""
    if isinstance(payload, dict):  # a module row
        base = dict(payload["row_meta"])
    elif payload[1] is None:  # a record that failed to parse
        base = bad_record_row(payload[0])
    else:
        base = example_row(payload[0], payload[1], status, reason, loss)
    base.update(idx=key, status=status if base.get("status") != "skipped" else base["status"],
                reason=reason or base.get("reason", ""), loss=float(loss))
    return base
