"""The `layers` analysis end to end on a tiny model: store, resume, config guard, bad input, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import gradsight
from gradsight.analyses import layers as pipeline
from gradsight.analyses.layers import LayersConfig
from gradsight.inputs import examples as example_inputs
from gradsight.demo.problems import demo_records
from gradsight.inputs.data import DataError, EncodeOptions
from gradsight.runs import store
from gradsight.runs.store import RunMismatchError, read_layer_stats

from helpers import tiny_tokenizer, tiny_model as _tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model_dir, data_file, **kw):
    base = dict(model=str(model_dir), data=str(data_file), encode=EncodeOptions(max_length=256),
                token_budget=600, max_batch=4, flush_every=1, attn_implementation="eager")
    base.update(kw)
    return LayersConfig(**base)


def _tables(run: Path):
    ex = pd.read_parquet(run / "examples.parquet").sort_values("idx").reset_index(drop=True)
    ls = read_layer_stats(run)
    sm = pd.read_parquet(run / "summary.parquet")
    return ex, ls, sm


def test_run_writes_every_table(tmp_path, model_dir, data_file):
    res = pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "run", progress=False, report=True)
    run = res.path
    for f in ("manifest.json", "examples.parquet", "summary.parquet", "mad.parquet", "rd.parquet",
              "tests.parquet", "report.html"):
        assert (run / f).exists(), f
    m = json.loads((run / "manifest.json").read_text())
    assert m["schema_version"] == store.SCHEMA_VERSION and m["finished"]
    assert len(m["model"]["layers"]) == 3 * 7 and m["data"]["sha256"]
    ex, ls, sm = _tables(run)
    assert len(ex) == 24 and (ex["status"] == "ok").all()
    assert set(ls["metric"]) == {"frobenius", "nuclear", "spectral", "sigma1_ratio", "erank", "stable_rank"}
    assert len(ls) == 24 * 21 * 6
    assert set(sm["group"]) == {"fast", "slow", "wrong"}


def test_resume_after_interruption_equals_uninterrupted(tmp_path, model_dir, data_file, monkeypatch):
    full = pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "full", progress=False, report=False).path

    # kill the second run between the layer_stats write and the examples write of its 3rd shard
    calls = {"n": 0}
    real = store.write_parquet

    def dying(df, path):
        if Path(path).parent.name == "examples":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
        return real(df, path)

    monkeypatch.setattr(store, "write_parquet", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "part", progress=False, report=False)
    monkeypatch.setattr(store, "write_parquet", real)
    part = tmp_path / "part"
    assert len(list((part / "layer_stats").glob("*.parquet"))) == 3  # one orphan
    assert len(list((part / "examples").glob("*.parquet"))) == 2
    # resume with a different batching (not part of the run's identity)
    pipeline.run_layers(_cfg(model_dir, data_file, token_budget=300, max_batch=3), part, progress=False,
                        report=False)
    ex1, ls1, sm1 = _tables(full)
    ex2, ls2, sm2 = _tables(part)
    pd.testing.assert_frame_equal(ex1.drop(columns="loss"), ex2.drop(columns="loss"))
    pd.testing.assert_series_equal(ex1["loss"], ex2["loss"], rtol=1e-5)
    pd.testing.assert_frame_equal(ls1.drop(columns="value"), ls2.drop(columns="value"))
    pd.testing.assert_series_equal(ls1["value"], ls2["value"], rtol=2e-4)  # float32 model, other batches
    assert len(sm1) == len(sm2)


def test_resume_same_batches_is_exact(tmp_path, model_dir, data_file, monkeypatch):
    full = pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "full", progress=False, report=False).path
    real = store.RunStore.commit
    calls = {"n": 0}

    def dying(self, *a, **kw):  # the 4th commit never happens
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(store.RunStore, "commit", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "part", progress=False, report=False)
    monkeypatch.setattr(store.RunStore, "commit", real)
    pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "part", progress=False, report=False)
    ex1, ls1, sm1 = _tables(full)
    ex2, ls2, sm2 = _tables(tmp_path / "part")
    pd.testing.assert_frame_equal(ex1, ex2)
    pd.testing.assert_frame_equal(ls1, ls2)
    pd.testing.assert_frame_equal(sm1, sm2)


def test_different_config_is_refused(tmp_path, model_dir, data_file):
    run = tmp_path / "run"
    pipeline.run_layers(_cfg(model_dir, data_file), run, progress=False, report=False)
    with pytest.raises(RunMismatchError, match="max_length"):
        pipeline.run_layers(_cfg(model_dir, data_file, encode=EncodeOptions(max_length=128)), run,
                            progress=False, report=False)
    with pytest.raises(RunMismatchError, match="kinds"):
        pipeline.run_layers(_cfg(model_dir, data_file, kinds=("q",)), run, progress=False, report=False)


def test_non_empty_foreign_directory_is_refused(tmp_path, model_dir, data_file):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="not empty"):
        pipeline.run_layers(_cfg(model_dir, data_file), tmp_path / "x", progress=False, report=False)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_gradient_is_flagged_and_counted(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = _tiny_model()
    recs = demo_records(n_problems=3)
    from gradsight.inputs import losses as L

    def poisoned(reduction):
        def fn(m, b):
            out = L.causal_lm_losses(m, b, reduction)
            lens = b["attention_mask"].sum(1)
            victim = lens == lens.max()
            return torch.where(victim, _NanGrad.apply(out), out)
        return fn

    monkeypatch.setattr(example_inputs, "loss_fn_for", lambda m, r: poisoned(r))
    res = gradsight.analyze_layers(recs, tmp_path / "run", model=model, tokenizer=tok, progress=False,
                                   report=True, max_length=256)
    ex = res.examples
    bad = ex[ex["status"] == "skipped"]
    assert len(bad) >= 1 and bad["reason"].str.startswith("non-finite gradient in model.layers.").all()
    ls = res.layer_stats
    assert not ls["idx"].isin(bad["idx"]).any()
    assert "non-finite gradient" in (res.path / "report.html").read_text()


def test_skips_are_counted_not_dropped(tmp_path):
    tok = tiny_tokenizer()
    recs = demo_records(n_problems=2)
    recs.append({"id": "empty", "group": "fast", "prompt": "What is 1+1?", "response": "   "})
    recs.append({"id": "long", "group": "slow", "prompt": "x" * 400, "response": "The answer is 2."})
    res = gradsight.analyze_layers(recs, tmp_path / "run", model=_tiny_model(), tokenizer=tok, progress=False,
                                   report=True, max_length=256)
    ex = res.examples.set_index("id")
    assert ex.loc["empty", "status"] == "skipped" and ex.loc["empty", "reason"] == "empty response"
    assert ex.loc["long", "status"] == "skipped" and "entirely truncated" in ex.loc["long", "reason"]
    assert (ex["status"] == "ok").sum() == 6
    html = (res.path / "report.html").read_text()
    assert "empty response" in html and "entirely truncated" in html


def _cli(*args, cwd=None, check=False):
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "gradsight", *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_cli_end_to_end(tmp_path, model_dir, data_file):
    run = tmp_path / "run"
    p = _cli("layers", "--model", str(model_dir), "--data", str(data_file), "--out", str(run),
             "--max-length", "256", "--kinds", "q,v,down", "--blocks", "0:2", "--n-perm", "200", check=True)
    assert "fast" in p.stdout and (run / "report.html").exists()
    ls = read_layer_stats(run)
    assert set(ls["kind"]) == {"q", "v", "down"} and set(ls["block"]) == {0, 1}
    p = _cli("report", str(run), "--reference", "fast", check=True)
    assert "report.html" in p.stdout
    rd = pd.read_parquet(run / "rd.parquet")
    assert set(rd["reference"]) == {"fast"}
    p = _cli("env", check=True)
    assert "torch" in p.stdout


@pytest.mark.parametrize("case", ["malformed", "missing", "grouptype", "emptyfile", "kind", "model", "blocks"])
def test_cli_bad_input_is_one_clear_message(tmp_path, model_dir, data_file, case):
    data = tmp_path / "data.jsonl"
    good = '{"group": "a", "prompt": "p", "response": "r"}\n'
    content = {"malformed": good + '{"group": "a", "prompt": "p" "response": "r"}\n',
               "missing": good + '{"prompt": "p", "response": "r"}\n',
               "grouptype": good + '{"group": ["a"], "prompt": "p", "response": "r"}\n',
               "emptyfile": ""}.get(case, good)
    data.write_text(content)
    args = ["layers", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    if case == "kind":
        args += ["--kinds", "q,qq"]
    if case == "model":
        args[2] = str(tmp_path / "nope")
    if case == "blocks":
        args += ["--blocks", "0:99"]
    p = _cli(*args)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr
    assert "Traceback" not in err
    expect = {"malformed": ["data.jsonl:2", "malformed JSON"], "missing": ["data.jsonl:2", "group"],
              "grouptype": ["data.jsonl:2", "group", "list"], "emptyfile": ["data.jsonl", "no records"],
              "kind": ["unknown layer kind 'qq'", "q, "], "model": ["does not exist", "nope"],
              "blocks": ["out of range"]}[case]
    for s in expect:
        assert s in err, (s, err)
