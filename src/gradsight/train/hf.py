"""`GradsightCallback`: the Monitor inside a Hugging Face `Trainer` (and TRL's SFT/DPO/GRPO trainers, which are
Trainer subclasses).

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradsightCallback(out="runs/train")])
    trainer.train()                 # RUN/report.html and the diagnoses are written when training ends

Why it reads more than `on_pre_optimizer_step` can: in a Trainer optimizer step the order is backward(s) ->
clip (the pre-clip total norm is what Trainer logs as ``grad_norm``) -> on_pre_optimizer_step ->
optimizer.step() -> on_optimizer_step -> ... -> on_step_end. A callback only sees CLIPPED gradients; the
Monitor's end-of-backward read gives the pre-clip per-layer norms (their root-sum-square is Trainer's
``grad_norm``), and its optimizer hooks give the clipped ones and the update. The optimizer Trainer passes is
accelerate's `AcceleratedOptimizer`: the hooks go on the optimizer it wraps, and its GradScaler (fp16) is
used to unscale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .monitor import Monitor, optimizer_meta

__all__ = ["GradsightCallback"]


class GradsightCallback(TrainerCallback):
    """A thin shim: builds a `Monitor` when training begins, closes it (summary, diagnoses, report) at the end.

    Args:
        out: the monitor's run directory (None: in memory; `callback.monitor` holds the numbers).
        **monitor_kwargs: passed to `Monitor` (every=, params=, layers=, thresholds=, tensorboard=, ...).

    Trainer's own logs (loss, learning_rate, grad_norm as logged) are recorded too, as metrics "hf:KEY" at
    the step they describe.
    """

    def __init__(self, out: str | Path | None = None, **monitor_kwargs: Any):
        self.out = out
        self.kwargs = monitor_kwargs
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("GradsightCallback: the Trainer passed no model to on_train_begin")
        if optimizer is None:
            raise ValueError("GradsightCallback: the Trainer passed no optimizer to on_train_begin (a custom "
                             "training loop? use gradsight.train.Monitor directly)")
        if getattr(args, "deepspeed", None):
            raise ValueError("GradsightCallback does not support DeepSpeed: its engine owns the gradients "
                             "(ZeRO partitions them); use DDP or FSDP")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        scaler = getattr(optimizer, "scaler", None)
        world = max(1, int(getattr(args, "world_size", 1) or 1))
        batch = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world
        meta = {"trainer": "transformers.Trainer", "max_grad_norm": args.max_grad_norm,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "optimizer": optimizer_meta(inner)}
        self.monitor = Monitor(model, inner, scaler=scaler, out=self.out, start_step=int(state.global_step),
                               batch_size=batch, meta={**meta, **self.kwargs.pop("meta", {})}, **self.kwargs)
        self.monitor.loss_from_outputs = False  # the loss comes from Trainer's logs (on_log)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or not logs:
            return
        step = max(int(state.global_step) - 1, 0)  # logs come after global_step was incremented
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.monitor.record(step, f"hf:{k}", float(v))
        if isinstance(logs.get("loss"), (int, float)):
            # Trainer's own loss (its normalisation across accumulated micro-batches; with logging_steps=k,
            # the mean over the k steps)
            self.monitor.record(step, "loss", float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()

