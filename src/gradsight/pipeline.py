"""The `layers` analysis end to end: data -> capture -> spectra -> run store -> summaries -> report.

Used by the CLI (`gradsight layers`), the demo and the Python API (`gradsight.analyze_layers`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .capture import capture
from .config import LayersConfig, config_hash, semantic_dict
from .inputs.data import DataError, Encoded, Record, collate, encode, fingerprint, load_records, make_batches
from .inputs.losses import loss_fn_for
from .inputs.models import LayerInfo, load_model, model_fingerprint, select_layers
from .measures.spectra import METRICS, batch_spectra
from .runs import distributed as dist_
from .runs.store import RunStore, read_examples, read_layer_stats, read_manifest, versions, write_parquet
from .stats.compare import summarize

__all__ = ["run_layers", "summarize_run", "LayersResult", "batch_layer_stats"]


@dataclass
class LayersResult:
    """Where a finished run lives and its main tables."""

    path: Path
    examples: pd.DataFrame
    summary: pd.DataFrame | None

    @property
    def layer_stats(self) -> pd.DataFrame:
        return read_layer_stats(self.path)

    def report(self) -> Path:
        from .report import render_html

        return render_html(self.path)


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class Rate(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:.2f} ex/s" if speed else "-- ex/s", style="progress.data.speed")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)


def batch_layer_stats(model, layers: list[LayerInfo], batch: dict[str, torch.Tensor], loss_fn: Callable,
                      cfg: LayersConfig) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]], dict[int, str]]:
    """One forward/backward: (losses (B,), {layer: {metric: (B,)}}, {batch position: skip reason})."""
    modules = dict(model.named_modules())
    with capture(model, {li.name: modules[li.name] for li in layers}) as tape:
        tape.set_tokens(batch["attention_mask"].bool())
        losses = loss_fn(model, batch)  # (B,)
        bad: dict[int, str] = {}
        for b in torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist():
            bad[b] = "non-finite loss"
        # a non-finite loss would poison nothing else (examples are independent), but keep it out of backward
        total = torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses)).sum()
        total.backward()
        grads = tape.grads()
        for name, g in grads.items():
            for b in torch.nonzero(~g.finite()).flatten().tolist():
                bad.setdefault(b, f"non-finite gradient in {name}")
        if bad:  # skipped examples must not break the batched eigensolvers of their companions
            for g in grads.values():
                g.zero_examples(sorted(bad))
        stats = batch_spectra(grads, route=cfg.route, erank_weights=cfg.erank_weights, rel_tol=cfg.rel_tol)
    return losses.detach(), stats, bad


def _stats_frame(stats: dict[str, dict[str, torch.Tensor]], layers: list[LayerInfo], keep: list[int],
                 idx: list[int], groups: list[str]) -> pd.DataFrame:
    """Long-format rows for the kept batch positions."""
    info = {li.name: li for li in layers}
    parts = []
    k = np.asarray(keep, dtype=np.int64)
    n = len(keep)
    idx_a = np.asarray(idx, dtype=np.int64)[k]
    grp_a = np.asarray(groups, dtype=object)[k]
    for name, per_metric in stats.items():
        li = info[name]
        for metric in METRICS:
            if metric not in per_metric:
                continue
            vals = per_metric[metric].detach().cpu().numpy().astype(np.float64)[k]
            parts.append(pd.DataFrame({"idx": idx_a, "group": grp_a, "layer": np.repeat(name, n),
                                       "block": np.repeat(np.int64(li.block), n), "kind": np.repeat(li.kind, n),
                                       "metric": np.repeat(metric, n), "value": vals}))
    if not parts:
        return pd.DataFrame(columns=["idx", "group", "layer", "block", "kind", "metric", "value"])
    return pd.concat(parts, ignore_index=True)


def _example_row(rec: Record, enc: Encoded | None, status: str, reason: str, loss: float) -> dict:
    return {"idx": rec.idx, "id": rec.id, "group": rec.group, "source": rec.source, "status": status,
            "reason": reason, "n_tokens": enc.n_tokens if enc is not None else 0,
            "n_target": enc.n_target if enc is not None else 0, "loss": float(loss),
            "prompt": rec.prompt_text, "response": rec.response or ""}


def _bad_record_row(d: dict) -> dict:
    return {"idx": int(d["idx"]), "id": str(d.get("id") or d["idx"]), "group": str(d.get("group") or ""),
            "source": str(d.get("source", "")), "status": "skipped", "reason": str(d["reason"]),
            "n_tokens": 0, "n_target": 0, "loss": float("nan"), "prompt": "", "response": ""}


def summarize_run(run: Path, cfg: LayersConfig | None = None) -> dict[str, pd.DataFrame]:
    """(Re)compute summary, MAD, RD and test tables of a run from its layer stats; write them."""
    run = Path(run)
    if cfg is None:
        cfg = LayersConfig.from_dict(read_manifest(run)["config"])
    ls = read_layer_stats(run)
    ex = read_examples(run)
    ok = set(ex.loc[ex["status"] == "ok", "idx"].astype(int))
    ls = ls[ls["idx"].isin(ok)]
    s = cfg.summary
    tables = summarize(ls, reference=s.reference, n_boot=s.n_boot, n_perm=s.n_perm, seed=cfg.seed,
                       bounds=s.bounds)
    for name, df in tables.items():
        write_parquet(df, run / f"{name}.parquet")
    return tables


def run_layers(cfg: LayersConfig, out: str | Path, *, progress: bool = True, report: bool = True,
               model: Any = None, tokenizer: Any = None, records: Any = None,
               log: Callable[[str], None] = print) -> LayersResult:
    """Run the layer-wise gradient analysis into the run directory `out` (resumes if it exists).

    Args:
        cfg: options (see LayersConfig).
        out: run directory.
        progress: show a progress bar (rank 0).
        report: write report.html when done.
        model, tokenizer: an already loaded model/tokenizer (Python API); default: load cfg.model.
        records: data as a list of dicts or a datasets.Dataset instead of cfg.data.
    """
    out = Path(out)
    with dist_.session() as info:
        return _run(cfg, out, info, progress, report, model, tokenizer, records, log)


@dataclass
class Setup:
    """What every analysis has once data, model, layers and the run directory are ready."""

    records: list[Record]
    bad: list[dict]
    model: Any
    tokenizer: Any
    layers: list[LayerInfo]
    store: RunStore
    done: set[int]
    device: torch.device
    manifest: dict


def prepare(cfg: LayersConfig, out: Path, info: dist_.DistInfo, model: Any, tokenizer: Any, records: Any, *,
            analysis: str = "layers", terms: bool = False, extra: dict | None = None) -> Setup:
    """Load and validate data (bad input fails before the model loads), load the model, select layers, and
    open (or resume) the run directory under the run's identity."""
    source = records if records is not None else cfg.data
    if source is None or source == "":
        raise DataError("--data", "no data given")
    recs, bad = load_records(source, split=cfg.split, on_bad=cfg.on_bad, terms=terms)
    data_hash = fingerprint(source)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        model_fp = model_fingerprint(cfg.model)
        model_id = cfg.model
    else:
        if tokenizer is None:
            raise ValueError("a model passed in needs its tokenizer too")
        model_id = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        model_fp = "in-memory:" + _param_fingerprint(model)
    device = dist_.pick_device(cfg.device, info)
    model.to(device).eval()
    layers = select_layers(model, kinds=cfg.kinds or None, blocks=cfg.blocks, pattern=cfg.pattern,
                           exclude=cfg.exclude)
    identity = {"config": semantic_dict(cfg), "model_fingerprint": model_fp, "data_sha256": data_hash}
    if analysis != "layers":
        identity["analysis"] = analysis
    store = RunStore(out, info.rank, info.world_size)
    meta = {"analysis": analysis, "config": cfg.to_dict(), "config_hash": config_hash(identity),
            "model": {"id": model_id, "fingerprint": model_fp, "class": type(model).__name__,
                      "n_blocks": 1 + max((li.block for li in layers), default=-1),
                      "layers": [li.to_dict() for li in layers]},
            "data": {"path": str(cfg.data) or "<in-memory>", "sha256": data_hash,
                     "n_records": len(recs) + len(bad)},
            "versions": versions(), "seed": cfg.seed, "world_size": info.world_size,
            "loss": {"reduction": cfg.reduction, "loss_on": cfg.encode.loss_on, "mode": "eval",
                     "dtype": cfg.dtype, "stat_dtype": "float64"}, **(extra or {})}
    if info.is_main:
        manifest = store.open(identity, meta)
        store.cleanup()
    dist_.barrier(info)
    if not info.is_main:
        manifest = store.open(identity, meta)
    return Setup(recs, bad, model, tokenizer, layers, store, store.done(), device, manifest)


def _run(cfg, out, info, progress, report, model, tokenizer, records, log) -> LayersResult:
    t0 = time.perf_counter()
    su = prepare(cfg, out, info, model, tokenizer, records)
    recs, bad, model, tokenizer, layers, store, done, device = (su.records, su.bad, su.model, su.tokenizer,
                                                               su.layers, su.store, su.done, su.device)

    # encode every record (cheap, deterministic), then shard by position in a fixed order
    encoded: list[Encoded] = [encode(r, tokenizer, cfg.encode) for r in recs]
    work = [(r, e) for r, e in zip(recs, encoded)]
    mine = dist_.shard(work, info)
    mine_bad = dist_.shard(sorted(bad, key=lambda d: d["idx"]), info)
    pending = [(r, e) for r, e in mine if r.idx not in done]
    skipped_rows = [_example_row(r, e, "skipped", e.reason, float("nan")) for r, e in pending if not e.ok]
    skipped_rows += [_bad_record_row(d) for d in mine_bad if int(d["idx"]) not in done]
    if skipped_rows:
        store.append(pd.DataFrame(skipped_rows), None)
    todo = [(r, e) for r, e in pending if e.ok]
    if info.is_main and done:
        log(f"resuming {out}: {len(done)} examples already done")

    loss_fn = loss_fn_for(model, cfg.reduction)
    enc_list = [e for _, e in todo]
    rec_of = {r.idx: r for r, _ in todo}
    batches = make_batches(enc_list, token_budget=cfg.token_budget, max_batch=cfg.max_batch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ex_buf: list[dict] = []
    st_buf: list[pd.DataFrame] = []

    def flush():
        if ex_buf:
            store.append(pd.DataFrame(ex_buf), pd.concat(st_buf, ignore_index=True) if st_buf else None)
            ex_buf.clear()
            st_buf.clear()

    with _progress(progress and info.is_main) as bar:
        task = bar.add_task("layers", total=len(enc_list)) if bar is not None else None
        for bi, b in enumerate(batches):
            encs = [enc_list[i] for i in b]
            batch = {k: v.to(device) for k, v in collate(encs, pad_id).items()}
            losses, stats, bad_pos = batch_layer_stats(model, layers, batch, loss_fn, cfg)
            keep = [p for p in range(len(encs)) if p not in bad_pos]
            idx = [e.idx for e in encs]
            groups = [rec_of[e.idx].group for e in encs]
            st_buf.append(_stats_frame(stats, layers, keep, idx, groups))
            for p, e in enumerate(encs):
                ok = p not in bad_pos
                ex_buf.append(_example_row(rec_of[e.idx], e, "ok" if ok else "skipped",
                                           "" if ok else bad_pos[p], float(losses[p])))
            if (bi + 1) % cfg.flush_every == 0:
                flush()
            if bar is not None:
                bar.update(task, advance=len(encs))
        flush()

    dist_.barrier(info)
    tables = None
    examples = read_examples(out)
    if info.is_main:
        examples = store.merge_examples()
        tables = summarize_run(out, cfg)
        finish(store, examples, t0, report)
    dist_.barrier(info)
    return LayersResult(out, examples, tables["summary"] if tables else None)


def finish(store: RunStore, examples: pd.DataFrame, t0: float, report: bool) -> None:
    """Mark a run finished in its manifest (time, counts) and render its report (rank 0)."""
    store.update_manifest(finished=True, elapsed_s=round(time.perf_counter() - t0, 1),
                          n_ok=int((examples["status"] == "ok").sum()),
                          n_skipped=int((examples["status"] != "ok").sum()))
    if report:
        from .report import render_html

        render_html(store.path)


def _param_fingerprint(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
