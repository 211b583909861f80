"""The geometry analysis' tables, computed from the stored features only.

Per scope (the whole model, each kind, each block, each layer) the Gram matrix K = F F^T of the units gives
label x label mean-gradient cosines, pairwise cosine distributions and conflict rates, coherence, loss-term
alignment, gradient entanglement of preference pairs and PSR / NSR of rollouts; plus G-Vendi per label
(streamed from the r_model x r_model covariance), the gradient noise scale and GSNR per layer, and a per-unit
score table. A resumed or distributed run gives the tables of one uninterrupted process.

Distributed: every rank computes the row block of its share of units against all units; the n x n Gram of
each layer is the all_reduce (sum) of the blocks; the G-Vendi covariances are accumulated per rank over a
share of the shards and all_reduced. Exact mode reads the n x n Grams written by the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ...runs import distributed as dist_
from ...runs.store import merge_shards, read_examples, read_features, read_layer_stats, read_manifest, write_parquet
from ...scopes import SCOPE_COLUMNS, Scope, scopes_of
from ...stats import cosines as geo
from ...stats.diversity import GVendiAccumulator, marginal_contributions
from ...stats.noise import noise_scale_ci, per_layer_noise
from .compute import MODEL_KEY, unit_labels
from .config import GeometryConfig
from .report import render

__all__ = ["summarize", "scope_tables", "model_features", "GeometryResult", "result", "MAX_LOO", "TABLES"]

MAX_LOO = 3000  # leave-one-out G-Vendi contributions above this many units would take minutes
TABLES = ("group_cosines", "pairs", "coherence", "terms", "entanglement", "entanglement_summary", "psr_nsr",
          "diversity", "noise", "scores")


def _layer_grams(run: Path, layer_names: list[str], idx: np.ndarray, info) -> Callable[[str], np.ndarray]:
    """A function layer -> (n, n) float64 Gram over the units `idx` (exact file or projected features)."""
    exact_file = run / "tensors" / "exact_gram.safetensors"
    if exact_file.exists():
        from safetensors.torch import load_file

        g = load_file(str(exact_file))
        pos = {int(i): p for p, i in enumerate(g["__idx__"].tolist())}
        sel = torch.tensor([pos[int(i)] for i in idx], dtype=torch.int64)
        return lambda name: g[name][sel][:, sel].double().numpy()
    fidx, feats = read_features(run, layer_names)
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    missing = [int(i) for i in idx if int(i) not in pos]
    if missing:
        raise RuntimeError(f"{run}: features missing for {len(missing)} finished units (e.g. {missing[:5]}); "
                           "the run directory is damaged; rerun into a new directory")
    sel = torch.tensor([pos[int(i)] for i in idx], dtype=torch.int64)
    n = len(idx)
    mine = torch.arange(info.rank, n, info.world_size)

    def gram(name: str) -> np.ndarray:
        F = feats[name][sel].double()
        if info.world_size == 1:
            return (F @ F.T).numpy()
        K = torch.zeros(n, n, dtype=torch.float64)
        K[mine] = F[mine] @ F.T
        torch.distributed.all_reduce(K)
        return K.numpy()

    return gram


def _with_scope(df: pd.DataFrame, scope) -> pd.DataFrame:
    row = scope.row() if isinstance(scope, Scope) else dict(zip(SCOPE_COLUMNS, scope[:4]))
    df = df.copy()
    for i, col in enumerate(SCOPE_COLUMNS):
        df.insert(i, col, row[col])
    df["block"] = df["block"].astype("int64")
    return df


def scope_tables(K: np.ndarray, ex: pd.DataFrame, scope, cfg: GeometryConfig, n_boot: int) -> dict[str, list]:
    """Every Gram-based table of one scope (a Scope, or the tuple (scope, scope_type, kind, block))."""
    out: dict[str, list] = {}
    name = scope.name if isinstance(scope, Scope) else scope[0]
    labels = ex["label"].tolist()
    t = geo.geometry_table({name: K}, labels, n_boot=n_boot, seed=cfg.seed)
    for table in ("group_cosines", "pairs", "coherence"):
        out.setdefault(table, []).append(_with_scope(t[table].drop(columns="scope"), scope))
    multi = ex["role"].isin(["pair", "term"]).to_numpy()
    if multi.any():
        p = np.flatnonzero(multi)
        ta = geo.term_alignment(K[np.ix_(p, p)], ex["term"].iloc[p].tolist(), ex["record_idx"].iloc[p].tolist(),
                                n_boot=n_boot, seed=cfg.seed)
        out.setdefault("terms", []).append(_with_scope(ta, scope))
    pairs = _pair_positions(ex)
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        e = geo.entanglement(K[a, a], K[b, b], K[a, b])
        e.insert(0, "record_idx", ex["record_idx"].iloc[a].to_numpy())
        e.insert(1, "id", ex["id"].iloc[a].astype(str).to_numpy())
        e.insert(2, "group", ex["group"].iloc[a].astype(str).to_numpy())
        out.setdefault("entanglement", []).append(_with_scope(e, scope))
        s = geo.entanglement_summary(e, n_boot=n_boot, seed=cfg.seed)
        out.setdefault("entanglement_summary", []).append(_with_scope(pd.DataFrame([s]), scope))
    roll = np.flatnonzero((ex["role"] == "rollout").to_numpy())
    if roll.size:
        rows = []
        groups = ex["group"].iloc[roll].astype(str).to_numpy()
        rewards = ex["reward"].iloc[roll].to_numpy(dtype=np.float64)
        for g in ["__all__"] + sorted(set(groups)):
            sel = roll if g == "__all__" else roll[groups == g]
            r = rewards if g == "__all__" else rewards[groups == g]
            rows.append({"group": g, **geo.psr_nsr(K[np.ix_(sel, sel)], r, cfg.threshold, cfg.lam)})
        out.setdefault("psr_nsr", []).append(_with_scope(pd.DataFrame(rows), scope))
    return out


def _pair_positions(ex: pd.DataFrame) -> np.ndarray:
    """(P, 2) positions of (chosen, rejected) units of the pairs with both sides ok."""
    sub = ex[ex["role"] == "pair"]
    pos = {(int(r), str(t)): p for p, r, t in zip(sub.index, sub["record_idx"], sub["term"])}
    out = [(pos[(r, "chosen")], pos[(r, "rejected")]) for r in sorted({k[0] for k in pos})
           if (r, "chosen") in pos and (r, "rejected") in pos]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def summarize(run: Path | str, cfg: GeometryConfig | None = None, info=None) -> dict[str, pd.DataFrame] | None:
    """(Re)compute every geometry table of a run from its stored features; rank 0 writes and returns them.

    Under torchrun every rank must call this (the Gram blocks are reduced across ranks)."""
    run = Path(run)
    info = info or dist_.DistInfo()
    man = read_manifest(run)
    if cfg is None:
        cfg = GeometryConfig.from_dict(man["config"])
    if info.is_main:
        merge_shards(run, "examples")
    dist_.barrier(info)
    layers = man["model"]["layers"]
    names = [li["name"] for li in layers]
    ex_all = read_examples(run)
    ex_all["label"] = unit_labels(ex_all, cfg.threshold)
    ex = ex_all[ex_all["status"] == "ok"].reset_index(drop=True)
    n_boot = cfg.summary.n_boot
    idx = ex["idx"].to_numpy(dtype=np.int64)
    gram = _layer_grams(run, names, idx, info)
    parts: dict[str, list] = {}
    scope_K: dict[str, np.ndarray] = {}
    scopes = scopes_of(layers, ("model", "kind", "block", "layer"))
    by_layer = {s.name: s for s in scopes if s.scope_type == "layer"}
    n = len(idx)
    for s in scopes:  # sums over layers for the model / kind / block scopes
        if s.scope_type != "layer":
            scope_K[s.name] = np.zeros((n, n))
    for name in names:
        K = gram(name)
        li = next(x for x in layers if x["name"] == name)
        scope_K.setdefault("model", np.zeros((n, n)))
        scope_K["model"] += K
        scope_K[f"kind:{li['kind']}"] += K
        if int(li["block"]) >= 0:
            scope_K[f"block:{int(li['block']):02d}"] += K
        if info.is_main and n:
            for k, v in scope_tables(K, ex, by_layer[name], cfg, n_boot).items():
                parts.setdefault(k, []).extend(v)
    if not info.is_main:
        _diversity(run, ex, cfg, info)  # takes part in the all_reduce
        return None
    if n:
        for s in scopes:
            if s.scope_type != "layer":
                for k, v in scope_tables(scope_K[s.name], ex, s, cfg, n_boot).items():
                    parts.setdefault(k, []).extend(v)
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    order = {s.name: i for i, s in enumerate(scopes)}
    for k, df in tables.items():  # model, kinds, blocks, layers
        tables[k] = df.sort_values("scope", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    tables["diversity"], model_F = _diversity(run, ex, cfg, info)
    tables["noise"] = _noise(run, ex, names, layers, n_boot, cfg.seed)
    tables["scores"] = _scores(run, ex, cfg, scope_K.get("model"), model_F)
    for name, df in tables.items():
        write_parquet(df, run / f"{name}.parquet")
    write_parquet(ex_all, run / "examples.parquet")
    return tables


def _diversity(run: Path, ex: pd.DataFrame, cfg: GeometryConfig, info):
    """G-Vendi per label and over all units, streamed shard by shard; ranks split the shards and all_reduce
    the r_model x r_model covariances."""
    from safetensors.torch import load_file

    labels = sorted(set(ex["label"]))
    label_of = dict(zip(ex["idx"].astype(int), ex["label"]))
    accs = {k: GVendiAccumulator(cfg.r_model) for k in ["__all__"] + labels}
    files = sorted((run / "features").glob("r*-*.safetensors"))
    model_rows: dict[int, torch.Tensor] = {}
    for f in files[info.rank::info.world_size]:
        part = load_file(str(f))
        if MODEL_KEY not in part:
            continue
        for i, row in zip(part["__idx__"].tolist(), part[MODEL_KEY].double()):
            if int(i) in label_of:
                model_rows[int(i)] = row
    ids = sorted(model_rows)
    if ids:
        F = torch.stack([model_rows[i] for i in ids])
        lab = np.asarray([label_of[i] for i in ids], dtype=object)
        accs["__all__"].update(F)
        for k in labels:
            m = torch.from_numpy(lab == k)
            if m.any():
                accs[k].update(F[m])
    if info.world_size > 1:
        for k, a in accs.items():
            st = a.state_dict()
            for t in st.values():
                torch.distributed.all_reduce(t)
            accs[k] = GVendiAccumulator.from_state(st)
    if not info.is_main:
        return None
    rows = [{"label": k, "n": a.n, "n_skipped": a.n_skipped, "g_vendi": a.score(cfg.q), "q": cfg.q}
            for k, a in accs.items()]
    return pd.DataFrame(rows), model_features(run, ex)


def model_features(run: Path, ex: pd.DataFrame) -> torch.Tensor | None:
    """The whole-model features (n, r_model) float64 of the units in `ex`, in its row order."""
    fidx, feats = read_features(run, [MODEL_KEY])
    if MODEL_KEY not in feats:
        return None
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    return feats[MODEL_KEY][[pos[int(i)] for i in ex["idx"]]].double()


def _noise(run: Path, ex: pd.DataFrame, names: list[str], layers: list[dict], n_boot: int, seed: int) -> pd.DataFrame:
    """B_simple and GSNR per layer and total, per label and over all plain units (all units if none)."""
    fidx, feats = read_features(run, names)
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    info = {li["name"]: li for li in layers}
    plain = ex[ex["role"] == "loss"]
    sets = [("__all__", plain if len(plain) else ex)] + [(k, ex[ex["label"] == k]) for k in sorted(set(ex["label"]))]
    rows = []
    for label, sub in sets:
        if len(sub) < 2:
            rows.append(pd.DataFrame([{"label": label, "layer": "total", "n": len(sub),
                                       "note": f"{len(sub)} unit(s): the noise scale needs at least 2"}]))
            continue
        sel = [pos[int(i)] for i in sub["idx"]]
        F = {name: feats[name][sel].double() for name in names}
        df = per_layer_noise(F)
        ci = noise_scale_ci(torch.cat([F[nm] for nm in names], dim=1), n_boot=n_boot, seed=seed)
        df["b_ci_lo"] = np.where(df["layer"] == "total", ci["lo"], np.nan)
        df["b_ci_hi"] = np.where(df["layer"] == "total", ci["hi"], np.nan)
        df.insert(0, "label", label)
        df["note"] = ""
        rows.append(df)
    out = pd.concat(rows, ignore_index=True)
    out["kind"] = [info[x]["kind"] if x in info else "" for x in out["layer"]]
    out["block"] = np.asarray([int(info[x]["block"]) if x in info else -1 for x in out["layer"]], dtype=np.int64)
    return out


def _scores(run: Path, ex: pd.DataFrame, cfg: GeometryConfig, K: np.ndarray | None,
            model_F: torch.Tensor | None) -> pd.DataFrame:
    """Per-unit scores: exact gradient norm, mean effective rank over layers, cosine to the target label's
    mean gradient (whole model), leave-one-out G-Vendi contribution."""
    df = ex[["idx", "id", "group", "term", "label"]].copy()
    df["grad_norm"] = np.sqrt(ex["sq_norm"].to_numpy(dtype=np.float64))
    ls = read_layer_stats(run)
    if len(ls):
        er = ls[ls["metric"] == "erank"].groupby("idx")["value"].mean()
        df["erank"] = df["idx"].map(er).astype(float)
    else:
        df["erank"] = np.nan
    labels = sorted(set(ex["label"]))
    target = cfg.target if cfg.target is not None else (labels[0] if labels else "")
    if target and target not in labels:
        raise ValueError(f"target label {target!r} is not among the run's labels: {', '.join(labels)}")
    df["target"] = target
    df["cos_target"] = np.nan
    if K is not None and len(df):
        T = np.flatnonzero(ex["label"].to_numpy() == target)
        d = np.diag(K)
        mt = K[np.ix_(T, T)].mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            c = K[:, T].mean(axis=1) / np.sqrt(d * mt)
        df["cos_target"] = np.where((d > 0) & (mt > 0), np.clip(c, -1, 1), np.nan)
    df["diversity"] = np.nan
    if model_F is not None and 1 < len(df) <= MAX_LOO:
        df["diversity"] = marginal_contributions(model_F, q=cfg.q)
    return df


@dataclass
class GeometryResult:
    """A geometry run: its path, one row per unit, and its tables (see `TABLES`)."""

    path: Path
    examples: pd.DataFrame
    tables: dict[str, pd.DataFrame] | None

    def report(self) -> Path:
        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> GeometryResult:
    """The GeometryResult of a run directory (tables read from it unless given)."""
    run = Path(run)
    if tables is None:
        tables = {t: pd.read_parquet(run / f"{t}.parquet") for t in TABLES if (run / f"{t}.parquet").exists()}
    return GeometryResult(run, read_examples(run), tables)
