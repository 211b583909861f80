"""gradsight benchmark suite (`make bench`).

Every reported speed number is a RATIO of two timings taken in the same process, interleaved (A and B
alternate, the order rotates every round) so that a background load on the machine hits both sides alike;
the ratio of a round is B/A of that round and the reported ratio is the median over rounds.

Cases (see benchmarks/README.md):
  1. SmolLM2-135M-Instruct, 32 demo examples, all 210 linear layers:
       plain forward+backward (HF loss)  vs  gradsight batch_layer_stats  vs  per-example-backward reference
       (+ dense svdvals); accuracy of nuclear norm, sigma1_ratio and erank against the reference.
  2. Synthetic single layer d_in = d_out = 4096: Gram route vs materialise + svdvals.
  3. Peak RSS increase of gradsight vs plain (informational; separate subprocesses).
  4. Geometry features, SmolLM2, 32 demo examples, 210 layers, r_in = r_out = 16: capture + Kronecker-projected
       features vs plain forward+backward; vs the naive route (per-example forward+backward at batch size 1,
       then a dense seeded Gaussian projection of every layer's vec(M_e) to 256 dims, timed on 14 layers and
       scaled by numel); vs the factored materialise + Kronecker project route (info); peak RSS of the real
       run_geometry pipeline for n = 16, 32, 64 examples with the same batch limits (subprocesses). Written
       to results.json under "geometry".

Usage: .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results.json] [--only geometry]
The exit code is 0 whenever the measurements ran, also when a goal is missed (the table says MISSED).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
N_EXAMPLES = 32
MAX_LENGTH = 512
TOKEN_BUDGET = 2048
REF_BUDGET_S = 600.0  # the reference runs on all examples when its estimated total is below this


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# timing helpers


QUIET = 0.3  # CPU cores busy with OTHER processes below which a timing counts as clean
MAX_WAIT = 60.0  # seconds to wait for a quiet machine before each timing (then time anyway); set by main()
_CLK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(own[11]) + int(own[12])  # minus idle, iowait; utime + stime
    except (OSError, IndexError, ValueError):  # not Linux: no load accounting
        return 0, 0


def foreign_load(interval: float = 0.25) -> float:
    """Cores kept busy by other processes over the next `interval` seconds."""
    b0, o0 = _cpu_ticks()
    time.sleep(interval)
    b1, o1 = _cpu_ticks()
    return max(0.0, ((b1 - b0) - (o1 - o0)) / _CLK / interval)


def wait_quiet() -> float:
    """Wait (up to MAX_WAIT s) until other processes leave the CPU alone; returns the seconds waited."""
    t0 = time.perf_counter()
    while foreign_load() >= QUIET and time.perf_counter() - t0 < MAX_WAIT:
        pass
    return time.perf_counter() - t0


@dataclass
class Sample:
    seconds: float
    foreign: float  # mean number of cores busy with other processes during the call

    @property
    def clean(self) -> bool:
        return self.foreign < QUIET


def timed(fn: Callable[[], object]) -> tuple[Sample, object]:
    """(Sample, result) of one call. Waits for a quiet machine and collects garbage first (not timed)."""
    wait_quiet()
    gc.collect()
    b0, o0 = _cpu_ticks()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    b1, o1 = _cpu_ticks()
    return Sample(dt, max(0.0, ((b1 - b0) - (o1 - o0)) / _CLK / dt)), out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[Sample]]:
    """Time every fn once per round; the order rotates every round (A B C, B C A, C A B, ...).

    One untimed warm-up call of each fn precedes the first round (warmup=False: none, for functions that run
    for minutes, where a first call's allocations are noise).
    """
    names = list(fns)
    for n in names if warmup else ():
        fns[n]()
    times: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed(fns[n])[0])
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {times[n][-1].seconds:.2f} s" + (f" (foreign load {times[n][-1].foreign:.1f})"
                                                    if not times[n][-1].clean else "") for n in names))
    return times


def paired_ratio(num: list[Sample], den: list[Sample]) -> tuple[float, str]:
    """Median over rounds of num[r] / den[r], over the clean rounds when there are any; and a note."""
    pairs = list(zip(num, den))
    clean = [(a, b) for a, b in pairs if a.clean and b.clean]
    use = clean or pairs
    note = f"{len(clean)}/{len(pairs)} rounds clean" + ("" if clean else " (CONTENDED: all rounds used)")
    return statistics.median(a.seconds / b.seconds for a, b in use), note


def secs(xs: list[Sample]) -> float:
    """Median seconds over the clean samples (all when none is clean)."""
    use = [x for x in xs if x.clean] or xs
    return statistics.median(x.seconds for x in use)


# ----------------------------------------------------------------------------------------------------------
# results


@dataclass
class Row:
    case: str
    value: float
    goal: str  # e.g. "<= 1.3", ">= 5", "info"
    details: str = ""
    unit: str = "x"
    extra: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.goal == "info" or self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "info" if self.goal == "info" else "n/a"
        op, target = self.goal.split()
        ok = self.value <= float(target) if op == "<=" else self.value >= float(target)
        return "PASS" if ok else "MISSED"

    def fmt_value(self) -> str:
        v = self.value
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if self.unit == "rel":
            return f"{v:.2e}"
        return f"{v:.2f}{self.unit}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status
        return d


def print_table(rows: list[Row], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for col, kw in (("case", {}), ("measured", {"justify": "right"}), ("goal", {}), ("result", {}),
                        ("details", {"overflow": "fold"})):
            t.add_column(col, **kw)
        style = {"PASS": "bold green", "MISSED": "bold red", "info": "dim", "n/a": "yellow"}
        for r in rows:
            t.add_row(r.case, r.fmt_value(), r.goal, f"[{style[r.status]}]{r.status}[/]", r.details)
        Console(width=max(160, Console().width)).print(t)
    except ImportError:  # plain fallback
        print(title)
        print(f"{'case':48} {'measured':>10} {'goal':>9} {'result':>7}  details")
        for r in rows:
            print(f"{r.case:48} {r.fmt_value():>10} {r.goal:>9} {r.status:>7}  {r.details}")


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# case 1 setup: model, the 32 demo examples, batches


@dataclass
class Workload:
    model: torch.nn.Module
    layers: list  # LayerInfo
    modules: dict  # name -> nn.Module
    batches: list[dict[str, torch.Tensor]]
    groups: list[list[str]]  # per batch, per position
    n_tokens: list[list[int]]


def workload_records(n_examples: int, cycle: int | None = None) -> list[dict]:
    """The first n demo records; with `cycle`, the first `cycle` records repeated (new ids) up to n records,
    so that every n has the same length distribution."""
    from gradsight.demo.problems import demo_records

    if cycle is None:
        return demo_records()[:n_examples]
    base = demo_records()[:cycle]
    return [dict(base[i % cycle], id=f"{base[i % cycle]['id']}-c{i // cycle}") for i in range(n_examples)]


def load_workload(n_examples: int, cycle: int | None = None, max_batch: int = 64) -> Workload:
    from gradsight.inputs.batching import model_cost
    from gradsight.inputs.data import EncodeOptions, collate, encode, load_records, make_batches
    from gradsight.inputs.models import load_model, select_layers

    t0 = time.perf_counter()
    model, tok = load_model(MODEL)
    model.eval()
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    layers = select_layers(model)
    named = dict(model.named_modules())
    modules = {li.name: named[li.name] for li in layers}
    recs, bad = load_records(workload_records(n_examples, cycle))
    assert not bad and len(recs) == n_examples
    opts = EncodeOptions(max_length=MAX_LENGTH)
    enc = [encode(r, tok, opts) for r in recs]
    assert all(e.ok for e in enc), [e.reason for e in enc if not e.ok]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches, groups, n_tok = [], [], []
    for b in make_batches(enc, token_budget=TOKEN_BUDGET, max_batch=max_batch):
        batches.append(collate([enc[i] for i in b], pad))
        groups.append([recs[i].group for i in b])
        n_tok.append([enc[i].n_tokens for i in b])
    return Workload(model, layers, modules, batches, groups, n_tok)


def set_requires_grad(model: torch.nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def plain_hf(w: Workload) -> Callable[[], None]:
    """What a user would otherwise run: batched forward with HF's own loss, backward, zero grads."""

    def run():
        for batch in w.batches:
            labels = batch["input_ids"].masked_fill(~batch["target_mask"], -100)
            out = w.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            out.loss.backward()
            w.model.zero_grad(set_to_none=True)

    return run


def plain_own_loss(w: Workload) -> Callable[[], None]:
    """Plain forward+backward with gradsight's loss (per-example token means, LM head only at targets)."""
    from gradsight.inputs.losses import causal_lm_losses

    def run():
        for batch in w.batches:
            causal_lm_losses(w.model, batch).sum().backward()
            w.model.zero_grad(set_to_none=True)

    return run


def gradsight_batch(w: Workload, b: int) -> dict:
    """batch_layer_stats on batch b: capture + six statistics on every selected layer."""
    from gradsight.analyses.layers import LayersConfig
    from gradsight.analyses.layers.compute import batch_layer_stats
    from gradsight.inputs.losses import loss_fn_for

    _, stats, bad = batch_layer_stats(w.model, w.layers, w.batches[b], loss_fn_for(w.model), LayersConfig())
    assert not bad, bad
    return stats


def gradsight_all(w: Workload) -> Callable[[], list[dict]]:
    return lambda: [gradsight_batch(w, b) for b in range(len(w.batches))]


def gradsight_capture_only(w: Workload) -> Callable[[], None]:
    """For the breakdown: capture (forward + backward with hooks, factors collected) without statistics."""
    from gradsight.capture import capture
    from gradsight.inputs.losses import loss_fn_for

    loss_fn = loss_fn_for(w.model)

    def run():
        for batch in w.batches:
            with capture(w.model, w.modules) as tape:
                tape.set_tokens(batch["attention_mask"].bool())
                loss_fn(w.model, batch).sum().backward()
                tape.grads()

    return run


def reference_examples(w: Workload, b: int, positions: list[int]) -> dict[int, dict[str, dict[str, float]]]:
    """Per-example backward (loop_grads) + float32 svdvals of every layer's gradient + spectral_stats.

    loop_grads is called one example at a time (it slices every example out of the batch without its padding
    anyway); holding 210 full weight gradients of a whole batch would need ~7 GB.
    """
    from gradsight.capture.loop import loop_grads
    from gradsight.inputs.losses import causal_lm_losses
    from gradsight.measures.spectra import spectral_stats

    out = {}
    for e in positions:
        one = {k: v[e : e + 1] for k, v in w.batches[b].items()}
        grads, _ = loop_grads(w.model, w.modules, one, causal_lm_losses)
        per_layer = {}
        for name, g in grads.items():
            s = torch.linalg.svdvals(g.g[0].float())  # float32, values only
            per_layer[name] = {k: float(v[0]) for k, v in spectral_stats(s.unsqueeze(0)).items()}
        del grads
        out[e] = per_layer
    return out


def spread(n: int, k: int) -> list[int]:
    """k positions evenly spread over range(n) (batches are sorted by length, so lengths are spread too)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def max_rel_diff(gs: list[dict], ref: dict[tuple[int, int], dict], metric: str) -> tuple[float, str]:
    worst, where = 0.0, ""
    for (b, e), per_layer in ref.items():
        for name, vals in per_layer.items():
            r = vals[metric]
            g = float(gs[b][name][metric][e])
            d = abs(g - r) / abs(r) if r != 0 else abs(g - r)
            if not d <= worst:  # also catches NaN
                worst, where = d, f"{name} (batch {b}, pos {e})"
    return worst, where


def case_model(args, w: Workload) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    raw: dict = {}
    n_ex = sum(len(b["input_ids"]) for b in w.batches)
    shapes = [tuple(b["input_ids"].shape) for b in w.batches]
    padded = sum(a * c for a, c in shapes)
    n_tgt = sum(int(b["target_mask"].sum()) for b in w.batches)
    raw["batches"] = {"shapes": shapes, "groups": w.groups, "n_tokens": w.n_tokens, "padded_tokens": padded,
                      "targets": n_tgt}
    log(f"case 1: {n_ex} examples in batches {shapes} ({padded} padded tokens, {n_tgt} targets)")

    # --- plain vs gradsight: the whole workload per call, interleaved rounds ---
    set_requires_grad(w.model, True)  # plain runs train every parameter; capture() freezes and restores
    fns = {"plain_hf": plain_hf(w), "plain_own_loss": plain_own_loss(w), "gradsight": gradsight_all(w),
           "capture_only": gradsight_capture_only(w)}
    log(f"case 1a: warm-up + {args.rounds} interleaved rounds of {', '.join(fns)}")
    t = interleaved(fns, args.rounds)
    raw["times"] = {k: [asdict(x) for x in v] for k, v in t.items()}
    r_hf, note = paired_ratio(t["gradsight"], t["plain_hf"])
    r_own, note_own = paired_ratio(t["gradsight"], t["plain_own_loss"])
    r_cap, note_cap = paired_ratio(t["capture_only"], t["plain_hf"])
    rows.append(Row("1a gradsight / plain fwd+bwd (HF loss)", r_hf, "<= 1.3",
                    f"{note}; gradsight {secs(t['gradsight']):.2f} s, plain {secs(t['plain_hf']):.2f} s "
                    f"for {n_ex} ex ({padded} padded tokens); {len(w.layers)} layers x 6 stats"))
    rows.append(Row("1b gradsight / plain fwd+bwd (gradsight loss)", r_own, "info",
                    f"{note_own}; plain with causal_lm_losses (LM head at target positions only), "
                    f"all params trained: {secs(t['plain_own_loss']):.2f} s"))
    rows.append(Row("1b' capture only (no stats) / plain (HF loss)", r_cap, "info",
                    f"{note_cap}; forward + backward with hooks, no weight grads: "
                    f"{secs(t['capture_only']):.2f} s; the rest of gradsight is the spectra"))

    # --- reference vs gradsight, per example; per batch b: gradsight(b), reference(subset of b), gradsight(b) ---
    set_requires_grad(w.model, True)
    sizes = [len(b["input_ids"]) for b in w.batches]
    log("case 1c: reference warm-up (one example)")
    s_warm, _ = timed(lambda: reference_examples(w, len(w.batches) - 1, [sizes[-1] - 1]))
    if args.ref_examples == "auto":
        est = s_warm.seconds * n_ex
        k_total = n_ex if est <= REF_BUDGET_S else max(2, int(REF_BUDGET_S / s_warm.seconds))
        log(f"  warm-up example took {s_warm.seconds:.1f} s -> estimated {est:.0f} s for all {n_ex}; "
            f"running {k_total}")
    else:
        k_total = min(int(args.ref_examples), n_ex)
    # the subset is shared among batches in proportion to their size (at least one per batch)
    per_batch = [max(1, round(k_total * s / n_ex)) for s in sizes]
    subsets = [spread(s, k) for s, k in zip(sizes, per_batch)]
    gs_samples: list[list[Sample]] = []
    gs_stats: list[dict] = []
    ref_samples: list[Sample] = []
    ref: dict[tuple[int, int], dict] = {}
    for b, pos in enumerate(subsets):
        g1, stats = timed(lambda: gradsight_batch(w, b))
        rs = []
        for e in pos:
            r, vals = timed(lambda: reference_examples(w, b, [e]))
            rs.append(r)
            ref[(b, e)] = vals[e]
        g2, _ = timed(lambda: gradsight_batch(w, b))
        gs_samples.append([g1, g2])
        gs_stats.append(stats)
        ref_samples += rs
        log(f"  batch {b}: gradsight {g1.seconds:.2f} / {g2.seconds:.2f} s for {sizes[b]} ex; reference "
            f"{sum(x.seconds for x in rs):.1f} s for {len(rs)} ex")
    n_ref = len(ref_samples)
    gs_per_ex = sum(secs(ss) for ss in gs_samples) / n_ex
    clean_ref = [x for x in ref_samples if x.clean]
    ref_per_ex = statistics.mean(x.seconds for x in (clean_ref or ref_samples))
    n_clean = sum(x.clean for x in ref_samples) + sum(x.clean for ss in gs_samples for x in ss)
    n_all = n_ref + 2 * len(gs_samples)
    raw["reference"] = {"subsets": subsets, "reference": [asdict(x) for x in ref_samples],
                        "gradsight_batches": [[asdict(x) for x in ss] for ss in gs_samples],
                        "warmup": asdict(s_warm)}
    rows.append(Row("1c reference / gradsight (per example)", ref_per_ex / gs_per_ex, ">= 5",
                    f"reference {ref_per_ex:.2f} s/ex on {n_ref}/{n_ex} ex (loop_grads + {len(w.layers)} "
                    f"svdvals f32 + stats); gradsight {gs_per_ex:.3f} s/ex (batched; runs bracketing the "
                    f"reference); {n_clean}/{n_all} timings clean"))

    # --- accuracy against the reference (float32 throughout; gradsight's eigenproblems are float64) ---
    for metric, goal in (("nuclear", "<= 1e-4"), ("sigma1_ratio", "info"), ("erank", "info"),
                         ("frobenius", "info")):
        d, where = max_rel_diff(gs_stats, ref, metric)
        raw[f"max_rel_diff_{metric}"] = {"value": d, "where": where}
        rows.append(Row(f"1d max rel diff {metric} (vs reference)", d, goal,
                        f"{n_ref} ex x {len(w.layers)} layers; worst {where}", unit="rel"))
    return rows, raw


# ----------------------------------------------------------------------------------------------------------
# case 2: synthetic single layer


def case_synthetic(args) -> tuple[list[Row], dict]:
    """One layer, one example: Gram route (float64) vs materialised G^T A (float32) + svdvals."""
    from gradsight.capture.grads import FactoredGrad
    from gradsight.measures.spectra import spectral_stats

    rows, raw = [], {}
    d = args.synth_d
    gen = torch.Generator().manual_seed(0)
    # warm-up of the dense path on a small matrix (a d x d warm-up would cost as much as a timed repeat)
    torch.linalg.svdvals(torch.randn(256, 256, generator=gen))
    for T in args.synth_T:
        A = torch.randn(1, T, d, generator=gen)
        G = torch.randn(1, T, d, generator=gen)
        tokens = torch.ones(1, T, dtype=torch.bool)

        def gram():
            return spectral_stats(FactoredGrad(A, G, tokens).singular_values(route="gram"))

        def dense():
            M = G[0].T @ A[0]  # (d_out, d_in) float32, materialised
            s = torch.linalg.svdvals(M)
            return spectral_stats(s.unsqueeze(0)), s

        gram()  # warm-up
        g_all: list[Sample] = []
        d_all: list[Sample] = []
        ratios, clean = [], []
        st_g = st_d = s_d = None
        for r in range(args.synth_repeats):  # gram x k, dense, gram x k
            before = [timed(gram)[0] for _ in range(args.gram_inner)]
            sd, (st_d, s_d) = timed(dense)
            after = []
            for _ in range(args.gram_inner):
                sg, st_g = timed(gram)
                after.append(sg)
            tg = secs(before + after)
            g_all += before + after
            d_all.append(sd)
            ratios.append(sd.seconds / tg)
            clean.append(sd.clean and any(x.clean for x in before + after))
            log(f"case 2 d={d} T={T}: dense {sd.seconds:.1f} s (foreign load {sd.foreign:.1f}), "
                f"gram median {tg:.4f} s")
        use = [x for x, c in zip(ratios, clean) if c] or ratios
        note = f"{sum(clean)}/{len(clean)} repeats clean" + ("" if any(clean) else " (CONTENDED)")
        nuc_g, nuc_d = float(st_g["nuclear"][0]), float(st_d["nuclear"][0])
        rel = abs(nuc_g - nuc_d) / abs(nuc_d)
        # the dense float32 svdvals also returns d - T "zero" singular values at its rounding-noise floor, and
        # they count in its nuclear norm; for information, the same comparison on its top T values only
        nuc_top = float(s_d.double()[:T].sum())
        rel_top = abs(nuc_g - nuc_top) / abs(nuc_top)
        raw[f"d{d}_T{T}"] = {"dense": [asdict(x) for x in d_all], "gram": [asdict(x) for x in g_all],
                             "ratios": ratios, "nuclear_gram": nuc_g, "nuclear_dense": nuc_d,
                             "nuclear_dense_top_T": nuc_top}
        goal = ">= 50" if d == 4096 else "info"  # the goal is stated for d = 4096 (quick runs use less)
        rows.append(Row(f"2 synthetic d={d} T={T}: dense / gram", statistics.median(use), goal,
                        f"{note}; dense (materialise f32 + svdvals) {secs(d_all):.1f} s vs gram route (f64) "
                        f"{secs(g_all) * 1e3:.1f} ms; gram timed {args.gram_inner}x before and after each "
                        "dense run"))
        rows.append(Row(f"2 synthetic d={d} T={T}: nuclear rel diff", rel, "info",
                        f"gram (f64) vs dense svdvals (f32, all {d} values); vs its top {T} only: {rel_top:.1e}",
                        unit="rel"))
    return rows, raw


# ----------------------------------------------------------------------------------------------------------
# case 3: memory (subprocesses)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_child(mode: str, n_examples: int) -> None:
    """Run in a subprocess: load, reset the peak RSS, run `mode` once over the batches, print the numbers."""
    w = load_workload(n_examples)
    fn = {"plain": plain_hf(w), "gradsight": gradsight_all(w)}[mode]
    set_requires_grad(w.model, True)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # detected by the parent: hwm_before > rss_before
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    fn()
    print(json.dumps({"mode": mode, "rss_before_kb": rss0, "hwm_before_kb": hwm0,
                      "hwm_after_kb": _status_kb("VmHWM")}))


def case_memory(args) -> tuple[list[Row], dict]:
    """Peak RSS increase of one pass of plain / gradsight, each in its own process (run side by side: the
    numbers are memory, not time)."""
    name = "3 peak RSS increase gradsight / plain"
    log("case 3: memory subprocesses (plain, gradsight) side by side")
    procs = {mode: subprocess.Popen([sys.executable, __file__, "--_memory-child", mode,
                                     "--n-examples", str(args.n_examples)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("plain", "gradsight")}
    res = {}
    for mode, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            tail = (err.strip().splitlines() or ["?"])[-1]
            return [Row(name, float("nan"), "info", f"skipped: {mode} subprocess failed: {tail}")], {}
        res[mode] = json.loads(out.strip().splitlines()[-1])
    if any(r["hwm_before_kb"] > r["rss_before_kb"] * 1.05 for r in res.values()):
        return [Row(name, float("nan"), "info", "skipped: could not reset VmHWM (/proc/self/clear_refs)")], res
    inc = {m: (r["hwm_after_kb"] - r["rss_before_kb"]) / 1024 for m, r in res.items()}
    base = res["plain"]["rss_before_kb"] / 1024
    return [Row(name, inc["gradsight"] / inc["plain"], "info",
                f"gradsight +{inc['gradsight']:.0f} MB, plain +{inc['plain']:.0f} MB over {base:.0f} MB after "
                f"load (VmHWM - VmRSS, one pass over the {args.n_examples} ex each, separate processes)")], res


# ----------------------------------------------------------------------------------------------------------
# case 4: geometry features (projected per-example gradients, the input of `gradsight geometry`)

GEOM_R = 16  # r_in = r_out: 256 features per layer and example
GEOM_MEM_MAX_BATCH = 8  # case 4c: same batch composition for every n (full batches of 8 at token_budget 2048)


def geometry_projector():
    from gradsight.measures.projection import ProjectionSpec, Projector

    return Projector(ProjectionSpec(r_in=GEOM_R, r_out=GEOM_R))


def capture_grads(w: Workload, b: int, loss_fn: Callable) -> dict:
    """capture() forward + backward of batch b as the pipeline runs it; {layer: FactoredGrad}."""
    from gradsight.capture import capture

    batch = w.batches[b]
    with capture(w.model, w.modules) as tape:
        tape.set_tokens(batch["attention_mask"].bool())
        losses = loss_fn(w.model, batch)
        torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses)).sum().backward()
        return tape.grads()  # the FactoredGrads keep their tensors after the tape is cleared


def project_features(proj, grads: dict) -> dict[str, torch.Tensor]:
    """Kronecker projection from the factors (no materialised gradient); CPU float32 like a feature shard."""
    return {k: v.to("cpu", torch.float32) for k, v in proj.features(grads).items()}


def reference_project(proj, grads: dict, positions: list[int]) -> dict[str, torch.Tensor]:
    """The naive route: per layer and example, materialise M_e = G_e^T A_e (d_out x d_in, real tokens only,
    float32) and project it densely with the same matrices, P_out @ M_e @ P_in^T. {layer: (k, r_out*r_in)}."""
    out = {}
    for name, g in grads.items():
        d_in, d_out = g.A.shape[-1], g.G.shape[-1]
        P_in = proj.matrix(name, "in", GEOM_R, d_in, g.A.device)
        P_out = proj.matrix(name, "out", GEOM_R, d_out, g.A.device)
        rows = []
        for e in positions:
            tok = g.tokens[e]
            M = g.G[e, tok].float().T @ g.A[e, tok].float()  # (d_out, d_in) per-example gradient
            rows.append((P_out @ M @ P_in.T).reshape(-1))
        out[name] = torch.stack(rows).to("cpu", torch.float32)
    return out


@dataclass
class Split:
    """Seconds of the capture part and of the projection part of one timed call (perf_counter inside)."""

    capture: float = 0.0
    project: float = 0.0


def features_batch(w: Workload, b: int, proj, loss_fn: Callable, split: Split | None = None) -> dict:
    t0 = time.perf_counter()
    grads = capture_grads(w, b, loss_fn)
    t1 = time.perf_counter()
    feats = project_features(proj, grads)
    if split is not None:
        split.capture, split.project = t1 - t0, time.perf_counter() - t1
    return feats


def reference_batch(w: Workload, b: int, proj, loss_fn: Callable, positions: list[int],
                    split: Split | None = None) -> dict:
    t0 = time.perf_counter()
    grads = capture_grads(w, b, loss_fn)
    t1 = time.perf_counter()
    feats = reference_project(proj, grads, positions)
    if split is not None:
        split.capture, split.project = t1 - t0, time.perf_counter() - t1
    return feats


def features_all(w: Workload, proj, loss_fn: Callable) -> Callable[[], list[dict]]:
    return lambda: [features_batch(w, b, proj, loss_fn) for b in range(len(w.batches))]


# the naive route (TRAK-style): materialise every per-example gradient by a per-example backward, then project
# each layer's vec(M_e) densely with a seeded Gaussian P (r x d_out*d_in), regenerated per layer
NAIVE_R = GEOM_R * GEOM_R  # same feature size per layer as the Kronecker projection (256)
NAIVE_BLOCKS = 2  # the dense projection is timed on all layers of this many blocks and scaled by numel


def naive_subset(w: Workload) -> list[str]:
    """All layers of the first and the last block (every kind and shape of the model, 7 per block)."""
    blocks = sorted({li.block for li in w.layers if li.block >= 0})
    pick = {blocks[0], blocks[-1]} if NAIVE_BLOCKS == 2 else set(blocks[:NAIVE_BLOCKS])
    return [li.name for li in w.layers if li.block in pick]


def naive_loop(w: Workload, b: int, keep: list[str], positions: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Part 1 of the naive route on batch b: per example, a forward + backward at batch size 1 (the example
    alone, unpadded) with every selected linear weight requiring grad (`loop_grads`, gradsight's token-mean
    loss `causal_lm_losses`). The `.grad` of each of the 210 weights is the materialised per-example gradient
    (cloned by loop_grads); the flattened gradients of the `keep` layers are returned, {layer: (k, numel)}."""
    from gradsight.capture.loop import loop_grads
    from gradsight.inputs.losses import causal_lm_losses

    batch = w.batches[b]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in keep}
    for e in (range(len(batch["input_ids"])) if positions is None else positions):
        one = {k: v[e : e + 1] for k, v in batch.items()}
        grads, _ = loop_grads(w.model, w.modules, one, causal_lm_losses)
        for n in keep:
            rows[n].append(grads[n].g[0].reshape(-1))
        del grads
    return {n: torch.stack(v) for n, v in rows.items()}


@dataclass
class DenseSplit:
    generate: float = 0.0
    matmul: float = 0.0


def naive_seed(name: str) -> int:
    import zlib

    return zlib.crc32(f"{name}|naive-dense".encode())


def naive_project(grads: dict[str, torch.Tensor], split: DenseSplit | None = None) -> dict[str, torch.Tensor]:
    """Part 2 of the naive route: per layer, generate a dense seeded Gaussian P (NAIVE_R x numel, entries
    N(0, 1/NAIVE_R), float32) and project all examples' vec(M_e) at once, (k, numel) @ P^T. One P at a time
    (the largest is 256 x 884736 float32 = 0.9 GB)."""
    out = {}
    for name, M in grads.items():
        t0 = time.perf_counter()
        P = torch.randn(NAIVE_R, M.shape[1], generator=torch.Generator().manual_seed(naive_seed(name)),
                        dtype=torch.float32)
        P.mul_(NAIVE_R**-0.5)
        t1 = time.perf_counter()
        out[name] = M @ P.T
        t2 = time.perf_counter()
        del P
        if split is not None:
            split.generate += t1 - t0
            split.matmul += t2 - t1
    return out


def estimator_check(grads: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
                    kron: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Projected vs exact inner products of the per-example gradients, per layer, normalised by
    ||M_i|| ||M_j||. For a Gaussian projection to r dims the error of <P m_i, P m_j> has standard deviation
    sqrt((1 + cos_ij^2) / r) in these units (sqrt(2 / r) on the diagonal)."""
    out = {}
    for name, M in grads.items():
        M = M.double()
        K = M @ M.T
        nrm = K.diagonal().sqrt()
        den = nrm[:, None] * nrm[None, :]
        iu = torch.triu_indices(len(K), len(K), 1)
        cos2 = (K / den)[iu[0], iu[1]] ** 2
        res = {"expected_offdiag": float(((1 + cos2) / NAIVE_R).mean().sqrt()),
               "expected_diag": (2 / NAIVE_R) ** 0.5, "mean_abs_cos": float(cos2.sqrt().mean())}
        for tag, F in (("dense", dense[name]), ("kronecker", kron[name])):
            F = F.double()
            E = (F @ F.T - K) / den
            res[f"{tag}_offdiag_rms"] = float(E[iu[0], iu[1]].pow(2).mean().sqrt())
            res[f"{tag}_diag_rms"] = float(E.diagonal().pow(2).mean().sqrt())
        out[name] = res
    return out


def case_geometry(args, w: Workload) -> tuple[list[Row], dict]:
    from gradsight.inputs.losses import loss_fn_for

    rows: list[Row] = []
    raw: dict = {}
    proj = geometry_projector()
    loss_fn = loss_fn_for(w.model)
    n_ex = sum(len(b["input_ids"]) for b in w.batches)
    shapes = [tuple(b["input_ids"].shape) for b in w.batches]
    padded = sum(a * c for a, c in shapes)
    n_layers = len(w.layers)
    raw["batches"] = {"shapes": shapes, "padded_tokens": padded}
    raw["projection"] = {"r_in": GEOM_R, "r_out": GEOM_R, "features_per_example": n_layers * GEOM_R**2}
    log(f"case 4: {n_ex} examples in batches {shapes}, {n_layers} layers, r_in = r_out = {GEOM_R}")

    # --- 4a features vs a plain training step (minus optimizer), interleaved rounds ---
    set_requires_grad(w.model, True)
    fns = {"features": features_all(w, proj, loss_fn), "plain_hf": plain_hf(w), "plain_own_loss": plain_own_loss(w)}
    log(f"case 4a: warm-up + {args.rounds} interleaved rounds of {', '.join(fns)}")
    t = interleaved(fns, args.rounds)
    raw["times"] = {k: [asdict(x) for x in v] for k, v in t.items()}
    r_hf, note = paired_ratio(t["features"], t["plain_hf"])
    r_own, note_own = paired_ratio(t["features"], t["plain_own_loss"])
    rows.append(Row("4a features / plain fwd+bwd (HF loss)", r_hf, "<= 1.5",
                    f"{note}; features {secs(t['features']):.2f} s, plain {secs(t['plain_hf']):.2f} s for {n_ex} "
                    f"ex ({padded} padded tokens); capture + {n_layers} layers x {GEOM_R}x{GEOM_R} projections, "
                    "CPU float32"))
    rows.append(Row("4a' features / plain fwd+bwd (gradsight loss)", r_own, "info",
                    f"{note_own}; plain with causal_lm_losses, all params trained: "
                    f"{secs(t['plain_own_loss']):.2f} s"))

    # --- 4b features vs the naive route (per-example backward + dense projection); 4b2 (info) vs the factored
    # materialise + Kronecker project route. Per batch: F R F R F N F (F features, R factored materialise,
    # N the naive per-example loop over the whole batch); then the dense projection of the naive route ---
    sizes = [len(b["input_ids"]) for b in w.batches]
    keep = naive_subset(w)
    numel = {li.name: li.d_in * li.d_out for li in w.layers}
    proj_scale = sum(numel.values()) / sum(numel[n] for n in keep)
    log("case 4b: warm-ups (factored reference and naive per-example loop, one example each)")
    sp = Split()
    reference_batch(w, len(w.batches) - 1, proj, loss_fn, [0], sp)  # warm-up (untimed)
    naive_loop(w, len(w.batches) - 1, keep, [0])  # warm-up (untimed)
    if args.geom_ref_examples == "auto":
        # estimate from a timed single example of the longest batch, scaled to all examples
        sp = Split()
        timed(lambda: reference_batch(w, 0, proj, loss_fn, [0], sp))
        est = sp.project * n_ex * args.geom_ref_rounds
        k_total = n_ex if est <= REF_BUDGET_S else max(len(sizes), int(REF_BUDGET_S / sp.project / args.geom_ref_rounds))
        log(f"  one example's factored materialise + project took {sp.project:.2f} s -> estimated {est:.0f} s "
            f"for {args.geom_ref_rounds} round(s) of all {n_ex}; running {k_total}")
    else:
        k_total = min(int(args.geom_ref_examples), n_ex)
    per_batch = [max(1, round(k_total * s / n_ex)) for s in sizes]
    subsets = [spread(s, k) for s, k in zip(sizes, per_batch)]
    f_tot: list[Sample] = []
    f_split: list[Split] = []
    r_tot: list[Sample] = []
    r_split: list[Split] = []
    n_tot: list[Sample] = []
    naive_grads: list[dict[str, torch.Tensor]] = []
    kron: list[dict[str, torch.Tensor]] = []
    per_b: list[dict] = []
    worst, where = 0.0, ""
    for b, pos in enumerate(subsets):
        scale = sizes[b] / len(pos)
        fs, fp, rs, rp = [], [], [], []
        feats = ref = None
        for i in range(2 * args.geom_ref_rounds + 1):
            s = Split()
            if i % 2 == 0:
                x, feats = timed(lambda: features_batch(w, b, proj, loss_fn, s))
                fs.append(x)
                fp.append(s)
            else:
                x, ref = timed(lambda: reference_batch(w, b, proj, loss_fn, pos, s))
                rs.append(x)
                rp.append(s)
        # naive part 1 on the whole batch (one backward per example), then one more features run
        x, g = timed(lambda: naive_loop(w, b, keep))
        n_tot.append(x)
        naive_grads.append(g)
        s = Split()
        x, _ = timed(lambda: features_batch(w, b, proj, loss_fn, s))
        fs.append(x)
        fp.append(s)
        kron.append({n: feats[n] for n in keep})
        # accuracy: the features of the kept positions against the factored materialise route
        for name, r in ref.items():
            f = feats[name][pos]
            d = ((f - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).max().item()
            if not d <= worst:
                worst, where = d, f"{name} (batch {b})"
        f_tot += fs
        f_split += fp
        r_tot += rs
        r_split += rp
        f_med = secs(fs)
        f_proj = statistics.median(s.project for s in fp)
        # reference scaled to the whole batch: capture (batched, once) + scale * materialise-and-project
        r_full = [s.capture + scale * s.project for s in rp]
        r_proj = [scale * s.project for s in rp]
        clean = [x.clean for x in fs + rs + n_tot[-1:]]
        per_b.append({"batch": b, "size": sizes[b], "positions": pos, "features_s": f_med,
                      "features_project_s": f_proj, "reference_s": statistics.median(r_full),
                      "reference_project_s": statistics.median(r_proj), "naive_loop_s": n_tot[-1].seconds,
                      "naive_loop_clean": n_tot[-1].clean, "clean": f"{sum(clean)}/{len(clean)}"})
        log(f"  batch {b} ({sizes[b]} ex): features {f_med:.2f} s (projection {f_proj:.3f} s); factored reference "
            f"{statistics.median(r_full):.2f} s (materialise + project {statistics.median(r_proj):.2f} s"
            + (f", scaled from {len(pos)} ex" if len(pos) < sizes[b] else "") + f"); naive per-example loop "
            f"{n_tot[-1].seconds:.2f} s" + ("" if n_tot[-1].clean else f" (foreign load {n_tot[-1].foreign:.1f})"))
    f_s = sum(p["features_s"] for p in per_b)
    r_s = sum(p["reference_s"] for p in per_b)
    fp_s = sum(p["features_project_s"] for p in per_b)
    rp_s = sum(p["reference_project_s"] for p in per_b)
    n_ref = sum(len(p) for p in subsets)
    n_clean = sum(x.clean for x in f_tot + r_tot)

    # naive part 2: dense projection of the subset layers for all examples at once, scaled to all layers
    grads = {n: torch.cat([g[n] for g in naive_grads]) for n in keep}
    del naive_grads
    kron_all = {n: torch.cat([k[n] for k in kron]) for n in keep}
    log(f"case 4b: naive dense projection (r = {NAIVE_R}) of {len(keep)} layers x {n_ex} ex, "
        f"{args.geom_naive_rounds} timing(s); scaled x{proj_scale:.2f} by numel to {n_layers} layers")
    naive_project({keep[0]: grads[keep[0]][:, :4096]})  # warm-up (untimed)
    d_tot: list[Sample] = []
    d_split: list[DenseSplit] = []
    dense = None
    for _ in range(args.geom_naive_rounds):
        ds = DenseSplit()
        x, dense = timed(lambda: naive_project(grads, ds))
        d_tot.append(x)
        d_split.append(ds)
        log(f"  dense projection of {len(keep)} layers: {x.seconds:.2f} s (generate {ds.generate:.2f} s, "
            f"matmul {ds.matmul:.2f} s)" + ("" if x.clean else f" (foreign load {x.foreign:.1f})"))
    loop_s = sum(x.seconds for x in n_tot)
    dsub_s = secs(d_tot)
    dgen_s = statistics.median(d.generate for d in d_split)
    dmm_s = statistics.median(d.matmul for d in d_split)
    dall_s = dsub_s * proj_scale
    naive_s = loop_s + dall_s
    chk = estimator_check(grads, dense, kron_all)
    del grads, dense
    n_naive_clean = sum(x.clean for x in n_tot + d_tot)
    raw["naive"] = {"subset_layers": keep, "projection_scale_by_numel": proj_scale, "r": NAIVE_R,
                    "loop": [asdict(x) for x in n_tot], "loop_s": loop_s,
                    "dense_subset": [asdict(x) for x in d_tot], "dense_split": [asdict(d) for d in d_split],
                    "dense_subset_s": dsub_s, "dense_all_s": dall_s, "total_s": naive_s, "features_s": f_s,
                    "estimator_check": chk}
    raw["reference"] = {"subsets": subsets, "per_batch": per_b, "features": [asdict(x) for x in f_tot],
                        "features_split": [asdict(x) for x in f_split], "reference": [asdict(x) for x in r_tot],
                        "reference_split": [asdict(x) for x in r_split], "rounds": args.geom_ref_rounds}
    n_f_clean = sum(x.clean for x in f_tot)
    rows.append(Row("4b naive / features (end to end)", naive_s / f_s, ">= 10",
                    f"naive {naive_s:.1f} s = per-example loop {loop_s:.1f} s ({n_ex} ex, batch size 1, "
                    f"{n_layers} weight grads each) + dense projection {dall_s:.1f} s (r = {NAIVE_R}, seeded "
                    f"Gaussian P per layer generated + applied; measured {dsub_s:.2f} s on the {len(keep)} layers "
                    f"of 2 blocks, x{proj_scale:.0f} by numel); features {f_s:.2f} s; "
                    f"{n_naive_clean}/{len(n_tot) + len(d_tot)} naive and {n_f_clean}/{len(f_tot)} features "
                    "timings clean"))
    rows.append(Row("4b' naive part 1: per-example loop / features", loop_s / f_s, "info",
                    f"forward + backward per example (loop_grads, causal_lm_losses token mean), all {n_layers} "
                    f"linear weights requiring grad: {loop_s:.1f} s, {loop_s / n_ex:.2f} s/ex"))
    rows.append(Row("4b'' naive part 2: dense projection / features", dall_s / f_s, "info",
                    f"{dall_s:.1f} s for {n_layers} layers (scaled); on {len(keep)} layers: generate P "
                    f"{dgen_s:.2f} s + (n x numel) @ P^T {dmm_s:.2f} s"))
    offd = sorted(c["dense_offdiag_rms"] for c in chk.values())
    kro = sorted(c["kronecker_offdiag_rms"] for c in chk.values())
    exp_ = statistics.median(c["expected_offdiag"] for c in chk.values())
    rows.append(Row("4b''' dense projection check: inner-product error", statistics.median(offd), "info",
                    f"RMS over the {n_ex * (n_ex - 1) // 2} example pairs of (<phi_i, phi_j> - <M_i, M_j>) / "
                    f"(|M_i| |M_j|), median over the {len(keep)} layers (range {offd[0]:.3f}-{offd[-1]:.3f}); "
                    f"expected sqrt((1 + cos^2) / {NAIVE_R}) = {exp_:.3f} (1/sqrt({NAIVE_R}) = "
                    f"{NAIVE_R ** -0.5:.4f}); Kronecker features {statistics.median(kro):.3f} "
                    f"({kro[0]:.3f}-{kro[-1]:.3f})", unit=""))
    scaled = "" if n_ref == n_ex else f" (run on {n_ref}/{n_ex} ex, materialise+project scaled linearly)"
    rows.append(Row("4b2 factored materialise + Kronecker project / features", r_s / f_s, "info",
                    f"{r_s:.2f} s{scaled} = the same batched capture + per example x layer G_e^T A_e + "
                    f"P_out M_e P_in^T; features {f_s:.2f} s; {n_clean}/{len(f_tot) + len(r_tot)} timings clean"))
    rows.append(Row("4b2' same, projection stage only", rp_s / fp_s, "info",
                    f"materialise + project {rp_s:.2f} s vs Kronecker projection from the factors "
                    f"{fp_s:.3f} s (capture excluded on both sides; timed inside the same calls)"))
    raw["max_rel_diff"] = {"value": worst, "where": where}
    rows.append(Row("4b2'' max rel diff features vs factored materialise", worst, "info",
                    f"||phi_e - phi_ref_e|| / ||phi_ref_e||, {n_ref} ex x {n_layers} layers, float32; worst {where}",
                    unit="rel"))

    rows += geometry_memory(args, raw)
    return rows, raw


def geometry_memory_child(n: int, cycle: int, max_batch: int) -> None:
    """Subprocess: load, reset the peak, stream the feature loop over n examples into a list of CPU tensors."""
    import resource

    from gradsight.inputs.losses import loss_fn_for

    w = load_workload(n, cycle=cycle, max_batch=max_batch)
    proj = geometry_projector()
    loss_fn = loss_fn_for(w.model)
    gc.collect()
    ru_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # detected by the parent: hwm_before > rss_before
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    store: list[dict[str, torch.Tensor]] = []  # what a feature store holds (one shard per batch)
    t0 = time.perf_counter()
    per_batch = []
    for b in range(len(w.batches)):
        store.append(features_batch(w, b, proj, loss_fn))
        per_batch.append({"shape": list(w.batches[b]["input_ids"].shape), "rss_mb": _status_kb("VmRSS") // 1024,
                          "hwm_mb": _status_kb("VmHWM") // 1024})
    dt = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for shard in store for t in shard.values())
    print(json.dumps({"n": n, "batches": [list(x["input_ids"].shape) for x in w.batches],
                      "rss_before_kb": rss0, "hwm_before_kb": hwm0, "hwm_after_kb": _status_kb("VmHWM"),
                      "rss_after_kb": _status_kb("VmRSS"), "ru_maxrss_load_kb": ru_load,
                      "ru_maxrss_after_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "feature_bytes": nbytes, "seconds": dt, "per_batch": per_batch,
                      "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}))


def geometry_pipeline_child(n: int, cycle: int, max_batch: int) -> None:
    """Subprocess: load, reset the peak, run the real `run_geometry` pipeline over n examples (model passed in,
    so that the RSS after loading can be read first; token_budget as in the other cases, `max_batch`; no report).

    The geometry analysis' per-batch `compute` and its `summarize` are wrapped (in this process only) to record
    the batch shape, VmRSS and VmHWM after every batch and around the summary."""
    import resource
    import tempfile

    import gradsight.analyses.geometry.compute as geo
    import gradsight.analyses.geometry.summarize as geo_summary
    from gradsight.analyses.geometry import GeometryConfig, run_geometry
    from gradsight.inputs.models import load_model

    trace: list[dict] = []

    def mark(event: str, shape=None) -> None:
        trace.append({"event": event, **({"shape": shape} if shape else {}),
                      "rss_mb": _status_kb("VmRSS") // 1024, "hwm_mb": _status_kb("VmHWM") // 1024})

    compute, summarize = geo.compute, geo_summary.summarize

    def traced_compute(plan, units):
        out = compute(plan, units)
        if units[0].ready:
            encs = [u.payload[1] for u in units]
            mark("batch", [len(encs), max(e.n_tokens for e in encs)])
        return out

    def traced_summarize(*a, **k):
        mark("before summary")
        out = summarize(*a, **k)
        mark("after summary")
        return out

    geo.compute, geo_summary.summarize = traced_compute, traced_summarize

    model, tok = load_model(MODEL)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="gradsight-bench-") as d:
        data = Path(d) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in workload_records(n, cycle)), encoding="utf-8")
        cfg = GeometryConfig(model=MODEL, data=str(data), token_budget=TOKEN_BUDGET, max_batch=max_batch)
        gc.collect()
        ru_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
        t0 = time.perf_counter()
        res = run_geometry(cfg, Path(d) / "run", progress=False, report=False, model=model, tokenizer=tok,
                           log=lambda m: None)
        dt = time.perf_counter() - t0
        n_ok = int((res.examples["status"] == "ok").sum())
        fbytes = sum(f.stat().st_size for f in (Path(d) / "run" / "features").glob("*.safetensors"))
        print(json.dumps({"n": n, "mode": "pipeline", "n_ok": n_ok, "rss_before_kb": rss0, "hwm_before_kb": hwm0,
                          "hwm_after_kb": _status_kb("VmHWM"), "rss_after_kb": _status_kb("VmRSS"),
                          "ru_maxrss_load_kb": ru_load,
                          "ru_maxrss_after_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "feature_bytes": fbytes, "seconds": dt,
                          "batches": [t["shape"] for t in trace if t["event"] == "batch"], "trace": trace,
                          "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}))


def _memory_trio(ns: list[int], cycle: int, mode: str, max_batch: int,
                 env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Run the memory children (one per n) side by side, with extra environment variables `env` (e.g. glibc
    malloc tunables); ({n: result}, error message or "")."""
    procs = {n: subprocess.Popen([sys.executable, __file__, "--_geometry-memory-child", str(n),
                                  "--geom-memory-cycle", str(cycle), "--geom-memory-mode", mode,
                                  "--geom-memory-max-batch", str(max_batch)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})}) for n in ns}
    res, err_msg = {}, ""
    for n, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            err_msg = err_msg or f"n={n} subprocess failed: {(err.strip().splitlines() or ['?'])[-1]}"
            continue
        res[n] = json.loads(out.strip().splitlines()[-1])
    return res, err_msg


def _memory_rows(ns: list[int], res: dict, mode: str, label: str, goal: str, what: str,
                 fallback: str = "") -> list[Row]:
    inc = {n: (r["hwm_after_kb"] - r["rss_before_kb"]) / 1024 for n, r in res.items()}
    # ru_maxrss (lifetime peak, model loading included) - RSS after load, for the record
    ru = {n: (r["ru_maxrss_after_kb"] - r["rss_before_kb"]) / 1024 for n, r in res.items()}
    rows = [Row(f"4c{label} peak RSS increase n={max(ns)} / n={min(ns)}", inc[max(ns)] / inc[min(ns)], goal,
                f"{fallback}{what}; peak RSS increase (VmHWM reset after load - VmRSS after load): " + ", ".join(
                    f"n={n} +{inc[n]:.0f} MB" for n in ns) + "; separate processes")]
    for n in ns:
        r = res[n]
        base = r["rss_before_kb"] / 1024
        shape = (f"{len(r['batches'])} batches (largest {max(b[0] * b[1] for b in r['batches'])} padded tokens); "
                 if r.get("batches") else "")
        steps = [t for t in (r.get("trace") or r.get("per_batch") or []) if t.get("shape")]
        trace = ""
        if steps:
            trace = ("RSS after batch 1 / last: +" + f"{steps[0]['rss_mb'] - base:.0f} / +{steps[-1]['rss_mb'] - base:.0f}"
                     + f" MB, peak after batch 1 / last: +{steps[0]['hwm_mb'] - base:.0f} / "
                     f"+{steps[-1]['hwm_mb'] - base:.0f} MB; ")
        rows.append(Row(f"4c{label} peak RSS increase n={n}", inc[n], "info",
                        f"{mode}: {shape}{trace}RSS after the run +{r['rss_after_kb'] / 1024 - base:.0f} MB; "
                        f"features {r['feature_bytes'] / 1e6:.1f} MB; ru_maxrss - RSS after load +{ru[n]:.0f} MB; "
                        f"RSS after load {base:.0f} MB; {r['seconds']:.0f} s", unit=" MB"))
    return rows


def geometry_memory(args, raw: dict) -> list[Row]:
    ns = args.geom_memory_n
    cycle = min(ns)
    mb = args.geom_memory_max_batch
    name = f"4c peak RSS increase n={max(ns)} / n={min(ns)}"
    mode = args.geom_memory_mode
    if mode == "auto":
        try:
            from gradsight.analyses.geometry import run_geometry  # noqa: F401

            mode = "pipeline"
        except ImportError:
            mode = "loop"
    log(f"case 4c: memory subprocesses ({mode}) n = {ns} (the first {cycle} demo records, cycled; max_batch "
        f"{mb}) side by side")
    res, err = _memory_trio(ns, cycle, mode, mb)
    fallback = ""
    if err and mode == "pipeline" and args.geom_memory_mode == "auto":
        log(f"  pipeline failed ({err}); falling back to the feature loop")
        fallback = f"run_geometry failed ({err}); "
        mode = "loop"
        res, err = _memory_trio(ns, cycle, mode, mb)
    if err:
        return [Row(name, float("nan"), "info", f"skipped: {err}")]
    raw["memory"] = {"mode": mode, "max_batch": mb, **{str(n): r for n, r in res.items()}}
    if any(r["hwm_before_kb"] > r["rss_before_kb"] * 1.05 for r in res.values()):
        return [Row(name, float("nan"), "info", "skipped: could not reset VmHWM (/proc/self/clear_refs)")]
    # the goal is stated for 16..64 examples, where every run is cut into full batches of max_batch examples;
    # the quick run's few examples fit in one or two batches whose size grows with n, so there it is info only
    goal = "info" if args.quick else "<= 1.2"
    what = (f"run_geometry(GeometryConfig(token_budget={TOKEN_BUDGET}, max_batch={mb})), model passed in, "
            "features to safetensors shards" if mode == "pipeline"
            else f"capture + projection loop (max_batch {mb}), features kept as CPU tensors per batch")
    rows = _memory_rows(ns, res, mode, "", goal, what, fallback)
    if args.geom_memory_env:
        env = dict(kv.split("=", 1) for kv in args.geom_memory_env)
        tag = " ".join(args.geom_memory_env)
        log(f"case 4c: memory subprocesses again with {tag}")
        res2, err2 = _memory_trio(ns, cycle, mode, mb, env)
        if err2:
            rows.append(Row(f"4c-env peak RSS increase n={max(ns)} / n={min(ns)}", float("nan"), "info",
                            f"skipped: {err2}"))
        else:
            raw["memory_env"] = {"mode": mode, "max_batch": mb, "env": env, **{str(n): r for n, r in res2.items()}}
            rows += _memory_rows(ns, res2, mode, "-env", "info", f"as 4c, with {tag}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# realistic: cases R1-R4 on the mixed-length data set of benchmarks/realistic.py (direct answers, short
# step-by-step solutions, long chains of thought); written to results.json under "realistic"

R_MAX_LENGTH = 1024  # no realistic record is truncated (the longest is ~850 tokens with the chat template)
R_TOKEN_BUDGET = 4096  # the engine's batching defaults (Batching.token_budget / max_batch)
R_MAX_BATCH = 32
R_ATTN = ("q", "k", "v", "o")
R3_B, R3_T, R3_D, R3_VOCAB = 16, 128, 256, 4096  # case R3: 16 sequences x 128 tokens, d 256, 2 blocks


@dataclass
class RealWorkload:
    model: torch.nn.Module
    records: list  # Record
    encoded: list  # Encoded, one per record
    batch_idx: list[list[int]]  # per batch: indices into records / encoded (the engine's batches: cost model)
    batches: list[dict[str, torch.Tensor]]
    plain_batches: list[dict[str, torch.Tensor]]  # length buckets filled up to the token budget (a user's loop)
    layers_all: list  # LayerInfo, the 210 linear layers
    layers_attn: list  # q, k, v, o (120)
    named: dict  # name -> module

    @property
    def n(self) -> int:
        return sum(len(b) for b in self.batch_idx)

    def n_tokens(self, b: int, e: int) -> int:
        return self.encoded[self.batch_idx[b][e]].n_tokens

    def single(self, b: int, e: int) -> dict[str, torch.Tensor]:
        """Example e of batch b alone, without its padding."""
        n = self.n_tokens(b, e)
        return {k: v[e:e + 1, :n] for k, v in self.batches[b].items()}


def load_realistic(n_problems: int) -> RealWorkload:
    sys.path.insert(0, str(HERE))
    from realistic import realistic_records

    from gradsight.inputs.batching import model_cost
    from gradsight.inputs.data import EncodeOptions, collate, encode, load_records, make_batches
    from gradsight.inputs.models import load_model, select_layers

    t0 = time.perf_counter()
    model, tok = load_model(MODEL)
    model.eval()
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    recs, bad = load_records(realistic_records(n_problems))
    assert not bad
    enc = [encode(r, tok, EncodeOptions(max_length=R_MAX_LENGTH)) for r in recs]
    assert all(e.ok and not e.n_truncated for e in enc), [(e.idx, e.reason, e.n_truncated) for e in enc]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    idx = make_batches(enc, token_budget=R_TOKEN_BUDGET, max_batch=R_MAX_BATCH, cost=model_cost(model, "cpu"))
    batches = [collate([enc[i] for i in b], pad) for b in idx]
    plain = [collate([enc[i] for i in b], pad) for b in make_batches(enc, R_TOKEN_BUDGET, R_MAX_BATCH)]
    return RealWorkload(model, recs, enc, idx, batches, plain, select_layers(model),
                        select_layers(model, kinds=R_ATTN), dict(model.named_modules()))


def real_gradsight(w: RealWorkload, layers: list, b: int) -> dict:
    """batch_layer_stats on batch b (capture + six statistics of every example on every given layer)."""
    from gradsight.analyses.layers import LayersConfig
    from gradsight.analyses.layers.compute import batch_layer_stats
    from gradsight.inputs.losses import loss_fn_for

    _, stats, bad = batch_layer_stats(w.model, layers, w.batches[b], loss_fn_for(w.model), LayersConfig())
    assert not bad, bad
    return stats


def real_gradsight_warmup(w: RealWorkload) -> None:
    """One short gradsight step and one plain step on the shortest batch (allocator and kernels warm)."""
    from gradsight.inputs.losses import causal_lm_losses

    last = len(w.batches) - 1
    real_gradsight(w, w.layers_all, last)
    causal_lm_losses(w.model, w.batches[last]).sum().backward()
    w.model.zero_grad(set_to_none=True)


def real_reference(w: RealWorkload, modules: dict, b: int, e: int) -> dict[str, dict[str, float]]:
    """The paper's method for one example: its own backward with full weight gradients (loop_grads, unpadded),
    then float32 svdvals of every weight gradient (values only, as the public Layer_Gradient script) and
    spectral_stats."""
    from gradsight.capture.loop import loop_grads
    from gradsight.inputs.losses import causal_lm_losses
    from gradsight.measures.spectra import spectral_stats

    grads, _ = loop_grads(w.model, modules, w.single(b, e), causal_lm_losses)
    out = {}
    for name, g in grads.items():
        s = torch.linalg.svdvals(g.g[0].float())
        out[name] = {k: float(v[0]) for k, v in spectral_stats(s.unsqueeze(0)).items()}
    return out


def real_plain_batched(w: RealWorkload, cost_model: bool = False) -> Callable[[], None]:
    """A plain training step without the optimizer over length-bucketed batches filled up to the token budget
    (what a training loop does; cost_model=True: over gradsight's batches instead): every parameter trains,
    gradsight's loss (causal_lm_losses: the LM head only at target positions, the cheaper of the two losses
    of case 1), gradients accumulated over the batches, zeroed at the end."""
    from gradsight.inputs.losses import causal_lm_losses

    batches = w.batches if cost_model else w.plain_batches

    def run():
        for batch in batches:
            causal_lm_losses(w.model, batch).sum().backward()
        w.model.zero_grad(set_to_none=True)

    return run


def real_plain_single(w: RealWorkload) -> Callable[[], None]:
    """The same step one sequence at a time (each example unpadded, batch size 1)."""
    from gradsight.inputs.losses import causal_lm_losses

    singles = [w.single(b, e) for b in range(len(w.batches)) for e in range(len(w.batch_idx[b]))]

    def run():
        for one in singles:
            causal_lm_losses(w.model, one).sum().backward()
        w.model.zero_grad(set_to_none=True)

    return run


def real_data_rows(w: RealWorkload) -> tuple[list[Row], dict]:
    from realistic import GROUPS, length_summary

    tot = length_summary([e.n_tokens for e in w.encoded])
    tgt = length_summary([e.n_target for e in w.encoded])
    per_group = {}
    for g in GROUPS:
        es = [e for r, e in zip(w.records, w.encoded) if r.group == g]
        if es:
            per_group[g] = {"n": len(es), "tokens": [e.n_tokens for e in es], "targets": [e.n_target for e in es]}
    shapes = [tuple(b["input_ids"].shape) for b in w.batches]
    padded = sum(a * c for a, c in shapes)
    p_shapes = [tuple(b["input_ids"].shape) for b in w.plain_batches]
    p_padded = sum(a * c for a, c in p_shapes)
    raw = {"lengths": tot, "targets": tgt, "groups": per_group, "batch_shapes": shapes, "padded_tokens": padded,
           "batch_idx": w.batch_idx, "plain_batch_shapes": p_shapes, "plain_padded_tokens": p_padded}
    hist = ", ".join(f"{k}: {v}" for k, v in tot["histogram"].items())
    grp = "; ".join(f"{g} {min(d['tokens'])}-{max(d['tokens'])} (targets {min(d['targets'])}-{max(d['targets'])})"
                    for g, d in per_group.items())
    rows = [
        Row("R0 encoded length (prompt + response, chat template), median", tot["median"], "info",
            f"{tot['n']} records; min {tot['min']}, q1 {tot['q1']:.0f}, median {tot['median']:.0f}, q3 "
            f"{tot['q3']:.0f}, max {tot['max']}; histogram {hist}; per group {grp}", unit=" tok"),
        Row("R0 supervised targets per example, median", tgt["median"], "info",
            f"min {tgt['min']}, q1 {tgt['q1']:.0f}, q3 {tgt['q3']:.0f}, max {tgt['max']}; {tgt['total']} targets, "
            f"{tot['total']} tokens; gradsight's batches (cost model, token_budget={R_TOKEN_BUDGET}, max_batch="
            f"{R_MAX_BATCH}): {len(shapes)} batches {shapes}, {padded} padded tokens; plain batched (filled up to "
            f"the budget): {len(p_shapes)} batches {p_shapes}, {p_padded} padded tokens", unit=" tok"),
    ]
    return rows, raw


def case_real_r2(args, w: RealWorkload) -> tuple[list[Row], dict]:
    """gradsight (210 layers) vs the cheaper of plain batched and plain per-example fwd+bwd, interleaved."""
    set_requires_grad(w.model, True)
    fns = {"gradsight": lambda: [real_gradsight(w, w.layers_all, b) for b in range(len(w.batches))],
           "gradsight_attention": lambda: [real_gradsight(w, w.layers_attn, b) for b in range(len(w.batches))],
           "plain_batched": real_plain_batched(w), "plain_per_example": real_plain_single(w),
           "plain_cost_batches": real_plain_batched(w, cost_model=True)}
    log(f"case R2: {args.realistic_rounds} interleaved rounds of {', '.join(fns)} ({w.n} ex; no warm-up: each "
        "runs for minutes, after a warm-up of the model on one example)")
    real_gradsight_warmup(w)
    t = interleaved(fns, args.realistic_rounds, warmup=False)
    g, pb, pe = t["gradsight"], t["plain_batched"], t["plain_per_example"]

    def vs_limit(xs):
        """Median over (clean) rounds of x / min(plain batched, plain per-example), the rounds, and a note."""
        rs = [(a.seconds / min(b.seconds, c.seconds), a.clean and b.clean and c.clean) for a, b, c in zip(xs, pb, pe)]
        use = [r for r in rs if r[1]] or rs
        n_clean = sum(r[1] for r in rs)
        note = f"{n_clean}/{len(rs)} rounds clean" + ("" if n_clean else " (CONTENDED: all rounds used)")
        return statistics.median(r[0] for r in use), rs, note

    ratio, rounds, note = vs_limit(g)
    ga = t["gradsight_attention"]
    a_ratio, a_rounds, a_note = vs_limit(ga)
    cheaper = "batched" if secs(pb) <= secs(pe) else "per-example"
    r_pb, n_pb = paired_ratio(g, pb)
    r_pe, n_pe = paired_ratio(g, pe)
    r_bp, n_bp = paired_ratio(pb, pe)
    pc = t["plain_cost_batches"]
    c_ratio, c_rounds, c_note = vs_limit(pc)
    raw = {"times": {k: [asdict(x) for x in v] for k, v in t.items()}, "round_ratios": [r[0] for r in rounds],
           "attention_round_ratios": [r[0] for r in a_rounds], "cost_round_ratios": [r[0] for r in c_rounds]}
    rows = [
        Row("R2 gradsight / physical limit (min of plain batched, plain per-example)", ratio, "<= 1.15",
            f"{note}; gradsight {secs(g):.1f} s ({len(w.layers_all)} layers x 6 stats), plain batched "
            f"{secs(pb):.1f} s, plain per-example {secs(pe):.1f} s (cheaper: {cheaper}) for {w.n} ex; plain = "
            "every parameter trains, causal_lm_losses, per round the cheaper of the two"),
        Row("R2 attention: gradsight on q,k,v,o / physical limit", a_ratio, "<= 1.15",
            f"{a_note}; gradsight {secs(ga):.1f} s ({len(w.layers_attn)} layers x 6 stats: the setting of the "
            "issue's first measurement), the same plain steps"),
        Row("R2b plain fwd+bwd in the cost model's batches / min(plain batched, plain per-example)", c_ratio,
            "<= 1.0", f"{c_note}; the batch composition alone "
            f"(the same plain step): cost-model batches {secs(pc):.1f} s, {len(w.batches)} batches"),
        Row("R2' gradsight / plain batched fwd+bwd", r_pb, "info", f"{n_pb}; plain: length buckets filled up to "
            "the token budget; gradsight: its own batches (cost model)"),
        Row("R2'' gradsight / plain per-example fwd+bwd", r_pe, "info", f"{n_pe}; one unpadded sequence at a time"),
        Row("R2''' plain batched / plain per-example", r_bp, "info",
            f"{n_bp}; > 1 means padded batches are slower than one sequence at a time on this CPU"),
    ]
    return rows, raw


def case_real_r1(args, w: RealWorkload, label: str, layers: list, goal: str) -> tuple[list[Row], dict]:
    """gradsight vs the paper's method (per example: own backward + float32 svdvals per matrix) on `layers`.

    Per batch: gradsight(b), the reference on a subset of b's examples (each timed), gradsight(b). The
    reference total is, per batch, the mean over its timed examples times the batch size (batches are length
    buckets, so this scales within a length range)."""
    modules = {li.name: w.named[li.name] for li in layers}
    sizes = [len(b) for b in w.batch_idx]
    n = w.n
    last = len(sizes) - 1
    log(f"case R1 ({label}, {len(layers)} layers): warm-up (gradsight on the last batch, the reference on the "
        "shortest example), then the reference on the longest example for the estimate")
    real_gradsight(w, layers, last)
    real_reference(w, modules, last, sizes[last] - 1)
    s_long, _ = timed(lambda: real_reference(w, modules, 0, 0))
    est = s_long.seconds * n  # an upper bound: every example as long as the longest
    if args.realistic_ref_examples == "auto":
        k_total = n if est <= args.realistic_ref_budget else max(len(sizes),
                                                                 int(args.realistic_ref_budget / s_long.seconds))
    else:
        k_total = min(int(args.realistic_ref_examples), n)
    log(f"  longest example ({w.n_tokens(0, 0)} tokens) took {s_long.seconds:.1f} s -> at most {est:.0f} s for all "
        f"{n}; running the reference on {k_total}")
    per_batch = [min(s, max(1, round(k_total * s / n))) for s in sizes]
    subsets = [spread(s, k) for s, k in zip(sizes, per_batch)]
    gs_samples, gs_stats, ref_samples = [], [], []
    ref: dict[tuple[int, int], dict] = {}
    per_b = []
    for b, pos in enumerate(subsets):
        g1, stats = timed(lambda: real_gradsight(w, layers, b))
        rs = []
        for e in pos:
            r, vals = timed(lambda: real_reference(w, modules, b, e))
            rs.append(r)
            ref[(b, e)] = vals
        g2, _ = timed(lambda: real_gradsight(w, layers, b))
        gs_samples.append([g1, g2])
        gs_stats.append(stats)
        ref_samples.append(rs)
        use = [x for x in rs if x.clean] or rs
        per_b.append({"batch": b, "shape": list(w.batches[b]["input_ids"].shape), "positions": pos,
                      "n_tokens": [w.n_tokens(b, e) for e in pos], "gradsight_s": secs([g1, g2]),
                      "reference_per_ex_s": statistics.mean(x.seconds for x in use),
                      "reference": [asdict(x) for x in rs], "gradsight": [asdict(g1), asdict(g2)]})
        log(f"  batch {b} {tuple(w.batches[b]['input_ids'].shape)}: gradsight {g1.seconds:.2f} / {g2.seconds:.2f} s; "
            f"reference {per_b[-1]['reference_per_ex_s']:.2f} s/ex on {len(pos)}/{sizes[b]} ex")
    gs_total = sum(p["gradsight_s"] for p in per_b)
    ref_total = sum(p["reference_per_ex_s"] * s for p, s in zip(per_b, sizes))
    n_ref = sum(len(p) for p in subsets)
    n_clean = sum(x.clean for rs in ref_samples for x in rs) + sum(x.clean for ss in gs_samples for x in ss)
    n_all = n_ref + 2 * len(gs_samples)
    scaled = "all examples" if n_ref == n else (f"{n_ref}/{n} ex spread over the lengths (per batch: mean s/ex x "
                                                "batch size)")
    d, where = max_rel_diff(gs_stats, ref, "nuclear")
    raw = {"per_batch": per_b, "warmup_longest": asdict(s_long), "gradsight_s": gs_total, "reference_s": ref_total,
           "max_rel_diff_nuclear": {"value": d, "where": where}}
    tag = "attention q,k,v,o" if label == "attention" else "all linear"
    rows = [
        Row(f"R1 gradsight / paper method, {tag} ({len(layers)} layers)", gs_total / ref_total, goal,
            f"gradsight {gs_total:.1f} s (batches bracketing the reference) vs reference {ref_total:.1f} s "
            f"({ref_total / n:.2f} s/ex; per example loop_grads + {len(layers)} svdvals f32 + spectral_stats; "
            f"{scaled}) for {n} ex; {n_clean}/{n_all} timings clean" + ("" if n_clean else " (CONTENDED)")),
        Row(f"R1 max rel diff nuclear, {tag}", d, "info", f"{n_ref} ex x {len(layers)} layers; worst {where}",
            unit="rel"),
    ]
    return rows, raw


# --- R3: per-example gradient norms on a small transformer ---


def r3_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=R3_VOCAB, hidden_size=R3_D, intermediate_size=4 * R3_D, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * R3_T,
                      tie_word_embeddings=False, attention_dropout=0.0, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def r3_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(B,) next-token cross-entropy per sequence, token mean over all T - 1 targets."""
    logits = model(input_ids=ids).logits[:, :-1]
    tok = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none")
    return tok.view(ids.shape[0], -1).mean(1)


def r3_methods(base, names: list[str], ids: torch.Tensor) -> tuple[dict[str, Callable], dict[str, str]]:
    """{method: fn() -> (B,) float64 per-example squared gradient norm over the weights `names`}; each on its
    own copy of the model (the same weights), only those weights trainable. And {method: why it is missing}."""
    import copy
    import warnings

    def copy_of(train: bool = False):
        m = copy.deepcopy(base)
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith(".weight") and n.removesuffix(".weight") in names)
        return m.train(train)

    fns, missing = {}, {}
    mp = copy_of()

    def plain():
        r3_losses(mp, ids).sum().backward()
        mp.zero_grad(set_to_none=True)

    fns["plain"] = plain

    from gradsight.measures.spectra import sq_norms
    from gradsight.measures.step import backward_step

    mg = copy_of()
    mods = dict(mg.named_modules())
    layer_mods = {n: mods[n] for n in names}
    tokens = torch.ones(ids.shape, dtype=torch.bool)
    norms = sq_norms()

    def gradsight():
        step = backward_step(mg, layer_mods, ids, r3_losses, tokens=tokens)
        return sum(norms(step).values())

    fns["gradsight"] = gradsight

    from torch.func import functional_call, grad, vmap

    mf = copy_of()
    params = {n: p.detach() for n, p in mf.named_parameters() if n.removesuffix(".weight") in names}
    rest = {n: p.detach() for n, p in mf.named_parameters() if n not in params}
    rest.update(dict(mf.named_buffers()))

    def one_loss(pr, x):
        return r3_losses(lambda **kw: functional_call(mf, (pr, rest), (), kw), x.unsqueeze(0))[0]

    per_ex = vmap(grad(one_loss), in_dims=(None, 0))

    def torch_func():
        g = per_ex(params, ids)
        return sum(v.double().pow(2).flatten(1).sum(1) for v in g.values())

    fns["torch.func"] = torch_func

    try:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        # Opacus records activations only in training mode (this config has no dropout: same computation)
        gsm = GradSampleModule(copy_of(train=True), batch_first=True, loss_reduction="sum", strict=False)
        trainable = [p for p in gsm.parameters() if p.requires_grad]

        def opacus():
            r3_losses(gsm, ids).sum().backward()
            out = sum(p.grad_sample.double().pow(2).flatten(1).sum(1) for p in trainable)
            gsm.zero_grad(set_to_none=True)
            return out

        fns["opacus"] = opacus
        ghost = GradSampleModuleFastGradientClipping(copy_of(train=True), batch_first=True, loss_reduction="sum",
                                                     strict=False, use_ghost_clipping=True)

        def opacus_ghost():
            r3_losses(ghost, ids).sum().backward()
            out = ghost.get_norm_sample().double().pow(2)
            ghost.zero_grad(set_to_none=True)
            return out

        fns["opacus_ghost"] = opacus_ghost
    except ImportError as e:
        missing["opacus"] = f"not importable ({e})"

    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        mb = copy_of()
        bmods = dict(mb.named_modules())
        for n in names:
            extend(bmods[n])
        trainable_b = [p for p in mb.parameters() if p.requires_grad]

        def backpack_l2():
            with warnings.catch_warnings(), backpack(BatchL2Grad()):
                warnings.simplefilter("ignore")  # "extension hooks on a non-extended module" notes
                r3_losses(mb, ids).sum().backward()
            out = sum(p.batch_l2.double() for p in trainable_b)
            mb.zero_grad(set_to_none=True)
            return out

        fns["backpack"] = backpack_l2
    except ImportError as e:
        missing["backpack"] = f"not importable ({e})"
    return fns, missing


def case_real_r3(args) -> tuple[list[Row], dict]:
    from gradsight.inputs.models import select_layers

    base = r3_model()
    names = [li.name for li in select_layers(base)]
    ids = torch.randint(0, R3_VOCAB, (R3_B, R3_T), generator=torch.Generator().manual_seed(0))
    fns, missing = r3_methods(base, names, ids)
    # exactness first (untimed): every method against one backward per sequence
    ref = []
    import copy

    m0 = copy.deepcopy(base)
    for n_, p in m0.named_parameters():
        p.requires_grad_(n_.endswith(".weight") and n_.removesuffix(".weight") in names)
    for e in range(R3_B):
        m0.zero_grad(set_to_none=True)
        r3_losses(m0, ids[e:e + 1])[0].backward()
        ref.append(sum(float(p.grad.double().pow(2).sum()) for p in m0.parameters() if p.requires_grad))
    ref_t = torch.tensor(ref, dtype=torch.float64)
    err, failed = {}, {}
    for k, f in list(fns.items()):
        if k == "plain":
            continue
        try:
            out = f()
            err[k] = float(((out - ref_t).abs() / ref_t).max())
        except Exception as ex:  # a peer package that cannot handle this model: reported, not fatal
            failed[k] = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}"
            del fns[k]
    reps = args.r3_reps
    timed_fns = {k: (lambda f=f: [f() for _ in range(reps)]) for k, f in fns.items()}
    log(f"case R3: {len(names)} layers, {R3_B} x {R3_T} tokens; warm-up + {args.r3_rounds} interleaved rounds of "
        f"{', '.join(fns)} ({reps} calls per timing)")
    t = interleaved(timed_fns, args.r3_rounds)
    raw = {"model": {"arch": f"Llama, 2 blocks, d {R3_D}, ffn {4 * R3_D}, 4 heads, vocab {R3_VOCAB}, eager attention",
                     "layers": names, "batch": [R3_B, R3_T]}, "reps_per_timing": reps,
           "times": {k: [asdict(x) for x in v] for k, v in t.items()}, "max_rel_err_vs_loop": err,
           "failed": failed, "missing": missing}
    rows = []
    what = {"gradsight": "backward_step (capture) + sq_norms measure: ||G_e^T A_e||^2 from T x T Grams",
            "torch.func": "vmap(grad(functional_call)) per sequence, then squared sums",
            "opacus": "GradSampleModule (grad_sample per example materialised), loss_reduction sum",
            "opacus_ghost": "GradSampleModuleFastGradientClipping(use_ghost_clipping=True).get_norm_sample()",
            "backpack": "extend() on the 14 Linear modules, BatchL2Grad"}
    for k in ("gradsight", "torch.func", "opacus", "opacus_ghost", "backpack"):
        if k in t:
            r, note = paired_ratio(t[k], t["plain"])
            rows.append(Row(f"R3 per-example grad norms: {k} / plain fwd+bwd", r, "<= 1.2" if k == "gradsight" else "info",
                            f"{note}; {k} {secs(t[k]) / reps * 1e3:.0f} ms, plain {secs(t['plain']) / reps * 1e3:.0f} ms "
                            f"per call; {what[k]}; max rel err vs per-sequence backward {err.get(k, float('nan')):.1e}"))
        else:
            why = failed.get(k) or missing.get(k) or missing.get(k.split("_")[0], "not run")
            rows.append(Row(f"R3 per-example grad norms: {k} / plain fwd+bwd", float("nan"), "info",
                            f"not measured: {why}"))
    return rows, raw


# --- R4: landscape grid points per second ---


def case_real_r4(args) -> tuple[list[Row], dict]:
    """gradsight grid_2d(batch_points="auto") vs loss_landscapes.random_plane, 21 x 21, the digits MLP of
    benchmarks/curvature.py case 5 (float64, one torch thread as there), interleaved with the load monitor."""
    import numpy as np
    import torch.nn.functional as F

    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss
    except ImportError as e:
        return [Row("R4 landscape points/s gradsight / loss-landscapes", float("nan"), "info",
                    f"not measured: loss-landscapes not importable ({e}); `make bench` installs it")], {}
    from gradsight.demo.digits import train_digits_mlp
    from gradsight.landscape import BatchLoss, grid_2d, random_direction

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, (X, y), _, acc = train_digits_mlp(hidden=32, epochs=10, seed=0)
        steps, reps = 21, args.r4_reps
        axis = np.linspace(-1.0, 1.0, steps)
        loss = BatchLoss([(X, y)], F.cross_entropy)
        paths: list[str] = []

        def ours():
            for _ in range(reps):
                d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
                r = grid_2d(model, loss, d1, d2, axis, axis, batch_points="auto")
                paths.append(r.meta["path"])
            return r

        def theirs():
            for _ in range(reps):
                torch.manual_seed(0)
                z = loss_landscapes.random_plane(model, Loss(F.cross_entropy, X, y), distance=1, steps=steps,
                                                 normalization="filter", deepcopy_model=True)
            return z

        log(f"case R4: landscape {steps}x{steps}, warm-up + {args.r4_rounds} interleaved rounds ({reps} grids per "
            "timing, 1 torch thread)")
        t = interleaved({"gradsight": ours, "loss_landscapes": theirs}, args.r4_rounds)
        r, note = paired_ratio(t["loss_landscapes"], t["gradsight"])
        pts = steps * steps * reps
        z_ours, z_theirs = ours().to_array(), theirs()
        chosen = max(set(paths), key=paths.count)
        raw = {"grid": [steps, steps], "reps_per_timing": reps, "test_accuracy": acc, "auto_paths": paths,
               "times": {k: [asdict(x) for x in v] for k, v in t.items()},
               "center_loss": [float(z_ours[steps // 2, steps // 2]), float(z_theirs[steps // 2, steps // 2])]}
        return [Row("R4 landscape points/s gradsight / loss-landscapes", r, ">= 1.0",
                    f"{note}; gradsight (auto: {chosen}) {pts / secs(t['gradsight']):.0f} vs loss-landscapes "
                    f"{pts / secs(t['loss_landscapes']):.0f} points/s; digits MLP 64-32-32-10 float64, 1257 rows, "
                    f"{steps}x{steps} filter-normalised random plane, 1 torch thread")], raw
    finally:
        torch.set_num_threads(threads)


def src_state() -> dict:
    """`git status --short src` and `git diff --stat src` at the time of the run (other work in progress)."""
    out = {}
    for key, cmd in (("status", ["git", "status", "--short", "src"]), ("diff_stat", ["git", "diff", "--stat", "src"]),
                     ("head", ["git", "rev-parse", "--short", "HEAD"])):
        try:
            out[key] = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out[key] = f"unavailable: {e}"
    return out


def case_realistic(args) -> tuple[list[Row], dict]:
    raw: dict = {"src_state_start": src_state()}
    rows: list[Row] = []
    w = load_realistic(args.realistic_problems)
    r, raw["data"] = real_data_rows(w)
    rows += r
    for row in r:
        log(f"  {row.case}: {row.details}")
    r, raw["R2"] = case_real_r2(args, w)
    rows += r
    r, raw["R1_attention"] = case_real_r1(args, w, "attention", w.layers_attn, "<= 0.45")
    rows += r
    r, raw["R1_all"] = case_real_r1(args, w, "all", w.layers_all, "<= 0.1")
    rows += r
    del w
    gc.collect()
    r, raw["R3"] = case_real_r3(args)
    rows += r
    r, raw["R4"] = case_real_r4(args)
    rows += r
    raw["src_state_end"] = src_state()
    return rows, raw


# ----------------------------------------------------------------------------------------------------------


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": _cpu_name(), "cuda": torch.cuda.is_available()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SECTIONS = {"layers": "1", "synthetic": "2", "memory": "3", "geometry": "4", "realistic": "R"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer examples and repeats (smoke run, < 3 min)")
    p.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON results (written atomically)")
    p.add_argument("--n-examples", type=int, default=None, help="examples of case 1 (default 32, quick 4)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of case 1 (default 5, quick 2)")
    p.add_argument("--ref-examples", default=None,
                   help="examples for the reference ('auto': all if the estimate is under 10 min; quick 2)")
    p.add_argument("--synth-d", type=int, default=None, help="case 2 width (default 4096, quick 2048)")
    p.add_argument("--synth-T", type=int, nargs="+", default=[128, 512])
    p.add_argument("--synth-repeats", type=int, default=None, help="dense repeats per T (default 2, quick 1)")
    p.add_argument("--gram-inner", type=int, default=3, help="gram timings before and after each dense one")
    p.add_argument("--max-wait", type=float, default=None,
                   help="seconds to wait for other processes to leave the CPU before each timing (default 60, "
                        "quick 10)")
    p.add_argument("--cases", default="1,2,3,4,R",
                   help="comma-separated subset of cases to run (R: the realistic cases R1-R4)")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to run instead of --cases: " + ", ".join(
                       f"{k} (case {v})" for k, v in SECTIONS.items()))
    p.add_argument("--geom-ref-examples", default=None,
                   help="case 4 reference examples ('auto': all if the estimate is under 10 min; quick 2)")
    p.add_argument("--geom-ref-rounds", type=int, default=None,
                   help="case 4 reference runs per batch, each between two feature runs (default 2, quick 1)")
    p.add_argument("--geom-naive-rounds", type=int, default=None,
                   help="case 4 timings of the naive route's dense projection (default 2, quick 1)")
    p.add_argument("--geom-memory-n", type=int, nargs="+", default=None,
                   help="case 4 example counts of the memory subprocesses (default 16 32 64, quick 4 8 16)")
    p.add_argument("--realistic-problems", type=int, default=None,
                   help="realistic data set size in problems, 4 records each (default 10, quick 2)")
    p.add_argument("--realistic-rounds", type=int, default=None,
                   help="interleaved rounds of case R2 (default 3, quick 1)")
    p.add_argument("--realistic-ref-examples", default=None,
                   help="case R1 reference examples per layer set ('auto': all when the longest example x n is "
                        "under --realistic-ref-budget, else a subset spread over the batches; quick 2)")
    p.add_argument("--realistic-ref-budget", type=float, default=600.0,
                   help="case R1: seconds the reference may take per layer set in 'auto' mode (default 600)")
    p.add_argument("--r3-rounds", type=int, default=None, help="interleaved rounds of case R3 (default 7, quick 2)")
    p.add_argument("--r3-reps", type=int, default=None, help="case R3 calls per timing (default 3, quick 1)")
    p.add_argument("--r4-rounds", type=int, default=None, help="interleaved rounds of case R4 (default 7, quick 2)")
    p.add_argument("--r4-reps", type=int, default=None, help="case R4 grids per timing (default 3, quick 1)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_geometry-memory-child", dest="geometry_memory_child", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--geom-memory-cycle", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--geom-memory-max-batch", type=int, default=GEOM_MEM_MAX_BATCH,
                   help="case 4 memory: max examples per batch, the same for every n (default %(default)s: with "
                        "token_budget 2048 every n from 16 up is cut into full batches of this size)")
    p.add_argument("--geom-memory-env", nargs="*", default=None, metavar="NAME=VALUE",
                   help="case 4 memory: also run the children with these environment variables (e.g. glibc "
                        "MALLOC_MMAP_THRESHOLD_=65536) and report that as extra info rows")
    p.add_argument("--geom-memory-mode", choices=("auto", "pipeline", "loop"), default="auto",
                   help="case 4 memory: the real run_geometry pipeline (auto: when gradsight.geometry exists, "
                        "else the capture + projection loop)")
    a = p.parse_args(argv)
    q = a.quick
    a.n_examples = a.n_examples or (4 if q else N_EXAMPLES)
    a.rounds = a.rounds or (2 if q else 5)
    a.ref_examples = a.ref_examples or ("2" if q else "auto")
    a.synth_d = a.synth_d or (2048 if q else 4096)
    a.synth_repeats = a.synth_repeats if a.synth_repeats is not None else (1 if q else 2)
    a.max_wait = a.max_wait if a.max_wait is not None else (10.0 if q else 60.0)
    a.geom_ref_examples = a.geom_ref_examples or ("2" if q else "auto")
    a.geom_ref_rounds = a.geom_ref_rounds or (1 if q else 2)
    a.geom_naive_rounds = a.geom_naive_rounds or (1 if q else 2)
    a.geom_memory_n = sorted(a.geom_memory_n or ([4, 8, 16] if q else [16, 32, 64]))
    a.realistic_problems = a.realistic_problems or (2 if q else 10)
    a.realistic_rounds = a.realistic_rounds or (1 if q else 3)
    a.realistic_ref_examples = a.realistic_ref_examples or ("2" if q else "auto")
    a.r3_rounds = a.r3_rounds or (2 if q else 7)
    a.r3_reps = a.r3_reps or (1 if q else 3)
    a.r4_rounds = a.r4_rounds or (2 if q else 7)
    a.r4_reps = a.r4_reps or (1 if q else 3)
    if a.only is not None:
        names = [c.strip() for c in a.only.split(",") if c.strip()]
        unknown = [c for c in names if c not in SECTIONS]
        if unknown or not names:
            p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        a.cases = {SECTIONS[c] for c in names}
    else:
        a.cases = {c.strip() for c in a.cases.split(",") if c.strip()}
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.n_examples)
        return 0
    if args.geometry_memory_child:
        child = geometry_pipeline_child if args.geom_memory_mode == "pipeline" else geometry_memory_child
        child(args.geometry_memory_child, args.geom_memory_cycle, args.geom_memory_max_batch)
        return 0
    global MAX_WAIT
    MAX_WAIT = args.max_wait
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows: list[Row] = []
    raw: dict = {}
    if "1" in args.cases:
        w = load_workload(args.n_examples)
        r, raw["case1"] = case_model(args, w)
        rows += r
        del w
        gc.collect()
    if "2" in args.cases:
        r, raw["case2"] = case_synthetic(args)
        rows += r
    if "3" in args.cases:
        r, raw["case3"] = case_memory(args)
        rows += r
    geo_rows: list[Row] = []
    if "4" in args.cases:
        t4 = time.perf_counter()
        w = load_workload(args.n_examples)
        geo_rows, geo_raw = case_geometry(args, w)
        del w
        gc.collect()
        geo_elapsed = time.perf_counter() - t4
    real_rows: list[Row] = []
    if "R" in args.cases:
        tr = time.perf_counter()
        real_rows, real_raw = case_realistic(args)
        real_elapsed = time.perf_counter() - tr
    elapsed = time.perf_counter() - t0
    m = machine()
    title = (f"gradsight benchmarks ({'quick' if args.quick else 'full'}; {m['cpus']} CPUs, "
             f"{m['torch_threads']} torch threads, {'CUDA' if m['cuda'] else 'no GPU'}; {elapsed:.0f} s)")
    print_table(rows + geo_rows + real_rows, title)
    try:
        old = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else {}
    except (OSError, ValueError):
        old = {}
    if not args.cases & {"1", "2", "3"}:  # geometry / realistic only: keep the other sections as they are
        doc = {k: v for k, v in old.items() if k not in ("geometry", "realistic")}
    else:
        doc = {
            "started": started, "elapsed_s": round(elapsed, 1), "mode": "quick" if args.quick else "full",
            "machine": m, "settings": {"model": MODEL, "n_examples": args.n_examples, "max_length": MAX_LENGTH,
                                       "token_budget": TOKEN_BUDGET, "rounds": args.rounds,
                                       "ref_examples": args.ref_examples, "synth_d": args.synth_d,
                                       "synth_T": args.synth_T, "synth_repeats": args.synth_repeats,
                                       "max_wait_s": args.max_wait, "quiet_below_foreign_cores": QUIET},
            "results": [r.to_dict() for r in rows], "raw": raw}
    if "4" in args.cases:
        doc["geometry"] = {
            "started": started, "elapsed_s": round(geo_elapsed, 1), "mode": "quick" if args.quick else "full",
            "machine": m, "settings": {"model": MODEL, "n_examples": args.n_examples, "max_length": MAX_LENGTH,
                                       "token_budget": TOKEN_BUDGET, "rounds": args.rounds, "r_in": GEOM_R,
                                       "r_out": GEOM_R, "ref_examples": args.geom_ref_examples,
                                       "ref_rounds": args.geom_ref_rounds, "memory_n": args.geom_memory_n,
                                       "max_wait_s": args.max_wait, "quiet_below_foreign_cores": QUIET},
            "results": [r.to_dict() for r in geo_rows], "raw": geo_raw}
    elif "geometry" in old:  # not run this time: keep the last geometry results
        doc["geometry"] = old["geometry"]
    if "R" in args.cases:
        doc["realistic"] = {
            "started": started, "elapsed_s": round(real_elapsed, 1), "mode": "quick" if args.quick else "full",
            "machine": m, "settings": {"model": MODEL, "n_problems": args.realistic_problems,
                                       "n_records": 4 * args.realistic_problems, "max_length": R_MAX_LENGTH,
                                       "token_budget": R_TOKEN_BUDGET, "max_batch": R_MAX_BATCH,
                                       "rounds_R2": args.realistic_rounds,
                                       "ref_examples": args.realistic_ref_examples,
                                       "ref_budget_s": args.realistic_ref_budget, "rounds_R3": args.r3_rounds,
                                       "reps_R3": args.r3_reps, "rounds_R4": args.r4_rounds, "reps_R4": args.r4_reps,
                                       "max_wait_s": args.max_wait, "quiet_below_foreign_cores": QUIET},
            "results": [r.to_dict() for r in real_rows], "raw": real_raw}
    elif "realistic" in old:  # not run this time: keep the last realistic results
        doc["realistic"] = old["realistic"]
    write_json_atomic(args.out, doc)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
