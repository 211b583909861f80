"""The landscape analysis: the loss along 1-D slices / 2-D grids of directions, or along a segment.

Units are chunks of points: for a language model one row of a 2-D grid or one point of a slice or of an
interpolation path (a killed run re-evaluates only the missing chunks; the model is evaluated in eval mode
by every rank on its share of the data, the pooled loss all-reduced); for a plain module the whole grid is
one unit, so the vectorised path (``batch_points``, "auto" by default) sees every point at once.

Directions: filter-normalised random (seeded by seed + j), the top-2 eigenvectors of a curvature run of the
same model (`from_curvature`), the principal components of a checkpoint trajectory, the unit gradient of the
objective (2-D: plus a random axis), or the segment towards a second model. They are built once, before the
first chunk (`prepare`), and only when there is work to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ... import landscape as ls
from ...curvature.operators import causal_lm_forward, resolve_loss
from ...inputs.lm import Source, pooled_batches
from ...inputs.models import load_model
from ...inputs.module import loss_name
from ...runs.registry import Plan, Unit
from ...runs.store import read_manifest
from ..curvature.compute import OBJECTIVE, check_dtype, load_eigenvectors

__all__ = ["setup", "compute", "finish", "meta", "identity", "PooledLoss", "hessian_axes"]


class PooledLoss:
    """loss(model) -> float: the curvature objective (token-mean over all supervised tokens, all ranks)."""

    def __init__(self, batches, info):
        self.batches, self.info = batches, info

    def __call__(self, model) -> float:
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for b in self.batches:
                logits, labels = causal_lm_forward(model, b)
                total[0] += float(F.cross_entropy(logits, labels, reduction="sum"))
                total[1] += labels.numel()
        if self.info.world_size > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1])


def hessian_axes(model: nn.Module, run, dims: int, fingerprint: str) -> list:
    """The top-`dims` eigenvectors stored by a curvature run of this very model, as landscape directions."""
    if run is None:
        raise ValueError("kind hessian needs from_curvature (a curvature run directory with eigenvectors)")
    vnames, vecs, lam = load_eigenvectors(run)
    fp = (read_manifest(Path(run)).get("model") or {}).get("fingerprint")
    if fp != fingerprint:
        raise ValueError(f"from_curvature {run}: its eigenvectors belong to another model (fingerprint {fp} vs "
                         f"{fingerprint})")
    have = dict(model.named_parameters())
    missing = [n for n in vnames if n not in have]
    if missing:
        raise ValueError(f"from_curvature {run}: parameters {missing[:3]} are not in the model")
    if len(vecs) < dims:
        raise ValueError(f"from_curvature {run} holds {len(vecs)} eigenvector(s); dims={dims} needs {dims} "
                         "(rerun the curvature with top_k >= 2, or use dims=1)")
    return ls.hessian_directions([(n, have[n]) for n in vnames], [vecs[j] for j in range(dims)],
                                 eigenvalues=lam[:dims])


def lm_gradient_direction(model, batches, names: list[str], info):
    """The unit gradient of the pooled token-mean loss (all ranks) w.r.t. the named weights, as a Direction."""
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
        for g in grads:
            torch.distributed.all_reduce(g)
        torch.distributed.all_reduce(count)
    gn = math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) / float(count)
    if gn == 0:
        raise ValueError("the gradient of the loss is zero on these weights: no gradient direction")
    parts = [(g / float(count) / gn).to(p.dtype) for g, p in zip(grads, params)]
    return ls.Direction(parts, names, kind="gradient", grad_norm=gn, norm="unit")


def lm_pca_directions(cfg, model, names: list[str]):
    """Top principal components of the checkpoints in cfg.trajectory around the model (selected weights)."""
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


@dataclass
class LandscapeState:
    cfg: Any
    source: Source
    info: Any
    loss: Any                       # loss(model) -> float
    names: list[str]                # the perturbed tensors (LM: the selected layers' weights)
    coords: np.ndarray              # (N, dims) grid coefficients, or (N, 1) interpolation t
    counts: dict
    directions: list = field(default_factory=list)
    states: tuple | None = None     # interpolation: (state_a, state_b)
    extra_meta: dict = field(default_factory=dict)
    last_meta: dict = field(default_factory=dict)


def setup(cfg, source: Source, info) -> Plan:
    model = source.model
    if source.kind == "lm":
        check_dtype(model, cfg.dtype)
        batches, counts = pooled_batches(cfg, source, info)
        loss = PooledLoss(batches, info)
        have = dict(model.named_parameters())
        names = [n for n in dict.fromkeys(f"{li.name}.weight" for li in source.layers) if n in have]
    else:
        batches, counts = source.batches, {}
        loss = ls.BatchLoss(batches, resolve_loss(source.loss))
        names = []
    if cfg.kind == "interpolate":
        C = np.asarray(cfg.ts(), dtype=np.float64).reshape(-1, 1)
    else:
        axes = [cfg.axis()] * cfg.dims
        C = ls.coefficients(*axes).numpy()
    st = LandscapeState(cfg, source, info, loss, names, C, counts)
    n = len(C)
    if source.kind == "module":
        units = [Unit(0, (0, n), shard=f"{0:06d}")]
    else:
        size = 1 if (cfg.kind == "interpolate" or cfg.dims == 1) else len(cfg.axis())
        units = [Unit(lo, (lo, min(lo + size, n)), shard=f"{lo:06d}") for lo in range(0, n, size)]
    return Plan(units, st, prepare=prepare, finish=finish)


def prepare(plan: Plan) -> None:
    """Build the directions (or the interpolation's two states) once, before the first chunk."""
    st: LandscapeState = plan.state
    cfg, src, model = st.cfg, st.source, st.source.model
    norm = None if cfg.norm == "none" else cfg.norm
    lm = src.kind == "lm"
    ignore = src.extras.get("ignore", "biasbn")
    kw = {"names": st.names} if lm else {"ignore": ignore}
    if cfg.kind == "interpolate":
        if lm:
            other, _ = load_model(cfg.to, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
            state_b = {k: v.to(src.device) for k, v in other.state_dict().items()}
        else:
            state_b = src.extras["to"]
        st.states = ({k: v.detach().clone() for k, v in model.state_dict().items()}, state_b)
    elif cfg.kind == "random":
        st.directions = [ls.random_direction(model, seed=cfg.seed + j, norm=norm, **kw) for j in range(cfg.dims)]
    elif cfg.kind == "hessian":
        st.directions = hessian_axes(model, cfg.from_curvature, cfg.dims, src.identity["model_fingerprint"])
    elif cfg.kind == "gradient":
        st.directions = [lm_gradient_direction(model, st.loss.batches, st.names, st.info) if lm
                         else ls.gradient_direction(model, lambda m: st.loss.value(m))]
        if cfg.dims == 2:
            st.directions.append(ls.random_direction(model, seed=cfg.seed, norm=norm, **kw))
    else:  # pca
        if lm:
            st.directions, st.extra_meta["pca"] = lm_pca_directions(cfg, model, st.names)
        else:
            traj = src.extras["trajectory"]
            ds, pca = ls.pca_directions(traj, final=model.state_dict(), like=model, k=cfg.dims)
            if len(ds) < cfg.dims:
                raise ValueError(f"the trajectory spans {len(ds)} direction(s); dims={cfg.dims} needs {cfg.dims}")
            st.directions = ds
            st.extra_meta["pca"] = {"explained_variance_ratio": pca["explained_variance_ratio"],
                                    "coords": pca["coords"].to_dict("list")}


def compute(plan: Plan, units: list[Unit]) -> dict[str, pd.DataFrame]:
    st: LandscapeState = plan.state
    cfg, src, model = st.cfg, st.source, st.source.model
    lo, hi = units[0].payload
    C = torch.as_tensor(st.coords[lo:hi])
    module = src.kind == "module"
    bn = src.batches if module and src.extras.get("recompute_bn") else None
    if cfg.kind == "interpolate":
        res = ls.interpolate(model, st.states[0], st.states[1], st.loss, C[:, 0].numpy(), recompute_bn=bn)
        losses, meta = res.frame["loss"].to_numpy(), res.meta
    else:
        bp = src.extras.get("batch_points", "auto") if module else 1
        losses, meta = ls.evaluate_points(model, st.loss, st.directions, C, batch_points=bp, recompute_bn=bn)
    st.last_meta = meta
    beta = C[:, 1].numpy() if C.shape[1] == 2 else np.full(hi - lo, np.nan)
    return {"points": pd.DataFrame({"point": np.arange(lo, hi), "alpha": C[:, 0].numpy(), "beta": beta,
                                    "loss": losses})}


def finish(plan: Plan, resumed: int) -> dict:
    """The manifest's landscape block: directions, path, counts, the centre loss and the barrier."""
    st: LandscapeState = plan.state
    cfg, src, model = st.cfg, st.source, st.source.model
    center = float(st.loss(model)) if cfg.kind != "interpolate" else None  # collective for LMs
    if not plan.info.is_main:
        return {}
    pts = read_points(plan.run_dir)
    losses = pts["loss"].to_numpy(dtype=np.float64)
    meta = dict(st.last_meta)
    meta.update(n_points=len(pts), n_nonfinite=int((~np.isfinite(losses)).sum()), resumed_chunks=resumed)
    if cfg.kind == "interpolate":
        meta["barrier"] = ls.interpolation_barrier(pts["alpha"].to_numpy(), np.where(np.isfinite(losses), losses,
                                                                                      np.nan))
        meta.pop("kind", None)
    else:
        meta["kind"] = "slice_1d" if cfg.dims == 1 else "grid_2d"
        meta["directions"] = [dict(getattr(d, "meta", {})) for d in st.directions]
    meta = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    if src.kind == "lm":
        n_params = int(sum(dict(model.named_parameters())[n].numel() for n in st.names))
        objective = OBJECTIVE
    else:
        n_params = int(sum(p.numel() for p in model.parameters()))
        objective = f"mean {loss_name(src.loss)} over all rows"
        meta["n_batches"] = len(src.batches)
    meta.update(kind=cfg.kind, dims=1 if cfg.kind == "interpolate" else cfg.dims, n_params=n_params,
                objective=objective, center_loss=center,
                **{k: v for k, v in st.counts.items() if k != "examples"}, **st.extra_meta)
    return {"landscape": json.loads(json.dumps(meta, default=str))}


def read_points(run: Path) -> pd.DataFrame:
    """Every evaluated point of a run, in point order."""
    files = sorted((Path(run) / "points").glob("*.parquet"))
    if not files:
        return pd.DataFrame({"point": [], "alpha": [], "beta": [], "loss": []})
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).sort_values("point").reset_index(drop=True)


def meta(cfg, source: Source, plan: Plan) -> dict:
    """landscape_options: the settings the report lists."""
    opts = {"kind": cfg.kind, "dims": cfg.dims, "steps": cfg.steps, "span": cfg.span, "norm": cfg.norm,
            "from_curvature": cfg.from_curvature, "to": cfg.to, "trajectory": list(cfg.trajectory)}
    if source.kind == "module":
        opts.update(ignore=source.extras.get("ignore", "biasbn"), recompute_bn=bool(source.extras.get("recompute_bn")))
    out = {"landscape_options": opts}
    if source.kind == "lm":
        out["loss"] = {"objective": OBJECTIVE, "mode": "eval", "dtype": cfg.dtype}
    return out


def identity(cfg, source: Source, plan: Plan) -> dict:
    """A plain module's direction options that are not config options (they change the losses)."""
    if source.kind != "module":
        return {}
    return {"module_options": {"ignore": source.extras.get("ignore", "biasbn"),
                               "recompute_bn": bool(source.extras.get("recompute_bn"))}}
