"""Target-aware selection from attribution runs (`gradsight select RUN --by influence|tracin|less`) and rollout
allocation across prompts (`stats.allocation`, `gradsight select RUN --allocate gvm|cures`)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradsight.analyses.attribution import attribution_of
from gradsight.analyses.attribution.selection import method_for, select, target_scores
from gradsight.cli import main
from gradsight.stats.allocation import (allocation_table, cures_allocation, cures_sampling_probs, cures_sigma)
from gradsight.stats.noise import gvm_allocation

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

C, D = 3, 6
TARGET = "c1"


def _data(n, seed, centers):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    return centers[y] + 1.5 * torch.randn(n, D, generator=g), y


def _model():
    torch.manual_seed(0)
    centers = torch.randn(C, D, generator=torch.Generator().manual_seed(7)) * 1.5
    X, y = _data(60, 1, centers)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    Xq, yq = _data(30, 2, centers)
    return model, X, y, Xq, yq


def _attr(out, methods, queries=True):
    model, X, y, Xq, yq = _model()
    kw = dict(queries=[(Xq, yq)], query_groups=[f"c{int(c)}" for c in yq]) if queries else {}
    attribution_of(model, "cross_entropy", [(X[:30], y[:30]), (X[30:], y[30:])], out,
                   groups=[f"c{int(c)}" for c in y], methods=methods, **kw)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _attr(tmp_path_factory.mktemp("attr") / "run", ("ekfac", "grad_cos", "tracin"))


def _dense(run, method):
    t = load_file(str(run / "scores" / f"{method}.safetensors"))
    return t["scores"].double().numpy(), t["train"].tolist(), t["query"].tolist()


def _queries(run):
    ex = pd.read_parquet(run / "examples.parquet")
    return ex[ex["set"] == "query"].sort_values("example")


def test_method_resolution():
    assert method_for("influence", ["grad_cos", "kfac", "raw"]) == "kfac"
    assert method_for("influence", ["grad_cos"]) == "ekfac"  # fitted anyway
    assert method_for("tracin", ["grad_dot"]) == "grad_dot"
    assert method_for("less", ["ekfac"]) == "grad_cos"
    with pytest.raises(ValueError, match="--by must be one of"):
        method_for("diversity", [])


@pytest.mark.parametrize("by, method", [("influence", "ekfac"), ("tracin", "tracin")])
def test_aggregate_equals_mean_of_dense_columns(run, by, method):
    S, train, query = _dense(run, method)
    q = _queries(run)
    cols = [query.index(e) for e in q.loc[q["group"] == TARGET, "example"]]
    ref = S[:, cols].mean(1)
    got = target_scores(run, by, [TARGET])
    assert got["example"].tolist() == train and (got["method"] == method).all()
    np.testing.assert_allclose(got["score"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # all queries pooled: the mean over every column
    allq = target_scores(run, by)
    np.testing.assert_allclose(allq["score"], S.mean(1), rtol=1e-5, atol=1e-5 * np.abs(S).max())


def test_less_is_max_over_subtasks_of_mean_cosine(run):
    S, train, query = _dense(run, "grad_cos")
    q = _queries(run)
    per = np.stack([S[:, [query.index(e) for e in q.loc[q["group"] == g, "example"]]].mean(1)
                    for g in ("c0", "c1", "c2")], 1)
    got = target_scores(run, "less")
    np.testing.assert_allclose(got["score"], per.max(1), rtol=1e-5, atol=1e-6)
    assert got["subtask"].tolist() == [f"c{j}" for j in per.argmax(1)]
    one = target_scores(run, "less", [TARGET])
    np.testing.assert_allclose(one["score"], per[:, 1], rtol=1e-5, atol=1e-6)


def test_methods_not_in_the_run_are_fitted_from_stored_features(run, tmp_path):
    other = _attr(tmp_path / "dot", ("grad_dot",))  # same model and data: the same features
    for by, method in (("less", "grad_cos"), ("influence", "ekfac")):
        a = target_scores(other, by, [TARGET])
        b = target_scores(run, by, [TARGET])
        assert (a["method"] == method).all()
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-9, atol=1e-12)
    assert (target_scores(other, "tracin")["method"] == "grad_dot").all()  # the configured one


@pytest.mark.parametrize("by", ["less", "influence"])
def test_selection_prefers_the_target_class(run, by):
    ex = pd.read_parquet(run / "examples.parquet")
    train = ex[ex["set"] == "train"]
    base = (train["group"] == TARGET).mean()  # what random selection gets on average (1/3)
    sel = select(run, 10, by=by, target=[TARGET])
    assert sel["rank"].tolist() == list(range(1, 11)) and sel["score"].is_monotonic_decreasing
    share = (sel["group"] == TARGET).mean()
    assert share >= 0.7 > base + 0.3, (by, share)
    low = select(run, 10, by=by, target=[TARGET], ascending=True)
    assert (low["group"] == TARGET).mean() < share


def test_diverse_selection_within_pool(run):
    top = select(run, 12, by="less", target=[TARGET])
    div = select(run, 4, by="less", target=[TARGET], diverse=True, pool=12)
    assert len(set(div["example"])) == 4 and set(div["example"]) <= set(top["example"])
    assert div["example"].iloc[0] == top["example"].iloc[0]  # the first greedy pick is the best score
    only = select(run, 3, by="less", groups=["c0"])
    assert (only["group"] == "c0").all()


def test_errors(run, tmp_path):
    with pytest.raises(ValueError, match="unknown query group.*'nope'"):
        select(run, 3, by="less", target=["nope"])
    for k in (0, 61):
        with pytest.raises(ValueError, match="between 1 and the 60 candidate"):
            select(run, k, by="influence")
    with pytest.raises(ValueError, match="--by must be one of"):
        select(run, 3, by="grad_norm")
    with pytest.raises(ValueError, match="--labels: unknown training group"):
        select(run, 3, groups=["zz"])
    self_run = _attr(tmp_path / "self", ("grad_cos",), queries=False)
    with pytest.raises(ValueError, match="run gradsight attribute with --queries VAL"):
        select(self_run, 3, by="less")


def _cli(args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def test_cli_end_to_end(run, tmp_path, capsys):
    out = tmp_path / "picked.txt"
    assert _cli(["select", run, "--by", "less", "--target", TARGET, "-k", 5, "--out", out]) in (0, None)
    ids = out.read_text().split()
    df = pd.read_parquet(out.with_suffix(".parquet"))
    assert ids == df["id"].tolist() and len(ids) == 5
    assert {"rank", "example", "id", "group", "score"} <= set(df.columns)
    assert df["example"].tolist() == select(run, 5, by="less", target=[TARGET])["example"].tolist()
    assert "selected 5 by less (grad_cos)" in capsys.readouterr().out
    assert _cli(["select", run, "--by", "influence", "-k", 4, "--diverse", "--out", out]) in (0, None)
    assert len(out.read_text().split()) == 4
    assert _cli(["select", run, "--by", "less", "--target", "nope", "-k", 3]) == 2
    err = capsys.readouterr().err
    assert "unknown query group" in err and "Traceback" not in err
    assert _cli(["select", run, "--allocate", "gvm", "-k", 3]) == 2
    assert "no rewarded rollouts" in capsys.readouterr().err
    assert _cli(["select", run, "-k", 3]) == 2  # the geometry default --by diversity does not apply here
    assert "choose --by influence, tracin or less" in capsys.readouterr().err


# ---- rollout allocation -----------------------------------------------------------------------------------

def _geometry_run(path, prompts, threshold=0.5):
    """A geometry run directory holding only rollouts: prompts = [(prompt, [(reward, norm), ...]), ...]."""
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for prompt, rolls in prompts:
        for reward, norm in rolls:
            i = len(rows)
            rows.append({"idx": i, "id": f"r{i}", "group": "g", "status": "ok", "prompt": prompt, "response": "x",
                         "record_idx": i, "term": "rollout", "role": "rollout", "reward": float(reward),
                         "sq_norm": float(norm) ** 2})
    pd.DataFrame(rows).to_parquet(path / "examples.parquet", index=False)
    (path / "manifest.json").write_text(json.dumps({"analysis": "geometry", "finished": True,
                                                    "geometry": {"threshold": threshold}}))
    return path


def test_allocation_table_reproduces_the_gvm_worked_example(tmp_path):
    # tests/test_noise.py::test_gvm_worked_example: G = 1, p = (0.5, 0.1, 0) -> (3, 7, 0) of 10
    run = _geometry_run(tmp_path / "g", [("A", [(1, 1.0)] * 5 + [(0, 4.0)] * 5),
                                         ("B", [(1, 1.0)] + [(0, 9.0)] * 9),
                                         ("C", [(0, 2.0)] * 10)])
    t = allocation_table(run, 10, "gvm")
    assert t["prompt"].tolist() == ["A", "B", "C"]
    np.testing.assert_allclose(t["p"], [0.5, 0.1, 0.0])
    np.testing.assert_allclose(t["G"], [1.0, 1.0, 0.0])
    assert t["n"].tolist() == [3, 7, 0] and t["n"].dtype == np.int64


def test_allocation_table_matches_gvm_on_random_rollouts(tmp_path):
    rng = np.random.default_rng(3)
    prompts = [(f"p{j}", [(int(rng.random() < 0.2 + 0.1 * j), rng.uniform(0.5, 3)) for _ in range(8)])
               for j in range(6)]
    run = _geometry_run(tmp_path / "g", prompts, threshold=0.5)
    t = allocation_table(run, 50, "gvm", alpha=1e-2)
    G = [np.mean([n for r, n in rolls if r > 0.5]) if any(r > 0.5 for r, _ in rolls) else 0.0 for _, rolls in prompts]
    p = [np.mean([r > 0.5 for r, _ in rolls]) for _, rolls in prompts]
    np.testing.assert_allclose(t["G"], G, rtol=1e-12)
    assert t["n"].tolist() == gvm_allocation(G, p, 50, alpha=1e-2).tolist() and t["n"].sum() == 50
    # the threshold comes from the manifest unless given: everything rejected -> no positive weight
    with pytest.raises(ValueError, match="no prompt has positive weight"):
        allocation_table(run, 50, "gvm", threshold=1.0)


def test_cures_hand_computed(tmp_path):
    # A: p = 1/2, correct norms (1, 3), wrong (2, 2): E g+ = 2, E g+^2 = 5, E g- = 2, E g-^2 = 4
    #    sigma^2 = 1/2 * 1/4 * 5 + 1/4 * 1/2 * 4 - 1/16 * 0 = 1.125
    # B: p = 1/4, correct (2), wrong (1, 1, 1): sigma^2 = 1/4 * 9/16 * 4 + 1/16 * 3/4 * 1 - 1/16 * 9/16 * 1
    #    = 0.5625 + 0.046875 - 0.03515625 = 0.57421875
    # C: all correct -> sigma = 0
    sA, sB = math.sqrt(1.125), math.sqrt(0.57421875)
    np.testing.assert_allclose(cures_sigma([0.5, 0.25, 1.0], [2, 2, 1], [5, 4, 1], [2, 1, 0], [4, 1, 0]),
                               [sA, sB, 0.0], rtol=1e-12)
    # 10 rollouts: 10 * (0.58328, 0.41672) -> floor (5, 4), the remaining one to the largest remainder (A)
    assert sA / (sA + sB) == pytest.approx(0.583283, abs=1e-6)
    run = _geometry_run(tmp_path / "c", [("A", [(1, 1.0), (1, 3.0), (0, 2.0), (0, 2.0)]),
                                         ("B", [(1, 2.0), (0, 1.0), (0, 1.0), (0, 1.0)]),
                                         ("C", [(1, 1.0)] * 4)])
    t = allocation_table(run, 10, "cures")
    np.testing.assert_allclose(t["sigma"], [sA, sB, 0.0], rtol=1e-12)
    assert t["n"].tolist() == [6, 4, 0]
    assert cures_allocation([0.5, 0.25, 1.0], [2, 2, 1], [5, 4, 1], [2, 1, 0], [4, 1, 0], 7).tolist() == [4, 3, 0]
    # equal sigmas, 10 rollouts: the released code's np.round gives 3 + 3 + 3 = 9; largest remainder 4, 3, 3
    assert cures_allocation([0.5] * 3, [1] * 3, [1] * 3, [1] * 3, [1] * 3, 10).tolist() == [4, 3, 3]
    # sampling: d = (a+1)/(m+2), t = 100 (a+1): A d=1/2, t=300; B d=1/3, t=200; C d=5/6, t=500
    z = np.array([0.5 / 300, math.sqrt(2 / 9) / 200, math.sqrt(5 / 36) / 500])
    np.testing.assert_allclose(t["sampling_prob"], np.exp(z) / np.exp(z).sum(), rtol=1e-12)
    np.testing.assert_allclose(cures_sampling_probs([2, 1, 4], [4, 4, 4]), np.exp(z) / np.exp(z).sum())
    with pytest.raises(ValueError, match="accuracy must lie"):
        cures_sigma([1.5], [1], [1], [1], [1])
    with pytest.raises(ValueError, match="no prompt has positive CurES weight"):
        cures_allocation([1.0, 0.0], [1, 0], [1, 0], [0, 1], [0, 1], 5)


def test_cli_allocate(tmp_path, capsys):
    run = _geometry_run(tmp_path / "g", [("A", [(1, 1.0)] * 5 + [(0, 4.0)] * 5),
                                         ("B", [(1, 1.0)] + [(0, 9.0)] * 9),
                                         ("C", [(0, 2.0)] * 10)])
    assert _cli(["select", run, "--allocate", "gvm", "--budget", 10]) in (0, None)
    t = pd.read_parquet(run / "allocation.parquet")
    assert t["n"].tolist() == [3, 7, 0]
    printed = capsys.readouterr().out
    assert "allocated 10 rollouts over 3 prompts by gvm" in printed
    assert _cli(["select", run, "--allocate", "cures", "-k", 10, "--out", tmp_path / "c.parquet"]) in (0, None)
    assert pd.read_parquet(tmp_path / "c.parquet")["n"].sum() == 10
    assert _cli(["select", run, "--allocate", "nope", "-k", 10]) == 2
    assert "rule must be one of gvm, cures" in capsys.readouterr().err
