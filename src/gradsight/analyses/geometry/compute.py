"""The geometry analysis per batch: loss terms -> one captured forward/backward -> gradient features.

Every record expands into one or more UNITS, a unit being one loss term of one record (a plain response, a
preference-pair side, a rewarded rollout, or a named term; see `gradsight.inputs.data`); a row of a plain
module's batches is one unit. Each unit's per-example gradient is captured in the usual single batched
forward/backward, then

* projected per layer to seeded Kronecker features and, through a second seeded projection of all layers
  together, to a whole-model feature of size ``r_model`` (safetensors shards next to the examples shards; the
  projection seeds are in the manifest);
* optionally summarised by its spectra (``layer_stats`` shards, as in `layers`), and always by its exact
  squared gradient norm;
* in exact mode, also kept as factors so that cross-unit inner products are exact (no projection): the
  Grams are accumulated over every unit (a resumed run feeds its finished units again, without committing
  them twice) and written to RUN/tensors/exact_gram.safetensors.

Sign convention: features are gradients of each unit's LOSS (negative log-likelihood). The log-probability
gradients of METHODS §7d / §12 are their negatives; a common sign leaves every Gram-based statistic unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ...inputs.data import Encoded, Record, encode
from ...inputs.examples import (example_batches, example_losses, example_step, example_units, layer_modules,
                                unit_group)
from ...inputs.lm import Source
from ...measures.projection import ExactGramAccumulator, Projector, projection
from ...measures.spectra import sq_norms, spectra, spectra_frame
from ...runs.registry import Plan, Unit
from ...runs.store import Tensors, write_safetensors
from .config import SUM_ROLES

__all__ = ["LossTerm", "expand_units", "unit_labels", "setup", "compute", "MODEL_KEY", "SUM_ROLES"]

MODEL_KEY = "__model__"  # whole-model feature in the feature shards


@dataclass(frozen=True)
class LossTerm:
    """One loss term of one record: the sequence (prompt, response) whose gradient is captured."""

    idx: int
    record: Record
    term: str
    response: str

    @property
    def role(self) -> str:
        return self.record.role

    def as_record(self) -> Record:
        """The record with this unit's response (what `encode` tokenizes)."""
        if self.record.terms is None:
            return self.record
        return replace(self.record, response=self.response)


def expand_units(records: list[Record], bad: list[dict]) -> tuple[list[LossTerm], list[dict]]:
    """Units of the valid records and unit ids of the bad ones, numbered in source order.

    A valid record with k terms takes k consecutive unit ids, a bad record one; so unit ids depend only on
    the data, not on ``on_bad``, the world size or resumption.
    """
    items = [(r.idx, r) for r in records] + [(int(d["idx"]), d) for d in bad]
    items.sort(key=lambda t: t[0])
    units, bad_rows, u = [], [], 0
    for _, item in items:
        if isinstance(item, Record):
            for term, resp in item.term_list:
                units.append(LossTerm(u, item, term, resp))
                u += 1
        else:
            bad_rows.append({**item, "record_idx": int(item["idx"]), "idx": u})
            u += 1
    return units, bad_rows


def unit_labels(ex: pd.DataFrame, threshold: float) -> pd.Series:
    """The geometry label of every unit: group (plain), group:term (pairs, named terms), group:positive or
    group:negative (rollouts, reward > threshold)."""
    role = ex["role"].astype(str)
    group = ex["group"].astype(str)
    sign = np.where(ex["reward"].astype(float) > threshold, "positive", "negative")
    return pd.Series(np.where(role == "loss", group,
                              np.where(role == "rollout", group + ":" + sign, group + ":" + ex["term"].astype(str))),
                     index=ex.index, dtype=object)


def unit_row(u: LossTerm, enc: Encoded | None, status: str, reason: str, loss: float, sq_norm: float) -> dict:
    rec = u.record
    return {"idx": u.idx, "id": rec.id, "group": rec.group, "source": rec.source, "status": status,
            "reason": reason, "n_tokens": enc.n_tokens if enc is not None else 0,
            "n_target": enc.n_target if enc is not None else 0, "loss": float(loss), "prompt": rec.prompt_text,
            "response": u.response, "record_idx": rec.idx, "term": u.term, "role": rec.role,
            "reward": float("nan") if rec.reward is None else float(rec.reward), "sq_norm": float(sq_norm)}


def bad_unit_row(d: dict) -> dict:
    return {"idx": int(d["idx"]), "id": str(d.get("id") or d["record_idx"]), "group": str(d.get("group") or ""),
            "source": str(d.get("source", "")), "status": "skipped", "reason": str(d["reason"]), "n_tokens": 0,
            "n_target": 0, "loss": float("nan"), "prompt": "", "response": "", "record_idx": int(d["record_idx"]),
            "term": "", "role": "", "reward": float("nan"), "sq_norm": float("nan")}


@dataclass
class GeometryState:
    source: Source
    cfg: Any
    modules: dict
    losses: Callable
    features: Any           # the projection measure
    spectra: Any            # spectra measure or None
    norms: Any              # squared-norm measure
    exact: ExactGramAccumulator | None
    fdtype: torch.dtype


def setup(cfg, source: Source, info) -> Plan:
    """One unit per loss term of every record (bad records take one flagged unit), or per module row."""
    terms, bad_rows = expand_units(source.records, source.bad)
    entries = [(t.idx, t, replace(encode(t.as_record(), source.tokenizer, cfg.encode), idx=t.idx)) for t in terms]
    units = example_units(source, entries, [(d["idx"], d) for d in bad_rows])
    maker = projection(Projector(cfg.projection(), dtype=torch.float32), cfg.r_model, model_key=MODEL_KEY)
    st = GeometryState(source, cfg, layer_modules(source), example_losses(source, "sum" if source.kind == "lm"
                                                                          else "mean"), maker,
                       spectra(route=cfg.route, erank_weights=cfg.erank_weights, rel_tol=cfg.rel_tol)
                       if cfg.spectra else None, sq_norms(),
                       ExactGramAccumulator() if cfg.exact else None,
                       torch.float16 if cfg.feature_dtype == "float16" else torch.float32)
    return Plan(units, st, batches=example_batches(source, cfg), revisit_done=cfg.exact, finish=finish)


def _scale(cfg) -> Callable:
    """Per-unit loss factor: pair sides and rollouts keep the sequence sum (log-probability), the others are
    token means unless reduction is 'sum'."""
    return lambda t, e: 1.0 if (t.role in SUM_ROLES or cfg.reduction == "sum") else 1.0 / e.n_target


def compute(plan: Plan, units: list[Unit]) -> dict[str, Any]:
    st: GeometryState = plan.state
    cfg, src = st.cfg, st.source
    if not units[0].ready:
        rows = [bad_unit_row(u.payload[0]) if u.payload[1] is None else
                unit_row(u.payload[0], u.payload[1], "skipped", u.payload[1].reason, float("nan"), float("nan"))
                for u in units if u.key not in plan.done]
        return {"examples": pd.DataFrame(rows)} if rows else {}
    idx = [u.key for u in units]
    step = example_step(src, units, st.modules, st.losses, scale=_scale(cfg) if src.kind == "lm" else None,
                        ids=idx)
    feats = st.features(step)
    stats = st.spectra(step) if st.spectra is not None else None
    if stats is not None:  # the spectra already hold ||M_e||_F
        sq = sum(s["frobenius"].double().cpu() ** 2 for s in stats.values())
    else:
        sq = sum(v.double().cpu() for v in st.norms(step).values())
    if st.exact is not None:
        st.exact.add(step.grads, idx)
    new = [p for p, u in enumerate(units) if u.key not in plan.done]
    if not new:
        return {}
    keep = [p for p in new if p not in step.bad]
    out: dict[str, Any] = {}
    if stats is not None:
        out["layer_stats"] = spectra_frame(stats, src.layers, keep, idx, [unit_group(u) for u in units])
    out["features"] = Tensors({k: v[new].to(st.fdtype) for k, v in feats.items()}, ids=[idx[p] for p in new],
                              metadata={"feature_dtype": cfg.feature_dtype})
    rows = []
    for p in new:
        ok, u = p not in step.bad, units[p]
        status, reason = ("ok", "") if ok else ("skipped", step.bad[p])
        loss, sq_p = float(step.losses[p]), float(sq[p]) if ok else float("nan")
        if isinstance(u.payload, dict):  # a module row: one plain term
            meta = u.payload["row_meta"]
            rows.append(dict(meta, status=status, reason=reason, loss=loss, record_idx=meta["idx"], term="loss",
                             role="loss", reward=float("nan"), sq_norm=sq_p))
        else:
            rows.append(unit_row(u.payload[0], u.payload[1], status, reason, loss, sq_p))
    out["examples"] = pd.DataFrame(rows)
    return out


def finish(plan: Plan, resumed: int) -> dict:
    """Exact mode: the n x n Gram of every layer over all units, in unit order (rank 0 writes)."""
    st: GeometryState = plan.state
    if st.exact is not None and plan.info.is_main:
        ids = torch.tensor(st.exact.idx, dtype=torch.int64)
        o = torch.argsort(ids)  # rows and columns in unit order
        grams = {k: v[o][:, o].contiguous() for k, v in st.exact.grams().items()}
        write_safetensors({**grams, "__idx__": ids[o]}, plan.run_dir / "tensors" / "exact_gram.safetensors")
    return {}


__all__ += ["unit_row", "bad_unit_row"]
