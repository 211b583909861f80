"""A new analysis touches no core file: `gradnorm` is defined here, in this test file alone, and runs end to end
through the engine and the command line (resume, torchrun, report) like the built-in ones.

`gradnorm` is the per-example gradient norm of every selected layer (the `sq_norms` measure over one captured
step), averaged per group. Its config composes the shared option groups, its units are examples (LM records
or rows of a plain module's batches), its page is the kit's generic tables page. Other processes (the CLI
under torchrun) find it through GRADSIGHT_PLUGINS=test_new_analysis with this folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from gradsight.config import Batching, EncodeOptions, LayerSelection, RunOptions, config, group, option
from gradsight.inputs.data import encode
from gradsight.inputs.examples import (example_batches, example_losses, example_step, example_units, layer_modules,
                                       unit_group)
from gradsight.inputs.lm import bad_record_row, example_row
from gradsight.measures.spectra import sq_norms
from gradsight.report import kit
from gradsight.runs.registry import Analysis, Plan, ReportSpec, Unit, register
from gradsight.runs.store import merge_shards, read_manifest, write_parquet

HERE = Path(__file__).resolve().parent


@config
class GradNormConfig:
    """Options of `gradsight gradnorm`."""

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions)
    batching: Batching = group(Batching, resume=False)
    top: int = option(3, "layers with the largest mean norm listed per group in the findings", resume=False)


def setup(cfg, source, info) -> Plan:
    """One unit per example: an LM record (encoded; bad ones flagged) or a row of a module's batches."""
    entries = [(r.idx, r, encode(r, source.tokenizer, cfg.encode)) for r in source.records]
    units = example_units(source, entries, [(int(d["idx"]), d) for d in source.bad])
    return Plan(units, {"source": source, "modules": layer_modules(source), "losses": example_losses(source)},
                batches=example_batches(source, cfg))


def compute(plan: Plan, units: list[Unit]) -> dict:
    """One captured forward/backward; the `sq_norms` measure gives each example's norm per layer."""
    st, src = plan.state, plan.state["source"]
    if not units[0].ready:  # records that failed to parse or encode: flagged rows, no forward
        return {"examples": pd.DataFrame([bad_record_row(u.payload[0]) if u.payload[1] is None else
                                          example_row(*u.payload, "skipped", u.payload[1].reason, np.nan)
                                          for u in units])}
    step = example_step(src, units, st["modules"], st["losses"])
    status = [("ok", "") if p not in step.bad else ("skipped", step.bad[p]) for p in range(len(units))]
    rows = [dict(u.payload["row_meta"], status=s, reason=r, loss=float(step.losses[p])) if isinstance(u.payload, dict)
            else example_row(*u.payload, s, r, float(step.losses[p])) for p, (u, (s, r)) in enumerate(zip(units, status))]
    norms = sq_norms()(step)
    frame = pd.DataFrame([{"idx": units[p].key, "group": unit_group(units[p]), "layer": name,
                           "norm": float(v[p].double().sqrt())} for name, v in norms.items() for p in step.keep])
    return {"norms": frame, "examples": pd.DataFrame(rows)}


def summarize(run, cfg=None, info=None) -> dict:
    run = Path(run)
    merge_shards(run, "examples")
    files = sorted((run / "norms").glob("*.parquet"))
    norms = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).sort_values(["idx", "layer"])
    table = (norms.groupby(["group", "layer"], sort=True)["norm"].agg(["mean", "std", "count"])
             .reset_index().rename(columns={"count": "n"}))
    write_parquet(table, run / "group_norms.parquet")
    return {"group_norms": table}


def _findings(table: pd.DataFrame, top: int) -> list[dict]:
    out = []
    for g, d in table.groupby("group", sort=True):
        best = d.sort_values("mean", ascending=False).head(top)
        out.append({"title": f"group {g}", "lines": [f"{r.layer}: mean gradient norm {kit.fmt_num(r.mean)}"
                                                     for r in best.itertuples()]})
    return out


def render(run_dir, out=None) -> Path:
    table = pd.read_parquet(Path(run_dir) / "group_norms.parquet")
    top = int((read_manifest(run_dir).get("config") or {}).get("top", 3))
    return kit.render_tables_page(run_dir, out, analysis="gradnorm", findings=_findings(table, top),
                                  tables=[kit.table_section("Gradient norm per group and layer", table,
                                                            file="group_norms.parquet")])


def print_summary(run_dir, console=None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    for f in _findings(pd.read_parquet(Path(run_dir) / "group_norms.parquet"), 3):
        console.print(Text(f["title"], style="bold"))
        for line in f["lines"]:
            console.print(Text("  " + line))


def open_run(run, tables=None):
    run = Path(run)
    return {"path": run, "group_norms": pd.read_parquet(run / "group_norms.parquet"),
            "examples": pd.read_parquet(run / "examples.parquet")}


SPEC = register(Analysis(
    name="gradnorm", Config=GradNormConfig, help="Per-example gradient norm of every selected layer, by group.",
    setup=setup, compute=compute, summarize=summarize, open=open_run,
    report=ReportSpec(render=render, summary=print_summary), tables=("norms", "examples"), noun="examples",
    quick={"max_batch": 2, "flush_every": 1},
), replace=True)


# ---------------------------------------------------------------------------------------------------------
# the tests (the contract test runs gradnorm too: tests/test_contract.py imports this module)


def _env():
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "GRADSIGHT_PLUGINS": "test_new_analysis",
                "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])})
    return env


def _cli(*args, torchrun: bool = False):
    launcher = ([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"] if torchrun
                else [sys.executable])
    return subprocess.run([*launcher, "-m", "gradsight", *args], capture_output=True, text=True, env=_env(),
                          timeout=600)


def test_no_core_file_names_the_new_analysis():
    src = HERE.parent / "src" / "gradsight"
    assert not [f for f in src.rglob("*") if f.is_file() and f.suffix in (".py", ".html", ".toml")
                and "gradnorm" in f.read_text(errors="ignore")]
    assert SPEC.setup.__module__ == __name__ and SPEC.report.render.__module__ == __name__


def test_front_lists_runs_and_opens_it(tmp_path, model_dir, data_file):
    import gradsight
    from helpers import tiny_model, tiny_tokenizer

    assert "gradnorm" in gradsight.analyses()
    res = gradsight.analyze("gradnorm", str(data_file), tmp_path / "run", model=tiny_model(),
                            tokenizer=tiny_tokenizer(), progress=False, max_length=256, kinds=("q", "down"))
    again = gradsight.open_run(tmp_path / "run")
    pd.testing.assert_frame_equal(res["group_norms"], again["group_norms"])
    assert set(again["group_norms"]["group"]) == {"fast", "slow", "wrong"}
    assert (again["group_norms"]["n"] == 8).all()  # 8 problems per group, one row per (group, layer)


def test_cli_end_to_end_resume_torchrun_report(tmp_path, model_dir, data_file):
    p = _cli("gradnorm", "--help")
    assert p.returncode == 0 and "--top" in p.stdout and "--max-length" in p.stdout, p.stderr
    args = ["gradnorm", "--model", str(model_dir), "--data", str(data_file), "--max-length", "256",
            "--attn", "eager", "--dtype", "float64", "--kinds", "q,down", "--max-batch", "4", "--flush-every", "1"]
    one = tmp_path / "one"
    p = _cli(*args, "--out", str(one))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "group fast" in p.stdout and (one / "report.html").exists()
    full = pd.read_parquet(one / "group_norms.parquet")
    # kill: the last two commits are gone (their marker shards, then the final table); the rerun computes them
    markers = sorted((one / "examples").glob("*.parquet"))
    for f in markers[-2:]:
        f.unlink()
    (one / "group_norms.parquet").unlink()
    kept = {f: f.stat().st_mtime_ns for f in markers[:-2]}
    p = _cli(*args, "--out", str(one), "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout and f"{24 - 8} of 24 examples already done" in p.stdout, p.stdout
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    pd.testing.assert_frame_equal(pd.read_parquet(one / "group_norms.parquet"), full)
    # 2 gloo processes: the tables of one
    two = tmp_path / "two"
    p = _cli(*args, "--out", str(two), "--quiet", torchrun=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert {f.name.split("-")[0] for f in (two / "norms").glob("*.parquet")} == {"r0", "r1"}
    pd.testing.assert_frame_equal(pd.read_parquet(two / "group_norms.parquet"), full, rtol=1e-9)
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    # the report from the run directory alone; another configuration refused naming the key
    (one / "report.html").unlink()
    p = _cli("report", str(one))
    assert p.returncode == 0 and (one / "report.html").exists() and "group slow" in p.stdout, p.stderr
    page = (one / "report.html").read_text()
    assert "Gradient norm per group and layer" in page and "model.layers.0.mlp.down_proj" in page
    p = _cli(*args[:-2], "--flush-every", "1", "--kinds", "q", "--out", str(one))
    assert p.returncode == 2 and "kinds" in p.stderr and "Traceback" not in p.stderr
