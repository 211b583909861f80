"""The demo's monitored fine-tuning: SmolLM2 trained on the built-in problems under `gradsight.train.Monitor`.

The other demo runs look at a model that does not move; this one trains it and watches its gradients as it
trains, the way a user attaches the monitor to their own loop. `fine_tune` writes one monitor run directory
(run kind "train", shown by the tour's index page) and its report:

- data: the correct answers of the built-in arithmetic problems (`demo.problems.demo_records`, groups "fast"
  and "slow"; the "wrong" answers are left out), encoded with the analyses' own chat-template encoder
  (`inputs.data.encode`, response-only supervision) and cut into shuffled batches of mixed lengths, padded on
  the right: labels are -100 on the prompt and on padding, the attention mask is 0 on padding;
- model: the packaged SmolLM2-135M-Instruct (float32, loaded offline like the other demo runs, on the CPU);
  only its last `blocks` transformer blocks are trained (default the last 4 of 30). A step then costs one
  forward pass of the whole model plus the backward of the output layer and those blocks, about 7
  CPU-seconds for a batch of 4 (about 350 tokens); the whole stage (load, 30 steps, report) is about 230
  CPU-seconds, about 2 minutes when 2 cores are free. ``blocks=None`` trains every parameter at about 2.5x
  the cost per step;
- loop: AdamW (weight decay 0), the HF model's token-mean loss over the batch's response tokens,
  ``clip_grad_norm_(..., 1.0)``, `n_steps` optimizer steps, nothing else;
- monitor: norms, update ratios and spike detectors every step, per-example gradient norms and the noise
  scale of the trained blocks' ``mlp.down_proj`` layers and the softmax-collapse probe every 5 steps
  (`EVERY`); `Monitor.close` summarises, diagnoses and renders RUN/report.html.

Reruns: the run's settings (model, data, steps, batch size, lr, blocks, seed) are stored in its manifest
("fine_tune"). A rerun into the same directory with other settings is refused (RunMismatchError, before the
model loads); with the same settings a finished run is not trained again, only its report is re-rendered (as
the tour reuses its other finished runs), and an unfinished run (a killed one) is trained again from step 0
into the same directory (the monitor writes every step again; the newest write of a step wins).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..inputs.data import EncodeOptions, Encoded, Record, collate, encode, fingerprint, load_records
from ..inputs.models import list_layers, load_model
from ..runs.progress import format_duration
from .problems import demo_records

__all__ = ["fine_tune", "train_records", "encode_records", "batch_order", "make_batch", "freeze_blocks",
           "EVERY", "PER_EXAMPLE_LAYERS", "TRAIN_GROUPS", "TRAIN_BLOCKS", "TRAIN_PROBLEMS", "TRAIN_STEPS",
           "TRAIN_BATCH"]

LM = "smollm2-135m-instruct"
TRAIN_GROUPS = ("fast", "slow")  # the correct answers; "wrong" is not trained on
TRAIN_PROBLEMS = 24  # 48 training examples: 30 steps of 4 are 2.5 epochs
TRAIN_STEPS = 30
TRAIN_BATCH = 4
TRAIN_BLOCKS = 4  # the last 4 transformer blocks are trained; None: every parameter
EVERY: dict[str, Any] = {"per_example": 5, "hist": None, "sharpness": None, "softmax": 5, "terms": None}
PER_EXAMPLE_LAYERS = r"mlp\.down_proj$"  # one Linear per block: cheap per-example norms and noise scale
ENCODE = EncodeOptions(max_length=512)  # the other demo runs' encoding (every demo sequence fits)


def _train_dicts(n_problems: int, groups: Sequence[str]) -> list[dict]:
    unknown = sorted(set(groups) - {"fast", "slow", "wrong"})
    if not groups or unknown:
        raise ValueError(f"groups={tuple(groups)!r}: choose among 'fast', 'slow', 'wrong'")
    return [r for r in demo_records(n_problems=n_problems) if r["group"] in groups]


def train_records(n_problems: int = TRAIN_PROBLEMS, groups: Sequence[str] = TRAIN_GROUPS) -> list[Record]:
    """The training records: the built-in problems' answers of `groups` (validated `Record`s, source order:
    per problem fast then slow)."""
    recs, _ = load_records(_train_dicts(n_problems, groups))
    return recs


def encode_records(records: Sequence[Record], tokenizer: Any, opts: EncodeOptions = ENCODE) -> list[Encoded]:
    """`inputs.data.encode` of every record (the analyses' chat-template encoding, response-only targets);
    records it skips (e.g. too long) are left out. Raises ValueError when none is left."""
    encoded = [encode(r, tokenizer, opts) for r in records]
    ok = [e for e in encoded if e.ok]
    if not ok:
        reasons = sorted({e.reason for e in encoded})
        raise ValueError(f"no training example survives encoding (max_length={opts.max_length}): {reasons}")
    return ok


def batch_order(n_examples: int, batch_size: int, n_steps: int, seed: int = 0) -> list[list[int]]:
    """The example indices of every step: consecutive slices of a stream of seeded permutations of
    ``range(n_examples)`` (a new permutation per epoch; a batch may span two epochs). Deterministic in seed."""
    for name, v in (("n_examples", n_examples), ("batch_size", batch_size), ("n_steps", n_steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an int >= 1")
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < batch_size * n_steps:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        stream += perm
    return [stream[k * batch_size:(k + 1) * batch_size] for k in range(n_steps)]


def make_batch(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded training batch for an HF causal LM.

    Returns:
        {"input_ids": (B, T) long, "attention_mask": (B, T) long (0 on padding), "labels": (B, T) long: the
        token id where the encoder supervises it (the response), -100 on the prompt and on padding}. The model
        shifts the labels itself, so labels[b, j] is the target predicted from position j - 1, which is the
        `Encoded.target_mask` convention.
    """
    b = collate(examples, pad_id)
    labels = torch.where(b["target_mask"], b["input_ids"], torch.full_like(b["input_ids"], -100))  # (B, T)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


def freeze_blocks(model: torch.nn.Module, last: int | None) -> list[str]:
    """Train only the parameters of the model's `last` transformer blocks (every block when it has fewer;
    None: every parameter, nothing frozen). Everything else (embeddings, the tied output layer, the final
    norm, the earlier blocks) gets requires_grad=False. Returns the trained parameter names."""
    if last is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise ValueError(f"blocks={last!r}: give the number of last transformer blocks to train (>= 1), or None")
    layers = list_layers(model, include_non_linear=True)
    block_of = {li.name: li.block for li in layers}
    n_blocks = 1 + max((li.block for li in layers), default=-1)
    if n_blocks == 0:
        raise ValueError(f"blocks={last!r}: the model has no transformer blocks (train it whole: blocks=None)")
    names = []
    for name, p in model.named_parameters():
        block = block_of.get(name.rsplit(".", 1)[0], -1)  # -1: outside the blocks
        train = block >= 0 and block >= n_blocks - last
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def _settings(model: str, n_steps: int, batch_size: int, lr: float, n_problems: int, blocks: int | None,
              seed: int) -> dict:
    return {"model": str(model), "groups": list(TRAIN_GROUPS), "n_problems": n_problems, "n_steps": n_steps,
            "batch_size": batch_size, "lr": float(lr), "weight_decay": 0.0, "clip": 1.0, "blocks": blocks,
            "max_length": ENCODE.max_length, "seed": seed}


def _reuse(run: Path, settings: dict) -> bool:
    """True when `run` holds this finished fine-tuning (its report is re-rendered); False when there is
    nothing yet or an unfinished run of the same settings. Another run is refused."""
    from ..runs.store import RunMismatchError, read_manifest

    if not (run / "manifest.json").exists():
        return False
    try:
        man = read_manifest(run)
    except ValueError as e:
        raise RunMismatchError(f"{run}: manifest.json cannot be read ({e}); use another directory") from e
    old, new = man.get("fine_tune"), json.loads(json.dumps(settings))
    if not isinstance(old, dict) or man.get("analysis") != "train":
        raise RunMismatchError(f"{run} holds another run (analysis {man.get('analysis')!r}), not the demo's "
                               "fine-tuning; use another directory")
    if old != new:
        diffs = "; ".join(f"{k}: {old.get(k)!r} != {v!r}" for k, v in new.items() if old.get(k) != v)
        raise RunMismatchError(f"{run} holds the demo's fine-tuning with other settings ({diffs}); use another "
                               "directory, or delete this one")
    if not man.get("finished"):
        return False
    from ..train.report import render

    render(run)
    return True


def fine_tune(out: str | Path = "runs/demo/train", model: str = LM, n_steps: int = TRAIN_STEPS,
              batch_size: int = TRAIN_BATCH, lr: float = 5e-5, progress: bool = True, *,
              n_problems: int = TRAIN_PROBLEMS,
              blocks: int | None = TRAIN_BLOCKS, seed: int = 0,
              log: Callable[[str], None] | None = None) -> Path:
    """Fine-tune `model` on the built-in problems' correct answers under the training monitor (see the module
    docstring); returns the run directory (RUN/report.html written).

    Args:
        out: the run directory (a finished run of the same settings is reused: only its report is rendered).
        model: a model spec (`inputs.models.load_model`: packaged name, HF directory or .gguf), float32.
        n_steps: optimizer steps (30: 2.5 epochs of the 48 examples of 24 problems at batch size 4).
        batch_size: examples per step (the loss is the token mean over the batch's response tokens, HF's
            convention; the monitor compares its noise scale with this).
        lr: AdamW's learning rate (constant; betas (0.9, 0.999), weight decay 0); gradients are clipped to
            a global norm of 1 before every step.
        progress: print a line at the start, every 5 steps (step, loss, pre-clip gradient norm, ETA) and at
            the end.
        n_problems: built-in problems (x 2 answers: fast and slow).
        blocks: how many of the last transformer blocks are trained (`freeze_blocks`; default 4, every block
            of a model with fewer; None: every parameter).
        seed: the data order (`batch_order`).
        log: where the progress lines go (default print).
    """
    from ..runs.store import RunStore, check_run_dir
    from ..train import Monitor

    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr={lr!r}: must be a number > 0")
    batch_order(1, batch_size, n_steps)  # checks batch_size and n_steps before anything loads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    say = (log or (lambda s: print(s, flush=True))) if progress else (lambda s: None)
    run = Path(out)
    settings = _settings(model, n_steps, batch_size, lr, n_problems, blocks, seed)
    if _reuse(run, settings):
        say(f"train: {run} holds this fine-tuning, finished; report re-rendered")
        return run
    check_run_dir(run)
    t0 = time.perf_counter()
    dicts = _train_dicts(n_problems, TRAIN_GROUPS)
    records, _ = load_records(dicts)
    net, tok = load_model(model, dtype="float32")
    trained = freeze_blocks(net, blocks)
    params = [p for p in net.parameters() if p.requires_grad]
    examples = encode_records(records, tok)
    order = batch_order(len(examples), batch_size, n_steps, seed)
    net.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    meta = {"model": {"id": str(model), "class": type(net).__name__,
                      "n_params": sum(p.numel() for p in net.parameters()),
                      "n_trained": sum(p.numel() for p in params), "blocks": blocks},
            "data": {"path": f"builtin:demo-arithmetic-{n_problems}", "groups": list(TRAIN_GROUPS),
                     "n_records": len(records), "n_examples": len(examples), "sha256": fingerprint(dicts)},
            "fine_tune": settings}
    mon = Monitor(net, opt, out=run, every=EVERY, layers=PER_EXAMPLE_LAYERS, batch_size=batch_size, meta=meta)
    which = f"the last {blocks} blocks" if blocks else "every parameter"
    say(f"train: fine-tuning {model} ({which}: {len(trained)} tensors, {meta['model']['n_trained']:,} of "
        f"{meta['model']['n_params']:,} parameters) on {len(examples)} "
        f"answers, {n_steps} steps of {batch_size}, AdamW lr {lr:g}, clip 1 -> {run}")
    t1, first = time.perf_counter(), None
    try:
        for step, idx in enumerate(order, 1):
            batch = make_batch([examples[i] for i in idx], tok.pad_token_id)
            loss = net(**batch).loss
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            first = value if first is None else first
            if step == 1 or step % 5 == 0 or step == n_steps:
                spent = time.perf_counter() - t1
                say(f"train: step {step}/{n_steps}, loss {value:.4f}, grad norm {float(norm):.3g} (before "
                    f"clipping), elapsed {format_duration(spent)}, "
                    f"ETA {format_duration(spent / step * (n_steps - step))}")
    except BaseException:
        mon.remove()  # the run stays unfinished: a rerun trains it again
        raise
    mon.close()
    elapsed = time.perf_counter() - t0
    RunStore(run).update_manifest(elapsed_s=elapsed)
    say(f"train: finished in {format_duration(elapsed)}, loss {first:.4f} at step 1 -> {value:.4f} at step "
        f"{n_steps}; report: {run / 'report.html'}")
    return run
