"""Input adapter: a Hugging Face language model and records (JSONL, a saved dataset, or a list of dicts).

`lm_source(...)` returns a function the engine calls with (cfg, info): it loads and validates the data
first (bad input fails before the model loads), then the model (or takes the one passed in), picks the
device, moves the model there in eval mode and selects the layers. The `Source` it returns carries the
run's identity parts (model fingerprint, data hash) and the manifest's model/data/loss blocks.

`batches_of` is the length-bucketed batching every per-example analysis shares: the units that cannot be
computed (bad records, encoding skips) come first as one batch of flagged rows, then batches of the rest, the
cheapest composition by the cost model of the model and device (`batch_cost`; ``--batch-by budget``: filled up
to the token budget).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..runs import distributed as dist_
from .batching import BatchCost, model_cost
from .data import DataError, Encoded, Record, collate, encode, fingerprint, load_records, make_batches
from .models import LayerInfo, load_model, model_fingerprint, select_layers

__all__ = ["Source", "lm_source", "batch_cost", "batches_of", "collate_units", "param_fingerprint", "example_row",
           "bad_record_row", "pooled_batches"]


@dataclass
class Source:
    """What an input adapter hands to an analysis.

    Attributes:
        kind: "lm" or "module".
        model: the model (on `device`, eval mode).
        layers: the selected layers (LM: by kind/block/pattern; module: every Linear-like layer or the
            pattern's) as LayerInfo.
        device: where the model runs.
        identity: identity parts of the run (model fingerprint, data hash, loss).
        meta: manifest blocks (model, data, loss).
        tokenizer, records, bad: LM inputs (valid records, flagged bad ones).
        batches, loss, forward, groups: module inputs (see `inputs.module`).
        extras: other inputs of the call (in-memory checkpoints, ...).
    """

    kind: str
    model: Any
    layers: list[LayerInfo]
    device: torch.device
    identity: dict
    meta: dict
    tokenizer: Any = None
    records: list = field(default_factory=list)
    bad: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    loss: Any = None
    forward: Callable | None = None
    groups: list | None = None
    extras: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def param_fingerprint(model) -> str:
    """sha256 (16 hex) of parameter names, shapes and a strided sample of values: an in-memory model's id."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lm_source(model: Any = None, tokenizer: Any = None, records: Any = None, *, terms: bool = False,
              loss_meta: Callable[[Any], dict] | None = None):
    """An LM input adapter bound to in-memory objects (None: load them from the config).

    Args:
        model, tokenizer: a loaded model and its tokenizer (default: load ``cfg.model``).
        records: data as a list of dicts or a datasets.Dataset (default: read ``cfg.data``).
        terms: accept loss-term layouts (preference pairs, rollouts, named terms).
        loss_meta: ``loss_meta(cfg) -> dict``: the manifest's "loss" block.
    """

    def load(cfg, info: dist_.DistInfo) -> Source:
        source = records if records is not None else cfg.data
        if source is None or (isinstance(source, str) and source == ""):
            raise DataError("--data", "no data given")
        recs, bad = load_records(source, split=cfg.split, on_bad=cfg.on_bad, terms=terms)
        data_hash = fingerprint(source)
        m, tok = model, tokenizer
        if m is None:
            m, tok = load_model(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
            model_fp, model_id = model_fingerprint(cfg.model), cfg.model
        else:
            if tok is None:
                raise ValueError("a model passed in needs its tokenizer too")
            model_id = getattr(getattr(m, "config", None), "_name_or_path", type(m).__name__)
            model_fp = "in-memory:" + param_fingerprint(m)
        device = dist_.pick_device(cfg.device, info)
        was_training = bool(m.training)
        m.to(device).eval()
        layers = select_layers(m, kinds=cfg.kinds or None, blocks=cfg.blocks, pattern=cfg.pattern,
                               exclude=cfg.exclude)
        meta = {"model": {"id": model_id, "fingerprint": model_fp, "class": type(m).__name__,
                          "n_blocks": 1 + max((li.block for li in layers), default=-1),
                          "layers": [li.to_dict() for li in layers]},
                "data": {"path": str(cfg.data) or "<in-memory>", "sha256": data_hash,
                         "n_records": len(recs) + len(bad)}}
        if loss_meta is not None:
            meta["loss"] = loss_meta(cfg)
        return Source("lm", m, layers, device, {"model_fingerprint": model_fp, "data_sha256": data_hash}, meta,
                      tokenizer=tok, records=recs, bad=bad, extras={"was_training": was_training})

    return load


def collate_units(encoded: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """A right-padded batch of encoded sequences on `device`."""
    return {k: v.to(device) for k, v in collate(encoded, pad_id).items()}


def batch_cost(cfg, source: Source) -> BatchCost | None:
    """The cost model of the run's batches: `model_cost` of the source's model on its device when
    ``cfg.batch_by == "cost"`` (None: fill batches up to the token budget)."""
    if getattr(cfg, "batch_by", "budget") != "cost":
        return None
    return model_cost(source.model, source.device)


def batches_of(units: list, encoded_of: Callable[[Any], Encoded], token_budget: int,
               max_batch: int, cost: BatchCost | None = None) -> Iterator[list]:
    """The flagged (not ready) units as one batch, then length-bucketed batches of the ready ones (the cheapest
    composition under `cost`, see `make_batches`)."""
    flagged = [u for u in units if not u.ready]
    if flagged:
        yield flagged
    ready = [u for u in units if u.ready]
    enc = [encoded_of(u) for u in ready]
    for b in make_batches(enc, token_budget=token_budget, max_batch=max_batch, cost=cost):
        yield [ready[i] for i in b]


def example_row(rec: Record, enc: Encoded | None, status: str, reason: str, loss: float) -> dict:
    """The examples-table row of a record (RUN/examples; the report shows prompt and response)."""
    return {"idx": rec.idx, "id": rec.id, "group": rec.group, "source": rec.source, "status": status,
            "reason": reason, "n_tokens": enc.n_tokens if enc is not None else 0,
            "n_target": enc.n_target if enc is not None else 0, "loss": float(loss),
            "prompt": rec.prompt_text, "response": rec.response or ""}


def bad_record_row(d: dict) -> dict:
    """The examples-table row of a record that failed to parse (flagged with its reason)."""
    return {"idx": int(d["idx"]), "id": str(d.get("id") or d["idx"]), "group": str(d.get("group") or ""),
            "source": str(d.get("source", "")), "status": "skipped", "reason": str(d["reason"]),
            "n_tokens": 0, "n_target": 0, "loss": float("nan"), "prompt": "", "response": ""}


def pooled_batches(cfg, source: Source, info: dist_.DistInfo) -> tuple[list[dict], dict]:
    """This rank's fixed batches of a pooled objective (curvature, landscape) and counts of the whole data.

    Every usable example (encoded, at least one target) in record order, capped at ``cfg.n_examples``; rank r
    holds every world_size-th of them, batched under the token budget, on the source's device.
    """
    recs = source.records
    encoded = [encode(r, source.tokenizer, cfg.encode) for r in sorted(recs, key=lambda r: r.idx)]
    ok = [e for e in encoded if e.ok and e.n_target > 0]
    n_skipped = len(encoded) - len(ok)
    if cfg.n_examples is not None:
        ok = ok[: cfg.n_examples]
    if len(ok) < info.world_size:
        raise ValueError(f"{len(ok)} usable examples for {info.world_size} processes: every process needs at "
                         "least one (use more data or fewer processes)")
    mine = dist_.shard(ok, info)
    batches = [collate_units([mine[i] for i in b], source.pad_id, source.device)
               for b in make_batches(mine, token_budget=cfg.token_budget, max_batch=cfg.max_batch,
                                     cost=batch_cost(cfg, source))]
    group = {r.idx: r.group for r in recs}
    groups: dict[str, int] = {}
    for e in ok:
        groups[group[e.idx]] = groups.get(group[e.idx], 0) + 1
    counts = {"n_examples": len(ok), "n_skipped": n_skipped, "n_target_tokens": int(sum(e.n_target for e in ok)),
              "groups": groups, "examples": [int(e.idx) for e in ok]}
    return batches, counts
