"""Synthetic `gradsight geometry` run directory for the geometry report tests (no model, no torch).

`make_fake_geometry_run` draws random per-unit gradient features with label- and depth-dependent mean
directions, forms the Gram matrix of every scope (layer, block, kind, model; a sum of the per-layer Grams)
and writes the geometry tables. Group cosines, cosine distributions, coherence, term alignment,
entanglement and PSR/NSR come from ``gradsight.stats.cosines`` (so the tables have the real columns and
NaN conventions); G-Vendi, the noise scale and the per-unit scores are computed here in plain numpy.

The run holds: plain-loss units in every group (the last group has ONE, so its CIs are NaN with a note),
preference pairs (chosen / rejected) and user loss terms in the first group, rewarded rollouts in the
second group, one skipped unit, and user text with ``<script>`` in a prompt, a record id and a group name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fake_run import EVIL, EVIL_ID, _layer_name

from gradsight.stats import cosines as geo

GROUPS = ["direct", "detailed <cot> & [long]", "solo", "group_3", "group_4"]
KINDS = ("q", "v", "down")
SKIP_REASON = "response entirely truncated (prompt has 1030 tokens, max_length 1024)"
N_BOOT = 200


def _scope_cols(scope: str, scope_type: str, kind: str = "", block: int = -1) -> dict:
    return {"scope": scope, "scope_type": scope_type, "kind": kind, "block": int(block)}


def _vendi(F: np.ndarray) -> float:
    """Vendi score (q = 1) of the unit-normalised rows of F."""
    if F.shape[0] == 0:
        return float("nan")
    X = F / np.linalg.norm(F, axis=1, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(X @ X.T / X.shape[0]), 0, None)
    lam = lam[lam > 1e-12] / lam.sum()
    return float(np.exp(-(lam * np.log(lam)).sum()))


def _noise(F: np.ndarray) -> dict:
    """B_simple = tr(Sigma) / |G|^2 with the unbiased |G|^2, and the mean per-coordinate GSNR."""
    n = F.shape[0]
    if n < 2:
        return dict(n=n, trace_sigma=float("nan"), g_sq=float("nan"), b_simple=float("nan"),
                    gsnr_mean=float("nan"))
    var = F.var(axis=0, ddof=1)
    tr = float(var.sum())
    mean = F.mean(axis=0)
    g_sq = float(mean @ mean - tr / n)
    b = tr / g_sq if g_sq > 0 else float("inf")
    return dict(n=n, trace_sigma=tr, g_sq=g_sq, b_simple=b, gsnr_mean=float(np.mean(mean ** 2 / (var + 1e-12))))


def make_fake_geometry_run(
    path,
    *,
    n_groups: int = 3,
    with_pairs: bool = True,
    with_rollouts: bool = True,
    with_terms: bool = True,
    evil: bool = True,
    n_blocks: int = 6,
    n_per_group: int = 6,
    seed: int = 0,
) -> Path:
    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = GROUPS[:n_groups] if n_groups <= len(GROUPS) else [f"group_{i}" for i in range(n_groups)]
    if not evil:
        groups = [g.replace("<", "").replace(">", "").replace("&", "and") for g in groups]
    layers = [(_layer_name(b, k), b, k) for b in range(n_blocks) for k in KINDS]
    d = 24  # projected feature size per layer
    threshold, lam = 0.5, 0.1

    # ---- units ----------------------------------------------------------------------------------------
    units: list[dict] = []
    rec = 0

    def add(group: str, term: str, role: str, label: str, reward: float = float("nan"), rid: str | None = None,
            prompt: str = "", status: str = "ok", reason: str = "") -> None:
        units.append(dict(idx=len(units), id=rid or f"rec-{rec:03d}", group=group, source="data/fake.jsonl",
                          status=status, reason=reason, n_tokens=int(rng.integers(40, 200)),
                          n_target=int(rng.integers(8, 80)), loss=float(rng.uniform(0.5, 3.0)),
                          prompt=prompt or f"Question {rec}: what is {rec} + 1?",
                          response=f"The answer is {rec + 1}." + (" Let me explain. " * (rec % 3)),
                          record_idx=rec, term=term, role=role, label=label, reward=reward))

    for gi, g in enumerate(groups):
        n = 1 if (gi == len(groups) - 1 and len(groups) >= 2) else n_per_group
        for j in range(n):
            evil_here = evil and gi == 0 and j == 0
            add(g, "loss", "loss", g, rid=EVIL_ID if evil_here else None, prompt=(f"Q {rec}: " + EVIL) if evil_here
                else "")
            rec += 1
        if gi == 0:
            add(g, "loss", "loss", g, status="skipped", reason=SKIP_REASON)
            units[-1]["loss"] = float("nan")
            rec += 1
            if with_pairs:
                for j in range(8):
                    rid = f"pair-{j}" + (' <b>"x"</b> & y' if evil and j == 0 else "")
                    for t in ("chosen", "rejected"):
                        add(g, t, "pair", f"{g}:{t}", rid=rid)
                    rec += 1
            if with_terms:
                for j in range(6):
                    for t in ("answer", "format"):
                        add(g, t, "term", f"{g}:{t}")
                    rec += 1
        if gi == 1 and with_rollouts:
            for j in range(10):
                r = float(j % 3 != 0)
                add(g, "rollout", "rollout", f"{g}:{'positive' if r > threshold else 'negative'}", reward=r)
                rec += 1
    ex = pd.DataFrame(units).astype({"idx": "int64", "record_idx": "int64", "n_tokens": "int64",
                                     "n_target": "int64", "loss": "float64", "reward": "float64"})
    ex.to_parquet(run / "examples.parquet", index=False)
    ok = ex[ex.status == "ok"].reset_index(drop=True)
    labels = ok["label"].tolist()
    n = len(ok)

    # ---- features per layer: label direction (rotating with depth) + shared direction + noise --------
    label_names = list(dict.fromkeys(labels))
    feats: dict[str, np.ndarray] = {}
    for name, b, k in layers:
        base = rng.normal(size=d)
        dirs = {lab: rng.normal(size=d) for lab in label_names}
        for lab in label_names:  # incorrect rollouts pull against the correct ones
            if lab.endswith(":negative") and lab[: -len("negative")] + "positive" in dirs:
                dirs[lab] = -dirs[lab[: -len("negative")] + "positive"] + 0.5 * rng.normal(size=d)
        share = max(0.8 - 0.2 * b, 0.0)  # labels agree early, diverge late
        F = np.empty((n, d))
        for i, u in enumerate(ok.itertuples()):
            mu = share * base + (1 - share) * dirs[u.label]
            if u.role == "pair":  # chosen and rejected of one record share most of their gradient
                mu = base + 0.3 * dirs[u.label]
            F[i] = mu * rng.uniform(0.5, 2.0) + rng.normal(scale=1.2, size=d)
        if with_pairs:  # pair records: rejected = chosen + small perturbation (entanglement)
            for rid in ok.loc[ok.role == "pair", "id"].unique():
                ic = ok.index[(ok.id == rid) & (ok.term == "chosen")][0]
                ir = ok.index[(ok.id == rid) & (ok.term == "rejected")][0]
                F[ir] = F[ic] * rng.uniform(0.6, 1.4) + rng.normal(scale=0.6, size=d)
        feats[name] = F
    grams = {name: F @ F.T for name, F in feats.items()}
    scopes: list[tuple[dict, np.ndarray, np.ndarray]] = []  # (scope columns, K, F)
    allF = np.concatenate([feats[name] for name, _, _ in layers], axis=1)
    scopes.append((_scope_cols("model", "model"), sum(grams.values()), allF))
    for k in KINDS:
        names = [nm for nm, _, kk in layers if kk == k]
        scopes.append((_scope_cols(f"kind:{k}", "kind", k), sum(grams[x] for x in names),
                       np.concatenate([feats[x] for x in names], axis=1)))
    for b in range(n_blocks):
        names = [nm for nm, bb, _ in layers if bb == b]
        scopes.append((_scope_cols(f"block:{b:02d}", "block", "", b), sum(grams[x] for x in names),
                       np.concatenate([feats[x] for x in names], axis=1)))
    for nm, b, k in layers:
        scopes.append((_scope_cols(nm, "layer", k, b), grams[nm], feats[nm]))

    def with_scope(df: pd.DataFrame, sc: dict) -> pd.DataFrame:
        df = df.copy()
        for i, (c, v) in enumerate(sc.items()):
            df.insert(i, c, v)
        return df

    def write(parts: list[pd.DataFrame], name: str) -> None:
        df = pd.concat(parts, ignore_index=True)
        df["block"] = df["block"].astype("int64")
        df.to_parquet(run / f"{name}.parquet", index=False)

    # ---- group cosines, pairs, coherence ------------------------------------------------------------------
    gc, pr, co = [], [], []
    for sc, K, _ in scopes:
        t = geo.geometry_table({sc["scope"]: K}, labels, n_boot=N_BOOT, seed=seed)
        gc.append(with_scope(t["group_cosines"].drop(columns="scope"), sc))
        pr.append(with_scope(t["pairs"].drop(columns="scope"), sc))
        co.append(with_scope(t["coherence"].drop(columns="scope"), sc))
    write(gc, "group_cosines")
    write(pr, "pairs")
    write(co, "coherence")

    # ---- loss terms --------------------------------------------------------------------------------------
    if with_terms:
        rows = ok.index[ok.role == "term"].to_numpy()
        parts = []
        for sc, K, _ in scopes:
            t = geo.term_alignment(K[np.ix_(rows, rows)], ok.loc[rows, "term"].tolist(),
                                   ok.loc[rows, "record_idx"].tolist(), n_boot=N_BOOT, seed=seed)
            parts.append(with_scope(t, sc))
        write(parts, "terms")

    # ---- entanglement ------------------------------------------------------------------------------------
    if with_pairs:
        pairs = ok[ok.role == "pair"]
        recs = list(dict.fromkeys(pairs.record_idx))
        ic = np.array([pairs.index[(pairs.record_idx == r) & (pairs.term == "chosen")][0] for r in recs])
        ir = np.array([pairs.index[(pairs.record_idx == r) & (pairs.term == "rejected")][0] for r in recs])
        parts, summ = [], []
        for sc, K, _ in scopes:
            e = geo.entanglement(K[ic, ic], K[ir, ir], K[ic, ir])
            e.insert(0, "record_idx", np.asarray(recs, dtype=np.int64))
            e.insert(1, "id", ok.loc[ic, "id"].to_numpy())
            e.insert(2, "group", ok.loc[ic, "group"].to_numpy())
            parts.append(with_scope(e, sc))
            s = geo.entanglement_summary(e, n_boot=N_BOOT, seed=seed)
            summ.append(with_scope(pd.DataFrame([s]), sc))
        write(parts, "entanglement")
        write(summ, "entanglement_summary")

    # ---- PSR / NSR ---------------------------------------------------------------------------------------
    if with_rollouts:
        ro = ok[ok.role == "rollout"]
        parts = []
        for sc, K, _ in scopes:
            sets = [("__all__", ro.index.to_numpy())]
            sets += [(g, ro.index[ro.group == g].to_numpy()) for g in dict.fromkeys(ro.group)]
            for g, rows in sets:
                r = geo.psr_nsr(K[np.ix_(rows, rows)], ro.loc[rows, "reward"].to_numpy(), threshold, lam)
                parts.append(with_scope(pd.DataFrame([dict(group=g, **r)]), sc))
        write(parts, "psr_nsr")

    # ---- diversity and noise (model features) --------------------------------------------------------------
    lab_sets = [("__all__", np.arange(n))] + [(lab, np.flatnonzero(np.asarray(labels) == lab))
                                                for lab in label_names]
    n_skipped = int((ex.status != "ok").sum())
    div = [dict(label=lab, n=len(rows), n_skipped=n_skipped if lab == "__all__" else 0,
                g_vendi=_vendi(allF[rows]), q=1.0) for lab, rows in lab_sets]
    pd.DataFrame(div).astype({"n": "int64", "n_skipped": "int64"}).to_parquet(run / "diversity.parquet",
                                                                              index=False)
    nrows = []
    for lab, rows in lab_sets:
        for nm, b, k in layers:
            nrows.append(dict(label=lab, layer=nm, kind=k, block=b, **_noise(feats[nm][rows]),
                              b_ci_lo=float("nan"), b_ci_hi=float("nan")))
        tot = dict(label=lab, layer="total", kind="", block=-1, **_noise(allF[rows]))
        b = tot["b_simple"]  # a plausible interval around the estimate (the report never recomputes it)
        tot["b_ci_lo"], tot["b_ci_hi"] = (0.7 * b, 1.5 * b) if math.isfinite(b) else (float("nan"), float("nan"))
        nrows.append(tot)
    pd.DataFrame(nrows).astype({"block": "int64", "n": "int64"}).to_parquet(run / "noise.parquet", index=False)

    # ---- per-unit scores ------------------------------------------------------------------------------------
    target = groups[0]
    tmean = allF[np.asarray(labels) == target].mean(axis=0)
    vs_all = _vendi(allF)
    srows = []
    for i, u in enumerate(ok.itertuples()):
        f = allF[i]
        srows.append(dict(idx=u.idx, id=u.id, group=u.group, term=u.term, label=u.label,
                          grad_norm=float(np.linalg.norm(f)), erank=float(rng.uniform(2, 20)),
                          cos_target=float(f @ tmean / (np.linalg.norm(f) * np.linalg.norm(tmean))),
                          target=target, diversity=vs_all - _vendi(np.delete(allF, i, axis=0))))
    pd.DataFrame(srows).astype({"idx": "int64"}).to_parquet(run / "scores.parquet", index=False)

    # ---- manifest -------------------------------------------------------------------------------------------
    manifest = {
        "schema_version": 1,
        "analysis": "geometry",
        "config": {
            "model": {"path": "fake/tiny-llama", "dtype": "float32", "device": "cpu"},
            "data": {"path": "data/fake <evil>.jsonl" if evil else "data/fake.jsonl", "max_length": 1024,
                     "loss_on": "response", "chat_template": "auto"},
            "layers": {"include": ["*.self_attn.q_proj", "*.self_attn.v_proj", "*.mlp.down_proj"], "exclude": []},
            "loss": {"reduction": "mean"},
            "stats": {"n_boot": N_BOOT, "ci": 0.95},
        },
        "config_hash": "0123456789abcdef",
        "model": {"id": "fake/tiny-llama", "fingerprint": "deadbeef", "n_blocks": n_blocks,
                  "layers": [nm for nm, _, _ in layers]},
        "data": {"path": "data/fake <evil>.jsonl" if evil else "data/fake.jsonl", "sha256": "f" * 64,
                 "n_records": rec},
        "geometry": {"mode": "projected",
                     "projection": {"r_in": 16, "r_out": 16, "r_dense": 256, "kind": "gaussian", "seed": 0},
                     "r_model": d * len(layers), "target": target, "threshold": threshold, "lam": lam,
                     "feature_dtype": "float32"},
        "versions": {"gradsight": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0", "python": "3.11"},
        "seed": seed,
        "world_size": 1,
        "created": "2025-01-01T00:00:00+00:00",
    }
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return run


if __name__ == "__main__":  # pragma: no cover - manual inspection
    import sys

    print(make_fake_geometry_run(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fake-geometry"))
