"""The `curvature` and `landscape` analyses end to end: data -> model -> scopes -> curvature tables -> report.

Curvature (`run_curvature` for Hugging Face causal LMs, `curvature_of` for any PyTorch module):

    for every SCOPE (a parameter block: the whole selection, each layer, each kind, each block)
        build the operator (Hessian, GGN or Fisher) of the mean loss over the fixed batches,
        top_k / bottom_k eigenvalues by Lanczos (one Krylov space for both ends),
        the trace by Hutch++ with a product budget (estimate and standard error),
        an SLQ spectral density for the scope types in `density_scopes`,
        spectral criteria (|lambda_min / lambda_max|, negative / positive mass, bulk edge, outliers),
    then stability numbers lr * lambda_max and lr * trace against 2 when a learning rate is given.

Run directory (atomic writes, resumable):

    RUN/manifest.json                      identity (config guard), operator info, scopes
    RUN/scopes/{i:04d}.{table}.parquet     per finished scope; `.eigenvalues` is written LAST and marks the
                                           scope done (a rerun skips it)
    RUN/eigenvalues.parquet                scope, scope_type, kind, block, n_params, which, rank, eigenvalue,
                                           residual, converged, n_products
    RUN/trace.parquet                      scope..., n_params, estimate, stderr, n_products, method, exact
                                           (scope types in `trace_scopes` only)
    RUN/density.parquet                    scope, grid, density           (density scopes only)
    RUN/slq_nodes.parquet                  scope, probe, node, weight     (density scopes only)
    RUN/spectral_criteria.parquet          scope..., lambda_max, lambda_min, abs_min_max_ratio, neg_mass,
                                           pos_mass, neg_pos_mass_ratio, neg_pos_curvature_ratio, bulk_ref,
                                           bulk_edge, n_outliers, outliers_saturated, gap_margin
    RUN/stability.parquet                  scope..., lr, lambda_max, trace, lr_lmax, lr_trace, threshold,
                                           stable, stable_by_trace   (only with lr)
    RUN/tensors/eigenvectors.safetensors   the model scope's top-2 eigenvectors, keys "v{i}::{param name}",
                                           metadata: eigenvalues, names (for Hessian-axis landscapes)

Bulk edge and outliers (a heuristic, stated in the report; `curvature.density.bulk_outliers`): the bulk
reference is the median of the SLQ spectral measure (probe-averaged); the outliers are the top eigenvalues
above the largest log-gap of their distance to it, and the bulk edge is the largest eigenvalue below that gap.
With top_k eigenvalues the count is at most top_k - 1 (`outliers_saturated` flags that case). Without a
density all of these are NaN / -1.

Distributed: under torchrun every rank holds every rank-th example (fixed order) and every product
all-reduces, so all ranks see the operator of the whole data set; the random probes are seeded on the CPU,
so eigenvalues and traces equal a single process's to rounding. Rank 0 writes.

Landscape (`run_landscape`): the same objective along filter-normalised random directions, the top-2
eigenvectors of a curvature run (`from_curvature`), or towards a second model (interpolate); writes
RUN/landscape.parquet (alpha, beta, loss, finite; beta NaN for 1-D) and the meta in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import types
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import CurvatureConfig, LandscapeConfig, config_hash
from ..runs import distributed as dist_
from ..runs.store import RunStore, read_manifest, versions, write_parquet, write_safetensors
from .criteria import bulk_outliers
from .density import slq
from .lanczos import lanczos, stability
from .operators import (FisherOperator, GGNOperator, HessianOperator, causal_lm_forward, default_forward,
                        resolve_loss)
from .trace import hutchpp

__all__ = ["Scope", "CurvatureResult", "run_curvature", "curvature_of", "lm_scopes", "module_scopes",
           "summarize_curvature", "load_eigenvectors", "run_landscape", "landscape_of", "LandscapeRunResult", "TABLES",
           "SCOPE_COLUMNS"]

SCOPE_COLUMNS = ["scope", "scope_type", "kind", "block"]
TABLES = ("eigenvalues", "trace", "density", "slq_nodes", "spectral_criteria")
EIGVEC_FILE = "eigenvectors.safetensors"
BULK_QUANTILE = 0.5  # bulk reference of the outlier rule: the median of the SLQ measure
DENSITY_BINS = 1000
OBJECTIVE = "token-mean cross-entropy over all supervised tokens of the data set (pooled across examples)"


@dataclass(frozen=True)
class Scope:
    """A parameter block analysed as one curvature matrix."""

    name: str
    scope_type: str  # model, layer, kind, block
    kind: str
    block: int
    params: tuple[str, ...]

    def row(self) -> dict:
        return {"scope": self.name, "scope_type": self.scope_type, "kind": self.kind, "block": int(self.block)}


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
        from ..report import render_html

        return render_html(self.path)


# ----------------------------------------------------------------------------------------------------------
# scopes


_ORDER = {"model": 0, "block": 1, "kind": 2, "layer": 3}


def lm_scopes(layers, per: Sequence[str], param_names: Sequence[str]) -> list[Scope]:
    """Scopes of a layer selection: model (every selected layer's weight), each block, kind and layer.

    Args:
        layers: LayerInfo objects (or dicts with name, kind, block).
        per: scope types wanted, any of model, layer, kind, block.
        param_names: the model's parameter names (a layer without a `weight` parameter is refused).
    """
    have = set(param_names)
    info = [li if isinstance(li, dict) else li.to_dict() for li in layers]
    weight = {}
    for li in info:
        w = f"{li['name']}.weight"
        if w not in have:
            from ..inputs.models import ModelError

            raise ModelError(f"layer {li['name']!r} has no trainable weight parameter; exclude it (--exclude)")
        weight[li["name"]] = w
    out: list[Scope] = []
    if "model" in per:
        out.append(Scope("model", "model", "", -1, tuple(weight[li["name"]] for li in info)))
    if "block" in per:
        for b in sorted({int(li["block"]) for li in info if int(li["block"]) >= 0}):
            out.append(Scope(f"block:{b:02d}", "block", "", b,
                             tuple(weight[li["name"]] for li in info if int(li["block"]) == b)))
    if "kind" in per:
        for k in dict.fromkeys(li["kind"] for li in info):
            out.append(Scope(f"kind:{k}", "kind", k, -1, tuple(weight[li["name"]] for li in info if li["kind"] == k)))
    if "layer" in per:
        for li in info:
            out.append(Scope(li["name"], "layer", li["kind"], int(li["block"]), (weight[li["name"]],)))
    return _dedupe_params(out)


def _dedupe_params(scopes: list[Scope]) -> list[Scope]:
    return [replace(s, params=tuple(dict.fromkeys(s.params))) for s in scopes]


def module_scopes(model: nn.Module, blocks=None, per: Sequence[str] = ("model", "block")) -> list[Scope]:
    """Scopes of a plain module: "model" (every trainable parameter) and the blocks.

    Args:
        blocks: None (each direct child module with trainable parameters is a block), a dict
            {block name: regex or list of parameter names}, or a list of regexes (named by themselves).
        per: "model" and/or "block" ("layer" = one scope per parameter tensor).

    Raises:
        ValueError: a block that matches no trainable parameter (the message names it).
    """
    import re

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True")
    names = [n for n, _ in named]
    if blocks is None:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.split(".", 1)[0] if "." in n else n, []).append(n)
    else:
        if isinstance(blocks, str):
            blocks = [blocks]
        items = blocks.items() if isinstance(blocks, Mapping) else [(b, b) for b in blocks]
        groups = {}
        for bname, sel in items:
            if isinstance(sel, str):
                rx = re.compile(sel)
                got = [n for n in names if rx.search(n)]
            else:
                sel = list(sel)
                unknown = [s for s in sel if s not in names]
                if unknown:
                    raise ValueError(f"block {bname!r}: unknown parameter name(s) {unknown[:5]}; the model has e.g. "
                                     f"{names[:8]}")
                got = [n for n in names if n in set(sel)]
            if not got:
                raise ValueError(f"block {bname!r} ({sel!r}) matches no trainable parameter; the model has e.g. "
                                 f"{names[:8]}")
            groups[str(bname)] = got
    out: list[Scope] = []
    if "model" in per:
        out.append(Scope("model", "model", "", -1, tuple(names)))
    if "block" in per:
        out += [Scope(f"block:{b}", "block", "", i, tuple(ps)) for i, (b, ps) in enumerate(groups.items())]
    if "layer" in per:
        out += [Scope(n, "layer", n.rsplit(".", 1)[-1], -1, (n,)) for n in names]
    if not out:
        raise ValueError(f"per={tuple(per)!r} selects no scope for a plain module (use model, block or layer)")
    return out


# ----------------------------------------------------------------------------------------------------------
# one scope


def _operator(cfg: CurvatureConfig, model, loss, batches, params, forward_fn):
    if cfg.operator == "hessian":
        return HessianOperator(model, loss, batches, params=list(params), method=cfg.method, forward_fn=forward_fn)
    method = "reverse" if cfg.method == "double_backward" else "forward"
    if not isinstance(loss, str):
        raise ValueError(f"operator {cfg.operator!r} needs a built-in loss ('cross_entropy' or 'mse'), "
                         "not a callable; use operator='hessian' for a custom loss")
    if cfg.operator == "ggn":
        return GGNOperator(model, batches, loss=loss, params=list(params), method=method, forward_fn=forward_fn)
    kind = cfg.operator.split("_", 1)[1]
    return FisherOperator(model, batches, kind=kind, loss=loss, params=list(params), n_samples=cfg.mc_samples,
                          seed=cfg.seed, method=method, forward_fn=forward_fn)


def _scope_tables(cfg: CurvatureConfig, op, scope: Scope, density: bool, want_vectors: bool, trace: bool = True):
    """Eigenvalues, trace, density and criteria of one operator: ({table: DataFrame}, eigenvectors or None)."""
    from .criteria import spectral_criteria

    base = {**scope.row(), "n_params": int(op.dim)}
    kt, kb = min(cfg.top_k, op.dim), min(cfg.bottom_k, op.dim)
    k = max(kt, kb)
    if kb > 0 and 2 * k > op.dim:  # "both" needs 2k <= dim
        k = op.dim // 2
        kt, kb = min(kt, k), min(kb, k)
    which = "both" if kb > 0 and k > 0 else "top"
    if which == "top":
        k = kt
    res = lanczos(op, k=k, which=which, tol=cfg.tol, max_iter=cfg.max_iter, seed=cfg.seed,
                  return_eigenvectors=want_vectors)
    ev = res.eigenvalues.numpy()  # top: (k,) descending; both: top k descending, then bottom k ascending
    top_idx = list(range(kt))
    bottom_idx = list(range(k, k + kb)) if which == "both" else []
    rows = []
    for w_, idxs in (("top", top_idx), ("bottom", bottom_idx)):
        for r, i in enumerate(idxs):
            rows.append({**base, "which": w_, "rank": r + 1, "eigenvalue": float(ev[i]),
                         "residual": float(res.residuals[i]), "converged": bool(res.converged[i]),
                         "n_products": int(res.n_products)})
    eig = pd.DataFrame(rows)
    vectors = None
    if want_vectors and res.eigenvectors is not None:
        vectors = (res.eigenvectors[:, top_idx[:2]], ev[top_idx[:2]])

    out = {"eigenvalues": eig}
    if trace:
        tr = hutchpp(op, n_products=cfg.n_products, seed=cfg.seed + 1)
        exact = bool(min(cfg.n_products // 3, op.dim) == op.dim)
        out["trace"] = pd.DataFrame([{**base, "estimate": float(tr.estimate), "stderr": float(tr.stderr),
                                      "n_products": int(tr.n_products), "method": tr.method, "exact": exact}])
    tops = ev[top_idx]
    bottoms = ev[bottom_idx] if bottom_idx else None
    if density:
        s = slq(op, n_probes=cfg.n_probes, n_steps=cfg.n_steps, max_vectors=cfg.max_vectors, seed=cfg.seed + 2)
        grid, phi = s.density(num_bins=DENSITY_BINS)
        out["density"] = pd.DataFrame({"scope": scope.name, "grid": grid.numpy(), "density": phi.numpy()})
        P, M = s.nodes.shape
        out["slq_nodes"] = pd.DataFrame({"scope": scope.name, "probe": np.repeat(np.arange(P), M),
                                         "node": s.nodes.reshape(-1).numpy(), "weight": s.weights.reshape(-1).numpy()})
        crit = spectral_criteria(tops, bottoms, density=s)
        split = bulk_outliers(s, tops, BULK_QUANTILE)
        crit.update(bulk_ref=split["bulk_ref"], bulk_edge=split["bulk_edge"], n_outliers=split["n_outliers"],
                    outliers_saturated=bool(split["saturated"]), gap_margin=split["gap_margin"])
        crit["slq_products"] = int(s.n_products)
    else:
        crit = spectral_criteria(tops, bottoms)
        crit.update(bulk_ref=math.nan, bulk_edge=math.nan, n_outliers=-1, outliers_saturated=False,
                    gap_margin=math.nan)
        crit["slq_products"] = 0
    out["spectral_criteria"] = pd.DataFrame([{**base, **crit, "has_density": bool(density)}])
    return out, vectors


# ----------------------------------------------------------------------------------------------------------
# the scope loop (shared by run_curvature and curvature_of)


def _shard_path(run: Path, i: int, table: str) -> Path:
    return run / "scopes" / f"{i:04d}.{table}.parquet"


def _done_scopes(run: Path, scopes: list[Scope]) -> set[int]:
    done = set()
    for i, s in enumerate(scopes):
        p = _shard_path(run, i, "eigenvalues")
        if p.exists():
            try:
                got = pd.read_parquet(p, columns=["scope"])
            except Exception:
                continue
            if got.empty or str(got["scope"].iloc[0]) == s.name:
                done.add(i)
    return done


@contextlib.contextmanager
def _bar(enabled: bool, total: int, label: str = "curvature"):
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[scope]}"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False) as p:
        yield p, p.add_task(label, total=total, scope="")


def _compute(cfg: CurvatureConfig, run: Path, info: dist_.DistInfo, store: RunStore, scopes: list[Scope], model,
             loss, batches, forward_fn, progress: bool, log) -> dict:
    """Compute every scope not yet done; returns operator info of the last operator built (or {})."""
    done = _done_scopes(run, scopes) if info.is_main else set()
    done = dist_.broadcast_object(info, done)
    if info.is_main and done:
        log(f"resuming {run}: {len(done)} of {len(scopes)} scopes already done")
    op_info: dict = {}
    todo = [i for i in range(len(scopes)) if i not in done]
    with _bar(progress and info.is_main, len(scopes)) as bar:
        if bar is not None:
            bar[0].update(bar[1], completed=len(done))
        for i in todo:
            s = scopes[i]
            if bar is not None:
                bar[0].update(bar[1], scope=s.name)
            twin = _twin(scopes, i, cfg)
            if twin is not None:  # same parameter block as an earlier scope (e.g. a block with one layer)
                if info.is_main:
                    _copy_scope(run, twin, i, s)
                if bar is not None:
                    bar[0].update(bar[1], advance=1)
                continue
            op = _operator(cfg, model, loss, batches, s.params, forward_fn)
            op_info = op.info
            tables, vectors = _scope_tables(cfg, op, s, density=s.scope_type in cfg.density_scopes,
                                            want_vectors=s.scope_type == "model",
                                            trace=s.scope_type in cfg.trace_scopes)
            if info.is_main:
                if vectors is not None:
                    _write_eigenvectors(run, op, vectors, cfg)
                for name in ("trace", "density", "slq_nodes", "spectral_criteria"):
                    if name in tables:
                        write_parquet(tables[name], _shard_path(run, i, name))
                write_parquet(tables["eigenvalues"], _shard_path(run, i, "eigenvalues"))  # marks the scope done
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    dist_.barrier(info)
    return op_info


def _twin(scopes: list[Scope], i: int, cfg: CurvatureConfig) -> int | None:
    """An earlier scope with the same parameter block (and a density if scope i needs one)."""
    s = scopes[i]
    for j in range(i):
        t = scopes[j]
        if set(t.params) == set(s.params) and all(s.scope_type not in want or t.scope_type in want
                                                  for want in (cfg.density_scopes, cfg.trace_scopes)):
            return j
    return None


def _copy_scope(run: Path, src: int, dst: int, scope: Scope) -> None:
    """Scope dst's shards from scope src's (same operator): only the scope columns change."""
    for name in ("trace", "density", "slq_nodes", "spectral_criteria", "eigenvalues"):  # eigenvalues last
        p = _shard_path(run, src, name)
        if not p.exists():
            continue
        df = pd.read_parquet(p)
        for c, v in scope.row().items():
            if c in df:
                df[c] = v
        write_parquet(df, _shard_path(run, dst, name))


def _write_eigenvectors(run: Path, op, vectors, cfg: CurvatureConfig) -> None:
    Y, lam = vectors  # (dim, m), (m,)
    tensors = {}
    for j in range(Y.shape[1]):
        for name, part in zip(op.names, op.unflatten(Y[:, j].contiguous())):
            tensors[f"v{j}::{name}"] = part
    meta = {"eigenvalues": json.dumps([float(x) for x in lam]), "names": json.dumps(list(op.names)),
            "operator": cfg.operator, "n": str(Y.shape[1])}
    write_safetensors(tensors, run / "tensors" / EIGVEC_FILE, metadata=meta)


def load_eigenvectors(run: Path | str) -> tuple[list[str], list[list[torch.Tensor]], list[float]]:
    """(parameter names, per eigenvector the per-parameter tensors, eigenvalues) of a curvature run."""
    from safetensors import safe_open

    p = Path(run) / "tensors" / EIGVEC_FILE
    if not p.exists():
        raise FileNotFoundError(f"{run}: no {EIGVEC_FILE} (run `gradsight curvature` with the model scope, "
                                "--per model, first)")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
        names = json.loads(meta["names"])
        lam = json.loads(meta["eigenvalues"])
        vecs = [[f.get_tensor(f"v{j}::{n}") for n in names] for j in range(int(meta["n"]))]
    return names, vecs, lam


def summarize_curvature(run: Path | str, lr: float | None = None, scopes: Sequence[str] | None = None
                        ) -> dict[str, pd.DataFrame]:
    """Merge the per-scope shards into RUN/{table}.parquet (scope order) and add stability.parquet with lr."""
    run = Path(run)
    files = sorted((run / "scopes").glob("*.parquet")) if (run / "scopes").exists() else []
    out: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        parts = [pd.read_parquet(f) for f in files if f.name.split(".")[1] == name]
        if not parts:
            continue
        df = pd.concat(parts, ignore_index=True)
        if scopes is not None:
            order = {s: i for i, s in enumerate(scopes)}
            df = df[df["scope"].isin(order)]
            df = df.iloc[np.argsort(df["scope"].map(order).to_numpy(), kind="stable")].reset_index(drop=True)
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


# ----------------------------------------------------------------------------------------------------------
# causal LMs


def _lm_batches(cfg, recs, tokenizer, info, device) -> tuple[list[dict], dict]:
    """This rank's fixed batches and counts of the whole data set."""
    from ..inputs.data import collate, encode, make_batches

    encoded = [encode(r, tokenizer, cfg.encode) for r in sorted(recs, key=lambda r: r.idx)]
    ok = [e for e in encoded if e.ok and e.n_target > 0]
    n_skipped = len(encoded) - len(ok)
    if cfg.n_examples is not None:
        ok = ok[: cfg.n_examples]
    if len(ok) < info.world_size:
        raise ValueError(f"{len(ok)} usable examples for {info.world_size} processes: every process needs at "
                         "least one (use more data or fewer processes)")
    mine = dist_.shard(ok, info)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [{k: v.to(device) for k, v in collate([mine[i] for i in b], pad_id).items()}
               for b in make_batches(mine, token_budget=cfg.token_budget, max_batch=cfg.max_batch)]
    group = {r.idx: r.group for r in recs}
    groups: dict[str, int] = {}
    for e in ok:
        groups[group[e.idx]] = groups.get(group[e.idx], 0) + 1
    counts = {"n_examples": len(ok), "n_skipped": n_skipped, "n_target_tokens": int(sum(e.n_target for e in ok)),
              "groups": groups, "examples": [int(e.idx) for e in ok]}
    return batches, counts


def _check_dtype(model, dtype: str) -> None:
    want = getattr(torch, dtype)
    got = {p.dtype for p in model.parameters()}
    if got and got != {want}:
        raise ValueError(f"the model's parameters are {sorted(str(g) for g in got)} but dtype={dtype!r}; pass "
                         "a matching dtype or convert the model")


def _train_mode_note(model) -> dict:
    was = bool(model.training)
    bn = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if was and bn:
        warnings.warn(f"the model is in train mode and has {bn} layers; curvature is computed in eval mode "
                      "(running statistics). Recorded in the manifest (switched_to_eval).", stacklevel=3)
    return {"switched_to_eval": was, "batchnorm": bn}


def run_curvature(cfg: CurvatureConfig, out: str | Path, model: Any = None, tokenizer: Any = None,
                  records: Any = None, progress: bool = True, report: bool = True,
                  log: Callable[[str], None] = print) -> CurvatureResult:
    """Curvature of a causal LM's loss on grouped data into the run directory `out` (resumes if it exists).

    Args:
        cfg: options (CurvatureConfig; layer selection, data and model options as `layers`).
        out: run directory.
        model, tokenizer: an already loaded model/tokenizer (Python API); default: load cfg.model.
        records: data as a list of dicts or a datasets.Dataset instead of cfg.data.
        progress: progress bar (rank 0). report: write report.html.
    """
    out = Path(out)
    with dist_.session() as info:
        return _run_lm(cfg, out, info, model, tokenizer, records, progress, report, log)


def _run_lm(cfg, out, info, model, tokenizer, records, progress, report, log) -> CurvatureResult:
    from ..pipeline import prepare

    t0 = time.perf_counter()
    mode = _train_mode_note(model) if model is not None else {"switched_to_eval": False, "batchnorm": []}
    if model is not None:
        _check_dtype(model, cfg.dtype)
    extra = {"curvature": {"operator": cfg.operator, "method": cfg.method, "objective": OBJECTIVE,
                           "per": list(cfg.per), "density_scopes": list(cfg.density_scopes),
                           "trace_scopes": list(cfg.trace_scopes), "top_k": cfg.top_k,
                           "bottom_k": cfg.bottom_k, "tol": cfg.tol, "n_products": cfg.n_products,
                           "n_probes": cfg.n_probes, "n_steps": cfg.n_steps, "lr": cfg.lr,
                           "bulk_quantile": BULK_QUANTILE, **mode},
             "loss": {"objective": OBJECTIVE, "mode": "eval", "dtype": cfg.dtype}}
    su = prepare(cfg, out, info, model, tokenizer, records, analysis="curvature", extra=extra)
    model = su.model
    batches, counts = _lm_batches(cfg, su.records, su.tokenizer, info, su.device)
    scopes = lm_scopes(su.layers, cfg.per, [n for n, _ in model.named_parameters()])
    op_info = _compute(cfg, out, info, su.store, scopes, model, "cross_entropy", batches, causal_lm_forward,
                       progress, log)
    return _finish(cfg, out, info, su.store, scopes, op_info, counts, t0, report)


def _finish(cfg, out, info, store, scopes, op_info, counts, t0, report) -> CurvatureResult:
    tables: dict[str, pd.DataFrame] = {}
    if info.is_main:
        tables = summarize_curvature(out, cfg.lr, [s.name for s in scopes])
        man = read_manifest(out)
        cur = dict(man.get("curvature") or {})
        cur.update({k: v for k, v in op_info.items() if k in ("sdpa_math", "normalisation", "world_size",
                                                              "n_batches", "loss", "loss_convention", "n_samples")})
        cur["sdpa_math"] = bool(op_info.get("sdpa_math", cur.get("sdpa_math", False)))
        cur["switched_to_eval"] = bool(cur.get("switched_to_eval") or op_info.get("switched_to_eval", False))
        cur["scopes"] = [{**s.row(), "n_tensors": len(s.params)} for s in scopes]
        cur.update({k: v for k, v in counts.items() if k != "examples"})
        store.update_manifest(curvature=cur, finished=True, elapsed_s=round(time.perf_counter() - t0, 1))
        if report:
            from ..report import render_html

            render_html(out)
    dist_.barrier(info)
    if not info.is_main:
        tables = {p.stem: pd.read_parquet(p) for p in (out / f"{n}.parquet" for n in TABLES) if p.exists()}
    return CurvatureResult(out, tables)


# ----------------------------------------------------------------------------------------------------------
# plain PyTorch modules


def _data_hash(batches) -> str:
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


def _state_fingerprint(states: Sequence[Mapping]) -> str:
    """sha256 (16 hex) of state_dicts' names and bytes: the identity of in-memory checkpoints."""
    h = hashlib.sha256()
    for st in states:
        for k in sorted(st):
            h.update(k.encode())
            h.update(st[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "in-memory:" + h.hexdigest()[:16]


def _module_inputs(model: nn.Module, batches, what: str) -> tuple[list, str]:
    """(the batches as a list, the parameters' dtype name) of an in-memory module run, or a clear error."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"batches is empty: the {what} needs at least one batch")
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(next(model.parameters()).dtype)
    if dtype is None:
        raise ValueError(f"{what} needs float32 or float64 parameters, got {next(model.parameters()).dtype}")
    return batches, dtype


def _open_module_run(out: Path, info, analysis: str, cfg, model: nn.Module, batches, loss_name: str,
                     identity_extra: dict, meta_extra: dict, name: str | None = None) -> RunStore:
    """Open (or check) the run directory of an in-memory module: identity = config, weights, data, loss."""
    from ..config import semantic_dict
    from ..pipeline import _param_fingerprint

    model_fp = "in-memory:" + _param_fingerprint(model)
    data_hash = _data_hash(batches)
    identity = {"analysis": analysis, "config": semantic_dict(cfg), "model_fingerprint": model_fp,
                "data_sha256": data_hash, "loss": loss_name, **identity_extra}
    n_blocks = meta_extra.pop("n_blocks", 0)
    meta = {"analysis": analysis, "config": cfg.to_dict(), "config_hash": config_hash(identity),
            "model": {"id": name or type(model).__name__, "fingerprint": model_fp, "class": type(model).__name__,
                      "n_blocks": n_blocks, "layers": []},
            "data": {"path": "<in-memory>", "sha256": data_hash, "n_records": len(batches)},
            "versions": versions(), "seed": cfg.seed, "world_size": info.world_size,
            "loss": {"objective": f"{loss_name}: mean over all rows of all batches", "mode": "eval",
                     "dtype": cfg.dtype}, **meta_extra}
    store = RunStore(out, info.rank, info.world_size)
    if info.is_main:
        store.open(identity, meta)
    dist_.barrier(info)
    if not info.is_main:
        store.open(identity, meta)
    return store


def curvature_of(model: nn.Module, loss_fn, batches, out: str | Path, *, blocks=None,
                 per: Sequence[str] = ("model", "block"), operator: str = "hessian",
                 method: str = "double_backward", top_k: int = 5, bottom_k: int = 0, tol: float = 1e-4,
                 max_iter: int | None = None, n_products: int = 99, density_scopes: Sequence[str] = ("model",),
                 trace_scopes: Sequence[str] = ("model", "layer", "kind", "block"),
                 n_probes: int = 3, n_steps: int = 60, max_vectors: int | None = None, mc_samples: int = 1,
                 lr: float | None = None, seed: int = 0, forward_fn=None, progress: bool = False,
                 report: bool = False, name: str | None = None,
                 log: Callable[[str], None] = print) -> CurvatureResult:
    """Curvature tables of any PyTorch module, written into the run directory `out` (same tables as
    `run_curvature`; resumable, config-guarded).

    Args:
        model: the module (evaluated in eval mode; a train-mode model with BatchNorm is warned about and
            recorded as switched_to_eval).
        loss_fn: "cross_entropy", "mse" or a callable `loss_fn(outputs, targets) -> mean over rows` (Hessian
            only).
        batches: a list of batches or a DataLoader (materialised once, in order): `(x, y)` by default, or any
            batch your `forward_fn(model, batch) -> (outputs, targets)` understands.
        out: run directory.
        blocks: see `module_scopes` (None: each direct child module with parameters).
        per, operator, method, top_k, ...: as CurvatureConfig.
        name: the model's name in the manifest and report (default: its class name).
    """
    out = Path(out)
    with dist_.session() as info:
        t0 = time.perf_counter()
        batches, dtype = _module_inputs(model, batches, "curvature")
        cfg = CurvatureConfig(model=type(model).__name__, data="<in-memory>", dtype=dtype, operator=operator,
                              method=method, per=tuple(per), top_k=top_k, bottom_k=bottom_k, tol=tol,
                              max_iter=max_iter, n_products=n_products, density_scopes=tuple(density_scopes),
                              trace_scopes=tuple(trace_scopes),
                              n_probes=n_probes, n_steps=n_steps, max_vectors=max_vectors, mc_samples=mc_samples,
                              lr=lr, seed=seed, device="cpu")
        scopes = module_scopes(model, blocks, cfg.per)
        mode = _train_mode_note(model)
        loss_name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__qualname__", repr(loss_fn))
        curv = {"operator": operator, "method": method, "objective": f"mean {loss_name} over rows",
                "per": list(cfg.per), "density_scopes": list(cfg.density_scopes),
                "trace_scopes": list(cfg.trace_scopes), "top_k": top_k, "bottom_k": bottom_k, "tol": tol,
                "n_products": n_products, "n_probes": n_probes, "n_steps": n_steps, "lr": lr,
                "bulk_quantile": BULK_QUANTILE, **mode}
        store = _open_module_run(out, info, "curvature", cfg, model, batches, loss_name,
                                 {"scopes": [[s.name, list(s.params)] for s in scopes]},
                                 {"curvature": curv, "n_blocks": sum(s.scope_type == "block" for s in scopes)},
                                 name)
        was = model.training
        model.eval()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*curvature products are computed in eval mode.*")
                op_info = _compute(cfg, out, info, store, scopes, model, loss_fn, batches,
                                   forward_fn or default_forward, progress, log)
        finally:
            model.train(was)
        return _finish(cfg, out, info, store, scopes, op_info, {"n_batches_total": len(batches)}, t0, report)


# ----------------------------------------------------------------------------------------------------------
# landscape


@dataclass
class LandscapeRunResult:
    path: Path
    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def report(self) -> Path:
        from ..report import render_html

        return render_html(self.path)


class _PooledLoss:
    """loss(model) -> float: the curvature objective (token-mean over all supervised tokens, all ranks)."""

    def __init__(self, batches, info):
        self.batches, self.info = batches, info

    def __call__(self, model) -> float:
        import torch.nn.functional as F

        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for b in self.batches:
                logits, labels = causal_lm_forward(model, b)
                total[0] += float(F.cross_entropy(logits, labels, reduction="sum"))
                total[1] += labels.numel()
        if self.info.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total[0] / total[1])


def run_landscape(cfg: LandscapeConfig, out: str | Path, model: Any = None, tokenizer: Any = None,
                  records: Any = None, progress: bool = True, report: bool = True,
                  log: Callable[[str], None] = print) -> LandscapeRunResult:
    """Loss landscape of a causal LM around its weights (or towards `cfg.to`) into `out`.

    Directions act on the weights of the selected layers. kind "random": filter-normalised Gaussian
    directions seeded by (seed, seed + 1); "hessian": the top-2 eigenvectors stored by a curvature run
    (`from_curvature`, same model); "interpolate": (1 - t) theta + t theta_to for every parameter.
    """
    out = Path(out)
    with dist_.session() as info:
        return _run_landscape(cfg, out, info, model, tokenizer, records, progress, report, log)


def _hessian_axes(model: nn.Module, run, dims: int, manifest: dict) -> list:
    """The top-`dims` eigenvectors stored by a curvature run of this very model, as landscape directions."""
    from .. import landscape as ls

    if run is None:
        raise ValueError("kind hessian needs from_curvature (a curvature run directory with eigenvectors)")
    vnames, vecs, lam = load_eigenvectors(run)
    src = read_manifest(Path(run))
    fp = (src.get("model") or {}).get("fingerprint")
    mine = (manifest.get("model") or {}).get("fingerprint")
    if fp != mine:
        raise ValueError(f"from_curvature {run}: its eigenvectors belong to another model (fingerprint {fp} vs {mine})")
    have = dict(model.named_parameters())
    missing = [n for n in vnames if n not in have]
    if missing:
        raise ValueError(f"from_curvature {run}: parameters {missing[:3]} are not in the model")
    if len(vecs) < dims:
        raise ValueError(f"from_curvature {run} holds {len(vecs)} eigenvector(s); dims={dims} needs {dims} "
                         "(rerun the curvature with top_k >= 2, or use dims=1)")
    return ls.hessian_directions([(n, have[n]) for n in vnames], [vecs[j] for j in range(dims)],
                                 eigenvalues=lam[:dims])


def landscape_of(model: nn.Module, loss_fn, batches, out: str | Path, *, kind: str = "random", dims: int = 2,
                 steps: int = 21, span: float = 1.0, norm: str = "filter", ignore: str | None = "biasbn",
                 from_curvature: str | Path | None = None, to: nn.Module | Mapping | None = None,
                 trajectory: Sequence | None = None, recompute_bn: bool = False,
                 batch_points: int | str = "auto", seed: int = 0, report: bool = False, name: str | None = None,
                 log: Callable[[str], None] = print) -> LandscapeRunResult:
    """Loss landscape of any PyTorch module into the run directory `out` (the table and report of
    `run_landscape`; config-guarded: a finished run with the same identity is returned as it is).

    Args:
        model: the module at theta* (restored bit-exactly afterwards; evaluated in eval mode).
        loss_fn: "cross_entropy", "mse" (the operators' conventions) or `criterion(outputs, targets)`, a mean
            over the batch; batches are combined sample-weighted.
        batches: list of `(inputs, targets)` batches (or a DataLoader, materialised once).
        out: run directory.
        kind: "random" (seeded Gaussian, `norm`-normalised, 1-D tensors zeroed with ignore="biasbn"),
            "hessian" (the top eigenvectors stored by `curvature_of` in `from_curvature`), or "interpolate"
            (the segment from this model to `to`, a module or state_dict of the same architecture; t in
            [0, 1] widened by span - 1 on each side when span > 1), "pca" (the top principal components of
            `trajectory` - earlier checkpoints in training order - around this model, the final point;
            the checkpoints' coordinates go to the manifest), or "gradient" (the unit gradient of the loss;
            with dims=2 the second axis is a random direction).
        dims, steps, span: 1-D slice or 2-D grid, points per axis, alpha/beta in [-span, span].
        recompute_bn: recompute BatchNorm running statistics on `batches` at every point (sequential path).
        batch_points: grid points per vectorised (torch.func.vmap) evaluation, 1 = sequential, or "auto" (time
            both on the first points, keep the faster; see `landscape.grid_2d`).
        name: the model's name in the manifest and report (default: its class name).
    """
    from .. import landscape as ls
    from ..config import LandscapeConfig

    out = Path(out)
    with dist_.session() as info:
        t0 = time.perf_counter()
        batches, dtype = _module_inputs(model, batches, "landscape")
        ls.check_batch_points(batch_points)  # before the run directory is created
        to_state = None
        if kind == "interpolate":
            if to is None:
                raise ValueError("kind interpolate needs `to` (a module or state_dict of the same architecture)")
            to_state = to.state_dict() if isinstance(to, nn.Module) else dict(to)
        to_fp = None if to_state is None else _state_fingerprint([to_state])
        traj = None
        if kind == "pca":
            if not trajectory:
                raise ValueError("kind pca needs `trajectory` (earlier checkpoints: modules or state_dicts, in "
                                 "training order; the model is the final point)")
            traj = [t.state_dict() if isinstance(t, nn.Module) else dict(t) for t in trajectory]
        cfg = LandscapeConfig(model=type(model).__name__, data="<in-memory>", dtype=dtype, kind=kind, dims=dims,
                              steps=steps, span=span, norm="none" if norm is None else norm,
                              from_curvature=None if from_curvature is None else str(from_curvature), to=to_fp,
                              trajectory=() if traj is None else (_state_fingerprint(traj),), seed=seed,
                              device="cpu")
        loss_name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__qualname__", repr(loss_fn))
        opts = {"kind": kind, "dims": dims, "steps": steps, "span": span, "norm": cfg.norm, "ignore": ignore,
                "from_curvature": cfg.from_curvature, "to": to_fp, "trajectory": list(cfg.trajectory),
                "recompute_bn": bool(recompute_bn)}
        store = _open_module_run(out, info, "landscape", cfg, model, batches, loss_name,
                                 {"landscape_options": opts}, {"landscape_options": opts}, name)
        man = read_manifest(out)
        if man.get("finished") and (out / "landscape.parquet").exists():
            log(f"{out}: finished landscape with the same configuration; nothing to do")
            return LandscapeRunResult(out, pd.read_parquet(out / "landscape.parquet"), man.get("landscape") or {})
        loss = ls.BatchLoss(batches, resolve_loss(loss_fn))
        bn = batches if recompute_bn else None
        extra_meta: dict = {}
        axis = np.linspace(-span, span, steps)
        if kind == "interpolate":
            state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
            lo, hi = (1 - span, span) if span > 1 else (0.0, 1.0)
            ts = np.union1d(np.linspace(lo, hi, steps), [0.0, 1.0])
            res = ls.interpolate(model, state_a, to_state, loss, ts, recompute_bn=bn)
            frame = pd.DataFrame({"alpha": res.frame["t"], "beta": np.nan, "loss": res.frame["loss"],
                                  "finite": res.frame["finite"]})
        else:
            if kind == "random":
                ds = [ls.random_direction(model, seed=seed + j, norm=None if norm == "none" else norm, ignore=ignore)
                      for j in range(dims)]
            elif kind == "hessian":
                ds = _hessian_axes(model, from_curvature, dims, man)
            elif kind == "pca":
                ds, pca = ls.pca_directions(traj, final=model.state_dict(), like=model, k=dims)
                if len(ds) < dims:
                    raise ValueError(f"the trajectory spans {len(ds)} direction(s); dims={dims} needs {dims}")
                extra_meta["pca"] = {"explained_variance_ratio": pca["explained_variance_ratio"],
                                     "coords": pca["coords"].to_dict("list")}
            elif kind == "gradient":
                ds = [ls.gradient_direction(model, lambda m: loss.value(m))]
                if dims == 2:
                    ds.append(ls.random_direction(model, seed=seed, norm=None if norm == "none" else norm,
                                                  ignore=ignore))
            else:
                raise ValueError(f"kind must be random, hessian or interpolate; got {kind!r}")
            if dims == 1:
                res = ls.slice_1d(model, loss, ds[0], axis, batch_points=batch_points, recompute_bn=bn)
            else:
                res = ls.grid_2d(model, loss, ds[0], ds[1], axis, axis, batch_points=batch_points, recompute_bn=bn)
            frame = res.frame.reindex(columns=["alpha", "beta", "loss", "finite"])
        frame["loss"] = frame["loss"].astype(float).where(frame["finite"].astype(bool), np.nan)
        meta = {k: v for k, v in res.meta.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
        meta.update(kind=kind, dims=1 if kind == "interpolate" else dims,
                    n_params=int(sum(p.numel() for p in model.parameters())),
                    objective=f"mean {loss_name} over all rows", n_batches=len(batches),
                    center_loss=float(loss(model)) if kind != "interpolate" else None, **extra_meta)
        if info.is_main:
            write_parquet(frame, out / "landscape.parquet")
            store.update_manifest(landscape=json.loads(json.dumps(meta, default=str)), finished=True,
                                  elapsed_s=round(time.perf_counter() - t0, 1))
            if report:
                from ..report import render_html

                render_html(out)
        dist_.barrier(info)
        return LandscapeRunResult(out, frame, meta)


def _chunks_resumable(out: Path, info, n: int, size: int, evaluate, progress: bool,
                      log) -> tuple[np.ndarray, dict, int]:
    """Losses of n points evaluated in chunks of `size` by `evaluate(lo, hi) -> (losses, meta)`; each finished
    chunk goes to RUN/points/{lo:06d}.parquet and a rerun skips the chunks already written.
    Returns (losses (n,), the last chunk's meta, number of chunks resumed)."""
    starts = list(range(0, n, size))
    pdir = out / "points"
    done = set()
    if info.is_main and pdir.exists():
        for p in pdir.glob("*.parquet"):
            try:
                if len(pd.read_parquet(p)) == min(size, n - int(p.stem)):
                    done.add(int(p.stem))
            except Exception:  # a torn file cannot exist (atomic writes), but never trust a foreign one
                continue
    done = dist_.broadcast_object(info, done)
    if info.is_main and done:
        log(f"resuming {out}: {len(done)} of {len(starts)} chunks of points already evaluated")
    losses = np.full(n, np.nan)
    meta: dict = {}
    with _bar(progress and info.is_main, len(starts), "landscape") as bar:
        if bar is not None:
            bar[0].update(bar[1], completed=len(done))
        for s0 in starts:
            p, s1 = pdir / f"{s0:06d}.parquet", min(s0 + size, n)
            if s0 in done:
                if info.is_main:
                    losses[s0:s1] = pd.read_parquet(p)["loss"].to_numpy()
                continue
            losses[s0:s1], meta = evaluate(s0, s1)
            if info.is_main:
                write_parquet(pd.DataFrame({"point": np.arange(s0, s1), "loss": losses[s0:s1]}), p)
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    return dist_.broadcast_object(info, losses), meta, len(done)


def _grid_resumable(out: Path, info, model, loss, ds, axis, dims: int, progress: bool, log):
    """The 1-D / 2-D grid in resumable chunks (a row of the 2-D grid, or one 1-D point).
    Returns (frame alpha, beta, loss, finite; an object with .meta)."""
    from .. import landscape as ls

    C = ls.coefficients(axis) if dims == 1 else ls.coefficients(axis, axis)
    losses, meta, resumed = _chunks_resumable(
        out, info, len(C), 1 if dims == 1 else len(axis),
        lambda lo, hi: ls.evaluate_points(model, loss, ds, C[lo:hi], batch_points=1, recompute_bn=None), progress, log)
    meta = {**meta, "n_points": len(C), "n_nonfinite": int(np.isnan(losses).sum()), "resumed_chunks": resumed,
            "kind": "slice_1d" if dims == 1 else "grid_2d",
            "directions": [dict(getattr(d, "meta", {})) for d in ds]}
    frame = pd.DataFrame({"alpha": C[:, 0].numpy(), "beta": C[:, 1].numpy() if dims == 2 else np.nan,
                          "loss": losses, "finite": np.isfinite(losses)})
    return frame, types.SimpleNamespace(meta=meta)


def _interpolation_resumable(out: Path, info, model, loss, state_a, state_b, ts, progress: bool, log):
    """`landscape.interpolate` one point per resumable chunk; the barrier from all points at the end."""
    from .. import landscape as ls

    def evaluate(lo, hi):
        r = ls.interpolate(model, state_a, state_b, loss, ts[lo:hi])
        return r.frame["loss"].to_numpy(), r.meta

    losses, meta, resumed = _chunks_resumable(out, info, len(ts), 1, evaluate, progress, log)
    meta = {**meta, "n_points": len(ts), "n_nonfinite": int(np.isnan(losses).sum()), "resumed_chunks": resumed,
            "barrier": ls.interpolation_barrier(ts, losses)}
    frame = pd.DataFrame({"alpha": ts, "beta": np.nan, "loss": losses, "finite": np.isfinite(losses)})
    return frame, types.SimpleNamespace(meta=meta)


def _lm_gradient_direction(model, batches, names: list[str], info):
    """The unit gradient of the pooled token-mean loss (all ranks) w.r.t. the named weights, as a Direction."""
    import torch.nn.functional as F

    from .. import landscape as ls

    have = dict(model.named_parameters())
    params = [have[n] for n in names]
    flags = [p.requires_grad for p in params]
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    count = torch.zeros(1, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for b in batches:
            logits, labels = causal_lm_forward(model, b)
            total = F.cross_entropy(logits.float() if logits.dtype == torch.float16 else logits, labels,
                                    reduction="sum")
            for g, gi in zip(grads, torch.autograd.grad(total, params)):
                g += gi.double()
            count += labels.numel()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was)
    if info.world_size > 1:
        import torch.distributed as dist

        for g in grads:
            dist.all_reduce(g)
        dist.all_reduce(count)
    gn = math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) / float(count)
    if gn == 0:
        raise ValueError("the gradient of the loss is zero on these weights: no gradient direction")
    parts = [(g / float(count) / gn).to(p.dtype) for g, p in zip(grads, params)]
    return ls.Direction(parts, names, kind="gradient", grad_norm=gn, norm="unit")


def _lm_pca_directions(cfg: LandscapeConfig, model, names: list[str]):
    """Top principal components of the checkpoints in cfg.trajectory around the model (selected weights)."""
    from .. import landscape as ls
    from ..inputs.models import load_model

    have = dict(model.named_parameters())
    traj = []
    for spec in cfg.trajectory:
        ck, _ = load_model(spec, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        sd = dict(ck.named_parameters())
        missing = [n for n in names if n not in sd or sd[n].shape != have[n].shape]
        if missing:
            raise ValueError(f"--trajectory {spec}: weights {missing[:3]} are missing or have another shape "
                             "(the checkpoints must share the model's architecture)")
        traj.append({n: sd[n].detach().to(have[n].device) for n in names})
        del ck
    final = {n: have[n].detach() for n in names}
    ds, info = ls.pca_directions(traj, final=final, k=cfg.dims)
    if len(ds) < cfg.dims:
        raise ValueError(f"the trajectory spans {len(ds)} direction(s); --dims {cfg.dims} needs {cfg.dims}")
    return ds, {"explained_variance_ratio": info["explained_variance_ratio"],
                "coords": info["coords"].to_dict("list"), "checkpoints": list(cfg.trajectory)}


def _run_landscape(cfg: LandscapeConfig, out, info, model, tokenizer, records, progress, report, log):
    from .. import landscape as ls
    from ..pipeline import prepare

    t0 = time.perf_counter()
    if model is not None:
        _check_dtype(model, cfg.dtype)
    extra = {"landscape_options": {"kind": cfg.kind, "dims": cfg.dims, "steps": cfg.steps, "span": cfg.span,
                                   "norm": cfg.norm, "from_curvature": cfg.from_curvature, "to": cfg.to,
                                   "trajectory": list(cfg.trajectory)},
             "loss": {"objective": OBJECTIVE, "mode": "eval", "dtype": cfg.dtype}}
    su = prepare(cfg, out, info, model, tokenizer, records, analysis="landscape", extra=extra)
    model = su.model
    batches, counts = _lm_batches(cfg, su.records, su.tokenizer, info, su.device)
    loss = _PooledLoss(batches, info)
    extra_meta: dict = {}
    names = [f"{li.name}.weight" for li in su.layers]
    have = dict(model.named_parameters())
    names = [n for n in dict.fromkeys(names) if n in have]
    axis = np.linspace(-cfg.span, cfg.span, cfg.steps)
    if cfg.kind == "interpolate":
        from ..inputs.models import load_model

        other, _ = load_model(cfg.to, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        state_b = {k: v.to(su.device) for k, v in other.state_dict().items()}
        state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
        lo, hi = (1 - cfg.span, cfg.span) if cfg.span > 1 else (0.0, 1.0)
        ts = np.union1d(np.linspace(lo, hi, cfg.steps), [0.0, 1.0])  # endpoints: the checkpoints, the barrier
        frame, res = _interpolation_resumable(out, info, model, loss, state_a, state_b, ts, progress, log)
    else:
        norm = None if cfg.norm == "none" else cfg.norm
        if cfg.kind == "random":
            ds = [ls.random_direction(model, seed=cfg.seed + j, norm=norm, names=names) for j in range(cfg.dims)]
        elif cfg.kind == "hessian":
            ds = _hessian_axes(model, cfg.from_curvature, cfg.dims, su.manifest)
        elif cfg.kind == "gradient":
            ds = [_lm_gradient_direction(model, batches, names, info)]
            if cfg.dims == 2:
                ds.append(ls.random_direction(model, seed=cfg.seed, norm=norm, names=names))
        else:  # pca
            ds, pca = _lm_pca_directions(cfg, model, names)
            extra_meta["pca"] = pca
        frame, res = _grid_resumable(out, info, model, loss, ds, axis, cfg.dims, progress, log)
    frame["loss"] = frame["loss"].astype(float).where(frame["finite"].astype(bool), np.nan)
    meta = {k: v for k, v in res.meta.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    meta.update(kind=cfg.kind, dims=1 if cfg.kind == "interpolate" else cfg.dims, n_params=int(
        sum(have[n].numel() for n in names)), objective=OBJECTIVE,
        center_loss=float(loss(model)) if cfg.kind != "interpolate" else None,
        **{k: v for k, v in counts.items() if k != "examples"}, **extra_meta)
    if info.is_main:
        write_parquet(frame, out / "landscape.parquet")
        su.store.update_manifest(landscape=json.loads(json.dumps(meta, default=str)), finished=True,
                                 elapsed_s=round(time.perf_counter() - t0, 1))
        if report:
            from ..report import render_html

            render_html(out)
    dist_.barrier(info)
    return LandscapeRunResult(out, frame, meta)
