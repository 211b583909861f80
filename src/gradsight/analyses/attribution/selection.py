"""Target-aware selection of training examples from an attribution run (`gradsight select RUN --by ...`).

An attribution run (`gradsight attribute ... --queries VAL`) stores every training example's and every
validation (query) example's per-layer features phi (see `gradsight.attribution`). Selecting training data
FOR a target means ranking each training example i by its aggregated score against the target's validation
examples Q (the query rows whose group is in ``--target``; default all queries):

    influence   s_i = mean_{q in Q} score_ekfac(i, q)          (or kfac / raw: the first one configured)
    tracin      s_i = mean_{q in Q} score_tracin(i, q)         (or grad_dot when only that was configured)
    less        s_i = max_{t in target groups} mean_{q in Q_t} score_grad_cos(i, q)

LESS (Xia et al. 2024, princeton-nlp/LESS; anchors attribution.md §5): cosine similarity of the training and
validation gradients, learning-rate weighted over checkpoints, averaged over each subtask's validation
examples, then the MAX over subtasks (a training example useful to one subtask is kept even when it does
not help the others). Here a subtask is a query group. (LESS uses Adam-preconditioned LoRA training
gradients; these are the run's plain loss-gradient features.)

Every score is linear in the prepared query (`Scorer.prepare`: the damped inverse curvature applied to
phi_q for influence, phi_q / ||phi_q|| for grad_cos, phi_q for tracin), so

    mean_q score(i, q) = sum_k w_k < phi_i^k, mean_q prep_k(phi_q^k) >

(for grad_cos phi_i is normalised too) and the aggregate is ONE pass over the stored training features with
one column per subtask: no N_train x N_query matrix is needed, and methods the run did not score are fitted
from the stored features and covariances (as the run's `finish` does). Positive = the training example helps
the target (lowers its loss to first order); the default picks the highest scores.

``diverse``: among the ``pool`` best by score, greedy G-Vendi (`stats.diversity.greedy_select`) on the
whole-model features of the last checkpoint (`attribution.methods.ModelFeature`: the layers' features
concatenated, or projected to ``dim`` when larger).

Python:
    target_scores(run, by="less", target=None) -> DataFrame (example, idx, id, group, score, subtask)
    select(run, budget, by="less", target=None, diverse=False, ...) -> DataFrame (rank, example, id, group,
        score, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ...attribution.methods import Block, Checkpoint, ModelFeature, Scorer, check_method
from ...runs.store import read_examples, read_manifest
from ...stats.diversity import greedy_select
from .scoring import feature_blocks, set_rows, train_checkpoint, unit_keys

__all__ = ["BY", "target_scores", "select", "method_for"]

# --by -> the stored methods it may use, in order of preference (the first is fitted when none was configured)
BY = {"influence": ("ekfac", "kfac", "raw"), "tracin": ("tracin", "grad_dot"), "less": ("grad_cos",)}
NO_QUERIES = ("was run without queries (its training examples were their own queries), so there is no "
              "validation set to select for; run gradsight attribute with --queries VAL")


def method_for(by: str, configured: Sequence[str]) -> str:
    """The attribution method behind a --by choice: the first of BY[by] the run configured, else BY[by][0].

    Raises:
        ValueError: `by` is not influence, tracin or less.
    """
    if by not in BY:
        raise ValueError(f"--by must be one of {', '.join(BY)} for an attribution run; got {by!r}")
    return next((m for m in BY[by] if m in configured), BY[by][0])


@dataclass
class _Run:
    path: Path
    train_run: Path          # where the training features are (the run itself, or its --features-from run)
    cfg: dict
    layers: list[str]
    shapes: dict[str, tuple[int, int]]
    n_ckpt: int
    lrs: list[float]
    ex: pd.DataFrame         # this run's units (query rows; training rows unless features_from)
    tex: pd.DataFrame        # the training run's units
    out_kind: str


def _open(run: str | Path) -> _Run:
    run = Path(run)
    man = read_manifest(run)
    if man.get("analysis") != "attribute":
        raise ValueError(f"{run}: a {man.get('analysis')!r} run, not an attribution run (gradsight attribute)")
    if not man.get("finished"):
        raise ValueError(f"{run}: the attribution run is not finished; rerun gradsight attribute into it first")
    cfg = man.get("config", {})
    setup = man.get("attribution_setup", {})
    train_run = Path(cfg["features_from"]) if cfg.get("features_from") else run
    shard = next(iter(sorted((train_run / "features").glob("*.safetensors"))), None)
    if shard is None:
        raise FileNotFoundError(f"{train_run}: no training feature shards (features/*.safetensors)")
    t = load_file(str(shard))
    stored = [k for k in t if k != "__idx__"]
    order = [li["name"] for li in man.get("model", {}).get("layers", []) if li["name"] in stored]
    layers = order + [k for k in stored if k not in order]
    ex = read_examples(run)
    tex = read_examples(train_run) if train_run != run else ex
    # TRAK's margin convention is the only place `out` matters; kept identical to the run's finish
    out_kind = "margin" if man.get("identity", {}).get("loss") == "cross_entropy" else "loss"
    n_ckpt = int(setup.get("n_checkpoints", 1))
    lrs = [float(x) for x in setup.get("lrs", [1.0] * n_ckpt)]
    return _Run(run, train_run, cfg, layers, {n: tuple(t[n].shape[1:]) for n in layers}, n_ckpt, lrs, ex, tex,
                out_kind)


def _checkpoints(r: _Run, train_ok: set[int]) -> list[Checkpoint]:
    """The training side per checkpoint, as the run's finish builds it (features streamed from the shards)."""
    bs = int(r.cfg.get("block_size", 4096))
    out = []
    for k in range(r.n_ckpt):
        tr = set_rows(r.tex, k, "train")
        out.append(train_checkpoint(r.train_run, tr[tr["example"].isin(train_ok)], k, r.layers, r.shapes, r.lrs[k],
                                    bs))
    return out


def _query_blocks(r: _Run, examples: list[int]) -> list[Block]:
    """Per checkpoint, the features of the query examples `examples` (in that order)."""
    blocks = []
    for k in range(r.n_ckpt):
        q = set_rows(r.ex, k, "query")
        keys, losses = unit_keys(q[q["example"].isin(examples)])
        b = next(iter(feature_blocks(r.path, keys, losses, r.layers, 10**9)), None)
        if b is None or b.n != len(examples):
            raise ValueError(f"{r.path}: the features of {len(examples) - (0 if b is None else b.n)} target "
                             f"queries at checkpoint {k} are missing or non-finite")
        pos = {int(i): p for p, i in enumerate(b.ids.tolist())}
        o = torch.tensor([pos[e] for e in examples])
        blocks.append(Block({n: X[o] for n, X in b.feats.items()}, b.losses[o], b.ids[o]))
    return blocks


def _subtasks(r: _Run, by: str, target: Sequence[str] | None) -> tuple[list[int], list[str], list[np.ndarray]]:
    """(query examples usable at every checkpoint, subtask names, per subtask the positions of its queries):
    one subtask (all target queries pooled) for influence / tracin, one per target group for less."""
    q_all = r.ex[r.ex["set"] == "query"]
    if q_all.empty:
        raise ValueError(f"{r.path} {NO_QUERIES}")
    ok = None
    for k in range(r.n_ckpt):
        e = set(set_rows(r.ex, k, "query")["example"].astype(int))
        ok = e if ok is None else ok & e
    last = set_rows(r.ex, r.n_ckpt - 1, "query")
    last = last[last["example"].isin(ok or set())]
    groups = last["group"].astype(str)
    known = sorted(set(q_all["group"].astype(str)))
    if target:
        unknown = sorted(set(target) - set(known))
        if unknown:
            raise ValueError(f"--target: unknown query group(s) {', '.join(map(repr, unknown))}; the run's queries "
                             f"have {', '.join(map(repr, known))}")
        last, groups = last[groups.isin(target).to_numpy()], groups[groups.isin(target)]
        names = [g for g in dict.fromkeys(target) if g in set(groups)]
    else:
        names = sorted(set(groups))
    if last.empty:
        raise ValueError(f"{r.path}: no usable query in the target group(s) {', '.join(target or known)} (every "
                         "one was skipped)")
    examples = last["example"].astype(int).tolist()
    g = groups.to_numpy()
    if by != "less":
        return examples, ["+".join(names)], [np.arange(len(examples))]
    return examples, names, [np.flatnonzero(g == n) for n in names]


def _aggregate(prep: list, parts: list[np.ndarray]) -> list:
    """Per checkpoint, the prepared queries averaged within each subtask: {layer: (S, k_out, k_in)}."""
    return [None if p is None else
            {n: torch.stack([P[torch.as_tensor(ix)].mean(0) for ix in parts]) for n, P in p.items()}
            for p in prep]


def target_scores(run: str | Path, by: str = "less", target: Sequence[str] | None = None,
                  method: str | None = None, groups: Sequence[str] | None = None) -> pd.DataFrame:
    """Every training example's aggregated score for the target (see the module docstring).

    Args:
        run: a finished attribution run with queries (the validation set).
        by: influence, tracin or less.
        target: query groups to select for (default: every query group).
        method: the attribution method to use instead of BY[by]'s default (fitted if the run lacks it).
        groups: only training examples of these groups (default: all).

    Returns:
        DataFrame (example, idx, id, group, score, subtask, method) in example order: `idx` the unit key at the
        last checkpoint, `subtask` the target group(s) the score comes from (less: the argmax group).
    """
    r = _open(run)
    default = method_for(by, list(r.cfg.get("methods", ())))  # validates `by`
    method = check_method(method) if method else default
    if method == "trak":
        raise ValueError("method 'trak' is not supported for selection (its Q weighting is not linear in the "
                         "queries); use ekfac, kfac, raw, tracin, grad_dot or grad_cos")
    examples, names, parts = _subtasks(r, by, target)
    train = set_rows(r.tex, r.n_ckpt - 1, "train")
    if groups:
        unknown = sorted(set(groups) - set(train["group"].astype(str)))
        if unknown:
            raise ValueError(f"--labels: unknown training group(s) {', '.join(map(repr, unknown))}; the run has "
                             f"{', '.join(map(repr, sorted(set(train['group'].astype(str)))))}")
        train = train[train["group"].astype(str).isin(groups)]
    if train.empty:
        raise ValueError(f"{r.path}: no usable training example to select from")
    ckpts = _checkpoints(r, set(train["example"].astype(int)))
    sc = Scorer(method, damping=r.cfg.get("damping"), damping_mode=r.cfg.get("damping_mode", "relative"),
                trak_dim=int(r.cfg.get("trak_dim", 2048)), out=r.out_kind,
                seed=int(r.cfg.get("run", {}).get("seed", 0))).fit(ckpts)
    agg = _aggregate(sc.prepare(_query_blocks(r, examples)), parts)
    total: dict[int, torch.Tensor] = {}
    for k, ck in enumerate(ckpts):
        for b in ck.blocks():
            S = sc.score(agg, k, b)  # (n, subtasks)
            for i, row in zip(b.ids.tolist(), S):
                total[i] = total[i] + row if i in total else row.clone()
    ids = sorted(total)
    M = torch.stack([total[i] for i in ids]).numpy() if ids else np.zeros((0, len(names)))
    best = M.argmax(1) if len(ids) else np.zeros(0, dtype=np.int64)
    score = M[np.arange(len(ids)), best] if len(ids) else np.zeros(0)
    tr = train.set_index(train["example"].astype(int))
    return pd.DataFrame({"example": np.asarray(ids, dtype=np.int64),
                         "idx": tr.loc[ids, "idx"].to_numpy(dtype=np.int64),
                         "id": tr.loc[ids, "id"].astype(str).to_numpy(),
                         "group": tr.loc[ids, "group"].astype(str).to_numpy(),
                         "score": score.astype(np.float64),
                         "subtask": np.asarray(names, dtype=object)[best] if len(ids) else [],
                         "method": method})


def _model_features(r: _Run, cand: pd.DataFrame, dim: int) -> torch.Tensor:
    """(n, D) whole-model features of the candidates' last-checkpoint training features, in cand's order."""
    k = r.n_ckpt - 1
    tr = set_rows(r.tex, k, "train")
    tr = tr[tr["example"].isin(set(cand["example"].astype(int)))]
    keys, losses = unit_keys(tr)
    mf = ModelFeature(r.shapes, dim, seed=int(r.cfg.get("run", {}).get("seed", 0)))
    rows: dict[int, torch.Tensor] = {}
    for b in feature_blocks(r.train_run, keys, losses, r.layers, 4096):
        for i, f in zip(b.ids.tolist(), mf(b.feats)):
            rows[int(i)] = f
    missing = [int(e) for e in cand["example"] if int(e) not in rows]
    if missing:
        raise ValueError(f"{r.train_run}: no finite features for training examples {missing[:5]}")
    return torch.stack([rows[int(e)] for e in cand["example"]])


def select(run: str | Path, budget: int, *, by: str = "less", target: Sequence[str] | None = None,
           diverse: bool = False, pool: int | None = None, ascending: bool = False, method: str | None = None,
           groups: Sequence[str] | None = None, q: float = 1.0, dim: int = 512) -> pd.DataFrame:
    """Pick `budget` training examples of an attribution run for a target (see the module docstring).

    Args:
        run: a finished attribution run with queries.
        budget: number of training examples, 1 <= budget <= the number of candidates.
        by: influence, tracin or less.
        target: query groups to select for (default: all).
        diverse: greedy G-Vendi among the `pool` best by score instead of the top scores.
        pool: candidate pool for `diverse` (default min(n, 4 * budget)).
        ascending: pick the lowest scores (the most harmful to the target).
        method: override the attribution method behind `by`.
        groups: only training examples of these groups.
        q: Vendi order for `diverse`.
        dim: whole-model feature size for `diverse`.

    Returns:
        DataFrame (rank, example, idx, id, group, score, subtask, method, by) in pick order.
    """
    if isinstance(budget, bool) or int(budget) != budget:
        raise ValueError(f"--budget must be an integer, got {budget!r}")
    sc = target_scores(run, by, target, method, groups)
    sc = sc[np.isfinite(sc["score"].to_numpy())]
    if budget < 1 or budget > len(sc):
        raise ValueError(f"--budget must be between 1 and the {len(sc)} candidate training examples; got {budget}")
    sc = sc.sort_values(["score", "example"], ascending=[ascending, True], kind="stable").reset_index(drop=True)
    if diverse:
        pool = min(len(sc), pool or 4 * budget)
        if pool < budget:
            raise ValueError(f"--pool ({pool}) must be at least the budget ({budget})")
        cand = sc.iloc[:pool]
        F = _model_features(_open(run), cand, dim)
        chosen = cand.iloc[greedy_select(F, budget, q=q)]
    else:
        chosen = sc.iloc[:budget]
    out = chosen.copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["by"] = by
    return out.reset_index(drop=True)
