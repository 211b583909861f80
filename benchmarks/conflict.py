"""Multi-task gradient aggregation: gradsight.transforms.conflict vs torchjd 0.18 and pytorch_optimizer 4.1 (PCGrad).

Three parts, all on CPU in one process:
  1. known answers (anchor §2.12) for every implementation that has the method, and agreement on random
     Jacobians (m = 2..5 tasks, P = 50): UPGrad and PCGrad (same permutations) against torchjd, MGDA against
     torchjd's Frank-Wolfe, PCGrad against pytorch_optimizer (m = 2), CAGrad against a transcription of the
     official SLSQP solve (torchjd's CAGrad needs cvxpy, which is not installed here);
  2. time per weights(K) call for m = 2, 5, 10 (gradsight vs torchjd's Gramian weightings);
  3. the two-task MLP of tests/test_conflict.py for 500 steps and 3 seeds: shared tanh trunk 10-4-4, two linear
     heads, Adam(lr=1e-2), fresh batches of 4; task A regresses y = tanh(2 beta^T x / sqrt(10)), task B regresses
     -y + 2 eps (fresh label noise) with its loss weighted x10. Heads get their own gradients; the trunk gets the
     aggregate (gradsight ``aggregate_backward(task_params=...)``, torchjd ``mtl_backward`` + ``jac_to_grad``),
     except pytorch_optimizer's PCGrad, which projects over all parameters and sums on the heads. Reported: clean
     held-out losses of A and B (mean of the evaluations at steps 400, 450, 500), the share of steps whose trunk
     gradients conflict (cos < 0), and the median ms per training step. The methods advance one step at a time
     in a rotating order, so load changes on a shared machine hit them alike; read the ms as ratios.

Usage: .venv/bin/python benchmarks/conflict.py [--steps 500] [--seeds 3] [--out benchmarks/results_conflict.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import minimize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gradsight.transforms.conflict import (  # noqa: E402
    aggregate,
    aggregate_backward,
    cagrad,
    mgda,
    pcgrad,
    upgrad,
)
from torchjd import aggregation as jda  # noqa: E402
from torchjd.autojac import jac_to_grad, mtl_backward  # noqa: E402
from pytorch_optimizer import PCGrad as PoPCGrad  # noqa: E402


def T(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def random_J(seed: int, m: int, P: int = 50) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((m, P)) + rng.uniform(-1.5, 1.5) * rng.standard_normal(P)
    return torch.tensor(J * rng.uniform(0.2, 3.0, size=(m, 1)))


def po_pcgrad(J: torch.Tensor) -> torch.Tensor:
    p = nn.Parameter(torch.zeros(J.shape[1], dtype=J.dtype))
    return PoPCGrad(torch.optim.SGD([p], lr=0.1)).project_conflicting([g.clone() for g in J],
                                                                       [torch.ones_like(g) for g in J])


def cagrad_official(J: torch.Tensor, c: float = 0.5, rescale: int = 1) -> torch.Tensor:
    """Cranial-XIX/CAGrad ``cagrad`` (SLSQP on the simplex), transcribed."""
    m = J.shape[0]
    GG = (J @ J.T).numpy()
    x0 = np.ones(m) / m
    cc = c * math.sqrt(GG.mean() + 1e-8) + 1e-8
    res = minimize(lambda x: x @ GG @ x0 + cc * math.sqrt(x @ GG @ x + 1e-8), x0, bounds=[(0, 1)] * m,
                   constraints={"type": "eq", "fun": lambda x: 1 - x.sum()})
    gw = torch.tensor(res.x) @ J
    g = J.mean(0) + cc / (gw.norm() + 1e-8) * gw
    return g / (1 + c**2) if rescale == 1 else (g / (1 + c) if rescale == 2 else g)


def torchjd_cagrad_status() -> str:
    try:
        jda.CAGrad(c=0.5)
        return "available"
    except ImportError as e:
        return f"unavailable: {str(e).splitlines()[0]}"


# ----------------------------------------------------------------------------------------------- 1. known answers

def known_answers() -> list[dict]:
    rows = []

    def row(case, expected, **impls):
        exp = np.asarray(expected, dtype=float)
        out = {"case": case, "expected": exp.tolist()}
        for name, v in impls.items():
            if isinstance(v, str):
                out[name] = v
                continue
            v = np.asarray(v.detach() if isinstance(v, torch.Tensor) else v, dtype=float)
            out[name] = v.round(6).tolist()
            out[f"{name}_err"] = float(np.abs(v - exp).max())
        rows.append(out)

    J = T([1.0, 0.0], [-1.0, 1.0])
    row("PCGrad (1,0),(-1,1) mean", [0.25, 0.75], gradsight=aggregate(J, "pcgrad"), pytorch_optimizer=po_pcgrad(J))
    row("PCGrad (1,0),(-1,1) sum", [0.5, 1.5], gradsight=aggregate(J, "pcgrad", reduction="sum"),
        torchjd=jda.PCGrad()(J))
    row("MGDA (1,0),(0,1)", [0.5, 0.5], gradsight=aggregate(T([1.0, 0.0], [0.0, 1.0]), "mgda"),
        torchjd=jda.MGDA()(T([1.0, 0.0], [0.0, 1.0])))
    J2 = T([2.0, 0.0], [0.0, 1.0])
    row("MGDA (2,0),(0,1)", [0.4, 0.8], gradsight=aggregate(J2, "mgda"), torchjd=jda.MGDA()(J2))
    g = T([1.0, -2.0, 0.5])[0]
    Jg = torch.stack([g, g])
    status = torchjd_cagrad_status()
    row("CAGrad g1=g2=g, c=0.5, no rescale (torchjd convention)", (1.5 * g).tolist(),
        gradsight=aggregate(Jg, "cagrad", rescale=0),
        torchjd=jda.CAGrad(c=0.5)(Jg) if status == "available" else status)
    row("CAGrad g1=g2=g, c=0.5, rescale=1 (LibMTL/official)", (1.2 * g).tolist(),
        gradsight=aggregate(Jg, "cagrad", rescale=1), official_slsqp=cagrad_official(Jg))
    Jn = T([1.0, 0.0], [0.5, 1.0])
    row("UPGrad non-conflicting -> mean", Jn.mean(0).tolist(), gradsight=aggregate(Jn, "upgrad"),
        torchjd=jda.UPGrad()(Jn))
    row("UPGrad (1,0),(-1,1) (tol 1e-3)", [0.25, 0.75], gradsight=aggregate(J, "upgrad"), torchjd=jda.UPGrad()(J))
    row("ODICE (1,0),(-1,1), eta=1", [1.0, 1.0], gradsight=aggregate(J, "odice"))
    return rows


def random_agreement(n_per_m: int = 10) -> list[dict]:
    out = {k: [] for k in ("upgrad_vs_torchjd", "pcgrad_vs_torchjd", "mgda_vs_torchjd_fw", "pcgrad_vs_po_m2",
                           "cagrad_vs_official")}
    mgda_not_worse = 0
    total = 0
    for m in (2, 3, 4, 5):
        for seed in range(n_per_m):
            J = random_J(seed, m)
            scale = float(J.abs().max())
            out["upgrad_vs_torchjd"].append(float((aggregate(J, "upgrad") - jda.UPGrad()(J)).abs().max()) / scale)
            torch.manual_seed(seed)
            ref = jda.PCGrad()(J)
            d = pcgrad(J @ J.T, order=torch.Generator().manual_seed(seed), reduction="sum") @ J
            out["pcgrad_vs_torchjd"].append(float((d - ref).abs().max()) / scale)
            d, ref = aggregate(J, "mgda"), jda.MGDA()(J)
            out["mgda_vs_torchjd_fw"].append(float((d - ref).norm() / ref.norm().clamp_min(1e-300)))
            mgda_not_worse += int(float(d.norm()) <= float(ref.norm()) + 1e-12)
            total += 1
            if m == 2:
                out["pcgrad_vs_po_m2"].append(float((aggregate(J, "pcgrad") - po_pcgrad(J)).abs().max()) / scale)
            if seed < 3:
                ref = cagrad_official(J)
                out["cagrad_vs_official"].append(float((aggregate(J, "cagrad") - ref).norm() / ref.norm()))
    rows = [{"comparison": k, "n": len(v), "max": max(v), "median": statistics.median(v)} for k, v in out.items()]
    rows.append({"comparison": "mgda: count |d_gradsight| <= |d_torchjd|", "n": total, "count": mgda_not_worse})
    return rows


# ----------------------------------------------------------------------------------------------- 2. weights timing

def weights_timing(reps: int = 200) -> list[dict]:
    rows = []
    impls = {
        "pcgrad": (lambda K: pcgrad(K, reduction="sum"), jda.PCGradWeighting()),
        "mgda": (mgda, jda.MGDAWeighting()),
        "upgrad": (upgrad, jda.UPGradWeighting()),
        "cagrad": (cagrad, None),
    }
    for m in (2, 5, 10):
        J = random_J(0, m)
        K = J @ J.T
        for name, (ours, theirs) in impls.items():
            row = {"method": name, "m": m}
            for side, fn in (("gradsight_us", ours), ("torchjd_us", theirs)):
                if fn is None:
                    row[side] = None
                    continue
                for _ in range(5):
                    fn(K)
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(K)
                row[side] = (time.perf_counter() - t0) / reps * 1e6
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- 3. training

D, H, BATCH, WEIGHT_B, SIGMA, LR = 10, 4, 4, 10.0, 2.0, 1e-2


def make(seed: int):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(D, generator=g)

    def sample(k):
        X = torch.randn(k, D, generator=g)
        return X, torch.tanh(X @ beta * (2 / math.sqrt(D)))

    Xt, yt = sample(1024)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())
    heads = nn.Linear(H, 1), nn.Linear(H, 1)
    return g, sample, (Xt, yt), trunk, heads


def cosine_of(shared_grads: list[list[torch.Tensor]]) -> float:
    a, b = (torch.cat([x.reshape(-1) for x in gs]).double() for gs in shared_grads)
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def train(method: str, seed: int, steps: int):
    """A generator: one training step per ``next()`` (yields its wall time); returns the summary dict."""
    g, sample, (Xt, yt), trunk, (head_a, head_b) = make(seed)
    shared = list(trunk.parameters())
    params = [*shared, *head_a.parameters(), *head_b.parameters()]
    opt = torch.optim.Adam(params, lr=LR, foreach=True)
    po = PoPCGrad(opt) if method == "pytorch_optimizer.PCGrad" else None
    jd_cls = {"torchjd.UPGrad": jda.UPGrad, "torchjd.MGDA": jda.MGDA, "torchjd.PCGrad": jda.PCGrad}.get(method)
    jd = jd_cls() if jd_cls else None
    times, conflicts, evaluated = [], [], []
    evals = {steps - 100, steps - 50, steps}

    def evaluate():
        with torch.no_grad():
            ft = trunk(Xt)
            return (float(((head_a(ft).squeeze(-1) - yt) ** 2).mean()),
                    float(((head_b(ft).squeeze(-1) + yt) ** 2).mean()))

    for t in range(1, steps + 1):
        X, y = sample(BATCH)
        noise = torch.randn(BATCH, generator=g)
        t0 = time.perf_counter()
        f = trunk(X)
        la = ((head_a(f).squeeze(-1) - y) ** 2).mean()
        lb = WEIGHT_B * ((head_b(f).squeeze(-1) - (-y + SIGMA * noise)) ** 2).mean()
        cos = None
        if po is not None:
            po.zero_grad()
            po.pc_backward([la, lb])
            po.step()
        else:
            opt.zero_grad()
            if method == "sum (loss.backward)":
                (la + lb).backward()
            elif jd is not None:
                mtl_backward([la, lb], features=f)
                jac_to_grad(shared, jd, retain_jac=True)
            else:
                out = aggregate_backward([la, lb], shared, method.split(".")[-1],
                                         task_params=[list(head_a.parameters()), list(head_b.parameters())])
                cos = float(out["cosines"][0, 1])
            opt.step()
        times.append(time.perf_counter() - t0)
        if jd is not None:                                                # outside the timed part
            cos = cosine_of([[p.jac[0] for p in shared], [p.jac[1] for p in shared]])
            for p in shared:
                del p.jac
        if cos is not None:
            conflicts.append(cos < 0)
        if t in evals:
            evaluated.append(evaluate())
        yield times[-1]
    a, b = np.mean(evaluated, axis=0)
    return {"loss_a": float(a), "loss_b": float(b), "ms_per_step": 1e3 * statistics.median(times),
            "conflict_rate": float(np.mean(conflicts)) if conflicts else None}


METHODS = ["sum (loss.backward)", "gradsight.sum", "gradsight.pcgrad", "gradsight.upgrad", "gradsight.mgda",
           "gradsight.cagrad", "torchjd.UPGrad", "torchjd.MGDA", "torchjd.PCGrad", "pytorch_optimizer.PCGrad"]


def interleaved(seed: int, steps: int) -> dict[str, dict]:
    """Advance every method's run one step at a time, rotating the order each step, so that load changes on a
    shared machine hit all methods alike."""
    gens = {m: train(m, seed, steps) for m in METHODS}
    done: dict[str, dict] = {}
    for t in range(steps + 1):
        k = t % len(METHODS)
        for m in METHODS[k:] + METHODS[:k]:
            if m in done:
                continue
            try:
                next(gens[m])
            except StopIteration as stop:
                done[m] = stop.value
    return done


def training(steps: int, seeds: int) -> dict:
    per_seed = [interleaved(s, steps) for s in range(seeds)]
    res = {}
    for method in METHODS:
        runs = [ps[method] for ps in per_seed]
        mean = {k: (float(np.mean([r[k] for r in runs])) if runs[0][k] is not None else None) for k in runs[0]}
        res[method] = {"per_seed": runs, "mean": mean}
        rate = "n/a" if mean["conflict_rate"] is None else f"{mean['conflict_rate']:.2f}"
        print(f"  {method:26s} A {mean['loss_a']:.4f}  B {mean['loss_b']:.4f}  conflict {rate}  "
              f"{mean['ms_per_step']:.2f} ms/step   per seed A "
              f"{[round(r['loss_a'], 4) for r in runs]} B {[round(r['loss_b'], 4) for r in runs]}", flush=True)
    return res


# ----------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results_conflict.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchjd": metadata.version("torchjd"), "pytorch_optimizer": metadata.version("pytorch_optimizer"),
           "scipy": metadata.version("scipy"), "torchjd_cagrad": torchjd_cagrad_status(),
           "loadavg_start": os.getloadavg(), "cpus": os.cpu_count(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print("1. known answers (max |error| against the expected vector)")
    ka = known_answers()
    for r in ka:
        errs = {k[:-4]: f"{v:.1e}" for k, v in r.items() if k.endswith("_err")}
        other = {k: v for k, v in r.items() if isinstance(v, str) and k != "case"}
        print(f"  {r['case']:58s} {errs} {other}")
    print("   random Jacobians, m = 2..5, P = 50 (relative differences)")
    ra = random_agreement()
    for r in ra:
        vals = f"{r['count']}/{r['n']}" if "count" in r else f"max {r['max']:.2e}  median {r['median']:.2e}"
        print(f"  {r['comparison']:42s} n={r['n']:3d}  {vals}")
    print("2. weights(K) time per call (microseconds)")
    wt = weights_timing()
    for r in wt:
        theirs = "n/a" if r["torchjd_us"] is None else f"{r['torchjd_us']:.0f}"
        print(f"  {r['method']:7s} m={r['m']:2d}  gradsight {r['gradsight_us']:7.0f}   torchjd {theirs}")
    print(f"3. two-task MLP, {args.steps} steps, {args.seeds} seeds (clean held-out MSE, mean over seeds)")
    tr = training(args.steps, args.seeds)
    env["loadavg_end"] = os.getloadavg()
    result = {"config": {"steps": args.steps, "seeds": args.seeds, "D": D, "H": H, "batch": BATCH,
                         "weight_b": WEIGHT_B, "sigma_b": SIGMA, "lr": LR, "optimizer": "Adam(foreach=True)"},
              "environment": env, "known_answers": ka, "random_agreement": ra, "weights_timing_us": wt,
              "training": tr}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out} (load average start {env['loadavg_start']}, end {env['loadavg_end']})")


if __name__ == "__main__":
    main()
