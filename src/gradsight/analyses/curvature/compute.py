"""The curvature analysis per scope: one operator -> eigenvalues, trace, density, spectral criteria.

    for every SCOPE (a parameter block: the whole selection, each block, kind or layer)
        build the operator (Hessian, GGN or Fisher) of the mean loss over the fixed batches,
        top_k / bottom_k eigenvalues by Lanczos (one Krylov space for both ends),
        the trace by Hutch++ with a product budget (estimate and standard error),
        an SLQ spectral density for the scope types in `density_scopes`,
        spectral criteria (|lambda_min / lambda_max|, negative / positive mass, bulk edge, outliers).

Scopes are the units of a collective run: every rank holds every rank-th example (fixed order) and every
product all-reduces, so all ranks see the operator of the whole data set; the random probes are seeded on
the CPU, so eigenvalues and traces equal a single process's to rounding. Rank 0 writes. A scope whose
parameter block equals an earlier scope's (e.g. a block holding one selected layer) is not computed again:
`summarize` copies the earlier scope's rows under its name.

Bulk edge and outliers (a heuristic, stated in the report; `curvature.criteria.bulk_outliers`): the bulk
reference is the median of the SLQ spectral measure (probe-averaged); the outliers are the top eigenvalues
above the largest log-gap of their distance to it, and the bulk edge is the largest eigenvalue below that gap.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...curvature.criteria import bulk_outliers, spectral_criteria
from ...curvature.density import slq
from ...curvature.lanczos import lanczos
from ...curvature.operators import (FisherOperator, GGNOperator, HessianOperator, causal_lm_forward)
from ...curvature.trace import hutchpp
from ...inputs.lm import Source, pooled_batches
from ...inputs.module import loss_name
from ...runs.registry import Plan, Unit
from ...runs.store import Tensors, read_manifest
from ...scopes import Scope, module_scopes, weight_scopes
from .config import OBJECTIVE

__all__ = ["setup", "compute", "finish", "meta", "identity", "scope_tables", "operator_for", "curvature_meta",
           "load_eigenvectors", "OBJECTIVE", "EIGVEC_FILE", "TABLES", "check_dtype", "train_mode_note"]

EIGVEC_FILE = "eigenvectors.safetensors"
TABLES = ("eigenvalues", "trace", "density", "slq_nodes", "spectral_criteria")
BULK_QUANTILE = 0.5  # bulk reference of the outlier rule: the median of the SLQ measure
DENSITY_BINS = 1000
_ORDER = ("model", "block", "kind", "layer")


def operator_for(cfg, model, loss, batches, params, forward_fn):
    """The curvature operator of cfg.operator on the parameter block `params`."""
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


def scope_tables(cfg, op, scope: Scope, density: bool, want_vectors: bool, trace: bool = True):
    """Eigenvalues, trace, density and criteria of one operator: ({table: DataFrame}, eigenvectors or None)."""
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


def twin_of(scopes: list[Scope], i: int, cfg) -> int | None:
    """An earlier scope with the same parameter block (and a density / trace if scope i needs one)."""
    s = scopes[i]
    for j in range(i):
        t = scopes[j]
        if set(t.params) == set(s.params) and all(s.scope_type not in want or t.scope_type in want
                                                  for want in (cfg.density_scopes, cfg.trace_scopes)):
            return j
    return None


def eigenvector_tensors(op, vectors, cfg) -> Tensors:
    """The model scope's top-2 eigenvectors as "v{j}::{param}" tensors (for Hessian-axis landscapes)."""
    Y, lam = vectors  # (dim, m), (m,)
    tensors = {}
    for j in range(Y.shape[1]):
        for name, part in zip(op.names, op.unflatten(Y[:, j].contiguous())):
            tensors[f"v{j}::{name}"] = part
    meta = {"eigenvalues": json.dumps([float(x) for x in lam]), "names": json.dumps(list(op.names)),
            "operator": cfg.operator, "n": str(Y.shape[1])}
    return Tensors(tensors, ids=None, metadata=meta)


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


def check_dtype(model, dtype: str) -> None:
    """A ValueError when the model's parameters are not all of `dtype`."""
    want = getattr(torch, dtype)
    got = {p.dtype for p in model.parameters()}
    if got and got != {want}:
        raise ValueError(f"the model's parameters are {sorted(str(g) for g in got)} but dtype={dtype!r}; pass "
                         "a matching dtype or convert the model")


def train_mode_note(model, was_training: bool | None = None) -> dict:
    """Whether the model came in train mode (curvature is computed in eval mode), with a warning for BatchNorm."""
    was = bool(model.training if was_training is None else was_training)
    bn = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if was and bn:
        warnings.warn(f"the model is in train mode and has {bn} layers; curvature is computed in eval mode "
                      "(running statistics). Recorded in the manifest (switched_to_eval).", stacklevel=4)
    return {"switched_to_eval": was, "batchnorm": bn}


def curvature_meta(cfg, objective: str, mode: dict) -> dict:
    """The manifest's "curvature" block as a run starts."""
    return {"operator": cfg.operator, "method": cfg.method, "objective": objective, "per": list(cfg.per),
            "density_scopes": list(cfg.density_scopes), "trace_scopes": list(cfg.trace_scopes),
            "top_k": cfg.top_k, "bottom_k": cfg.bottom_k, "tol": cfg.tol, "n_products": cfg.n_products,
            "n_probes": cfg.n_probes, "n_steps": cfg.n_steps, "lr": cfg.lr, "bulk_quantile": BULK_QUANTILE,
            **mode}


@dataclass
class CurvatureState:
    cfg: Any
    source: Source
    scopes: list[Scope]          # every scope, twins included (table order)
    twins: dict[str, str]        # scope name -> the earlier scope it equals
    loss: Any
    batches: list
    forward: Any
    counts: dict
    mode: dict
    op_info: dict = field(default_factory=dict)


def setup(cfg, source: Source, info) -> Plan:
    model = source.model
    if source.kind == "lm":
        check_dtype(model, cfg.dtype)
        mode = train_mode_note(model, source.extras.get("was_training", False))
        types = [t for t in _ORDER if t in cfg.per]
        scopes = weight_scopes(source.layers, types, [n for n, _ in model.named_parameters()])
        batches, counts = pooled_batches(cfg, source, info)
        loss, forward = "cross_entropy", causal_lm_forward
    else:
        mode = train_mode_note(model)
        scopes = module_scopes(model, source.extras.get("blocks"), cfg.per)
        batches, counts = source.batches, {"n_batches_total": len(source.batches)}
        loss, forward = source.loss, source.forward
    twins = {}
    for i, s in enumerate(scopes):
        j = twin_of(scopes, i, cfg)
        if j is not None:
            twins[s.name] = scopes[j].name
    units = [Unit(s.name, s, shard=f"{i:04d}") for i, s in enumerate(scopes) if s.name not in twins]
    state = CurvatureState(cfg, source, scopes, twins, loss, batches, forward, counts, mode)
    return Plan(units, state, finish=finish)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*curvature products are computed in eval mode.*")
            yield
    finally:
        model.train(was)


def compute(plan: Plan, units: list[Unit]) -> dict[str, Any]:
    st: CurvatureState = plan.state
    cfg, s = st.cfg, units[0].payload
    with _eval(st.source.model):
        op = operator_for(cfg, st.source.model, st.loss, st.batches, s.params, st.forward)
        st.op_info = op.info
        tables, vectors = scope_tables(cfg, op, s, density=s.scope_type in cfg.density_scopes,
                                       want_vectors=s.scope_type == "model", trace=s.scope_type in cfg.trace_scopes)
    if vectors is not None:
        tables["eigenvectors"] = eigenvector_tensors(op, vectors, cfg)
    return tables


def finish(plan: Plan, resumed: int) -> dict:
    """The manifest's curvature block: operator info, the scopes (twins named), data counts."""
    st: CurvatureState = plan.state
    cur = dict(read_manifest(plan.run_dir).get("curvature") or {})
    info = st.op_info
    cur.update({k: v for k, v in info.items() if k in ("sdpa_math", "normalisation", "world_size", "n_batches",
                                                       "loss", "loss_convention", "n_samples")})
    cur["sdpa_math"] = bool(info.get("sdpa_math", False))
    cur["switched_to_eval"] = bool(st.mode.get("switched_to_eval") or info.get("switched_to_eval", False))
    cur["scopes"] = [{**s.row(), "n_tensors": len(s.params), **({"twin_of": st.twins[s.name]}
                                                                  if s.name in st.twins else {})}
                     for s in st.scopes]
    cur.update({k: v for k, v in st.counts.items() if k != "examples"})
    return {"curvature": cur}


def meta(cfg, source: Source, plan: Plan) -> dict:
    """The manifest's curvature block as the run is created."""
    st: CurvatureState = plan.state
    objective = OBJECTIVE if source.kind == "lm" else f"mean {loss_name(st.loss)} over rows"
    return {"curvature": curvature_meta(cfg, objective, st.mode)}


def identity(cfg, source: Source, plan: Plan) -> dict:
    """The scopes' parameter blocks are part of a run's identity (a plain module's blocks are not options)."""
    return {"scopes": [[s.name, list(s.params)] for s in plan.state.scopes]}
