"""`GradsightLightningCallback`: the Monitor inside a (PyTorch) Lightning `Trainer`.

    trainer = pl.Trainer(callbacks=[GradsightLightningCallback(out="runs/train")], ...)

Lightning runs forward and backward inside a closure that it hands to ``optimizer.step(closure)``; the
Monitor wraps that closure, so it reads the gradients after the closure (backward, unscaling and Lightning's
gradient clipping) and before the update, and the pre-clip norms at the end of each backward as always.
Under 16-bit mixed precision the precision plugin's GradScaler is attached. The step's loss is read from
``training_step``'s output. Manual optimization and several optimizers: the first optimizer is watched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from .monitor import Monitor

__all__ = ["GradsightLightningCallback"]


class GradsightLightningCallback(pl.Callback):
    """Builds a `Monitor` on fit start, records the loss per batch, closes it (summary, report) on fit end.

    Args:
        out: the monitor's run directory (None: in memory).
        **monitor_kwargs: passed to `Monitor`.
    """

    def __init__(self, out: str | Path | None = None, **monitor_kwargs: Any):
        super().__init__()
        self.out = out
        self.kwargs = monitor_kwargs
        self.monitor: Monitor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise ValueError("GradsightLightningCallback: the LightningModule configured no optimizer")
        opt = trainer.optimizers[0]
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer / strategy wrappers
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        acc = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        meta = {"trainer": "lightning", "accumulate_grad_batches": acc,
                "gradient_clip_val": getattr(trainer, "gradient_clip_val", None)}
        self.monitor = Monitor(pl_module, opt, scaler=scaler, out=self.out, start_step=int(trainer.global_step),
                               meta={**meta, **self.kwargs.pop("meta", {})}, **self.kwargs)
        self.monitor.loss_from_outputs = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.monitor is not None:  # training_step need not call the module's forward: arm per-example here
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            self.monitor.begin_batch(mask if mask is not None and getattr(mask, "dim", lambda: 0)() == 2 else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # the optimizer step of this batch (if any) has run: it belongs to the last step
            self.monitor.record(max(int(trainer.global_step) - 1, 0), "loss", loss.detach().float())

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
