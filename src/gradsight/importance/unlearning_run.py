"""`gradsight unlearn`: SalUn against Retrain, fine-tuning and unmasked random labelling on digits, as a run.

    run_unlearning(out, forget="random10", seeds=(0, 1, 2))

For every seed, `unlearn.digits_unlearning` trains the original MLP and the Retrain gold standard (retrained from
scratch without the forget set), then unlearns with each method from a copy of the original. The run directory
holds unlearning.parquet (one row per seed and method: UA, RA, TA, FA, MIA in percent, seconds, gap to Retrain),
summary.parquet (mean and standard deviation over seeds), manifest.json, log.txt and report.html; a directory
holding another configuration is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

__all__ = ["run_unlearning", "METRICS"]

METRICS = ("UA", "RA", "TA", "FA", "MIA", "gap")
ORDER = ("original", "retrain", "finetune", "random_label", "salun")


def _open_out(out: Path, config: dict, chash: str) -> None:
    from ..runs.store import RunMismatchError, check_run_dir

    check_run_dir(out)
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old.get("config_hash") != chash:
            diffs = [f"{k}: {old.get('config', {}).get(k)!r} there, {v!r} here" for k, v in config.items()
                     if old.get("config", {}).get(k) != v]
            raise RunMismatchError(f"{out} holds an unlearning run with another configuration ({'; '.join(diffs)}); "
                                   "use another --out")
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise RunMismatchError(f"{out} exists, is not empty and has no manifest.json; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)


def run_unlearning(out: str | Path, forget: str = "random10", seeds: Sequence[int] = (0, 1, 2), *,
                   fraction: float = 0.5, hidden: int = 32, progress: Callable[[str], None] | None = print
                   ) -> pd.DataFrame:
    """SalUn and its baselines on digits for each seed; writes the run directory `out` (module docstring).

    A rerun into the same directory reuses the seeds already done (unlearning.parquet) and computes the rest.

    Returns:
        the per-seed table (method, seed, UA, RA, TA, FA, MIA, seconds, gap).
    """
    from ..report import kit
    from ..runs.progress import RunLog, format_duration
    from ..runs.store import atomic_write_text, versions, write_parquet
    from .unlearn import DIGITS_DEFAULTS, digits_unlearning

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not seeds:
        raise ValueError("give at least one seed")
    out = Path(out)
    config = {"forget": forget, "seeds": [int(s) for s in seeds], "fraction": float(fraction), "hidden": int(hidden)}
    chash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    _open_out(out, config, chash)
    log = RunLog(out / "log.txt", echo=progress)
    path = out / "unlearning.parquet"
    done = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    parts = [done] if len(done) else []
    t0 = time.perf_counter()
    todo = [s for s in config["seeds"] if not len(done) or s not in set(done["seed"])]
    for i, seed in enumerate(todo):
        df = digits_unlearning(forget, seed, hidden=hidden, settings={"fraction": fraction})
        df = df.rename_axis("method").reset_index()
        df.insert(1, "seed", seed)
        parts.append(df)
        write_parquet(pd.concat(parts, ignore_index=True), path)  # one commit per seed: a rerun resumes
        eta = (time.perf_counter() - t0) / (i + 1) * (len(todo) - i - 1)
        s = df.set_index("method")
        log.write(f"unlearn: seed {seed} ({i + 1}/{len(todo)}): SalUn forget acc {s.loc['salun', 'FA']:.1f}% vs "
                  f"Retrain {s.loc['retrain', 'FA']:.1f}%, retain {s.loc['salun', 'RA']:.1f}% vs "
                  f"{s.loc['retrain', 'RA']:.1f}%; ETA {format_duration(eta)}")
    table = pd.concat(parts, ignore_index=True)
    table = table[table["seed"].isin(config["seeds"])]
    summary = _summary(table)
    write_parquet(summary, out / "summary.parquet")
    kind = "class" if forget.startswith("class:") else "random10"
    manifest = {"analysis": "unlearn", "config_hash": chash, "config": config,
                "model": {"id": f"digits MLP 64-{hidden}-{hidden}-10"},
                "data": {"path": "sklearn load_digits (bundled)", "sha256": ""},
                "settings": {k: v for k, v in DIGITS_DEFAULTS.items() if k not in ("random10", "class")}
                | {m: DIGITS_DEFAULTS[kind][m] for m in ("finetune", "random_label", "salun")},
                "versions": versions(), "finished": True,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, default=str))
    _render(out, table, summary, kit)
    log.write(f"report: {out / 'report.html'}", echo=False)
    return table


def _summary(table: pd.DataFrame) -> pd.DataFrame:
    g = table.groupby("method", sort=False)
    mean, sd = g[list(METRICS)].mean(), g[list(METRICS)].std(ddof=1)
    out = mean.add_suffix("_mean").join(sd.add_suffix("_sd"))
    out.insert(0, "n_seeds", g.size())
    out = out.reindex([m for m in ORDER if m in out.index] + [m for m in out.index if m not in ORDER])
    return out.rename_axis("method").reset_index()


def _render(out: Path, table: pd.DataFrame, summary: pd.DataFrame, kit) -> Path:
    s = summary.set_index("method")
    lines = [f"{m}: forget acc {s.loc[m, 'FA_mean']:.1f}%, retain {s.loc[m, 'RA_mean']:.1f}%, test "
             f"{s.loc[m, 'TA_mean']:.1f}%, MIA {s.loc[m, 'MIA_mean']:.1f}%, gap to Retrain {s.loc[m, 'gap_mean']:.2f}"
             for m in s.index]
    best = s.drop(index=[m for m in ("original", "retrain") if m in s.index])["gap_mean"].idxmin()
    findings = [{"title": f"Closest to Retrain: {best} (mean gap {s.loc[best, 'gap_mean']:.2f} points over "
                          f"{int(s.loc[best, 'n_seeds'])} seed(s))", "lines": lines}]
    sp = kit.Subplots(["UA (1 - forget accuracy)", "RA (retain accuracy)", "TA (test accuracy)", "MIA efficacy"],
                      max_cols=2)
    traces = []
    for i, m in enumerate(("UA", "RA", "TA", "MIA")):
        traces.append({"type": "bar", "x": [kit.ptext(x) for x in s.index], "y": kit.floats(s[f"{m}_mean"]),
                       "error_y": {"type": "data", "array": kit.floats(s[f"{m}_sd"].fillna(0))},
                       "marker": {"color": kit.PALETTE[i]}, "showlegend": False, **sp.refs(i)})
    fig = kit.figure(traces, sp, height=560)
    tables = [kit.table_section("Mean over seeds", summary, file="summary.parquet",
                                caption="percent; gap = mean |metric - Retrain's| over UA, RA, TA, MIA"),
              kit.table_section("Per seed", table, file="unlearning.parquet")]
    return kit.render_tables_page(out, analysis="unlearn", title="gradsight unlearning: SalUn on digits",
                                  findings=findings, tables=tables, figures=[("Unlearning trade-off", fig)])
