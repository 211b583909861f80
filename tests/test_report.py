"""Report layer: HTML page (self-contained, escaped, drawable offline) and terminal summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from markupsafe import escape
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from fake_run import EVIL, EVIL_ID, make_fake_run  # noqa: E402

from gradsight.report import print_summary, render_html  # noqa: E402
from gradsight.analyses.layers import report as report_html  # noqa: E402
from gradsight.report import kit  # noqa: E402
from gradsight.runs import store as run_store  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
NEWPLOT = re.compile(r'Plotly\.newPlot\(\s*"([^"]+)"')
FIGJSON = re.compile(r"var f = (\{.*?\}); f\.layout\.template = GS_TEMPLATE;", re.S)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


class StrictParser(HTMLParser):
    """Collects ids, scripts, external references and nesting errors (html.parser itself never raises)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.classes: dict[str, list[str]] = {}
        self.scripts: list[tuple[dict, str]] = []
        self.external: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self._script_attrs: dict | None = None
        self._script_data: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "id" in a:
            self.ids.append(a["id"])
        for c in (a.get("class") or "").split():
            self.classes.setdefault(c, []).append(a.get("id") or "")
        for key in ("src", "href"):
            v = (a.get(key) or "").strip().lower()
            if v.startswith(("http://", "https://", "//")):
                self.external.append(f"<{tag} {key}={v}>")
        if tag == "script":
            self._script_attrs, self._script_data = a, []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag == "script" and self._script_attrs is not None:
            self.scripts.append((self._script_attrs, "".join(self._script_data)))
            self._script_attrs = None
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]}) at {self.getpos()}")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
            return
        self.stack.pop()

    def handle_data(self, data):
        if self._script_attrs is not None:
            self._script_data.append(data)


def parse(html: str) -> StrictParser:
    p = StrictParser()
    p.feed(html)
    p.close()
    if p.stack:
        p.errors.append(f"unclosed tags at end: {p.stack}")
    return p


def user_scripts(p: StrictParser) -> list[str]:
    return [body for attrs, body in p.scripts if attrs.get("id") != "plotlyjs"]


def figures(html: str) -> dict[str, dict]:
    """figure id -> parsed figure JSON, from the per-figure scripts."""
    out = {}
    for body in user_scripts(parse(html)):
        m, f = NEWPLOT.search(body), FIGJSON.search(body)
        if m and f:
            out[m.group(1)] = json.loads(f.group(1))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def page(run) -> str:
    out = render_html(run)
    assert out == run / "report.html"
    return out.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------------------


def test_render_writes_valid_self_contained_html(run, page):
    assert (run / "report.html").is_file()
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")], "temporary file left behind"
    p = parse(page)
    assert p.errors == []
    assert page.lstrip().lower().startswith("<!doctype html>")
    # exactly one inlined plotly.js, and it is complete
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    banner = re.search(r"plotly\.js v[0-9.]+", js).group(0)
    assert page.count(banner) == 1
    bundles = [body for attrs, body in p.scripts if attrs.get("id") == "plotlyjs"]
    assert len(bundles) == 1 and len(bundles[0]) >= len(js) - 100
    assert not any(attrs.get("src") for attrs, _ in p.scripts), "no script may load from anywhere"
    # nothing external: no http(s) src/href, no stylesheet links
    assert p.external == []
    assert not [a for t, a in p.tags if t == "link"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page.replace(bundles[0], ""), re.I)


def test_every_newplot_target_exists_and_figures_are_json(page):
    p = parse(page)
    ids = set(p.ids)
    assert len(ids) == len(p.ids), "duplicate element ids"
    targets = [m for body in user_scripts(p) for m in NEWPLOT.findall(body)]
    assert targets, "no figures"
    assert len(targets) == len(set(targets))
    missing = [t for t in targets if t not in ids]
    assert missing == []
    assert sorted(targets) == sorted(p.classes["gs-fig"]), "every figure div is drawn exactly once"
    figs = figures(page)
    assert set(figs) == set(targets)
    # one curve figure per metric present, two distribution figures, heatmaps for the per-layer tests
    assert {t for t in targets if t.startswith("fig-curves-")} == {
        f"fig-curves-{m.replace('_', '-')}"
        for m in ("nuclear", "sigma1_ratio", "erank", "frobenius", "spectral", "stable_rank")
    }
    assert {"fig-dist-nuclear", "fig-dist-erank"} <= set(targets)
    assert "fig-heat-nuclear" in targets
    for f in figs.values():
        assert f["data"] and "height" in f["layout"]


def test_curves_have_ci_bands_and_consistent_group_colours(page):
    figs = figures(page)
    colour: dict[str, str] = {}
    n_kinds = 7
    for fid, f in figs.items():
        if fid.startswith("fig-curves-"):
            lines = [t for t in f["data"] if t.get("mode") == "lines+markers"]
            bands = [t for t in f["data"] if t.get("fill") == "toself"]
            assert len(lines) == 3 * n_kinds and len(bands) == len(lines)
            assert sum(1 for t in lines if t["showlegend"]) == 3  # one legend entry per group
            for t in lines:
                assert t["x"] == list(range(6))
                assert colour.setdefault(t["name"], t["line"]["color"]) == t["line"]["color"]
        elif fid.startswith("fig-dist-"):
            for t in f["data"]:
                assert colour.setdefault(t["name"], t["marker"]["color"]) == t["marker"]["color"]
    assert len(colour) == 3 and len(set(colour.values())) == 3
    # group names reach plotly entity-escaped (plotly renders a small HTML subset in labels)
    assert "detailed &lt;cot&gt; &amp; [long]" in colour


def test_sections_and_tables_present(page):
    for anchor in ("run", "findings", "curves", "tables", "distributions", "significance", "examples"):
        assert f'id="{anchor}"' in page
    assert "fake/tiny-llama" in page
    assert "Key findings" in page and "has the largest depth-mean nuclear norm" in page
    assert "token-mean" in page  # response-length caveat
    assert "blocks [0, 2)" in page and "blocks [4, 6)" in page  # MAD segment ranges in the header
    assert 'id="tests-table"' in page and 'id="rd-table"' in page
    assert "&lt;0.001" in page  # p-values at the permutation resolution limit
    assert "synthetic &lt;note&gt; &amp; test" in page


# ---------------------------------------------------------------------------------------------------------
# escaping
# ---------------------------------------------------------------------------------------------------------


def test_user_text_is_escaped(page):
    for raw in ('<script>alert("x")</script>', "</script><b>", "<b>INJECTED", "<img src=x", EVIL_ID,
                "<cot>", "<evil>"):
        assert raw not in page, raw
    assert str(escape(EVIL)) in page  # the whole prompt, escaped, in the examples table
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "&lt;/script&gt;&lt;b&gt;INJECTED" in page
    assert str(escape(EVIL_ID)) in page
    assert "data/fake &lt;evil&gt;.jsonl" in page
    # nothing in any inline script can close it early
    for body in user_scripts(parse(page)):
        assert "</" not in body.replace("<\\/", "")


def test_script_json_is_inert():
    s = kit.script_json({"t": "</script><!-- & \u2028 <b>", "n": float("nan")})
    assert not set("<>&") & set(s)
    assert "\u2028" not in s
    assert json.loads(s) == {"t": "</script><!-- & \u2028 <b>", "n": None}


# ---------------------------------------------------------------------------------------------------------
# skipped examples
# ---------------------------------------------------------------------------------------------------------


def _text(fragment: str) -> str:
    import html

    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment)))


def test_skipped_examples_banner_and_rows(run, page):
    ex = pd.read_parquet(run / "examples.parquet")
    skipped = ex[ex.status == "skipped"]
    assert len(skipped) == 4
    m = re.search(r'<div class="banner" id="skip-banner".*?</div>', page, re.S)
    assert m, "warning banner missing"
    banner = _text(m.group(0))
    assert f"4 of {len(ex)} examples were skipped" in banner
    assert "response entirely truncated : 2" in banner
    assert "empty response : 1" in banner
    assert "non-finite gradient in model.layers.3.mlp.down_proj : 1" in banner
    # every skipped row is highlighted and shows its full reason
    rows = re.findall(r'<tr class="skipped"[^>]*>.*?</tr>', page, re.S)
    assert len(rows) == 4
    for reason in skipped.reason:
        assert str(escape(reason)) in page
        assert any(str(escape(reason)) in r for r in rows)


def test_no_banner_without_skipped(tmp_path):
    run = make_fake_run(tmp_path / "r", n_groups=2, n_blocks=4, kinds=("q", "v"), n_per_group=5,
                        with_skipped=False, evil_prompt=False)
    page = render_html(run).read_text()
    assert 'id="skip-banner"' not in page
    assert 'class="skipped"' not in page
    assert parse(page).errors == []


# ---------------------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------------------


def test_single_group_without_rd_and_tests(tmp_path):
    run = make_fake_run(tmp_path / "r", n_groups=1, n_blocks=5, kinds=("q", "k"), n_per_group=6)
    assert not (run / "rd.parquet").exists() and not (run / "tests.parquet").exists()
    page = render_html(run).read_text()
    p = parse(page)
    assert p.errors == []
    assert "only one group" in page.lower()
    assert "fig-heat-" not in page
    targets = [t for body in user_scripts(p) for t in NEWPLOT.findall(body)]
    assert targets and set(targets) <= set(p.ids)


def test_missing_tables_become_notes(run, tmp_path):
    cp = tmp_path / "copy"
    shutil.copytree(run, cp)
    for name in ("mad.parquet", "tests.parquet", "summary.parquet", "report.html"):
        (cp / name).unlink()
    shutil.rmtree(cp / "layer_stats")
    page = render_html(cp).read_text()
    assert parse(page).errors == []
    assert "MAD table not found" in page and "Tests table not found" in page
    assert "No group curves" in page
    assert "Plotly.newPlot(" not in "".join(user_scripts(parse(page)))


def test_out_path_and_atomic_replace(run, tmp_path, monkeypatch):
    out = render_html(run, out=tmp_path / "sub" / "r.html")
    assert out == tmp_path / "sub" / "r.html" and out.stat().st_size > 1_000_000
    target = tmp_path / "sub" / "r.html"
    target.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(run_store.os, "replace", boom)
    with pytest.raises(OSError):
        render_html(run, out=target)
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["r.html"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        render_html(tmp_path)


def test_formatting():
    assert report_html.fmt_p(0.001, 999) == "<0.001"
    assert report_html.fmt_p(1 / 10001, 10000) == "<0.0001"
    assert report_html.fmt_p(0.0423, 999) == "0.0423"
    assert report_html.fmt_p(2e-5) == "2.0e-05"
    assert report_html.fmt_p(float("nan")) == "–"
    assert report_html.fmt_num(1234.5678) == "1235"
    assert report_html.fmt_num(1.5e-5) == "1.500e-05"
    assert report_html.fmt_num(None) == "–"


def test_size_for_200_examples_210_layers(tmp_path):
    run = make_fake_run(tmp_path / "big", n_groups=2, n_blocks=30, n_per_group=100, evil_prompt=False)
    ls = pd.read_parquet(run / "layer_stats")
    assert ls.idx.nunique() == 200 and ls.layer.nunique() == 210 and ls.metric.nunique() == 6
    size = render_html(run).stat().st_size
    assert size < 8_000_000, size


# ---------------------------------------------------------------------------------------------------------
# headless browser
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.chromium
@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium for the headless render check (`make browser` installs it)",
)
def chromium_dom(report, tmp_path) -> str:
    """The DOM of `report` after headless Chromium ran its scripts (plotly drew the figures)."""
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
        Path(report).as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = res.stdout
    assert res.returncode == 0 and "</html>" in dom, res.stderr[-2000:]
    return dom


def assert_drawn_without_injection(dom: str, targets: list[str]) -> None:
    """Every figure div holds a drawn plot, none failed, and the EVIL text stayed inert, escaped text."""
    assert 'class="main-svg"' in dom
    starts = sorted((dom.index(f'id="{t}"'), t) for t in targets)
    for i, (pos, t) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(dom)
        assert 'class="main-svg"' in dom[pos:end], f"figure {t} not drawn"
    assert not re.search(r'class="[^"]*gs-error', dom), "a figure failed to draw"
    # no injected element or script ran
    assert "<b>INJECTED" not in dom
    assert '<script>alert("x")' not in dom
    assert "data-pwned" not in dom
    assert "&lt;/script&gt;&lt;b&gt;INJECTED" in dom


def test_chromium_draws_every_figure_without_injection(run, page, tmp_path):
    dom = chromium_dom(run / "report.html", tmp_path)
    assert_drawn_without_injection(dom, [t for body in user_scripts(parse(page)) for t in NEWPLOT.findall(body)])


# ---------------------------------------------------------------------------------------------------------
# terminal summary
# ---------------------------------------------------------------------------------------------------------


def test_print_summary(run):
    console = Console(record=True, width=100)
    print_summary(run, console=console)
    text = console.export_text()
    for g in ("direct", "simplified_cot", "detailed <cot> & [long]"):  # "[long]" must not be eaten as markup
        assert g in text
    s = pd.read_parquet(run / "summary.parquet")
    q = s[(s.group == "direct") & (s.kind == "q") & (s.metric == "nuclear")]["mean"].mean()
    assert report_html.fmt_num(q) in text
    mad = pd.read_parquet(run / "mad.parquet")
    m = mad[(mad.group == "simplified_cot") & (mad.kind == "down") & (mad.metric == "nuclear")
            & (mad.segment == "all")]["value"].iloc[0]
    assert report_html.fmt_num(m) in text
    assert "4 of 28 examples skipped" in text and "empty response: 1" in text
    assert "mad_diff" in text and "mean_diff" in text and "<0.001" in text
    assert str(run / "report.html") in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_print_summary_narrow_and_single_group(tmp_path):
    run = make_fake_run(tmp_path / "r", n_groups=1, n_blocks=4, kinds=("q",), n_per_group=4)
    console = Console(record=True, width=80)
    print_summary(run, console=console)
    text = console.export_text()
    flat = " ".join(text.split())
    assert "direct" in flat and "Only one group" in flat and "not written yet" in flat
    assert "rd.parquet" not in flat  # expected absence is not reported as a problem
    assert max(len(line) for line in text.splitlines()) <= 80


def test_findings_with_untested_pairs(run, tmp_path):
    cp = tmp_path / "copy"
    shutil.copytree(run, cp)
    t = pd.read_parquet(cp / "tests.parquet")
    sel = (t.test == "mad_diff") & (t.kind == "q") & (t.metric == "nuclear")
    t.loc[sel, "p_value"] = float("nan")
    t.loc[sel, "n_perm"] = 0
    t.loc[sel, "note"] = "too few examples"
    t.to_parquet(cp / "tests.parquet", index=False)
    data = report_html.load_run(cp)
    q = [f for f in report_html.findings(data) if f["title"] == "Nuclear norm, q"][0]
    text = " ".join(q["lines"])
    assert "not tested (too few examples)" in text
    assert "mean difference significant at 0.05 for 3 of 3 pairs" in text
    page = render_html(cp).read_text()
    assert parse(page).errors == []
