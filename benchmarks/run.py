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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

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


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call; garbage is collected first so it is not charged to fn."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Time every fn once per round; the order rotates every round (A B C, B C A, C A B, ...).

    A warm-up call of each fn precedes the first round (not timed).
    """
    names = list(fns)
    if warmup:
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed(fns[n])[0])
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


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
    raw["batches"] = shapes
    log(f"case 1: {n_ex} examples in batches {shapes} ({padded} padded tokens, {n_tgt} targets)")

    # --- plain vs gradsight (whole workload per call, interleaved rounds) ---
    set_requires_grad(w.model, True)  # plain runs train every parameter; capture() freezes and restores
    fns = {"plain_hf": plain_hf(w), "plain_own_loss": plain_own_loss(w), "gradsight": gradsight_all(w)}
    log(f"case 1a/b: {args.rounds} interleaved rounds of plain_hf / plain_own_loss / gradsight")
    t = interleaved(fns, args.rounds)
    raw["times_s"] = t
    r_hf = median_ratio(t["gradsight"], t["plain_hf"])
    r_own = median_ratio(t["gradsight"], t["plain_own_loss"])
    log(f"  medians: plain_hf {med(t['plain_hf']):.2f} s, plain_own_loss {med(t['plain_own_loss']):.2f} s, "
        f"gradsight {med(t['gradsight']):.2f} s")
    rows.append(Row("1a gradsight / plain fwd+bwd (HF loss)", r_hf, "<= 1.3",
                    f"median of {args.rounds} rounds; gradsight {med(t['gradsight']):.2f} s, plain "
                    f"{med(t['plain_hf']):.2f} s for {n_ex} ex; 210 layers x 6 stats"))
    rows.append(Row("1a' gradsight / plain fwd+bwd (gradsight loss)", r_own, "info",
                    f"plain with causal_lm_losses (head at targets only), all params trained: "
                    f"{med(t['plain_own_loss']):.2f} s"))

    # --- reference vs gradsight, per example, interleaved per batch: G(b), R(b subset), G(b) ---
    set_requires_grad(w.model, True)
    sizes = [len(b["input_ids"]) for b in w.batches]
    log("case 1c: reference warm-up (one example)")
    t_warm, _ = timed(lambda: reference_examples(w, 0, [0]))
    if args.ref_examples == "auto":
        est = t_warm * n_ex
        k_total = n_ex if est <= REF_BUDGET_S else max(2, int(REF_BUDGET_S / t_warm))
        log(f"  warm-up example took {t_warm:.1f} s -> estimated {est:.0f} s for all; using {k_total}")
    else:
        k_total = min(int(args.ref_examples), n_ex)
    # share the subset among batches in proportion to their size (at least one per batch)
    per_batch = [max(1, round(k_total * s / n_ex)) for s in sizes]
    subsets = [spread(s, k) for s, k in zip(sizes, per_batch)]
    gs_batch_times: list[float] = []
    gs_stats: list[dict] = []
    ref_times: list[float] = []
    ref: dict[tuple[int, int], dict] = {}
    for b, pos in enumerate(subsets):
        tg1, stats = timed(lambda: gradsight_batch(w, b))
        for e in pos:
            tr, vals = timed(lambda: reference_examples(w, b, [e]))
            ref_times.append(tr)
            ref[(b, e)] = vals[e]
        tg2, _ = timed(lambda: gradsight_batch(w, b))
        gs_batch_times.append(med([tg1, tg2]))
        gs_stats.append(stats)
        log(f"  batch {b}: gradsight {tg1:.2f}/{tg2:.2f} s for {sizes[b]} ex; reference "
            f"{sum(ref_times[-len(pos):]):.1f} s for {len(pos)} ex")
    n_ref = len(ref_times)
    gs_per_ex = sum(gs_batch_times) / n_ex
    ref_per_ex = sum(ref_times) / n_ref
    raw["reference"] = {"subsets": subsets, "ref_times_s": ref_times, "gradsight_batch_times_s": gs_batch_times,
                        "warmup_s": t_warm}
    rows.append(Row("1c reference / gradsight (per example)", ref_per_ex / gs_per_ex, ">= 5",
                    f"reference {ref_per_ex:.2f} s/ex on {n_ref}/{n_ex} ex (loop_grads + 210 svdvals f32); "
                    f"gradsight {gs_per_ex:.3f} s/ex (batched, bracketing runs)"))

    # --- accuracy against the reference ---
    # the reference is float32 throughout (model, gradient, svdvals); gradsight's eigenproblems are float64
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
    from gradsight.capture.base import FactoredGrad
    from gradsight.stats.spectra import spectral_stats

    rows, raw = [], {}
    d = args.synth_d
    gen = torch.Generator().manual_seed(0)
    # warm-up of the dense path on a small matrix (a 4096^2 warm-up would cost as much as a timed repeat)
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
        g_times, d_times, ratios = [], [], []
        st_g = st_d = s_d = None
        for r in range(args.synth_repeats):
            before = [timed(gram)[0] for _ in range(args.gram_inner)]
            td, (st_d, s_d) = timed(dense)
            after = []
            for _ in range(args.gram_inner):
                tg, st_g = timed(gram)
                after.append(tg)
            tg_med = med(before + after)
            g_times += before + after
            d_times.append(td)
            ratios.append(td / tg_med)
            log(f"case 2 T={T}: dense {td:.1f} s, gram median {tg_med:.3f} s")
        nuc_g, nuc_d = float(st_g["nuclear"][0]), float(st_d["nuclear"][0])
        rel = abs(nuc_g - nuc_d) / abs(nuc_d)
        # the dense float32 svdvals also returns d - T "zero" singular values at its noise floor, and they are
        # part of its nuclear norm; for information, the same comparison on its top T values only
        nuc_top = float(s_d.double()[:T].sum())
        rel_top = abs(nuc_g - nuc_top) / abs(nuc_top)
        raw[f"T{T}"] = {"dense_s": d_times, "gram_s": g_times, "ratios": ratios, "nuclear_gram": nuc_g,
                        "nuclear_dense": nuc_d, "nuclear_dense_top_T": nuc_top}
        rows.append(Row(f"2 synthetic d={d} T={T}: dense / gram", med(ratios), ">= 50",
                        f"dense (materialise f32 + svdvals) {med(d_times):.1f} s vs gram (f64) "
                        f"{med(g_times):.3f} s; {args.synth_repeats} dense repeat(s)"))
        rows.append(Row(f"2 synthetic d={d} T={T}: nuclear rel diff", rel, "info",
                        f"gram (f64) vs dense svdvals (f32, all {d} values); top {T} only: {rel_top:.1e}",
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
    """Run in a subprocess: load, warm nothing, reset the peak, run `mode` once over the batches."""
    w = load_workload(n_examples)
    fn = {"plain": plain_hf(w), "gradsight": gradsight_all(w)}[mode]
    set_requires_grad(w.model, True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss0 = _status_kb("VmRSS")
    hwm0 = _status_kb("VmHWM")
    fn()
    print(json.dumps({"mode": mode, "rss_before_kb": rss0, "hwm_before_kb": hwm0,
                      "hwm_after_kb": _status_kb("VmHWM")}))


def case_memory(args) -> tuple[list[Row], dict]:
    res = {}
    for mode in ("plain", "gradsight"):
        log(f"case 3: memory subprocess ({mode})")
        p = subprocess.run([sys.executable, __file__, "--_memory-child", mode, "--n-examples", str(args.n_examples)],
                           capture_output=True, text=True, env=os.environ.copy())
        if p.returncode != 0:
            return [Row("3 peak RSS increase gradsight / plain", float("nan"), "info",
                        f"skipped: subprocess failed: {p.stderr.strip().splitlines()[-1:]}")], {}
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    if any(r["hwm_before_kb"] > r["rss_before_kb"] * 1.05 for r in res.values()):
        return [Row("3 peak RSS increase gradsight / plain", float("nan"), "info",
                    "skipped: could not reset VmHWM (/proc/self/clear_refs)")], res
    inc = {m: (r["hwm_after_kb"] - r["rss_before_kb"]) / 1024 for m, r in res.items()}
    base = res["plain"]["rss_before_kb"] / 1024
    return [Row("3 peak RSS increase gradsight / plain", inc["gradsight"] / inc["plain"], "info",
                f"gradsight +{inc['gradsight']:.0f} MB, plain +{inc['plain']:.0f} MB over {base:.0f} MB "
                "after load (VmHWM, one pass each, separate processes)")], res


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
    p.add_argument("--n-examples", type=int, default=None, help="examples of case 1 (default 32, quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of case 1 (default 5, quick 2)")
    p.add_argument("--ref-examples", default=None,
                   help="examples for the reference ('auto': all if the estimate is under 10 min; quick 2)")
    p.add_argument("--synth-d", type=int, default=None, help="case 2 width (default 4096, quick 2048)")
    p.add_argument("--synth-T", type=int, nargs="+", default=[128, 512])
    p.add_argument("--synth-repeats", type=int, default=None, help="dense repeats per T (default 2, quick 1)")
    p.add_argument("--gram-inner", type=int, default=3, help="gram timings before and after each dense one")
    p.add_argument("--cases", default="1,2,3", help="comma-separated subset of cases to run")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.n_examples = a.n_examples or (8 if q else N_EXAMPLES)
    a.rounds = a.rounds or (2 if q else 5)
    a.ref_examples = a.ref_examples or ("2" if q else "auto")
    a.synth_d = a.synth_d or (2048 if q else 4096)
    a.synth_repeats = a.synth_repeats if a.synth_repeats is not None else (1 if q else 2)
    a.cases = {c.strip() for c in a.cases.split(",") if c.strip()}
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.n_examples)
        return 0
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
                                   "synth_T": args.synth_T, "synth_repeats": args.synth_repeats},
        "results": [r.to_dict() for r in rows], "raw": raw})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
