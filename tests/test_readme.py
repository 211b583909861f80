"""Every code example of README.md runs: the Python blocks in order (one namespace, in a folder holding the
data files they name), and every documented `gradsight ...` command line parses against the real command."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(blocks("python")) >= 4 and blocks("bash")


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
    from gradsight.demo.problems import demo_records, geometry_records

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records(n_problems=2)))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in geometry_records(1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ns: dict = {}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)
    # what the examples promise
    assert ns["same"].summary.equals(ns["run"].summary) and (tmp_path / "runs" / "mine" / "report.html").exists()
    assert len(ns["picked"]) == 2 and set(ns["geo"].tables["group_cosines"]["scope_type"]) >= {"model", "layer"}
    assert (tmp_path / "runs" / "net-hess" / "report.html").exists()
    assert ns["out"]["spectra"]["model.layers.3.mlp.down_proj"]["nuclear"].shape == (4,)
    # `from gradsight import capture` is the context manager, and its factors give the measure's numbers
    g = ns["grads"]["model.layers.3.mlp.down_proj"]
    assert torch.allclose(g.sq_norms(), ns["out"]["sq_norms"]["model.layers.3.mlp.down_proj"], rtol=1e-6)
    assert torch.allclose(g.singular_values().sum(1), ns["out"]["spectra"]["model.layers.3.mlp.down_proj"]["nuclear"],
                          rtol=1e-6)
    # the training monitor, its HF callback and the transforms
    for run in ("train", "hf-train"):
        assert (tmp_path / "runs" / run / "report.html").exists() and (tmp_path / "runs" / run / "series.parquet").exists()
    assert ns["info"]["weights"].shape == (2,) and "post" in ns["w"].last_stats
    # attribution: the in-memory scores and the run directory agree on every query's top proponent
    S, attr = ns["S"], ns["attr"]
    assert S.shape == (1000, 20) and (tmp_path / "runs" / "digits-attr" / "report.html").exists()
    top1 = attr.top[(attr.top["method"] == "ekfac") & (attr.top["side"] == "proponent") & (attr.top["rank"] == 1)]
    assert top1.sort_values("query")["train"].tolist() == S.argmax(0).tolist()
    # importance: every configuration evaluated, the page written; SalUn forgets class 3 as Retrain does
    ev = ns["imp"].evaluation
    assert len(ev) == 1 + 4 * 3 and ev["finite"].all() and (tmp_path / "runs" / "digits-prune" / "report.html").exists()
    f = ns["forget"]
    assert f.loc["retrain", "FA"] == 0.0 and f.loc["salun", "FA"] < f.loc["original", "FA"]
    # privacy: the analytic probe recovers every single image exactly; each defence has its accuracy and epsilon
    c = ns["audit"].curves
    assert c.query("probe == 'analytic' and defence == 'none' and batch_size == 1")["exact_mean"].item() == 1.0
    u = ns["audit"].utility.set_index("defence")
    assert list(u.index) == ["none", "dp:0.1", "dp:1"] and u.loc["dp:1", "epsilon"] < u.loc["dp:0.1", "epsilon"]
    assert 0 < ns["eps"] < float("inf") and (tmp_path / "runs" / "digits-privacy" / "report.html").exists()


def test_documented_commands_parse():
    from gradsight.cli import build_app

    commands = typer.main.get_command(build_app()).commands
    lines = [ln.split("#")[0].strip() for b in blocks("bash") for ln in b.splitlines()]
    lines = [ln for ln in lines if ln.startswith(("gradsight ", "torchrun "))]
    assert len(lines) >= 8
    for line in lines:
        argv = shlex.split(line)
        argv = argv[argv.index("gradsight") + 1:] if "gradsight" in argv else argv
        name, args = argv[0], argv[1:]
        assert name in commands, line
        commands[name].make_context(name, list(args), resilient_parsing=False)  # raises on a bad option


def test_documented_paths_exist():
    """Modules named in backticks as gradsight.x.y exist."""
    import importlib

    for mod in sorted(set(re.findall(r"`(gradsight(?:\.[a-z_]+)+)`", README))):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError:
            parent, _, attr = mod.rpartition(".")
            assert hasattr(importlib.import_module(parent), attr), mod
    assert os.path.exists(ROOT / "docs" / "architecture.md")


@pytest.mark.slow
def test_cli_examples_run_on_a_tiny_model(tmp_path, monkeypatch, model_dir):
    """Every `gradsight ...` line of the Command line block, in order, with the packaged model replaced by a
    tiny Llama directory (and eager attention for it), sequences cut to 128 tokens and the pooled analyses
    (curvature, landscape: every Hessian product passes all their data) on 2 examples, so that the whole block
    takes under a minute; `demo` (the real model) and `torchrun` lines excepted (the contract test runs every
    analysis under torchrun)."""
    from gradsight.cli import main
    from gradsight.demo.problems import demo_records, geometry_records

    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records(n_problems=4)))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in geometry_records(16)))
    monkeypatch.chdir(tmp_path)
    block = next(b for b in blocks("bash") if "gradsight layers" in b)
    ran = []
    for line in (ln.split("#")[0].strip() for ln in block.splitlines()):
        if not line.startswith("gradsight ") or line.startswith("gradsight demo"):
            continue
        argv = shlex.split(line)[1:]
        if argv[0] in ("layers", "geometry", "curvature", "landscape"):
            if "--model" in argv:
                argv[argv.index("--model") + 1] = str(model_dir)
            else:
                argv += ["--model", str(model_dir)]
            argv += ["--attn", "eager", "--max-length", "128", "--truncation", "left", "--quiet"]
            if argv[0] in ("curvature", "landscape"):
                argv += ["--n-examples", "2"]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code in (0, None), line
        ran.append(argv[0])
    assert ran[:2] == ["layers", "report"] and {"geometry", "select", "curvature", "landscape", "env"} <= set(ran)
    assert (tmp_path / "chosen.txt").read_text().count("\n") == 100
    assert (tmp_path / "runs" / "land" / "report.html").exists()
