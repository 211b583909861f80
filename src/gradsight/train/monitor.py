"""`Monitor`: watch gradients while a model trains, in any loop, and record them per step and per layer.

    mon = Monitor(model, optimizer, out="runs/train")       # attach (hooks only; the loop is unchanged)
    for batch in data:
        loss = model(**batch).loss
        loss.backward()                                      # pre-clip norms are read when backward ends
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()                                     # post-clip norms before, update ratio after
        optimizer.zero_grad()
    mon.close()                                              # flush, summarise, diagnose, report

Where the numbers are read (the facts that decide whether they are right; anchors/monitor-transforms §2.1):

- **Pre-clip gradients** are read at the END of every backward pass, from a callback queued on the autograd
  engine from inside a callback (so it runs after every callback queued during the backward, including
  DDP's gradient all-reduce): the gradient is final for that backward and already averaged across ranks, and
  clipping has not happened yet. Under gradient accumulation the last backward before the optimizer step
  wins (the sync step: the accumulated gradient). Under fp16 AMP the values are divided by the GradScaler's
  scale of that backward (the wandb #4369 failure is logging scaled gradients).
- **The gradient the optimizer receives** (after clipping and any transform) is read in an optimizer step
  pre-hook; the update ‖Δθ‖/‖θ‖ in a step post-hook from a copy of θ taken in the pre-hook.
- **Skipped AMP steps** (GradScaler found inf/NaN) run no optimizer hook; the monitor wraps the scaler's
  `step` to record them as skipped, with their non-finite layers.
- Per-step values stay on the device; one host transfer per flush (`flush_every` steps). Hooks are excluded
  from torch.compile (`torch._dynamo.disable`), so a compiled model keeps its graphs.
- DTensor (FSDP2) gradients are reduced to full-tensor norms (`.full_tensor()` of the norm), not shard norms.

Measures and their default schedules (`every=`; an int N, "log", a callable or None = off):

    norms        1     pre/post-clip norm per parameter tensor and in total, clip coefficient, non-finite count
    update       1     ‖Δθ_l‖/‖θ_l‖ and ‖θ_l‖ (needs the optimizer)
    spikes       1     z-score of log‖g_l‖ against its EMA, max|g| against Stable-SPAM's EMA, SPAM's element
                       rule g² > θ·v on Adam's v (when the optimizer keeps exp_avg_sq)
    per_example  10    per-example gradient norms of every Linear layer from the factored capture (quantiles),
                       gradient noise scale B_simple (EMAs of the unbiased |G|² and tr Σ, per layer and total)
    gsnr         None  cockpit's GSNR per layer (materialises per-example gradients of layers under a size cap)
    terms        10    gradients of named loss terms (`mon.terms(...)`): norms and pairwise cosines per layer
    microbatch   None  under gradient accumulation: cosine of each micro-batch's gradient with the sum of the
                       earlier ones of the step, per layer (one extra gradient copy on those steps; one process)
    sharpness    None  λmax of the (Adam-preconditioned) Hessian on a fixed probe batch vs its threshold
    softmax      None  softmax collapse (fp32, bf16) and the zero-loss share at the output layer
    hist         1000  64-bin gradient histograms (TensorBoard sink)

Alerts (online, per layer, in the run's ALERTS table and `mon.alerts`): SPAM's rule fired, |z| of log‖g_l‖ ≥
`z_alert`, max|g| ≥ `max_abs_alert` × its EMA, non-finite gradients, sharpness above its threshold.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import schema as S
from .detectors import NoiseAccumulator, SpikeDetector, Thresholds, is_dtensor
from .detectors import norms as _norms
from .schedule import Schedule
from .terms import dpo_terms, psr_nsr_terms

__all__ = ["Monitor", "Thresholds", "DEFAULT_EVERY", "MEASURES", "psr_nsr_terms", "dpo_terms", "optimizer_meta"]

DEFAULT_EVERY: dict[str, Any] = {"norms": 1, "update": 1, "spikes": 1, "per_example": 10, "gsnr": None,
                                 "terms": 10, "microbatch": None, "sharpness": None, "softmax": None, "hist": 1000}
MEASURES = tuple(DEFAULT_EVERY)
NEEDS_OPTIMIZER = ("update",)


def _no_compile(fn):
    try:
        return torch._dynamo.disable(fn)
    except Exception:  # pragma: no cover - very old torch
        return fn


class Monitor:
    """Record gradient statistics of `model` while it trains (see the module docstring).

    Args:
        model: the model being trained (its trainable parameters are watched; `params` narrows them).
        optimizer: the torch.optim optimizer; needed by `update`, SPAM's rule and `sharpness` (also attachable
            later with `attach_optimizer`, as the HF callback does).
        scaler: a torch.amp.GradScaler under fp16 AMP (gradients are unscaled for every number).
        out: run directory (parquet shards, resumable; see `train.schema`); None: keep in memory only.
        every: {measure: schedule} overriding `DEFAULT_EVERY`.
        params: regex on parameter names to watch (default: every parameter that requires grad).
        layers: regex on Linear module names for `per_example` (default: every nn.Linear / Conv1D).
        loss_fn, probe: ``loss_fn(model, batch) -> scalar`` and a fixed probe batch for `sharpness`.
        output: the module whose output are the logits for `softmax` ("auto": get_output_embeddings(), or
            the last Linear).
        thresholds: detector settings (`Thresholds`).
        flush_every: steps between host transfers / shard commits.
        tensorboard: True (RUN/tb) or a log directory: also write TensorBoard event files.
        start_step: the step the training resumes from (rows written again for later steps replace old ones).
        batch_size: examples per optimizer step (manifest; diagnoses compare the noise scale with it).
        meta: extra informational manifest fields.
        on_alert: called with each alert dict when it is raised (at flush).
        report: write the report on `close()` (needs `out`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, scaler=None,
                 out: str | Path | None = None, every: Mapping[str, Any] | None = None,
                 params: str | None = None, layers: str | None = None,
                 loss_fn: Callable | None = None, probe: Any = None, output: Any = "auto",
                 thresholds: Thresholds | None = None, flush_every: int = 50,
                 tensorboard: bool | str | Path = False, start_step: int = 0, batch_size: int | None = None,
                 meta: Mapping[str, Any] | None = None, on_alert: Callable[[dict], None] | None = None,
                 report: bool = True):
        unknown = sorted(set(every or {}) - set(MEASURES))
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; known: {', '.join(MEASURES)}")
        self.every = {k: Schedule.of(v, what=f"every[{k!r}]")
                      for k, v in {**DEFAULT_EVERY, **dict(every or {})}.items()}
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r} makes no sense; use an int >= 1")
        self.model = model
        self.th = thresholds or Thresholds()
        self.flush_every = flush_every
        self.on_alert = on_alert
        self.loss_fn, self.probe_batch = loss_fn, probe
        self._write_report = report
        pat = re.compile(params) if params else None
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (pat is None or pat.search(n))]
        if not self.named:
            raise ValueError(f"no trainable parameter matches params={params!r}")
        self.names = [n for n, _ in self.named]
        self.plist = [p for _, p in self.named]
        self.L = len(self.plist)
        if self.every["sharpness"].on and (loss_fn is None or probe is None):
            raise ValueError("the 'sharpness' measure needs loss_fn=(model, batch) -> loss and a fixed probe "
                             "batch (probe=...)")
        self.step = int(start_step)
        self._opt0 = optimizer
        self.alerts: list[dict] = []
        self.optimizer = None
        self.scaler = scaler
        self._handles: list = []
        self._buffer: list[tuple[int, str, list[str] | None, str, torch.Tensor]] = []
        self._flushed: list[pd.DataFrame] = []
        self._losses: list[torch.Tensor] = []
        self._auto_loss = True
        self._armed = False
        self._pre: torch.Tensor | None = None
        self._pre_nonfinite: torch.Tensor | None = None
        self._stepped = False
        self._saved: list[torch.Tensor] | None = None
        self._micro = 0
        self._closed = False
        self._spike = SpikeDetector(self.L, self.plist[0].device, self.th)
        self._nan = self._spike.nan
        # per-example capture
        self._pe_layers = self._linear_layers(layers) if (self.every["per_example"].on or self.every["gsnr"].on) else {}
        self._pe_names = [_weight_name(n) for n in self._pe_layers]
        self._capture = None
        self._tape = None
        self._noise = NoiseAccumulator(self._pe_names, self.th.noise_ema)
        self._tokens = None
        # probes
        self._sharp = None
        self._softmax = None
        if self.every["softmax"].on:
            from .probes import SoftmaxCollapseProbe

            self._softmax = SoftmaxCollapseProbe(self._output_module(output))
        self._quiet_sharpness: set[int] = set()
        self._mb_prev, self._mb_cos = None, []
        # sinks
        self.sinks: list = []
        self.out = Path(out) if out is not None else None
        self._rank0 = _rank() == 0
        if self.out is not None and self._rank0:
            from .sinks import RunSink, TensorBoardSink

            self.sinks.append(RunSink(self.out, self.identity(), self._meta(batch_size, meta)))
            if tensorboard:
                logdir = self.out / "tb" if tensorboard is True else Path(tensorboard)
                self.sinks.append(TensorBoardSink(logdir))
        elif tensorboard and self._rank0:
            if tensorboard is True:
                raise ValueError("tensorboard=True writes into the run directory: give out=..., or a log "
                                 "directory as tensorboard=PATH")
            from .sinks import TensorBoardSink

            self.sinks.append(TensorBoardSink(Path(tensorboard)))
        self._install()
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        elif self.every["update"].on and every is not None and "update" in every and every["update"]:
            raise ValueError("the 'update' measure needs the optimizer: Monitor(model, optimizer, ...) or "
                             "attach_optimizer(optimizer) before training")

    # --- set-up --------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"every": {k: s.describe() for k, s in self.every.items()},
                "thresholds": asdict(self.th),
                "params": {n: list(p.shape) for n, p in self.named},
                "per_example_layers": self._pe_names}

    def _meta(self, batch_size, meta) -> dict:
        return {"batch_size": batch_size, "world_size": _world(), "start_step": self.step,
                "model": _model_meta(self.model), "optimizer": optimizer_meta(self._opt0),
                **(dict(meta or {}))}

    def _linear_layers(self, pattern: str | None) -> dict[str, nn.Module]:
        from ..capture.hooks import is_factorable

        pat = re.compile(pattern) if pattern else None
        watched = set(map(id, self.plist))
        out = {n: m for n, m in self.model.named_modules()
               if is_factorable(m) and id(m.weight) in watched and (pat is None or pat.search(n))}
        if not out:
            raise ValueError(f"per_example: no Linear layer with a watched weight matches layers={pattern!r}")
        return out

    def _output_module(self, output) -> nn.Module:
        if isinstance(output, nn.Module):
            return output
        if isinstance(output, str) and output != "auto":
            return dict(self.model.named_modules())[output]
        get = getattr(self.model, "get_output_embeddings", None)
        mod = get() if callable(get) else None
        if mod is None:
            linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("softmax: no output layer found; pass output=MODULE")
            mod = linears[-1]
        return mod

    def _install(self) -> None:
        hook = _no_compile(self._on_grad)
        for p in self.plist:
            self._handles.append(p.register_post_accumulate_grad_hook(hook))
        self._handles.append(self.model.register_forward_pre_hook(_no_compile(self._on_forward_pre),
                                                                  with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(_no_compile(self._on_forward)))
        if self.scaler is not None:
            self._wrap_scaler(self.scaler)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer`'s steps (pre-hook: post-clip gradients; post-hook: update, step boundary)."""
        if self.optimizer is optimizer:
            return
        self.optimizer = optimizer
        self._handles.append(optimizer.register_step_pre_hook(_no_compile(self._before_step)))
        self._handles.append(optimizer.register_step_post_hook(_no_compile(self._after_step)))
        if self.every["sharpness"].on:
            from .probes import SharpnessProbe, stability_threshold

            stability_threshold(optimizer)  # an optimizer without a known threshold fails here, not mid-run
            self._sharp = SharpnessProbe(self.model, self.loss_fn, self.probe_batch, params=self.plist)

    def attach_scaler(self, scaler) -> None:
        self.scaler = scaler
        self._wrap_scaler(scaler)

    def _wrap_scaler(self, scaler) -> None:
        if getattr(scaler, "_gradsight_wrapped", False) or not getattr(scaler, "is_enabled", lambda: False)():
            return
        real = scaler.step

        def step(optimizer, *args, **kwargs):
            self._stepped = False
            out = real(optimizer, *args, **kwargs)
            if not self._stepped and optimizer is self.optimizer:
                self._record_skipped()
            return out

        scaler.step = step
        scaler._gradsight_wrapped = True

    def due(self, measure: str) -> bool:
        """Whether `measure` runs at the current step."""
        if measure not in self.every:
            raise ValueError(f"unknown measure {measure!r}; known: {', '.join(MEASURES)}")
        return self.every[measure](self.step)

    # --- hooks ---------------------------------------------------------------------------------------------
    def _on_forward_pre(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.begin_batch(mask if torch.is_tensor(mask) and mask.dim() == 2 else None, training=module.training)
        return None

    def begin_batch(self, attention_mask: torch.Tensor | None = None, *, training: bool = True) -> None:
        """Declare the start of a micro-batch's forward. Called by the model's forward pre-hook; call it
        yourself (Lightning's callback does) when the loop never calls the watched module's forward
        (e.g. ``training_step`` calls submodules), so the scheduled per-example capture is armed.

        Args:
            attention_mask: (B, T) real tokens of the batch (padding is left out of the per-example factors).
        """
        self._tokens = attention_mask
        if torch.is_grad_enabled() and training and self._capture is None and self._pe_layers and (
                self.due("per_example") or self.due("gsnr")):
            from ..capture import capture

            self._capture = contextlib.ExitStack()
            self._tape = self._capture.enter_context(capture(self.model, self._pe_layers, freeze=False))
            if self._tokens is not None:
                self._tape.set_tokens(self._tokens)
        if self._softmax is not None and training and self.due("softmax"):
            self._softmax.arm()

    def _on_forward(self, module, args, output):
        loss = getattr(output, "loss", None) if not torch.is_tensor(output) else None
        if self._auto_loss and torch.is_tensor(loss) and loss.dim() == 0 and module.training:
            self._losses.append(loss.detach().double())

    @property
    def loss_from_outputs(self) -> bool:
        """Whether the step's loss is read from the model's outputs (``output.loss`` of HF models); turned off
        by `log_loss` or by setting it to False when the loss comes from elsewhere (the trainer's logs)."""
        return self._auto_loss

    @loss_from_outputs.setter
    def loss_from_outputs(self, on: bool) -> None:
        self._auto_loss = bool(on)

    def log_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss of a micro-batch (the step's loss is their mean). Turns off reading HF outputs."""
        self._auto_loss = False
        self._losses.append(loss.detach().double() if torch.is_tensor(loss) else torch.tensor(float(loss), dtype=torch.float64))

    def _on_grad(self, p) -> None:
        if self._armed:
            return
        self._armed = True
        queue = torch.autograd.Variable._execution_engine.queue_callback
        # a callback queued from a callback runs after every callback queued during the backward (DDP's
        # all-reduce finalisation included): the gradients are then final for this backward
        queue(lambda: queue(self._after_backward))

    def _after_backward(self) -> None:
        self._armed = False
        self._micro += 1
        inv = self._inv_scale()
        if self.every["norms"].on or self.every["spikes"].on:
            grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.plist]
            pre = _norms(grads)
            self._pre = pre * inv if inv is not None else pre
        if self.every["microbatch"](self.step) and _world() == 1:
            self._microbatch(inv)
        if self._capture is not None:
            try:
                from ..measures.spectra import batch_sq_norms

                grads = self._tape.grads(skip_uncalled=True)  # a layer the loss bypasses has no factors
                sq = batch_sq_norms(grads)  # {module: (B,)} squared norms of each example's contribution
                for name, g in grads.items():
                    self._noise.add(_weight_name(name), g, sq[name], inv, self.due("gsnr"))
            finally:
                self._capture.close()
                self._capture, self._tape = None, None

    def _microbatch(self, inv) -> None:
        """cos(g_k, g_1 + ... + g_{k-1}) per layer for micro-batch k of the step (g_k = .grad now minus before)."""
        now = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.plist]
        prev = self._mb_prev
        if prev is not None:
            delta = [a - b for a, b in zip(now, prev)]
            dots = torch.stack([(d.double() * b.double()).sum() for d, b in zip(delta, prev)])
            nd, nb = _norms(delta).double(), _norms(prev).double()
            total = dots.sum() / (nd.pow(2).sum().sqrt() * nb.pow(2).sum().sqrt())
            self._mb_cos.append((dots / (nd * nb), total))
        self._mb_prev = [g.clone() for g in now]

    def _inv_scale(self) -> torch.Tensor | None:
        sc = self.scaler
        if sc is None or not getattr(sc, "is_enabled", lambda: False)():
            return None
        scale = getattr(sc, "_scale", None)
        return None if scale is None else (1.0 / scale.float()).to(self.plist[0].device)

    def _before_step(self, optimizer, args, kwargs):
        self._stepped = True
        closure = kwargs.get("closure", args[0] if args else None)
        if callable(closure):
            # the backward happens inside step(closure) (Lightning, LBFGS): read after the closure has run
            def wrapped():
                out = closure()
                self._read_before_update()
                return out

            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (wrapped, *args[1:]), kwargs
        self._read_before_update()
        return None

    def _read_before_update(self) -> None:
        post = _norms([p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.plist])
        self._post = post
        if self.every["update"](self.step):
            if is_dtensor(self.plist[0]):  # FSDP2 shards: DTensor has no foreach copy
                self._saved = [p.detach().clone() for p in self.plist]
            else:
                if self._saved is None:
                    self._saved = [torch.empty_like(p) for p in self.plist]
                torch._foreach_copy_(self._saved, [p.detach() for p in self.plist])
        if self.every["spikes"](self.step):
            grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in self.plist]
            vs = None
            if self.optimizer is not None and all(p.grad is not None for p in self.plist):
                vs = [self.optimizer.state.get(p, {}).get("exp_avg_sq") for p in self.plist]
            self._spike_rows = self._spike.update(self._pre, post, grads, vs, self.step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        step = self.step
        pre = self._pre if self._pre is not None else self._post
        rows: dict[str, torch.Tensor] = {}
        if self.every["norms"](step):
            rows[S.GRAD_NORM] = pre
            rows[S.GRAD_NORM_CLIPPED] = self._post
            self._scalar(step, S.GRAD_NORM, pre.double().pow(2).sum().sqrt())
            self._scalar(step, S.GRAD_NORM_CLIPPED, self._post.double().pow(2).sum().sqrt())
            total_pre = pre.double().pow(2).sum().sqrt()
            self._scalar(step, S.CLIP_COEF, self._post.double().pow(2).sum().sqrt() / total_pre)
            bad = (~torch.isfinite(pre)).float()
            rows[S.NONFINITE] = bad
            self._scalar(step, S.NONFINITE, bad.sum())
        if self.every["update"](step) and self._saved is not None:
            now = [p.detach() for p in self.plist]
            pn = _norms(self._saved)
            if is_dtensor(self.plist[0]):
                delta = [a - b for a, b in zip(now, self._saved)]
            else:  # in place in the saved copy: no temporary of the parameters' size
                torch._foreach_sub_(self._saved, now)
                delta = self._saved
            dn = _norms(delta)
            rows[S.UPDATE_RATIO] = dn / pn
            rows[S.PARAM_NORM] = pn
            self._scalar(step, S.UPDATE_RATIO, dn.double().pow(2).sum().sqrt() / pn.double().pow(2).sum().sqrt())
            self._scalar(step, S.PARAM_NORM, pn.double().pow(2).sum().sqrt())
        for k, v in getattr(self, "_spike_rows", {}).items():
            rows[k] = v
        self._spike_rows = {}
        for k, v in rows.items():
            self._buffer.append((step, "L", None, k, v))
        self._scalar(step, S.SKIPPED, 0.0)
        self._finish_step(step)

    def _record_skipped(self) -> None:
        step = self.step
        if self._pre is not None:
            self._buffer.append((step, "L", None, S.GRAD_NORM, self._pre))
            bad = (~torch.isfinite(self._pre)).float()
            self._buffer.append((step, "L", None, S.NONFINITE, bad))
            self._scalar(step, S.NONFINITE, bad.sum())
            self._scalar(step, S.GRAD_NORM, self._pre.double().pow(2).sum().sqrt())
        self._scalar(step, S.SKIPPED, 1.0)
        self._finish_step(step)

    def end_step(self) -> None:
        """Close the current step by hand (loops without a watched optimizer, e.g. a manual SGD update)."""
        self._post = self._pre if self._pre is not None else self._nan
        self._after_step(None, (), {})

    def _finish_step(self, step: int) -> None:
        if self._losses:
            self._scalar(step, S.LOSS, torch.stack([x.to(self._nan.device) for x in self._losses]).mean())
        self._losses = []
        if self.optimizer is not None:
            self._scalar(step, S.LR, float(self.optimizer.param_groups[0].get("lr", float("nan"))))
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None:
            self._scalar(step, S.LOSS_SCALE, self.scaler._scale.detach().float().reshape(()))
        got = self._noise.finish()
        if got is not None:
            for metric in (S.TRACE_SIGMA, S.GRAD_SQ, S.NOISE_SCALE):
                self._buffer.append((step, "N", got["names"], metric, got[metric]))
            for metric, v in got["totals"].items():
                self._scalar(step, metric, v)
            for layer, v in got[S.GSNR].items():
                self._scalar(step, S.GSNR, v, layer=layer)
        if self._mb_cos:  # the mean over the step's micro-batches 2..k
            key = f"{S.COS_PREFIX}microbatch|earlier"
            self._buffer.append((step, "L", None, key, torch.stack([c for c, _ in self._mb_cos]).mean(0)))
            self._scalar(step, key, torch.stack([t for _, t in self._mb_cos]).mean())
        self._mb_prev, self._mb_cos = None, []
        if self._softmax is not None and self.due("softmax"):
            got = self._softmax.read()
            for k, name in (("fp32", S.SC_FP32), ("bf16", S.SC_BF16), ("zero_loss", S.ZERO_LOSS)):
                if got and got.get(k) is not None:
                    self._scalar(step, name, float(got[k]))
        if self._sharp is not None and self.due("sharpness"):
            self._sharpness(step)
        if self.every["hist"](step) and self.sinks:
            grads = {n: p.grad for n, p in self.named if p.grad is not None}
            for s in self.sinks:
                s.histograms(step, grads)
        self._pre, self._micro = None, 0
        self.step += 1
        if self.step % self.flush_every == 0:
            self.flush()

    def record(self, step: int, metric: str, value, layer: str = S.MODEL) -> None:
        """Record one value of your own (e.g. an eval metric, a framework's log) with the monitor's rows."""
        self._scalar(step, metric, value, layer)

    def _scalar(self, step: int, metric: str, value, layer: str = S.MODEL) -> None:
        v = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
        self._buffer.append((step, "S", [layer], metric, v.reshape(1)))

    # --- named loss terms ----------------------------------------------------------------------------------
    def terms(self, losses: Mapping[str, torch.Tensor], *, force: bool = False) -> dict | None:
        """Gradients of named loss terms (e.g. {"chosen": logp_w.sum(), "rejected": logp_l.sum()} for DPO,
        `psr_nsr_terms(...)` for GRPO, or the parts of a multi-task loss): per-layer norms and pairwise cosines,
        recorded for the current step. Runs only when `terms` is due (or `force`); each term costs one
        backward (torch.autograd.grad with retain_graph), so call it BEFORE the training backward.

        Returns {"cos": {(a, b): float}, "norm": {a: float}} when it ran, else None.
        """
        if not (force or self.due("terms")):
            return None
        if len(losses) < 1:
            raise ValueError("terms: give at least one named loss term")
        names = list(losses)
        flats = {}
        for name in names:
            t = losses[name]
            if not torch.is_tensor(t) or t.dim() != 0:
                raise ValueError(f"terms: {name!r} must be a scalar tensor (got {getattr(t, 'shape', type(t))})")
            gs = torch.autograd.grad(t, self.plist, retain_graph=True, allow_unused=True)
            flats[name] = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(gs, self.plist)]
        step = self.step
        norm = {a: _norms(flats[a]) for a in names}
        out = {"cos": {}, "norm": {}}
        for a in names:
            self._buffer.append((step, "L", None, S.TERM_NORM_PREFIX + a, norm[a]))
            tot = norm[a].double().pow(2).sum().sqrt()
            self._scalar(step, S.TERM_NORM_PREFIX + a, tot)
            out["norm"][a] = float(tot)
        for i, a in enumerate(names):
            for b_ in names[i + 1:]:
                dots = torch.stack([(x.double() * y.double()).sum() for x, y in zip(flats[a], flats[b_])])
                cos = dots / (norm[a].double() * norm[b_].double())
                key = f"{S.COS_PREFIX}{a}|{b_}"
                self._buffer.append((step, "L", None, key, cos))
                tot = dots.sum() / (norm[a].double().pow(2).sum().sqrt() * norm[b_].double().pow(2).sum().sqrt())
                self._scalar(step, key, tot)
                out["cos"][(a, b_)] = float(tot)
        return out

    # --- sharpness ----------------------------------------------------------------------------------------
    def _sharpness(self, step: int) -> None:
        got = self._sharp.measure(self.optimizer)
        self._scalar(step, S.SHARPNESS, float(got["lmax"]))
        self._scalar(step, S.SHARPNESS_THRESHOLD, float(got["threshold"]))
        if got.get("kind") == "adam":
            # Adam's preconditioner carries (1 - beta1^t): while beta1^t > 0.1 the preconditioned sharpness
            # reads high by construction; record it, raise no alert
            beta1 = float(self.optimizer.param_groups[0]["betas"][0])
            t = max((float(st.get("step", 0)) for st in self.optimizer.state.values()), default=0.0)
            if beta1 ** t > 0.1:
                self._quiet_sharpness.add(step)

    # --- flushing --------------------------------------------------------------------------------------------
    def flush(self) -> pd.DataFrame:
        """Move the buffered values to the host (one transfer), raise alerts, write the sinks; returns the rows."""
        if not self._buffer:
            return pd.DataFrame(columns=S.SCALAR_COLUMNS)
        buf, self._buffer = self._buffer, []
        flat = torch.cat([v.detach().reshape(-1).double().cpu() if v.device.type == "cpu"
                          else v.detach().reshape(-1).double() for _, _, _, _, v in buf]).cpu().numpy()
        steps, layers, metrics, values = [], [], [], []
        i = 0
        for step, kind, names, metric, v in buf:
            n = v.numel()
            lay = self.names if kind == "L" else names
            steps.extend([step] * n)
            layers.extend(lay)
            metrics.extend([metric] * n)
            values.append(flat[i:i + n])
            i += n
        df = pd.DataFrame({"step": np.asarray(steps, dtype=np.int64), "layer": layers, "metric": metrics,
                           "value": np.concatenate(values)})
        df = self._reduce_loss(df)
        alerts = self._raise_alerts(df)
        for s in self.sinks:
            s.write(df, alerts)
        if self.out is None:
            self._flushed.append(df)
        return df

    def table(self) -> pd.DataFrame:
        """Every row recorded so far (flushes first). In memory only without a run directory; with one, read
        RUN/series.parquet after `close()` (or the shards)."""
        self.flush()
        if self.out is not None:
            raise ValueError("the monitor writes to a run directory; read it with gradsight.train.summarize")
        if not self._flushed:
            return pd.DataFrame(columns=S.SCALAR_COLUMNS)
        return pd.concat(self._flushed, ignore_index=True)

    def _reduce_loss(self, df: pd.DataFrame) -> pd.DataFrame:
        """Average the loss across ranks (each rank saw its own data); gradients are already all-reduced."""
        if _world() == 1:
            return df
        import torch.distributed as dist

        sel = (df["metric"] == S.LOSS).to_numpy()
        vals = torch.tensor(df.loc[sel, "value"].to_numpy(), dtype=torch.float64)
        dist.all_reduce(vals)
        df.loc[sel, "value"] = (vals / _world()).numpy()
        return df

    def _raise_alerts(self, df: pd.DataFrame) -> pd.DataFrame:
        th = self.th
        rows: list[dict] = []
        layerwise = df[df["layer"] != S.MODEL]

        def add(sel, rule, threshold, fmt):
            for r in layerwise[sel].itertuples(index=False):
                rows.append({"step": int(r.step), "layer": r.layer, "rule": rule, "value": float(r.value),
                             "threshold": float(threshold), "message": fmt(r)})

        m, v = layerwise["metric"], layerwise["value"]
        add((m == S.SPAM_FRAC) & (v > 0), S.RULE_SPAM, th.spam,
            lambda r: f"step {r.step}: SPAM's rule (g² > {th.spam:g}·v) fired on {100 * r.value:.3g}% of the "
                      f"entries of {r.layer}")
        add((m == S.NORM_Z) & (v.abs() >= th.z_alert), S.RULE_NORM_Z, th.z_alert,
            lambda r: f"step {r.step}: gradient norm of {r.layer} is {r.value:+.1f} standard deviations from its "
                      f"EMA (log scale)")
        add((m == S.MAXABS_RATIO) & (v >= th.max_abs_alert), S.RULE_MAXABS, th.max_abs_alert,
            lambda r: f"step {r.step}: max|g| of {r.layer} is {r.value:.3g}× its running estimate")
        add((m == S.NONFINITE) & (v > 0), S.RULE_NONFINITE, 0.0,
            lambda r: f"step {r.step}: non-finite gradient in {r.layer}")
        sh = df[(df["metric"] == S.SHARPNESS)].set_index("step")["value"]
        thr = df[(df["metric"] == S.SHARPNESS_THRESHOLD)].set_index("step")["value"]
        for st in sh.index.intersection(thr.index):
            if sh[st] >= thr[st] and st not in self._quiet_sharpness:
                rows.append({"step": int(st), "layer": S.MODEL, "rule": S.RULE_SHARPNESS, "value": float(sh[st]),
                             "threshold": float(thr[st]),
                             "message": f"step {st}: sharpness {sh[st]:.4g} is above its stability threshold "
                                        f"{thr[st]:.4g}"})
        alerts = pd.DataFrame(rows, columns=S.ALERT_COLUMNS)
        alerts["step"] = alerts["step"].astype("int64")
        for r in rows:
            self.alerts.append(r)
            if self.on_alert is not None:
                self.on_alert(r)
        return alerts

    # --- end ----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook (the model and optimizer behave as if never watched)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._softmax is not None:
            self._softmax.remove()
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def close(self, *, report: bool | None = None) -> Path | None:
        """Flush, remove the hooks, mark the run finished, summarise (series, diagnoses) and write the report.

        Returns the report's path (None without a run directory or with report=False)."""
        if self._closed:
            return None
        self._closed = True
        self.flush()
        self.remove()
        for s in self.sinks:
            s.close(finished=True, steps=self.step)
        if self.out is None or not self._rank0:
            return None
        from .summarize import summarize

        summarize(self.out)
        if report if report is not None else self._write_report:
            from .report import render

            return render(self.out)
        return None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_meta(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {"id": str(name or type(model).__name__), "class": type(model).__name__,
            "n_params": int(sum(p.numel() for p in model.parameters()))}


def optimizer_meta(opt) -> dict:
    """{"name", "lr", "betas", "momentum", "weight_decay"} of an optimizer's first param group (manifest)."""
    if opt is None:
        return {}
    g = opt.param_groups[0] if getattr(opt, "param_groups", None) else {}
    return {"name": type(opt).__name__, "lr": g.get("lr"), "betas": g.get("betas"), "momentum": g.get("momentum"),
            "weight_decay": g.get("weight_decay")}


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _weight_name(module: str) -> str:
    """The parameter name of a Linear module's weight ("weight" for the root module)."""
    return f"{module}.weight" if module else "weight"
