"""Curvature and landscape benchmarks: gradsight vs PyHessian 0.1 and loss-landscapes 3.0.6 on the digits MLP.

All comparisons run in the same process on the same float64 model and data (scikit-learn's bundled digits,
1,257 training images, MLP 64-32-32-10 with ReLU, 3,466 parameters, trained with
`gradsight.demo.digits.train_digits_mlp`); every timing is a ratio of interleaved repetitions (the order of
the two sides alternates every round; median over rounds), never an absolute time.

Cases:
  1. top eigenvalue: gradsight Lanczos vs PyHessian `hessian(...).eigenvalues(top_n=1)` (power iteration,
     tol 1e-3, maxIter 100), both against the exact lambda_max of the dense Hessian; goal rel. diff <= 1e-2.
  2. Hessian-vector products to reach rtol 1e-3 on lambda_max (first product whose estimate is within 1e-3 of
     the exact value): Lanczos Ritz value vs PyHessian's Rayleigh quotients (its HVPs are counted by wrapping
     `pyhessian.hessian.hessian_vector_product`); goal ratio <= 0.5. Also the self-stopping counts.
  3. trace RMSE over seeds at equal budget: Hutch++ vs Hutchinson (gradsight) against the exact trace; goal
     ratio <= 0.7; PyHessian's `trace()` (tol 1e-3, maxIter 100) for reference.
  4. density memory (subprocesses, a wider MLP so that the basis is visible in RSS): gradsight SLQ with
     max_vectors=b vs full re-orthogonalisation vs PyHessian `density(iter=100, n_v=1)`: stored vectors and
     peak RSS increase.
  5. landscape grid points per second, 21 x 21 grid, filter-normalised random directions: gradsight grid_2d
     (vmap-batched) vs loss_landscapes.random_plane; goal >= 3x. 5b: the same on 128 training rows.
Cases 1, 2 and 5 also run on a small CNN (conv 1-8 3x3, conv 8-16 3x3 stride 2, linear 256-10; 3,818
parameters, same data as 8x8 images, same training); its lambda_max reference is a Lanczos run converged to a
relative residual of 1e-12 (the dense Hessian would take minutes; the eigenvalue error is below residual^2/gap).

Usage: .venv/bin/python benchmarks/curvature.py [--quick] [--out benchmarks/results_curvature.json]
The exit code is 0 whenever the measurements ran, also when a goal is missed (the table says MISSED).
Needs: pip install --no-deps pyhessian==0.1 loss-landscapes==3.0.6; pip install scikit-learn.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import warnings

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from gradsight.curvature import HessianOperator  # noqa: E402
from gradsight.curvature.density import slq  # noqa: E402
from gradsight.curvature.lanczos import lanczos  # noqa: E402
from gradsight.curvature.trace import hutchinson, hutchpp  # noqa: E402
from gradsight.demo.digits import digits_mlp, load_digits_tensors, train_digits_mlp  # noqa: E402
from gradsight.landscape import BatchLoss, grid_2d, random_direction  # noqa: E402


def train_digits_cnn(seed: int = 0, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64):
    """Small float64 CNN on the digits (8x8) with the MLP's recipe; returns (model, (X, y), test accuracy)."""
    data = load_digits_tensors()
    X, y = data.X_train.reshape(-1, 1, 8, 8), data.y_train
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(256, 10)).double()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(X[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    m.eval()
    with torch.no_grad():
        acc = float((m(data.X_test.reshape(-1, 1, 8, 8)).argmax(1) == data.y_test).double().mean())
    return m, (X, y), acc


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# PyHessian 0.1 shims (documented quirks)


@contextlib.contextmanager
def pyhessian_compat():
    """Run PyHessian 0.1 on a float64 model with current torch.

    - It draws its random vectors with `torch.randn(p.size())` / builds T with `torch.zeros(iter, iter)`, i.e. in
      the DEFAULT dtype: the default is set to float64 for the call so its vectors match the float64 model.
    - `density()` calls `torch.eig`, removed from torch 2.x (it now only raises): a shim returns the eigen-decomposition of the
      symmetric T via `torch.linalg.eigh` in `torch.eig`'s old layout ((n, 2) real/imag eigenvalues).
    """
    old = torch.get_default_dtype()
    old_eig = getattr(torch, "eig", None)

    def eig(T, eigenvectors=False):
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    torch.set_default_dtype(torch.float64)
    torch.eig = eig
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        if old_eig is None:
            del torch.eig
        else:
            torch.eig = old_eig


class HVPCounter:
    """Wraps pyhessian.hessian.hessian_vector_product (single-batch path): counts products and records the
    Rayleigh quotient <Hv, v> / <v, v> of each."""

    def __init__(self):
        import pyhessian  # noqa: F401  (the package re-exports the class `hessian` over its submodule name)

        ph = sys.modules["pyhessian.hessian"]
        self.ph, self.orig = ph, ph.hessian_vector_product
        self.n, self.rq = 0, []

    def __enter__(self):
        def counted(gradsH, params, v):
            hv = self.orig(gradsH, params, v)
            self.n += 1
            num = sum(float((a * b).sum()) for a, b in zip(hv, v))
            den = sum(float((b * b).sum()) for b in v)
            self.rq.append(num / den)
            return hv

        self.ph.hessian_vector_product = counted
        return self

    def __exit__(self, *exc):
        self.ph.hessian_vector_product = self.orig


def pyhessian_obj(model, X, y):
    from pyhessian import hessian

    model.zero_grad(set_to_none=True)
    with pyhessian_compat(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        h = hessian(model.eval(), F.cross_entropy, data=(X, y), cuda=False)
    return h


def release(model):
    model.zero_grad(set_to_none=True)  # PyHessian leaves .grad with a create_graph graph on every parameter
    gc.collect()


# ----------------------------------------------------------------------------------------------------------
# cases


def case_top_eigenvalue(model, X, y, H, lam_exact, seeds):
    log("case 1+2: top eigenvalue and HVP counts")
    rows = []
    for s in seeds:
        # gradsight Lanczos, self-stopping (residual tol 1e-6 and 1e-3)
        r6 = lanczos(H, k=1, tol=1e-6, seed=s)
        r3 = lanczos(H, k=1, tol=1e-3, seed=s)
        # oracle count: smallest number of products whose top Ritz value is within 1e-3 of lambda_max
        # (the Krylov sequence of a seed is deterministic, so max_iter=j reproduces its first j steps)
        j_lz = None
        for j in range(1, 200):
            r = lanczos(H, k=1, tol=1e-14, max_iter=j, seed=s)
            if abs(float(r.eigenvalues[0]) - lam_exact) <= 1e-3 * abs(lam_exact):
                j_lz = j
                break
        # PyHessian default run (tol 1e-3, maxIter 100)
        torch.manual_seed(s)
        h = pyhessian_obj(model, X, y)
        with pyhessian_compat(), HVPCounter() as c:
            ev, _ = h.eigenvalues(top_n=1)
        ph_default, ph_default_n = float(ev[0]), c.n
        # PyHessian oracle count: tight tol, long run; first Rayleigh quotient within 1e-3
        torch.manual_seed(s)
        with pyhessian_compat(), HVPCounter() as c:
            h.eigenvalues(maxIter=2000, tol=1e-12, top_n=1)
        j_ph = next((i + 1 for i, q in enumerate(c.rq) if abs(q - lam_exact) <= 1e-3 * abs(lam_exact)), None)
        del h
        release(model)
        rows.append({"seed": s, "lanczos": float(r6.eigenvalues[0]), "lanczos_n": r6.n_products,
                     "lanczos_tol1e-3": float(r3.eigenvalues[0]), "lanczos_tol1e-3_n": r3.n_products,
                     "pyhessian": ph_default, "pyhessian_n": ph_default_n,
                     "oracle_n_lanczos": j_lz, "oracle_n_pyhessian": j_ph})
        log(f"  seed {s}: {rows[-1]}")
    rel = lambda a: abs(a - lam_exact) / abs(lam_exact)  # noqa: E731
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    out = {
        "lambda_max_exact": lam_exact,
        "per_seed": rows,
        "rel_diff_gradsight_vs_pyhessian_median": statistics.median(
            abs(r["lanczos"] - r["pyhessian"]) / abs(r["pyhessian"]) for r in rows),
        "rel_err_lanczos_median": statistics.median(rel(r["lanczos"]) for r in rows),
        "rel_err_lanczos_tol1e-3_median": statistics.median(rel(r["lanczos_tol1e-3"]) for r in rows),
        "rel_err_pyhessian_median": statistics.median(rel(r["pyhessian"]) for r in rows),
        "rel_err_pyhessian_max": max(rel(r["pyhessian"]) for r in rows),
        "oracle_hvps_lanczos_median": med("oracle_n_lanczos"),
        "oracle_hvps_pyhessian_median": med("oracle_n_pyhessian"),
        "selfstop_hvps_lanczos_tol1e-3_median": med("lanczos_tol1e-3_n"),
        "selfstop_hvps_lanczos_tol1e-6_median": med("lanczos_n"),
        "selfstop_hvps_pyhessian_median": med("pyhessian_n"),
    }
    ratios = [r["oracle_n_lanczos"] / r["oracle_n_pyhessian"] for r in rows
              if r["oracle_n_lanczos"] and r["oracle_n_pyhessian"]]
    out["hvp_ratio_lanczos_over_pyhessian_median"] = statistics.median(ratios) if ratios else None
    return out


def case_trace(model, X, y, H, tr_exact, seeds, budget, ph_seeds):
    log(f"case 3: trace, budget {budget}, {len(seeds)} seeds")
    hpp, hut = [], []
    for s in seeds:
        hpp.append(hutchpp(H, n_products=budget, seed=s).estimate)
        hut.append(hutchinson(H, n_probes=budget, seed=s).estimate)
    rmse = lambda xs: math.sqrt(statistics.fmean((x - tr_exact) ** 2 for x in xs))  # noqa: E731
    ph = []
    for s in ph_seeds:
        torch.manual_seed(s)
        h = pyhessian_obj(model, X, y)
        with pyhessian_compat(), HVPCounter() as c:
            samples = h.trace()
        ph.append({"seed": s, "estimate": float(np.mean(samples)), "n_hvps": c.n})
        del h
        release(model)
    out = {"exact": tr_exact, "budget": budget, "n_seeds": len(seeds),
           "rmse_hutchpp": rmse(hpp), "rmse_hutchinson": rmse(hut),
           "bias_hutchpp": statistics.fmean(hpp) - tr_exact, "bias_hutchinson": statistics.fmean(hut) - tr_exact,
           "pyhessian": ph,
           "rmse_pyhessian": rmse([p["estimate"] for p in ph]),
           "pyhessian_hvps_median": statistics.median(p["n_hvps"] for p in ph)}
    out["rmse_ratio_hutchpp_over_hutchinson"] = out["rmse_hutchpp"] / out["rmse_hutchinson"]
    return out


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def density_child(mode: str, hidden: int, steps: int, max_vectors: int) -> None:
    """Subprocess: build a (seeded, untrained) wide digits MLP, reset the peak RSS, run one density, print JSON."""
    torch.set_num_threads(1)
    data = load_digits_tensors()
    torch.manual_seed(0)
    model = digits_mlp(hidden).eval()
    X, y = data.X_train, data.y_train
    extra = {}
    if mode.startswith("pyhessian"):
        h = pyhessian_obj(model, X, y)  # builds and keeps the gradient graph (its single-batch mode)
    else:
        H = HessianOperator(model, "cross_entropy", [(X, y)])
    dim = sum(p.numel() for p in model.parameters())
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    rss0, hwm0 = _status_kb("VmRSS"), _status_kb("VmHWM")
    t0 = time.perf_counter()
    if mode == "pyhessian":
        with pyhessian_compat():
            h.density(iter=steps, n_v=1)
        stored = steps  # its v_list keeps every Lanczos vector (by construction of density())
    elif mode == "pyhessian_hvp":  # one product only: the working memory every method needs anyway
        from pyhessian.utils import hessian_vector_product

        with pyhessian_compat():
            hessian_vector_product(h.gradsH, h.params, [torch.randn(p.shape) for p in h.params])
        stored = 1
    elif mode == "hvp":
        H.matvec(torch.randn(H.dim, dtype=H.dtype))
        stored = 1
    else:
        r = slq(H, n_probes=1, n_steps=steps, max_vectors=None if mode == "full" else max_vectors, seed=0)
        stored = r.peak_vectors
        extra = {"top_node": float(r.nodes[0, -1])}
    dt = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "dim": dim, "stored_vectors": stored, "rss_before_kb": rss0,
                      "hwm_before_kb": hwm0, "hwm_after_kb": _status_kb("VmHWM"), "seconds": dt, **extra}))


def case_density_memory(hidden, steps, max_vectors):
    log(f"case 4: density memory, hidden {hidden}, {steps} steps (subprocesses, one at a time)")
    res = {}
    for mode in ("hvp", "bounded", "full", "pyhessian_hvp", "pyhessian"):
        p = subprocess.run([sys.executable, __file__, "--_density-child", mode, "--hidden", str(hidden),
                            "--steps", str(steps), "--max-vectors", str(max_vectors)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            res[mode] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            log(f"  {mode} failed: {res[mode]['error']}")
            continue
        d = json.loads(p.stdout.strip().splitlines()[-1])
        d["peak_increase_mb"] = (d["hwm_after_kb"] - d["rss_before_kb"]) / 1024
        d["basis_mb"] = d["stored_vectors"] * d["dim"] * 8 / 2**20
        d["hwm_reset_ok"] = d["hwm_before_kb"] <= d["rss_before_kb"] + 1024
        res[mode] = d
        log(f"  {mode}: {d}")
    for mode, base in (("bounded", "hvp"), ("full", "hvp"), ("pyhessian", "pyhessian_hvp")):
        if "peak_increase_mb" in res.get(mode, {}) and "peak_increase_mb" in res.get(base, {}):
            res[mode]["over_one_hvp_mb"] = res[mode]["peak_increase_mb"] - res[base]["peak_increase_mb"]
    return {"hidden": hidden, "steps": steps, "max_vectors": max_vectors, **res}


def case_landscape(model, X, y, steps, rounds, batch_points):
    log(f"case 5: landscape {steps}x{steps}, {rounds} rounds")
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    axis = np.linspace(-1.0, 1.0, steps)
    loss = BatchLoss([(X, y)], F.cross_entropy)
    theta0 = [p.detach().clone() for p in model.parameters()]

    def ours():
        d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
        r = grid_2d(model, loss, d1, d2, axis, axis, batch_points=batch_points)
        assert r.meta["path"] == "vmap", r.meta
        return r

    def ours_seq():
        d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
        return grid_2d(model, loss, d1, d2, axis, axis, batch_points=1)

    paths = []

    def ours_auto():
        d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
        r = grid_2d(model, loss, d1, d2, axis, axis, batch_points="auto")
        paths.append(r.meta["path"])
        return r

    ll_out = {}

    def theirs():
        torch.manual_seed(0)
        metric = Loss(F.cross_entropy, X, y)
        ll_out["z"] = loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter",
                                            deepcopy_model=True)
        return ll_out["z"]

    fns = {"gradsight_auto": ours_auto, "gradsight_vmap": ours, "gradsight_sequential": ours_seq,
           "loss_landscapes": theirs}
    times = {k: [] for k in fns}
    order = list(fns)
    ours()  # warm-up (vmap tracing caches, allocator)
    theirs()
    for i in range(rounds):
        for k in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    arr = ours().to_array()
    assert arr.shape == (steps, steps) and np.isfinite(arr).all()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta0)), "model not restored"
    n = steps * steps
    speed = lambda k: statistics.median(b / a for a, b in zip(times[k], times["loss_landscapes"]))  # noqa: E731
    return {"grid": [steps, steps], "points": n, "rounds": rounds, "batch_points": batch_points,
            "points_per_s": {k: n / statistics.median(v) for k, v in times.items()},
            "auto_paths": paths,
            "speedup_auto_over_loss_landscapes_median": speed("gradsight_auto"),
            "speedup_vmap_over_loss_landscapes_median": speed("gradsight_vmap"),
            "speedup_sequential_over_loss_landscapes_median": speed("gradsight_sequential"),
            "center_loss_gradsight": float(arr[steps // 2, steps // 2]), "loss_landscapes_shape": list(ll_out["z"].shape),
            "center_loss_loss_landscapes": float(ll_out["z"][steps // 2, steps // 2])}


# ----------------------------------------------------------------------------------------------------------
# report


def verdict(ok) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def table(res) -> list[tuple[str, str, str, str]]:
    t, tr, dm, ls = res["top_eigenvalue"], res["trace"], res["density_memory"], res["landscape"]
    rows = []
    d = t["rel_diff_gradsight_vs_pyhessian_median"]
    rows.append(("1 lambda_max rel. diff gradsight vs PyHessian (median)", "<= 1e-2", f"{d:.2e}", verdict(d <= 1e-2)))
    r = t["hvp_ratio_lanczos_over_pyhessian_median"]
    rows.append(("2 HVPs to rtol 1e-3, Lanczos / PyHessian (median)", "<= 0.5",
                 f"{r:.2f} ({t['oracle_hvps_lanczos_median']} vs {t['oracle_hvps_pyhessian_median']})"
                 if r is not None else "n/a", verdict(None if r is None else r <= 0.5)))
    q = tr["rmse_ratio_hutchpp_over_hutchinson"]
    rows.append((f"3 trace RMSE Hutch++ / Hutchinson ({tr['budget']} HVPs, {tr['n_seeds']} seeds)", "<= 0.7",
                 f"{q:.2f} ({tr['rmse_hutchpp']:.3g} vs {tr['rmse_hutchinson']:.3g})", verdict(q <= 0.7)))
    b, ph = dm.get("bounded", {}), dm.get("pyhessian", {})
    if "stored_vectors" in b and "stored_vectors" in ph:
        rows.append(("4 density stored vectors, SLQ bounded vs PyHessian", f"<= {dm['max_vectors']}",
                     f"{b['stored_vectors']} vs {ph['stored_vectors']} (RSS over 1 HVP +{b.get('over_one_hvp_mb', 0):.0f}"
                     f" vs +{ph.get('over_one_hvp_mb', 0):.0f} MB)", verdict(b["stored_vectors"] <= dm["max_vectors"])))
    c = res.get("cnn_top_eigenvalue")
    if c:
        d = c["rel_diff_gradsight_vs_pyhessian_median"]
        rows.append(("1c CNN: lambda_max rel. diff gradsight vs PyHessian (median)", "<= 1e-2",
                     f"{d:.2e} (PyHessian worst seed {c['rel_err_pyhessian_max']:.1e})", verdict(d <= 1e-2)))
        r = c["hvp_ratio_lanczos_over_pyhessian_median"]
        rows.append(("2c CNN: HVPs to rtol 1e-3, Lanczos / PyHessian (median)", "<= 0.5",
                     f"{r:.2f} ({c['oracle_hvps_lanczos_median']} vs {c['oracle_hvps_pyhessian_median']})"
                     if r is not None else "n/a", verdict(None if r is None else r <= 0.5)))
    for key, label in (("landscape", "5 MLP"), ("landscape_128", "5b MLP, 128 training rows"),
                       ("cnn_landscape", "5c CNN")):
        ls = res.get(key)
        if not ls:
            continue
        s = ls["speedup_auto_over_loss_landscapes_median"]
        pps = ls["points_per_s"]
        chosen = max(set(ls["auto_paths"]), key=ls["auto_paths"].count)
        rows.append((f"{label}: grid points/s gradsight (auto: {chosen}) / loss-landscapes ({ls['grid'][0]}x"
                     f"{ls['grid'][1]})", ">= 3", f"{s:.2f}x ({pps['gradsight_auto']:.0f} vs "
                     f"{pps['loss_landscapes']:.0f} pts/s; vmap {pps['gradsight_vmap']:.0f}, sequential "
                     f"{pps['gradsight_sequential']:.0f})", verdict(s >= 3)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer seeds and rounds (smoke run)")
    p.add_argument("--out", default=str(HERE / "results_curvature.json"))
    p.add_argument("--_density-child", dest="density_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--max-vectors", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.density_child:
        density_child(args.density_child, args.hidden, args.steps, args.max_vectors)
        return 0

    torch.set_num_threads(1)  # shared 2-core machine; both sides of every comparison run alike
    t_start = time.perf_counter()
    quick = args.quick
    log("training the digits MLP (hidden 32)")
    model, (X, y), _, acc = train_digits_mlp(hidden=32, epochs=10, seed=0)
    H = HessianOperator(model, "cross_entropy", [(X, y)])
    log(f"dense Hessian, dim {H.dim}")
    D = H.dense()
    ev = torch.linalg.eigvalsh(D)
    lam_exact, tr_exact = float(ev[-1]), float(torch.diagonal(D).sum())
    del D
    res = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                    "cpus": __import__("os").cpu_count()},
        "versions": {m: __import__("importlib.metadata", fromlist=["version"]).version(m)
                     for m in ("pyhessian", "loss-landscapes", "scikit-learn")},
        "model": {"arch": "MLP 64-32-32-10 ReLU, float64", "dim": H.dim, "n_train": len(y), "test_accuracy": acc,
                  "lambda_max": lam_exact, "lambda_2": float(ev[-2]), "trace": tr_exact},
    }
    seeds = list(range(3 if quick else 7))
    res["top_eigenvalue"] = case_top_eigenvalue(model, X, y, H, lam_exact, seeds)
    res["trace"] = case_trace(model, X, y, H, tr_exact, list(range(10 if quick else 40)), budget=99,
                              ph_seeds=list(range(3 if quick else 5)))
    res["density_memory"] = case_density_memory(hidden=256, steps=100, max_vectors=10)
    res["landscape"] = case_landscape(model, X, y, steps=21, rounds=3 if quick else 7, batch_points=64)
    res["landscape_128"] = case_landscape(model, X[:128], y[:128], steps=21, rounds=3 if quick else 7,
                                          batch_points=64)
    log("training the digits CNN")
    cnn, (Xc, yc), acc_c = train_digits_cnn()
    Hc = HessianOperator(cnn, "cross_entropy", [(Xc, yc)])
    ref = lanczos(Hc, k=1, tol=1e-12, seed=123)
    res["cnn"] = {"arch": "CNN conv(1,8,3,p1)-ReLU-conv(8,16,3,s2,p1)-ReLU-linear(256,10), float64",
                  "dim": Hc.dim, "test_accuracy": acc_c, "lambda_max": float(ref.eigenvalues[0]),
                  "lambda_max_residual": float(ref.residuals[0]), "reference": "Lanczos, relative residual <= 1e-12"}
    res["cnn_top_eigenvalue"] = case_top_eigenvalue(cnn, Xc, yc, Hc, float(ref.eigenvalues[0]), seeds)
    res["cnn_landscape"] = case_landscape(cnn, Xc, yc, steps=21, rounds=3 if quick else 7, batch_points=64)
    res["seconds"] = time.perf_counter() - t_start
    rows = table(res)
    res["table"] = [dict(zip(("case", "goal", "measured", "verdict"), r)) for r in rows]
    Path(args.out).write_text(json.dumps(res, indent=2, default=float) + "\n", encoding="utf-8")
    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'goal':<8}  {'measured':<44}  verdict")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<8}  {r[2]:<44}  {r[3]}")
    print(f"results: {args.out}  ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
