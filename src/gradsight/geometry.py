"""The `geometry` analysis end to end: loss terms -> capture -> features -> run store -> geometry tables.

Every record expands into one or more UNITS, a unit being one loss term of one record (a plain response, a
preference-pair side, a rewarded rollout, or a named term; see `gradsight.inputs.data`). Each unit is one sequence
whose per-example gradient is captured in the usual single batched forward/backward, then

* projected per layer to seeded Kronecker features (``measures.projection.Projector``) and, through a second
  seeded projection of all layers together, to a whole-model feature of size ``r_model`` -- stored as safetensors
  shards next to the examples shards (a killed run resumes; the projection seeds are in the manifest);
* optionally summarised by its spectra (``layer_stats`` shards, as in `layers`), and always by its exact
  squared gradient norm;
* in exact mode, also kept as factors so that cross-unit inner products are exact (no projection).

`summarize_geometry` then builds, from the stored features only (so a resumed or distributed run gives the
same tables as an uninterrupted single process), per scope (the whole model, each kind, each block, each
layer) the Gram matrix K = F F^T of the units and from it: label x label mean-gradient cosines, pairwise
cosine distributions and conflict rates, coherence, loss-term alignment, gradient entanglement of
preference pairs, PSR / NSR of rollouts; plus G-Vendi per label (streamed from the r_model x r_model
covariance), the gradient noise scale and GSNR per layer, and a per-unit score table.

Sign convention: features are gradients of each unit's LOSS (negative log-likelihood). The log-probability
gradients of METHODS §7d / §12 are their negatives; a common sign leaves every Gram-based statistic unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .capture import capture
from .config import GeometryConfig
from .inputs.data import Encoded, Record, collate, encode, make_batches
from .inputs.losses import loss_fn_for
from .inputs.models import LayerInfo
from .measures.projection import ExactGramAccumulator, Projector
from .measures.spectra import batch_spectra
from .pipeline import _progress, _stats_frame, finish, prepare
from .runs import distributed as dist_
from .runs.store import (read_examples, read_features, read_layer_stats, read_manifest, write_parquet,
                         write_safetensors)

__all__ = ["Unit", "expand_units", "unit_labels", "run_geometry", "summarize_geometry", "GeometryResult",
           "MODEL_KEY"]

MODEL_KEY = "__model__"  # whole-model feature in the feature shards
SUM_ROLES = ("pair", "rollout")  # log-probability terms: sequence sums


@dataclass(frozen=True)
class Unit:
    """One loss term of one record: the sequence (prompt, response) whose gradient is captured."""

    idx: int
    record: Record
    term: str
    response: str

    @property
    def role(self) -> str:
        return self.record.role

    def as_record(self) -> Record:
        """The record with this unit's response (what `encode` tokenizes)."""
        if self.record.terms is None:
            return self.record
        return replace(self.record, response=self.response)


def expand_units(records: list[Record], bad: list[dict]) -> tuple[list[Unit], list[dict]]:
    """Units of the valid records and unit ids of the bad ones, numbered in source order.

    A valid record with k terms takes k consecutive unit ids, a bad record one; so unit ids depend only on
    the data, not on ``on_bad``, the world size or resumption.
    """
    items = [(r.idx, r) for r in records] + [(int(d["idx"]), d) for d in bad]
    items.sort(key=lambda t: t[0])
    units, bad_rows, u = [], [], 0
    for _, item in items:
        if isinstance(item, Record):
            for term, resp in item.term_list:
                units.append(Unit(u, item, term, resp))
                u += 1
        else:
            bad_rows.append({**item, "record_idx": int(item["idx"]), "idx": u})
            u += 1
    return units, bad_rows


def unit_labels(ex: pd.DataFrame, threshold: float) -> pd.Series:
    """The geometry label of every unit: group (plain), group:term (pairs, named terms), group:positive or
    group:negative (rollouts, reward > threshold)."""
    role = ex["role"].astype(str)
    group = ex["group"].astype(str)
    sign = np.where(ex["reward"].astype(float) > threshold, "positive", "negative")
    return pd.Series(np.where(role == "loss", group,
                              np.where(role == "rollout", group + ":" + sign, group + ":" + ex["term"].astype(str))),
                     index=ex.index, dtype=object)


@dataclass
class GeometryResult:
    path: Path
    examples: pd.DataFrame
    tables: dict[str, pd.DataFrame] | None

    def report(self) -> Path:
        from .report import render_html

        return render_html(self.path)


# ----------------------------------------------------------------------------------------------------------
# capture


def _unit_row(u: Unit, enc: Encoded | None, status: str, reason: str, loss: float, sq_norm: float) -> dict:
    rec = u.record
    return {"idx": u.idx, "id": rec.id, "group": rec.group, "source": rec.source, "status": status,
            "reason": reason, "n_tokens": enc.n_tokens if enc is not None else 0,
            "n_target": enc.n_target if enc is not None else 0, "loss": float(loss), "prompt": rec.prompt_text,
            "response": u.response, "record_idx": rec.idx, "term": u.term, "role": rec.role,
            "reward": float("nan") if rec.reward is None else float(rec.reward), "sq_norm": float(sq_norm)}


def _bad_unit_row(d: dict) -> dict:
    return {"idx": int(d["idx"]), "id": str(d.get("id") or d["record_idx"]), "group": str(d.get("group") or ""),
            "source": str(d.get("source", "")), "status": "skipped", "reason": str(d["reason"]), "n_tokens": 0,
            "n_target": 0, "loss": float("nan"), "prompt": "", "response": "", "record_idx": int(d["record_idx"]),
            "term": "", "role": "", "reward": float("nan"), "sq_norm": float("nan")}


class FeatureMaker:
    """Per-batch features: per-layer projections and the whole-model projection of their concatenation."""

    def __init__(self, cfg: GeometryConfig):
        self.projector = Projector(cfg.projection(), dtype=torch.float32)
        self.r_model = cfg.r_model

    def __call__(self, grads) -> dict[str, torch.Tensor]:
        feats = self.projector.features(grads)
        model = None
        for name, F in feats.items():
            P = self.projector.matrix(name, "model", self.r_model, F.shape[1], F.device)
            part = F @ P.T
            model = part if model is None else model + part
        feats = {k: v.detach().cpu() for k, v in feats.items()}
        if model is not None:
            feats[MODEL_KEY] = model.detach().cpu()
        return feats


def batch_units(model, layers: list[LayerInfo], batch: dict[str, torch.Tensor], scale: torch.Tensor,
                loss_sum: Callable, maker: FeatureMaker, cfg: GeometryConfig, exact: ExactGramAccumulator | None,
                idx: list[int]):
    """One forward/backward over a batch of units.

    Returns (losses (B,), features {key: (B, D)}, spectra {layer: {metric: (B,)}} or None, squared gradient
    norms (B,) float64 over the selected layers, {batch position: skip reason}).
    """
    modules = dict(model.named_modules())
    with capture(model, {li.name: modules[li.name] for li in layers}) as tape:
        tape.set_tokens(batch["attention_mask"].bool())
        losses = loss_sum(model, batch)
        losses = losses * scale.to(losses.dtype)
        bad: dict[int, str] = {}
        for b in torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist():
            bad[b] = "non-finite loss"
        torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses)).sum().backward()
        grads = tape.grads()
        for name, g in grads.items():
            for b in torch.nonzero(~g.finite()).flatten().tolist():
                bad.setdefault(b, f"non-finite gradient in {name}")
        if bad:
            for g in grads.values():
                g.zero_examples(sorted(bad))
        feats = maker(grads)
        stats = (batch_spectra(grads, route=cfg.route, erank_weights=cfg.erank_weights, rel_tol=cfg.rel_tol)
                 if cfg.spectra else None)
        if stats is not None:  # the spectra already hold ||M_e||_F
            sq = sum(st["frobenius"].double().cpu() ** 2 for st in stats.values())
        else:
            sq = sum(g.sq_norms().double().cpu() for g in grads.values())
        if exact is not None:
            exact.add(grads, idx)
    return losses.detach(), feats, stats, sq, bad


def run_geometry(cfg: GeometryConfig, out: str | Path, *, progress: bool = True, report: bool = True,
                 model: Any = None, tokenizer: Any = None, records: Any = None,
                 log: Callable[[str], None] = print) -> GeometryResult:
    """Run the gradient-geometry analysis into the run directory `out` (resumes if it exists).

    Args: as `pipeline.run_layers`; `cfg` is a GeometryConfig.
    """
    out = Path(out)
    with dist_.session() as info:
        return _run(cfg, out, info, progress, report, model, tokenizer, records, log)


def _run(cfg: GeometryConfig, out: Path, info, progress, report, model, tokenizer, records, log):
    t0 = time.perf_counter()
    if cfg.exact and info.world_size > 1:
        raise ValueError("exact mode keeps every unit's factors in one process; run it without torchrun "
                         "(or use projected features, the default)")
    geo_meta = {"geometry": {"mode": "exact" if cfg.exact else "projected",
                             "projection": {"r_in": cfg.r_in, "r_out": cfg.r_out, "r_dense": cfg.r_dense,
                                            "kind": cfg.proj_kind, "seed": cfg.seed},
                             "r_model": cfg.r_model, "feature_dtype": cfg.feature_dtype,
                             "target": cfg.target, "threshold": cfg.threshold, "lam": cfg.lam, "q": cfg.q,
                             "sum_roles": list(SUM_ROLES)}}
    su = prepare(cfg, out, info, model, tokenizer, records, analysis="geometry", terms=True, extra=geo_meta)
    model, tokenizer, layers, store, done, device = su.model, su.tokenizer, su.layers, su.store, su.done, su.device
    units, bad_rows = expand_units(su.records, su.bad)
    encoded = [replace(encode(u.as_record(), tokenizer, cfg.encode), idx=u.idx) for u in units]  # unit ids
    mine = dist_.shard(list(zip(units, encoded)), info)
    mine_bad = dist_.shard(bad_rows, info)
    pending = [(u, e) for u, e in mine if u.idx not in done]
    skipped = [_unit_row(u, e, "skipped", e.reason, float("nan"), float("nan")) for u, e in pending if not e.ok]
    skipped += [_bad_unit_row(d) for d in mine_bad if d["idx"] not in done]
    if skipped:
        store.append(pd.DataFrame(skipped), None)
    # exact mode recomputes the factors of finished units too (they are not stored), without re-writing them
    todo = [(u, e) for u, e in (mine if cfg.exact else pending) if e.ok]
    if info.is_main and done:
        log(f"resuming {out}: {len(done)} units already done")

    loss_sum = loss_fn_for(model, "sum")
    maker = FeatureMaker(cfg)
    exact = ExactGramAccumulator() if cfg.exact else None
    fdtype = torch.float16 if cfg.feature_dtype == "float16" else torch.float32
    enc_list = [e for _, e in todo]
    unit_of = {u.idx: u for u, _ in todo}
    batches = make_batches(enc_list, token_budget=cfg.token_budget, max_batch=cfg.max_batch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ex_buf: list[dict] = []
    st_buf: list[pd.DataFrame] = []
    ft_buf: list[tuple[list[int], dict[str, torch.Tensor]]] = []

    def flush():
        if not ex_buf:
            return
        idx = [i for ids, _ in ft_buf for i in ids]
        if idx:
            keys = ft_buf[0][1].keys()
            store.append_features(idx, {k: torch.cat([f[k] for _, f in ft_buf]).to(fdtype) for k in keys},
                                  metadata={"feature_dtype": cfg.feature_dtype})
        store.append(pd.DataFrame(ex_buf), pd.concat(st_buf, ignore_index=True) if st_buf else None)
        ex_buf.clear(), st_buf.clear(), ft_buf.clear()

    with _progress(progress and info.is_main) as bar:
        task = bar.add_task("geometry", total=len(enc_list)) if bar is not None else None
        for bi, b in enumerate(batches):
            encs = [enc_list[i] for i in b]
            us = [unit_of[e.idx] for e in encs]
            batch = {k: v.to(device) for k, v in collate(encs, pad_id).items()}
            scale = torch.tensor([1.0 if (u.role in SUM_ROLES or cfg.reduction == "sum") else 1.0 / e.n_target
                                  for u, e in zip(us, encs)], dtype=torch.float64, device=device)
            idx = [u.idx for u in us]
            losses, feats, stats, sq, bad_pos = batch_units(model, layers, batch, scale, loss_sum, maker, cfg,
                                                            exact, idx)
            new = [p for p, u in enumerate(us) if u.idx not in done]
            if new:
                keep = [p for p in new if p not in bad_pos]
                if stats is not None:
                    st_buf.append(_stats_frame(stats, layers, keep, idx, [u.record.group for u in us]))
                ft_buf.append(([idx[p] for p in new], {k: v[new] for k, v in feats.items()}))
                for p in new:
                    ok = p not in bad_pos
                    ex_buf.append(_unit_row(us[p], encs[p], "ok" if ok else "skipped", "" if ok else bad_pos[p],
                                            float(losses[p]), float(sq[p]) if ok else float("nan")))
                if (bi + 1) % cfg.flush_every == 0:
                    flush()
            if bar is not None:
                bar.update(task, advance=len(encs))
        flush()

    if exact is not None:
        ids = torch.tensor(exact.idx, dtype=torch.int64)
        o = torch.argsort(ids)  # rows and columns in unit order
        grams = {k: v[o][:, o].contiguous() for k, v in exact.grams().items()}
        write_safetensors({**grams, "__idx__": ids[o]}, out / "tensors" / "exact_gram.safetensors")
    dist_.barrier(info)
    examples = store.merge_examples() if info.is_main else read_examples(out)
    tables = summarize_geometry(out, cfg, info=info)
    if info.is_main:
        examples = read_examples(out)
        finish(store, examples, t0, report)
    dist_.barrier(info)
    return GeometryResult(out, examples, tables)


# ----------------------------------------------------------------------------------------------------------
# statistics from the store

from .stats import cosines as geo  # noqa: E402  (after the runner: the runner does not need it)
from .stats.diversity import GVendiAccumulator, marginal_contributions  # noqa: E402
from .stats.noise import noise_scale_ci, per_layer_noise  # noqa: E402

SCOPE_COLUMNS = ["scope", "scope_type", "kind", "block"]
MAX_LOO = 3000  # leave-one-out G-Vendi contributions above this many units would take minutes


def _scopes(layers: list[dict]) -> list[tuple[str, str, str, int, list[str]]]:
    """(scope, scope_type, kind, block, member layers): model, each kind, each block, each layer."""
    out = [("model", "model", "", -1, [li["name"] for li in layers])]
    kinds = list(dict.fromkeys(li["kind"] for li in layers))
    blocks = sorted({int(li["block"]) for li in layers if int(li["block"]) >= 0})
    out += [(f"kind:{k}", "kind", k, -1, [li["name"] for li in layers if li["kind"] == k]) for k in kinds]
    out += [(f"block:{b:02d}", "block", "", b, [li["name"] for li in layers if int(li["block"]) == b])
            for b in blocks]
    out += [(li["name"], "layer", li["kind"], int(li["block"]), [li["name"]]) for li in layers]
    return out


def _layer_grams(run: Path, layer_names: list[str], idx: np.ndarray, info) -> Callable[[str], np.ndarray]:
    """A function layer -> (n, n) float64 Gram over the units `idx` (exact file or projected features).

    Projected: every rank computes the row block of its share of units against all units; the blocks are
    summed across ranks with all_reduce (identical to one process)."""
    exact_file = run / "tensors" / "exact_gram.safetensors"
    if exact_file.exists():
        from safetensors.torch import load_file

        g = load_file(str(exact_file))
        pos = {int(i): p for p, i in enumerate(g["__idx__"].tolist())}
        sel = torch.tensor([pos[int(i)] for i in idx], dtype=torch.int64)
        return lambda name: g[name][sel][:, sel].double().numpy()
    fidx, feats = read_features(run, layer_names)
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    missing = [int(i) for i in idx if int(i) not in pos]
    if missing:
        raise RuntimeError(f"{run}: features missing for {len(missing)} finished units (e.g. {missing[:5]}); "
                           "the run directory is damaged; rerun into a new directory")
    sel = torch.tensor([pos[int(i)] for i in idx], dtype=torch.int64)
    n = len(idx)
    mine = torch.arange(info.rank, n, info.world_size)

    def gram(name: str) -> np.ndarray:
        F = feats[name][sel].double()
        if info.world_size == 1:
            return (F @ F.T).numpy()
        K = torch.zeros(n, n, dtype=torch.float64)
        K[mine] = F[mine] @ F.T
        torch.distributed.all_reduce(K)
        return K.numpy()

    return gram


def _with_scope(df: pd.DataFrame, scope) -> pd.DataFrame:
    df = df.copy()
    for i, (col, val) in enumerate(zip(SCOPE_COLUMNS, scope[:4])):
        df.insert(i, col, val)
    df["block"] = df["block"].astype("int64")
    return df


def _scope_tables(K: np.ndarray, ex: pd.DataFrame, scope, cfg: GeometryConfig, n_boot: int) -> dict[str, list]:
    out: dict[str, list] = {}
    labels = ex["label"].tolist()
    t = geo.geometry_table({scope[0]: K}, labels, n_boot=n_boot, seed=cfg.seed)
    for name in ("group_cosines", "pairs", "coherence"):
        out.setdefault(name, []).append(_with_scope(t[name].drop(columns="scope"), scope))
    multi = ex["role"].isin(["pair", "term"]).to_numpy()
    if multi.any():
        p = np.flatnonzero(multi)
        ta = geo.term_alignment(K[np.ix_(p, p)], ex["term"].iloc[p].tolist(), ex["record_idx"].iloc[p].tolist(),
                                n_boot=n_boot, seed=cfg.seed)
        out.setdefault("terms", []).append(_with_scope(ta, scope))
    pairs = _pair_positions(ex)
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        e = geo.entanglement(K[a, a], K[b, b], K[a, b])
        e.insert(0, "record_idx", ex["record_idx"].iloc[a].to_numpy())
        e.insert(1, "id", ex["id"].iloc[a].astype(str).to_numpy())
        e.insert(2, "group", ex["group"].iloc[a].astype(str).to_numpy())
        out.setdefault("entanglement", []).append(_with_scope(e, scope))
        s = geo.entanglement_summary(e, n_boot=n_boot, seed=cfg.seed)
        out.setdefault("entanglement_summary", []).append(_with_scope(pd.DataFrame([s]), scope))
    roll = np.flatnonzero((ex["role"] == "rollout").to_numpy())
    if roll.size:
        rows = []
        groups = ex["group"].iloc[roll].astype(str).to_numpy()
        rewards = ex["reward"].iloc[roll].to_numpy(dtype=np.float64)
        for g in ["__all__"] + sorted(set(groups)):
            sel = roll if g == "__all__" else roll[groups == g]
            r = rewards if g == "__all__" else rewards[groups == g]
            rows.append({"group": g, **geo.psr_nsr(K[np.ix_(sel, sel)], r, cfg.threshold, cfg.lam)})
        out.setdefault("psr_nsr", []).append(_with_scope(pd.DataFrame(rows), scope))
    return out


def _pair_positions(ex: pd.DataFrame) -> np.ndarray:
    """(P, 2) positions of (chosen, rejected) units of the pairs with both sides ok."""
    sub = ex[ex["role"] == "pair"]
    pos = {(int(r), str(t)): p for p, r, t in zip(sub.index, sub["record_idx"], sub["term"])}
    out = [(pos[(r, "chosen")], pos[(r, "rejected")]) for r in sorted({k[0] for k in pos})
           if (r, "chosen") in pos and (r, "rejected") in pos]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def summarize_geometry(run: Path, cfg: GeometryConfig | None = None, *, info=None,
                       log: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame] | None:
    """(Re)compute every geometry table of a run from its stored features; rank 0 writes and returns them.

    Under torchrun every rank must call this (the Gram blocks are reduced across ranks)."""
    run = Path(run)
    info = info or dist_.DistInfo()
    man = read_manifest(run)
    if cfg is None:
        cfg = GeometryConfig.from_dict(man["config"])
    layers = man["model"]["layers"]
    names = [li["name"] for li in layers]
    ex_all = read_examples(run)
    ex_all["label"] = unit_labels(ex_all, cfg.threshold)
    ex = ex_all[ex_all["status"] == "ok"].reset_index(drop=True)
    n_boot = cfg.summary.n_boot
    idx = ex["idx"].to_numpy(dtype=np.int64)
    gram = _layer_grams(run, names, idx, info)
    parts: dict[str, list] = {}
    scope_K: dict[str, np.ndarray] = {}
    scopes = _scopes(layers)
    n = len(idx)
    for s in scopes:  # sums over layers for the model / kind / block scopes
        if s[1] != "layer":
            scope_K[s[0]] = np.zeros((n, n))
    for name in names:
        K = gram(name)
        li = next(x for x in layers if x["name"] == name)
        scope_K.setdefault("model", np.zeros((n, n)))
        scope_K["model"] += K
        scope_K[f"kind:{li['kind']}"] += K
        if int(li["block"]) >= 0:
            scope_K[f"block:{int(li['block']):02d}"] += K
        if info.is_main and n:
            for k, v in _scope_tables(K, ex, next(s for s in scopes if s[0] == name), cfg, n_boot).items():
                parts.setdefault(k, []).extend(v)
    if not info.is_main:
        _diversity(run, ex, cfg, info)  # takes part in the all_reduce
        return None
    if n:
        for s in scopes:
            if s[1] != "layer":
                for k, v in _scope_tables(scope_K[s[0]], ex, s, cfg, n_boot).items():
                    parts.setdefault(k, []).extend(v)
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    order = {s[0]: i for i, s in enumerate(scopes)}
    for k, df in tables.items():  # model, kinds, blocks, layers
        tables[k] = df.sort_values("scope", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    tables["diversity"], model_F = _diversity(run, ex, cfg, info)
    tables["noise"] = _noise(run, ex, names, layers, n_boot, cfg.seed)
    tables["scores"] = _scores(run, ex, cfg, scope_K.get("model"), model_F)
    for name, df in tables.items():
        write_parquet(df, run / f"{name}.parquet")
    write_parquet(ex_all, run / "examples.parquet")
    return tables


def _diversity(run: Path, ex: pd.DataFrame, cfg: GeometryConfig, info):
    """G-Vendi per label and over all units, streamed shard by shard; ranks split the shards and all_reduce
    the r_model x r_model covariances."""
    labels = sorted(set(ex["label"]))
    label_of = dict(zip(ex["idx"].astype(int), ex["label"]))
    accs = {k: GVendiAccumulator(cfg.r_model) for k in ["__all__"] + labels}
    files = sorted((run / "features").glob("r*-*.safetensors"))
    from safetensors.torch import load_file

    model_rows: dict[int, torch.Tensor] = {}
    for f in files[info.rank::info.world_size]:
        part = load_file(str(f))
        if MODEL_KEY not in part:
            continue
        for i, row in zip(part["__idx__"].tolist(), part[MODEL_KEY].double()):
            if int(i) in label_of:
                model_rows[int(i)] = row
    ids = sorted(model_rows)
    if ids:
        F = torch.stack([model_rows[i] for i in ids])
        lab = np.asarray([label_of[i] for i in ids], dtype=object)
        accs["__all__"].update(F)
        for k in labels:
            m = torch.from_numpy(lab == k)
            if m.any():
                accs[k].update(F[m])
    if info.world_size > 1:
        for k, a in accs.items():
            st = a.state_dict()
            for t in st.values():
                torch.distributed.all_reduce(t)
            accs[k] = GVendiAccumulator.from_state(st)
    if not info.is_main:
        return None
    rows = [{"label": k, "n": a.n, "n_skipped": a.n_skipped, "g_vendi": a.score(cfg.q), "q": cfg.q}
            for k, a in accs.items()]
    return pd.DataFrame(rows), _model_features(run, ex)


def _model_features(run: Path, ex: pd.DataFrame) -> torch.Tensor | None:
    fidx, feats = read_features(run, [MODEL_KEY])
    if MODEL_KEY not in feats:
        return None
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    return feats[MODEL_KEY][[pos[int(i)] for i in ex["idx"]]].double()


def _noise(run: Path, ex: pd.DataFrame, names: list[str], layers: list[dict], n_boot: int, seed: int) -> pd.DataFrame:
    """B_simple and GSNR per layer and total, per label and over all plain units (all units if none)."""
    fidx, feats = read_features(run, names)
    pos = {int(i): p for p, i in enumerate(fidx.tolist())}
    info = {li["name"]: li for li in layers}
    plain = ex[ex["role"] == "loss"]
    sets = [("__all__", plain if len(plain) else ex)] + [(k, ex[ex["label"] == k]) for k in sorted(set(ex["label"]))]
    rows = []
    for label, sub in sets:
        if len(sub) < 2:
            rows.append(pd.DataFrame([{"label": label, "layer": "total", "n": len(sub),
                                       "note": f"{len(sub)} unit(s): the noise scale needs at least 2"}]))
            continue
        sel = [pos[int(i)] for i in sub["idx"]]
        F = {name: feats[name][sel].double() for name in names}
        df = per_layer_noise(F)
        ci = noise_scale_ci(torch.cat([F[nm] for nm in names], dim=1), n_boot=n_boot, seed=seed)
        df["b_ci_lo"] = np.where(df["layer"] == "total", ci["lo"], np.nan)
        df["b_ci_hi"] = np.where(df["layer"] == "total", ci["hi"], np.nan)
        df.insert(0, "label", label)
        df["note"] = ""
        rows.append(df)
    out = pd.concat(rows, ignore_index=True)
    out["kind"] = [info[x]["kind"] if x in info else "" for x in out["layer"]]
    out["block"] = np.asarray([int(info[x]["block"]) if x in info else -1 for x in out["layer"]], dtype=np.int64)
    return out


def _scores(run: Path, ex: pd.DataFrame, cfg: GeometryConfig, K: np.ndarray | None,
            model_F: torch.Tensor | None) -> pd.DataFrame:
    """Per-unit scores: exact gradient norm, mean effective rank over layers, cosine to the target label's
    mean gradient (whole model), leave-one-out G-Vendi contribution."""
    df = ex[["idx", "id", "group", "term", "label"]].copy()
    df["grad_norm"] = np.sqrt(ex["sq_norm"].to_numpy(dtype=np.float64))
    ls = read_layer_stats(run)
    if len(ls):
        er = ls[ls["metric"] == "erank"].groupby("idx")["value"].mean()
        df["erank"] = df["idx"].map(er).astype(float)
    else:
        df["erank"] = np.nan
    labels = sorted(set(ex["label"]))
    target = cfg.target if cfg.target is not None else (labels[0] if labels else "")
    if target and target not in labels:
        raise ValueError(f"target label {target!r} is not among the run's labels: {', '.join(labels)}")
    df["target"] = target
    df["cos_target"] = np.nan
    if K is not None and len(df):
        T = np.flatnonzero(ex["label"].to_numpy() == target)
        d = np.diag(K)
        mt = K[np.ix_(T, T)].mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            c = K[:, T].mean(axis=1) / np.sqrt(d * mt)
        df["cos_target"] = np.where((d > 0) & (mt > 0), np.clip(c, -1, 1), np.nan)
    df["diversity"] = np.nan
    if model_F is not None and 1 < len(df) <= MAX_LOO:
        df["diversity"] = marginal_contributions(model_F, q=cfg.q)
    return df


# ----------------------------------------------------------------------------------------------------------
# selection

SCORE_COLUMNS = ("grad_norm", "erank", "cos_target", "diversity")


def select(run: str | Path, budget: int, *, by: str = "diversity", ascending: bool = False,
           labels: list[str] | None = None, diverse: bool = False, pool: int | None = None,
           q: float | None = None) -> pd.DataFrame:
    """Pick `budget` units of a geometry run by a score, optionally diversity-aware.

    Args:
        run: geometry run directory (with scores.parquet).
        budget: number of units to pick.
        by: score column: grad_norm, erank, cos_target or diversity (leave-one-out G-Vendi contribution).
        ascending: pick the lowest scores instead of the highest.
        labels: only units with these labels (default: all).
        diverse: among the `pool` best units by the score, pick greedily the set of maximal G-Vendi
            (whole-model features) instead of the top scores.
        pool: candidate pool size for `diverse` (default: min(n, 4 * budget)).
        q: Vendi order (default: the run's).

    Returns:
        DataFrame (rank, idx, id, group, term, label, score) in pick order. Units with a NaN score are
        never picked; asking for more than the candidates raises a ValueError that says how many exist.
    """
    from .stats.diversity import greedy_select

    run = Path(run)
    if by not in SCORE_COLUMNS:
        raise ValueError(f"--by must be one of {', '.join(SCORE_COLUMNS)}; got {by!r}")
    p = run / "scores.parquet"
    if not p.exists():
        raise FileNotFoundError(f"{run}: no scores.parquet; run `gradsight geometry` into it first")
    sc = pd.read_parquet(p)
    if labels:
        unknown = sorted(set(labels) - set(sc["label"]))
        if unknown:
            raise ValueError(f"unknown label(s) {', '.join(unknown)}; the run has {', '.join(sorted(set(sc['label'])))}")
        sc = sc[sc["label"].isin(labels)]
    n_nan = int(sc[by].isna().sum())
    sc = sc[sc[by].notna()]
    if budget < 1 or budget > len(sc):
        raise ValueError(f"budget must be between 1 and the {len(sc)} candidate units with a '{by}' score "
                         f"({n_nan} have none); got {budget}")
    sc = sc.sort_values([by, "idx"], ascending=[ascending, True], kind="stable").reset_index(drop=True)
    if diverse:
        pool = min(len(sc), pool or 4 * budget)
        if pool < budget:
            raise ValueError(f"pool ({pool}) must be at least the budget ({budget})")
        cand = sc.iloc[:pool]
        F = _model_features(run, cand)
        if F is None:
            raise ValueError(f"{run}: no whole-model features stored; cannot select for diversity")
        man = read_manifest(run)
        order = greedy_select(F, budget, q=q if q is not None else man["config"].get("q", 1.0))
        chosen = cand.iloc[order]
    else:
        chosen = sc.iloc[:budget]
    out = chosen[["idx", "id", "group", "term", "label"]].copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["score"] = chosen[by].to_numpy()
    out["by"] = by
    return out.reset_index(drop=True)
