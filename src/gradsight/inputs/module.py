"""Input adapter: a plain ``nn.Module``, its batches and a loss.

    module_source(model, loss, batches, groups=None, forward=None, name=None, **extras)

Batches are materialised once, in order (a DataLoader is read once): ``(x, y)`` by default, or anything a
``forward(model, batch) -> (outputs, targets)`` understands. The loss is "cross_entropy", "mse" (the
curvature operators' conventions: mean over rows) or a callable ``loss(outputs, targets)`` returning the mean
over the batch's rows. A row is one example: its own loss is the loss of its one-row slice, so per-example
gradients are those of each row's loss.

Identity: an in-memory run is named by a hash of the model's parameters, a hash of the batches' bytes,
the loss' name and, when given, a hash of the row groups; a run directory written from other weights or
other data is refused.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..curvature.operators import default_forward, resolve_loss
from ..runs import distributed as dist_
from .lm import Source, param_fingerprint
from .models import list_layers, select_layers

__all__ = ["module_source", "data_hash", "state_fingerprint", "loss_name", "row_losses", "batch_rows",
           "take_rows", "module_rows", "row_batches", "check_module_inputs"]


def data_hash(batches) -> str:
    """sha256 (16 hex) of the batches' shapes, dtypes and bytes (nested tuples, lists and dicts)."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, torch.Tensor):
            h.update(str((tuple(x.shape), str(x.dtype))).encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for k in sorted(x):
                h.update(str(k).encode())
                add(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                add(v)
        else:
            h.update(repr(x).encode())

    for b in batches:
        add(b)
    return h.hexdigest()[:16]


def state_fingerprint(states: Sequence[Mapping]) -> str:
    """sha256 (16 hex) of state_dicts' names and bytes: the identity of in-memory checkpoints."""
    h = hashlib.sha256()
    for st in states:
        for k in sorted(st):
            h.update(k.encode())
            h.update(st[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "in-memory:" + h.hexdigest()[:16]


def loss_name(loss) -> str:
    return loss if isinstance(loss, str) else getattr(loss, "__qualname__", repr(loss))


def check_module_inputs(model: nn.Module, batches, what: str) -> tuple[list, str]:
    """(the batches as a list, the parameters' dtype name), or a clear error."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"batches is empty: the {what} needs at least one batch")
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(next(model.parameters()).dtype)
    if dtype is None:
        raise ValueError(f"{what} needs float32 or float64 parameters, got {next(model.parameters()).dtype}")
    return batches, dtype


def batch_rows(batch) -> int:
    """Rows of a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_rows(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_rows(batch[0])
    raise TypeError(f"cannot tell the rows of a {type(batch).__name__} batch")


def take_rows(batch, rows: torch.Tensor):
    """The batch restricted to `rows` (every tensor indexed along dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: take_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(take_rows(v, rows) for v in batch)
    return batch


def _row_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def _row_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).reshape(out.shape[0], -1).pow(2).sum(-1)


# the built-in losses per row in one call (equal to the loss of each one-row slice)
_ROW_LOSSES = {"cross_entropy": _row_cross_entropy, "mse": _row_mse}


def row_losses(loss, forward: Callable) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``fn(model, batch) -> (B,)``: each row's loss (the loss of its one-row slice; the built-in losses are
    computed for all rows in one call, a custom one row by row)."""
    if isinstance(loss, str) and loss in _ROW_LOSSES:
        rowwise = _ROW_LOSSES[loss]

        def losses(model, batch):
            out, y = forward(model, batch)
            return rowwise(out, y)

        return losses
    fn = resolve_loss(loss)

    def losses(model, batch):
        out, y = forward(model, batch)
        return torch.stack([fn(out[i:i + 1], y[i:i + 1]) for i in range(out.shape[0])])

    return losses


def module_source(model: nn.Module, loss, batches, *, groups: Sequence[str] | None = None,
                  forward: Callable | None = None, name: str | None = None, what: str = "analysis",
                  **extras: Any):
    """A module input adapter bound to its inputs (see the module docstring).

    Args:
        model: the module (evaluated in eval mode).
        loss: "cross_entropy", "mse" or ``loss(outputs, targets) -> mean over rows``.
        batches: list of batches or a DataLoader.
        groups: one label per row across all batches, in order (per-example analyses compare them); default
            every row in group "all".
        forward: ``forward(model, batch) -> (outputs, targets)`` (default: ``(model(x), y)``).
        name: the model's name in the manifest and report (default: its class name).
        **extras: other in-memory inputs of the analysis (e.g. ``to=``, ``trajectory=``).
    """

    def load(cfg, info: dist_.DistInfo) -> Source:
        bs, dtype = check_module_inputs(model, batches, what)
        n_rows = sum(batch_rows(b) for b in bs)
        gs = None
        if groups is not None:
            gs = [str(g) for g in groups]
            if len(gs) != n_rows:
                raise ValueError(f"groups has {len(gs)} labels for {n_rows} rows in the batches")
        fp = "in-memory:" + param_fingerprint(model)
        dh = data_hash(bs)
        identity = {"model_fingerprint": fp, "data_sha256": dh, "loss": loss_name(loss)}
        if gs is not None:
            identity["groups_sha256"] = hashlib.sha256("\0".join(gs).encode()).hexdigest()[:16]
        # per-example analyses: every Linear-like layer, or the config's `pattern` / `exclude` (other modules
        # with a weight go through torch.func); curvature and landscape work on parameters, not layers
        pattern, exclude = getattr(cfg, "pattern", None), getattr(cfg, "exclude", None)
        layers = select_layers(model, pattern=pattern, exclude=exclude) if pattern else \
            [li for li in list_layers(model) if not (exclude and re.search(exclude, li.name))]
        device = next(model.parameters()).device
        meta = {"model": {"id": name or type(model).__name__, "fingerprint": fp, "class": type(model).__name__,
                          "n_blocks": 0, "layers": [li.to_dict() for li in layers]},
                "data": {"path": "<in-memory>", "sha256": dh, "n_records": len(bs), "n_rows": n_rows},
                "loss": {"objective": f"{loss_name(loss)}: mean over all rows of all batches", "mode": "eval",
                         "dtype": dtype}}
        return Source("module", model, layers, device, identity, meta, batches=bs, loss=loss,
                      forward=forward or default_forward, groups=gs, extras={"name": name, "dtype": dtype, **extras})

    return load


def module_rows(source: Source) -> list[dict]:
    """One dict per row of the batches: batch, row, group and the examples-table fields of the row."""
    out, i = [], 0
    for b, batch in enumerate(source.batches):
        first = batch if isinstance(batch, torch.Tensor) else \
            next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
        n_tok = int(first.shape[1]) if first.dim() >= 3 else 1  # (B, T, d) sequences: T positions
        for r in range(batch_rows(batch)):
            g = source.groups[i] if source.groups is not None else "all"
            out.append({"batch": b, "row": r, "group": g,
                        "row_meta": {"idx": i, "id": str(i), "group": g, "source": f"batch {b} row {r}",
                                     "n_tokens": n_tok, "n_target": 1, "prompt": "", "response": ""}})
            i += 1
    return out


def row_batches(units: list) -> Iterator[list]:
    """Pending row units grouped by the batch they came from (in batch order)."""
    by_batch: dict[int, list] = {}
    for u in units:
        by_batch.setdefault(u.payload["batch"], []).append(u)
    for b in sorted(by_batch):
        yield by_batch[b]
