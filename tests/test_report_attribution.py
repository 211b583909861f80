"""The attribution page (gradsight.analyses.attribution.report): built from a run directory alone, escaped,
self-contained, explaining the sign and normalisation, listing each query's proponents in the order of
top.parquet, shading the proponents' tokens (language models) and summarising in the terminal.

Two tiny runs: an MLP through `attribution_of` (train x train, a group named like a script tag) and the tiny
Llama of tests/helpers.py on the demo records (tokens.parquet)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.analyses.attribution import attribution_of
from gradsight.analyses.attribution import report as R
from gradsight.demo.problems import demo_records
from gradsight.report.kit import fmt_num, fmt_pct
from gradsight.runs import registry
from gradsight.runs.api import config_for, run_lm

from helpers import external_refs, tiny_model, tiny_tokenizer

EVIL = "<script>alert(1)</script>"
LM = {"dtype": "float64", "attn_implementation": "eager", "max_length": 64, "truncation": "left", "kinds": ("v",)}
SIGN = "positive when the training example helps the query"

pytestmark = pytest.mark.usefixtures("one_thread")


def _quick(**extra) -> dict:
    spec = registry.get("attribute")
    return {k: v for k, v in {**spec.quick, **extra}.items() if k in spec.Config.options()}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64).eval()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    out = tmp_path_factory.mktemp("attr") / "mlp"
    attribution_of(net, "cross_entropy", [(X[:7], Y[:7]), (X[7:], Y[7:])], out, groups=["a", EVIL] * 6,
                   methods=("ekfac", "trak", "grad_cos"), **_quick())
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    recs = demo_records(n_problems=2)
    for r in recs:
        if r["group"] == "wrong":
            r["group"] = EVIL
    cfg = config_for("attribute", model="tiny", **{k: v for k, v in LM.items()}, **_quick())
    out = tmp_path_factory.mktemp("attr") / "lm"
    run_lm("attribute", cfg, out, model=tiny_model(seed=0, dtype=torch.float64), tokenizer=tiny_tokenizer(),
           records=recs, progress=False, report=False, log=lambda *a: None)
    return out


def _rows(page: str, side: str, query: int, method: str) -> list[tuple[int, int]]:
    """(rank, train) of the page's rows of one query, method and side, in page order."""
    pat = (rf'<tr class="{side}" data-query="{query}" data-method="{re.escape(method)}" data-rank="(\d+)" '
           r'data-train="(\d+)">')
    return [(int(a), int(b)) for a, b in re.findall(pat, page)]


def _check_page(run, page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # escaped, and shown
    assert not external_refs(page)
    assert SIGN in page and "score_per_n" in page and "standard deviation of this query" in page
    top = pd.read_parquet(run / "top.parquet")
    for m in top["method"].unique():
        for q in sorted(top["query"].unique())[:R.MAX_QUERIES]:
            for side in ("proponent", "opponent"):
                want = top[(top["method"] == m) & (top["query"] == q) & (top["side"] == side)].sort_values("rank")
                got = _rows(page, {"proponent": "prop", "opponent": "opp"}[side], int(q), str(m))
                assert got == list(zip(want["rank"], want["train"])), (m, q, side)
    # every method's damping (absolute lambda from curvature.parquet) is in the methods table
    curv = pd.read_parquet(run / "curvature.parquet")
    for m, g in curv.groupby("method"):
        row = re.search(rf'<tr data-method="{m}">(.*?)</tr>', page, re.S).group(1)
        assert fmt_num(g["damping"].min()) in row and fmt_num(g["damping"].max()) in row


def test_mlp_page_is_escaped_self_contained_and_lists_the_proponents(mlp_run):
    page = R.render(mlp_run).read_text()
    _check_page(mlp_run, page)
    # the top self-influence example of the first method is listed first, its outlier flag as in the table
    si = pd.read_parquet(mlp_run / "self_influence.parquet")
    m0 = str(si["method"].iloc[0])
    want = si[si["method"] == m0].sort_values("z", ascending=False, kind="stable")["example"].head(R.TOP_OUTLIERS)
    table = re.search(rf'<table class="self-table" data-method="{m0}">(.*?)</table>', page, re.S).group(1)
    assert [int(x) for x in re.findall(r'data-example="(\d+)"', table)] == want.tolist()
    # grad_cos's self-influence is a constant: its z (float noise) must not be presented as outliers
    assert "grad_cos: every example's self-influence is the same number" in page
    assert '<table class="self-table" data-method="grad_cos">' not in page


def test_findings_and_terminal_summary(mlp_run):
    from rich.console import Console

    found = R.run_findings(mlp_run)
    assert found and found[0]["lines"]
    prec = pd.read_parquet(mlp_run / "precision.parquet")
    p1 = prec[(prec["method"] == "ekfac") & (prec["k"] == 1)]["precision"].iloc[0]
    assert f"for {fmt_pct(p1)} of" in found[0]["lines"][0]
    console = Console(record=True, width=200)
    R.print_summary(mlp_run, console)
    text = console.export_text()
    top = pd.read_parquet(mlp_run / "top.parquet")
    first = top[(top["method"] == "ekfac") & (top["side"] == "proponent") & (top["rank"] == 1)].sort_values("query")
    assert EVIL in text  # printed verbatim (a rich Text, not markup)
    assert fmt_num(first["score"].iloc[0]) in text and str(mlp_run / "report.html") in text


def test_lm_page_shades_each_proponent_token_by_its_score(lm_run):
    page = R.render(lm_run).read_text()
    _check_page(lm_run, page)
    tok = pd.read_parquet(lm_run / "tokens.parquet")
    assert len(tok)
    n_strips = 0
    for (q, k), g in tok.groupby(["query", "rank"]):
        g = g.sort_values("position")
        m = re.search(rf'<div class="tokstrip" data-query="{q}" data-rank="{k}" data-train="{g["train"].iloc[0]}">'
                      r"(.*?)</div>", page, re.S)
        assert m, (q, k)
        spans = re.findall(r'<span class="tk (t[pn])[^"]*" style="background:rgba\(([\d,]+),', m.group(1))
        assert len(spans) == min(len(g), R.MAX_TOKENS)
        signs = ["tp" if v >= 0 else "tn" for v in g["score"].to_numpy()[:len(spans)]]
        assert [s for s, _ in spans] == signs  # green (helps) / red (hurts) follows each token's sign
        assert all(rgb == ("0,158,115" if s == "tp" else "213,94,0") for s, rgb in spans)
        n_strips += 1
    assert n_strips == tok.groupby(["query", "rank"]).ngroups
    assert "Jon buys 8 notebooks" in page  # the demo prompts are on the page


def test_token_strip_window_is_centred_on_the_largest_token():
    n = 1000
    s = np.zeros(n)
    s[700] = -5.0
    s[10] = 1.0
    rows = pd.DataFrame({"position": np.arange(n), "token": ["a"] * n, "is_target": [True] * n, "score": s})
    strip = R.token_strip(rows, max_tokens=100)
    assert len(strip["tokens"]) == 100 and strip["before"] == 650 and strip["after"] == 250
    assert strip["tokens"][50]["cls"].startswith("tn") and strip["tokens"][50]["style"].endswith("0.90)")
    assert strip["total"] == fmt_num(-4.0)
