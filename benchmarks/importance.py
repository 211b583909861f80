"""LM pruning on SmolLM2-135M-Instruct: perplexity of magnitude / Wanda / GBLM / SparseGPT, and GBLM's cost.

Model: SmolLM2-135M-Instruct, float32, eager attention, 30 blocks x 7 Linear = 210 pruned layers (embeddings and
the tied lm_head are not pruned). Calibration: 32 windows x 256 tokens at seeded random offsets (seed 0) of the
shipped calibration text; evaluation: perplexity over the first 32 non-overlapping 256-token windows (8,192
tokens, 8,160 predictions) of the shipped held-out text (gradsight.importance.text; the two share no text).

Grid: dense; magnitude (per tensor), Wanda (per row), GBLM (per row, alpha = 100, g_sq from the dense model),
SparseGPT (OBS update); each at 50% unstructured and 2:4 (and 4:8 with --part 4). Calibrated methods run
layer by layer (`prune_sequential`); recon_err is measured on the first 8 calibration sequences.

Cost: GBLM = its gradient pass (`stats.calibration_stats(want=("g_sq",))`: per-example squared gradients of the
token-mean CE, batches of 4 sequences, on the dense model) + the same sequential pass as Wanda. The physical
reference is Wanda's sequential pass + one plain forward+backward over the calibration set (same loss, same
batches, weight gradients of the 210 pruned layers only, no hooks). Goal: gblm_total / (wanda + plain) <= 1.02.
Both are warmed up on one batch first (untimed). Timings wait (up to --max-wait s) for a quiet machine and
record the foreign load (benchmarks/run.py `timed`).

The whole grid takes ~30 min on 2 cores here (8k-token evaluations ~1 min each, a sequential calibrated pass
2-4 min), so it is split into parts of <= 15 min whose results merge into the same files (g_sq is cached in the
temp directory by part 1 for parts 3 and 4):

    .venv/bin/python benchmarks/importance.py --part 1   # plain backward, GBLM gradient pass, Wanda/GBLM 50%
    .venv/bin/python benchmarks/importance.py --part 2   # dense, magnitude and SparseGPT at 50% and 2:4
    .venv/bin/python benchmarks/importance.py --part 3   # Wanda/GBLM 2:4
    .venv/bin/python benchmarks/importance.py --part 4   # optional: every method at 4:8
    (--part all = 1-3 in one process; --quick: a smoke run writing /tmp/results_importance_quick.json)
        -> benchmarks/results_importance.json, benchmarks/IMPORTANCE.md
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (log, timed, write_json_atomic)
from run import log, timed, write_json_atomic  # noqa: E402

MODEL = "smollm2-135m-instruct"
METHODS = ("magnitude", "wanda", "gblm", "sparsegpt")
GOAL_RATIO = 1.02


def calib_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    """LM batches of whole windows: every token real, every position after the first a target."""
    out = []
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size]  # (B, T)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "target_mask": torch.ones_like(ids, dtype=torch.bool)})
    return out


def plain_backward(model, batches, modules) -> None:
    """The physical reference: forward + backward of the summed per-sequence token-mean CE, no hooks, weight
    gradients of the pruned layers only (every other parameter frozen)."""
    from gradsight.inputs.losses import causal_lm_losses

    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    try:
        for b in batches:
            causal_lm_losses(model, b).sum().backward()
            for m in modules.values():
                m.weight.grad = None
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def gradient_pass(model, batches, modules) -> dict[str, torch.Tensor]:
    """GBLM's gradient statistic on the dense model: g_sq = sum_seq (dL_seq/dW)^2 per layer (float32, like the
    reference's accumulator)."""
    from gradsight.importance.stats import calibration_stats
    from gradsight.inputs.losses import loss_fn_for

    st = calibration_stats(model, batches, modules, loss_fn_for(model, "mean"), want=("g_sq",),
                           dtype=torch.float32)
    return {n: s.g_sq for n, s in st.items()}


def magnitude_ties(pristine, pruned, names) -> float:
    """Fraction of kept weights whose |W| equals their tensor's largest pruned |W| (kept only by index order)."""
    from gradsight.importance.masks import tie_fraction

    a, b = dict(pristine.named_modules()), dict(pruned.named_modules())
    ties = kept = 0
    for n in names:
        mask = b[n].weight.detach() != 0
        k = int(mask.sum())
        ties += tie_fraction(a[n].weight.detach().abs(), mask, "layer") * k
        kept += k
    return ties / kept


def run_method(pristine, method, structure, cal, ev, g_sq, args, names) -> dict:
    from gradsight.importance.evaluate import PrunedModelError, perplexity, sparsity_of
    from gradsight.importance.sequential import prune_sequential

    model = copy.deepcopy(pristine)
    every = max(1, len(model.model.layers) // 3)
    prog = (lambda msg: log("  " + msg) if int(msg.split("block ")[1].split("/")[0]) % every == 0 else None)
    sample, df = timed(lambda: prune_sequential(model, cal, method, structure, 0.5, g_sq=g_sq,
                                                batch_size=args.batch, recon_samples=args.recon, progress=prog))
    t0 = time.perf_counter()
    try:
        ev_res = perplexity(model, ev, batch_size=args.batch)
    except PrunedModelError as e:
        ev_res = {"ppl": float("nan"), "nll": float("nan"), "n_tokens": 0, "error": str(e)}
    out = {"method": method, "structure": structure, "ppl": ev_res["ppl"], "nll": ev_res["nll"],
           "prune_seconds": sample.seconds, "prune_foreign_load": sample.foreign,
           "eval_seconds": time.perf_counter() - t0, "sparsity": sparsity_of(model, names)["overall"],
           "recon_err_mean": float(df.recon_err.mean()) if df.recon_err.notna().any() else None,
           "recon_err_median": float(df.recon_err.median()) if df.recon_err.notna().any() else None}
    if method == "magnitude" and structure == "unstructured":
        out["tie_fraction"] = magnitude_ties(pristine, model, names)
    log(f"{method:9s} {structure:12s} ppl {out['ppl']:9.2f}  prune {out['prune_seconds']:6.1f} s"
        f"  sparsity {out['sparsity']:.4f}  recon_err {out['recon_err_mean'] or float('nan'):.4f}")
    del model
    gc.collect()
    return out


def orderings(res: dict) -> dict:
    """Per structure with every method measured: dense < gblm <= wanda <= magnitude (SparseGPT vs Wanda: info)."""
    out = {}
    dense = res.get("dense", {}).get("ppl")
    for s in res["config"]["structures"]:
        p = {r["method"]: r["ppl"] for r in res["runs"] if r["structure"] == s}
        if dense is None or any(m not in p for m in METHODS):
            continue
        checks = {"dense < gblm": dense < p["gblm"], "gblm <= wanda": p["gblm"] <= p["wanda"],
                  "wanda <= magnitude": p["wanda"] <= p["magnitude"],
                  "sparsegpt <= wanda (info)": p["sparsegpt"] <= p["wanda"]}
        out[s] = {"checks": checks, "held": all(v for k, v in checks.items() if "(info)" not in k)}
    return out


def derive(res: dict) -> None:
    """The cost ratio (needs part 1) and the orderings, from whatever the merged results hold."""
    by = {(r["method"], r["structure"]): r for r in res["runs"]}
    t = res.get("timing", {})
    w, g = by.get(("wanda", "unstructured")), by.get(("gblm", "unstructured"))
    if "plain_backward" in t and "gblm_gradient_pass" in t and w and g:
        t["wanda_sequential"] = {"seconds": w["prune_seconds"], "foreign": w["prune_foreign_load"]}
        t["gblm_sequential"] = {"seconds": g["prune_seconds"], "foreign": g["prune_foreign_load"]}
        t["gblm_total"] = t["gblm_gradient_pass"]["seconds"] + g["prune_seconds"]
        t["ratio"] = t["gblm_total"] / (w["prune_seconds"] + t["plain_backward"]["seconds"])
        t["grad_over_plain"] = t["gblm_gradient_pass"]["seconds"] / t["plain_backward"]["seconds"]
    res["orderings"] = orderings(res)
    mag = by.get(("magnitude", "unstructured"))
    if mag and "tie_fraction" in mag:
        res["tie_fraction"] = mag["tie_fraction"]


def write_markdown(path: Path, res: dict) -> None:
    c, t = res["config"], res.get("timing", {})
    parts = ", ".join(f"part {k}: {v['wall_seconds'] / 60:.1f} min" for k, v in sorted(res["parts"].items()))
    dense = res.get("dense", {}).get("ppl", float("nan"))
    lines = ["## LM pruning, SmolLM2-135M-Instruct (`benchmarks/importance.py`)", "",
             f"Run: `.venv/bin/python benchmarks/importance.py --part N` ({parts}; {c['threads']} threads). "
             f"Calibration {c['n_cal']} x {c['seqlen']} tokens (seed 0) of the shipped calibration text; perplexity "
             f"on {c['eval_tokens']} held-out tokens ({c['n_eval']} non-overlapping windows of {c['seqlen']}); "
             "210 Linear layers pruned (not the embeddings / tied lm_head); float32, eager attention. GBLM alpha "
             "= 100, g_sq from the dense model. recon_err: mean over layers of ||WX - W'X||^2 / ||WX||^2 on "
             f"{c['recon_samples']} calibration sequences.", "",
             f"Dense perplexity: **{dense:.3f}**", "",
             "| method | structure | perplexity | x dense | prune time (s) | mean recon_err |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    order = {m: i for i, m in enumerate(METHODS)}
    runs = sorted(res["runs"], key=lambda r: (c["structures"].index(r["structure"]), order[r["method"]]))
    for r in runs:
        re_ = "n/a" if r["recon_err_mean"] is None else f"{r['recon_err_mean']:.4f}"
        busy = " *" if r["prune_foreign_load"] >= run.QUIET else ""  # timed while other processes ran
        lines.append(f"| {r['method']} | {r['structure']} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} "
                     f"| {r['prune_seconds']:.1f}{busy} | {re_} |")
    if any(r["prune_foreign_load"] >= run.QUIET for r in runs):
        lines += ["", f"\\* timed while other processes kept >= {run.QUIET} cores busy (a slower wall clock; "
                  "the perplexity is unaffected)."]
    lines += ["", "Orderings (expected dense < GBLM <= Wanda <= magnitude):", ""]
    for s, o in res["orderings"].items():
        lines.append(f"- {s}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in o["checks"].items())
                     + f" -> {'held' if o['held'] else 'NOT held'}")
    if "ratio" in t:
        lines += ["", "Cost (seconds; foreign load = cores busy with other processes during the timing):", "",
                  "| step | seconds | foreign load |", "| --- | ---: | ---: |"]
        for k in ("wanda_sequential", "plain_backward", "gblm_gradient_pass", "gblm_sequential"):
            lines.append(f"| {k} | {t[k]['seconds']:.1f} | {t[k]['foreign']:.2f} |")
        lines += ["", f"GBLM total / (Wanda + plain forward-backward) = **{t['ratio']:.3f}** (goal <= {GOAL_RATIO}: "
                  f"{'PASS' if t['ratio'] <= GOAL_RATIO else 'MISSED'}); gradient pass / plain = "
                  f"{t['grad_over_plain']:.3f}."]
    if "tie_fraction" in res:
        lines.append(f"Magnitude 50% unstructured: {res['tie_fraction']:.4f} of the kept weights tie with their "
                     "tensor's largest pruned |W| (kept only by index order).")
    lines += ["", "Notes:", "",
              "- Calibrated methods prune block by block: each block is scored on the outputs of the already "
              "pruned blocks before it, then re-run pruned to feed the next (Wanda / SparseGPT / GBLM reference "
              "order); magnitude needs no data. prune time = the whole `prune_sequential` call (both block "
              "passes, scoring, recon_err); SparseGPT adds its Hessians and OBS updates.",
              "- The ratio compares GBLM's extra work (a gradient pass with per-example squared gradients) with "
              "one plain forward+backward over the same batches (weight gradients of the 210 layers only). "
              "Wall-clock timings on a shared 2-core machine vary by 10-30% between runs; the foreign load "
              "column says how busy the other processes kept the CPU.",
              "- Nothing is published for SmolLM2; the reference orderings come from LLaMA-7B (magnitude >> "
              "Wanda ~ SparseGPT >= GBLM > dense). All numbers come from one calibration draw (seed 0); "
              "how much another draw moves differences of ~1-2% (GBLM vs Wanda) was not measured."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# What each part runs; every part stays under 15 min on 2 quiet cores (the whole grid takes ~30 min there).
PARTS = {
    "1": {"cost": True, "runs": [("wanda", "unstructured"), ("gblm", "unstructured")]},
    "2": {"dense": True, "runs": [("magnitude", "unstructured"), ("magnitude", "2:4"),
                                  ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]},
    "3": {"runs": [("wanda", "2:4"), ("gblm", "2:4")]},
    "4": {"runs": [(m, "4:8") for m in METHODS]},
}


def g_sq_cache(cfg: dict) -> Path:
    import hashlib
    import tempfile

    key = hashlib.sha1(json.dumps({k: cfg[k] for k in ("model", "seqlen", "n_cal", "batch_size")},
                                  sort_keys=True).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gradsight-bench-importance-gsq-{key}.safetensors"


def load_g_sq(pristine, batches, modules, cfg, timed_run: bool):
    """g_sq from the cache written by an earlier part, else one gradient pass (timed when part 1 asks)."""
    from safetensors.torch import load_file, save_file

    path = g_sq_cache(cfg)
    if path.exists() and not timed_run:
        log(f"g_sq from the cache {path}")
        return load_file(path), None
    sample, g_sq = timed(lambda: gradient_pass(pristine, batches, modules))
    log(f"GBLM gradient pass: {sample.seconds:.1f} s")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in g_sq.items()}, str(tmp))
    os.replace(tmp, path)
    return g_sq, sample


def load_results(path: Path, cfg: dict) -> dict:
    """Earlier parts' results with the same configuration, else an empty record."""
    same = ("model", "seqlen", "n_cal", "n_eval", "batch_size", "recon_samples", "threads", "quick")
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if all(old.get("config", {}).get(k) == cfg[k] for k in same):
            old["config"]["structures"] = sorted(set(old["config"]["structures"]) | set(cfg["structures"]),
                                                 key=["unstructured", "2:4", "4:8"].index)
            return old
        log(f"{path} holds another configuration: starting a new results file")
    return {"config": dict(cfg), "runs": [], "parts": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["all", *PARTS],
                    help="1: cost (plain backward, GBLM gradient pass) + Wanda/GBLM 50%%; 2: dense, magnitude and "
                         "SparseGPT 50%% and 2:4; 3: Wanda/GBLM 2:4; 4: every method at 4:8; all: 1-3 (~30 min)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 calibration / 4 evaluation windows")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--recon", type=int, default=8, help="calibration sequences for recon_err")
    ap.add_argument("--max-wait", type=float, default=10.0, help="seconds to wait for a quiet machine per timing")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results_importance.json")
    ap.add_argument("--md", type=Path, default=None, help="default benchmarks/IMPORTANCE.md")
    args = ap.parse_args()
    quick_dir = Path("/tmp") if args.quick else HERE  # a smoke run never overwrites the real results
    args.out = args.out or quick_dir / ("results_importance_quick.json" if args.quick else "results_importance.json")
    args.md = args.md or quick_dir / ("IMPORTANCE_quick.md" if args.quick else "IMPORTANCE.md")
    torch.set_num_threads(args.threads)
    run.MAX_WAIT = args.max_wait
    parts = ["1", "2", "3"] if args.part == "all" else [args.part]
    t_start = time.perf_counter()
    from gradsight.importance.evaluate import perplexity
    from gradsight.importance.sequential import block_linears
    from gradsight.importance.text import sample_text, token_windows
    from gradsight.inputs.models import load_model

    pristine, tok = load_model(MODEL, dtype="float32", attn_implementation="eager")
    pristine.eval()
    names = [n for b in block_linears(pristine) for n in b]
    modules = {n: dict(pristine.named_modules())[n] for n in names}
    seqlen, n_cal, n_ev = 256, (8 if args.quick else 32), (4 if args.quick else 32)
    cal = token_windows(tok, sample_text("calibration"), seqlen, n=n_cal, seed=0)  # (32, 256)
    ev = token_windows(tok, sample_text("heldout"), seqlen, n=n_ev)  # (32, 256): 8192 tokens
    todo = [r for p in parts for r in PARTS[p]["runs"]]
    cfg = {"model": MODEL, "threads": args.threads, "seqlen": seqlen, "n_cal": n_cal, "n_eval": n_ev,
           "eval_tokens": int(ev.numel()), "batch_size": args.batch, "alpha": 100.0, "recon_samples": args.recon,
           "layers": len(names), "quick": args.quick,
           "structures": sorted({s for _, s in todo}, key=["unstructured", "2:4", "4:8"].index)}
    res = load_results(args.out, cfg)
    log(f"part(s) {', '.join(parts)}: {len(names)} layers; calibration {tuple(cal.shape)}, evaluation "
        f"{tuple(ev.shape)}")
    batches = calib_batches(cal, args.batch)
    if any(PARTS[p].get("dense") for p in parts):
        res["dense"] = perplexity(pristine, ev, batch_size=args.batch)
        log(f"dense ppl {res['dense']['ppl']:.3f}")
    g_sq = None
    if any(PARTS[p].get("cost") for p in parts):
        plain_backward(pristine, batches[:1], modules)  # untimed warm-ups on one batch: first-call allocations
        gradient_pass(pristine, batches[:1], modules)  # cost +30% (plain) / +60% (gradient pass) otherwise
        s_plain, _ = timed(lambda: plain_backward(pristine, batches, modules))
        log(f"plain forward+backward over the calibration set: {s_plain.seconds:.1f} s")
        g_sq, s_grad = load_g_sq(pristine, batches, modules, cfg, timed_run=True)
        res["timing"] = {"plain_backward": {"seconds": s_plain.seconds, "foreign": s_plain.foreign},
                         "gblm_gradient_pass": {"seconds": s_grad.seconds, "foreign": s_grad.foreign}}
    for method, structure in todo:
        if method == "gblm" and g_sq is None:
            g_sq, _ = load_g_sq(pristine, batches, modules, cfg, timed_run=False)
        r = run_method(pristine, method, structure, cal, ev, g_sq, args, names)
        res["runs"] = [x for x in res["runs"] if (x["method"], x["structure"]) != (method, structure)] + [r]
    for p in parts:
        res["parts"][p] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "wall_seconds": time.perf_counter() - t_start, "platform": platform.platform(),
                           "torch": torch.__version__}
    derive(res)
    write_json_atomic(args.out, res)
    write_markdown(args.md, res)
    report(res, args, time.perf_counter() - t_start)


def report(res: dict, args, wall: float) -> None:
    dense = res.get("dense", {}).get("ppl", float("nan"))
    print(f"\ndense ppl {dense:.3f}")
    for r in res["runs"]:
        print(f"{r['method']:9s} {r['structure']:12s} ppl {r['ppl']:9.2f}  ({r['ppl'] / dense:.2f}x dense)")
    t = res.get("timing", {})
    if "ratio" in t:
        print(f"timing: wanda {t['wanda_sequential']['seconds']:.1f} s, plain fwd+bwd "
              f"{t['plain_backward']['seconds']:.1f} s, gblm gradient pass {t['gblm_gradient_pass']['seconds']:.1f} s, "
              f"gblm sequential {t['gblm_sequential']['seconds']:.1f} s -> ratio {t['ratio']:.3f} "
              f"(goal <= {GOAL_RATIO}: {'PASS' if t['ratio'] <= GOAL_RATIO else 'MISSED'})")
    for s, o in res["orderings"].items():
        print(f"ordering dense < gblm <= wanda <= magnitude at {s}: {'held' if o['held'] else 'NOT held'} "
              f"{o['checks']}")
    print(f"wrote {args.out} and {args.md} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
