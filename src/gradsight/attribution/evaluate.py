"""LDS evaluation front: grade gradsight's attribution methods on the digits retraining ground truth.

    rep = evaluate_lds("mlp", ["ekfac", "trak"], m=100, runs=3, cache="~/.cache/gradsight/lds", out="runs/lds")
    rep.lds          # DataFrame: one row per (method, target) with LDS, se, 95% CI, seconds
    rep.ceiling      # run-vs-run noise ceiling per target

What happens (the protocol of `attribution.digits` and `attribution.lds`, act.md §A.3):

1. Ground truth: m subsets of half the 1000 training digits, R trainings each (cached, resumable), targets
   margin and neg_loss (R, m, 500).
2. Models: the full-data model(s) with the SAME recipe (`digits.train`). A method asks for `models` independently
   trained members (member 0 seed `seed`, member k >= 1 seed `ensemble_seed + k`) and `checkpoints` points along
   each member's run ([(state, lr)], the last is the final model). TracIn = 1 model x 5 checkpoints; TRAK-10 =
   10 models x 1 checkpoint (lr weights are ignored by TRAK and by the influence methods, which average).
3. Scores (N_train, N_test), positive = helpful, from `attribution.attribute` (timed alone: `seconds`; the extra
   members' training is `extra_train_seconds`, the base model's training is charged to nobody).
4. LDS of the scores against the R-run mean of each target, its standard error over test points and the normal
   95% CI (`lds.LDSResult`); the single-run noise ceiling (`lds.noise_ceiling`; the R-run mean target is less
   noisy, so a method can exceed it).
5. kind="lr" (convex): leave-one-out check on `loo` = (n_removed, n_test) points: Pearson / Spearman over removed
   examples of the predicted change score/N against the exact retrained change (`digits.loo_ground_truth`).

A run directory (`out`) holds lds.parquet, loo.parquet, ceiling.parquet, manifest.json (the configuration, its
hash and versions), log.txt and report.html; all writes are atomic. A non-empty directory holding another
configuration is refused (RunMismatchError naming the differing keys); the same configuration is recomputed
(ground truth from the cache) and overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import digits as D
from .api import FISHER, attribute
from .features import FeatureSpec
from .methods import METHODS

__all__ = ["MethodSpec", "PRESETS", "LDSReport", "Models", "evaluate_lds", "resolve_methods", "score_method", "TARGETS"]

TARGETS = ("margin", "neg_loss")
_FORMAT = 1  # bump when the tables' meaning changes (part of the run identity)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class MethodSpec:
    """One gradsight attribution configuration to grade.

    Attributes:
        method: grad_dot, grad_cos, tracin, raw, kfac, ekfac or trak (`attribution.methods`).
        label: the name in tables (default: derived from the options, e.g. "ekfac-ggn-d0.001").
        damping, damping_mode: lambda (None: the method's default) and "relative" (x mean eigenvalue) or
            "absolute" (`attribution.curvature`).
        fisher: the curvature's gradients for raw / kfac / ekfac: "empirical", "sampled" or "ggn".
        r_in, r_out: Kronecker projection sizes per layer side; None = full parameter space (exact).
        models: independently trained full-data members (ensembles: TRAK-M, EK-FAC over seeds).
        checkpoints: points along each member's training run, with their learning rate (TracIn).
        trak_dim: TRAK's whole-model feature size (exact when the model has at most this many parameters).
        dtype: feature dtype, "float32" or "float64".
    """

    method: str
    label: str = ""
    damping: float | None = None
    damping_mode: str = "relative"
    fisher: str = "empirical"
    r_in: int | None = None
    r_out: int | None = None
    models: int = 1
    checkpoints: int = 1
    trak_dim: int = 2048
    dtype: str = "float32"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fisher not in FISHER:
            raise ValueError(f"fisher must be one of {', '.join(FISHER)}, got {self.fisher!r}")
        if self.damping_mode not in ("relative", "absolute"):
            raise ValueError(f"damping_mode must be 'relative' or 'absolute', got {self.damping_mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("models", "checkpoints", "trak_dim"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.label:
            object.__setattr__(self, "label", self._default_label())

    def _default_label(self) -> str:
        parts = [self.method + (f"-{self.models}" if self.models > 1 else "")]
        if self.checkpoints > 1:
            parts.append(f"{self.checkpoints}ckpt")
        if self.method in ("raw", "kfac", "ekfac") and self.fisher != "empirical":
            parts.append(self.fisher)
        if self.damping is not None:
            parts.append(f"d{self.damping:g}" + ("abs" if self.damping_mode == "absolute" else ""))
        if self.r_in is not None or self.r_out is not None:
            parts.append(f"{self.r_out}x{self.r_in}")
        if self.method == "trak" and self.trak_dim != 2048:
            parts.append(f"k{self.trak_dim}")
        if self.dtype != "float32":
            parts.append("f64")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown MethodSpec field(s) {bad}; expected some of {sorted(known)}")
        return cls(**d)


# Short names (CLI `--methods`, benchmark). Full parameter space everywhere (the digits models are small); the
# dampings are the sweep's (benchmarks/ATTRIBUTION.md). "trak*" are TRAK as published: lambda = 0 (pseudo-inverse;
# the Scorer's own default is 1 relative, the best in the sweep) at k = 512 (dattri's default; traker's 2048
# exceeds N = 1000 here, costs ~8x more and grades lower); TRAK-10 then equals traker's and dattri's TRAK-10 LDS
# within 0.001.
PRESETS: dict[str, MethodSpec] = {
    "grad_dot": MethodSpec("grad_dot", "Grad-Dot"),
    "grad_cos": MethodSpec("grad_cos", "Grad-Cos"),
    "tracin": MethodSpec("tracin", "TracIn-5", checkpoints=5),
    "raw": MethodSpec("raw", "IF raw (full, ggn)", fisher="ggn", damping=1.0),
    "kfac": MethodSpec("kfac", "K-FAC (full)", damping=0.3),
    "ekfac": MethodSpec("ekfac", "EK-FAC (full, ggn)", fisher="ggn", damping=0.3),
    "trak1": MethodSpec("trak", "TRAK-1", damping=0.0, trak_dim=512),
    "trak": MethodSpec("trak", "TRAK-10", models=10, damping=0.0, trak_dim=512),
    "trak50": MethodSpec("trak", "TRAK-50", models=50, damping=0.0, trak_dim=512),
    "trak_tuned": MethodSpec("trak", "TRAK-10 (k 512, d 1)", models=10, trak_dim=512, damping=1.0),
    "raw3": MethodSpec("raw", "IF raw-3 ens (full, ggn)", fisher="ggn", damping=1.0, models=3),
    "raw5": MethodSpec("raw", "IF raw-5 ens (full, ggn)", fisher="ggn", damping=1.0, models=5),
    "kfac5": MethodSpec("kfac", "K-FAC-5 ens (full)", damping=0.1, models=5),
    "kfac10": MethodSpec("kfac", "K-FAC-10 ens (full)", damping=0.1, models=10),
    "ekfac5": MethodSpec("ekfac", "EK-FAC-5 ens (full, ggn)", fisher="ggn", damping=0.1, models=5),
}


def resolve_methods(methods: str | Sequence) -> list[MethodSpec]:
    """MethodSpecs from preset names (a comma-separated string or a list), dicts or MethodSpecs.

    Raises:
        ValueError: an unknown preset name (the message lists them), an empty list, or duplicate labels.
    """
    items = [s.strip() for s in methods.split(",") if s.strip()] if isinstance(methods, str) else list(methods)
    out = []
    for it in items:
        if isinstance(it, MethodSpec):
            out.append(it)
        elif isinstance(it, dict):
            out.append(MethodSpec.from_dict(it))
        elif isinstance(it, str) and it in PRESETS:
            out.append(PRESETS[it])
        else:
            raise ValueError(f"unknown method {it!r}; presets: {', '.join(PRESETS)} (or pass a MethodSpec)")
    if not out:
        raise ValueError("methods is empty: name at least one method")
    labels = [s.label for s in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate method labels {dup}; give each MethodSpec its own label")
    return out


@dataclass
class LDSReport:
    """The graded methods of one evaluation.

    Attributes:
        lds: one row per (method label, target): method, label, target, lds, se, ci_lo, ci_hi, n_valid,
            seconds (attribution wall time), extra_train_seconds (ensemble members), options (json).
        ceiling: target, ceiling (single-run, `lds.noise_ceiling`), runs, m.
        loo: kind="lr" only (else None): method, label, pearson, spearman, n_removed, n_test.
        scores: {label: (N_train, N_test) float64}.
        info: configuration, its hash, ground-truth meta, each method's scorer info (damping actually used, per
            layer and checkpoint) and the total seconds.
        truth: the ground truth the methods were graded against (grade other scores with ``truth.lds``).
    """

    lds: pd.DataFrame
    ceiling: pd.DataFrame
    loo: pd.DataFrame | None = None
    scores: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    truth: D.GroundTruth | None = None

    def best(self, target: str = "margin") -> pd.Series:
        """The row with the highest LDS for `target`."""
        t = self.lds[self.lds["target"] == target]
        if t.empty:
            raise ValueError(f"no rows for target {target!r}; targets: {sorted(self.lds['target'].unique())}")
        return t.loc[t["lds"].idxmax()]

    def text(self) -> str:
        """A plain-text table: one line per method, LDS (margin, neg_loss) with 95% CI and seconds."""
        lines = [f"{'method':<28} {'LDS margin [95% CI]':>26} {'LDS -loss':>9} {'seconds':>8} {'+train s':>8}"]
        for label, g in self.lds.groupby("label", sort=False):
            r = g.set_index("target")
            m, nl = r.loc["margin"], r.loc["neg_loss"]
            lines.append(f"{label:<28} {m.lds:>8.3f} [{m.ci_lo:6.3f}, {m.ci_hi:6.3f}]  {nl.lds:>9.3f} "
                         f"{m.seconds:>8.2f} {m.extra_train_seconds:>8.2f}")
        lines.append("noise ceiling (single run): " + ", ".join(
            f"{r.target} {r.ceiling:.3f}" for r in self.ceiling.itertuples()))
        return "\n".join(lines)


class Models:
    """Full-data models trained once per (seed, checkpoints) and reused by every method of an evaluation.

    Args:
        task, kind: the data and "lr" / "mlp".
        seed: member 0's seed (the model every method gets).
        ensemble_seed: member k >= 1 is trained with seed ensemble_seed + k.
    """

    def __init__(self, task: D.DigitsTask, kind: str, seed: int, ensemble_seed: int):
        self.task, self.kind, self.seed, self.ensemble_seed = task, kind, seed, ensemble_seed
        self._cache: dict[tuple[int, int], D.TrainResult] = {}

    def member_seed(self, k: int) -> int:
        return self.seed if k == 0 else self.ensemble_seed + k

    def get(self, k: int, checkpoints: int) -> D.TrainResult:
        """Member k trained with `checkpoints` checkpoints (info["seconds"]: its training time)."""
        key = (self.member_seed(k), checkpoints)
        if key not in self._cache:
            self._cache[key] = D.train(self.task, self.kind, seed=key[0], checkpoints=checkpoints)
        return self._cache[key]


def score_method(spec: MethodSpec, models: Models, task: D.DigitsTask, seed: int = 0) -> tuple:
    """Scores of one method on the task's train x test split.

    Returns:
        (scores (N_train, N_test) float64 positive = helpful, attribution wall seconds, extra training seconds,
        the scorer's info).

    The extra training is the members k >= 1 (their recorded training time, also when an earlier method of the
    same evaluation trained them); member 0 is the model every method gets, and checkpoints along a run are
    free (saved during the same run).
    """
    members = [models.get(k, spec.checkpoints) for k in range(spec.models)]
    extra = sum(float(r.info["seconds"]) for r in members[1:])
    ckpts = [c for r in members for c in r.checkpoints]  # [(state_dict, lr)], member by member
    feat = FeatureSpec(r_in=spec.r_in, r_out=spec.r_out, seed=seed)
    t0 = time.perf_counter()
    S, info = attribute(members[0].model, "cross_entropy", (task.X_train, task.y_train),
                        (task.X_test, task.y_test), method=spec.method, checkpoints=ckpts, spec=feat,
                        damping=spec.damping, damping_mode=spec.damping_mode, fisher=spec.fisher,
                        trak_dim=spec.trak_dim, dtype=_DTYPES[spec.dtype], seed=seed,
                        batch_size=len(task.y_train))
    return np.asarray(S, dtype=np.float64), time.perf_counter() - t0, extra, info


def _loo_truth(task: D.DigitsTask, n_removed: int, n_test: int, seed: int, cache: Path | None) -> tuple:
    """(removed train idx, test idx, deltas (n_removed, n_test)) of the convex LR, cached like the ground truth."""
    rng = np.random.default_rng(seed)
    removed = np.sort(rng.choice(len(task.y_train), n_removed, replace=False))
    test = np.sort(rng.choice(len(task.y_test), n_test, replace=False))
    meta = {"what": "loo", "task": task.fingerprint, "removed": removed.tolist(), "test": test.tolist(),
            "seed": int(seed), "recipe": asdict(D.Recipe()), "format": _FORMAT}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache is None else cache / f"loo-{key}.safetensors"
    got = None if path is None else _read_cached(path, meta)
    if got is not None:
        return removed, test, got
    delta = D.loo_ground_truth(task, test, removed, seed=seed)
    if path is not None:
        from ..runs.store import write_safetensors

        write_safetensors({"delta": torch.from_numpy(delta)}, path, metadata={"meta": json.dumps(meta, sort_keys=True)})
    return removed, test, delta


def _read_cached(path: Path, meta: dict) -> np.ndarray | None:
    """The cached LOO deltas if `path` holds them for exactly `meta`; None otherwise (a foreign or truncated file
    is recomputed, never trusted)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            if json.loads((f.metadata() or {}).get("meta", "{}")) != json.loads(json.dumps(meta, sort_keys=True)):
                return None
            return f.get_tensor("delta")
    except (OSError, ValueError, SafetensorError):
        return None


def _config(task, kind, specs, m, alpha, runs, seed, ensemble_seed, loo) -> dict:
    return {"analysis": "lds", "format": _FORMAT, "kind": kind, "m": int(m), "alpha": float(alpha),
            "runs": int(runs), "seed": int(seed), "ensemble_seed": int(ensemble_seed),
            "loo": list(loo) if (loo and kind == "lr") else None, "task": task.fingerprint,
            "n_train": len(task.y_train), "n_test": len(task.y_test), "recipe": asdict(D.Recipe()),
            "methods": [s.to_dict() for s in specs]}


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (in the directory) vs {b!r} (now)"]


def _by_label(config: dict) -> dict:
    """The configuration with its method list keyed by label, so that a difference names the method (or, when
    the labels differ, lists them) instead of printing two long lists."""
    specs = config.get("methods") or []
    if not isinstance(specs, list) or not all(isinstance(x, dict) and "label" in x for x in specs):
        return config
    return {**config, "methods": {x["label"]: {k: v for k, v in x.items() if k != "label"} for x in specs},
            "method labels": [x["label"] for x in specs]}


def _open_out(out: Path, config: dict, chash: str) -> None:
    """Refuse an out directory holding another configuration (or foreign files); create it otherwise."""
    from ..runs.store import RunMismatchError, check_run_dir

    check_run_dir(out)
    mpath = out / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except ValueError as e:
            raise RunMismatchError(f"{mpath} is not valid JSON ({e}); use another --out") from None
        if old.get("config_hash") != chash:
            diffs = _diff(_by_label(old.get("config", {})), _by_label(json.loads(json.dumps(config))))
            if any(d.startswith("method labels") for d in diffs):  # the label lists say it; skip per-label dumps
                diffs = [d for d in diffs if not d.startswith("methods.")]
            raise RunMismatchError(f"{out} holds an LDS evaluation with a different configuration; refusing to mix "
                                   f"results: " + "; ".join(diffs[:8] or ["(unreadable configuration)"]) +
                                   ". Use another --out directory, or delete this one.")
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise RunMismatchError(f"{out} exists, is not empty and has no manifest.json; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)


def evaluate_lds(kind: str = "mlp", methods: str | Sequence = ("ekfac", "trak"), m: int = 100, runs: int = 3,
                 seed: int = 0, cache: str | Path | None = None, out: str | Path | None = None,
                 progress: Callable[[str], None] | None = None, *, alpha: float = 0.5, ensemble_seed: int = 1000,
                 loo: tuple[int, int] | None = (50, 50), task: D.DigitsTask | None = None,
                 bar: bool = False) -> LDSReport:
    """Grade attribution methods by LDS on the digits task (module docstring).

    Args:
        kind: "mlp" or "lr".
        methods: preset names (`PRESETS`; a comma-separated string or list), MethodSpecs or their dicts.
        m, runs, alpha: ground truth: m subsets of floor(alpha N) examples, `runs` trainings each (runs >= 2 for
            the noise ceiling).
        seed: subsets, the base full-data model's seed, projection seeds and the LOO draw.
        cache: ground-truth cache directory (`digits.ground_truth`); None = recompute (and no LOO cache).
        out: run directory to write (None: nothing written).
        progress: called with one line per stage (e.g. ``print``); the lines also go to out/log.txt.
        ensemble_seed: member k >= 1 of an ensemble is trained with seed ensemble_seed + k.
        loo: (n_removed, n_test) of the leave-one-out check on kind="lr" (None: skip).
        task: the data (default `digits.load_task()`, the 1000 / 500 split).
        bar: draw a terminal progress bar with ETA while the ground truth trains.

    Returns:
        LDSReport.
    """
    from ..runs.progress import Progress, RunLog

    if kind not in D.KINDS:
        raise ValueError(f"kind must be one of {D.KINDS}, got {kind!r}")
    if int(runs) != runs or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    if loo is not None and (len(loo) != 2 or min(loo) < 3):
        raise ValueError(f"loo must be None or (n_removed >= 3, n_test >= 3), got {loo!r}")
    specs = resolve_methods(methods)
    task = task or D.load_task()
    config = _config(task, kind, specs, m, alpha, runs, seed, ensemble_seed, loo)
    chash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out).expanduser() if out is not None else None
    if out is not None:
        _open_out(out, config, chash)
    log = RunLog(out / "log.txt" if out is not None else None, echo=progress)
    cache_dir = Path(cache).expanduser() if cache is not None else None
    t_start = time.perf_counter()

    log.write(f"lds: {kind}, {len(specs)} method(s), ground truth m={m} x runs={runs}"
              + (f" (cache {cache_dir})" if cache_dir else ""))
    with contextlib.ExitStack() as stack:  # the bar opens at the first training (nothing to show when cached)
        bars: list = []

        def tick(done: int, total: int) -> None:
            if not bars:
                bars.append(stack.enter_context(Progress(f"lds ground truth ({kind})", total, noun="trainings",
                                                         bar=bar, log=log)))
            bars[0].advance(done - bars[0].n)
        gt = D.ground_truth(task, kind, m=m, alpha=alpha, runs=runs, seed=seed, cache=cache_dir, progress=tick)
    log.write(f"ground truth: {gt.n_trained} trainings now, {m * runs - gt.n_trained} from the cache")
    ceiling = pd.DataFrame([{"target": t, "ceiling": gt.ceiling(t) if runs >= 2 else float("nan"),
                             "runs": int(runs), "m": int(m)} for t in TARGETS])
    loo_truth = None
    if kind == "lr" and loo is not None:
        loo_truth = _loo_truth(task, loo[0], loo[1], seed, cache_dir)
        log.write(f"leave-one-out truth: {loo[0]} removed x {loo[1]} test points")

    models = Models(task, kind, seed, ensemble_seed)
    rows, loo_rows, scores, method_info = [], [], {}, {}
    for spec in specs:
        S, secs, extra, method_info[spec.label] = score_method(spec, models, task, seed)
        scores[spec.label] = S
        opts = json.dumps({k: v for k, v in spec.to_dict().items() if k != "label"}, sort_keys=True)
        for t in TARGETS:
            res = gt.lds(S, t)
            lo, hi = res.ci(0.95) if res.n_valid >= 2 else (float("nan"), float("nan"))
            rows.append({"method": spec.method, "label": spec.label, "target": t, "lds": res.mean, "se": res.se,
                         "ci_lo": lo, "ci_hi": hi, "n_valid": res.n_valid, "seconds": secs,
                         "extra_train_seconds": extra, "options": opts})
        msg = f"{spec.label}: LDS margin {rows[-2]['lds']:.3f} +- {rows[-2]['se']:.3f}, {secs:.2f} s"
        if loo_truth is not None:
            removed, test, delta = loo_truth
            from .lds import loo_correlation

            r = loo_correlation(S[np.ix_(removed, test)] / S.shape[0], delta)
            loo_rows.append({"method": spec.method, "label": spec.label, "pearson": r.pearson,
                             "spearman": r.spearman, "n_removed": len(removed), "n_test": len(test)})
            msg += f", LOO pearson {r.pearson:.3f}"
        log.write(msg)
    lds_df = pd.DataFrame(rows)
    loo_df = pd.DataFrame(loo_rows) if loo_truth is not None else None
    info = {"config": config, "config_hash": chash, "ground_truth": dict(gt.meta), "methods": method_info,
            "seconds": time.perf_counter() - t_start}
    report = LDSReport(lds_df, ceiling, loo_df, scores, info, gt)
    if out is not None:
        _write_out(out, report)
        log.write(f"written: {out / 'report.html'}")
    return report


def _write_out(out: Path, rep: LDSReport) -> None:
    from ..runs.store import atomic_write_text, versions, write_parquet

    write_parquet(rep.lds, out / "lds.parquet")
    write_parquet(rep.ceiling, out / "ceiling.parquet")
    if rep.loo is not None:
        write_parquet(rep.loo, out / "loo.parquet")
    cfg = rep.info["config"]
    best = rep.best("margin")
    manifest = {"analysis": "lds", "config_hash": rep.info["config_hash"], "config": cfg,
                "model": {"id": f"digits-{cfg['kind']}"},
                "data": {"path": f"sklearn load_digits, {cfg['n_train']} train / {cfg['n_test']} test",
                         "sha256": cfg["task"]},
                "seed": cfg["seed"], "versions": versions(), "ground_truth": rep.info["ground_truth"],
                "method_info": rep.info.get("methods", {}),
                "seconds": rep.info["seconds"], "best": {"label": best["label"], "lds_margin": float(best["lds"])},
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    _render(out, rep)


def _lds_figure(rep: LDSReport) -> dict:
    """Bars of LDS per method with 95% CI whiskers, one panel per target; dashed line = single-run ceiling."""
    from ..report import kit

    sp = kit.Subplots([f"LDS ({t})" for t in TARGETS], max_cols=2)
    traces, shapes = [], []
    for i, t in enumerate(TARGETS):
        d = rep.lds[rep.lds["target"] == t]
        traces.append({"type": "bar", "x": [kit.ptext(x) for x in d["label"]], "y": kit.floats(d["lds"]),
                       "error_y": {"type": "data", "symmetric": False, "array": kit.floats(d["ci_hi"] - d["lds"]),
                                   "arrayminus": kit.floats(d["lds"] - d["ci_lo"])},
                       "marker": {"color": kit.PALETTE[i]}, "name": t, "showlegend": False,
                       "customdata": kit.floats(d["seconds"]),
                       "hovertemplate": "%{x}<br>LDS %{y:.3f}<br>%{customdata:.2f} s<extra></extra>",
                       **sp.refs(i)})
        c = rep.ceiling.set_index("target").loc[t, "ceiling"]
        if np.isfinite(c):
            r = sp.refs(i)
            shapes.append({"type": "line", "xref": f"{r['xaxis']} domain", "yref": r["yaxis"], "x0": 0, "x1": 1,
                           "y0": float(c), "y1": float(c), "line": {"dash": "dash", "color": "#555", "width": 1}})
    return kit.figure(traces, sp, height=460, shapes=shapes, margin={"l": 60, "r": 20, "t": 50, "b": 140})


def _render(out: Path, rep: LDSReport) -> Path:
    """out/report.html: findings, the LDS figure and the tables (`report.kit.render_tables_page`)."""
    from ..report import kit

    b, cfg = rep.best("margin"), rep.info["config"]
    findings = [{"title": f"Best LDS (margin): {b['label']} {b['lds']:.3f} "
                          f"[{b['ci_lo']:.3f}, {b['ci_hi']:.3f}] in {b['seconds']:.2f} s",
                 "lines": [f"Noise ceiling (run vs run, single run): "
                           + ", ".join(f"{r.target} {r.ceiling:.3f}" for r in rep.ceiling.itertuples()),
                           f"Ground truth: {cfg['m']} subsets x {cfg['runs']} runs, alpha {cfg['alpha']}; targets "
                           "averaged over the runs. CI: normal, over test points (they share the retrained "
                           "models, so it understates the uncertainty)."]}]
    tables = [kit.table_section("LDS", rep.lds.drop(columns=["options"]), file="lds.parquet",
                                caption="positive scores = helpful; LDS = mean over test points of the Spearman "
                                        "correlation over subsets of summed scores vs the retrained target"),
              kit.table_section("Noise ceiling", rep.ceiling, file="ceiling.parquet")]
    if rep.loo is not None:
        tables.append(kit.table_section("Leave-one-out (LR)", rep.loo, file="loo.parquet",
                                        caption="correlation over removed examples of score/N vs the exact "
                                                "retrained change of the test CE, mean over test points"))
    return kit.render_tables_page(out, analysis="lds", title=f"gradsight LDS evaluation: digits {cfg['kind']}",
                                  findings=findings, tables=tables, figures=[("LDS per method", _lds_figure(rep))])
