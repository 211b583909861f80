"""gradsight.transforms side by side with pytorch-optimizer 4.1.0 (anchors monitor-transforms §4, B7 and B9).

    .venv/bin/python benchmarks/transforms.py            # ~14 min on 2 busy cores (most of it the spike runs)
    .venv/bin/python benchmarks/transforms.py --quick    # ~1 min smoke run (3 seeds x 300 steps, fewer rounds)

Cases:
  a. wrap(AdamW, spam()) vs pytorch_optimizer.SPAM: max |Δθ| over a 60-step trajectory with 3 momentum resets,
     warm-ups and spikes (float64 with eps -> 0: the algorithm; float32 eps 1e-12; float32 eps 1e-6: the eps
     convention, SPAM adds eps to sqrt(v), torch to sqrt(v / (1 - beta2^t))); optimizer-step time.
  b. wrap(AdamW, stable_spam()) vs StableSPAM: the same.
  c. wrap(AdamW, orthograd()) vs OrthoGrad(AdamW): the same; and the modular-addition run of §2.11 (p = 113,
     train fraction 0.4, full batch, one-hot MLP 226-200-200-113, AdamW lr 0.01 without weight decay, 300
     epochs): first epoch with test accuracy >= 90% with and without ⊥Grad.
  d. Spike experiment (§2.7): 2-layer MLP regression (1024 x 16 + 1024 held out, tanh, 32 hidden), full
     batch, lr 1e-3, gradients x1000 on 1% of the steps (20 of 2000, fixed per seed, all after step 25),
     10 seeds: AdamW, AdamW + clip_grad_norm_(1.0), SPAM (peer), gradsight spam, StableSPAM (peer), gradsight
     stable_spam, and a spike-free AdamW reference. Divergence = a non-finite loss or a final loss above the
     initial one. Reported: final training loss (and its ratio to the spike-free run), held-out loss, peak
     training loss after the first spike.

Step times are medians over interleaved rounds (the order of the methods rotates every round), each round
timing `optimizer.step()` (hooks included) on an MLP 256-512-512-10 with batch 256, one torch thread. The
ratio gradsight / peer is the median of the per-round ratios. Results go to benchmarks/results_transforms.json.
"""

from __future__ import annotations

import argparse
import os
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import gradsight.transforms as gt

try:
    import pytorch_optimizer as po
except ImportError:  # the peers are needed for every case
    sys.exit("pytorch-optimizer is needed: .venv/bin/python -m pip install --no-deps pytorch-optimizer==4.1.0")

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mlp(seed: int, sizes: tuple[int, ...], dtype=torch.float32, act=torch.nn.Tanh) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers).to(dtype)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------------------------- optimizers

def make(kind: str, model: torch.nn.Module, lr: float, eps: float | None = None, **kw):
    """An optimizer whose step() runs the named method; returns (optimizer, Wrapped or None)."""
    p = model.parameters()
    if kind == "adamw":
        return torch.optim.AdamW(p, lr=lr, eps=eps or 1e-8, weight_decay=0.0), None
    if kind == "spam_peer":
        return po.SPAM(p, lr=lr, eps=eps or 1e-6, weight_decay=0.0, warmup_epoch=kw.get("warmup", 150),
                       update_proj_gap=kw.get("every", 500), grad_accu_steps=kw.get("skip", 20)), None
    if kind == "spam":
        opt = torch.optim.AdamW(p, lr=lr, eps=eps or 1e-6, weight_decay=0.0)
        return opt, gt.wrap(opt, gt.spam(reset_every=kw.get("every", 500), warmup=kw.get("warmup", 150),
                                         skip_first=kw.get("skip", 20)), model)
    if kind == "stable_peer":
        return po.StableSPAM(p, lr=lr, eps=eps or 1e-8, weight_decay=0.0,
                             update_proj_gap=kw.get("every", 1000)), None
    if kind == "stable_spam":
        opt = torch.optim.AdamW(p, lr=lr, eps=eps or 1e-8, weight_decay=0.0)
        return opt, gt.wrap(opt, gt.stable_spam(reset_every=kw.get("every", 1000)), model)
    if kind == "ortho_peer":
        return po.OrthoGrad(torch.optim.AdamW(p, lr=lr, eps=eps or 1e-8, weight_decay=0.0)), None
    if kind == "orthograd":
        opt = torch.optim.AdamW(p, lr=lr, eps=eps or 1e-8, weight_decay=0.0)
        return opt, gt.wrap(opt, gt.orthograd(), model)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------- a-c: equivalence

def trajectory(kind: str, dtype, eps, steps=60, spikes=(12, 25, 47), lr=1e-2, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g)
    y = X[:, :1].sin() + 0.1 * torch.randn(64, 1, generator=g)
    X, y = X.to(dtype), y.to(dtype)
    model = mlp(0, (8, 32, 1), dtype)
    opt, _ = make(kind, model, lr, eps, **kw)
    out = []
    for k in range(steps):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        if k in spikes:
            for p in model.parameters():
                p.grad.mul_(1000.0)
        opt.step()
        out.append(flat(model).clone())
    return torch.stack(out)


def max_diff(a: str, b: str, dtype, eps, lr=1e-2, **kw) -> float:
    return float((trajectory(a, dtype, eps, lr=lr, **kw) - trajectory(b, dtype, eps, lr=lr, **kw)).abs().max())


def equivalence() -> dict:
    kw = dict(every=20, warmup=7, skip=5)
    res = {
        "spam_vs_SPAM": {
            "float64_eps1e-30_lr1e-2": max_diff("spam", "spam_peer", torch.float64, 1e-30, **kw),
            "float32_eps1e-12_lr1e-3": max_diff("spam", "spam_peer", torch.float32, 1e-12, lr=1e-3, **kw),
            "float32_eps1e-6_lr1e-3 (eps convention)": max_diff("spam", "spam_peer", torch.float32, 1e-6,
                                                                lr=1e-3, **kw),
        },
        "stable_spam_vs_StableSPAM": {
            "float64_eps1e-8_lr1e-2": max_diff("stable_spam", "stable_peer", torch.float64, 1e-8, every=20),
            "float32_eps1e-8_lr1e-2": max_diff("stable_spam", "stable_peer", torch.float32, 1e-8, every=20),
        },
        "orthograd_vs_OrthoGrad": {
            "float64_lr1e-2": max_diff("orthograd", "ortho_peer", torch.float64, 1e-8, spikes=()),
            "float32_lr1e-2": max_diff("orthograd", "ortho_peer", torch.float32, 1e-8, spikes=()),
        },
    }
    res["settings"] = "MLP 8-32-1 tanh, 64 examples, 60 steps, spikes x1000 at steps 12, 25, 47 (not for ⊥Grad); " \
                      "SPAM: reset every 20, warm-up 7, skip 5; Stable-SPAM: reset every 20"
    return res


# ----------------------------------------------------------------------------------------------- step time

def step_times(rounds: int, steps: int) -> dict:
    kinds = ["adamw", "spam", "spam_peer", "stable_spam", "stable_peer", "orthograd", "ortho_peer"]
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(256, 256, generator=g), torch.randint(0, 10, (256,), generator=g)
    setups = {}
    for k in kinds:
        model = mlp(0, (256, 512, 512, 10), act=torch.nn.ReLU)
        opt, _ = make(k, model, 1e-3, every=10_000)
        setups[k] = (model, opt)
    per_round: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            model, opt = setups[k]
            ts = []
            for _ in range(steps + 2):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X), y).backward()
                t0 = time.perf_counter()
                opt.step()
                ts.append(time.perf_counter() - t0)
            per_round[k].append(statistics.median(ts[2:]) * 1e3)
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    ratio = {f"{a}/{b}": statistics.median([x / y for x, y in zip(per_round[a], per_round[b])])
             for a, b in [("spam", "spam_peer"), ("stable_spam", "stable_peer"), ("orthograd", "ortho_peer"),
                          ("spam", "adamw")]}
    return {"ms_per_step": ms, "ratios": ratio, "per_round_ms": per_round, "rounds": rounds, "steps_per_round": steps,
            "workload": "MLP 256-512-512-10 ReLU (400k params), batch 256, optimizer.step() only"}


# ----------------------------------------------------------------------------------------------- d: spikes

def spike_problem(seed: int, n: int = 1024):
    """y = tanh(x.w) + 0.05 noise, x in R^16; n training and n held-out examples; MLP 16-32-1 (577 parameters,
    fewer than n, so the training loss cannot reach zero and the noise floor 0.0025 stays visible)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, 16, generator=g)
    y = torch.tanh(X @ (torch.randn(16, 1, generator=g) / 4)) + 0.05 * torch.randn(2 * n, 1, generator=g)
    return X[:n], y[:n], X[n:], y[n:], mlp(seed, (16, 32, 1))


def spike_run(seed: int, kind: str, steps: int, spikes: set[int]) -> dict:
    X, y, X_test, y_test, model = spike_problem(seed)
    base = "adamw" if kind in ("clean", "adam", "adam_clip") else kind
    opt, _ = make(base, model, 1e-3, eps=1e-6 if base == "adamw" else None)
    losses = []
    for k in range(steps):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        if k in spikes and kind != "clean":
            for p in model.parameters():
                p.grad.mul_(1000.0)
        if kind == "adam_clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        final = ((model(X) - y) ** 2).mean().item()
        test = ((model(X_test) - y_test) ** 2).mean().item()
    first = min(spikes)
    diverged = not all(math.isfinite(v) for v in losses + [final]) or final > losses[0]
    return {"final": final, "test": test, "peak_after_first_spike": max(losses[first:]), "initial": losses[0],
            "diverged": diverged}


def spike_experiment(seeds: int, steps: int) -> dict:
    kinds = ["clean", "adam", "adam_clip", "spam_peer", "spam", "stable_peer", "stable_spam"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    n_spikes = max(1, steps // 100)
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        spikes = set((25 + torch.randperm(steps - 25, generator=g)[:n_spikes]).tolist())
        for k in kinds:
            runs[k].append(spike_run(seed, k, steps, spikes))
        log(f"spikes: seed {seed} done")
    clean = [r["final"] for r in runs["clean"]]
    summary = {}
    for k, rs in runs.items():
        finals = [r["final"] for r in rs]
        rel = [f / c for f, c in zip(finals, clean)]
        summary[k] = {"diverged": sum(r["diverged"] for r in rs), "final_median": statistics.median(finals),
                      "final_over_clean_median": statistics.median(rel), "final_over_clean_max": max(rel),
                      "test_median": statistics.median(r["test"] for r in rs),
                      "test_max": max(r["test"] for r in rs),
                      "peak_median": statistics.median(r["peak_after_first_spike"] for r in rs),
                      "finals": finals, "tests": [r["test"] for r in rs]}
    return {"seeds": seeds, "steps": steps, "spikes_per_run": n_spikes, "summary": summary,
            "setup": "MLP 16-32-1 tanh, 1024 training + 1024 held-out examples (noise floor 0.0025), full batch, "
                     "lr 1e-3; x1000 grads on 1% of steps; "
                     "AdamW eps 1e-6 (Adam, clip, SPAM) / 1e-8 (Stable-SPAM); SPAM warm-up 150, reset 500, "
                     "skip 20; Stable-SPAM reset 1000"}


# ----------------------------------------------------------------------------------------------- c: grokking

class OneHotMLP(torch.nn.Module):
    """Linear(226 -> 200) on the one-hot pair (a, b), computed as two embedding rows (the same function and the
    same weight tensor up to a transpose, so ⊥Grad acts identically), then ReLU MLP 200-200-113."""

    def __init__(self, P: int, h: int = 200):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(2 * P, h)
        self.b0 = torch.nn.Parameter(torch.zeros(h))
        self.rest = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, P))
        self.P = P

    def forward(self, ab):  # (B, 2) integer pairs
        return self.rest(self.emb(ab[:, 0]) + self.emb(ab[:, 1] + self.P) + self.b0)


def grokking(epochs: int, every: int = 5) -> dict:
    P = 113
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    ab = torch.stack([a.flatten(), b.flatten()], 1)
    y = ab.sum(1) % P
    perm = torch.randperm(P * P, generator=torch.Generator().manual_seed(0))
    n_train = int(0.4 * P * P)
    tr, te = perm[:n_train], perm[n_train:]
    out = {}
    finals = {}
    for kind in ("adamw", "orthograd", "ortho_peer"):
        model = OneHotMLP(P)
        opt, _ = make(kind, model, 0.01)
        first90, accs = None, []
        t0 = time.perf_counter()
        for ep in range(1, epochs + 1):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ab[tr]), y[tr]).backward()
            opt.step()
            if ep % every == 0 or ep == epochs:
                with torch.no_grad():
                    acc = (model(ab[te]).argmax(1) == y[te]).float().mean().item()
                accs.append(acc)
                if first90 is None and acc >= 0.9:
                    first90 = ep
        with torch.no_grad():
            train_acc = (model(ab[tr]).argmax(1) == y[tr]).float().mean().item()
        finals[kind] = flat(model)
        out[kind] = {"first_epoch_test_acc_ge_0.9": first90, "final_test_acc": accs[-1],
                     "final_train_acc": train_acc, "max_test_acc": max(accs),
                     "seconds": time.perf_counter() - t0}
    out["max_param_diff_orthograd_vs_peer"] = float((finals["orthograd"] - finals["ortho_peer"]).abs().max())
    out["setup"] = (f"(a + b) mod {P}, train fraction 0.4 ({n_train}), full batch, one-hot MLP 226-200-200-113 "
                    f"ReLU, AdamW lr 0.01 weight decay 0, {epochs} epochs, float32, test accuracy every {every} "
                    f"epochs")
    return out


# ----------------------------------------------------------------------------------------------- main

def table(res: dict) -> str:
    lines = ["", "a-c. trajectory max |Δθ|, gradsight vs pytorch-optimizer"]
    for case, d in res["equivalence"].items():
        if case == "settings":
            continue
        for k, v in d.items():
            lines.append(f"  {case:28s} {k:42s} {v:.3g}")
    st = res["step_time"]
    lines.append("")
    lines.append("optimizer.step() ms (median of interleaved rounds)")
    lines.append("  " + "  ".join(f"{k} {v:.2f}" for k, v in st["ms_per_step"].items()))
    lines.append("  ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in st["ratios"].items()))
    gk = res.get("grokking")
    if gk:
        lines.append("")
        lines.append("c. modular addition (first epoch test acc >= 0.9 / final test acc)")
        for k in ("adamw", "orthograd", "ortho_peer"):
            lines.append(f"  {k:12s} {str(gk[k]['first_epoch_test_acc_ge_0.9']):>5s} / "
                         f"{gk[k]['final_test_acc']:.3f}")
        lines.append(f"  max |Δθ| orthograd vs peer after training: {gk['max_param_diff_orthograd_vs_peer']:.3g}")
    sp = res["spikes"]
    lines.append("")
    lines.append(f"d. spike experiment: {sp['seeds']} seeds x {sp['steps']} steps, {sp['spikes_per_run']} spikes")
    lines.append(f"  {'method':12s} {'diverged':>8s} {'train med':>10s} {'/clean med':>10s} {'/clean max':>10s} "
                 f"{'test med':>10s} {'test max':>10s} {'peak med':>10s}")
    for k, s in sp["summary"].items():
        lines.append(f"  {k:12s} {s['diverged']:8d} {s['final_median']:10.4g} {s['final_over_clean_median']:10.3g} "
                     f"{s['final_over_clean_max']:10.3g} {s['test_median']:10.4g} {s['test_max']:10.4g} "
                     f"{s['peak_median']:10.4g}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results_transforms.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    res: dict = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "mode": "quick" if args.quick else "full",
                 "machine": {"cpus": os.cpu_count(), "torch_threads": 1, "torch": torch.__version__,
                             "python": platform.python_version(), "pytorch_optimizer": po.__version__
                             if hasattr(po, "__version__") else "4.1.0"}}
    log("equivalence")
    res["equivalence"] = equivalence()
    log("step time")
    res["step_time"] = step_times(rounds=3 if args.quick else 7, steps=10 if args.quick else 30)
    log("grokking")
    res["grokking"] = grokking(epochs=100 if args.quick else 300)
    log("spikes")
    res["spikes"] = spike_experiment(seeds=3 if args.quick else 10, steps=300 if args.quick else 2000)
    res["elapsed_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    print(table(res))
    print(f"\nwritten {out} in {res['elapsed_s']} s")


if __name__ == "__main__":
    main()
