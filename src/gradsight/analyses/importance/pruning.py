"""The end of an importance run: statistics -> scores -> masks -> pruned copies -> evaluation (rank 0).

    stats    = sum of every "stats" shard (all commits, all ranks)
    scores   = importance.scores.score(method, W, stats)          per layer; written to scores/METHOD.safetensors
    for each structure (unstructured at each sparsity, N:M, neuron) and method:
        a copy of the model is pruned:
          sequential (decoder LMs, Wanda / GBLM / Fisher / SparseGPT): block by block on windows of the
              calibration tokens, each block calibrated on the outputs of the already pruned ones
              (`importance.sequential.prune_sequential`; GBLM's gradients come from the dense pass, as in its code)
          one-shot (plain modules, or --no-sequential): masks from the pass' dense statistics; SparseGPT with
              H = (2/n) sum x x^T of the pass
        and evaluated: perplexity on --eval-data (LM) or loss / accuracy on the batches (module); a model whose
        evaluation is not finite is flagged (finite = False) and never saved.
    tables: evaluation, layers (per-layer sparsity, agreement with magnitude's pruned set), scores (per-layer
    score summaries), neurons (the top neurons by gradient x activation).
"""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ...importance import masks as M
from ...importance.scores import SCORES, score
from ...importance.stats import LayerStats, from_tensors, merge
from ...runs.progress import RunLog, format_duration
from ...runs.store import read_manifest, write_parquet, write_safetensors
from .compute import ImpState, is_decoder_lm
from .config import DEFAULT_GROUP, NEURON_METHODS, parse_save_model

__all__ = ["finish", "read_stats", "grid", "evaluate_lm", "evaluate_module", "OUT_TABLES"]

OUT_TABLES = ("evaluation", "layers", "scores", "neurons")
SEQUENTIAL = ("wanda", "gblm", "fisher", "sparsegpt")


def _stats_files(run: Path) -> list[Path]:
    d = Path(run) / "stats"
    return sorted(d.glob("*.safetensors")) if d.exists() else []


def read_stats(run: Path) -> dict[str, LayerStats]:
    """The sum of every statistics shard of the run (commits and ranks add)."""
    from safetensors.torch import load_file

    total = None
    for f in _stats_files(run):
        part = from_tensors({k: v[0] for k, v in load_file(str(f)).items()})
        total = part if total is None else merge(total, part)
    if total is None:
        raise ValueError(f"{run}: no calibration statistics (every calibration example was skipped?)")
    return total


def grid(cfg) -> list[tuple[str, float]]:
    """(structure, sparsity) pairs: unstructured and neuron at each --sparsities, N:M at N/M."""
    out = []
    for s in cfg.structures:
        if s in ("unstructured", "neuron"):
            out += [(s, float(p)) for p in cfg.sparsities]
        else:
            _, (n, m) = M.parse_structure(s)
            out.append((s, n / m))
    return out


def _configs(cfg) -> list[tuple[str, str, float]]:
    out = []
    for structure, sparsity in grid(cfg):
        for method in cfg.methods:
            if structure == "neuron" and method not in NEURON_METHODS:
                continue
            if method == "neuron" and structure != "neuron":  # a score per neuron: neuron masks only
                continue
            out.append((method, structure, sparsity))
    return out


def _layer_info(st: ImpState) -> dict[str, dict]:
    info = {}
    for li in st.source.layers:
        if li.name in st.modules:
            info[li.name] = {"block": int(li.block), "kind": li.kind}
    for name in st.modules:
        info.setdefault(name, {"block": -1, "kind": name.rsplit(".", 1)[-1]})
    return info


def _weight(m) -> torch.Tensor:
    w = m.weight.detach()
    return w.t() if type(m).__name__ == "Conv1D" else w


def _set_weight(m, W: torch.Tensor) -> None:
    with torch.no_grad():
        m.weight.copy_(W.t() if type(m).__name__ == "Conv1D" else W)


def method_scores(st: ImpState, stats: dict[str, LayerStats], method: str) -> dict[str, torch.Tensor]:
    """{layer: score} of one method from the dense statistics (SparseGPT has no score)."""
    out = {}
    for name, m in st.modules.items():
        opts = {"alpha": float(st.cfg.alpha)} if method == "gblm" else {}
        out[name] = score(method, _weight(m).to(stats[name].sq_in.dtype), stats[name], **opts)
    return out


def _neuron_scores(st: ImpState, stats, method: str, name: str) -> torch.Tensor:
    """Per input unit (d_in,) of a layer whose inputs are MLP neurons."""
    W = _weight(st.modules[name]).to(stats[name].sq_in.dtype)
    col = W.pow(2).sum(0).sqrt()  # (d_in,) the neuron's outgoing weights
    if method == "neuron":
        return score("neuron", W, stats[name])
    if method == "wanda":
        return col * (stats[name].sq_in / max(stats[name].n_seq, 1)).sqrt()
    return col


def _masks(st: ImpState, stats, scores: dict | None, method: str, structure: str, sparsity: float) -> dict:
    """{layer: keep mask} of a one-shot configuration."""
    if structure == "neuron":
        pat = re.compile(st.cfg.neuron_layers)
        out = {}
        for name in st.modules:
            if pat.search(name):
                keep = M.neuron_mask(_neuron_scores(st, stats, method, name), sparsity)  # (d_in,)
                out[name] = keep.unsqueeze(0).expand_as(_weight(st.modules[name])).clone()
        if not out:
            raise ValueError(f"neuron masks: no selected layer matches --neuron-layers {st.cfg.neuron_layers!r}")
        return out
    group = DEFAULT_GROUP[method] if st.cfg.group == "auto" else st.cfg.group
    if structure == "unstructured" and group == "global":
        return M.global_masks(scores, sparsity)
    return {n: M.make_mask(s, structure, sparsity, group="layer" if group == "layer" else "row")
            for n, s in scores.items() if n not in _nm_misfits(st, structure)}


def _nm_misfits(st: ImpState, structure: str) -> list[str]:
    """Layers an N:M structure cannot cover (d_in not a multiple of M): they stay dense (noted in the run)."""
    kind, nm = M.parse_structure(structure) if structure != "neuron" else ("neuron", None)
    if kind != "nm":
        return []
    return [n for n, m in st.modules.items() if _weight(m).shape[1] % nm[1] != 0]


def _apply(model_copy, names: dict, masks: dict) -> None:
    for name, keep in masks.items():
        m = names[name]
        W = _weight(m)
        _set_weight(m, W * keep.to(W.dtype))


def _oneshot_sparsegpt(st: ImpState, stats, copy_mods: dict, structure: str, sparsity: float) -> None:
    from ...importance.sparsegpt import hessian_from_xtx, sparsegpt

    misfit = _nm_misfits(st, structure)
    for name, m in copy_mods.items():
        if name in misfit:
            continue
        s = stats[name]
        if s.xtx is None:
            raise ValueError("sparsegpt one-shot needs the x x^T sums of the pass")
        W_new, _ = sparsegpt(_weight(m), hessian_from_xtx(s.xtx, max(s.n_seq, 1)).to(torch.float64),
                             sparsity=sparsity, structure=structure)
        _set_weight(m, W_new.to(m.weight.dtype))


# ---------------------------------------------------------------------------------------------- evaluation

def _eval_encoded(st: ImpState):
    """Encoded evaluation examples of an LM run and whether they are the calibration data (in-sample)."""
    from ...inputs.data import encode, load_records

    if st.cfg.eval_data and st.cfg.eval_data.startswith("builtin:"):
        from ...importance.text import sample_text, text_records

        recs, _ = load_records(text_records(sample_text(st.cfg.eval_data[8:]), group=st.cfg.eval_data[8:]))
        in_sample = False
    elif st.cfg.eval_data:
        recs, _ = load_records(st.cfg.eval_data, split=st.cfg.split, on_bad=st.cfg.on_bad)
        in_sample = False
    else:
        recs, in_sample = st.source.records, True
    enc = [e for e in (encode(r, st.source.tokenizer, st.cfg.encode) for r in recs) if e.ok and e.n_target > 0]
    if not enc:
        raise ValueError(f"evaluation data {st.cfg.eval_data or st.cfg.data}: no example has a supervised token")
    return enc, in_sample


def evaluate_lm(model, encoded, pad_id: int, device, token_budget: int = 4096, max_batch: int = 8) -> dict:
    """Token-level perplexity exp(sum NLL / sum targets) over the supervised tokens of `encoded`."""
    from ...inputs.batching import make_batches
    from ...inputs.lm import collate_units
    from ...inputs.losses import causal_lm_losses

    nll, n = 0.0, 0
    with torch.no_grad():
        for b in make_batches(encoded, token_budget=token_budget, max_batch=max_batch):
            batch = collate_units([encoded[i] for i in b], pad_id, device)
            nll += float(causal_lm_losses(model, batch, "sum").double().sum())
            n += int(batch["target_mask"][:, 1:].sum())
    mean = nll / max(n, 1)
    return {"nll": mean, "ppl": math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf"),
            "n_tokens": n, "finite": bool(math.isfinite(nll))}


def evaluate_module(model, source) -> dict:
    """Mean loss (and accuracy for cross-entropy) over the module's evaluation batches."""
    from ...inputs.module import row_losses

    batches = source.extras.get("eval") or source.batches
    fn = row_losses(source.loss, source.forward)
    tot, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            losses = fn(model, b)
            tot += float(losses.double().sum())
            n += int(losses.shape[0])
            if source.loss == "cross_entropy":
                out, y = source.forward(model, b)
                correct += int((out.argmax(-1) == y).sum())
    mean = tot / max(n, 1)
    out = {"nll": mean, "ppl": float("nan"), "n_tokens": n, "finite": bool(math.isfinite(tot))}
    out["accuracy"] = correct / n if source.loss == "cross_entropy" and n else float("nan")
    return out


# --------------------------------------------------------------------------------------------------- finish

def _windows(st: ImpState, encoded) -> torch.Tensor:
    """Calibration windows for the sequential pass: the calibration tokens concatenated (record order) and cut
    into --seqlen windows (the references calibrate on windows of a token stream)."""
    ids = [t for e in encoded for t in e.input_ids]
    T = min(int(st.cfg.seqlen), len(ids))
    n = len(ids) // T
    return torch.tensor(ids[: n * T], dtype=torch.long).view(n, T)


def finish(plan, resumed: int) -> dict:
    info = plan.info
    if info is not None and not info.is_main:
        return {}
    st: ImpState = plan.state
    run = Path(plan.run_dir)
    log = RunLog(run / "log.txt", echo=None)
    t0 = time.perf_counter()
    stats = read_stats(run)
    n_seq = next(iter(stats.values())).n_seq
    layer_info = _layer_info(st)
    model = st.source.model
    named = dict(model.named_modules())
    was_grad = {p: p.requires_grad for p in model.parameters()}

    scores: dict[str, dict] = {}
    score_rows = []
    for method in st.cfg.methods:
        if method not in SCORES or (method == "neuron" and "neuron" not in st.cfg.structures
                                    and not st.cfg.save_scores):
            continue
        if method == "neuron":
            sc = {n: score("neuron", _weight(m).to(stats[n].sq_in.dtype), stats[n])
                  for n, m in st.modules.items()}
        else:
            sc = method_scores(st, stats, method)
        scores[method] = sc
        for name, s in sc.items():
            v = s.double().flatten()
            q = torch.quantile(v[:: max(1, v.numel() // 100_000)], torch.tensor([0.1, 0.5, 0.9], dtype=v.dtype))
            score_rows.append({"method": method, "layer": name, **layer_info[name], "numel": int(v.numel()),
                               "mean": float(v.mean()), "q10": float(q[0]), "median": float(q[1]),
                               "q90": float(q[2]), "frac_zero": float((v == 0).double().mean())})
        if st.cfg.save_scores:
            write_safetensors({n: s.contiguous() for n, s in sc.items()}, run / "scores" / f"{method}.safetensors",
                              metadata={"method": method, "n_seq": str(n_seq)})

    lm = st.source.kind == "lm"
    sequential = bool(st.cfg.sequential and lm and is_decoder_lm(model))
    if lm:
        encoded, in_sample = _eval_encoded(st)
        from ...inputs.data import encode

        calib = [e for e in (encode(r, st.source.tokenizer, st.cfg.encode) for r in st.source.records) if e.ok]
        windows = _windows(st, calib) if sequential else None

        def evaluate(m):
            return evaluate_lm(m, encoded, st.source.pad_id, st.source.device, st.cfg.token_budget,
                               st.cfg.max_batch)
    else:
        in_sample = not st.source.extras.get("eval")

        def evaluate(m):
            return evaluate_module(m, st.source)

    base = {"calibration": "sequential" if sequential else "one-shot", "in_sample": bool(in_sample)}
    dense = evaluate(model)
    rows = [{"method": "dense", "structure": "dense", "sparsity_target": 0.0, "sparsity": 0.0, "group": "",
             **base, **dense}]
    timings = []  # seconds per configuration: the manifest (tables hold only reproducible numbers)
    notes: list[str] = []
    g_sq = {n: s.g_sq for n, s in stats.items() if s.g_sq is not None}
    for structure in st.cfg.structures:
        misfit = _nm_misfits(st, structure)
        if misfit:
            notes.append(f"{structure}: {len(misfit)} layer(s) left dense (inputs not a multiple of M): "
                         f"{', '.join(misfit[:5])}")
    configs = _configs(st.cfg)
    if not any(re.search(st.cfg.neuron_layers, n) for n in st.modules) and any(c[1] == "neuron" for c in configs):
        skipped = [c for c in configs if c[1] == "neuron"]
        configs = [c for c in configs if c[1] != "neuron"]
        notes.append(f"{len(skipped)} neuron-mask configurations skipped: no selected layer matches --neuron-layers "
                     f"{st.cfg.neuron_layers!r}")
        log.write("importance: " + notes[-1])
    layer_rows, masks_of = [], {}
    save = parse_save_model(st.cfg.save_model) if st.cfg.save_model else None
    saved = None
    for i, (method, structure, sparsity) in enumerate(configs):
        t = time.perf_counter()
        pruned = copy.deepcopy(model)
        mods = {n: dict(pruned.named_modules())[n] for n in st.modules}
        group = DEFAULT_GROUP[method] if st.cfg.group == "auto" else st.cfg.group
        how = "one-shot"
        if structure != "neuron" and sequential and method in SEQUENTIAL:
            from ...importance.sequential import prune_sequential

            prune_sequential(pruned, windows, method, structure, sparsity, g_sq=g_sq or None, alpha=st.cfg.alpha,
                             layers=[n for n in st.modules if n not in _nm_misfits(st, structure)], batch_size=max(1, min(st.cfg.max_batch, 8)))
            group, how = ("row" if method != "sparsegpt" else "block"), "sequential"
        elif method == "sparsegpt":
            if structure == "neuron":
                continue
            _oneshot_sparsegpt(st, stats, mods, structure, sparsity)
        else:
            _apply(pruned, mods, _masks(st, stats, scores.get(method), method, structure, sparsity))
        keep = {n: _weight(m) != 0 for n, m in mods.items()}
        ev = evaluate(pruned)
        total = sum(k.numel() for k in keep.values())
        achieved = 1 - sum(int(k.sum()) for k in keep.values()) / total
        rows.append({"method": method, "structure": structure, "sparsity_target": sparsity, "sparsity": achieved,
                     "group": group if structure == "unstructured" else structure, **base, "calibration": how, **ev})
        timings.append({"method": method, "structure": structure, "sparsity": sparsity,
                        "seconds": round(time.perf_counter() - t, 3)})
        masks_of[(method, structure, sparsity)] = keep
        if not ev["finite"]:
            log.write(f"importance: {method} {structure} {sparsity:g}: the pruned model's evaluation is not finite "
                      "(flagged; it will not be saved)")
        if save is not None and (method, structure) == save[:2] and math.isclose(sparsity, save[2]):
            saved = _save(st, pruned, run, ev, log)
        del pruned
        done = i + 1
        eta = (time.perf_counter() - t0) / done * (len(configs) - done)
        log.write(f"importance: {done}/{len(configs)} {method} {structure} {sparsity:g} "
                  f"{'ppl' if lm else 'loss'} {ev['ppl'] if lm else ev['nll']:.4g}; ETA {format_duration(eta)}")
    for (method, structure, sparsity), keep in masks_of.items():
        ref = masks_of.get(("magnitude", structure, sparsity))
        for name, k in keep.items():
            pr = ~k
            row = {"method": method, "structure": structure, "sparsity_target": sparsity, "layer": name,
                   **layer_info[name], "numel": int(k.numel()), "sparsity": float(pr.double().mean())}
            if ref is not None and method != "magnitude" and bool(pr.any()):
                row["overlap_magnitude"] = int((pr & ~ref[name]).sum()) / int(pr.sum())
            else:
                row["overlap_magnitude"] = float("nan")
            layer_rows.append(row)
    for p, flag in was_grad.items():
        p.requires_grad_(flag)
    del named
    write_parquet(pd.DataFrame(rows), run / "evaluation.parquet")
    write_parquet(pd.DataFrame(layer_rows), run / "layers.parquet")
    write_parquet(pd.DataFrame(score_rows), run / "scores.parquet")
    write_parquet(_neuron_table(st, stats, layer_info), run / "neurons.parquet")
    return {"importance": {"n_calibration": int(n_seq), "configs": len(configs), "saved_model": saved,
                           "calibration": base["calibration"], "in_sample": bool(in_sample), "notes": notes,
                           "seconds": timings, "finish_s": round(time.perf_counter() - t0, 1)}}


def _neuron_table(st: ImpState, stats, layer_info, top: int = 20) -> pd.DataFrame:
    """The top neurons (inputs of the --neuron-layers) by gradient x activation, when it was collected."""
    pat = re.compile(st.cfg.neuron_layers)
    rows = []
    for name, s in stats.items():
        if s.neuron is None or not pat.search(name):
            continue
        v = (s.neuron / max(s.n_seq, 1)).double()
        order = torch.argsort(v, descending=True, stable=True)[:top]
        total = float(v.sum()) or 1.0
        for r, j in enumerate(order.tolist()):
            rows.append({"layer": name, **layer_info[name], "rank": r + 1, "neuron": int(j),
                         "score": float(v[j]), "share": float(v[j]) / total})
    cols = ["layer", "block", "kind", "rank", "neuron", "score", "share"]
    return pd.DataFrame(rows, columns=cols) if not rows else pd.DataFrame(rows)


def _save(st: ImpState, pruned, run: Path, ev: dict, log) -> str | None:
    out = run / "pruned"
    if not ev["finite"]:
        log.write(f"importance: NOT saving {st.cfg.save_model}: its evaluation is not finite", echo=True)
        return None
    if st.source.kind == "lm":
        from ...importance.evaluate import PrunedModelError, save_pruned

        try:
            save_pruned(pruned, st.source.tokenizer, out, overwrite=True)
        except PrunedModelError as e:
            log.write(f"importance: NOT saving {st.cfg.save_model}: {e}", echo=True)
            return None
    else:
        write_safetensors({k: v.detach().contiguous() for k, v in pruned.state_dict().items()},
                          out / "model.safetensors", metadata={"config": st.cfg.save_model})
    return str(out)


def read_tables(run: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for t in OUT_TABLES:
        p = Path(run) / f"{t}.parquet"
        if p.exists():
            out[t] = pd.read_parquet(p)
    return out


def manifest_block(run: Path) -> dict[str, Any]:
    return read_manifest(Path(run)).get("importance", {})

