"""Watch gradients while a model trains: `Monitor` (any loop), HF / Lightning callbacks, diagnoses, reports.

    from gradsight.train import Monitor
    mon = Monitor(model, optimizer, out="runs/train")
    ... train as usual ...
    mon.close()            # summarise, diagnose, write runs/train/report.html

`GradsightCallback` (HF Trainer and TRL trainers) and `GradsightLightningCallback` are thin shims over the
Monitor, imported lazily so that neither transformers nor lightning is imported by `gradsight.train`.
"""

from __future__ import annotations

from .monitor import DEFAULT_EVERY, MEASURES, Monitor, Thresholds, dpo_terms, psr_nsr_terms
from .schedule import Schedule

__all__ = ["Monitor", "Thresholds", "Schedule", "DEFAULT_EVERY", "MEASURES", "psr_nsr_terms", "dpo_terms",
           "GradsightCallback", "GradsightLightningCallback"]


def __getattr__(name: str):
    if name == "GradsightCallback":
        from .hf import GradsightCallback

        return GradsightCallback
    if name == "GradsightLightningCallback":
        from .lightning import GradsightLightningCallback

        return GradsightLightningCallback
    raise AttributeError(name)
