"""The same command under torchrun with 2 gloo processes gives the tables of 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from gradsight.runs.store import read_layer_stats


def _env():
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return env


def test_torchrun_two_processes_equal_one(tmp_path, model_dir, data_file):
    common = ["layers", "--model", str(model_dir), "--data", str(data_file), "--max-length", "256",
              "--dtype", "float64", "--attn", "eager", "--n-perm", "200", "--n-boot", "200",
              "--token-budget", "800", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "gradsight", *common, "--out", str(one)], capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "gradsight", *common,
                        "--out", str(two)], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((two / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["finished"]
    # both ranks wrote shards
    ranks = {f.name.split("-")[0] for f in (two / "layer_stats").glob("*.parquet")}
    assert ranks == {"r0", "r1"}
    e1 = pd.read_parquet(one / "examples.parquet")
    e2 = pd.read_parquet(two / "examples.parquet")
    pd.testing.assert_frame_equal(e1.drop(columns="loss"), e2.drop(columns="loss"))
    pd.testing.assert_series_equal(e1["loss"], e2["loss"], rtol=1e-9)
    l1, l2 = read_layer_stats(one), read_layer_stats(two)
    pd.testing.assert_frame_equal(l1.drop(columns="value"), l2.drop(columns="value"))
    # float64 model; other batch companions: agreement to the Gram-route floor (see test_capture)
    pd.testing.assert_series_equal(l1["value"], l2["value"], rtol=1e-6)
    for name in ("summary", "mad", "rd", "tests"):
        a, b = pd.read_parquet(one / f"{name}.parquet"), pd.read_parquet(two / f"{name}.parquet")
        assert a.shape == b.shape, name
        num = [c for c in a.columns if a[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num))
        # statistics to the float floor; permutation p-values may move by a tie at the float floor
        exact = [c for c in num if c not in ("p_value", "q_value")]
        pd.testing.assert_frame_equal(a[exact], b[exact], rtol=1e-5)
        for c in set(num) - set(exact):
            assert ((a[c] - b[c]).abs().fillna(0) <= 0.01).all(), (name, c)
    assert (two / "report.html").exists()


def test_torchrun_geometry_equals_one_process(tmp_path, model_dir):
    from test_geometry_analysis import _write, mixed_records

    data = _write(tmp_path / "mixed.jsonl", mixed_records(2))
    common = ["geometry", "--model", str(model_dir), "--data", str(data), "--max-length", "256",
              "--dtype", "float64", "--attn", "eager", "--n-boot", "100", "--kinds", "q,v,down",
              "--token-budget", "800", "--r-model", "64", "--quiet", "--no-report"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "gradsight", *common, "--out", str(one)], capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "gradsight", *common,
                        "--out", str(two)], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {f.name.split("-")[0] for f in (two / "features").glob("*.safetensors")} == {"r0", "r1"}
    for name in ("group_cosines", "pairs", "coherence", "terms", "entanglement", "entanglement_summary",
                 "psr_nsr", "diversity", "noise", "scores"):
        a, b = pd.read_parquet(one / f"{name}.parquet"), pd.read_parquet(two / f"{name}.parquet")
        assert a.shape == b.shape, name
        num = [c for c in a.columns if a[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(a.drop(columns=num), b.drop(columns=num), obj=name)
        # features are float32: the Gram blocks of two processes agree with one process to that floor
        pd.testing.assert_frame_equal(a[num], b[num], rtol=1e-4, atol=1e-8, obj=name)
