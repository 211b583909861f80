"""The built-in demo: fast vs slow (vs wrong slow) thinking on SmolLM2-135M-Instruct.

1. layers: the layer-wise gradient analysis of Li, Li, Zhou (ACL 2025) on the packaged arithmetic word
   problems: every linear layer of all 30 blocks, response-only token-mean loss, group comparison, report.
2. geometry (into OUT/geometry): the same answers as plain groups, as preference pairs (chosen = correct
   step-by-step, rejected = wrong step-by-step) and as rewarded rollouts; alignment, conflict, entanglement,
   PSR/NSR, G-Vendi and noise, with its own report.
3. curvature (into OUT/curvature): the Hessian of an MLP trained here on scikit-learn's bundled digits (top-20
   eigenvalues, outliers against the SLQ bulk, trace, density, per-layer top eigenvalues), its loss landscape
   along the top-2 Hessian eigenvectors and along filter-normalised random directions, the linear
   interpolation to a second MLP trained from another seed (mode connectivity), and the per-block top Hessian
   eigenvalue of SmolLM2-135M-Instruct on a few of the built-in problems. Four curvature/landscape reports.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..analyses.curvature import CurvatureConfig, curvature_of, run_curvature
from ..analyses.geometry import GeometryConfig, run_geometry
from ..analyses.landscape import landscape_of
from ..analyses.layers import LayersConfig, run_layers
from ..config import EncodeOptions, SummaryOptions
from .problems import demo_records, geometry_records

__all__ = ["demo_config", "run_demo", "run_geometry_demo", "run_curvature_demo"]

NET = "digits MLP 64-32-32-10 (seed 0)"


def demo_config(model: str = "smollm2-135m-instruct", **overrides) -> LayersConfig:
    base = dict(model=model, data="builtin:demo-arithmetic", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, summary=SummaryOptions(reference="slow"))
    base.update(overrides)
    return LayersConfig(**base)


def run_demo(out: str | Path = "runs/demo", n_problems: int = 60, model: str = "smollm2-135m-instruct",
             progress: bool = True, **overrides):
    """Run the demo analysis into `out` and write the report. Returns the LayersResult."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = demo_config(model, data=f"builtin:demo-arithmetic-{n_problems}", **overrides)
    return run_layers(cfg, out, progress=progress, records=demo_records(n_problems=n_problems))


def run_geometry_demo(out: str | Path = "runs/demo/geometry", n_problems: int = 30,
                      model: str = "smollm2-135m-instruct", progress: bool = True, **overrides):
    """The geometry part of the demo (8 loss terms per problem). Returns the GeometryResult."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = dict(model=model, data=f"builtin:demo-geometry-{n_problems}", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, target="slow")
    base.update(overrides)
    return run_geometry(GeometryConfig(**base), out, progress=progress, records=geometry_records(n_problems))


def run_curvature_demo(out: str | Path = "runs/demo/curvature", lm_problems: int = 1,
                       model: str = "smollm2-135m-instruct", progress: bool = True, lm: bool = True) -> dict:
    """The curvature part of the demo; returns {name: run directory} of the runs it wrote (each with a report).

    digits: `curvature_of` on the trained MLP (model scope: top-20 eigenvalues, Hutch++ trace, SLQ density
    with 3 probes x 100 steps; each layer: top-20 and trace), then `landscape_of` along the top-2 eigenvectors
    and along two filter-normalised random directions (21 x 21 grids), and the interpolation towards the
    seed-1 MLP. smollm2 (lm=True): `run_curvature` on `lm_problems` built-in problems x {fast, slow, wrong},
    the Hessian of the token-mean loss restricted to each transformer block's linear weights (and to all of
    them): the top eigenvalue by Lanczos (residual tolerance 1e-2, so the eigenvalue is good to about 1e-4
    relative), without trace or density (each product costs about 3 plain forward+backward passes).
    """
    from .digits import load_digits_tensors, train_digits_mlp

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out)
    data = load_digits_tensors()
    net, (X, y), _, _ = train_digits_mlp(data=data, seed=0)
    other, *_ = train_digits_mlp(data=data, seed=1)
    batches = [(X, y)]
    runs = {}
    runs["digits"] = curvature_of(net, "cross_entropy", batches, out / "digits", per=("model", "block"),
                                  top_k=20, tol=1e-6, n_products=99, n_probes=3, n_steps=100,
                                  progress=progress, report=True, name=NET).path
    for name, kw in (("digits-hessian-plane", dict(kind="hessian", from_curvature=runs["digits"])),
                     ("digits-random-plane", dict(kind="random")),
                     ("digits-interpolation", dict(kind="interpolate", to=other, dims=1))):
        runs[name] = landscape_of(net, "cross_entropy", batches, out / name, steps=21, report=True, name=NET,
                                  **kw).path
    if lm:
        cfg = CurvatureConfig(model=model, data=f"builtin:demo-arithmetic-{lm_problems}",
                              encode=EncodeOptions(max_length=512), token_budget=4096, max_batch=64,
                              per=("model", "block"), top_k=1, tol=1e-2, max_iter=40, trace_scopes=(),
                              density_scopes=())
        runs["smollm2"] = run_curvature(cfg, out / "smollm2", records=demo_records(n_problems=lm_problems),
                                        progress=progress).path
    return runs
