"""Geometry report: self-contained page, escaped user text, drawable figures, optional sections, findings."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from fake_geometry_run import make_fake_geometry_run  # noqa: E402
from fake_run import EVIL, EVIL_ID  # noqa: E402
from test_report import (CHROMIUM, NEWPLOT, assert_drawn_without_injection, chromium_dom,  # noqa: E402
                         figures, parse, user_scripts)

from gradsight.analyses.geometry import figures as geometry_figures  # noqa: E402
from gradsight.analyses.geometry import report as rg  # noqa: E402
from gradsight.analyses.geometry.report import geometry_findings, load_geometry  # noqa: E402
from gradsight.analyses.geometry.report import print_summary as print_geometry_summary  # noqa: E402
from gradsight.analyses.geometry.report import render as render_geometry_html  # noqa: E402
from gradsight.report.kit import fmt_num  # noqa: E402

OPTIONAL_SECTIONS = {"terms": "terms", "entanglement": "entanglement", "psr": "psr", "scores": "scores"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fake_geometry_run(tmp_path_factory.mktemp("geo") / "run")


@pytest.fixture(scope="module")
def page(run) -> str:
    out = render_geometry_html(run)
    assert out == run / "report.html"
    return out.read_text(encoding="utf-8")


def _targets(page: str) -> list[str]:
    return [t for body in user_scripts(parse(page)) for t in NEWPLOT.findall(body)]


def _all_strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_strings(v)


# ---------------------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------------------


def test_fake_run_is_schema_conforming(run):
    man = json.loads((run / "manifest.json").read_text())
    assert man["analysis"] == "geometry" and man["geometry"]["mode"] in ("projected", "exact")
    ex = pd.read_parquet(run / "examples.parquet")
    assert set(ex.role) == {"loss", "pair", "rollout", "term"}
    assert (ex.status == "skipped").sum() == 1
    for name in ("group_cosines", "pairs", "coherence", "terms", "entanglement", "entanglement_summary", "psr_nsr"):
        df = pd.read_parquet(run / f"{name}.parquet")
        assert {"scope", "scope_type", "kind", "block"} <= set(df.columns), name
        assert set(df.scope_type) == {"model", "kind", "block", "layer"}, name
        assert df.block.dtype == "int64"
    coh = pd.read_parquet(run / "coherence.parquet")
    solo = coh[(coh.scope == "model") & (coh.n == 1)]
    assert len(solo) == 1 and solo.ci_lo.isna().all() and "1 valid example" in solo.note.iloc[0]


def test_render_writes_valid_self_contained_html(run, page):
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")], "temporary file left behind"
    p = parse(page)
    assert p.errors == []
    assert page.lstrip().lower().startswith("<!doctype html>")
    from plotly.offline import get_plotlyjs

    banner = re.search(r"plotly\.js v[0-9.]+", get_plotlyjs()).group(0)
    assert page.count(banner) == 1
    bundles = [body for attrs, body in p.scripts if attrs.get("id") == "plotlyjs"]
    assert len(bundles) == 1
    assert not any(attrs.get("src") for attrs, _ in p.scripts)
    assert p.external == [] and not [a for t, a in p.tags if t == "link"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page.replace(bundles[0], ""), re.I)
    assert len(page) < 6_000_000


def test_sections_and_figures(run, page):
    for anchor in ("run", "findings", "cosines", "conflict", "coherence", "terms", "entanglement", "psr",
                   "diversity", "noise", "scores", "config"):
        assert f'id="{anchor}"' in page, anchor
    p = parse(page)
    ids = set(p.ids)
    assert len(ids) == len(p.ids), "duplicate element ids"
    targets = _targets(page)
    assert len(targets) == len(set(targets)) and set(targets) <= ids
    assert sorted(targets) == sorted(p.classes["gs-fig"]), "every figure div is drawn exactly once"
    assert set(targets) == {
        "fig-cos-model", "fig-cos-kind", "fig-cos-depth", "fig-conflict-kind", "fig-conflict-depth",
        "fig-coherence", "fig-terms-depth", "fig-ent-scatter", "fig-ent-regimes", "fig-ent-ratio",
        "fig-psr-norms", "fig-psr-depth", "fig-diversity", "fig-noise",
    }
    figs = figures(page)
    assert set(figs) == set(targets)
    for fid, f in figs.items():
        assert f["data"] and "height" in f["layout"], fid
    # the model heatmap is labels x labels; the kind panels use #codes with a key on the page
    ex = pd.read_parquet(run / "examples.parquet")
    n_labels = ex.label.nunique()
    hm = figs["fig-cos-model"]["data"][0]
    assert len(hm["z"]) == n_labels and hm["x"][0] != "#1"
    assert {t["x"][0] for t in figs["fig-cos-kind"]["data"]} == {"#1"}
    assert len(figs["fig-cos-kind"]["data"]) == 3  # q, v, down
    # coherence bars: the one-example label has no error bar
    bars = figs["fig-coherence"]["data"][0]
    solo = bars["x"].index("solo")
    assert bars["error_y"]["array"][solo] is None


def test_figure_json_is_valid_plotly(page):
    """Every figure validates against plotly's schema (catches misspelt properties that plotly.js ignores)."""
    import plotly.graph_objects as go

    for fid, f in figures(page).items():
        go.Figure(f)  # raises ValueError on an invalid property


def test_user_text_is_escaped(run, page):
    for raw in ('<script>alert("x")</script>', "</script><b>", "<b>INJECTED", "<img src=x", EVIL_ID,
                "<cot>", "<evil>", '<b>"x"</b>'):
        assert raw not in page, raw
    assert str(escape(EVIL)) in page  # the prompt, escaped, in the scores tables
    assert str(escape(EVIL_ID)) in page
    assert "detailed &lt;cot&gt; &amp; [long]" in page
    for body in user_scripts(parse(page)):
        assert "</" not in body.replace("<\\/", "")
    # text handed to plotly (labels, hover ids) is entity-escaped: plotly renders a small HTML subset
    strings = [s for f in figures(page).values() for s in _all_strings(f)]
    assert not [s for s in strings if re.search(r"<(?!br>|extra>|/extra>)[a-z/]", s, re.I)]
    scatter = figures(page)["fig-ent-scatter"]
    texts = [t for tr in scatter["data"] for t in tr.get("text", [])]
    assert any("&lt;b&gt;&quot;x&quot;&lt;/b&gt; &amp; y" in t or "&lt;b&gt;\"x\"&lt;/b&gt; &amp; y" in t
               for t in texts), texts[:3]


def test_skipped_banner_and_nan_notes(run, page):
    m = re.search(r'<div class="banner" id="skip-banner".*?</div>', page, re.S)
    assert m and "1 of 52 units were skipped" in m.group(0)
    assert "response entirely truncated" in page
    assert "n/a" in page
    assert "group has 1 valid example(s)" in page  # the coherence note of the one-example label


# ---------------------------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------------------------


def _finding(findings: list[dict], title_start: str) -> str:
    hits = [f for f in findings if f["title"].startswith(title_start)]
    assert hits, [f["title"] for f in findings]
    return " ".join(hits[0]["lines"])


def test_findings_quote_the_tables(run, page):
    data = load_geometry(run)
    f = geometry_findings(data)
    # the same findings from a plain mapping of tables
    assert geometry_findings(data.tables) == f

    es = pd.read_parquet(run / "entanglement_summary.parquet")
    m = es[es.scope_type == "model"].iloc[0]
    text = _finding(f, "Chosen vs rejected")
    for col in ("share_ideal", "share_both_up", "share_both_down", "share_other"):
        assert f"{100 * m[col]:.1f}%" == rg.fmt_pct(m[col])
        assert rg.fmt_pct(m[col]) in text
    assert fmt_num(m.mean_ratio) in text and fmt_num(m.ratio_ci_lo) in text and fmt_num(m.mean_cos) in text
    assert str(escape(text.split(".")[0])) in page  # the findings are on the page, escaped

    gc = pd.read_parquet(run / "group_cosines.parquet")
    gm = gc[(gc.scope_type == "model") & (gc.group_a != gc.group_b)]
    hi, lo = gm.loc[gm.cosine.idxmax()], gm.loc[gm.cosine.idxmin()]
    text = _finding(f, "Alignment between labels")
    assert fmt_num(hi.cosine) in text and fmt_num(lo.cosine) in text
    assert hi.group_a in text and lo.group_b in text

    gb = gc[(gc.scope_type == "block") & (gc.group_a != gc.group_b)]
    worst = gb.loc[gb.cosine.idxmin()]
    assert f"{fmt_num(worst.cosine)}" in _finding(f, "Alignment by depth")
    assert f"block {int(worst.block)}" in _finding(f, "Alignment by depth")

    pr = pd.read_parquet(run / "pairs.parquet")
    pm = pr[pr.scope_type == "model"]
    top = pm.loc[pm.conflict_rate.idxmax()]
    assert rg.fmt_pct(top.conflict_rate) in _finding(f, "Conflict")

    ps = pd.read_parquet(run / "psr_nsr.parquet")
    r = ps[(ps.scope_type == "model") & (ps.group == "__all__")].iloc[0]
    text = _finding(f, "Positive vs negative")
    assert fmt_num(r.cos) in text and fmt_num(math.sqrt(r.sq_norm_psr)) in text
    assert fmt_num(r.w_reinforce_norm) in text

    dv = pd.read_parquet(run / "diversity.parquet")
    text = _finding(f, "Diversity")
    for x in dv.itertuples():
        if x.label != "__all__":
            assert f"{x.label} {fmt_num(x.g_vendi)} (n = {x.n})" in text

    nz = pd.read_parquet(run / "noise.parquet")
    t = nz[(nz.label == "__all__") & (nz.layer == "total")].iloc[0]
    text = _finding(f, "Gradient noise")
    assert f"B_simple (all units, whole model) = {fmt_num(t.b_simple)}" in text
    assert f"[{fmt_num(t.b_ci_lo)}, {fmt_num(t.b_ci_hi)}]" in text

    text = _finding(f, "Coherence")
    assert "solo: CI n/a" in text


def test_findings_of_empty_tables():
    assert geometry_findings({}) == []
    assert geometry_findings({"pairs": None, "group_cosines": pd.DataFrame()}) == []


# ---------------------------------------------------------------------------------------------------------
# optional tables
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, gone",
    [
        (dict(with_pairs=False), {"entanglement"}),
        (dict(with_rollouts=False), {"psr"}),
        (dict(with_terms=False), {"terms"}),
        (dict(with_pairs=False, with_rollouts=False, with_terms=False, evil=False, n_groups=2),
         {"entanglement", "psr", "terms"}),
    ],
    ids=["no-pairs", "no-rollouts", "no-terms", "plain"],
)
def test_missing_optional_tables_drop_their_sections(tmp_path, kwargs, gone):
    run = make_fake_geometry_run(tmp_path / "r", **kwargs)
    page = render_geometry_html(run).read_text()
    p = parse(page)
    assert p.errors == []
    for anchor in OPTIONAL_SECTIONS.values():
        assert (f'id="{anchor}"' in page) == (anchor not in gone), anchor
        assert (f'href="#{anchor}"' in page) == (anchor not in gone), anchor
    targets = _targets(page)
    assert targets and set(targets) <= set(p.ids)
    titles = [f["title"] for f in geometry_findings(load_geometry(run))]
    assert ("Loss terms" in titles) == ("terms" not in gone)
    assert any(t.startswith("Chosen vs rejected") for t in titles) == ("entanglement" not in gone)


def test_missing_scores_and_required_tables(run, tmp_path):
    cp = tmp_path / "copy"
    shutil.copytree(run, cp)
    for name in ("scores.parquet", "noise.parquet", "group_cosines.parquet", "report.html"):
        (cp / name).unlink()
    page = render_geometry_html(cp).read_text()
    assert parse(page).errors == []
    assert 'id="scores"' not in page and 'href="#scores"' not in page
    assert "noise table not found" in page and "group_cosines table not found" in page
    assert "No group cosines" in page and "No noise table" in page
    assert "fig-cos-model" not in page and "fig-noise" not in page
    assert "fig-coherence" in _targets(page)


def test_nan_everywhere_renders(run, tmp_path):
    """All-NaN statistics (e.g. every example invalid) give 'n/a', no crash, and still-valid figure JSON."""
    cp = tmp_path / "nan"
    shutil.copytree(run, cp)
    for name in ("pairs", "coherence", "entanglement_summary", "psr_nsr", "noise", "diversity", "group_cosines"):
        df = pd.read_parquet(cp / f"{name}.parquet")
        for c in df.columns:
            if df[c].dtype == "float64":
                df[c] = float("nan")
        df.to_parquet(cp / f"{name}.parquet", index=False)
    page = render_geometry_html(cp).read_text()
    assert parse(page).errors == []
    assert "n/a" in page
    for f in figures(page).values():
        json.dumps(f, allow_nan=False)


def test_scatter_is_subsampled(run, tmp_path, monkeypatch):
    monkeypatch.setattr(geometry_figures, "MAX_SCATTER", 5)
    data = load_geometry(run)
    fig, shown, total = rg.entanglement_scatter(data)
    assert shown == 5 and total == 8
    assert sum(len(t["x"]) for t in fig["data"] if t.get("mode") == "markers") == 5


def test_not_a_geometry_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        render_geometry_html(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"analysis": "layers"}))
    with pytest.raises(ValueError, match="layers"):
        render_geometry_html(tmp_path)


def test_out_path(run, tmp_path):
    out = render_geometry_html(run, out=tmp_path / "sub" / "g.html")
    assert out == tmp_path / "sub" / "g.html" and out.stat().st_size > 1_000_000


# ---------------------------------------------------------------------------------------------------------
# headless browser
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.chromium
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium for the headless render check (`make browser` installs it)",
)
def test_chromium_draws_every_figure_without_injection(run, page, tmp_path):
    assert_drawn_without_injection(chromium_dom(run / "report.html", tmp_path), _targets(page))


# ---------------------------------------------------------------------------------------------------------
# terminal summary
# ---------------------------------------------------------------------------------------------------------


def test_print_geometry_summary(run):
    console = Console(record=True, width=100)
    print_geometry_summary(run, console=console)
    text = console.export_text()
    flat = " ".join(text.split())
    assert "detailed <cot> & [long]" in text  # "[long]" must not be eaten as markup
    assert "1 of 52 units skipped" in flat and "response entirely truncated: 1" in flat
    dv = pd.read_parquet(run / "diversity.parquet")
    assert fmt_num(dv[dv.label == "__all__"].g_vendi.iloc[0]) in text
    es = pd.read_parquet(run / "entanglement_summary.parquet")
    assert rg.fmt_pct(es[es.scope_type == "model"].share_ideal.iloc[0]) in text
    nz = pd.read_parquet(run / "noise.parquet")
    assert fmt_num(nz[(nz.label == "__all__") & (nz.layer == "total")].b_simple.iloc[0]) in text
    assert "Findings" in text and str(run / "report.html") in flat
    assert max(len(line) for line in text.splitlines()) <= 100


def test_print_geometry_summary_plain_narrow(tmp_path):
    run = make_fake_geometry_run(tmp_path / "r", n_groups=1, with_pairs=False, with_rollouts=False,
                                 with_terms=False, evil=False)
    console = Console(record=True, width=80)
    print_geometry_summary(run, console=console)
    text = console.export_text()
    flat = " ".join(text.split())
    assert "direct" in flat and "not written yet" in flat and "Entanglement" not in flat
    assert max(len(line) for line in text.splitlines()) <= 80
