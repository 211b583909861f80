"""The attribution analysis per batch: training and query examples -> stored gradient features.

Units are examples of two SETS at each CHECKPOINT k (the model itself is the last; earlier ones come from
``--checkpoints``): the training records and the query records (``--queries``; without it the training records
are their own queries and no query units exist). A unit's key is ``k * (N + M) + i`` for training example i
and ``k * (N + M) + N + j`` for query j, so keys depend only on the data. Units run checkpoint by checkpoint.

Each batch is one captured forward/backward (`inputs.examples.example_step`); its per-layer gradients become
Kronecker-projected features (`attribution.features`, (n, k_out, k_in) per layer, safetensors shards) and, for
training units, the projected K-FAC covariance sums of the batch (a "covariance" shard that adds up across
shards and ranks). Scoring needs every training feature, so it runs once at the end (`finish`, in
`scoring.py`), streaming the shards block by block.

With ``--features-from RUN`` the training units are not computed: their features are read from RUN, whose
identity (model, data, layers, feature options, checkpoints, tokenizer) must equal this run's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ...attribution.features import Featurizer
from ...inputs.data import encode, load_records
from ...inputs.examples import example_batches, example_step, example_units, layer_modules, unit_row
from ...inputs.lm import Source
from ...inputs.losses import loss_fn_for
from ...inputs.module import row_losses
from ...runs.registry import Plan, Unit
from ...runs.store import Tensors

__all__ = ["setup", "compute", "AttrState", "tokenizer_fingerprint", "identity", "TRAIN", "QUERY"]

TRAIN, QUERY = "train", "query"


def tokenizer_fingerprint(tok) -> str:
    """sha256 (16 hex) of a tokenizer's vocabulary and special tokens ("" without a tokenizer)."""
    if tok is None:
        return ""
    vocab = sorted(tok.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items())
    return hashlib.sha256(repr((vocab, special)).encode()).hexdigest()[:16]


@dataclass
class AttrState:
    source: Source
    cfg: Any
    modules: dict
    losses: Any
    featurizer: Featurizer
    n_train: int
    n_query: int
    n_ckpt: int
    query_source: Source | None
    query_records: list = field(default_factory=list)
    query_bad: list = field(default_factory=list)
    ckpt_specs: list = field(default_factory=list)   # per checkpoint: a model spec (LM), a state dict or None
    lrs: list = field(default_factory=list)
    current: int = -1
    final_state: dict | None = None
    fdtype: torch.dtype = torch.float32
    features_from: Path | None = None
    train_payloads: dict = field(default_factory=dict)  # example index -> the unit payload (per-token pass)
    adam: dict = field(default_factory=dict)  # checkpoint -> AdamPreconditioner or None (LESS)


def _load_queries(cfg, source: Source):
    """(records, bad) of the query set (LM), or the module's query batches as a Source; None without queries."""
    if source.kind == "lm":
        if not cfg.queries:
            return None
        recs, bad = load_records(cfg.queries, split=cfg.split, on_bad=cfg.on_bad)
        if not recs and not bad:
            raise ValueError(f"--queries {cfg.queries}: the query set is empty")
        return recs, bad
    qb = source.extras.get("queries")
    if qb is None:
        return None
    qb = list(qb)
    if not qb:
        raise ValueError("queries: the query set is empty (no batches)")
    return replace(source, batches=qb, groups=source.extras.get("query_groups"))


def _checkpoints(cfg, source: Source) -> tuple[list, list]:
    """(per checkpoint: what to load (None = the model as given), learning rates)."""
    if source.kind == "lm":
        specs = list(cfg.checkpoints) + [None]
    else:
        specs = list(source.extras.get("checkpoints") or []) + [None]
    lrs = list(cfg.lrs) if cfg.lrs else [1.0] * len(specs)
    if len(lrs) != len(specs):
        raise ValueError(f"lrs: {len(lrs)} learning rates for {len(specs)} checkpoints (the model is the last)")
    return specs, [float(x) for x in lrs]


def setup(cfg, source: Source, info) -> Plan:
    layers = layer_modules(source)
    fz = Featurizer(cfg.feature_spec(), {n: getattr(m, "bias", None) is not None for n, m in layers.items()},
                    torch.float64 if cfg.feature_dtype == "float64" else torch.float32)
    if source.kind == "lm":
        losses = loss_fn_for(source.model, cfg.reduction)
        train_entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in source.records]
        train = example_units(source, train_entries, [(int(d["idx"]), d) for d in source.bad])
    else:
        losses = row_losses(source.loss, source.forward)
        train = example_units(source)
    q = _load_queries(cfg, source)
    query, qsrc, qrecs, qbad = [], None, [], []
    if isinstance(q, tuple):
        qrecs, qbad = q
        entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in qrecs]
        query = example_units(source, entries, [(int(d["idx"]), d) for d in qbad])
        qsrc = source
    elif q is not None:
        qsrc = q
        query = example_units(q)
    specs, lrs = _checkpoints(cfg, source)
    N, M, K = len(train), len(query), len(specs)
    adam = source.extras.get("adam") if source.kind == "module" else None
    if adam:
        if len(adam) != K:
            raise ValueError(f"adam: {len(adam)} preconditioners for {K} checkpoints (the model is the last)")
        other = [m for m in cfg.methods if m not in ("grad_dot", "grad_cos", "tracin")]
        if other:
            raise ValueError(f"adam (LESS) preconditions first-order features; methods {other} need plain gradients")
    st = AttrState(source, cfg, layers, losses, fz, N, M, K, qsrc, qrecs, qbad, specs, lrs,
                   fdtype={"float16": torch.float16, "float64": torch.float64}.get(cfg.feature_dtype, torch.float32),
                   features_from=Path(cfg.features_from) if cfg.features_from else None)
    if st.features_from is not None:
        check_features_from(cfg, source, st)
    st.train_payloads = {i: u.payload for i, u in enumerate(train) if u.ready}
    units = []
    for k in range(K):
        base = k * (N + M)
        if st.features_from is None:
            units += [Unit(base + i, {"k": k, "set": TRAIN, "i": i, "inner": u.payload}, ready=u.ready)
                      for i, u in enumerate(train)]
        units += [Unit(base + N + j, {"k": k, "set": QUERY, "i": j, "inner": u.payload}, ready=u.ready)
                  for j, u in enumerate(query)]
    from .scoring import finish

    return Plan(units, st, batches=_batches(st), finish=finish)


def _batches(st: AttrState):
    """Pending units grouped by (checkpoint, set), then as the input adapter batches them."""
    def batches(units: list[Unit]):
        groups: dict[tuple, list] = {}
        for u in units:
            groups.setdefault((u.payload["k"], u.payload["set"]), []).append(u)
        for (k, s), us in sorted(groups.items(), key=lambda t: (t[0][0], t[0][1] != TRAIN)):
            src = st.source if s == TRAIN else st.query_source
            inner = [Unit(u.key, u.payload["inner"], ready=u.ready) for u in us]
            by_key = {u.key: u for u in us}
            for b in example_batches(src, st.cfg)(inner):
                yield [by_key[x.key] for x in b]
    return batches


def load_checkpoint(st: AttrState, k: int) -> None:
    """Put checkpoint k's weights into the model (the last checkpoint is the model as given)."""
    if st.current == k:
        return
    model = st.source.model
    if st.final_state is None:
        st.final_state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    spec = st.ckpt_specs[k]
    if spec is None:
        state = st.final_state
    elif isinstance(spec, str):
        from ...inputs.models import load_model

        other, _ = load_model(spec, dtype=st.cfg.dtype, attn_implementation=st.cfg.attn_implementation)
        state = other.state_dict()
    else:
        state = spec
    missing = set(st.final_state) - set(state)
    if missing:
        raise ValueError(f"checkpoint {k} ({spec if isinstance(spec, str) else 'in memory'}) lacks weights "
                         f"{sorted(missing)[:3]}: checkpoints must share the model's architecture")
    model.load_state_dict({n: v.to(st.final_state[n].device) for n, v in state.items() if n in st.final_state})
    st.current = k


def adam_for(st: AttrState, k: int):
    """Checkpoint k's Adam preconditioner (LESS), or None: from --adam-state files (LM) or the module's
    in-memory `adam=[AdamPreconditioner per checkpoint]`."""
    if k not in st.adam:
        src = st.cfg.adam_state[k] if st.cfg.adam_state else None
        if src is None and st.source.kind == "module" and st.source.extras.get("adam"):
            src = st.source.extras["adam"][k]
        if isinstance(src, str):
            from ...attribution.api import load_adam_state

            src = load_adam_state(src, st.modules, bias=st.featurizer.spec.bias)
        st.adam[k] = src
    return st.adam[k]


def restore(st: AttrState) -> None:
    if st.final_state is not None and st.current != st.n_ckpt - 1:
        st.source.model.load_state_dict(st.final_state)
    st.current = st.n_ckpt - 1 if st.final_state is not None else st.current


def _row(st: AttrState, u: Unit, status: str, reason: str, loss: float, sq: float) -> dict:
    p = u.payload
    inner = p["inner"]
    base = unit_row(inner, u.key, status, reason, loss)
    base.update(set=p["set"], example=p["i"],
                checkpoint=p["k"], record_idx=int(inner["row_meta"]["idx"]) if isinstance(inner, dict)
                else int(inner[0].idx if inner[1] is not None else inner[0]["idx"]), sq_norm=float(sq))
    return base


def compute(plan: Plan, units: list[Unit]) -> dict[str, Any]:
    st: AttrState = plan.state
    new = [u for u in units if u.key not in plan.done]
    if not units[0].ready:
        rows = [_row(st, u, "skipped", u.payload["inner"][1].reason if u.payload["inner"][1] is not None
                     else "", float("nan"), float("nan")) for u in new]
        return {"examples": pd.DataFrame(rows)} if rows else {}
    k, s = units[0].payload["k"], units[0].payload["set"]
    load_checkpoint(st, k)
    src = st.source if s == TRAIN else st.query_source
    inner = [Unit(u.key, u.payload["inner"]) for u in units]
    step = example_step(src, inner, st.modules, st.losses, ids=[u.key for u in units])
    feats, covs = st.featurizer(step.grads, covariance=(s == TRAIN), pre=adam_for(st, k) if s == TRAIN else None)
    pos = [p for p, u in enumerate(units) if u.key not in plan.done]
    if not pos:
        return {}
    sq = sum(X.double().reshape(X.shape[0], -1).pow(2).sum(1) for X in feats.values())
    out: dict[str, Any] = {
        "features": Tensors({n: X[pos].detach().cpu().to(st.fdtype).contiguous() for n, X in feats.items()},
                            ids=[units[p].key for p in pos])}
    if covs:
        # flagged examples were zeroed: they add nothing but still count as examples; remove them
        # flagged examples were zeroed (they add nothing to the sums): take them out of the counts too
        bad = sorted(step.bad)
        t = {"checkpoint": torch.tensor([k], dtype=torch.int64)}
        for n, c in covs.items():
            bad_tok = int(step.grads[n].tokens[bad].sum()) if bad else 0
            t[f"A/{n}"] = c.A.unsqueeze(0)
            t[f"S/{n}"] = c.S.unsqueeze(0)
            t[f"n/{n}"] = torch.tensor([[c.n_tokens - bad_tok, c.n_examples - len(bad)]], dtype=torch.int64)
        out["covariance"] = Tensors(t)
    rows = []
    for p in pos:
        bad = step.bad.get(p)
        rows.append(_row(st, units[p], "skipped" if bad else "ok", bad or "", float(step.losses[p]),
                         float("nan") if bad else float(sq[p])))
    out["examples"] = pd.DataFrame(rows)
    return out


# what the training features depend on: these must agree between a run and the run it takes them from
FEATURE_KEYS = (("run", "dtype"), ("run", "seed"), ("layers", "kinds"), ("layers", "blocks"), ("layers", "pattern"),
                ("layers", "exclude"), ("encode", "max_length"), ("encode", "loss_on"), ("encode", "truncation"),
                ("encode", "chat"), ("encode", "system_prompt"), ("encode", "append_eos"), ("reduction",),
                ("r_in",), ("r_out",), ("r_dense",), ("checkpoints",), ("lrs",))


def check_features_from(cfg, source: Source, st: AttrState) -> None:
    """Refuse to score against another run's training features unless they are exactly what this run would
    compute: same model weights, training data, tokenizer, checkpoints, layer selection, encoding, loss and
    feature options (the message names every difference)."""
    import json

    from ...config import semantic_dict
    from ...runs.store import RunMismatchError, read_manifest

    path = st.features_from
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"--features-from {path}: not a run directory (no manifest.json)")
    other = read_manifest(path)
    if other.get("analysis") != "attribute":
        raise RunMismatchError(f"--features-from {path}: a {other.get('analysis')!r} run, not an attribution run")
    if not other.get("finished"):
        raise RunMismatchError(f"--features-from {path}: the run is not finished; finish it first")
    if st.n_query == 0:
        raise ValueError("--features-from scores new queries against stored training features: give --queries")
    theirs = other.get("identity", {})
    mine = json.loads(json.dumps({"config": semantic_dict(cfg), **source.identity,
                                  **identity(cfg, source, Plan([], st))}, default=str))
    diffs = []
    for key in ("model_fingerprint", "data_sha256", "tokenizer", "checkpoints_sha256", "loss"):
        if theirs.get(key, "") != mine.get(key, ""):
            diffs.append(f"{key}: {theirs.get(key, '')!r} there, {mine.get(key, '')!r} here")
    for path_ in FEATURE_KEYS:
        a, b = theirs.get("config", {}), mine["config"]
        for k in path_:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if a != b:
            diffs.append(f"{'.'.join(path_)}: {a!r} there, {b!r} here")
    if diffs:
        raise RunMismatchError(f"--features-from {path}: its training features were computed differently; "
                               "refusing to score against them:\n  " + "\n  ".join(diffs))


def identity(cfg, source: Source, plan: Plan) -> dict:
    """What identifies the run beyond its config, model and data: the query data, the checkpoints, the
    tokenizer."""
    from ...inputs.data import fingerprint
    from ...inputs.module import data_hash, state_fingerprint

    st: AttrState = plan.state
    out = {"tokenizer": tokenizer_fingerprint(source.tokenizer)}
    if source.kind == "lm":
        out["queries_sha256"] = fingerprint(cfg.queries) if cfg.queries else ""
    else:
        out["queries_sha256"] = data_hash(st.query_source.batches) if st.query_source is not None else ""
        ck = [s for s in st.ckpt_specs if s is not None]
        out["checkpoints_sha256"] = state_fingerprint(ck) if ck else ""
        adam = source.extras.get("adam")
        if adam:
            out["adam_sha256"] = state_fingerprint([{**{f"o/{n}": v for n, v in a.offset.items()},
                                                     **{f"r/{n}": v[0] for n, v in a.factors.items()},
                                                     **{f"c/{n}": v[1] for n, v in a.factors.items()}}
                                                    for a in adam])
    return out
