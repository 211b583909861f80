"""The curvature analysis' final tables: the per-scope shards merged in scope order, plus stability.

    RUN/eigenvalues.parquet       scope columns + n_params, which, rank, eigenvalue, residual, converged, n_products
    RUN/trace.parquet             scope columns + n_params, estimate, stderr, n_products, method, exact
    RUN/density.parquet           scope, grid, density            RUN/slq_nodes.parquet: scope, probe, node, weight
    RUN/spectral_criteria.parquet scope columns + lambda_max, lambda_min, ..., bulk_edge, n_outliers, ...
    RUN/stability.parquet         scope columns + lr, lambda_max, trace, lr_lmax, lr_trace, threshold, stable, ...

A scope that equals an earlier one (manifest ``curvature.scopes[i].twin_of``) gets that scope's rows under its
own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...curvature.lanczos import stability
from ...runs.store import read_manifest, write_parquet
from ...scopes import SCOPE_COLUMNS
from .compute import TABLES
from .report import render

__all__ = ["summarize", "CurvatureResult", "result"]


def summarize(run: Path | str, cfg=None, info=None) -> dict[str, pd.DataFrame]:
    """Merge the per-scope shards into RUN/{table}.parquet (scope order) and add stability.parquet with lr."""
    run = Path(run)
    man = read_manifest(run)
    scopes = (man.get("curvature") or {}).get("scopes") or []
    lr = cfg.lr if cfg is not None else (man.get("curvature") or {}).get("lr")
    files = sorted((run / "scopes").glob("*.parquet")) if (run / "scopes").exists() else []
    out: dict[str, pd.DataFrame] = {}
    order = {s["scope"]: i for i, s in enumerate(scopes)}
    for name in TABLES:
        parts = [pd.read_parquet(f) for f in files if f.name.split(".")[1] == name]
        if not parts:
            continue
        df = pd.concat(parts, ignore_index=True)
        twins = [s for s in scopes if s.get("twin_of") and (df["scope"] == s["twin_of"]).any()]
        for s in twins:
            copy = df[df["scope"] == s["twin_of"]].copy()
            for c in SCOPE_COLUMNS:
                if c in copy:
                    copy[c] = s[c]
            df = pd.concat([df, copy], ignore_index=True)
        if scopes:
            df = df[df["scope"].isin(order)]
            df = df.iloc[np.argsort(df["scope"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
        if "block" in df:
            df["block"] = df["block"].astype("int64")
        out[name] = df
        write_parquet(df, run / f"{name}.parquet")
    if lr is not None and "eigenvalues" in out and "trace" in out:
        ev = out["eigenvalues"]
        top = ev[(ev["which"] == "top") & (ev["rank"] == 1)][SCOPE_COLUMNS + ["eigenvalue"]]
        tr = out["trace"][SCOPE_COLUMNS + ["estimate"]]
        rows = []
        for r in top.merge(tr, on=SCOPE_COLUMNS, how="left").to_dict("records"):
            t = r["estimate"] if np.isfinite(r["estimate"]) else None
            st = stability(r["eigenvalue"], t, lr)
            rows.append({**{c: r[c] for c in SCOPE_COLUMNS}, "lr": float(lr), "lambda_max": float(r["eigenvalue"]),
                         "trace": float(r["estimate"]), "lr_lmax": st.lr_lmax,
                         "lr_trace": math.nan if st.lr_trace is None else st.lr_trace, "threshold": st.threshold,
                         "stable": bool(st.stable), "stable_by_trace": bool(st.stable_by_trace)})
        out["stability"] = pd.DataFrame(rows)
        write_parquet(out["stability"], run / "stability.parquet")
    return out


@dataclass
class CurvatureResult:
    """Where a finished curvature run lives and its tables."""

    path: Path
    tables: dict[str, pd.DataFrame]

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    @property
    def eigenvalues(self) -> pd.DataFrame:
        return self.tables["eigenvalues"]

    @property
    def trace(self) -> pd.DataFrame:
        return self.tables["trace"]

    def report(self) -> Path:
        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> CurvatureResult:
    run = Path(run)
    if tables is None:
        tables = {n: pd.read_parquet(run / f"{n}.parquet") for n in (*TABLES, "stability")
                  if (run / f"{n}.parquet").exists()}
    return CurvatureResult(run, tables)
