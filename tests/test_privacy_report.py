"""The privacy page (gradsight.analyses.privacy.report) from a hand-made run directory: it renders, is
self-contained and escaped (recovered / true tokens, labels and notes carry a script tag), shows epsilon beside
each defence's headline recovery (checked against means computed here from the recovery rows), draws the curves
against batch size and noise from curves.parquet (dp and dp-layer lines, noise:SIGMA left out), inlines the example
reconstructions as PNGs that decode back to the stored samples, shows what each defence costs (utility.parquet:
accuracy, the drop in points against "none" computed here, epsilon, the in-sample note, the figure, findings and
terminal summary), and copes with runs holding only language-model rows, only module rows, or no summary tables.

No analysis is run: manifest.json, recovery / curves / defences .parquet and a samples shard are written here.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import zlib

import numpy as np
import pandas as pd
import pytest

from gradsight.analyses.privacy import figures as F
from gradsight.analyses.privacy import report as R
from gradsight.analyses.privacy.compute import COLUMNS
from gradsight.report.kit import fmt_num, fmt_pct

from helpers import external_refs

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
DEFENCES = ("none", "clip", "dp:0.5", "dp:2")
EPS = {"none": math.inf, "clip": math.inf, "dp:0.5": 12.3456, "dp:2": 0.8765}
SIZES = (1, 4)
D = 64  # 8x8 images


def _sigma(d: str) -> float:
    """The noise_multiplier column of a defence's rows: sigma of dp, dp-layer and noise, NaN otherwise."""
    kind, _, v = d.partition(":")
    return float(v) if kind in ("dp", "dp-layer", "noise") else math.nan


def _rows(kind: str, rng, defences=DEFENCES) -> list[dict]:
    """Recovery rows of 2 batches per batch size: module probes (analytic, labels) and / or LM ones (tokens)."""
    rows, unit = [], 0
    for B in SIZES:
        for j in range(2):
            base = {"unit": unit, "batch_size": B, "batch": j}
            for d in defences:
                sig = _sigma(d)
                r = {**base, "defence": d, "noise_multiplier": sig, "clip_norm": 1.5 if d != "none" else math.nan,
                     "projection": 0}
                if kind in ("module", "both"):
                    rows.append({**r, "probe": "analytic", "psnr": float(rng.uniform(5, 200)),
                                 "cosine": float(rng.uniform(0, 1)), "exact": float(rng.integers(0, 2)),
                                 "n_true": B, "n_found": B})
                    truth = " ".join(str(int(x)) for x in sorted(rng.integers(0, 10, B)))
                    rows.append({**r, "probe": "labels", "label_acc": float(rng.uniform(0, 1)), "n_true": B,
                                 "n_found": B, "sample": truth if d == "none" else "9 " * B,
                                 "truth": truth if unit else EVIL})
                if kind in ("lm", "both"):
                    rows.append({**r, "probe": "tokens", "precision": float(rng.uniform(0, 1)),
                                 "recall": float(rng.uniform(0, 1)), "f1": float(rng.uniform(0, 1)),
                                 "exact": 0.0, "n_true": 3, "n_found": 3,
                                 "sample": f"a b c {EVIL}" if d == "none" else "a b c", "truth": "b c d"})
                if kind == "lm":  # the TAG-like attack: decoded sequences, ROUGE
                    rows.append({**r, "probe": "tag", "rouge1": float(rng.uniform(0, 1)),
                                 "rouge2": float(rng.uniform(0, 1)), "exact": 0.0, "n_true": B, "n_found": B,
                                 "sample": "the cat sat", "truth": "a cat sat down"})
            st = {**base, "defence": "stored", "noise_multiplier": math.nan, "clip_norm": math.nan}
            rows.append({**st, "probe": "factors", "projection": 0, "cosine": 1.0, "exact": 1.0, "recall": 1.0,
                         "sample": "A_e is the input", "truth": ""})
            for r_in, c in ((4, 0.3), (64, 1.0)):
                rows.append({**st, "probe": "projected", "projection": r_in, "cosine": c + 0.01 * unit,
                             "exact": float(c == 1.0), "recall": c})
            unit += 1
    return rows


def _curves(rec: pd.DataFrame) -> pd.DataFrame:
    """Reference curves: mean and sd per (probe, defence, batch size, projection), written by hand here."""
    out = []
    for k, g in rec.groupby(["probe", "defence", "batch_size", "projection"], sort=False):
        row = dict(zip(["probe", "defence", "batch_size", "projection"], k),
                   noise_multiplier=g["noise_multiplier"].iloc[0], n=len(g))
        for m in ("psnr", "cosine", "exact", "label_acc", "precision", "recall", "f1", "rouge1", "rouge2"):
            row[f"{m}_mean"], row[f"{m}_sd"] = g[m].mean(), g[m].std()
        out.append(row)
    return pd.DataFrame(out)


def make_run(path, kind: str = "both", defences=DEFENCES, eps=EPS, utility=None):
    """A privacy run directory by hand: manifest, recovery / curves / defences tables, one samples shard (and
    utility.parquet when `utility` is given)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    rec = pd.DataFrame(_rows(kind, rng, defences)).reindex(columns=list(COLUMNS))  # the recovery table's schema
    rec[["sample", "truth"]] = rec[["sample", "truth"]].fillna("")
    rec.to_parquet(path / "recovery.parquet")
    _curves(rec).to_parquet(path / "curves.parquet")
    pd.DataFrame([{"defence": d, "kind": d.split(":")[0], "value": float(d.partition(":")[2] or "nan"),
                   "clip_norm": 1.5 if d != "none" else math.nan, "sample_rate": 0.1, "steps": 10, "delta": 1e-3,
                   "accountant": "rdp", "epsilon": eps[d], "formal": d.split(":")[0] in ("dp", "dp-layer")}
                  for d in defences]).to_parquet(path / "defences.parquet")
    if utility is not None:
        utility.to_parquet(path / "utility.parquet")
    man = {"schema_version": 2, "analysis": "privacy", "finished": True, "seed": 0, "world_size": 1,
           "model": {"id": f"fake {EVIL}", "layers": [{"name": "0"}]}, "data": {"path": "<in-memory>"},
           "config": {"batch_sizes": list(SIZES), "defences": list(defences), "delta": 1e-3, "accountant": "rdp",
                      "epochs": 1.0, "clip_norm": 0.0, "utility_epochs": 5.0, "utility_lr": 0.5},
           "privacy": {"n_examples": 40, "notes": [f"a note {EVIL}"]}}
    (path / "manifest.json").write_text(json.dumps(man))
    if kind != "lm":
        tensors = {}
        for u, B in enumerate(b for b in SIZES for _ in range(2)):
            for d in defences:
                tensors[f"{u}/{d}/analytic/true"] = rng.uniform(0, 1, (B, D))
                tensors[f"{u}/{d}/analytic/hat"] = rng.uniform(-0.5, 1.5, (B, D))
        (path / "samples").mkdir()
        save_file(tensors, str(path / "samples" / "r0-00000.safetensors"))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("priv") / "both")


@pytest.fixture(scope="module")
def page(run):
    return R.render(run).read_text()


def _figure(page: str, fid: str) -> dict:
    m = re.search(r'var f = ([^\n]*?); f\.layout\.template = GS_TEMPLATE; Plotly\.newPlot\("' + fid + '"', page)
    assert m, fid
    return json.loads(m.group(1))


def _decode_png(uri: str) -> np.ndarray:
    """An independent reader of the 8-bit greyscale, filter-0 PNGs the page inlines."""
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    i, chunks = 8, {}
    while i < len(raw):
        n = struct.unpack(">I", raw[i:i + 4])[0]
        tag, data = raw[i + 4:i + 8], raw[i + 8:i + 8 + n]
        assert struct.unpack(">I", raw[i + 8 + n:i + 12 + n])[0] == zlib.crc32(tag + data)
        chunks[tag] = chunks.get(tag, b"") + data
        i += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    px = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, w + 1)
    assert (px[:, 0] == 0).all()
    return px[:, 1:]


def test_page_renders_self_contained_and_escaped(run, page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not external_refs(page)
    assert EVIL not in page and page.count(ESCAPED) >= 3  # model id, note, tokens and labels: shown, escaped
    assert "a note " + ESCAPED in page
    assert 'id="utility"' not in page and "fig-utility" not in page  # no utility.parquet: no cost section
    for words in ("higher = better reconstructed", "&gt; 80 dB", "lower = more private", "no formal guarantee"):
        assert words in page


def test_defences_table_shows_epsilon_beside_the_headline_recovery(run, page):
    rec = pd.read_parquet(run / "recovery.parquet")
    table = re.search(r'<table id="defences-table">(.*?)</table>', page, re.S).group(1)
    for d in DEFENCES:
        row = re.search(rf'<tr data-defence="{re.escape(d)}">(.*?)</tr>', table, re.S).group(1)
        eps = fmt_num(EPS[d])
        assert re.search(rf'class="num eps [^"]*">{re.escape(eps)}', row), (d, eps)
        at1 = rec[(rec["defence"] == d) & (rec["batch_size"] == 1)]
        psnr = at1[at1["probe"] == "analytic"]["psnr"].mean()  # the independent reference: mean over batches
        f1 = at1[at1["probe"] == "tokens"]["f1"].mean()
        acc = at1[at1["probe"] == "labels"]["label_acc"].mean()
        cells = re.findall(r'<td class="num rec">([^<]*)', row)
        assert cells == [f"{psnr:.3g} dB", fmt_pct(acc), fmt_pct(f1)], d
    assert "(no formal guarantee)" in re.search(r'<tr data-defence="clip">(.*?)</tr>', table, re.S).group(1)


def test_curves_against_batch_size_and_noise(run, page):
    rec = pd.read_parquet(run / "recovery.parquet")
    fig = _figure(page, "fig-batch")
    titles = [a["text"] for a in fig["layout"]["annotations"] if a.get("yref") == "paper"]
    assert titles == ["analytic", "labels", "tokens"]
    ax = {t: ("x" if i == 0 else f"x{i + 1}") for i, t in enumerate(titles)}
    for probe, metric in (("analytic", "psnr"), ("tokens", "f1"), ("labels", "label_acc")):
        for d in DEFENCES:
            tr = [t for t in fig["data"] if t["xaxis"] == ax[probe] and t["name"] == d]
            assert len(tr) == 1, (probe, d)
            want = [rec[(rec["probe"] == probe) & (rec["defence"] == d) & (rec["batch_size"] == b)][metric].mean()
                    for b in SIZES]
            assert tr[0]["x"] == list(SIZES) and tr[0]["y"] == pytest.approx(want, rel=1e-5)
    noise = _figure(page, "fig-noise")
    for b in SIZES:
        tr = [t for t in noise["data"] if t["xaxis"] == "x" and t["name"] == f"dp, batch size {b}"][0]
        assert tr["x"] == [0.5, 2.0]
        want = [rec[(rec["probe"] == "analytic") & (rec["defence"] == d) & (rec["batch_size"] == b)]["psnr"].mean()
                for d in ("dp:0.5", "dp:2")]
        assert tr["y"] == pytest.approx(want, rel=1e-5)
    stored = _figure(page, "fig-stored")
    cos = [t for t in stored["data"] if t["name"] == "cosine"][0]
    s = rec[(rec["defence"] == "stored") & (rec["probe"] == "projected")]
    assert cos["x"] == [4, 64] and cos["y"] == pytest.approx(s.groupby("projection")["cosine"].mean().tolist())


def test_example_reconstructions_decode_to_the_stored_samples(run, page):
    from safetensors.numpy import load_file

    saved = load_file(str(run / "samples" / "r0-00000.safetensors"))
    for B, unit in ((1, 0), (4, 2)):  # the first batch of each size
        table = re.search(rf'<table class="imgs" id="images-analytic-{B}"[^>]*>(.*?)</table>', page, re.S).group(1)
        true = saved[f"{unit}/none/analytic/true"]
        lo, hi = true.min(), true.max()
        uris = re.findall(r'<td class="mono">truth</td>.*?</tr>', table, re.S)[0]
        truth = re.findall(r'src="(data:image/png;base64,[^"]+)"', uris)
        assert len(truth) == B
        for i, u in enumerate(truth):
            want = np.round(np.clip((true[i] - lo) / (hi - lo), 0, 1) * 255).reshape(8, 8)
            assert np.array_equal(_decode_png(u), want)
        row = re.search(r'<tr data-defence="dp:2">(.*?)</tr>', table, re.S).group(1)
        hat = saved[f"{unit}/dp:2/analytic/hat"]
        got = _decode_png(re.findall(r'src="([^"]+)"', row)[-1])
        want = np.round(np.clip((hat[B - 1] - lo) / (hi - lo), 0, 1) * 255).reshape(8, 8)  # clamped outside
        assert np.array_equal(got, want)


def test_token_sets_show_missed_and_spurious(tmp_path):
    run = make_run(tmp_path / "lm", kind="lm")
    page = R.render(run).read_text()
    assert not external_refs(page) and EVIL not in page and ESCAPED in page
    assert 'class="imgs"' not in page and "fig-noise" in page
    table = re.search(r'<table id="text-table">(.*?)</table>', page, re.S).group(1)
    row = re.search(r'<tr data-defence="clip" data-probe="tokens">(.*?)</tr>', table, re.S).group(1)
    cells = re.findall(r'<td class="tok[^"]*">([^<]*)</td>', row)
    assert cells == ["a b c", "b c d", "d", "a"]  # recovered, truth, missed, spurious
    row = re.search(r'<tr data-defence="clip" data-probe="tag">(.*?)</tr>', table, re.S).group(1)
    assert re.findall(r'<td class="tok[^"]*">([^<]*)</td>', row) == ["the cat sat", "a cat sat down", "", ""]
    heads = re.findall(r'<th class="num">([^<]*)</th>', re.search(r'id="defences-table">(.*?)</thead>', page,
                                                                    re.S).group(1))
    assert heads[-2:] == ["tokens: token F1", "tag: ROUGE-1 F1"] and not any("PSNR" in h for h in heads)
    rec = pd.read_parquet(run / "recovery.parquet")
    r1 = rec[(rec["probe"] == "tag") & (rec["defence"] == "dp:2") & (rec["batch_size"] == 1)]["rouge1"].mean()
    line = [x for x in R.run_findings(run)[0]["lines"] if x.startswith("dp:2")][0]
    assert f"tag: ROUGE-1 F1 {fmt_pct(r1)}" in line


def test_module_only_run_and_missing_summary_tables(tmp_path):
    run = make_run(tmp_path / "mod", kind="module")
    page = R.render(run).read_text()
    assert 'class="imgs"' in page and "tokens: token F1" not in page and EVIL not in page
    (run / "curves.parquet").unlink()
    (run / "defences.parquet").unlink()
    page = R.render(run).read_text()  # curves rebuilt from the recovery rows; epsilon unknown, noted
    assert "defences table not found (defences.parquet)" in page and 'Plotly.newPlot("fig-batch"' in page
    assert page.rstrip().endswith("</html>")


def test_findings_and_terminal_summary_give_epsilon_and_recovery(run):
    from rich.console import Console

    rec = pd.read_parquet(run / "recovery.parquet")
    found = R.run_findings(run)
    head = found[0]["lines"]
    assert "batch size 1" in found[0]["title"] and len(head) == len(DEFENCES)
    psnr = rec[(rec["defence"] == "dp:2") & (rec["batch_size"] == 1) & (rec["probe"] == "analytic")]["psnr"].mean()
    line = [x for x in head if x.startswith("dp:2 ")][0]
    assert f"ε = {fmt_num(EPS['dp:2'])} at δ = 0.001" in line and f"analytic PSNR {psnr:.3g} dB" in line
    assert "no formal guarantee" in [x for x in head if x.startswith("none ")][0]
    assert any(f["title"].startswith("What gradsight's own stored") for f in found)
    console = Console(record=True, width=220)
    R.print_summary(run, console)
    text = console.export_text()
    for d in DEFENCES:
        assert d in text
    assert fmt_num(EPS["dp:0.5"]) in text and "∞" in text and str(run / "report.html") in text
    assert "a note <script>" in text  # user text printed verbatim (rich Text, not markup)


def test_psnr_words_and_to_image():
    assert [F.psnr_word(v) for v in (200, 50, 20, 5)] == ["exact", "recognisable", "partial",
                                                          "no better than a random image"]
    img = F.to_image(np.arange(16.0), 0.0, 15.0)
    assert img.shape == (4, 4) and img[0, 0] == 0 and img[3, 3] == 1
    assert F.to_image(np.arange(6.0), 0, 5).shape == (1, 6)  # not a square: a strip
    assert np.array_equal(_decode_png(F.png_data_uri(np.eye(3))), np.eye(3, dtype=np.uint8) * 255)


# ---------------------------------------------------------------------------------------------------------
# what each defence costs (utility.parquet) and the newer defence kinds

DEFENCES2 = ("none", "clip", "dp:0.5", "dp:2", "dp-layer:2", "noise:0.1", "random:0.5")
EPS2 = {**EPS, "dp-layer:2": 0.8765, "noise:0.1": math.inf, "random:0.5": math.inf}
ACC = {"none": 0.969, "clip": 0.948, "dp:0.5": 0.931, "dp:2": 0.902, "dp-layer:2": 0.887, "noise:0.1": 0.95,
       "random:0.5": 0.973}


def _utility(in_sample: bool, accuracy: bool = True) -> pd.DataFrame:
    return pd.DataFrame([{"defence": d, "accuracy": ACC[d] if accuracy else math.nan, "loss": 1.0 - ACC[d],
                          "epsilon": EPS2[d], "steps": 50, "sample_rate": 0.1,
                          "clip_norm": 1.0 if d.split(":")[0] in ("clip", "dp", "dp-layer") else math.inf,
                          "epochs": 5.0, "in_sample": in_sample} for d in DEFENCES2])


@pytest.fixture(scope="module")
def urun(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("priv") / "util", kind="module", defences=DEFENCES2, eps=EPS2,
                    utility=_utility(in_sample=True))


@pytest.fixture(scope="module")
def upage(urun):
    return R.render(urun).read_text()


def _points(a: float, b: float) -> str:
    """Hand reference of the drop: 100 (a - b) percentage points, one decimal, signed."""
    p = round(100 * (a - b), 1)
    return ("+" if p > 0 else "") + f"{p:.1f} points" if p else "0.0 points"


def test_utility_table_gives_accuracy_drop_and_epsilon(upage):
    assert not external_refs(upage) and EVIL not in upage
    table = re.search(r'<table id="utility-table">(.*?)</table>', upage, re.S).group(1)
    for d in DEFENCES2:
        row = re.search(rf'<tr data-defence="{re.escape(d)}">(.*?)</tr>', table, re.S).group(1)
        assert re.search(r'class="num acc">([^<]*)<', row).group(1) == f"{100 * ACC[d]:.1f}%"
        drop = re.search(r'class="num drop">([^<]*)<', row).group(1)
        assert drop == ("baseline" if d == "none" else _points(ACC[d], ACC["none"])), d
        eps = re.search(r'class="num eps ([^"]*)">([^<]*)', row)
        formal = d.split(":")[0] in ("dp", "dp-layer")
        assert eps.groups() == (("eps-formal", fmt_num(EPS2[d])) if formal else ("eps-none", "∞ ")), d
    assert _points(0.887, 0.969) == "-8.2 points" and _points(0.973, 0.969) == "+0.4 points"
    assert 'id="in-sample"' in upage and "training rows" in upage
    dtab = re.search(r'<table id="defences-table">(.*?)</table>', upage, re.S).group(1)
    row = re.search(r'<tr data-defence="dp:2">(.*?)</tr>', dtab, re.S).group(1)
    assert re.search(r'class="num util">([^<]*)<', row).group(1) == f"90.2% ({_points(0.902, 0.969)})"


def test_utility_figure_separates_formal_and_unguaranteed(upage):
    fig = _figure(upage, "fig-utility")
    titles = [a["text"] for a in fig["layout"]["annotations"] if a.get("yref") == "paper"]
    assert titles == ["formal guarantee: against ε", "no guarantee (ε = ∞)"]
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["xaxis2"]["type"] == "category"
    dp = [t for t in fig["data"] if t["name"] == "dp"][0]
    assert dp["x"] == [EPS["dp:2"], EPS["dp:0.5"]] and dp["y"] == [ACC["dp:2"], ACC["dp:0.5"]]  # sorted by ε
    lay = [t for t in fig["data"] if t["name"] == "dp-layer"][0]
    assert lay["text"] == ["dp-layer:2"] and lay["y"] == [ACC["dp-layer:2"]]
    rest = [t for t in fig["data"] if t["name"] == "no guarantee"][0]
    assert rest["x"] == ["none", "clip", "noise:0.1", "random:0.5"] and rest["y"] == [ACC[d] for d in rest["x"]]
    base = [s for s in fig["layout"]["shapes"] if s["y0"] == s["y1"]]
    assert len(base) == 2 and all(s["y0"] == ACC["none"] for s in base)  # the undefended line on both panels


def test_new_defence_kinds_glossary_and_noise_curve(urun, upage):
    gloss = re.search(r'<dl id="defence-glossary">(.*?)</dl>', upage, re.S).group(1)
    from gradsight.privacy.defences import KINDS

    for k in KINDS:
        assert f'data-kind="{k}"' in gloss
    used = re.findall(r'<strong>([^<]*)</strong>', gloss)
    assert used == ["none", "clip", "dp:σ", "dp-layer:σ", "random:P", "noise:σ"]
    assert "unbounded sensitivity" in gloss and "LAMP" in gloss
    dtab = re.search(r'<table id="defences-table">(.*?)</table>', upage, re.S).group(1)
    lay = re.search(r'<tr data-defence="dp-layer:2">(.*?)</tr>', dtab, re.S).group(1)
    assert re.search(r'class="num eps eps-formal">0.8765', lay)  # dp-layer: formal
    cells = re.findall(r'<td class="num">([^<]*)</td>', lay)
    assert cells[:2] == ["2", "–"]  # sigma column, not the value column
    noise = re.search(r'<tr data-defence="noise:0.1">(.*?)</tr>', dtab, re.S).group(1)
    assert re.findall(r'<td class="num">([^<]*)</td>', noise)[:2] == ["–", "0.1"]
    rec = pd.read_parquet(urun / "recovery.parquet")
    fig = _figure(upage, "fig-noise")
    names = {t["name"] for t in fig["data"]}
    assert names == {f"{k}, batch size {b}" for k in ("dp", "dp-layer") for b in SIZES}  # noise:0.1 left out
    tr = [t for t in fig["data"] if t["xaxis"] == "x" and t["name"] == "dp-layer, batch size 4"][0]
    want = rec[(rec["probe"] == "analytic") & (rec["defence"] == "dp-layer:2") & (rec["batch_size"] == 4)]["psnr"]
    assert tr["x"] == [2.0] and tr["y"] == pytest.approx([want.mean()], rel=1e-5)
    assert tr["marker"]["symbol"] != [t for t in fig["data"] if t["name"] == "dp, batch size 4"][0]["marker"]["symbol"]


def test_cost_findings_and_terminal_accuracy(urun):
    from rich.console import Console

    rec = pd.read_parquet(urun / "recovery.parquet")
    found = R.run_findings(urun)
    cost = [f for f in found if f["title"].startswith("What each defence costs")][0]
    assert "training rows" in cost["title"] and len(cost["lines"]) == len(DEFENCES2)
    psnr = rec[(rec["defence"] == "dp:2") & (rec["batch_size"] == 1) & (rec["probe"] == "analytic")]["psnr"].mean()
    line = [x for x in cost["lines"] if x.startswith("dp:2:")][0]
    assert line.startswith(f"dp:2: accuracy 90.2% ({_points(0.902, 0.969)}) at ε = {fmt_num(EPS['dp:2'])}; "
                           f"analytic PSNR {psnr:.3g} dB")
    assert "no formal guarantee" in [x for x in cost["lines"] if x.startswith("noise:0.1:")][0]
    console = Console(record=True, width=250)
    R.print_summary(urun, console)
    text = console.export_text()
    assert "accuracy (Δ points)" in text and "88.7% (-8.2)" in text and "97.3% (+0.4)" in text


def test_loss_only_utility_and_held_out_rows(tmp_path):
    run = make_run(tmp_path / "loss", kind="module", defences=DEFENCES2, eps=EPS2,
                   utility=_utility(in_sample=False, accuracy=False))
    page = R.render(run).read_text()
    assert 'id="in-sample"' not in page and 'id="utility-table"' in page
    fig = _figure(page, "fig-utility")
    rest = [t for t in fig["data"] if t["name"] == "no guarantee"][0]
    assert rest["y"] == pytest.approx([1.0 - ACC[d] for d in rest["x"]])  # the loss instead
    line = [x for x in R.run_findings(run)[1]["lines"] if x.startswith("dp:2:")][0]
    assert f"loss {fmt_num(1 - ACC['dp:2'])} ({1 - ACC['dp:2'] - (1 - ACC['none']):+.3g} vs none)" in line
