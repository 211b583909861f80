"""Synthetic run directory for report tests (no model, no torch).

`make_fake_run` writes a schema-conforming RUN directory (docs/architecture.md, schema version 1) with
plausible synthetic numbers. The group tables (summary, mad, rd, tests) are computed here in a deliberately
simple way (normal-approximation CIs and p-values); they only need to look like the real thing, the report
never recomputes statistics.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

EVIL = (
    '<script>alert("x")</script> then </script><b>INJECTED</b> '
    '<img src=x onerror="document.body.dataset.pwned=1"> & done'
)
EVIL_ID = 'ex"><i>evil-id</i>'
GROUP_NAMES = ["direct", "simplified_cot", "detailed <cot> & [long]", "group_3", "group_4", "group_5"]
SKIP_REASONS = [
    "empty response",
    "response entirely truncated (prompt has 1030 tokens, max_length 1024)",
    "non-finite gradient in model.layers.3.mlp.down_proj",
]
METRICS = ("frobenius", "nuclear", "spectral", "sigma1_ratio", "erank", "stable_rank")
_LLAMA = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _layer_name(block: int, kind: str) -> str:
    return f"model.layers.{block}.{_LLAMA.get(kind, kind)}"


def _p_normal(z: float, n_perm: int) -> float:
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return max(p, 1.0 / (n_perm + 1))


def _bh(p: np.ndarray) -> np.ndarray:
    n = len(p)
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def _segments(n_blocks: int) -> list[tuple[str, int, int]]:
    a, b = round(n_blocks / 3), round(2 * n_blocks / 3)
    return [("all", 0, n_blocks), ("early", 0, a), ("middle", a, b), ("late", b, n_blocks)]


def _mad(c: np.ndarray) -> float:
    return float(np.mean(np.abs(np.diff(c)))) if len(c) > 1 else float("nan")


def make_fake_run(
    path,
    n_groups: int = 3,
    n_blocks: int = 6,
    kinds=("q", "k", "v", "o", "gate", "up", "down"),
    n_per_group: int = 8,
    seed: int = 0,
    with_skipped: bool = True,
    evil_prompt: bool = True,
) -> Path:
    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = GROUP_NAMES[:n_groups] if n_groups <= len(GROUP_NAMES) else [f"group_{i}" for i in range(n_groups)]
    kinds = list(kinds)
    n_perm = 999

    # ---- examples --------------------------------------------------------------------------------------
    rows = []
    idx = 0
    for gi, g in enumerate(groups):
        n_rows = n_per_group + (min(2, len(SKIP_REASONS)) if with_skipped and gi < 2 else 0)
        for j in range(n_rows):
            skipped = j >= n_per_group
            n_target = int(rng.integers(8, 30)) * (1 + 6 * gi)  # later groups: longer responses
            n_prompt = int(rng.integers(20, 60))
            prompt = f"Question {idx}: what is {j} + {gi}?"
            response = ("Let me think step by step. " * (gi * 3)) + f"The answer is {j + gi}."
            if evil_prompt and idx == 0:
                prompt = prompt + " " + EVIL
                response = response + " " + EVIL
            reason = ""
            loss = float(rng.uniform(0.5, 3.0))
            if skipped:
                reason = SKIP_REASONS[(j - n_per_group + gi) % len(SKIP_REASONS)]
                if reason == "empty response":
                    response, n_target = "", 0
                elif reason.startswith("response entirely truncated"):
                    n_target, n_prompt = 0, 1030
                if not reason.startswith("non-finite"):
                    loss = float("nan")
            rows.append(
                dict(
                    idx=idx,
                    id=EVIL_ID if (evil_prompt and idx == 1) else f"{g[:6]}-{j}",
                    group=g,
                    source=f"data/fake.jsonl:{idx + 1}",
                    status="skipped" if skipped else "ok",
                    reason=reason,
                    n_tokens=n_prompt + n_target,
                    n_target=n_target,
                    loss=loss,
                    prompt=prompt,
                    response=response,
                )
            )
            idx += 1
    examples = pd.DataFrame(rows).astype(
        {"idx": "int64", "n_tokens": "int64", "n_target": "int64", "loss": "float64"}
    )
    examples.to_parquet(run / "examples.parquet", index=False)

    # ---- layer stats (long format, two shards) --------------------------------------------------------
    ok = examples[examples.status == "ok"]
    blocks = np.arange(n_blocks)
    recs = []
    for _, ex in ok.iterrows():
        gi = groups.index(ex.group)
        scale = 2.0 / math.sqrt(1 + ex.n_target / 10)  # longer responses -> smaller gradients
        for ki, kind in enumerate(kinds):
            shape = 1.0 + (0.8 / (1 + gi)) * np.sin(blocks * 1.3 + ki) + 0.3 * np.exp(-blocks)
            nuc = scale * (1 + 0.1 * ki) * shape * rng.lognormal(0, 0.15, n_blocks)
            ratio = np.clip(0.35 / (1 + 0.5 * gi) + rng.normal(0, 0.03, n_blocks), 0.02, 1.0)
            er = np.clip(1 + 3 * (1 + gi) + rng.normal(0, 0.5, n_blocks), 1, None)
            spec = ratio * nuc
            fro = np.sqrt(spec * nuc) * 0.9
            values = {
                "frobenius": fro,
                "nuclear": nuc,
                "spectral": spec,
                "sigma1_ratio": ratio,
                "erank": er,
                "stable_rank": (fro / spec) ** 2,
            }
            for b in blocks:
                for m in METRICS:
                    recs.append((int(ex.idx), ex.group, _layer_name(int(b), kind), int(b), kind, m,
                                 float(values[m][b])))
    ls = pd.DataFrame(recs, columns=["idx", "group", "layer", "block", "kind", "metric", "value"])
    ls = ls.astype({"idx": "int64", "block": "int64", "value": "float64"})
    (run / "layer_stats").mkdir(exist_ok=True)
    half = len(ls) // 2
    ls.iloc[:half].to_parquet(run / "layer_stats" / "r0-00000.parquet", index=False)
    ls.iloc[half:].to_parquet(run / "layer_stats" / "r0-00001.parquet", index=False)

    # ---- summary ---------------------------------------------------------------------------------------
    agg = ls.groupby(["group", "kind", "block", "metric"], sort=False)["value"].agg(["mean", "std", "count"])
    agg = agg.reset_index().rename(columns={"std": "sd", "count": "n"})
    half_w = 1.96 * agg["sd"] / np.sqrt(agg["n"])
    agg["ci_lo"], agg["ci_hi"] = agg["mean"] - half_w, agg["mean"] + half_w
    summary = agg[["group", "kind", "block", "metric", "mean", "sd", "n", "ci_lo", "ci_hi"]].astype({"n": "int64"})
    summary.to_parquet(run / "summary.parquet", index=False)

    curves = {
        (g, k, m): d.sort_values("block")["mean"].to_numpy()
        for (g, k, m), d in summary.groupby(["group", "kind", "metric"])
    }

    # ---- mad ---------------------------------------------------------------------------------------------
    mrows = []
    for (g, k, m), c in curves.items():
        for seg, start, stop in _segments(n_blocks):
            mrows.append((g, k, m, seg, start, stop, _mad(c[start:stop])))
    mad = pd.DataFrame(mrows, columns=["group", "kind", "metric", "segment", "start", "stop", "value"])
    mad.astype({"start": "int64", "stop": "int64"}).to_parquet(run / "mad.parquet", index=False)

    if n_groups < 2:
        _write_manifest(run, groups, kinds, n_blocks, len(examples), seed)
        return run

    # ---- rd ----------------------------------------------------------------------------------------------
    ref = groups[0]
    rrows = []
    for g in groups[1:]:
        for k in kinds:
            for m in METRICS:
                a, b = curves[(ref, k, m)], curves[(g, k, m)]
                per = np.abs(a - b) / np.where(a == 0, 1e-10, np.abs(a))
                top = ",".join(str(int(i)) for i in np.argsort(-per)[:5])
                rrows.append((ref, g, k, m, float(per.mean()), top))
    pd.DataFrame(rrows, columns=["reference", "group", "kind", "metric", "rd", "top_blocks"]).to_parquet(
        run / "rd.parquet", index=False
    )

    # ---- tests -------------------------------------------------------------------------------------------
    dm = ls.groupby(["idx", "group", "kind", "metric"])["value"].mean()
    dm_by = {key: d.to_numpy() for key, d in dm.groupby(level=["group", "kind", "metric"])}
    summary_ix = summary.set_index(["group", "kind", "metric"]).sort_index()
    trows = []
    for ga, gb in combinations(groups, 2):
        for k in kinds:
            for m in METRICS:
                xa, xb = dm_by[(ga, k, m)], dm_by[(gb, k, m)]
                se = math.sqrt(xa.var(ddof=1) / len(xa) + xb.var(ddof=1) / len(xb)) or 1e-12
                stat = float(xa.mean() - xb.mean())
                common = dict(group_a=ga, group_b=gb, kind=k, metric=m, n_perm=n_perm, n_a=len(xa), n_b=len(xb),
                              n_dropped=0, note="")
                trows.append(dict(common, test="mean_diff", block=-1, statistic=stat,
                                  p_value=_p_normal(stat / se, n_perm), q_value=float("nan")))
                mstat = _mad(curves[(ga, k, m)]) - _mad(curves[(gb, k, m)])
                trows.append(dict(common, test="mad_diff", block=-1, statistic=mstat,
                                  p_value=_p_normal(mstat / (0.3 * se + 1e-12), n_perm), q_value=float("nan")))
                sa = summary_ix.loc[(ga, k, m)].sort_values("block")
                sb = summary_ix.loc[(gb, k, m)].sort_values("block")
                layer_rows = []
                for b in range(n_blocks):
                    ra, rb = sa.iloc[b], sb.iloc[b]
                    s = math.sqrt(ra["sd"] ** 2 / ra["n"] + rb["sd"] ** 2 / rb["n"]) or 1e-12
                    st = float(ra["mean"] - rb["mean"])
                    layer_rows.append(dict(common, test="layer_mean_diff", block=b, statistic=st,
                                           p_value=_p_normal(st / s, n_perm)))
                q = _bh(np.array([r["p_value"] for r in layer_rows]))
                for r, qv in zip(layer_rows, q):
                    r["q_value"] = float(qv)
                trows.extend(layer_rows)
    tests = pd.DataFrame(trows)[
        ["group_a", "group_b", "kind", "metric", "test", "block", "statistic", "p_value", "q_value", "n_perm",
         "n_a", "n_b", "n_dropped", "note"]
    ].astype({"block": "int64", "n_perm": "int64", "n_a": "int64", "n_b": "int64", "n_dropped": "int64"})
    tests.loc[0, "note"] = "synthetic <note> & test"
    tests.to_parquet(run / "tests.parquet", index=False)

    _write_manifest(run, groups, kinds, n_blocks, len(examples), seed)
    return run


def _write_manifest(run: Path, groups, kinds, n_blocks: int, n_records: int, seed: int) -> None:
    layers = [_layer_name(b, k) for b in range(n_blocks) for k in kinds]
    manifest = {
        "schema_version": 1,
        "config": {
            "model": {"path": "fake/tiny-llama", "dtype": "float32", "device": "cpu"},
            "data": {"path": "data/fake <evil>.jsonl", "max_length": 1024, "loss_on": "response",
                     "chat_template": "auto"},
            "layers": {"include": ["*.self_attn.*_proj", "*.mlp.*_proj"], "exclude": []},
            "loss": {"reduction": "mean"},
            "stats": {"metrics": list(METRICS), "n_boot": 1000, "n_perm": 999, "ci": 0.95},
            "batch": {"token_budget": 4096},
        },
        "config_hash": "0123456789abcdef",
        "model": {"id": "fake/tiny-llama", "fingerprint": "deadbeef", "n_blocks": n_blocks, "layers": layers},
        "data": {"path": "data/fake <evil>.jsonl", "sha256": "f" * 64, "n_records": n_records},
        "versions": {"gradsight": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0", "python": "3.11"},
        "seed": seed,
        "world_size": 1,
        "created": "2025-01-01T00:00:00+00:00",
    }
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
