"""The curvature / landscape analyses: tables against dense operators, resume, config guard, errors, CLI,
torchrun, report. Tiny models, float64, short sequences (every product re-runs the data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.cli import main as cli_main
from gradsight.analyses.curvature import CurvatureConfig, curvature_of, load_eigenvectors, run_curvature
from gradsight.analyses.landscape import LandscapeConfig, run_landscape
from gradsight.curvature import HessianOperator, causal_lm_forward
from gradsight.inputs.data import EncodeOptions, collate, encode, load_records
from gradsight.inputs.models import ModelError
from gradsight.runs.store import RunMismatchError

from helpers import tiny_tokenizer

DT = torch.float64
ENC = EncodeOptions(max_length=40, truncation="left")
FAST = dict(n_products=30, n_probes=1, n_steps=20, top_k=3)
EVIL = "<script>alert(1)</script>"
COLUMNS = {
    "eigenvalues": ["scope", "scope_type", "kind", "block", "n_params", "which", "rank", "eigenvalue", "residual",
                    "converged", "n_products"],
    "trace": ["scope", "scope_type", "kind", "block", "n_params", "estimate", "stderr", "n_products", "method", "exact"],
    "density": ["scope", "grid", "density"],
    "slq_nodes": ["scope", "probe", "node", "weight"],
    "stability": ["scope", "scope_type", "kind", "block", "lr", "lambda_max", "trace", "lr_lmax", "lr_trace",
                  "threshold", "stable", "stable_by_trace"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _rms_norm_float64(self, h):
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


def small_llama(seed=0):
    """A smaller Llama than helpers.tiny_model (v_proj 16 -> 8: 128 parameters), with float64 RMSNorm."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(DT).eval()
    for m in model.modules():  # LlamaRMSNorm computes in float32; keep it float64 for 1e-6 comparisons
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(_rms_norm_float64, m)
    return model


def records():
    from gradsight.demo.problems import demo_records

    recs = demo_records(n_problems=2)
    for r in recs:
        if r["group"] == "wrong":
            r["group"] = EVIL
    return recs


def _cfg(**kw):
    base = dict(dtype="float64", attn_implementation="eager", encode=ENC, kinds=("v",), **FAST)
    base.update(kw)
    return CurvatureConfig(**base)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    model = small_llama()
    out = tmp_path_factory.mktemp("curv") / "run"
    cfg = _cfg(per=("model", "block", "layer"), bottom_k=1, lr=0.1)
    res = run_curvature(cfg, out, model=model, tokenizer=tiny_tokenizer(), records=records(), progress=False,
                        report=True)
    # reference: one batch of every example, the operator's dense matrix on the model scope's block
    recs, _ = load_records(records())
    enc = [e for e in (encode(r, tiny_tokenizer(), ENC) for r in recs) if e.ok]
    batch = collate(enc, tiny_tokenizer().pad_token_id)
    names = [f"model.layers.{i}.self_attn.v_proj.weight" for i in (0, 1)]
    D = HessianOperator(model, "cross_entropy", [batch], params=names, forward_fn=causal_lm_forward).dense()
    return out, res, model, D


def test_eigenvalues_match_dense_operator(lm_run):
    out, res, model, D = lm_run
    ev = res.tables["eigenvalues"]
    assert list(ev.columns) == COLUMNS["eigenvalues"]
    blocks = {"model": slice(0, 256), "model.layers.0.self_attn.v_proj": slice(0, 128),
              "model.layers.1.self_attn.v_proj": slice(128, 256), "block:00": slice(0, 128),
              "block:01": slice(128, 256)}
    for scope, sl in blocks.items():
        ref = np.linalg.eigvalsh(D[sl, sl].numpy())  # principal submatrix = the operator of that block
        rows = ev[ev["scope"] == scope]
        top = rows[rows["which"] == "top"].sort_values("rank")["eigenvalue"].to_numpy()
        bot = rows[rows["which"] == "bottom"]["eigenvalue"].to_numpy()
        np.testing.assert_allclose(top, ref[::-1][:3], rtol=1e-6, err_msg=scope)
        np.testing.assert_allclose(bot, ref[:1], rtol=1e-6, err_msg=scope)
        assert rows["converged"].all() and (rows["n_params"] == sl.stop - sl.start).all()
    # eigenvectors of the model scope, stored for Hessian-axis landscapes
    names, vecs, lam = load_eigenvectors(out)
    assert len(vecs) == 2 and names[0].endswith("layers.0.self_attn.v_proj.weight")
    for v, l in zip(vecs, lam):
        flat = torch.cat([t.reshape(-1) for t in v])
        torch.testing.assert_close(D @ flat, l * flat, rtol=1e-5, atol=1e-7)


def test_trace_density_criteria_stability(lm_run):
    out, res, model, D = lm_run
    tr = res.tables["trace"]
    assert list(tr.columns) == COLUMNS["trace"]
    for r in tr.to_dict("records"):
        sl = slice(0, 256) if r["scope"] == "model" else slice(0, 128) if r["scope"].endswith(("0", "0.self_attn.v_proj")) \
            else slice(128, 256)
        exact = float(torch.trace(D[sl, sl]))
        assert r["n_products"] == 30 and r["stderr"] > 0
        assert abs(r["estimate"] - exact) <= 3 * r["stderr"] + 1e-9, (r["scope"], r["estimate"], exact)
    for name in ("density", "slq_nodes", "stability"):
        df = pd.read_parquet(out / f"{name}.parquet")
        assert list(df.columns) == COLUMNS[name], name
    de = pd.read_parquet(out / "density.parquet")
    assert set(de["scope"]) == {"model"} and (de["density"] >= 0).all()
    cr = pd.read_parquet(out / "spectral_criteria.parquet")
    assert list(cr["scope"])[:3] == ["model", "block:00", "block:01"]
    m = cr[cr["scope"] == "model"].iloc[0]
    assert m["has_density"] and 0 <= m["neg_mass"] <= 1 and np.isfinite(m["bulk_edge"]) and m["n_outliers"] >= 0
    ev = res.tables["eigenvalues"]
    lmax = ev[(ev["scope"] == "model") & (ev["which"] == "top") & (ev["rank"] == 1)]["eigenvalue"].iloc[0]
    lmin = ev[(ev["scope"] == "model") & (ev["which"] == "bottom")]["eigenvalue"].iloc[0]
    assert m["abs_min_max_ratio"] == pytest.approx(abs(lmin / lmax))
    st = pd.read_parquet(out / "stability.parquet")
    s = st[st["scope"] == "model"].iloc[0]
    assert s["lr_lmax"] == pytest.approx(0.1 * lmax) and s["stable"] == (0.1 * lmax < 2)
    # a block holding one selected layer is the same operator as that layer
    a = ev[ev["scope"] == "block:01"].drop(columns=["scope", "scope_type", "kind"]).reset_index(drop=True)
    b = ev[ev["scope"] == "model.layers.1.self_attn.v_proj"].drop(columns=["scope", "scope_type", "kind"])
    pd.testing.assert_frame_equal(a, b.reset_index(drop=True))
    man = json.loads((out / "manifest.json").read_text())
    assert man["analysis"] == "curvature" and man["finished"]
    c = man["curvature"]
    assert c["operator"] == "hessian" and c["sdpa_math"] is False and c["switched_to_eval"] is False
    assert c["n_examples"] == 6 and c["groups"][EVIL] == 2


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.text = 0, []

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.text.append(data)


def test_report_parses_and_escapes(lm_run):
    out, *_ = lm_run
    page = (out / "report.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    p = _Parser()
    p.feed(page)
    n_figs = page.count('class="gs-fig"')
    assert n_figs >= 4 and p.scripts == 3 + n_figs  # plotly, globals, one per figure, widgets: nothing injected
    for needle in ("Top eigenvalue by block", "Spectral density", "Trace", "Stability", "bulk edge"):
        assert needle in page
    from rich.console import Console

    from gradsight.report import print_summary

    con = Console(record=True, width=200)
    print_summary(out, con)
    text = con.export_text()
    assert "λmax" in text and "block:00" in text


# ---------------------------------------------------------------------------------------------------------
# plain modules: exact trace, resume, config guard, errors


def _mlp_problem(bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(6))
    model = nn.Sequential(*layers).to(DT)
    X, Y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    return model.eval(), [(X[:5], Y[:5]), (X[5:], Y[5:])]


def test_curvature_of_exact_trace_resume_and_guard(tmp_path):
    model, batches = _mlp_problem()
    out, logs = tmp_path / "mlp", []
    kw = dict(blocks={"first": r"^0\.", EVIL: ["2.weight", "2.bias"]}, top_k=2, bottom_k=1, n_products=160,
              n_probes=1, n_steps=10, log=logs.append)
    r = curvature_of(model, "cross_entropy", batches, out, report=True, **kw)
    D = HessianOperator(model, "cross_entropy", batches).dense()
    ref = np.linalg.eigvalsh(D.numpy())
    ev, tr = r.tables["eigenvalues"], r.tables["trace"]
    m = ev[ev["scope"] == "model"]
    np.testing.assert_allclose(m[m["which"] == "top"]["eigenvalue"], ref[::-1][:2], rtol=1e-6)
    np.testing.assert_allclose(m[m["which"] == "bottom"]["eigenvalue"], ref[:1], rtol=1e-6, atol=1e-10)
    t = tr.set_index("scope")
    assert t.loc["model", "exact"] and t.loc["model", "n_products"] == 2 * 51
    assert t.loc["model", "estimate"] == pytest.approx(float(torch.trace(D)), rel=1e-9)
    assert t.loc[f"block:{EVIL}", "estimate"] == pytest.approx(float(torch.trace(D[30:, 30:])), rel=1e-9)
    page = (out / "report.html").read_text()
    assert EVIL not in page and "&lt;script&gt;" in page
    # rerun: every scope skipped, tables unchanged
    shards = sorted((out / "scopes").glob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in shards]
    r2 = curvature_of(model, "cross_entropy", batches, out, **kw)
    assert "3 of 3 scopes already done" in logs[-1]
    assert [f.stat().st_mtime_ns for f in shards] == mtimes
    pd.testing.assert_frame_equal(r2.tables["eigenvalues"], ev)
    # a killed run: the scope without its eigenvalues shard (the done marker) is recomputed, alone
    (out / "scopes" / "0002.eigenvalues.parquet").unlink()
    r3 = curvature_of(model, "cross_entropy", batches, out, **kw)
    assert "2 of 3 scopes already done" in logs[-1]
    pd.testing.assert_frame_equal(r3.tables["eigenvalues"], ev)
    # another configuration into the same directory is refused
    with pytest.raises(RunMismatchError, match="top_k"):
        curvature_of(model, "cross_entropy", batches, out, **{**kw, "top_k": 3})


def test_curvature_of_errors_and_train_mode(tmp_path):
    model, batches = _mlp_problem(bn=True)
    with pytest.raises(ValueError, match="nothing|matches no trainable parameter") as e:
        curvature_of(model, "cross_entropy", batches, tmp_path / "a", blocks={"attn": r"q_proj"})
    assert "attn" in str(e.value)
    with pytest.raises(ValueError, match="lr must be"):
        curvature_of(model, "cross_entropy", batches, tmp_path / "b", lr=0.0)
    for lr in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="lr must be"):
            CurvatureConfig(lr=lr)
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        curvature_of(model, "cross_entropy", batches, tmp_path / "c", per=("model",), top_k=1, n_products=9,
                     n_probes=1, n_steps=5)
    assert model.training  # restored
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["curvature"]["switched_to_eval"] is True and man["curvature"]["batchnorm"] == ["BatchNorm1d"]


def test_lm_block_selection_errors(tmp_path, model_dir, data_file, capsys):
    with pytest.raises(ModelError, match="block 7 out of range"):
        run_curvature(_cfg(blocks="7"), tmp_path / "x", model=small_llama(), tokenizer=tiny_tokenizer(),
                      records=records(), progress=False, report=False)
    base = ["curvature", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "y"), "--quiet"]
    for extra, msg in ((["--blocks", "9"], "block 9 out of range"), (["--lr", "0"], "lr must be"),
                       (["--kinds", "nope"], "unknown layer kind")):
        with pytest.raises(SystemExit) as e:
            cli_main(base + extra)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# command line, torchrun, landscape


def _env():
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    return env


CLI = ["--n-examples", "4", "--max-length", "40", "--truncation", "left", "--dtype", "float64", "--attn", "eager",
       "--kinds", "v", "--blocks", "0", "--per", "model", "--top-k", "2", "--n-products", "15", "--n-probes", "1",
       "--n-steps", "10", "--lr", "0.01", "--quiet"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, model_dir, data_file):
    d = tmp_path_factory.mktemp("cli")
    one, two = d / "one", d / "two"
    common = ["curvature", "--model", str(model_dir), "--data", str(data_file), *CLI]
    p = subprocess.run([sys.executable, "-m", "gradsight", *common, "--out", str(one)], capture_output=True,
                       text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "gradsight", *common,
                        "--no-report", "--out", str(two)], capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return one, two


def test_cli_and_torchrun_equal_one_process(cli_runs):
    one, two = cli_runs
    assert (one / "report.html").exists() and not (two / "report.html").exists()
    m1, m2 = (json.loads((r / "manifest.json").read_text()) for r in (one, two))
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m2["finished"]
    assert m1["curvature"]["sdpa_math"] is False and m2["curvature"]["n_examples"] == 4
    e1, e2 = (pd.read_parquet(r / "eigenvalues.parquet") for r in (one, two))
    pd.testing.assert_frame_equal(e1.drop(columns=["eigenvalue", "residual", "n_products", "converged"]),
                                  e2.drop(columns=["eigenvalue", "residual", "n_products", "converged"]))
    np.testing.assert_allclose(e2["eigenvalue"], e1["eigenvalue"], rtol=1e-6)
    t1, t2 = (pd.read_parquet(r / "trace.parquet") for r in (one, two))
    assert (t1["n_products"] == t2["n_products"]).all()
    # the loaded model's RMSNorm runs in float32: products agree to ~1e-7 of the operator's scale (lambda_max),
    # and this trace is a small sum of eigenvalues of both signs, so compare on that scale
    scale = float(e1["eigenvalue"].abs().max())
    np.testing.assert_allclose(t2["estimate"], t1["estimate"], rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(t2["stderr"], t1["stderr"], rtol=1e-4)
    st = pd.read_parquet(one / "stability.parquet")
    assert st["lr_lmax"].iloc[0] == pytest.approx(0.01 * e1["eigenvalue"].iloc[0])
    page = (one / "report.html").read_text()
    _Parser().feed(page)
    assert "Key findings" in page and "λmax" in page


def test_landscape_cli_random_and_hessian(cli_runs, model_dir, data_file, tmp_path):
    one, _ = cli_runs
    base = ["landscape", "--model", str(model_dir), "--data", str(data_file), "--n-examples", "3",
            "--max-length", "40", "--truncation", "left", "--dtype", "float64", "--attn", "eager", "--kinds", "v",
            "--blocks", "0", "--steps", "3", "--quiet"]
    with pytest.raises(SystemExit) as e:
        cli_main(base + ["--out", str(tmp_path / "rand")])
    assert e.value.code == 0
    ls = pd.read_parquet(tmp_path / "rand" / "landscape.parquet")
    assert list(ls.columns) == ["alpha", "beta", "loss", "finite"] and len(ls) == 9
    assert ls["finite"].all() and set(ls["alpha"]) == {-1.0, 0.0, 1.0}
    man = json.loads((tmp_path / "rand" / "manifest.json").read_text())
    centre = ls[(ls["alpha"] == 0) & (ls["beta"] == 0)]["loss"].iloc[0]
    assert man["analysis"] == "landscape" and centre == pytest.approx(man["landscape"]["center_loss"], rel=1e-12)
    page = (tmp_path / "rand" / "report.html").read_text()
    assert "Contour" in page and "Surface" in page
    # along the top Hessian eigenvector of the curvature run (same model): a 1-D slice
    with pytest.raises(SystemExit) as e:
        cli_main(base + ["--out", str(tmp_path / "hess"), "--kind", "hessian", "--from-curvature", str(one),
                         "--dims", "1", "--span", "0.1"])
    assert e.value.code == 0
    h = pd.read_parquet(tmp_path / "hess" / "landscape.parquet")
    assert len(h) == 3 and h["beta"].isna().all() and h["finite"].all()
    assert json.loads((tmp_path / "hess" / "manifest.json").read_text())["landscape"]["kind"] == "hessian"


def test_landscape_non_finite_points_are_nan(tmp_path):
    model = small_llama()
    v = model.model.layers[0].self_attn.v_proj
    # the model overflows away from theta* (a hook stands in for a real overflow)
    v.register_forward_hook(lambda m, i, o: o * float("nan") if float(m.weight.abs().max()) > 50 else o)
    cfg = LandscapeConfig(dtype="float64", attn_implementation="eager", encode=ENC, kinds=("v",), blocks="0",
                          dims=1, steps=3, span=1e4, n_examples=2)
    r = run_landscape(cfg, tmp_path / "nan", model=model, tokenizer=tiny_tokenizer(), records=records(),
                      progress=False, report=True)
    f = pd.read_parquet(tmp_path / "nan" / "landscape.parquet")
    assert list(f["finite"]) == [False, True, False] and f["loss"].isna().tolist() == [True, False, True]
    assert r.meta["n_nonfinite"] == 2
    assert "2 points had a non-finite loss" in (tmp_path / "nan" / "report.html").read_text()


def test_trace_scopes_and_bulk_outliers_in_the_criteria(tmp_path):
    model, batches = _mlp_problem()
    r = curvature_of(model, "cross_entropy", batches, tmp_path / "t", per=("model", "block"), top_k=4,
                     n_products=30, n_probes=2, n_steps=20, trace_scopes=("model",))
    tr = r.tables["trace"]
    assert tr["scope"].tolist() == ["model"]  # the blocks computed no trace
    assert set(r.tables["eigenvalues"]["scope"]) == {"model", "block:0", "block:2"}
    cr = r.tables["spectral_criteria"].set_index("scope").loc["model"]
    ev = r.tables["eigenvalues"]
    tops = ev[(ev["scope"] == "model") & (ev["which"] == "top")]["eigenvalue"].to_numpy()
    from gradsight.curvature.criteria import outlier_split

    want = outlier_split(tops, cr["bulk_ref"])
    assert cr["n_outliers"] == want["n_outliers"] and cr["bulk_edge"] == pytest.approx(want["bulk_edge"])
    assert 1 <= cr["n_outliers"] <= 3 and bool(cr["outliers_saturated"]) == (cr["n_outliers"] == 3)
    with pytest.raises(ValueError, match="trace_scopes: unknown scope type 'blocks'"):
        CurvatureConfig(trace_scopes=("blocks",))


def _two_mlps():
    X, Y = torch.randn(40, 4, dtype=DT), torch.randint(0, 3, (40,))
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X), Y).backward()
            opt.step()
        nets.append(net.eval())
    return nets, [(X[:15], Y[:15]), (X[15:], Y[15:])]


def test_landscape_of_random_hessian_interpolate(tmp_path):
    from gradsight import landscape as ls
    from gradsight.analyses.landscape import landscape_of

    (net, other), batches = _two_mlps()
    loss = ls.BatchLoss(batches, nn.functional.cross_entropy)
    base = loss(net)
    # random plane: the table equals grid_2d with the same seeded directions, vmap path
    r = landscape_of(net, "cross_entropy", batches, tmp_path / "rand", steps=5, span=0.5, report=True,
                     batch_points=4)
    d1, d2 = ls.random_direction(net, seed=0), ls.random_direction(net, seed=1)
    ref = ls.grid_2d(net, loss, d1, d2, np.linspace(-0.5, 0.5, 5), np.linspace(-0.5, 0.5, 5))
    np.testing.assert_allclose(r.frame["loss"], ref.frame["loss"], rtol=1e-12)
    assert r.meta["path"] == "vmap" and r.meta["center_loss"] == pytest.approx(base, rel=1e-14)
    auto = landscape_of(net, "cross_entropy", batches, tmp_path / "auto", steps=5, span=0.5)  # default "auto"
    assert auto.meta["path"] in ("vmap", "sequential")  # 25 points: too few to time both paths
    np.testing.assert_allclose(auto.frame["loss"], ref.frame["loss"], rtol=1e-12)
    assert (tmp_path / "rand" / "report.html").exists()
    # hessian axes from a curvature_of run of the same model: near theta* the 1-D slice is 0.5 lambda_1 a^2
    cur = curvature_of(net, "cross_entropy", batches, tmp_path / "cur", per=("model",), top_k=2, n_products=9,
                       n_probes=1, n_steps=5, tol=1e-10)
    lam1 = float(cur.tables["eigenvalues"]["eigenvalue"].iloc[0])
    h = landscape_of(net, "cross_entropy", batches, tmp_path / "hess", kind="hessian", from_curvature=cur.path,
                     dims=1, steps=3, span=1e-3)
    f = h.frame["loss"].to_numpy()
    curvature = (f[0] + f[2] - 2 * f[1]) / 1e-6  # second difference along v1
    assert curvature == pytest.approx(lam1, rel=1e-4)
    with pytest.raises(ValueError, match="another model"):
        landscape_of(other, "cross_entropy", batches, tmp_path / "hess2", kind="hessian", from_curvature=cur.path)
    # interpolation: endpoints are the two models' own losses, the barrier is recorded
    it = landscape_of(net, "cross_entropy", batches, tmp_path / "int", kind="interpolate", to=other, steps=5,
                      report=True)
    assert it.frame["alpha"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert it.frame["loss"].iloc[0] == pytest.approx(base, rel=1e-14)
    assert it.frame["loss"].iloc[-1] == pytest.approx(loss(other), rel=1e-14)
    assert it.meta["barrier"] == pytest.approx(max(0.0, float(np.max(
        it.frame["loss"] - (1 - it.frame["alpha"]) * it.frame["loss"].iloc[0] - it.frame["alpha"] * it.frame["loss"].iloc[-1]))))
    assert "Interpolation barrier" in (tmp_path / "int" / "report.html").read_text()
    # same configuration: nothing recomputed; another configuration: refused
    logs = []
    again = landscape_of(net, "cross_entropy", batches, tmp_path / "int", kind="interpolate", to=other, steps=5,
                         log=logs.append)
    assert "nothing to do" in logs[-1]
    pd.testing.assert_frame_equal(again.frame, it.frame)
    with pytest.raises(RunMismatchError, match="steps"):
        landscape_of(net, "cross_entropy", batches, tmp_path / "int", kind="interpolate", to=other, steps=7)
    with pytest.raises(ValueError, match="needs `to`"):
        landscape_of(net, "cross_entropy", batches, tmp_path / "x", kind="interpolate")


def test_lm_landscape_killed_run_resumes_chunk_by_chunk(tmp_path):
    cfg = LandscapeConfig(dtype="float64", attn_implementation="eager", encode=ENC, kinds=("q", "v"), blocks="0",
                          dims=2, steps=4, span=0.5, n_examples=3)
    out, logs = tmp_path / "land", []
    kw = dict(tokenizer=tiny_tokenizer(), records=records(), progress=False, report=False, log=logs.append)
    r = run_landscape(cfg, out, model=small_llama(), **kw)
    shards = sorted((out / "points").glob("*.parquet"))
    assert len(shards) == 4 and r.frame["finite"].all()  # one shard per row of the 4 x 4 grid
    # "kill": the last two rows and the final table are gone
    for p in shards[2:]:
        p.unlink()
    (out / "landscape.parquet").unlink()
    kept = [p.stat().st_mtime_ns for p in shards[:2]]
    r2 = run_landscape(cfg, out, model=small_llama(), **kw)
    assert any("2 of 4 chunks" in m for m in logs)
    assert [p.stat().st_mtime_ns for p in shards[:2]] == kept  # not recomputed
    pd.testing.assert_frame_equal(r2.frame, r.frame)
    assert r2.meta["resumed_chunks"] == 2


def test_landscape_of_pca_and_gradient_kinds(tmp_path):
    from gradsight import landscape as ls
    from gradsight.analyses.landscape import landscape_of

    (net, other), batches = _two_mlps()
    loss = ls.BatchLoss(batches, nn.functional.cross_entropy)
    # a trajectory ending at net: three earlier checkpoints on the segment other -> net, plus an off-line one
    sd_net, sd_other = net.state_dict(), other.state_dict()
    traj = [{k: (1 - t) * sd_net[k] + t * sd_other[k] for k in sd_net} for t in (1.0, 0.6, 0.3)]
    traj.append({k: v + 0.01 * torch.randn_like(v) for k, v in sd_net.items()})
    r = landscape_of(net, "cross_entropy", batches, tmp_path / "pca", kind="pca", trajectory=traj, steps=3,
                     batch_points=1, report=True)
    page = (tmp_path / "pca" / "report.html").read_text()
    assert "PCA plane of 4 checkpoints" in page and '"name":"trajectory"' in page.replace(" ", "")
    ds, info = ls.pca_directions(traj, final=sd_net, like=net, k=2)
    ref = ls.grid_2d(net, loss, ds[0], ds[1], np.linspace(-1, 1, 3), np.linspace(-1, 1, 3))
    np.testing.assert_allclose(r.frame["loss"], ref.frame["loss"], rtol=1e-12)
    assert r.meta["pca"]["explained_variance_ratio"][0] > 0.9  # the path is almost a line
    assert len(r.meta["pca"]["coords"]["alpha"]) == len(traj) + 1
    with pytest.raises(ValueError, match="needs `trajectory`"):
        landscape_of(net, "cross_entropy", batches, tmp_path / "p2", kind="pca")
    # gradient kind: the 1-D slice's slope at 0 is +||g|| (unit gradient direction)
    g = landscape_of(net, "cross_entropy", batches, tmp_path / "grad", kind="gradient", dims=1, steps=3,
                     span=1e-5)
    f = g.frame["loss"].to_numpy()
    net.zero_grad()
    loss.value(net).backward()
    gnorm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))
    net.zero_grad(set_to_none=True)
    assert (f[2] - f[0]) / 2e-5 == pytest.approx(gnorm, rel=1e-4)


def test_lm_interpolation_cli_endpoints_barrier_and_resume(model_dir, data_file, tmp_path):
    # the segment from the tiny Llama (seed 0) to another (seed 1): endpoints are the two models' own losses,
    # the barrier is recomputed from the points, and a killed run re-evaluates only the missing points
    from helpers import tiny_model

    other = tmp_path / "other"
    tiny_model(seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    base = ["landscape", "--model", str(model_dir), "--data", str(data_file), "--n-examples", "3",
            "--max-length", "40", "--truncation", "left", "--dtype", "float64", "--attn", "eager",
            "--kind", "interpolate", "--to", str(other), "--steps", "5", "--quiet", "--out", str(tmp_path / "int")]
    with pytest.raises(SystemExit) as e:
        cli_main(base)
    assert e.value.code == 0
    f = pd.read_parquet(tmp_path / "int" / "landscape.parquet")
    assert f["alpha"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and f["finite"].all()
    ends = []
    for i, d in enumerate((model_dir, other)):  # each model's own loss on the same data: the centre of a slice
        with pytest.raises(SystemExit):
            cli_main(["landscape", "--model", str(d), "--data", str(data_file), "--n-examples", "3",
                      "--max-length", "40", "--truncation", "left", "--dtype", "float64", "--attn", "eager",
                      "--dims", "1", "--steps", "3", "--quiet", "--no-report", "--out", str(tmp_path / f"c{i}")])
        ends.append(json.loads((tmp_path / f"c{i}" / "manifest.json").read_text())["landscape"]["center_loss"])
    assert f["loss"].iloc[0] == pytest.approx(ends[0], rel=1e-10)
    assert f["loss"].iloc[-1] == pytest.approx(ends[1], rel=1e-10)
    man = json.loads((tmp_path / "int" / "manifest.json").read_text())["landscape"]
    line = (1 - f["alpha"]) * f["loss"].iloc[0] + f["alpha"] * f["loss"].iloc[-1]
    assert man["barrier"] == pytest.approx(float((f["loss"] - line).max()), abs=1e-12)
    # kill: two points and the table are gone; the rerun evaluates those two only
    shards = sorted((tmp_path / "int" / "points").glob("*.parquet"))
    assert len(shards) == 5
    kept = {p: p.stat().st_mtime_ns for p in shards[::2]}
    for p in shards[1::2]:
        p.unlink()
    (tmp_path / "int" / "landscape.parquet").unlink()
    with pytest.raises(SystemExit) as e:
        cli_main(base)
    assert e.value.code == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "int" / "landscape.parquet"), f)


def test_lm_landscape_gradient_and_pca_kinds(model_dir, data_file, tmp_path):
    from helpers import tiny_model

    base = ["landscape", "--model", str(model_dir), "--data", str(data_file), "--n-examples", "3",
            "--max-length", "40", "--truncation", "left", "--dtype", "float64", "--attn", "eager", "--kinds", "q,v",
            "--quiet", "--no-report"]
    # gradient: the 1-D slice's slope at theta* is the gradient norm on the selected weights
    with pytest.raises(SystemExit) as e:
        cli_main(base + ["--kind", "gradient", "--dims", "1", "--steps", "3", "--span", "1e-5",
                         "--out", str(tmp_path / "g")])
    assert e.value.code == 0
    f = pd.read_parquet(tmp_path / "g" / "landscape.parquet")["loss"].to_numpy()
    meta = json.loads((tmp_path / "g" / "manifest.json").read_text())["landscape"]
    assert (f[2] - f[0]) / 2e-5 == pytest.approx(meta["directions"][0]["grad_norm"], rel=1e-4)
    # pca: three earlier checkpoints (other seeds) around the model; 2-D grid, coordinates in the manifest
    ckpts = []
    for seed in (1, 2, 3):
        d = tmp_path / f"ck{seed}"
        tiny_model(seed=seed).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        ckpts.append(str(d))
    with pytest.raises(SystemExit) as e:
        cli_main(base + ["--kind", "pca", "--trajectory", ",".join(ckpts), "--steps", "3",
                         "--out", str(tmp_path / "p")])
    assert e.value.code == 0
    land = pd.read_parquet(tmp_path / "p" / "landscape.parquet")
    meta = json.loads((tmp_path / "p" / "manifest.json").read_text())["landscape"]
    assert len(land) == 9 and land["finite"].all()
    ratios = meta["pca"]["explained_variance_ratio"]
    assert len(ratios) == 2 and ratios[0] >= ratios[1] > 0 and sum(ratios) <= 1 + 1e-12
    assert len(meta["pca"]["coords"]["alpha"]) == 4  # 3 checkpoints + the model at the origin
    with pytest.raises(ValueError, match="needs --trajectory"):
        LandscapeConfig(kind="pca")
