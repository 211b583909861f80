"""The built-in demo: fast vs slow (vs wrong slow) thinking on SmolLM2-135M-Instruct.

1. layers: the layer-wise gradient analysis of Li, Li, Zhou (ACL 2025) on the packaged arithmetic word
   problems: every linear layer of all 30 blocks, response-only token-mean loss, group comparison, report.
2. geometry (into OUT/geometry): the same answers as plain groups, as preference pairs (chosen = correct
   step-by-step, rejected = wrong step-by-step) and as rewarded rollouts; alignment, conflict, entanglement,
   PSR/NSR, G-Vendi and noise, with its own report.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import GeometryConfig, LayersConfig, SummaryOptions
from ..data import EncodeOptions
from .problems import demo_records, geometry_records

__all__ = ["demo_config", "run_demo", "run_geometry_demo"]


def demo_config(model: str = "smollm2-135m-instruct", **overrides) -> LayersConfig:
    base = dict(model=model, data=f"builtin:demo-arithmetic", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, summary=SummaryOptions(reference="slow"))
    base.update(overrides)
    return LayersConfig(**base)


def run_demo(out: str | Path = "runs/demo", n_problems: int = 60, model: str = "smollm2-135m-instruct",
             progress: bool = True, **overrides):
    """Run the demo analysis into `out` and write the report. Returns the LayersResult."""
    from ..pipeline import run_layers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = demo_config(model, data=f"builtin:demo-arithmetic-{n_problems}", **overrides)
    return run_layers(cfg, out, progress=progress, records=demo_records(n_problems=n_problems))


def run_geometry_demo(out: str | Path = "runs/demo/geometry", n_problems: int = 30,
                      model: str = "smollm2-135m-instruct", progress: bool = True, **overrides):
    """The geometry part of the demo (8 loss terms per problem). Returns the GeometryResult."""
    from ..geometry import run_geometry

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = dict(model=model, data=f"builtin:demo-geometry-{n_problems}", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, target="slow")
    base.update(overrides)
    return run_geometry(GeometryConfig(**base), out, progress=progress, records=geometry_records(n_problems))
