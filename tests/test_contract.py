"""The contract every registered analysis keeps, checked by one test over all of them (the built-in ones and
`gradnorm`, defined in tests/test_new_analysis.py alone).

For each analysis (run with its `quick` options on a tiny random Llama, float64):
- a run killed after its first commit and rerun gives the tables of an uninterrupted run, and the rerun
  computes only the missing units;
- another configuration in the same directory is refused, naming the differing key;
- `torchrun` with 2 gloo processes gives the tables of 1 process (through the command line);
- `gradsight report` renders the page from the run directory alone (no model), escaping user text;
- bad input exits with code 2 and one line naming the file and line;
- the same analysis runs on a plain nn.Module with batches and a loss; a rerun computes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.cli import main as cli_main
from gradsight.cli.options import to_args
from gradsight.demo.problems import demo_records
from gradsight.runs import registry, store
from gradsight.runs.api import config_for, run_lm, run_module
from gradsight.runs.store import RunMismatchError

import test_new_analysis  # noqa: F401  (registers "gradnorm", an analysis defined in a test file alone)
from helpers import external_refs, tiny_model, tiny_tokenizer

NAMES = registry.names()
EVIL = "<script>alert(1)</script>"
# options every language-model analysis takes here (tiny model, short sequences)
LM = {"dtype": "float64", "attn_implementation": "eager", "max_length": 64, "truncation": "left", "kinds": ("v",)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _records() -> list[dict]:
    recs = demo_records(n_problems=2)
    for r in recs:
        if r["group"] == "wrong":
            r["group"] = EVIL
    return recs


def _options(name: str, **extra) -> dict:
    spec = registry.get(name)
    known = spec.Config.options()
    return {k: v for k, v in {**LM, **spec.quick, **extra}.items() if k in known}


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted(run.glob("*.parquet"))}


def _assert_same_tables(a: Path, b: Path, rtol: float = 1e-6, p_tol: float = 0.0) -> None:
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys() and ta, (sorted(ta), sorted(tb))
    for name in ta:
        x, y = ta[name], tb[name]
        assert list(x.columns) == list(y.columns) and x.shape == y.shape, name
        num = [c for c in x.columns if x[c].dtype.kind in "fc"]
        pd.testing.assert_frame_equal(x.drop(columns=num), y.drop(columns=num), obj=name)
        for c in num:
            u, v = x[c].to_numpy(dtype=float), y[c].to_numpy(dtype=float)
            assert np.array_equal(np.isnan(u), np.isnan(v)), (name, c)
            if c in ("p_value", "q_value"):  # permutation p-values may move by a tie at the float floor
                assert np.nanmax(np.abs(u - v), initial=0) <= max(p_tol, 1e-12), (name, c)
            else:
                np.testing.assert_allclose(u, v, rtol=rtol, atol=1e-8, err_msg=f"{name}.{c}")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, dtype=torch.float64)


def _run(name, out, model, log=print, **extra):
    cfg = config_for(name, model="tiny", **_options(name, **extra))
    return run_lm(name, cfg, out, model=model, tokenizer=tiny_tokenizer(), records=_records(), progress=False,
                  report=False, log=log)


@pytest.mark.parametrize("name", NAMES)
def test_killed_run_resumes_to_the_uninterrupted_tables(name, model, tmp_path, monkeypatch):
    _run(name, tmp_path / "full", model)
    real, calls = store.RunStore.commit, {"n": 0}

    def dying(self, *a, **kw):  # killed after the first commit
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(store.RunStore, "commit", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(name, tmp_path / "part", model)
    monkeypatch.setattr(store.RunStore, "commit", real)
    assert not json.loads((tmp_path / "part" / "manifest.json").read_text()).get("finished")
    logs: list[str] = []
    _run(name, tmp_path / "part", model, log=logs.append)
    resumed = [re.search(r"(\d+) of (\d+)", m) for m in logs if m.startswith("resuming")]
    assert resumed and 0 < int(resumed[0][1]) < int(resumed[0][2]), logs  # only the missing units were computed
    _assert_same_tables(tmp_path / "full", tmp_path / "part", rtol=1e-9)
    # a finished run: a rerun computes nothing and leaves the tables as they are
    logs.clear()
    _run(name, tmp_path / "part", model, log=logs.append)
    assert "nothing to do" in logs[-1]
    _assert_same_tables(tmp_path / "full", tmp_path / "part", rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_another_configuration_is_refused_naming_the_key(name, model, tmp_path):
    _run(name, tmp_path / "run", model)
    with pytest.raises(RunMismatchError, match="seed"):
        _run(name, tmp_path / "run", model, seed=1)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="not empty"):
        _run(name, tmp_path / "x", model)


@pytest.mark.parametrize("name", NAMES)
def test_report_renders_from_the_run_directory_alone(name, model, tmp_path, capsys):
    _run(name, tmp_path / "run", model)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(copy), "--quiet"])
    assert e.value.code in (0, None)
    page = (copy / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert EVIL not in page  # user text is escaped
    assert not external_refs(page)  # self-contained: no tag loads anything from elsewhere
    _assert_same_tables(tmp_path / "run", copy)  # re-summarised from the shards: the same tables


def _env():
    return test_new_analysis._env()  # with the plugin, so that the test-local analysis has its command


@pytest.fixture(scope="module")
def data_evil(tmp_path_factory):
    p = tmp_path_factory.mktemp("contract") / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return p


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if "lm" in registry.get(n).inputs])
def test_two_processes_equal_one(name, model_dir, data_evil, tmp_path):
    spec = registry.get(name)
    args = [name, "--model", str(model_dir), "--data", str(data_evil), "--quiet", "--no-report",
            *to_args(spec.Config, _options(name))]
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "gradsight", *args, "--out", str(one)], capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "gradsight", *args,
                        "--out", str(two)], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((two / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["finished"]
    # float64 model; float32 features (geometry) agree to that floor; other batch companions per rank
    _assert_same_tables(one, two, rtol=1e-4, p_tol=0.01)


@pytest.mark.parametrize("name", [n for n in NAMES if "lm" in registry.get(n).inputs])
def test_bad_input_exits_2_with_one_line(name, model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"group": "a", "prompt": "p", "response": "r"}\n{"group": "a", "prompt": "p" "response": 1}\n')
    with pytest.raises(SystemExit) as e:
        cli_main([name, "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and f"{data}:2" in err and "malformed JSON" in err, err
    assert not (tmp_path / "run").exists()  # bad input fails before anything is written


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64).eval()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    return net, [(X[:7], Y[:7]), (X[7:], Y[7:])]


@pytest.mark.parametrize("name", [n for n in NAMES if "module" in registry.get(n).inputs])
def test_plain_module_inputs(name, tmp_path):
    net, batches = _mlp()
    spec = registry.get(name)
    opts = {k: v for k, v in spec.quick.items() if k in spec.Config.options()}
    kw = dict(groups=["a", EVIL] * 6)
    run_module(name, net, "cross_entropy", batches, tmp_path / "run", report=True, **kw, **opts)
    assert (tmp_path / "run" / "report.html").exists()
    assert EVIL not in (tmp_path / "run" / "report.html").read_text()
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["finished"] and man["data"]["path"] == "<in-memory>" and man["model"]["fingerprint"].startswith("in-memory:")
    before = _tables(tmp_path / "run")
    logs: list[str] = []
    run_module(name, net, "cross_entropy", batches, tmp_path / "run", log=logs.append, **kw, **opts)
    assert "nothing to do" in logs[-1]
    after = _tables(tmp_path / "run")
    assert after.keys() == before.keys()
    for t in before:
        pd.testing.assert_frame_equal(before[t], after[t], obj=t)
    # other weights: another run identity
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with pytest.raises(RunMismatchError, match="model_fingerprint"):
        run_module(name, net, "cross_entropy", batches, tmp_path / "run", **kw, **opts)
