"""The attribution run directory against the in-memory methods, reuse of stored training features, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gradsight.analyses.attribution import AttributionConfig, attribution_of, run_attribution
from gradsight.attribution import FeatureSpec, attribute
from gradsight.demo.problems import demo_records
from gradsight.runs.store import RunMismatchError

from helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    X, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    Xq, yq = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    return net, X, y, Xq, yq


@pytest.mark.parametrize("method", ["ekfac", "kfac", "trak", "grad_cos", "tracin"])
def test_run_scores_equal_in_memory_scores(method, tmp_path):
    """Stored (float64) features, shards, covariance sums and block streaming give the in-memory scores, with
    two checkpoints (TracIn weights, ensembles) and a query set."""
    net, X, y, Xq, yq = _mlp()
    early = {k: v.clone() * 0.9 for k, v in net.state_dict().items()}
    final = {k: v.clone() for k, v in net.state_dict().items()}  # (state_dict() holds the live tensors)
    spec = dict(r_in=3, r_out=4)
    run = attribution_of(net, "cross_entropy", [(X[:11], y[:11]), (X[11:], y[11:])], tmp_path / "run",
                         queries=[(Xq, yq)], checkpoints=[early], lrs=(0.5, 0.1), methods=(method,),
                         feature_dtype="float64", block_size=7, **spec)
    S, _ = attribute(net, "cross_entropy", (X, y), (Xq, yq), method=method, dtype=torch.float64,
                     checkpoints=[(early, 0.5), (final, 0.1)], spec=FeatureSpec(**spec))
    np.testing.assert_allclose(run.scores(method), S, rtol=1e-5, atol=1e-7)  # stored as float32
    top = run.top[(run.top["side"] == "proponent") & (run.top["rank"] == 1)].sort_values("query")
    assert top["train"].tolist() == S.argmax(0).tolist()


def test_streaming_top_k_equals_dense(tmp_path):
    net, X, y, Xq, yq = _mlp(1)
    kw = dict(queries=[(Xq, yq)], methods=("ekfac",), feature_dtype="float64", block_size=4, top_k=5)
    dense = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "dense", **kw)
    stream = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "stream", max_dense=10, **kw)
    assert stream.scores("ekfac") is None and dense.scores("ekfac") is not None
    cols = ["method", "query", "side", "rank", "train"]
    pd.testing.assert_frame_equal(dense.top[cols], stream.top[cols])
    np.testing.assert_allclose(dense.top["score"], stream.top["score"], rtol=1e-12)


def test_self_influence_and_train_x_train(tmp_path):
    """Without queries the training rows are their own queries; a row is never its own proponent; its
    self-influence is the score of (i, i) and a mislabeled row stands out."""
    net, X, y, _, _ = _mlp(2)
    with torch.no_grad():
        net[2].weight.mul_(20)  # a confident model ...
    y = net(X).argmax(1)  # ... on labels it agrees with ...
    y[3] = (y[3] + 1) % 3  # ... except one
    run = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "run", methods=("ekfac", "grad_dot"),
                         feature_dtype="float64")
    S = run.scores("ekfac")
    assert S.shape == (30, 30)
    top = run.top
    assert (top["train"] != top["query"]).all()
    si = run.self_influence.set_index(["method", "example"])["self_influence"]
    np.testing.assert_allclose([si[("ekfac", i)] for i in range(30)], np.diag(S), rtol=1e-5)
    assert si.loc["grad_dot"].idxmax() == 3


def test_features_from_reuses_training_features_and_refuses_others(tmp_path):
    net, X, y, Xq, yq = _mlp(3)
    both = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "both", queries=[(Xq, yq)],
                          methods=("ekfac",), r_in=3, r_out=3)
    train = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "train", methods=("ekfac",), r_in=3, r_out=3)
    logs: list[str] = []
    reuse = attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "reuse", queries=[(Xq, yq)],
                           methods=("ekfac",), r_in=3, r_out=3, features_from=str(tmp_path / "train"),
                           log=logs.append)
    np.testing.assert_allclose(reuse.scores("ekfac"), both.scores("ekfac"), rtol=1e-6)
    ex = pd.read_parquet(tmp_path / "reuse" / "examples.parquet")
    assert set(ex["set"]) == {"query"}  # no training example was featurised again
    with pytest.raises(RunMismatchError, match=r"r_in: 3 there, 4 here"):
        attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "bad1", queries=[(Xq, yq)], methods=("ekfac",),
                       r_in=4, r_out=3, features_from=str(tmp_path / "train"))
    with pytest.raises(RunMismatchError, match="data_sha256"):
        attribution_of(net, "cross_entropy", [(X[:20], y[:20])], tmp_path / "bad2", queries=[(Xq, yq)],
                       methods=("ekfac",), r_in=3, r_out=3, features_from=str(tmp_path / "train"))
    with torch.no_grad():
        net[0].weight.add_(0.1)
    with pytest.raises(RunMismatchError, match="model_fingerprint"):
        attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "bad3", queries=[(Xq, yq)], methods=("ekfac",),
                       r_in=3, r_out=3, features_from=str(tmp_path / "train"))


LM = {"dtype": "float64", "attn_implementation": "eager", "max_length": 64, "truncation": "left"}


def _lm_run(out, records, queries=None, tok=None, **kw):
    cfg = AttributionConfig(model="tiny", data="", queries=queries, r_in=4, r_out=4, **{**LM, **kw})
    return run_attribution(cfg, out, model=tiny_model(seed=0, dtype=torch.float64), tokenizer=tok or tiny_tokenizer(),
                           records=records, progress=False, report=False)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    recs = demo_records(n_problems=3)
    train = [dict(r, group=f"p{r['problem']}") for r in recs if r["group"] != "wrong"]
    queries = [dict(r, group=f"p{r['problem']}") for r in recs if r["group"] == "wrong"]
    q = d / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in queries))
    return train, q


def test_lm_per_token_scores_add_up_to_the_score(tmp_path, lm_data):
    train, q = lm_data
    run = _lm_run(tmp_path / "run", train, str(q), kinds=("v", "down"), methods=("ekfac", "grad_dot"), per_token=2,
                  feature_dtype="float64")
    tok = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    assert set(tok["method"]) == {"ekfac"} and tok["rank"].max() == 2
    top = run.top[(run.top["method"] == "ekfac") & (run.top["side"] == "proponent")].set_index(["query", "train"])
    sums = tok.groupby(["query", "train"])["score"].sum()
    for (qq, tr), s in sums.items():
        assert s == pytest.approx(top.loc[(qq, tr), "score"], rel=1e-6)
    assert run.precision["precision"].notna().all()


def test_lm_features_from_refuses_other_layers_and_tokenizer(tmp_path, lm_data):
    train, q = lm_data
    _lm_run(tmp_path / "train", train, kinds=("v",), methods=("ekfac",))
    ok = _lm_run(tmp_path / "reuse", train, str(q), kinds=("v",), methods=("ekfac",),
                 features_from=str(tmp_path / "train"))
    assert ok.scores("ekfac").shape == (len(train), 3)
    with pytest.raises(RunMismatchError, match=r"layers\.kinds"):
        _lm_run(tmp_path / "bad", train, str(q), kinds=("q",), methods=("ekfac",), features_from=str(tmp_path / "train"))
    other = copy.deepcopy(tiny_tokenizer())  # a copy: tiny_tokenizer() is cached and shared by every test
    other.add_tokens(["<extra-token>"])
    with pytest.raises(RunMismatchError, match="tokenizer"):
        _lm_run(tmp_path / "bad2", train, str(q), tok=other, kinds=("v",), methods=("ekfac",),
                features_from=str(tmp_path / "train"))


def test_bad_input(tmp_path, lm_data):
    train, q = lm_data
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        _lm_run(tmp_path / "e", train, str(empty), kinds=("v",))
    net, X, y, Xq, yq = _mlp(4)
    with pytest.raises(ValueError, match="empty"):
        attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "e2", queries=[])
    # a non-finite example is flagged and left out of the scores (counted)
    Xn = X.clone()
    Xn[5, 0] = float("nan")
    run = attribution_of(net, "cross_entropy", [(Xn, y)], tmp_path / "nan", queries=[(Xq, yq)], methods=("ekfac",))
    ex = run.examples
    assert (ex["status"] == "skipped").sum() == 1 and "non-finite" in ex.loc[ex["status"] == "skipped", "reason"].iloc[0]
    assert 5 not in set(run.top["train"])
    with pytest.raises(ValueError, match="adam"):
        AttributionConfig(data="x", adam_state=("a.safetensors",), methods=("ekfac",))


def test_corrupted_feature_shard_is_counted_not_scored(tmp_path):
    """NaN in stored features (a float16 overflow, a damaged shard): the rows are left out, the manifest lists
    them and the rest scores as before."""
    from gradsight.analyses.attribution.scoring import feature_blocks

    net, X, y, Xq, yq = _mlp(5)
    attribution_of(net, "cross_entropy", [(X, y)], tmp_path / "run", queries=[(Xq, yq)], methods=("grad_dot",))
    f = sorted((tmp_path / "run" / "features").glob("*.safetensors"))[0]
    t = load_file(str(f))
    name = [k for k in t if k != "__idx__"][0]
    t[name][2, 0, 0] = float("nan")
    save_file(t, str(f))
    dropped: set = set()
    keys = {int(k): int(k) for k in t["__idx__"].tolist() if k < 30}
    blocks = list(feature_blocks(tmp_path / "run", keys, {k: 0.0 for k in keys}, [name], 100, dropped))
    assert dropped == {int(t["__idx__"][2])} and sum(b.n for b in blocks) == len(keys) - 1
