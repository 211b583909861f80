"""The importance page (gradsight.analyses.importance.report): built from a run directory alone, escaped,
self-contained; the grid's numbers, ratios to dense, best-per-configuration marks and not-finite flags match
evaluation.parquet; the overlap with magnitude is the pruned-count-weighted mean of layers.parquet; the terminal
summary and the findings name the best method per configuration.

Two tiny runs: the tiny Llama of tests/helpers.py on the demo records (a group and a prompt carrying a script
tag; layers v and down so that neuron masks and neurons.parquet exist) and an MLP through `importance_of`.
Variants (a not-finite row, an unlearning table, missing tables) are copies of these runs with a table edited."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.analyses.importance import importance_of
from gradsight.analyses.importance import figures as F
from gradsight.analyses.importance import report as R
from gradsight.demo.problems import demo_records
from gradsight.report.kit import fmt_num, fmt_pct
from gradsight.runs import registry
from gradsight.runs.api import config_for, run_lm

from helpers import external_refs, tiny_model, tiny_tokenizer

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
LM = {"dtype": "float64", "attn_implementation": "eager", "max_length": 64, "truncation": "left",
      "kinds": ("v", "down")}

pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(**extra) -> dict:
    spec = registry.get("importance")
    return {k: v for k, v in {**spec.quick, **extra}.items() if k in spec.Config.options()}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    recs = demo_records(n_problems=2)
    for r in recs:
        if r["group"] == "wrong":
            r["group"] = EVIL
    recs[0]["prompt"] += " " + EVIL
    opts = _quick(methods=("magnitude", "wanda", "gblm", "neuron"), structures=("unstructured", "2:4", "neuron"),
                  sparsities=(0.25, 0.5))
    cfg = config_for("importance", model="tiny", **LM, **opts)
    out = tmp_path_factory.mktemp("imp") / "lm"
    run_lm("importance", cfg, out, model=tiny_model(seed=0, dtype=torch.float64), tokenizer=tiny_tokenizer(),
           records=recs, progress=False, report=False, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64).eval()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    out = tmp_path_factory.mktemp("imp") / "mlp"
    importance_of(net, "cross_entropy", [(X[:7], Y[:7]), (X[7:], Y[7:])], out, groups=["a", EVIL] * 6,
                  log=lambda *a: None, **_quick(sparsities=(0.25, 0.5), neuron_layers=r"^2$"))
    return out


def _copy(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _row(page: str, method: str, structure: str, sparsity: float) -> str:
    """The grid-table row of one configuration (its cells' HTML)."""
    m = re.search(rf'<tr class="[^"]*" data-method="{re.escape(method)}" data-structure="{re.escape(structure)}" '
                  rf'data-sparsity="{sparsity}" data-finite="(yes|no)">(.*?)</tr>', page, re.S)
    assert m, (method, structure, sparsity)
    return m.group(0)


def _best(ev: pd.DataFrame, metric: str) -> dict:
    """Independent reference: per (structure, target) the finite row with the lowest metric (first on ties)."""
    d = ev[(ev["method"] != "dense") & ev["finite"] & np.isfinite(ev[metric])]
    return {k: g.loc[g[metric].idxmin(), "method"] for k, g in d.groupby(["structure", "sparsity_target"], sort=False)}


def _check_grid(run, page: str, metric: str) -> None:
    ev = pd.read_parquet(run / "evaluation.parquet")
    dense = float(ev.loc[ev["method"] == "dense", metric].iloc[0])
    best = _best(ev, metric)
    for r in ev[ev["method"] != "dense"].itertuples():
        row = _row(page, r.method, r.structure, float(r.sparsity_target))
        if not (r.finite and np.isfinite(getattr(r, metric))):
            assert R.NOT_FINITE in row and 'data-finite="no"' in row and ">best</span>" not in row
            continue
        assert f'<td class="num v">{fmt_num(getattr(r, metric))}</td>' in row
        assert f"×{getattr(r, metric) / dense:.3f}" in row  # ratio to the dense model
        assert fmt_pct(r.sparsity) in row  # achieved sparsity
        is_best = best.get((r.structure, r.sparsity_target)) == r.method
        assert (">best</span>" in row) == is_best, (r.method, r.structure)


def test_lm_page_is_escaped_self_contained_and_shows_the_grid(lm_run):
    page = R.render(lm_run).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not external_refs(page)
    assert EVIL not in page and ESCAPED in page  # the group and the prompt: escaped, and shown
    assert "lower is better" in page and 'id="in-sample"' in page  # no --eval-data: flagged in-sample
    _check_grid(lm_run, page, "ppl")
    # the top neuron of each neuron layer is listed, with its share
    nt = pd.read_parquet(lm_run / "neurons.parquet")
    assert len(nt) and 'id="neurons-table"' in page
    table = re.search(r'<table id="neurons-table">(.*?)</table>', page, re.S).group(1)
    for layer, g in nt.groupby("layer"):
        top = g.sort_values("rank").iloc[0]
        assert re.search(rf'title="{re.escape(layer)}">[^<]*</td><td class="num">1</td><td class="num">'
                         rf'{int(top["neuron"])}</td><td class="num">{re.escape(fmt_num(top["score"]))}</td>'
                         rf'<td class="num">{re.escape(fmt_pct(top["share"]))}</td>', table), layer
    for fig in ("fig-curves", "fig-overlap", "fig-scores"):
        assert f'id="{fig}"' in page and f'Plotly.newPlot("{fig}"' in page


def _weighted_overlap(layers: pd.DataFrame, method: str, structure: str, p: float) -> tuple[float, float]:
    """Reference: Σ_l overlap_l · pruned_l / Σ_l pruned_l, and the same mean of magnitude's pruned fraction."""
    g = layers[(layers["method"] == method) & (layers["structure"] == structure) & (layers["sparsity_target"] == p)]
    mag = layers[(layers["method"] == "magnitude") & (layers["structure"] == structure)
                 & (layers["sparsity_target"] == p)].set_index("layer")["sparsity"]
    num = den = ch = 0.0
    for r in g.itertuples():
        k = r.sparsity * r.numel
        if k > 0 and not np.isnan(r.overlap_magnitude):
            num, den, ch = num + r.overlap_magnitude * k, den + k, ch + mag[r.layer] * k
    return num / den, ch / den


def test_overlap_with_magnitude_is_the_pruned_weighted_mean(lm_run):
    layers = pd.read_parquet(lm_run / "layers.parquet")
    rows = F.overlap_summary(layers)
    assert {r["method"] for r in rows} == {"wanda", "gblm", "neuron"}
    for r in rows:
        want, chance = _weighted_overlap(layers, r["method"], r["structure"], r["target"])
        assert r["overlap"] == pytest.approx(want, rel=1e-12) and r["chance"] == pytest.approx(chance, rel=1e-12)
    page = R.render(lm_run).read_text()
    want = fmt_pct(np.mean([_weighted_overlap(layers, r["method"], r["structure"], r["target"])[0] for r in rows]))
    assert f"<strong>{want}</strong>" in page


def test_findings_and_terminal_summary_name_the_best_method(lm_run):
    from rich.console import Console

    ev = pd.read_parquet(lm_run / "evaluation.parquet")
    dense = float(ev.loc[ev["method"] == "dense", "ppl"].iloc[0])
    found = R.run_findings(lm_run)
    assert found and found[0]["lines"]
    lines = " ".join(found[0]["lines"])
    for (s, p), m in _best(ev, "ppl").items():
        v = float(ev[(ev["method"] == m) & (ev["structure"] == s) & (ev["sparsity_target"] == p)]["ppl"].iloc[0])
        n = ev[(ev["structure"] == s) & (ev["sparsity_target"] == p)]["method"].nunique()
        assert f", {m}: ppl {fmt_num(v)} (×{v / dense:.3f} dense), best of {n} methods" in lines, (s, p)
    console = Console(record=True, width=200)
    R.print_summary(lm_run, console)
    text = console.export_text()
    for m in ("magnitude", "wanda", "gblm", "neuron"):
        assert m in text
    assert "best of" in text and str(lm_run / "report.html") in text


def test_a_not_finite_configuration_is_flagged_and_never_best(lm_run, tmp_path):
    run = _copy(lm_run, tmp_path)
    ev = pd.read_parquet(run / "evaluation.parquet")
    ok = ev[(ev["method"] != "dense") & (ev["structure"] == "unstructured") & (ev["sparsity_target"] == 0.5)]
    victim = ok.loc[ok["ppl"].idxmin(), "method"]  # the best one becomes non-finite
    i = ok["ppl"].idxmin()
    ev.loc[i, ["nll", "ppl", "finite"]] = [float("nan"), float("nan"), False]
    ev.to_parquet(run / "evaluation.parquet")
    page = R.render(run).read_text()
    row = _row(page, victim, "unstructured", 0.5)
    assert 'data-finite="no"' in row and R.NOT_FINITE in row and ">best</span>" not in row
    _check_grid(run, page, "ppl")  # the best mark moved to the best finite row
    assert any(f"not finite: {victim}" in line for f in R.run_findings(run) for line in f["lines"])


def test_mlp_page_reports_loss_and_accuracy_and_the_unlearning_table(mlp_run, tmp_path):
    run = _copy(mlp_run, tmp_path)
    unl = pd.DataFrame({"method": ["original", "retrain", "finetune", "random_label", "salun"],
                        "UA": [99.0, 90.0, 97.0, 80.0, 91.0], "RA": [99.0, 99.0, 98.0, 95.0, 98.0],
                        "TA": [95.0, 94.0, 94.0, 90.0, 93.0], "FA": [99.0, 90.0, 97.0, 80.0, 91.0],
                        "MIA": [10.0, 30.0, 12.0, 50.0, 28.0], "seconds": [1.0, 1.0, 0.1, 0.1, 0.2]})
    keys = ["UA", "RA", "TA", "MIA"]
    unl["gap"] = (unl[keys] - unl.loc[1, keys]).abs().mean(axis=1)
    unl.to_parquet(run / "unlearning.parquet")
    page = R.render(run).read_text()
    assert not external_refs(page) and EVIL not in page and ESCAPED in page
    assert "Sparsity – loss curves" in page and "<th class=\"num\">accuracy</th>" in page
    _check_grid(run, page, "nll")
    ev = pd.read_parquet(run / "evaluation.parquet")
    r = ev[(ev["method"] == "taylor") & (ev["structure"] == "2:4")].iloc[0]
    assert fmt_pct(r["accuracy"]) in _row(page, "taylor", "2:4", 0.5)
    table = re.search(r'<table id="unlearning-table">(.*?)</table>', page, re.S).group(1)
    closest = unl.loc[unl["gap"].iloc[2:].idxmin(), "method"]  # salun: the lowest gap of the unlearning methods
    assert re.search(rf'<tr class="sig"><td class="mono">{closest}</td>', table)
    assert table.count('class="sig"') == 1
    found = R.run_findings(run)
    assert any(f"closest: {closest}" in line for f in found for line in f["lines"])


def test_a_run_without_neurons_or_unlearning_tables_renders(mlp_run, tmp_path):
    run = _copy(mlp_run, tmp_path)
    (run / "neurons.parquet").unlink()
    (run / "scores.parquet").unlink()
    page = R.render(run).read_text()
    assert 'id="neurons-table"' not in page and 'id="unlearning-table"' not in page
    assert "scores table not found (scores.parquet)" in page  # the missing table is noted, not fatal
    assert page.rstrip().endswith("</html>") and not external_refs(page)


def test_curve_figure_draws_each_method_in_sparsity_order_with_the_dense_line(mlp_run):
    ev = pd.read_parquet(mlp_run / "evaluation.parquet")
    methods = [m for m in dict.fromkeys(ev["method"]) if m != "dense"]
    fig = F.curve_figure(ev, methods, "nll", "loss", False, F.method_colors(methods))
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert titles == ["unstructured", "N:M (semi-structured)", "neurons removed"]
    dense = float(ev.loc[ev["method"] == "dense", "nll"].iloc[0])
    traces = fig["data"]
    assert all(t["y"] == [pytest.approx(dense)] * 2 for t in traces if t["name"] == "dense")
    uns = [t for t in traces if t["xaxis"] == "x" and t["name"] == "wanda"][0]
    want = ev[(ev["method"] == "wanda") & (ev["structure"] == "unstructured")].sort_values("sparsity_target")
    assert uns["x"] == want["sparsity_target"].tolist()
    assert uns["y"] == pytest.approx(want["nll"].tolist(), rel=1e-5)


def test_varying_configs_ignore_layers_a_neuron_mask_never_touches():
    layers = pd.DataFrame({"method": ["magnitude"] * 4 + ["salun"] * 2,
                           "structure": ["neuron"] * 4 + ["unstructured"] * 2, "sparsity_target": [0.5] * 6,
                           "layer": ["a", "b", "c", "d", "a", "b"], "sparsity": [0.0, 0.5, 0.0, 0.5, 0.3, 0.7]})
    assert F.varying_configs(layers) == [("salun", "unstructured", 0.5)]
    layers.loc[3, "sparsity"] = 0.25  # two neuron layers pruned unevenly: now it varies
    assert F.varying_configs(layers) == [("magnitude", "neuron", 0.5), ("salun", "unstructured", 0.5)]
