"""The `geometry` analysis end to end on tiny random models: exact mode against materialised per-example
gradients, projected features against a dense projection, batch-composition invariance, resume, bad input,
CLI and selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from gradsight.analyses.geometry import GeometryConfig, run_geometry, select
from gradsight.analyses.geometry.compute import MODEL_KEY, expand_units, unit_labels
from gradsight.analyses.geometry.summarize import scope_tables
from gradsight.analyses.geometry.summarize import summarize as summarize_geometry
from gradsight.config import SummaryOptions
from gradsight.demo.problems import demo_records, geometry_records
from gradsight.inputs.data import DataError, EncodeOptions, collate, encode, load_records
from gradsight.inputs.losses import loss_fn_for
from gradsight.inputs.models import select_layers
from gradsight.measures.projection import Projector
from gradsight.runs import store
from gradsight.runs.store import RunMismatchError, read_examples, read_features

from helpers import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def mixed_records(n_problems: int = 3) -> list[dict]:
    """The geometry demo's records (plain answers, preference pairs, rewarded rollouts) plus two named terms
    per problem."""
    out = geometry_records(n_problems)
    for r in demo_records(n_problems=n_problems):
        if r["group"] == "slow":
            out.append({"id": f"terms{r['problem']}", "group": "multi", "prompt": r["prompt"],
                        "terms": {"sft": r["response"], "aux": r["response"].split("\n")[-1]}})
    return out


def _cfg(**kw) -> GeometryConfig:
    base = dict(model="tiny", data="", encode=EncodeOptions(max_length=256), token_budget=2000, max_batch=4,
                flush_every=1, attn_implementation="eager", kinds=("q", "v", "down"),
                summary=SummaryOptions(n_boot=50))
    base.update(kw)
    return GeometryConfig(**base)


def _run(tmp, name, model, records, **kw):
    return run_geometry(_cfg(**kw), tmp / name, progress=False, report=False, model=model,
                        tokenizer=tiny_tokenizer(), records=records)


@pytest.fixture(scope="module")
def model64():
    return tiny_model(seed=1, dtype=torch.float64)


def reference_grads(model, cfg: GeometryConfig, records: list[dict]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Materialised per-unit gradients {layer: (n, d_out, d_in)}, one backward per unit (the slow path)."""
    recs, bad = load_records(records, terms=True)
    units, _ = expand_units(recs, bad)
    layers = select_layers(model, kinds=cfg.kinds or None, pattern=cfg.pattern)
    mods = dict(model.named_modules())
    weights = [mods[li.name].weight for li in layers]
    loss_sum = loss_fn_for(model, "sum")
    idx, out = [], {li.name: [] for li in layers}
    for u in units:
        e = encode(u.as_record(), tiny_tokenizer(), cfg.encode)
        if not e.ok:
            continue
        batch = collate([e], tiny_tokenizer().pad_token_id)
        scale = 1.0 if u.role in ("pair", "rollout") else 1.0 / e.n_target
        with torch.enable_grad():
            gs = torch.autograd.grad(loss_sum(model, batch)[0] * scale, weights)
        idx.append(u.idx)
        for li, g in zip(layers, gs):
            out[li.name].append(g.detach())
    return idx, {k: torch.stack(v) for k, v in out.items()}


def test_exact_mode_equals_materialised_reference(tmp_path, model64):
    records = mixed_records(3)
    cfg = _cfg(exact=True, spectra=False)
    res = run_geometry(cfg, tmp_path / "exact", progress=False, report=False, model=model64,
                       tokenizer=tiny_tokenizer(), records=records)
    ex = read_examples(res.path)
    assert (ex["status"] == "ok").all() and len(ex) == 9 + 3 * (2 + 2 + 2)
    idx, M = reference_grads(model64, cfg, records)
    assert idx == ex["idx"].tolist()
    # exact Grams per layer = Gram of the flattened materialised gradients
    g = load_file(str(res.path / "tensors" / "exact_gram.safetensors"))
    assert g["__idx__"].tolist() == idx
    K_model = 0
    for name, m in M.items():
        F = m.reshape(len(idx), -1)
        K = F @ F.T
        torch.testing.assert_close(g[name], K, rtol=1e-9, atol=1e-12)
        K_model = K_model + K
    # every model-scope geometry number equals the same statistic on the dense reference Gram
    ex["label"] = unit_labels(ex, cfg.threshold)
    ref = scope_tables(K_model.numpy(), ex, ("model", "model", "", -1), cfg, cfg.summary.n_boot)
    for name, parts in ref.items():
        got = res.tables[name]
        got = got[got["scope"] == "model"].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, parts[0].reset_index(drop=True), rtol=1e-7, check_dtype=False)
    # squared norms in the examples table are exact too
    sq = sum((m.reshape(len(idx), -1) ** 2).sum(1) for m in M.values())
    np.testing.assert_allclose(ex["sq_norm"].to_numpy(), sq.numpy(), rtol=1e-9)
    # entanglement by hand for the first pair
    e = res.tables["entanglement"]
    e = e[e["scope"] == "model"].iloc[0]
    a, b = ex.index[(ex["id"] == e["id"]) & (ex["term"] == "chosen")][0], \
        ex.index[(ex["id"] == e["id"]) & (ex["term"] == "rejected")][0]
    Kn = K_model.numpy()
    assert e["inner"] == pytest.approx(Kn[a, b], rel=1e-9)
    assert e["delta_chosen"] == pytest.approx(Kn[a, a] - Kn[a, b], rel=1e-9)
    assert e["delta_rejected"] == pytest.approx(Kn[a, b] - Kn[b, b], rel=1e-9)


def test_projected_features_are_the_dense_projection_of_materialised_gradients(tmp_path, model64):
    records = mixed_records(2)
    cfg = _cfg(r_in=8, r_out=4, r_model=64, spectra=False)
    res = _run(tmp_path, "proj", model64, records, r_in=8, r_out=4, r_model=64, spectra=False)
    idx, M = reference_grads(model64, cfg, records)
    fidx, feats = read_features(res.path)
    assert fidx.tolist() == idx
    proj = Projector(cfg.projection(), dtype=torch.float64)
    model_feat = 0
    for name, m in M.items():
        d_out, d_in = m.shape[1:]
        P_in = proj.matrix(name, "in", cfg.r_in, d_in)
        P_out = proj.matrix(name, "out", cfg.r_out, d_out)
        ref = (P_out @ m @ P_in.T).reshape(len(idx), -1)  # P_out M_e P_in^T, materialised
        torch.testing.assert_close(feats[name].double(), ref, rtol=1e-5, atol=1e-6)
        model_feat = model_feat + ref @ proj.matrix(name, "model", cfg.r_model, ref.shape[1]).T
    # features are computed in float32: compare to the float32 floor relative to the feature scale
    torch.testing.assert_close(feats[MODEL_KEY].double(), model_feat, rtol=1e-5,
                               atol=1e-5 * float(model_feat.abs().max()))


def test_norm_layers_through_torch_func_exact_and_dense_projection(tmp_path, model64):
    """A non-linear module (RMSNorm weight, torch.func backend) next to a linear one: exact Gram and the
    dense projection both match the materialised reference."""
    records = mixed_records(1)
    kw = dict(kinds=(), pattern=r"layers\.1\.(post_attention_layernorm|mlp\.down_proj)$", spectra=False)
    cfg = _cfg(exact=True, r_dense=8, **kw)
    ex_run = run_geometry(cfg, tmp_path / "exact", progress=False, report=False, model=model64,
                          tokenizer=tiny_tokenizer(), records=records)
    idx, M = reference_grads(model64, cfg, records)
    assert "model.layers.1.post_attention_layernorm" in M
    g = load_file(str(ex_run.path / "tensors" / "exact_gram.safetensors"))
    for name, m in M.items():
        F = m.reshape(len(idx), -1)
        torch.testing.assert_close(g[name], F @ F.T, rtol=1e-9, atol=1e-12)
    _, feats = read_features(ex_run.path)
    norm = "model.layers.1.post_attention_layernorm"
    P = Projector(cfg.projection(), dtype=torch.float64).matrix(norm, "dense", 8, M[norm][0].numel())
    torch.testing.assert_close(feats[norm].double(), M[norm].reshape(len(idx), -1) @ P.T, rtol=1e-5,
                               atol=1e-5 * float(M[norm].abs().max()))


def test_features_do_not_depend_on_batch_companions_or_padding(tmp_path, model64):
    records = mixed_records(2)
    a = _run(tmp_path, "a", model64, records, max_batch=1, spectra=False)
    b = _run(tmp_path, "b", model64, records, max_batch=6, token_budget=5000, spectra=False)
    ia, fa = read_features(a.path)
    ib, fb = read_features(b.path)
    assert ia.tolist() == ib.tolist()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6)
    ea, eb = read_examples(a.path), read_examples(b.path)
    np.testing.assert_allclose(ea["sq_norm"], eb["sq_norm"], rtol=1e-9)


def test_killed_run_resumes_to_the_same_tables(tmp_path, monkeypatch):
    model = tiny_model(seed=2)
    records = mixed_records(2)
    full = _run(tmp_path, "full", model, records)
    real = store.RunStore.write
    calls = {"n": 0}

    def dying(self, table, key, value):  # killed between the features and the examples of the 3rd commit
        if table == "examples":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
        return real(self, table, key, value)

    monkeypatch.setattr(store.RunStore, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "part", model, records)
    monkeypatch.setattr(store.RunStore, "write", real)
    part = tmp_path / "part"
    n_feat = len(list((part / "features").glob("*.safetensors")))
    assert n_feat == len(list((part / "examples").glob("*.parquet"))) + 1  # one orphan features shard
    resumed = _run(tmp_path, "part", model, records, max_batch=3)  # batching may change on resume
    for name, df in full.tables.items():
        other = resumed.tables[name]
        assert df.shape == other.shape, name
        num = [c for c in df.columns if df[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(df.drop(columns=num), other.drop(columns=num), check_dtype=False)
        pd.testing.assert_frame_equal(df[num], other[num], rtol=2e-3, atol=1e-6)
    # a different configuration is refused, naming the key
    with pytest.raises(RunMismatchError, match="r_in"):
        _run(tmp_path, "part", model, records, r_in=8)


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row, field, words", [
    ({"group": "p", "prompt": "q", "chosen": "a"}, "rejected", "needs both"),
    ({"group": "p", "prompt": "q", "rejected": "a"}, "chosen", "needs both"),
    ({"group": "r", "prompt": "q", "response": "a", "reward": "high"}, "reward", "expected a number"),
    ({"group": "r", "prompt": "q", "response": "a", "reward": None, "chosen": "x", "rejected": "y"},
     "response", "ambiguous"),
    ({"group": "t", "prompt": "q", "terms": {"chosen": "a"}}, "terms", "used as a named term here"),
    ({"group": "t", "prompt": "q", "terms": {"sft": 3}}, "terms", "expected a response string"),
])
def test_bad_loss_term_records_name_file_line_and_field(tmp_path, row, field, words):
    p = _write(tmp_path / "d.jsonl", [{"group": "p", "prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        load_records(p, terms=True)
    assert e.value.location == f"{p}:2" and e.value.field == field and words in str(e.value)
    recs, bad = load_records(p, terms=True, on_bad="skip")  # or flagged and counted
    assert len(recs) == 1 and len(bad) == 1 and field in bad[0]["reason"]


def test_layers_refuses_pairs_with_a_pointer_to_geometry(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"group": "p", "prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="gradsight geometry"):
        load_records(p)


def test_single_example_group_and_zero_gradient_are_flagged_not_fatal(tmp_path):
    model = tiny_model(seed=3)
    records = [{k: r[k] for k in ("id", "group", "prompt", "response")} for r in demo_records(n_problems=3)]
    records.append({"id": "lonely", "group": "solo", "prompt": "What is 2+2?", "response": "4"})
    res = _run(tmp_path, "solo", model, records, spectra=False)
    coh = res.tables["coherence"]
    row = coh[(coh["scope"] == "model") & (coh["group"] == "solo")].iloc[0]
    assert row["n"] == 1 and np.isnan(row["ci_lo"]) and "at least 2" in row["note"]
    # zero one unit's features (a gradient that vanishes in every selected layer): re-summarised, the unit is
    # excluded from every cosine and counted, nothing crashes
    f = sorted((res.path / "features").glob("*.safetensors"))[0]
    t = load_file(str(f))
    victim = int(t["__idx__"][0])
    save_file({k: (v if k == "__idx__" else torch.cat([torch.zeros_like(v[:1]), v[1:]])) for k, v in t.items()},
              str(f))
    tables = summarize_geometry(res.path)
    coh = tables["coherence"]
    model_rows = coh[coh["scope"] == "model"]
    assert model_rows["n_excluded"].sum() == 1
    pairs = tables["pairs"]
    assert pairs.loc[pairs["scope"] == "model", "n_excluded_zero"].max() >= 1
    assert np.isfinite(pairs.loc[pairs["scope"] == "model", "mean"].dropna()).all()
    sc = tables["scores"]
    assert sc["diversity"][sc["idx"] == victim].iloc[0] == 0.0  # skipped row contributes exactly 0


def test_select_by_score_and_diversity(tmp_path):
    model = tiny_model(seed=4)
    res = _run(tmp_path, "sel", model, mixed_records(2))
    sc = pd.read_parquet(res.path / "scores.parquet")
    top = select(res.path, 4, by="grad_norm")
    best = sc.sort_values(["grad_norm", "idx"], ascending=[False, True])  # ties (a pair side is also a rollout)
    assert top["idx"].tolist() == best["idx"].head(4).tolist()
    low = select(res.path, 3, by="cos_target", ascending=True, labels=["pairs:chosen", "pairs:rejected"])
    assert set(low["label"]) <= {"pairs:chosen", "pairs:rejected"} and low["score"].is_monotonic_increasing
    div = select(res.path, 5, by="grad_norm", diverse=True, pool=10)
    assert len(set(div["idx"])) == 5 and div["idx"].iloc[0] == top["idx"].iloc[0]  # first pick = best score
    assert set(div["idx"]) <= set(best["idx"].head(10))
    with pytest.raises(ValueError, match="candidate units"):
        select(res.path, 10_000)
    with pytest.raises(ValueError, match="unknown label"):
        select(res.path, 2, labels=["nope"])


def test_cli_geometry_then_select(tmp_path, model_dir):
    data = _write(tmp_path / "mixed.jsonl", mixed_records(2))
    run = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "gradsight", "geometry", "--model", str(model_dir), "--data", str(data),
           "--out", str(run), "--max-length", "256", "--attn", "eager", "--kinds", "q,v", "--n-boot", "50",
           "--r-in", "8", "--r-out", "8", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    assert m["analysis"] == "geometry" and m["geometry"]["projection"]["r_in"] == 8 and m["finished"]
    for name in ("group_cosines", "pairs", "coherence", "terms", "entanglement", "entanglement_summary",
                 "psr_nsr", "diversity", "noise", "scores"):
        assert (run / f"{name}.parquet").exists(), name
    assert (run / "report.html").exists()
    before = pd.read_parquet(run / "pairs.parquet")
    (run / "report.html").unlink()
    p = subprocess.run([sys.executable, "-m", "gradsight", "report", str(run), "--n-boot", "50", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "report.html").exists()
    pd.testing.assert_frame_equal(before, pd.read_parquet(run / "pairs.parquet"))  # recomputed identically
    out = tmp_path / "chosen.txt"
    p = subprocess.run([sys.executable, "-m", "gradsight", "select", str(run), "-k", "3", "--diverse",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(out.read_text().split()) == 3 and out.with_suffix(".parquet").exists()
    # bad input: one clear line, exit 2
    bad = _write(tmp_path / "bad.jsonl", [{"group": "p", "prompt": "q", "chosen": "a"}])
    p = subprocess.run(cmd[:7] + [str(bad)] + ["--out", str(tmp_path / "bad")] + cmd[10:], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 2 and f"{bad}:1" in p.stderr and "rejected" in p.stderr and "Traceback" not in p.stderr
