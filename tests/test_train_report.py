"""The training-monitor report: self-contained escaped page, sections by recorded metric, downsampling of long
runs, terminal summary and index findings (from fake run directories; no model, no torch)."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from fake_train_run import (EVIL, EVIL_LAYER, MARKUP, NAN_LAYER, NAN_STEP, SPIKE_STEP, layer_norm,  # noqa: E402
                            make_fake_train_run)
from test_report import CHROMIUM, FIGJSON, chromium_dom, figures, parse, user_scripts  # noqa: E402

from gradsight.train import report as R  # noqa: E402
from gradsight.train import schema as S  # noqa: E402

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fake_train_run(tmp_path_factory.mktemp("train") / "run", n_steps=200)


@pytest.fixture(scope="module")
def page(run) -> str:
    out = R.render(run)
    assert out == run / "report.html"
    return out.read_text(encoding="utf-8")


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


# ---------------------------------------------------------------------------------------------------------
# the page


def test_page_is_complete_self_contained_and_escaped(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    p = parse(page)
    assert not p.errors, p.errors[:5]
    refs = [(t, k, a[k]) for t, a in p.tags for k in ("src", "href") if a.get(k)]
    assert not [r for r in refs if "://" in r[2] or r[2].startswith("//")], refs
    assert EVIL not in page  # not in the HTML, not in the figure JSON
    assert ESCAPED in _section(page, "findings")  # the diagnosis message and layer, as text
    assert ESCAPED in _section(page, "alerts")
    assert MARKUP in page
    # figure JSON inside <script> never carries '<' literally; plotly text is entity-escaped before that
    fig_json = [m.group(1) for body in user_scripts(p) for m in [FIGJSON.search(body)] if m]
    assert len(fig_json) == len(figures(page)) > 5 and not any("<" in j for j in fig_json)
    assert any(ESCAPED in json.dumps(f) for f in figures(page).values())


def test_sections_of_recorded_metrics_are_drawn(page):
    figs = figures(page)
    for sid in ("loss", "norms", "layers", "noise", "conflict"):
        sec = _section(page, sid)
        ids = re.findall(r'class="gs-fig" id="([^"]+)"', sec)
        assert ids and all(i in figs for i in ids), sid
    assert "was not recorded" not in _section(page, "loss")
    sharp = _section(page, "sharpness")
    assert "gs-fig" not in sharp and "Sharpness (and softmax collapse) was not recorded in this run." in sharp
    # loss figure: the alert markers sit at the alert steps with the message in the hover
    loss = figs["fig-loss"]
    marks = {t["name"]: t for t in loss["data"] if t["name"].startswith("alert: ")}
    assert set(marks) == {"alert: norm_z", "alert: nonfinite", "alert: spam"}
    assert marks["alert: norm_z"]["x"] == [SPIKE_STEP] and ESCAPED in marks["alert: norm_z"]["hovertext"][0]
    assert marks["alert: spam"]["x"] == [40, 80, 120, 160]
    assert sorted({s["x0"] for s in loss["layout"]["shapes"]}) == [40, 80, 120, 150, 160]


def test_layer_heatmap_holds_the_log_norms(page):
    hm = figures(page)["fig-layer-grad_norm-hm"]["data"][0]
    assert hm["type"] == "heatmap" and len(hm["y"]) == 6 and len(hm["x"]) == 200
    g = layer_norm(200)
    i_evil = hm["y"].index(EVIL_LAYER.replace("<", "&lt;").replace(">", "&gt;"))
    assert hm["z"][i_evil][SPIKE_STEP] == pytest.approx(math.log10(g[SPIKE_STEP, 3]), rel=1e-4)
    assert hm["z"][i_evil][SPIKE_STEP] > max(v for j, v in enumerate(hm["z"][i_evil]) if j != SPIKE_STEP) + 1
    assert hm["z"][hm["y"].index(NAN_LAYER)][NAN_STEP] is None  # NaN is a gap, never a number
    top = figures(page)["fig-layer-grad_norm-top"]["data"]
    assert len(top) == 6  # TOP_K = 8 > 6 layers: all of them


def test_conflict_section_has_model_and_layer_views(page):
    figs = figures(page)
    assert [t["name"] for t in figs["fig-conflict"]["data"]][0] == f"cos(lm, {ESCAPED})"
    hm = figs["fig-cos-0-hm"]["data"][0]
    assert hm["zmin"] == -1 and hm["zmax"] == 1 and len(hm["y"]) == 6 and len(hm["x"]) == 40


def test_sharpness_and_softmax_when_recorded(tmp_path):
    run = make_fake_train_run(tmp_path / "run", n_steps=60, sharpness=True, softmax=True, noise=False,
                              conflict=False, pe=False)
    out = R.render(run, tmp_path / "elsewhere.html")
    assert out == tmp_path / "elsewhere.html" and not (run / "report.html").exists()
    page = out.read_text(encoding="utf-8")
    names = [t["name"] for t in figures(page)["fig-sharpness"]["data"]]
    assert names == ["sharpness λmax", "threshold", "collapse fp32", "collapse bf16"]
    assert "was not recorded" not in _section(page, "sharpness")
    assert "The noise scale was not recorded" not in page  # the whole section absent: one line
    assert "The gradient noise (noise scale, GSNR, per-example norms) was not recorded in this run." in page
    assert "Gradient conflict between terms (cos:&lt;a&gt;|&lt;b&gt;) was not recorded in this run." in page


def test_diagnoses_on_the_page_most_severe_first(page):
    sec = _section(page, "findings")
    sev = re.findall(r'<span class="sev sev-(\w+)">', sec)
    assert sev == ["error", "warning", "info"]
    assert "Suggested action:</span> Skip non-finite steps" in sec
    assert "step 120–122" in sec


def test_empty_run_renders_and_says_nothing_was_recorded(tmp_path):
    run = make_fake_train_run(tmp_path / "empty", empty=True)
    page = R.render(run).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "No measurement was recorded" in page
    assert 'class="gs-fig"' not in page
    for sid in ("loss", "norms", "layers", "noise", "sharpness", "conflict"):
        assert "was not recorded in this run." in _section(page, sid)
    assert "No alerts were raised in this run." in page and "No diagnosis" in page
    buf = io.StringIO()
    R.print_summary(run, Console(file=buf, width=100))
    assert "No measurement was recorded" in buf.getvalue() and "no diagnosis" in buf.getvalue()
    assert R.run_findings(run) == [{"title": "Training", "lines": ["No measurement was recorded: the series is "
                                                                    "empty."]}]


def test_missing_tables_give_a_note(tmp_path):
    run = make_fake_train_run(tmp_path / "partial", n_steps=50)  # spam alerts at step 40
    (run / "series.parquet").unlink()
    (run / "diagnoses.parquet").write_text("not parquet")
    page = R.render(run).read_text(encoding="utf-8")
    assert "series not found (series.parquet)" in page
    assert "diagnoses could not be read (diagnoses.parquet)" in page
    assert "No alert" not in page and "alerts-table" in page  # the alerts table is still there


# ---------------------------------------------------------------------------------------------------------
# long runs


def test_thin_keeps_spikes_nans_and_alert_steps():
    n = 50_000
    steps = np.arange(n) * 2
    v = np.sin(np.arange(n) / 500.0)
    v[31_337] = 40.0
    v[20_001] = np.nan
    keep = [2 * 7, 2 * 44_444, 99]  # 99 is not a recorded step
    idx = R.thin(v, steps, keep, max_points=2000)
    assert len(idx) <= 2000 and np.all(np.diff(idx) > 0)
    assert {31_337, 20_001, 7, 44_444, 0, n - 1} <= set(idx.tolist())
    assert R.thin(v[:100], steps[:100]).tolist() == list(range(100))
    with pytest.raises(ValueError, match="max_points"):
        R.thin(v, steps, max_points=3)
    with pytest.raises(ValueError, match="steps has"):
        R.thin(v[:10], steps[:9])


def test_long_run_is_downsampled_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "MAX_HEATMAP_ROWS", 3)
    run = make_fake_train_run(tmp_path / "long", n_steps=6000, noise=False, pe=False, conflict=False)
    page = R.render(run).read_text(encoding="utf-8")
    figs = figures(page)
    for f in figs.values():
        for t in f["data"]:
            if t["type"] == "scatter":
                assert len(t["x"]) <= R.MAX_POINTS, t["name"]
    loss = figs["fig-loss"]["data"][0]
    assert len(loss["x"]) < 6000 and SPIKE_STEP in loss["x"]
    assert set(range(40, 6000, 40)) <= set(loss["x"])  # every alert step kept (min/max bins alone miss some)
    hm = figs["fig-layer-grad_norm-hm"]["data"][0]
    assert len(hm["x"]) == R.MAX_HEATMAP_COLS and len(hm["y"]) == 3
    assert "&lt;" in "".join(hm["y"])  # the alerted EVIL layer is among the 3 kept
    assert "Long run: each line keeps at most 2000 points" in page
    assert "The gradient norm heatmap shows 3 of 6 layers" in page
    assert "bins 6000 steps into 500 columns" in page


# ---------------------------------------------------------------------------------------------------------
# terminal and index


def test_print_summary_lists_diagnoses_and_alert_counts(run):
    buf = io.StringIO()
    R.print_summary(run, Console(file=buf, width=80))
    out = buf.getvalue()
    lines = out.splitlines()
    assert "200 steps recorded (step 0 to 199)." in out
    assert "10 alerts: spam 8, norm_z 1, nonfinite 1." in out
    assert "Clipped at 1 of 199 steps (0.5%)." in out  # the NaN step has no clip coefficient
    diag = [ln for ln in lines if ln.startswith("  ")]
    assert [d.split()[0] for d in diag] == ["ERROR", "WARNING", "INFO"]
    # one line each, however long (soft wrap), with the literal text (not parsed as markup)
    assert f"Gradient norm spike x50 in {EVIL} {MARKUP}" in diag[1] and "action: Clip per layer" in diag[1]
    assert EVIL_LAYER in diag[1] and "step 120–122" in diag[1]
    assert re.search(r"maximum 3\.\d+ at step 120", out)


def test_run_findings_lists_the_diagnoses(run):
    found = R.run_findings(run)
    assert [f["title"] for f in found] == ["3 diagnoses (1 error, 1 warning, 1 info)", "Training"]
    d = found[0]["lines"]
    assert len(d) == 3 and d[0].startswith("[error] nonfinite, step 150, in " + NAN_LAYER)
    assert EVIL in d[1] and d[2].startswith("[info] loss_plateau, step 0–199, model-wide:")
    assert any(line.startswith("Loss 3.") for line in found[1]["lines"])


def test_loader_reads_the_schema_columns(run):
    data = R.load_train(run)
    assert list(data.series.columns) == S.SCALAR_COLUMNS and data.series["step"].dtype == np.int64
    g = data.model(S.GRAD_NORM)
    assert len(g) == 200 and math.isnan(g[NAN_STEP])  # NaN kept, not dropped
    assert list(data.layers(S.GRAD_NORM).columns)[3] == EVIL_LAYER
    assert data.layers(S.LOSS).empty and not data.has(S.SHARPNESS)


# ---------------------------------------------------------------------------------------------------------
# browser


@pytest.mark.chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium for the headless render check")
def test_chromium_draws_every_figure(run, page, tmp_path):
    dom = chromium_dom(run / "report.html", tmp_path)
    targets = re.findall(r'class="gs-fig" id="([^"]+)"', page)
    starts = sorted((dom.index(f'id="{t}"'), t) for t in targets)
    for i, (pos, t) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(dom)
        assert 'class="main-svg"' in dom[pos:end], f"figure {t} not drawn"
    assert not re.search(r'class="[^"]*gs-error', dom)
    assert EVIL not in dom and ESCAPED in dom
    assert "10 of 10 rows shown" in dom  # the alerts filter script ran to its end
