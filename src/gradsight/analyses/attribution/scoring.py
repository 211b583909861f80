"""Scoring at the end of an attribution run: stream the stored training features, score every query set.

`finish` (rank 0, after every unit is committed; other ranks only restore the model) runs, per method:

1. `Scorer.fit` over the checkpoints: the covariance shards summed per checkpoint, one pass over the training
   feature shards where the curvature needs it (EK-FAC's eigenvalue correction, the raw covariance, TRAK's
   Phi'Phi);
2. the queries' features (a few hundred rows) prepared once;
3. one more pass over the training shards in blocks of `block_size`: the (n, M) block of scores, accumulated
   into the full matrix when N x M <= max_dense (then stored as scores/METHOD.safetensors), otherwise only
   the running top-k per query; self-influence and per-layer magnitude shares on the way.

Nothing N_train x N_query is held in memory unless it fits `max_dense`. Files are written atomically; a killed
finish reruns from the committed shards. For language models, the tokens of each query's top proponents are
scored one by one (kronfluence's per-token scores: the training gradient is a sum over its positions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ...attribution.features import LayerCovariance
from ...attribution.methods import CURVATURE, Block, Checkpoint, Scorer
from ...runs.store import atomic_write_text, write_parquet, write_safetensors
from .compute import QUERY, TRAIN, AttrState, load_checkpoint, restore

__all__ = ["finish", "read_examples", "feature_blocks", "covariances", "set_rows", "unit_keys", "train_checkpoint"]


def read_examples(run: Path) -> pd.DataFrame:
    """Every unit's row (sorted by idx) from the examples shards."""
    files = sorted((run / "examples").glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=["idx", "set", "example", "checkpoint", "status"])
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).sort_values("idx").reset_index(drop=True)


def feature_blocks(run: Path, keys: dict[int, int], losses: dict[int, float], layers: list[str],
                   block_size: int, dropped: set | None = None) -> Iterator[Block]:
    """Blocks of features of the units `keys` ({unit key: example index}) read shard by shard, re-chunked to at
    most `block_size` rows; ids are the example indices (not unit keys). Rows with a non-finite feature (a
    float16 overflow, a corrupted shard) are left out and their example indices added to `dropped`.

    Memory: a shard is never loaded whole; rows are sliced from the file `block_size` at a time
    (safetensors `get_slice`), so a pass holds about one block of features whatever the number of examples.
    """
    from safetensors import safe_open

    buf: list[tuple[dict, list]] = []
    n_buf = 0

    def emit():
        feats = {n: (buf[0][0][n] if len(buf) == 1 else torch.cat([b[0][n] for b in buf])) for n in layers}
        ids = [i for b in buf for i in b[1]]
        return Block(feats, torch.tensor([losses[keys_of[i]] for i in ids], dtype=torch.float64),
                     torch.tensor(ids, dtype=torch.int64))

    keys_of = {v: k for k, v in keys.items()}
    for f in sorted((run / "features").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            idx = h.get_tensor("__idx__").tolist()
            rows = [p for p, k in enumerate(idx) if k in keys]
            lo = 0
            while lo < len(rows):
                part = rows[lo:lo + block_size - n_buf]  # a block never exceeds block_size rows
                lo += len(part)
                a, b = part[0], part[-1] + 1  # one contiguous read, then the wanted rows of it
                sel = torch.tensor(part) - a
                chunk = {n: h.get_slice(n)[a:b][sel] if len(part) != b - a else h.get_slice(n)[a:b]
                         for n in layers}
                finite = torch.ones(len(part), dtype=torch.bool)
                for X in chunk.values():
                    finite &= torch.isfinite(X.reshape(len(part), -1)).all(1)
                ids = [keys[idx[p]] for p in part]
                if not bool(finite.all()):
                    if dropped is not None:
                        dropped.update(i for i, ok in zip(ids, finite.tolist()) if not ok)
                    chunk = {n: X[finite] for n, X in chunk.items()}
                    ids = [i for i, ok in zip(ids, finite.tolist()) if ok]
                    if not ids:
                        continue
                buf.append((chunk, ids))
                n_buf += len(ids)
                if n_buf >= block_size:
                    yield emit()
                    buf, n_buf = [], 0
    if buf:
        yield emit()


def covariances(run: Path, k: int, layers: list[str]) -> dict[str, LayerCovariance]:
    """Checkpoint k's projected K-FAC covariance sums over every covariance shard."""
    out: dict[str, LayerCovariance] = {}
    for f in sorted((run / "covariance").glob("*.safetensors")):
        t = load_file(str(f))
        rows = (t["checkpoint"] == k).nonzero().flatten()
        if rows.numel() == 0:
            continue
        for n in layers:
            if f"A/{n}" not in t:
                continue
            A, S = t[f"A/{n}"][rows].sum(0), t[f"S/{n}"][rows].sum(0)
            nt, ne = t[f"n/{n}"][rows].sum(0).tolist()
            c = LayerCovariance(A.double(), S.double(), int(nt), int(ne))
            out[n] = c if n not in out else out[n] + c
    return out


def set_rows(ex: pd.DataFrame, k: int, s: str) -> pd.DataFrame:
    """The usable (status ok) units of set `s` ("train" / "query") at checkpoint k, in example order."""
    d = ex[(ex["set"] == s) & (ex["checkpoint"] == k) & (ex["status"] == "ok")]
    return d.sort_values("example", kind="stable")


def unit_keys(d: pd.DataFrame) -> tuple[dict[int, int], dict[int, float]]:
    """({unit key: example index}, {unit key: loss}) of some units (what `feature_blocks` reads)."""
    return (dict(zip(d["idx"].astype(int), d["example"].astype(int))),
            dict(zip(d["idx"].astype(int), d["loss"].astype(float))))


def train_checkpoint(train_run: Path, tr: pd.DataFrame, k: int, layers: list[str], shapes: dict, lr: float,
                     block_size: int, dropped: set | None = None) -> Checkpoint:
    """Checkpoint k's training side from the shards: the units `tr` streamed in blocks, its covariance sums."""
    keys, losses = unit_keys(tr)
    return Checkpoint(lambda: feature_blocks(train_run, keys, losses, layers, block_size, dropped),
                      covariances(train_run, k, layers), shapes, lr=lr, name=f"checkpoint {k}")


class _TopK:
    """Running top-k (largest and smallest) per query over blocks of scores."""

    def __init__(self, M: int, k: int):
        self.k = k
        self.hi_v = torch.full((0, M), float("-inf"), dtype=torch.float64)
        self.hi_i = torch.zeros((0, M), dtype=torch.int64)
        self.lo_v, self.lo_i = self.hi_v.clone(), self.hi_i.clone()

    def add(self, S: torch.Tensor, ids: torch.Tensor, exclude_self: torch.Tensor | None = None) -> None:
        M = S.shape[1]
        I = ids.view(-1, 1).expand(-1, M)
        hi, lo = S.clone(), S.clone()
        if exclude_self is not None:  # train x train: a query is not its own proponent
            same = I == exclude_self.view(1, -1)
            hi[same], lo[same] = float("-inf"), float("inf")
        for attr_v, attr_i, X, largest in (("hi_v", "hi_i", hi, True), ("lo_v", "lo_i", lo, False)):
            v = torch.cat([getattr(self, attr_v), X])
            i = torch.cat([getattr(self, attr_i), I])
            kk = min(self.k, v.shape[0])
            top = torch.topk(v, kk, dim=0, largest=largest)
            setattr(self, attr_v, top.values)
            setattr(self, attr_i, torch.gather(i, 0, top.indices))


def finish(plan, resumed: int) -> dict:
    st: AttrState = plan.state
    try:
        if plan.info.is_main:
            return _score_all(plan.run_dir, st)
        return {}
    finally:
        restore(st)


def _score_all(run: Path, st: AttrState) -> dict:
    cfg = st.cfg
    ex = read_examples(run)
    train_run = st.features_from or run
    tex = read_examples(train_run) if st.features_from else ex
    layers = list(st.modules)
    out_dir = run / "attribution"
    out_dir.mkdir(exist_ok=True)
    ckpts, queries = [], []
    dropped_train: set = set()
    dropped_query: set = set()
    self_mode = st.n_query == 0
    shapes = _shapes(train_run, layers)
    for k in range(st.n_ckpt):
        tr = set_rows(tex, k, TRAIN)
        if tr.empty:
            raise ValueError("no usable training example (every one was skipped): nothing to attribute to")
        tkeys = unit_keys(tr)[0]
        ckpts.append(train_checkpoint(train_run, tr, k, layers, shapes, st.lrs[k], cfg.block_size, dropped_train))
        q = tr if self_mode else set_rows(ex, k, QUERY)
        if q.empty:
            raise ValueError("no usable query example (every one was skipped): nothing to score")
        qkeys, qloss = unit_keys(q)
        b = next(iter(feature_blocks(train_run if self_mode else run, qkeys, qloss, layers, 10**9, dropped_query)),
                 None)
        if b is None:
            raise ValueError("every query's features are non-finite: nothing to score")
        o = torch.argsort(b.ids)  # queries in example order, whatever the shard order (ranks)
        queries.append(Block({n: X[o] for n, X in b.feats.items()}, b.losses[o], b.ids[o]))
    n_train = len(set_rows(tex, st.n_ckpt - 1, TRAIN))
    q_ids = queries[-1].ids
    M = q_ids.numel()
    dense = n_train * M <= cfg.max_dense
    if st.n_ckpt > 1 and not dense:
        raise ValueError(f"{n_train} x {M} scores over {st.n_ckpt} checkpoints exceed --max-dense {cfg.max_dense}; "
                         "raise it (the matrix is float32 in memory) or score fewer queries at a time")
    out_kind = "margin" if st.source.kind == "module" and st.source.loss == "cross_entropy" else "loss"
    tops, selfs, shares, curv, info = [], [], [], [], {}
    train_ids = sorted(tkeys.values())
    for method in cfg.methods:
        sc = Scorer(method, damping=cfg.damping, damping_mode=cfg.damping_mode, trak_dim=cfg.trak_dim,
                    out=out_kind, seed=cfg.seed).fit(ckpts)
        prep = sc.prepare(queries)
        full = torch.zeros(n_train and max(train_ids) + 1, M, dtype=torch.float64) if dense else None
        topk = _TopK(M, cfg.top_k)
        self_s: dict[int, float] = {}
        layer_abs = {n: torch.zeros(M, dtype=torch.float64) for n in layers}
        for k, ck in enumerate(ckpts):
            for b in ck.blocks():
                S, parts = sc.score(prep, k, b, per_layer=True)
                for n, P in parts.items():
                    layer_abs[n] += P.abs().sum(0)
                if full is not None:
                    full[b.ids] += S
                else:
                    topk.add(S, b.ids, q_ids if self_mode else None)
                for i, v in zip(b.ids.tolist(), sc.self_score(k, b).tolist()):
                    self_s[i] = self_s.get(i, 0.0) + v
        if full is not None:
            full = full[torch.tensor(train_ids)]
            topk.add(full, torch.tensor(train_ids), q_ids if self_mode else None)
            write_safetensors({"scores": full.float(), "train": torch.tensor(train_ids), "query": q_ids},
                              run / "scores" / f"{method}.safetensors",
                              metadata={"method": method, "rows": "train examples", "cols": "queries",
                                        "sign": "positive = the training example helps the query"})
        tops.append(_top_rows(method, topk, q_ids, n_train, self_mode))
        selfs.append(pd.DataFrame({"method": method, "example": list(self_s), "self_influence": list(self_s.values())})
                     .sort_values("example", kind="stable"))
        tot = sum(layer_abs.values())
        for n, v in layer_abs.items():
            shares.append(pd.DataFrame({"method": method, "query": q_ids.numpy(), "layer": n,
                                        "abs_share": (v / torch.where(tot > 0, tot, torch.ones_like(tot))).numpy()}))
        inf = sc.info()
        info[method] = {k: v for k, v in inf.items() if k != "layers"}
        for k, lay in enumerate(inf.get("layers", [])):
            for n, li in lay.items():
                curv.append({"method": method, "checkpoint": k, "layer": n, **li})
    top = pd.concat(tops, ignore_index=True)
    write_parquet(top, out_dir / "top.parquet")
    write_parquet(pd.concat(selfs, ignore_index=True), out_dir / "self.parquet")
    write_parquet(pd.concat(shares, ignore_index=True), out_dir / "layers.parquet")
    write_parquet(pd.DataFrame(curv, columns=["method", "checkpoint", "layer", "kind", "k_out", "k_in", "damping",
                                              "mean_eigenvalue", "max_eigenvalue"]), out_dir / "curvature.parquet")
    atomic_write_text(out_dir / "methods.json", json.dumps(info, indent=1, default=float))
    if st.source.kind == "lm" and cfg.per_token > 0:
        write_parquet(_per_token(st, ckpts, queries, top, self_mode), out_dir / "tokens.parquet")
    if dropped_train or dropped_query:
        import warnings

        warnings.warn(f"attribution: left out {len(dropped_train)} training and {len(dropped_query)} query "
                      "examples whose stored features are not finite (listed in the manifest)")
    return {"attribution": {"n_train": n_train, "n_query": M, "train_x_train": self_mode,
                            "nonfinite_train": sorted(int(i) for i in dropped_train),
                            "nonfinite_query": sorted(int(i) for i in dropped_query),
                            "methods": list(cfg.methods), "dense_scores": dense,
                            "features_from": str(st.features_from) if st.features_from else None}}


def _shapes(run: Path, layers: list[str]) -> dict[str, tuple[int, int]]:
    f = next(iter(sorted((run / "features").glob("*.safetensors"))), None)
    if f is None:
        raise ValueError(f"{run}: no feature shards")
    t = load_file(str(f))
    return {n: tuple(t[n].shape[1:]) for n in layers}


def _top_rows(method: str, topk: _TopK, q_ids: torch.Tensor, n_train: int, self_mode: bool) -> pd.DataFrame:
    rows = []
    for side, V, I in (("proponent", topk.hi_v, topk.hi_i), ("opponent", topk.lo_v, topk.lo_i)):
        for r in range(V.shape[0]):
            for j, q in enumerate(q_ids.tolist()):
                v = float(V[r, j])
                if not np.isfinite(v):
                    continue
                rows.append({"method": method, "query": q, "side": side, "rank": r + 1, "train": int(I[r, j]),
                             "score": v, "score_per_n": v / max(n_train, 1)})
    return pd.DataFrame(rows, columns=["method", "query", "side", "rank", "train", "score", "score_per_n"])


def _per_token(st: AttrState, ckpts, queries, top: pd.DataFrame, self_mode: bool) -> pd.DataFrame:
    """Scores of each token position of the top proponents (first non-TRAK method, final checkpoint).

    The training example's gradient is the sum over its positions t of g_t a_t^T, so its score against a query
    splits exactly over positions (kronfluence's per-token scores): score_t = sum_l <prep_q,l, g_t a_t^T>. Each
    proponent is re-run once (one captured forward/backward) for all the queries it serves."""
    from ...inputs.examples import example_step
    from ...runs.registry import Unit

    cols = ["method", "query", "rank", "train", "position", "token", "is_target", "score"]
    method = next((m for m in st.cfg.methods if m != "trak"), None)
    if method is None:
        return pd.DataFrame(columns=cols)
    sc = Scorer(method, damping=st.cfg.damping, damping_mode=st.cfg.damping_mode).fit(ckpts[-1:])
    prep = sc.prepare(queries[-1:])[0]
    load_checkpoint(st, len(ckpts) - 1)
    q_pos = {int(q): j for j, q in enumerate(queries[-1].ids.tolist())}
    sel = top[(top["method"] == method) & (top["side"] == "proponent") & (top["rank"] <= st.cfg.per_token)]
    tok = st.source.tokenizer
    rows = []
    for train, group in sel.groupby("train", sort=True):
        payload = st.train_payloads.get(int(train))
        if payload is None:
            continue
        qs = [q_pos[int(q)] for q in group["query"]]
        step = example_step(st.source, [Unit(0, payload)], st.modules, st.losses)
        score = None
        for n, g in step.grads.items():
            part = st.featurizer.token_scores(n, g, prep[n][qs].to(torch.float64))[:, 0].double()  # (Q, T)
            score = part if score is None else score + part
        enc = payload[1]
        ids = enc.input_ids
        names = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
        for qi, r in enumerate(group.itertuples()):
            s_q = (score[qi] * sc.weights[0]).tolist()
            for t in range(len(ids)):
                rows.append({"method": method, "query": int(r.query), "rank": int(r.rank), "train": int(train),
                             "position": t, "token": str(names[t]), "is_target": bool(enc.target_mask[t]),
                             "score": float(s_q[t])})
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["query", "rank", "position"], kind="stable").reset_index(drop=True)
