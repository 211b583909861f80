"""The built-in demo: fast vs slow (vs wrong slow) thinking on SmolLM2-135M-Instruct.

Runs the layer-wise gradient analysis of Li, Li, Zhou (ACL 2025) on the packaged arithmetic word problems:
every linear layer of all 30 blocks, response-only token-mean loss, then the group comparison and the report.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import LayersConfig, SummaryOptions
from ..data import EncodeOptions
from .problems import demo_records

__all__ = ["demo_config", "run_demo"]


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
