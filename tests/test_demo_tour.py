"""The demo tour and the index page of a run tree (`gradsight.report.index.render_index`).

A small tree of real runs (a tiny Llama for layers with an evil group name, a small MLP for curvature and
landscape, an unfinished run, a damaged manifest, a folder whose name looks like a URL scheme) is indexed:
every run is listed with its relative link, status and key findings, user text is escaped, links are
percent-encoded, and headless Chromium runs the page's only script. The tour's plan covers every shipped
analysis and the training monitor (run kind "train"), the tour runs end to end on the tests' saved tiny Llama
(`model_dir`), and so does its fine-tuning stage alone (`demo.train.fine_tune`): batches, freezing, the
monitored run, its report, its reuse and refusal on rerun.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from markupsafe import escape

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_model, tiny_tokenizer  # noqa: E402
from test_report import CHROMIUM, chromium_dom, parse, user_scripts  # noqa: E402

import gradsight  # noqa: E402
from gradsight.report.index import find_runs, index_rows, render_index  # noqa: E402
from gradsight.runs import registry  # noqa: E402

EVIL_GROUP = "<script>alert(1)</script>"
SCHEME_DIR = "javascript:alert(1)"  # a folder name that would be a URL scheme if not encoded
HREF = re.compile(r'<a href="([^"#][^"]*)"')  # the report links (not the page's own anchors)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(24, 4, dtype=torch.float64)
    return net, [(X, X[:, :3].argmax(1))]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from gradsight.analyses.layers import LayersConfig, run_layers
    from gradsight.demo.problems import demo_records

    root = tmp_path_factory.mktemp("tree")
    recs = [dict(r, group={"fast": EVIL_GROUP}.get(r["group"], r["group"])) for r in demo_records(n_problems=2)]
    cfg = LayersConfig(model="tiny", data="", **registry.get("layers").quick, kinds=("q", "v"))
    run_layers(cfg, root / "layers-evil", model=tiny_model(), tokenizer=tiny_tokenizer(), records=recs,
               progress=False, log=lambda s: None)
    net, batches = _mlp()
    gradsight.curvature_of(net, "cross_entropy", batches, root / "nested" / "curv", report=True, name="mlp",
                           log=lambda s: None, **registry.get("curvature").quick)
    gradsight.landscape_of(net, "cross_entropy", batches, root / "nested" / SCHEME_DIR, report=True, name="mlp",
                           log=lambda s: None, kind="random", steps=3)
    # an unfinished run (its report not written yet) and a damaged manifest
    man = json.loads((root / "nested" / "curv" / "manifest.json").read_text())
    (root / "open").mkdir()
    (root / "open" / "manifest.json").write_text(json.dumps(dict(man, finished=False, elapsed_s=None)))
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "manifest.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def page(tree) -> str:
    return render_index(tree, wall_s=12.5).read_text()


def _row_html(page: str, path: str) -> str:
    rows = page.split("<tr data-analysis=")[1:]
    found = [r for r in rows if f">{escape(path)}<" in r]
    assert len(found) == 1, path
    return found[0]


def test_every_run_is_found_in_path_order(tree):
    rel = [p.relative_to(tree).as_posix() for p in find_runs(tree)]
    assert rel == ["broken", "layers-evil", "nested/curv", f"nested/{SCHEME_DIR}", "open"]  # .hidden is skipped
    rows = index_rows(tree)
    assert [r["analysis"] for r in rows] == ["layers", "curvature", "curvature", "landscape", "?"]


def test_index_lists_every_run_with_its_link_status_and_findings(tree, page):
    for run in find_runs(tree):
        rel = run.relative_to(tree).as_posix()
        html = _row_html(page, rel)
        if (run / "report.html").exists():
            (href,) = HREF.findall(html)
            assert (tree / unquote(href)).resolve() == (run / "report.html").resolve()
    assert "Runs:</span> 5 (3 finished)" in page
    assert "wall time of the command:</span> 12 s" in page
    layers = _row_html(page, "layers-evil")
    assert "finished" in layers and "6 ok" in layers and "Overview" in layers
    curv = _row_html(page, "nested/curv")
    assert "Top eigenvalues" in curv and "Largest Hessian eigenvalue of the whole selection" in curv
    assert "mlp" in curv and "&lt;in-memory&gt;" in curv
    land = _row_html(page, f"nested/{SCHEME_DIR}")
    assert "Landscape" in land and "Loss at the trained weights" in land
    elapsed = json.loads((tree / "nested" / "curv" / "manifest.json").read_text())["elapsed_s"]
    assert f'<td class="num">{int(round(elapsed))} s</td>' in curv
    opened = _row_html(page, "open")
    assert "not finished" in opened and "no report.html yet" in opened and "gradsight report" in opened
    assert "the run has not finished" in opened
    broken = _row_html(page, "broken")
    assert "manifest.json could not be read" in broken and "unreadable" in broken


def test_key_findings_are_the_first_lines_of_the_report_page(tree, page):
    from gradsight.report.index import run_findings

    first = run_findings(tree / "nested" / "curv")[0]
    curv = _row_html(page, "nested/curv")
    for line in first["lines"][:2]:
        assert str(escape(line)) in curv
    rows = {r["path"]: r for r in index_rows(tree)}
    assert rows["nested/curv"]["key"] == {"title": first["title"], "lines": first["lines"][:2]}
    assert rows["nested/curv"]["n_findings"] == sum(len(f["lines"]) for f in run_findings(tree / "nested" / "curv"))


def test_evil_group_name_is_escaped_and_page_is_self_contained(tree, page):
    report = (tree / "layers-evil" / "report.html").read_text()
    assert str(escape(EVIL_GROUP)) in report  # the group name is in the findings the index quotes
    layers = _row_html(page, "layers-evil")
    assert str(escape(EVIL_GROUP)) in layers
    assert EVIL_GROUP not in page
    p = parse(page)
    assert not p.errors and not p.external, (p.errors, p.external)
    assert len(user_scripts(p)) == 1 and "alert" not in user_scripts(p)[0]
    assert "plotly" not in page.lower() and len(page) < 200_000


def test_links_are_relative_and_percent_encoded(tree, page):
    hrefs = HREF.findall(page)
    assert hrefs and all(h.startswith("./") and "://" not in h for h in hrefs)
    assert "./nested/javascript%3Aalert%281%29/report.html" in hrefs
    assert not any(h.lower().startswith("javascript") for h in hrefs)


def test_index_written_elsewhere_links_back_into_the_tree(tree, tmp_path):
    out = render_index(tree, tmp_path / "pages" / "all.html", title="my runs")
    html = out.read_text()
    assert "<title>my runs</title>" in html
    for href in HREF.findall(html):
        assert (out.parent / unquote(href)).resolve().is_file()
    assert len(HREF.findall(html)) == 3


def test_an_empty_tree_and_a_missing_root(tmp_path):
    html = render_index(tmp_path).read_text()
    assert "No run directories" in html and "Runs:</span> 0 (0 finished)" in html
    with pytest.raises(FileNotFoundError):
        render_index(tmp_path / "nope")


@pytest.mark.chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium for the headless render check")
def test_chromium_renders_the_index_and_runs_its_filter(tree, page, tmp_path):
    dom = chromium_dom(tree / "index.html", tmp_path)
    assert "5 of 5 runs shown" in dom  # the page's script ran to its end
    assert EVIL_GROUP not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert dom.count("<tr data-analysis=") == 5


# ---------------------------------------------------------------------------------------------------------
# the tour


def _shipped() -> set[str]:
    """Registered analyses that ship with gradsight (tests may register their own, e.g. gradnorm)."""
    return {n for n in gradsight.analyses() if registry.get(n).Config.__module__.startswith("gradsight.")}


def test_the_tour_plan_covers_every_shipped_analysis():
    from gradsight.demo.run import tour_plan

    plan = tour_plan()
    assert {"layers", "geometry", "curvature", "landscape"} <= _shipped()
    # "train" is a run kind (the monitor writes it outside the engine), not a registered analysis
    assert "train" not in gradsight.analyses() and registry.kind("train") is not None
    assert {s.analysis for s in plan} == _shipped() | {"train"}
    names = [s.name for s in plan]
    assert len(set(names)) == len(names) and "curvature/smollm2" in names
    assert names.index("geometry") < names.index("train") < names.index("curvature/digits")
    assert all(callable(s.run) and s.what for s in plan)
    few = dict(geometry=False, curvature=False, importance=False, privacy=False)
    assert {s.analysis for s in tour_plan(**few, attribution=False)} == {"layers", "train"}
    assert {s.analysis for s in tour_plan(**few, train=False)} == {"layers", "attribute"}
    assert {s.analysis for s in tour_plan(**few, train=False, attribution=False)} == {"layers"}
    assert {s.analysis for s in tour_plan(geometry=False, curvature=False, train=False, attribution=False,
                                          privacy=False)} == {"layers", "importance"}
    assert [s.name for s in tour_plan(**{**few, "privacy": True}, train=False, attribution=False)] == [
        "layers", "privacy/digits", "privacy/smollm2"]
    assert "curvature/lm" in [s.name for s in tour_plan(model="some/dir")]


def test_tour_and_full_demo_refuse_each_others_folder(tmp_path):
    from gradsight.demo.run import check_demo_out
    from gradsight.runs.store import RunMismatchError

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "manifest.json").write_text("{}")
    with pytest.raises(RunMismatchError, match="holds the full demo"):
        check_demo_out(tmp_path / "full", full=False)
    check_demo_out(tmp_path / "full", full=True)
    (tmp_path / "tour" / "layers").mkdir(parents=True)
    (tmp_path / "tour" / "layers" / "manifest.json").write_text("{}")
    with pytest.raises(RunMismatchError, match="holds the demo tour"):
        check_demo_out(tmp_path / "tour", full=True)
    check_demo_out(tmp_path / "tour", full=False)
    check_demo_out(tmp_path / "new", full=True)


def test_demo_options_of_the_tour():
    import typer

    from gradsight.cli import build_app

    cmd = typer.main.get_command(build_app()).commands["demo"]
    params = {p.name: p for p in cmd.params}
    assert params["full"].default is False and params["n_problems"].default == 60
    assert params["geometry_problems"].default == 30 and params["curvature_problems"].default == 1
    for flag in ("geometry", "train", "attribution", "importance", "privacy", "curvature"):  # each part of the tour can be left out the same way
        assert params[flag].default is True and params[flag].secondary_opts == [f"--no-{flag}"]


def test_the_tour_end_to_end_on_a_tiny_model(model_dir, tmp_path, monkeypatch):
    """`gradsight demo` with every option of the tour; given sizes keep their meaning."""
    from gradsight.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    demo = ["demo", "--model", str(model_dir), "--out", str(out), "--n-problems", "2", "--geometry-problems", "1",
            "-q"]
    with pytest.raises(SystemExit) as done:
        main(demo)
    assert done.value.code == 0
    html = (out / "index.html").read_text()
    rows = index_rows(out)
    assert {r["analysis"] for r in rows} == _shipped() | {"train"} and all(r["finished"] for r in rows)
    assert sorted(r["path"] for r in rows) == sorted(
        ["layers", "geometry", "attribution", "importance", "privacy/digits", "privacy/lm", "train", "curvature/digits",
         "curvature/lm", "landscape/digits-hessian-plane",
         "landscape/digits-random-plane", "landscape/digits-interpolation"])
    for r in rows:
        assert r["key"] and r["key"]["lines"], r["path"]
        assert (out / r["path"] / "report.html").stat().st_size > 100_000
        assert f'href="./{r["path"]}/report.html"' in html
    man = {r["path"]: json.loads((out / r["path"] / "manifest.json").read_text()) for r in rows}
    assert man["layers"]["data"] == {**man["layers"]["data"], "path": "builtin:demo-arithmetic-2", "n_records": 6}
    assert man["geometry"]["data"]["path"] == "builtin:demo-geometry-1"
    assert man["train"]["fine_tune"]["n_steps"] == 30 and man["train"]["model"]["id"] == str(model_dir)
    blocks = {li["block"] for li in man["curvature/lm"]["model"]["layers"]}
    assert blocks == {0, 2}  # the first and the last of the tiny Llama's 3 blocks
    assert "wall time of the command" in html and "gradsight demo tour" in html
    # a rerun reuses every finished run (nothing is recomputed) and rewrites the index
    before = {p: m["elapsed_s"] for p, m in man.items()}
    with pytest.raises(SystemExit) as done:
        main(demo)
    assert done.value.code == 0
    assert {p: json.loads((out / p / "manifest.json").read_text())["elapsed_s"] for p in man} == before
    assert os.path.getmtime(out / "index.html") >= os.path.getmtime(out / "layers" / "manifest.json")


# ---------------------------------------------------------------------------------------------------------
# the tour's fine-tuning stage


def test_train_batches_supervise_the_responses_only():
    from gradsight.demo.train import batch_order, encode_records, freeze_blocks, make_batch, train_records

    tok = tiny_tokenizer()
    recs = train_records(n_problems=2)
    assert [r.group for r in recs] == ["fast", "slow", "fast", "slow"]
    enc = encode_records(recs, tok)
    b = make_batch(enc, tok.pad_token_id)
    lengths = b["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4  # mixed lengths, right padding
    for e, ids, mask, labels in zip(enc, b["input_ids"], b["attention_mask"], b["labels"]):
        n = len(e.input_ids)
        assert ids[:n].tolist() == e.input_ids and mask[:n].all() and not mask[n:].any()
        assert (labels[:e.n_prompt] == -100).all() and (labels[n:] == -100).all()  # prompt and padding
        assert labels[e.n_prompt:n].tolist() == e.input_ids[e.n_prompt:]  # every response token
        assert tok.decode(labels[e.n_prompt:n].tolist()) == recs[e.idx].response
    order = batch_order(6, 4, 6, seed=0)
    stream = sum(order, [])
    assert all(sorted(stream[k:k + 6]) == list(range(6)) for k in (0, 6, 12, 18))  # one permutation per epoch
    assert order == batch_order(6, 4, 6, seed=0) != batch_order(6, 4, 6, seed=1)
    with pytest.raises(ValueError, match="batch_size=0"):
        batch_order(6, 0, 3)
    net = tiny_model()
    assert {n.split(".")[2] for n in freeze_blocks(net, 1)} == {"2"}  # model.layers.2.* only
    assert not net.model.embed_tokens.weight.requires_grad and not net.model.norm.weight.requires_grad
    trained = freeze_blocks(net, 10)  # more than the model has: every block, still no embedding or final norm
    assert len(trained) == sum(1 for n, _ in net.named_parameters() if ".layers." in n)
    assert len(freeze_blocks(net, None)) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="blocks=0"):
        freeze_blocks(net, 0)


def test_the_train_stage_end_to_end_on_a_tiny_model(model_dir, tmp_path, monkeypatch):
    """`fine_tune` on the saved tiny Llama: a finished monitor run with its schedules, report and findings;
    a rerun reuses it, other settings are refused, an unfinished run is trained again."""
    import pandas as pd

    from gradsight.demo.train import fine_tune
    from gradsight.report.index import run_findings
    from gradsight.runs.store import RunMismatchError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    kw = dict(model=str(model_dir), n_steps=6, n_problems=2, blocks=2, log=lines.append)
    run = fine_tune(tmp_path / "train", **kw)
    man = json.loads((run / "manifest.json").read_text())
    assert man["analysis"] == "train" and man["finished"] and man["elapsed_s"] > 0
    assert man["data"]["n_records"] == 4 and man["batch_size"] == 4
    assert man["optimizer"]["name"] == "AdamW" and man["optimizer"]["weight_decay"] == 0.0
    assert set(man["identity"]["params"]) == {n for n, _ in tiny_model().named_parameters()
                                             if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert man["identity"]["per_example_layers"] == ["model.layers.1.mlp.down_proj.weight",
                                                     "model.layers.2.mlp.down_proj.weight"]

    def steps_of(metric: str) -> list[int]:
        series = pd.read_parquet(run / "series.parquet")
        return sorted(series.loc[series["metric"] == metric, "step"].unique().tolist())

    series = pd.read_parquet(run / "series.parquet")
    assert steps_of("loss") == steps_of("grad_norm") == list(range(6))
    assert steps_of("pe_norm_q50") == steps_of("softmax_collapse_fp32") == [0, 5]  # every 5 steps
    clip = series[(series["metric"] == "grad_norm_clipped") & (series["layer"] == "")]["value"]
    assert (clip <= 1.0 + 1e-4).all()  # clipped to a global norm of 1
    loss = series[(series["metric"] == "loss") & (series["layer"] == "")]["value"]
    assert loss.notna().all() and (loss > 0).all()
    assert (run / "report.html").stat().st_size > 100_000 and run_findings(run)
    assert any(ln.startswith("train: step 5/6, loss ") and "grad norm" in ln and "ETA" in ln for ln in lines)
    assert lines[-1].startswith("train: finished") and "report.html" in lines[-1]
    # the same settings again: nothing is trained, the report is rendered again
    shards = {p: p.stat().st_mtime_ns for p in (run / "scalars").iterdir()}
    report = (run / "report.html").stat().st_mtime_ns
    assert fine_tune(tmp_path / "train", **kw) == run
    assert json.loads((run / "manifest.json").read_text()) == man
    assert {p: p.stat().st_mtime_ns for p in (run / "scalars").iterdir()} == shards
    assert (run / "report.html").stat().st_mtime_ns > report and "finished; report re-rendered" in lines[-1]
    # other settings are refused, naming them, before anything loads
    with pytest.raises(RunMismatchError, match=r"n_steps: 6 != 7"):
        fine_tune(tmp_path / "train", **{**kw, "n_steps": 7, "model": "no/such/model"})
    # an unfinished run (killed) is trained again from step 0
    (run / "manifest.json").write_text(json.dumps(dict(man, finished=False)))
    fine_tune(tmp_path / "train", **kw)
    again = json.loads((run / "manifest.json").read_text())
    assert again["finished"] and again["elapsed_s"] != man["elapsed_s"]
    assert steps_of("loss") == list(range(6))
