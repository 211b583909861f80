"""Training-monitor benchmark: what watching gradients costs per training step, gradsight's `train.Monitor` next
to the tools people use today, and whether the numbers agree.

Cases (anchors/monitor-transforms.md §1 and §4, rows B1 and B3):

  B1  tiny GPT-2 (transformers `GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=2048)`, eager attention,
      dropout 0), random tokens, batch 8 x 64, AdamW, 100 steps per variant (`--b1-steps 200` for the anchor's
      200; 7 variants x 200 steps take ~10 min alone on 2 shared cores). Variants: a plain loop; gradsight's
      first-order set every step (norms, update ratio, spikes); + per-example norms / noise scale every 10
      steps; per-example every step; `wandb.watch(model, log="gradients", log_freq=1)` and `log_freq=100`
      (offline, with one `run.log({"loss": ...})` per step, as a user's loop has); Lightning's
      `pytorch_lightning.utilities.grad_norm(model, 2)` called every step. Checks: gradsight's pre-clip total
      norm equals `clip_grad_norm_(params, inf)` and Lightning's per-parameter norms equal gradsight's per-layer
      `grad_norm` (relative 1e-6); no variant changes the training (final parameters equal the plain loop's).
  R   realistic lengths: SmolLM2-135M-Instruct (the packaged GGUF, de-quantised to float32, eager attention),
      one training step of batch 2 from benchmarks/realistic.py's records (a chain of thought of 313 tokens
      next to one of 433), AdamW, HF loss on the response tokens: plain step, first-order set, per-example.
      Too slow on 2 shared cores for several steps per variant: one timed step per variant after a warm-up on
      a short batch, plain timed before and after the monitored steps (the reference is their mean).
  B3  Cockpit 1.0.2 (BackPACK 1.7.1) on its kind of problem: a 3-layer MLP 784-256-128-10, synthetic 10-class
      data (Gaussian classes), batch 128, SGD, 100 steps. Variants: plain; Cockpit "economy" every step (its
      GradHist1d alone dominates on a CPU, so also economy without GradHist1d); gradsight first-order set; +
      per-example every step. Cockpit runs 20 of the 100 steps (one round in five): 2.4 s a step here.
      Check: Cockpit's GradNorm (one value per parameter tensor) equals gradsight's per-layer `grad_norm`.

How the timings are taken: every variant trains its own copy of the same initial model on the same batches
(step t of every variant sees batch t). The variants run in rounds of BLOCK consecutive steps each, and the
order of the variants rotates from round to round (A B C, B C A, ...), so slow phases of a shared machine hit
all of them. A variant's first round is a warm-up and is not timed. Reported per variant: the median of its
per-step times ("ms/step"), the ratio of that median to the plain loop's median ("ratio"), and the amortised
ratio: the median over rounds of (mean step time of the variant in the round) / (plain's in the same round).
A block of 10 steps holds exactly one step of an every-10 measure, so the amortised ratio includes the
periodic work that the median of single steps hides. torch runs with `--threads` threads (default 1: two cores
are shared with other processes; two threads are slower than one under that contention), and the "foreign
load" (cores kept busy by other processes, from /proc/stat) is recorded per case.

Usage: .venv/bin/python benchmarks/monitor.py [--quick] [--only B1,R,B3] [--threads 1] [--out PATH]
Writes benchmarks/results_monitor.json (atomically) and prints the table; with --only, the cases not run keep
their sections from the previous results file (each section carries its date). The exit code is 0 when the
measurements ran, also when a goal is missed (the notes say so).

Needs (installed --no-deps or with torch pinned, so pip never replaces torch):
  pip install -c constraints(torch==2.13.0) wandb==0.31.0 json-tricks==3.17.3 matplotlib==3.11.2 seaborn==0.13.2
  pip install --no-deps cockpit-for-pytorch==1.0.2 backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3
A missing peer skips its rows and says why (the import error) in the notes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata as md
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from gradsight.train import Monitor  # noqa: E402
from gradsight.train import schema as S  # noqa: E402

__all__ = ["Variant", "interleave", "summarize", "main"]

FIRST_ORDER = {"per_example": None, "hist": None}  # norms, update, spikes every step (the defaults)
PE_EVERY_10 = {"hist": None}  # + per_example every 10 steps (the default schedule)
PE_EVERY_STEP = {"per_example": 1, "hist": None}
GOAL_FIRST_ORDER = 1.10  # the issue's goal: first-order set <= 1.10 x a plain step
TOL = 1e-6  # relative agreement asked of equal quantities (float32 norms)
INSTALLS = [
    ".venv/bin/pip install -c /tmp/c.txt wandb==0.31.0            # /tmp/c.txt: torch==2.13.0",
    ".venv/bin/pip install --no-deps cockpit-for-pytorch==1.0.2",
    ".venv/bin/pip install -c /tmp/c.txt json-tricks==3.17.3 matplotlib==3.11.2 seaborn==0.13.2  "
    "# cockpit's imports",
    "(already in the venv from `make bench`: --no-deps backpack-for-pytorch==1.7.1 einops==0.8.2 unfoldNd==0.2.3)",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# timing: interleaved rounds, foreign load


@dataclass
class Variant:
    """One way of running a training step.

    Attributes:
        name: the row's variant name.
        step: ``step(t)`` runs training step t (forward, backward, whatever the variant adds, optimizer step);
            the whole call is timed.
        stride: the variant runs in rounds r with r % stride == 0 only (expensive peers), on its own step count.
        times: (round, seconds) of every step run, warm-up round included.
        note: what the row means, for the table.
    """

    name: str
    step: Callable[[int], Any]
    stride: int = 1
    note: str = ""
    times: list[tuple[int, float]] = field(default_factory=list)
    steps_done: int = 0


def interleave(variants: list[Variant], rounds: int, block: int) -> None:
    """Run `rounds` rounds; in round r every due variant runs `block` consecutive steps, in an order rotated by
    r. Step t of a variant is its t-th step (0-based), so every variant sees the same batches in order.
    Garbage is collected before each block, outside the timed steps."""
    for r in range(rounds):
        due = [v for v in variants if r % v.stride == 0]
        k = r % len(due)
        for v in due[k:] + due[:k]:
            gc.collect()
            for _ in range(block):
                t0 = time.perf_counter()
                v.step(v.steps_done)
                v.times.append((r, time.perf_counter() - t0))
                v.steps_done += 1


def _timed(v: Variant) -> list[tuple[int, float]]:
    """The variant's steps after its first (warm-up) round."""
    first = v.times[0][0] if v.times else 0
    return [(r, t) for r, t in v.times if r != first]


def summarize(variants: list[Variant], plain: Variant) -> list[dict]:
    """Per variant: n timed steps, median and mean ms/step, ratio of medians to plain, amortised ratio (median
    over the rounds both ran of the ratio of their mean step times in that round)."""
    p = _timed(plain)
    p_med = statistics.median(t for _, t in p)
    p_round: dict[int, list[float]] = {}
    for r, t in p:
        p_round.setdefault(r, []).append(t)
    out = []
    for v in variants:
        ts = _timed(v)
        if not ts:
            continue
        by_round: dict[int, list[float]] = {}
        for r, t in ts:
            by_round.setdefault(r, []).append(t)
        per_round = [statistics.mean(x) / statistics.mean(p_round[r]) for r, x in by_round.items() if r in p_round]
        med = statistics.median(t for _, t in ts)
        out.append({"variant": v.name, "n_steps": len(ts), "ms_median": 1e3 * med,
                    "ms_mean": 1e3 * statistics.mean(t for _, t in ts), "ratio": med / p_med,
                    "ratio_amortised": statistics.median(per_round) if per_round else float("nan"),
                    "ratio_amortised_q25_q75": _quartiles(per_round), "note": v.note})
    return out


def _quartiles(xs: list[float]) -> list[float] | None:
    if len(xs) < 2:
        return None
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


class ForeignLoad:
    """Cores kept busy by processes other than this one over a `with` block (from /proc/stat and os.times();
    children such as wandb's service process count as foreign). None where /proc/stat is missing."""

    def __enter__(self) -> "ForeignLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_seconds()
        if busy is None or self.busy0 is None:
            return
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (busy - self.busy0) - (_own_seconds() - self.own0)) / max(wall, 1e-9)


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq = vals[:7]
    steal = vals[7] if len(vals) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------------------------------------
# checks shared by the cases


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _series(table, metric: str, layer: str | None = None) -> dict:
    """{step: value} (layer given) or {(step, layer): value} (layer None, per-layer rows) of one metric."""
    rows = table[table["metric"] == metric]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
        return {int(s): float(v) for s, v in zip(rows["step"], rows["value"])}
    rows = rows[rows["layer"] != S.MODEL]
    return {(int(s), str(n)): float(v) for s, n, v in zip(rows["step"], rows["layer"], rows["value"])}


def _max_param_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------------------------------
# B1: tiny GPT-2


def tiny_gpt2(vocab: int, seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel(n_layer=4, n_embd=128, n_head=4, vocab_size=vocab, n_positions=64), eager attention,
    dropout 0 (every variant then does the same arithmetic and must end on the same parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=vocab, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"expected eager attention, got {model.config._attn_implementation!r}")
    return model.train()


def _gpt2_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               between: Callable[[torch.Tensor], Any] | None = None,
               after: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """forward, backward, `between(loss)` (before the optimizer step), step, zero_grad, `after(loss)`."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    if between is not None:
        between(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if after is not None:
        after(loss)
    return loss


def _wandb_run(tmp: Path):
    """An offline wandb run writing under `tmp` (no network, no console capture); (run, None) or (None, error)."""
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_CACHE_DIR": str(tmp / "cache"), "WANDB_CONFIG_DIR": str(tmp / "config")})
    try:
        import wandb

        return wandb.init(project="gradsight-bench", mode="offline", dir=str(tmp)), None
    except Exception as e:  # a missing or broken peer skips its rows, with the reason
        return None, f"{type(e).__name__}: {e}"


def case_b1(args) -> dict:
    """Step-time ratios on the tiny GPT-2 and the agreement checks (see the module docstring)."""
    V, B, T = args.vocab, 8, 64
    base = tiny_gpt2(V)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (args.b1_steps + args.block, B, T), generator=gen)  # (steps, B, T)
    log(f"B1: tiny GPT-2, vocab {V}, {n_params:,} parameters, batch {B}x{T}, {args.b1_steps} steps per variant")
    tmp = Path(tempfile.mkdtemp(prefix="gradsight-wandb-"))
    keep: list = []  # monitors and models, alive until the end
    models: dict[str, nn.Module] = {}

    def make(name: str):
        m = copy.deepcopy(base)
        models[name] = m
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    variants: list[Variant] = []
    m, o = make("plain")
    variants.append(Variant("plain", lambda t, m=m, o=o: _gpt2_step(m, o, data[t]), note="reference"))
    for name, every, note in (
            ("gradsight first-order", FIRST_ORDER, "norms, update ratio, spikes every step"),
            ("gradsight + per_example/10", PE_EVERY_10, "first-order + per-example norms, noise scale every 10"),
            ("gradsight per_example/1", PE_EVERY_STEP, "first-order + per-example every step")):
        m, o = make(name)
        keep.append(Monitor(m, o, every=every))
        variants.append(Variant(name, lambda t, m=m, o=o: _gpt2_step(m, o, data[t]), note=note))
    from pytorch_lightning.utilities import grad_norm

    m, o = make("lightning grad_norm")
    variants.append(Variant("lightning grad_norm", lambda t, m=m, o=o: _gpt2_step(
        m, o, data[t], between=lambda loss, m=m: grad_norm(m, 2)),
        note="grad_norm(model, 2) every step (per-parameter norms + total)"))
    run, wandb_error = _wandb_run(tmp)
    if run is not None:
        for freq in (1, 100):
            name = f"wandb.watch log_freq={freq}"
            m, o = make(name)
            run.watch(m, log="gradients", log_freq=freq)
            variants.append(Variant(name, lambda t, m=m, o=o: _gpt2_step(
                m, o, data[t], after=lambda loss: run.log({"loss": loss.item()})),
                note=f"offline; 64-bin gradient histograms every {freq} backward(s) + run.log(loss) per step"))
    rounds = args.b1_steps // args.block
    log(f"B1: {rounds} rounds x {args.block} steps x {len(variants)} variants")
    t0 = time.perf_counter()
    with ForeignLoad() as load:
        interleave(variants, rounds, args.block)
    wall = time.perf_counter() - t0
    if run is not None:
        run.finish()
    rows = summarize(variants, variants[0])
    plain_model = models["plain"]
    for r in rows:
        r["final_param_max_abs_diff_vs_plain"] = _max_param_diff(models[r["variant"]], plain_model)
    checks = b1_checks(base, data, args.check_steps)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"model": f"GPT2LMHeadModel(n_layer=4, n_embd=128, n_head=4, vocab_size={V}, n_positions=64), eager "
                     f"attention, dropout 0", "n_params": n_params, "batch": [B, T], "optimizer": "AdamW(lr=1e-3)",
            "steps_per_variant": args.b1_steps, "block": args.block, "rounds": rounds, "wall_s": wall,
            "foreign_load_cores": load.cores, "wandb_error": wandb_error, "rows": rows, "checks": checks}


def b1_checks(base: nn.Module, data: torch.Tensor, steps: int) -> dict:
    """On a fresh copy with gradsight's first-order set: pre-clip total norm vs clip_grad_norm_(params, inf),
    Lightning grad_norm (per parameter and total) vs gradsight's per-layer and total grad_norm; `steps` steps."""
    from pytorch_lightning.utilities import grad_norm

    m = copy.deepcopy(base)
    o = torch.optim.AdamW(m.parameters(), lr=1e-3)
    mon = Monitor(m, o, every=FIRST_ORDER)
    clip, light = {}, {}

    def between(loss, t):
        light[t] = {k: float(v) for k, v in grad_norm(m, 2).items()}
        clip[t] = float(torch.nn.utils.clip_grad_norm_(m.parameters(), float("inf")))

    for t in range(steps):
        _gpt2_step(m, o, data[t], between=lambda loss, t=t: between(loss, t))
    table = mon.table()
    mon.close()
    total = _series(table, S.GRAD_NORM, S.MODEL)
    per_layer = _series(table, S.GRAD_NORM)
    d_clip = max(_rel(total[t], clip[t]) for t in range(steps))
    prefix = "grad_2.0_norm/"
    d_layer, n_cmp = 0.0, 0
    for t in range(steps):
        for k, v in light[t].items():
            if k.startswith(prefix):
                d_layer = max(d_layer, _rel(per_layer[(t, k[len(prefix):])], v))
                n_cmp += 1
    d_total = max(_rel(total[t], light[t]["grad_2.0_norm_total"]) for t in range(steps))
    return {"steps": steps, "total_vs_clip_grad_norm_inf_max_rel": d_clip,
            "per_layer_vs_lightning_max_rel": d_layer, "per_layer_values_compared": n_cmp,
            "total_vs_lightning_total_max_rel": d_total,
            "pass": bool(d_clip <= TOL and d_layer <= TOL and d_total <= TOL)}


# ----------------------------------------------------------------------------------------------------------
# R: SmolLM2-135M on realistic lengths


def _pick(encoded: list, targets: tuple[int, ...]) -> list[int]:
    """Indices of the records whose token counts are closest to `targets` (distinct records, first wins)."""
    pool = range(len(encoded))
    out: list[int] = []
    for t in targets:
        i = min((i for i in pool if i not in out), key=lambda i: abs(encoded[i].n_tokens - t))
        out.append(i)
    return out


def case_realistic(args) -> dict:
    """Plain step vs first-order set vs per-example on SmolLM2-135M, batch 2 of mixed lengths (one timed step
    each; plain before and after)."""
    from realistic import realistic_records

    from gradsight.inputs.batching import collate
    from gradsight.inputs.data import EncodeOptions, encode, load_records
    from gradsight.inputs.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct", dtype="float32", attn_implementation="eager")
    log(f"R: SmolLM2-135M loaded in {time.perf_counter() - t0:.1f} s")
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"expected eager attention, got {model.config._attn_implementation!r}")
    recs, bad = load_records(realistic_records(10))
    if bad:
        raise RuntimeError(f"realistic records rejected: {bad}")
    enc = [encode(r, tok, EncodeOptions(max_length=1024)) for r in recs]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch(idx: list[int]) -> dict[str, torch.Tensor]:
        b = collate([enc[i] for i in idx], pad)
        b["labels"] = b["input_ids"].masked_fill(~b["target_mask"], -100)  # HF loss on the response tokens
        return b

    main_idx = _pick(enc, args.real_lengths)
    short_idx = sorted(range(len(enc)), key=lambda i: enc[i].n_tokens)[:2]  # warm-up: two direct answers
    main, short = batch(main_idx), batch(short_idx)
    lengths = [enc[i].n_tokens for i in main_idx]
    log(f"R: batch of {len(lengths)} examples, {lengths} tokens ({[recs[i].group for i in main_idx]}), padded "
        f"to {tuple(main['input_ids'].shape)}; warm-up batch {[enc[i].n_tokens for i in short_idx]} tokens")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ref_total: dict[int, float] = {}

    segments: dict[str, dict[str, float]] = {}

    def step(b: dict[str, torch.Tensor], mon_step: int | None = None, name: str | None = None) -> float:
        """One training step; returns its seconds and records forward / backward / optimizer-step seconds
        under `name` (the monitor's pre-clip norms run at the end of the backward, the rest of the first-order
        set in the optimizer-step hooks: the short optimizer segment shows its fixed cost with less noise)."""
        t0 = time.perf_counter()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if name is not None:
            segments[name] = {"forward": t1 - t0, "backward": t2 - t1, "optimizer_step": t3 - t2}
        if mon_step is not None:  # outside the timing: the total norm the monitor must have read
            ref_total[mon_step] = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        opt.zero_grad(set_to_none=True)
        return t3 - t0

    timings: dict[str, float] = {}
    with ForeignLoad() as load:
        step(short)  # warm-up: Adam's state, allocator, kernels
        gc.collect()
        timings["plain (before)"] = step(main, name="plain (before)")
        # one monitor: step 0 a warm-up on the short batch (its copy of θ, the capture's first use), step 1 the
        # first-order set, step 2 the same plus per-example; per_example due at steps 0 and 2 only
        mon = Monitor(model, opt, every={"per_example": lambda s: s in (0, 2), "hist": None})
        step(short, 0)
        gc.collect()
        timings["gradsight first-order"] = step(main, 1, "gradsight first-order")
        gc.collect()
        timings["gradsight per_example"] = step(main, 2, "gradsight per_example")
        table = mon.table()
        mon.close()
        gc.collect()
        timings["plain (after)"] = step(main, name="plain (after)")
    plain = 0.5 * (timings["plain (before)"] + timings["plain (after)"])
    total = _series(table, S.GRAD_NORM, S.MODEL)
    d_total = max(_rel(total[s], ref_total[s]) for s in (1, 2))
    pe = {k: _series(table, k, S.MODEL).get(2) for k in (S.PE_Q10, S.PE_Q50, S.PE_Q90, S.NOISE_SCALE)}
    opt_plain = 0.5 * (segments["plain (before)"]["optimizer_step"] + segments["plain (after)"]["optimizer_step"])
    rows = []
    for name, note in (("plain", "mean of one step before and one after the monitored steps"),
                       ("gradsight first-order", "norms, update ratio, spikes; 1 step"),
                       ("gradsight per_example", "first-order + per-example norms (211 Linear layers incl. "
                                                 "lm_head), noise scale; 1 step")):
        t = plain if name == "plain" else timings[name]
        seg = segments.get(name)
        if seg is not None:
            note += (f"; optimizer step {seg['optimizer_step']:.2f} s vs plain's {opt_plain:.2f} s "
                     f"(+{seg['optimizer_step'] - opt_plain:.2f} s of hooks)")
        rows.append({"variant": name, "n_steps": 2 if name == "plain" else 1, "ms_median": 1e3 * t,
                     "ms_mean": 1e3 * t, "ratio": t / plain, "ratio_amortised": None, "note": note})
    return {"model": "SmolLM2-135M-Instruct (packaged GGUF, de-quantised), float32, eager attention",
            "batch_lengths": lengths, "batch_groups": [recs[i].group for i in main_idx],
            "padded_shape": list(main["input_ids"].shape), "target_tokens": int(main["target_mask"].sum()),
            "optimizer": "AdamW(lr=1e-5)", "timings_s": timings, "segments_s": segments,
            "foreign_load_cores": load.cores, "rows": rows,
            "checks": {"total_vs_get_total_norm_max_rel": d_total, "pass": bool(d_total <= TOL),
                       "per_example_step_values": pe}}


# ----------------------------------------------------------------------------------------------------------
# B3: Cockpit


def _import_cockpit():
    """(Cockpit, configuration, extend) or raise ImportError with the reason. Cockpit 1.0.2 imports
    `pkg_resources` only to read its own version; setuptools >= 81 no longer ships it, so a stand-in module
    answering from importlib.metadata is installed when (and only when) the real one is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name: str):
            try:
                return types.SimpleNamespace(version=md.version("cockpit-for-pytorch"))
            except md.PackageNotFoundError as e:
                raise DistributionNotFound(name) from e

        shim.DistributionNotFound, shim.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = shim
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    return Cockpit, configuration, extend


def mlp(seed: int = 0) -> nn.Module:
    """784-256-128-10 ReLU MLP (the 3-layer MLP of row B3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def synthetic_classes(n_steps: int, batch: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_steps, batch, 784) inputs and (n_steps, batch) labels: 10 Gaussian classes, unit noise around means
    drawn from N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    means = 0.5 * torch.randn(10, 784, generator=g)  # (10, 784)
    y = torch.randint(0, 10, (n_steps, batch), generator=g)  # (n, B)
    x = means[y] + torch.randn(n_steps, batch, 784, generator=g)  # (n, B, 784)
    return x, y


def case_b3(args) -> dict:
    """Cockpit economy vs gradsight on the MLP (see the module docstring)."""
    steps, bsz, lr = args.b3_steps, 128, 0.05
    X, Y = synthetic_classes(steps + args.b3_block, bsz)
    base = mlp()
    try:
        Cockpit, configuration, extend = _import_cockpit()
        cockpit_error = None
    except Exception as e:
        Cockpit = configuration = extend = None
        cockpit_error = f"{type(e).__name__}: {e}"
        log(f"B3: cockpit unavailable: {cockpit_error}")
    models: dict[str, nn.Module] = {}
    keep: list = []

    def make(name: str, extended: bool = False):
        m = copy.deepcopy(base)
        if extended:
            m = extend(m)
        models[name] = m
        return m, torch.optim.SGD(m.parameters(), lr=lr)

    def plain_step(m, o, t):
        loss = F.cross_entropy(m(X[t]), Y[t])
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)

    variants = []
    m, o = make("plain")
    variants.append(Variant("plain", lambda t, m=m, o=o: plain_step(m, o, t), note="reference"))
    for name, every, note in (("gradsight first-order", FIRST_ORDER, "norms, update ratio, spikes every step"),
                              ("gradsight per_example/1", PE_EVERY_STEP,
                               "first-order + per-example norms (quantiles), noise scale every step")):
        m, o = make(name)
        keep.append(Monitor(m, o, every=every))
        variants.append(Variant(name, lambda t, m=m, o=o: plain_step(m, o, t), note=note))
    if Cockpit is not None:
        lossfunc = extend(nn.CrossEntropyLoss(reduction="mean"))
        individual = nn.CrossEntropyLoss(reduction="none")

        def cockpit_step(m, o, cp, t):
            out = m(X[t])
            loss = lossfunc(out, Y[t])
            losses = individual(out, Y[t])
            with cp(t, info={"batch_size": bsz, "individual_losses": losses, "loss": loss, "optimizer": o}):
                loss.backward(create_graph=cp.create_graph(t))
            o.step()
            o.zero_grad(set_to_none=True)

        for name, drop, note in (("cockpit economy", (), "every step; BackPACK-extended model and loss"),
                                 ("cockpit economy w/o GradHist1d", ("GradHist1d",),
                                  "economy minus the per-example gradient histogram")):
            m, o = make(name, extended=True)
            qs = [q for q in configuration("economy") if type(q).__name__ not in drop]
            cp = Cockpit(m.parameters(), quantities=qs)
            keep.append(cp)
            variants.append(Variant(name, lambda t, m=m, o=o, cp=cp: cockpit_step(m, o, cp, t),
                                    stride=args.b3_cockpit_stride, note=note))
    rounds = steps // args.b3_block
    log(f"B3: {rounds} rounds x {args.b3_block} steps; cockpit in one round of {args.b3_cockpit_stride}")
    t0 = time.perf_counter()
    with ForeignLoad() as load, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's full-backward-hook warning on every step
        interleave(variants, rounds, args.b3_block)
    wall = time.perf_counter() - t0
    rows = summarize(variants, variants[0])
    checks = b3_checks(base, X, Y, lr, args.check_steps, Cockpit, configuration, extend) if Cockpit else None
    return {"model": "MLP 784-256-128-10 (ReLU), CrossEntropy mean",
            "n_params": sum(p.numel() for p in base.parameters()),
            "batch": bsz, "optimizer": f"SGD(lr={lr})", "steps": steps, "block": args.b3_block, "rounds": rounds,
            "cockpit_stride": args.b3_cockpit_stride, "wall_s": wall, "foreign_load_cores": load.cores,
            "cockpit_error": cockpit_error, "rows": rows, "checks": checks}


def b3_checks(base, X, Y, lr, steps, Cockpit, configuration, extend) -> dict:
    """Cockpit (economy) and gradsight's first-order set on the SAME extended model and steps: Cockpit's
    GradNorm (per parameter tensor) vs gradsight's per-layer grad_norm."""
    m = extend(copy.deepcopy(base))
    o = torch.optim.SGD(m.parameters(), lr=lr)
    lossfunc = extend(nn.CrossEntropyLoss(reduction="mean"))
    individual = nn.CrossEntropyLoss(reduction="none")
    cp = Cockpit(m.parameters(), quantities=configuration("economy"))
    mon = Monitor(m, o, every=FIRST_ORDER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            out = m(X[t])
            loss, losses = lossfunc(out, Y[t]), individual(out, Y[t])
            with cp(t, info={"batch_size": X.shape[1], "individual_losses": losses, "loss": loss, "optimizer": o}):
                loss.backward(create_graph=cp.create_graph(t))
            o.step()
            o.zero_grad(set_to_none=True)
    table = mon.table()
    mon.close()
    ours = _series(table, S.GRAD_NORM)
    names = [n for n, _ in m.named_parameters()]
    got = cp.get_output()
    d, n = 0.0, 0
    for t in range(steps):
        for name, v in zip(names, got[t]["GradNorm"]):
            d = max(d, _rel(ours[(t, name)], float(v)))
            n += 1
    return {"steps": steps, "gradnorm_vs_cockpit_max_rel": d, "values_compared": n, "pass": bool(d <= TOL)}


# ----------------------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    vers = {}
    for pkg in ("torch", "transformers", "pytorch-lightning", "wandb", "cockpit-for-pytorch", "backpack-for-pytorch"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "os_cpu_count": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "cpu": cpu,
            "loadavg_start": list(os.getloadavg()), "python": platform.python_version(), "versions": vers}


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_rows(doc: dict) -> list[dict]:
    """Rows of the printed table: case, variant, ms/step (median), ratio to plain, notes."""
    out = []
    for case, key in (("B1 tiny GPT-2", "b1"), ("R SmolLM2-135M", "realistic"), ("B3 Cockpit MLP", "b3")):
        sec = doc.get(key)
        if not sec:
            continue
        if sec.get("error"):
            out.append({"case": case, "variant": "-", "ms": None, "ratio": None, "notes": "ERROR " + sec["error"]})
            continue
        for r in sec["rows"]:
            notes = [r["note"]]
            if r.get("ratio_amortised") is not None and r["variant"] != "plain":
                q = r.get("ratio_amortised_q25_q75")
                notes.append(f"amortised {r['ratio_amortised']:.3f}" + (f" (IQR {q[0]:.2f}-{q[1]:.2f})" if q else ""))
            if "final_param_max_abs_diff_vs_plain" in r and r["variant"] != "plain":
                d = r["final_param_max_abs_diff_vs_plain"]
                notes.append("final params = plain's" if d == 0 else f"final params differ from plain's by {d:.1e}")
            if key == "b1" and r["variant"] == "gradsight first-order":
                ok = r["ratio"] <= GOAL_FIRST_ORDER
                notes.append(f"goal <= {GOAL_FIRST_ORDER:.2f}: {'PASS' if ok else 'MISSED'}")
            notes.append(f"n={r['n_steps']}")
            out.append({"case": case, "variant": r["variant"], "ms": r["ms_median"], "ratio": r["ratio"],
                        "notes": "; ".join(n for n in notes if n)})
        if key == "b1" and sec.get("wandb_error"):
            out.append({"case": case, "variant": "wandb.watch", "ms": None, "ratio": None,
                        "notes": "skipped: " + sec["wandb_error"]})
        if key == "b3" and sec.get("cockpit_error"):
            out.append({"case": case, "variant": "cockpit economy", "ms": None, "ratio": None,
                        "notes": "skipped: " + sec["cockpit_error"]})
    return out


def print_table(doc: dict) -> None:
    rows = table_rows(doc)
    print(f"\n{'case':<16} {'variant':<32} {'ms/step':>9} {'ratio':>7}  notes")
    print("-" * 120)
    for r in rows:
        print(f"{r['case']:<16} {r['variant']:<32} {_fmt(r['ms'], '9.1f')} {_fmt(r['ratio'], '7.3f')}  {r['notes']}")
    print()
    for key, label in (("b1", "B1"), ("realistic", "R"), ("b3", "B3")):
        sec = doc.get(key) or {}
        if sec.get("checks"):
            print(f"{label} checks: {json.dumps(sec['checks'], default=float)}")
        if "foreign_load_cores" in sec:
            print(f"{label} foreign load: {_fmt(sec['foreign_load_cores'], '.2f')} cores")


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (~4 min): fewer steps, shorter sequences")
    p.add_argument("--only", default="B1,R,B3", help="comma-separated cases among B1, R, B3")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--vocab", type=int, default=2048, help="tiny GPT-2 vocabulary (default 2048)")
    p.add_argument("--block", type=int, default=10, help="B1 steps per variant per round (default 10)")
    p.add_argument("--b1-steps", type=int, default=None, help="B1 steps per variant (default 100; quick 20)")
    p.add_argument("--b3-steps", type=int, default=None, help="B3 steps (default 100; quick 20)")
    p.add_argument("--b3-block", type=int, default=5, help="B3 steps per variant per round (default 5)")
    p.add_argument("--b3-cockpit-stride", type=int, default=None,
                   help="cockpit runs in one B3 round of N (default 5; quick 2)")
    p.add_argument("--real-lengths", default=None,
                   help="R: token counts to pick the batch's records by (default 320,430; quick 130,160)")
    p.add_argument("--check-steps", type=int, default=5, help="steps of the agreement checks (default 5)")
    p.add_argument("--out", type=Path, default=HERE / "results_monitor.json")
    a = p.parse_args(argv)
    q = a.quick
    a.b1_steps = a.b1_steps or (20 if q else 100)
    a.b3_steps = a.b3_steps or (20 if q else 100)
    a.b3_cockpit_stride = a.b3_cockpit_stride or (2 if q else 5)
    a.real_lengths = tuple(int(x) for x in (a.real_lengths or ("130,160" if q else "320,430")).split(","))
    a.only = {x.strip().upper() for x in a.only.split(",") if x.strip()}
    bad = a.only - {"B1", "R", "B3"}
    if bad:
        p.error(f"--only: unknown case(s) {sorted(bad)}; known: B1, R, B3")
    for name in ("threads", "vocab", "block", "b1_steps", "b3_steps", "b3_block", "b3_cockpit_stride", "check_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 1")
    if a.b1_steps < 2 * a.block or a.b3_steps < 2 * a.b3_block * a.b3_cockpit_stride:
        p.error("need at least two rounds (the first is a warm-up): raise --b1-steps / --b3-steps")
    return a


def _previous(path: Path) -> dict:
    """The results file of a previous run ({} when missing or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"benchmark": "training monitor (anchors/monitor-transforms.md §4 B1, B3 + realistic)",
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
                           "machine": machine(), "installs": INSTALLS,
                           "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                                    if k != "out"}}
    cases = (("b1", "B1", case_b1), ("realistic", "R", case_realistic), ("b3", "B3", case_b3))
    old = _previous(args.out) if args.only != {"B1", "R", "B3"} else {}
    for key, name, fn in cases:  # cases not run keep their section of the previous run (with its own date)
        if name not in args.only and key in old and old.get("quick") == args.quick:
            doc[key] = old[key]
            doc.setdefault("sections_from_previous_run", []).append(key)
    for key, name, fn in cases:
        if name not in args.only:
            continue
        try:
            doc[key] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fn(args)}
        except Exception as e:  # a failing case is reported, the others still run
            log(f"{name} failed: {type(e).__name__}: {e}")
            doc[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        write_json(doc, args.out)
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    doc["wall_s"] = time.perf_counter() - t0
    doc["table"] = table_rows(doc)
    write_json(doc, args.out)
    print_table(doc)
    log(f"done in {doc['wall_s']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
