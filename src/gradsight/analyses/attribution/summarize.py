"""The attribution run's final tables, from its shards and the scoring files written by `finish`.

    RUN/examples.parquet        every unit: idx, set (train / query), example, checkpoint, id, group, status, ...
    RUN/top.parquet             per method and query: its top proponents and opponents with their text
                                (method, query, side, rank, train, score, score_per_n, z, same_group, texts)
    RUN/self_influence.parquet  per method and training example: self-influence, robust z, outlier flag
    RUN/precision.parquet       per method: same-group precision@k of the proponents (when groups match)
    RUN/score_stats.parquet     per method and query: distribution of its scores (from the dense matrix)
    RUN/layer_share.parquet     per method and layer: mean share of |score| (over queries)
    RUN/curvature.parquet       per method, checkpoint and layer: curvature kind, damping used, eigenvalues

Signs: every score is positive when training on the example HELPS the query (lowers its loss or raises its
margin); `score_per_n` = score / N_train is, for influence methods (grad_dot, tracin, raw, kfac, ekfac), the
first-order increase of the query's loss (nats) if that one example were removed from the N training examples;
TRAK's score is already on that scale (its Phi'Phi is a sum over examples: score_per_n = score, the change of
the query's margin); a cosine (grad_cos) has no such reading (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...runs.store import merge_shards, read_manifest, write_parquet

__all__ = ["summarize", "result", "AttributionResult", "read_scores"]

K_PRECISION = (1, 5, 10)


def _robust_z(x: np.ndarray) -> np.ndarray:
    med = np.nanmedian(x)
    mad = np.nanmedian(np.abs(x - med)) * 1.4826
    return (x - med) / (mad if mad > 0 else (np.nanstd(x) or 1.0))


def read_scores(run: Path | str, method: str):
    """(scores (N_train, N_query) float32 ndarray, train example ids, query example ids) of a method, when the
    run kept its dense matrix (else None)."""
    from safetensors.numpy import load_file

    p = Path(run) / "scores" / f"{method}.safetensors"
    if not p.exists():
        return None
    t = load_file(str(p))
    return t["scores"], t["train"], t["query"]


def summarize(run: Path | str, cfg=None, info=None) -> dict[str, pd.DataFrame]:
    run = Path(run)
    ex = merge_shards(run, "examples")
    man = read_manifest(run)
    a = man.get("attribution") or {}
    d = run / "attribution"
    if not (d / "top.parquet").exists():
        return {"examples": ex}
    self_mode = bool(a.get("train_x_train"))
    k_last = int(ex["checkpoint"].max()) if len(ex) else 0
    last = ex[ex["checkpoint"] == k_last]
    from_run = a.get("features_from")
    tex = pd.read_parquet(Path(from_run) / "examples.parquet") if from_run else last
    tex = tex[(tex["set"] == "train") & (tex["checkpoint"] == tex["checkpoint"].max())].set_index("example")
    qex = tex if self_mode else last[last["set"] == "query"].set_index("example")
    top = pd.read_parquet(d / "top.parquet")
    cols = ["id", "group", "prompt", "response"]
    top = top.join(qex[cols].add_prefix("query_"), on="query").join(tex[cols].add_prefix("train_"), on="train")
    # score / N is the removal effect for influence methods (curvature of the MEAN loss); TRAK's Phi'Phi is a
    # SUM over the N examples, so its score is already on that scale; a cosine has no such reading
    top.loc[top["method"] == "trak", "score_per_n"] = top.loc[top["method"] == "trak", "score"]
    top.loc[top["method"] == "grad_cos", "score_per_n"] = np.nan
    top["same_group"] = top["query_group"].astype(str) == top["train_group"].astype(str)
    stats, shares = [], []
    for m in a.get("methods", []):
        s = read_scores(run, m)
        if s is None:
            continue
        S, tr, q = s
        sd = S.std(0)
        for j, qq in enumerate(q.tolist()):
            col = S[:, j].astype(np.float64)
            if self_mode:
                col = np.delete(col, np.flatnonzero(tr == qq))
            stats.append({"method": m, "query": int(qq), "mean": float(col.mean()), "std": float(col.std()),
                          "q05": float(np.quantile(col, 0.05)), "median": float(np.median(col)),
                          "q95": float(np.quantile(col, 0.95)), "frac_positive": float((col > 0).mean())})
        zsd = pd.Series(sd, index=q.tolist())
        sel = top["method"] == m
        top.loc[sel, "z"] = top.loc[sel, "score"] / top.loc[sel, "query"].map(zsd).replace(0, np.nan)
    if "z" not in top:
        top["z"] = np.nan
    write_parquet(top, run / "top.parquet")
    score_stats = pd.DataFrame(stats, columns=["method", "query", "mean", "std", "q05", "median", "q95",
                                               "frac_positive"])
    write_parquet(score_stats, run / "score_stats.parquet")
    si = pd.read_parquet(d / "self.parquet")
    si = si.join(tex[cols], on="example")
    si["z"] = np.nan
    for m, g in si.groupby("method"):
        x = g["self_influence"].to_numpy(dtype=float)
        if np.ptp(x) <= 1e-6 * max(np.abs(x).max(), 1e-300):  # constant (grad_cos: 1 x sum eta): no outliers
            continue
        si.loc[g.index, "z"] = _robust_z(x)
    si["outlier"] = si["z"] > 3.5
    write_parquet(si, run / "self_influence.parquet")
    prec = []
    groups_known = set(tex["group"].astype(str))
    for m, g in top[top["side"] == "proponent"].groupby("method"):
        g = g[g["query_group"].astype(str).isin(groups_known)]
        if g.empty:
            continue
        for k in [k for k in K_PRECISION if k <= int(g["rank"].max())]:  # beyond the kept ranks: not measured
            h = g[g["rank"] <= k].groupby("query")["same_group"].mean()
            prec.append({"method": m, "k": k, "precision": float(h.mean()), "n_queries": int(h.size)})
    precision = pd.DataFrame(prec, columns=["method", "k", "precision", "n_queries"])
    write_parquet(precision, run / "precision.parquet")
    ls = pd.read_parquet(d / "layers.parquet")
    layer_share = (ls.groupby(["method", "layer"], sort=False)["abs_share"].mean().reset_index())
    write_parquet(layer_share, run / "layer_share.parquet")
    curv = pd.read_parquet(d / "curvature.parquet")
    write_parquet(curv, run / "curvature.parquet")
    out = {"examples": ex, "top": top, "self_influence": si, "precision": precision, "score_stats": score_stats,
           "layer_share": layer_share, "curvature": curv}
    if (d / "tokens.parquet").exists():
        tokens = pd.read_parquet(d / "tokens.parquet")
        write_parquet(tokens, run / "tokens.parquet")
        out["tokens"] = tokens
    return out


@dataclass
class AttributionResult:
    """A finished attribution run: its tables, and the dense score matrices when kept."""

    path: Path
    tables: dict

    @property
    def top(self) -> pd.DataFrame:
        return self.tables["top"]

    @property
    def examples(self) -> pd.DataFrame:
        return self.tables["examples"]

    @property
    def self_influence(self) -> pd.DataFrame:
        return self.tables["self_influence"]

    @property
    def precision(self) -> pd.DataFrame:
        return self.tables["precision"]

    def scores(self, method: str):
        """(N_train, N_query) ndarray of one method (rows: training examples, columns: queries), or None."""
        s = read_scores(self.path, method)
        return None if s is None else s[0]

    def report(self) -> Path:
        return self.path / "report.html"


def result(run: Path | str, tables: dict | None = None) -> AttributionResult:
    run = Path(run)
    if tables is None:
        tables = {p.stem: pd.read_parquet(p) for p in sorted(run.glob("*.parquet"))}
    return AttributionResult(run, tables)
