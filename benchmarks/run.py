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

Usage: .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results.json]
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


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[Sample]]:
    """Time every fn once per round; the order rotates every round (A B C, B C A, C A B, ...).

    One untimed warm-up call of each fn precedes the first round.
    """
    names = list(fns)
    for n in names:
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


def load_workload(n_examples: int) -> Workload:
    from gradsight.data import EncodeOptions, collate, encode, load_records, make_batches
    from gradsight.demo.problems import demo_records
    from gradsight.models import load_model, select_layers

    t0 = time.perf_counter()
    model, tok = load_model(MODEL)
    model.eval()
    log(f"model loaded in {time.perf_counter() - t0:.1f} s")
    layers = select_layers(model)
    named = dict(model.named_modules())
    modules = {li.name: named[li.name] for li in layers}
    recs, bad = load_records(demo_records()[:n_examples])
    assert not bad and len(recs) == n_examples
    opts = EncodeOptions(max_length=MAX_LENGTH)
    enc = [encode(r, tok, opts) for r in recs]
    assert all(e.ok for e in enc), [e.reason for e in enc if not e.ok]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches, groups, n_tok = [], [], []
    for b in make_batches(enc, token_budget=TOKEN_BUDGET):
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
    from gradsight.losses import causal_lm_losses

    def run():
        for batch in w.batches:
            causal_lm_losses(w.model, batch).sum().backward()
            w.model.zero_grad(set_to_none=True)

    return run


def gradsight_batch(w: Workload, b: int) -> dict:
    """batch_layer_stats on batch b: capture + six statistics on every selected layer."""
    from gradsight.config import LayersConfig
    from gradsight.losses import loss_fn_for
    from gradsight.pipeline import batch_layer_stats

    _, stats, bad = batch_layer_stats(w.model, w.layers, w.batches[b], loss_fn_for(w.model), LayersConfig())
    assert not bad, bad
    return stats


def gradsight_all(w: Workload) -> Callable[[], list[dict]]:
    return lambda: [gradsight_batch(w, b) for b in range(len(w.batches))]


def gradsight_capture_only(w: Workload) -> Callable[[], None]:
    """For the breakdown: capture (forward + backward with hooks, factors collected) without statistics."""
    from gradsight.capture import capture
    from gradsight.losses import loss_fn_for

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
    from gradsight.losses import causal_lm_losses
    from gradsight.stats.spectra import spectral_stats

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
    from gradsight.capture.base import FactoredGrad
    from gradsight.stats.spectra import spectral_stats

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
    p.add_argument("--cases", default="1,2,3", help="comma-separated subset of cases to run")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.n_examples = a.n_examples or (4 if q else N_EXAMPLES)
    a.rounds = a.rounds or (2 if q else 5)
    a.ref_examples = a.ref_examples or ("2" if q else "auto")
    a.synth_d = a.synth_d or (2048 if q else 4096)
    a.synth_repeats = a.synth_repeats if a.synth_repeats is not None else (1 if q else 2)
    a.max_wait = a.max_wait if a.max_wait is not None else (10.0 if q else 60.0)
    a.cases = {c.strip() for c in a.cases.split(",") if c.strip()}
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.n_examples)
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
    elapsed = time.perf_counter() - t0
    m = machine()
    title = (f"gradsight benchmarks ({'quick' if args.quick else 'full'}; {m['cpus']} CPUs, "
             f"{m['torch_threads']} torch threads, {'CUDA' if m['cuda'] else 'no GPU'}; {elapsed:.0f} s)")
    print_table(rows, title)
    write_json_atomic(args.out, {
        "started": started, "elapsed_s": round(elapsed, 1), "mode": "quick" if args.quick else "full",
        "machine": m, "settings": {"model": MODEL, "n_examples": args.n_examples, "max_length": MAX_LENGTH,
                                   "token_budget": TOKEN_BUDGET, "rounds": args.rounds,
                                   "ref_examples": args.ref_examples, "synth_d": args.synth_d,
                                   "synth_T": args.synth_T, "synth_repeats": args.synth_repeats,
                                   "max_wait_s": args.max_wait, "quiet_below_foreign_cores": QUIET},
        "results": [r.to_dict() for r in rows], "raw": raw})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
