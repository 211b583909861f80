"""The engine: runs any registered analysis into a run directory, resumable and distributed.

    run(spec, cfg, out, source)

1. joins the process group when launched by torchrun (and leaves it afterwards, also on error);
2. builds the analysis' `Plan` (its units) from the input adapter's `Source` and opens the run directory
   under the run's identity (analysis, semantic config, model fingerprint, data hash, the analysis' extra
   identity): a directory holding another configuration is refused, naming the differing keys;
3. skips the units already done, by ONE rule for every analysis: a commit writes its tables' shards first and
   the marker table (the spec's last table) last, each atomically; a unit is done iff its key is in a marker
   shard; shards of an unfinished commit (no marker) are removed when the run resumes;
4. shards units by rank (each rank takes every world_size-th unit and writes its own shards), or, for a
   collective analysis, runs every unit on every rank (products all-reduced) with rank 0 writing;
5. computes and commits in batches with one progress bar (terminal) and RUN/log.txt lines (rate, ETA);
6. barrier, the plan's `finish` (every rank), `summarize` (rank 0, or every rank when it all-reduces), marks
   the run finished, renders the report, barrier; returns the analysis' result object.

A rerun of a finished run computes nothing; it refreshes the summaries (which may use new summary options)
and the report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from . import distributed as dist_
from .progress import Progress, RunLog
from .registry import Analysis, Plan, Unit
from .store import Layout, RunStore, check_run_dir, concat_tables, versions
from ..config import config_hash, semantic_dict

__all__ = ["run", "open_store"]


def layout_of(spec: Analysis) -> Layout:
    return Layout(tables=spec.tables, templates=dict(spec.layout), unit_column=spec.unit_column)


def open_store(spec: Analysis, cfg, out: Path, source, plan: Plan, info: dist_.DistInfo) -> tuple[RunStore, dict]:
    """Open (or check) the run directory: rank 0 creates or checks the manifest and removes unfinished
    commits, then the other ranks check it. Returns (store, manifest)."""
    identity = {"analysis": spec.name, "config": semantic_dict(cfg), **source.identity}
    if spec.identity is not None:
        identity.update(spec.identity(cfg, source, plan))
    meta = {"analysis": spec.name, "config": cfg.to_dict(), "config_hash": config_hash(identity),
            **source.meta, "versions": versions(), "seed": getattr(cfg, "seed", None), "world_size": info.world_size}
    if spec.meta is not None:
        meta.update(spec.meta(cfg, source, plan))
    store = RunStore(out, info.rank, info.world_size, layout=layout_of(spec))
    manifest = None
    if info.is_main:
        manifest = store.open(identity, meta)
        store.cleanup()
    dist_.barrier(info)
    if not info.is_main:
        manifest = store.open(identity, meta)
    return store, manifest


def _default_batches(units: list[Unit]):
    for u in units:
        yield [u]


def _merge_into(buf: dict[str, list], tables: dict[str, Any]) -> None:
    for name, value in tables.items():
        if value is None:
            continue
        buf.setdefault(name, []).append(value)


def run(spec: Analysis, cfg, out: str | Path, source_fn: Callable[[Any, dist_.DistInfo], Any], *,
        progress: bool = True, report: bool = True, log: Callable[[str], None] = print) -> Any:
    """Run `spec` with options `cfg` into the run directory `out` (resumed if it holds the same run).

    Args:
        spec: a registered Analysis.
        cfg: its Config.
        out: run directory.
        source_fn: ``source_fn(cfg, info) -> Source``: an input adapter bound to its inputs
            (`inputs.lm.lm_source(...)` or `inputs.module.module_source(...)`).
        progress: progress bar on rank 0 (the log file is always written).
        report: render the report when done.
        log: where messages (resume, warnings) go besides RUN/log.txt.

    Returns:
        the analysis' result object (`spec.open`).
    """
    out = Path(out)
    check_run_dir(out)
    with dist_.session() as info:
        t0 = time.perf_counter()
        if spec.check is not None:
            spec.check(cfg, info)
        source = source_fn(cfg, info)
        if source.kind not in spec.inputs:
            raise ValueError(f"{spec.name} does not run on {source.kind} inputs (it takes: {', '.join(spec.inputs)})")
        plan = spec.setup(cfg, source, info)
        plan.run_dir, plan.info = out, info
        store, manifest = open_store(spec, cfg, out, source, plan, info)
        runlog = RunLog(out / "log.txt" if info.is_main else None, echo=log if info.is_main else None)

        done = store.done() if (info.is_main or not spec.collective) else set()
        if spec.collective:
            done = dist_.broadcast_object(info, done)
        keys = {u.key for u in plan.units}
        done &= keys
        plan.done = done
        mine = plan.units if spec.collective else dist_.shard(plan.units, info)
        pending = [u for u in mine if u.key not in done]
        if done:
            n_all = len(plan.units)
            runlog.write(f"resuming {out}: {len(done)} of {n_all} {spec.noun} already done"
                         + ("; nothing to do" if len(done) == n_all else ""))
        todo = mine if plan.revisit_done else pending
        finished_before = bool(manifest.get("finished")) and not pending
        resumed = len(done)
        if not finished_before:
            if plan.prepare is not None:
                plan.prepare(plan)
            if todo:
                _compute_all(spec, cfg, plan, store, todo, pending, info, progress, runlog)
        dist_.barrier(info)
        extra = {}
        if plan.finish is not None and not finished_before:
            extra = plan.finish(plan, resumed) or {}
        if info.is_main and extra:
            store.update_manifest(**extra)  # summarize may read it (e.g. the scope list)
        dist_.barrier(info)
        tables = None
        if info.is_main or spec.collective_summary:
            tables = spec.summarize(out, cfg, info)
        if info.is_main:
            fields = {"finished": True, "config": cfg.to_dict()}  # the options of the last (re)run
            if not finished_before:  # a rerun that computed nothing keeps the run's own time
                fields["elapsed_s"] = round(time.perf_counter() - t0, 1)
            if (out / "examples.parquet").exists():
                ex = pd.read_parquet(out / "examples.parquet", columns=["status"])
                fields.update(n_ok=int((ex["status"] == "ok").sum()), n_skipped=int((ex["status"] != "ok").sum()))
            store.update_manifest(**fields)
            runlog.write(f"{spec.name}: finished in {round(time.perf_counter() - t0, 1)} s", echo=False)
            if report:
                path = spec.report.render(out)
                runlog.write(f"report: {path}", echo=False)
        dist_.barrier(info)
        return spec.open(out, tables if info.is_main else None)


def _compute_all(spec: Analysis, cfg, plan: Plan, store: RunStore, todo: list[Unit], pending: list[Unit], info,
                 progress: bool, runlog: RunLog) -> None:
    """Compute `todo` batch by batch, committing every `flush_every` batches (collective: every unit)."""
    flush_every = 1 if spec.collective else int(getattr(cfg, "flush_every", 1) or 1)
    batches = plan.batches or _default_batches
    buf: dict[str, list] = {}
    n_buffered = 0

    def flush() -> None:
        nonlocal n_buffered
        if buf:
            tables = {name: concat_tables(parts) for name, parts in buf.items()}
            if spec.marker in tables:
                if info.is_main or not spec.collective:
                    store.commit(tables, key=shard_key)
            buf.clear()
        n_buffered = 0

    pending_keys = {u.key for u in pending}
    bar = Progress(spec.name, len(todo), noun=spec.noun, bar=progress and info.is_main,
                   log=runlog if info.is_main else None)
    with bar:
        shard_key = None
        for units in batches(todo):
            if spec.collective:
                shard_key = units[0].shard
                bar.working_on(str(units[0].key))
            elif shard_key is None:
                shard_key = store.next_key()
            tables = spec.compute(plan, units)
            if any(u.key in pending_keys for u in units):
                _merge_into(buf, tables)
                n_buffered += 1
            if spec.collective or n_buffered >= flush_every:
                flush()
                if not spec.collective:
                    shard_key = None
            bar.advance(len(units), what=str(units[-1].key) if spec.collective else "")
        flush()

