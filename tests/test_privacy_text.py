"""Text leakage (gradsight.privacy.text) and what gradsight's store leaks (gradsight.privacy.store)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gradsight.capture import capture
from gradsight.measures.projection import ProjectionSpec, Projector
from gradsight.privacy.store import (factor_token_recovery, layer0_candidates, projected_leak,
                                     projected_token_recovery)
from gradsight.privacy.text import (decode_ids, discrete_refine, embedding_token_set, label_token_set,
                                    lookup_gradient, noise_row_threshold, tag_attack, target_gradient,
                                    text_corpus_ids, text_recovery_scores, tiny_lm, token_set_under_noise)
from helpers import tiny_base_tokenizer

V, D = 256, 32
Q = "model.layers.0.self_attn.q_proj"
EMB = "model.embed_tokens.weight"


def _ids(B, T, seed=1, vocab=V):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _input_set(ids):
    """Tokens at input positions 0..T-2 (the last token of a causal-LM sequence is only a label)."""
    return sorted(set(ids[:, :-1].flatten().tolist()))


@pytest.mark.parametrize("B", [1, 8])
def test_bag_of_words_untied_exact(B):
    m = tiny_lm(vocab_size=V, hidden=D, layers=2)
    ids = _ids(B, 12)
    g = target_gradient(m, ids)["model.embed_tokens.weight"]
    assert embedding_token_set(g).tolist() == _input_set(ids)
    # the lookup's own gradient IS the weight gradient when untied
    torch.testing.assert_close(lookup_gradient(m, ids), g, rtol=0, atol=1e-15)


def test_label_set_from_lm_head_completes_the_bag():
    m = tiny_lm(vocab_size=V, hidden=D, layers=2)
    ids = _ids(3, 10, seed=6)
    g = target_gradient(m, ids)
    assert label_token_set(g["lm_head.weight"]).tolist() == sorted(set(ids[:, 1:].flatten().tolist()))
    both = set(label_token_set(g["lm_head.weight"]).tolist()) | set(embedding_token_set(g[EMB]).tolist())
    assert both == set(ids.flatten().tolist())


def test_discrete_refine_repairs_shift_and_swap():
    """From the truth shifted by one with a wrong last token, and from a swapped pair, the search reaches the
    truth (the exact TAG loss is 0 there and the moves connect these rows to it)."""
    m = tiny_lm(vocab_size=64, hidden=16, layers=1)
    ids = _ids(1, 6, seed=3, vocab=64)
    tg = target_gradient(m, ids)
    pool = torch.tensor(sorted(set(ids.flatten().tolist()) | {0, 1}))
    shifted = torch.cat([ids[:, 1:], torch.tensor([[int(pool[0])]])], dim=1)
    swapped = ids.clone()
    swapped[0, [1, 4]] = ids[0, [4, 1]]
    for start in (shifted, swapped):
        assert discrete_refine(m, tg, start, pool, sweeps=3).tolist() == ids.tolist()


def test_tied_embeddings_need_the_lookup_gradient():
    tied = tiny_lm(vocab_size=V, hidden=D, layers=2, tie=True, seed=3)
    ids = _ids(4, 10, seed=5)
    raw = target_gradient(tied, ids)["model.embed_tokens.weight"]
    assert len(embedding_token_set(raw)) == V  # the dense lm_head term lights every row
    lk = lookup_gradient(tied, ids)
    assert embedding_token_set(lk).tolist() == _input_set(ids)
    # independent reference: an untied copy with the same weights; its input-embedding gradient is the lookup's
    untied = tiny_lm(vocab_size=V, hidden=D, layers=2, tie=False)
    sd = tied.state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    untied.load_state_dict(sd)
    ref = target_gradient(untied, ids)
    torch.testing.assert_close(lk, ref["model.embed_tokens.weight"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(raw, ref["model.embed_tokens.weight"] + ref["lm_head.weight"], rtol=1e-10, atol=1e-14)


def test_noise_threshold_false_positive_rate():
    """Pure-noise rows pass at rate Phi(-k) (k rule) and alpha / V (Bonferroni): chi^2_d law, Monte Carlo."""
    sigma, d, n = 0.3, 16, 100_000
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    rate = float((noise.norm(dim=1) > noise_row_threshold(sigma, d, n, k=2.0)).double().mean())
    assert abs(rate - 0.02275) < 0.0015
    assert int((noise.norm(dim=1) > noise_row_threshold(sigma, d, n, alpha=0.5)).sum()) <= 4


def test_token_set_under_noise_recall_falls():
    m = tiny_lm(vocab_size=V, hidden=D, layers=2)
    ids = _ids(4, 12, seed=2)
    truth = set(_input_set(ids))
    g = target_gradient(m, ids)["model.embed_tokens.weight"]
    assert token_set_under_noise(g, 0.0).tolist() == sorted(truth)
    typical = float(g.norm(dim=1)[sorted(truth)].median()) / D ** 0.5  # per-entry size of a present row
    recalls, precisions = [], []
    for i, s in enumerate([0.01, 0.3, 3.0, 30.0]):
        noisy = g + torch.randn(g.shape, generator=torch.Generator().manual_seed(i), dtype=g.dtype) * s * typical
        found = set(token_set_under_noise(noisy, s * typical).tolist())
        recalls.append(len(found & truth) / len(truth))
        precisions.append(len(found & truth) / max(len(found), 1))
    assert recalls[0] == 1.0 and recalls[-1] < 0.5 and recalls == sorted(recalls, reverse=True)
    assert min(p for p, r in zip(precisions, recalls) if r > 0) > 0.9


def _q_proj_factors(m, ids, layer=Q):
    with capture(m, [layer]) as tape:
        logits = m(input_ids=ids).logits  # (B, T, V)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        ce.sum().backward()
        return tape.grads()[layer]


def test_factor_token_recovery_exact():
    m = tiny_lm(vocab_size=V, hidden=D, layers=2)
    with torch.no_grad():  # a trained-looking RMSNorm weight, so gamma is not the identity
        m.model.layers[0].input_layernorm.weight.uniform_(0.5, 1.5)
    ids = _ids(2, 9, seed=4)
    fg = _q_proj_factors(m, ids)
    for b in range(2):
        assert factor_token_recovery(fg.A[b], m).tolist() == ids[b].tolist()


def test_projected_leak_exact_then_partial():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(32, generator=gen, dtype=torch.float64), torch.randn(48, generator=gen, dtype=torch.float64)
    sizes = [4, 8, 16, 24, 32, 40]
    rows = projected_leak(x, g, sizes, r_out=8, seed=7, name=Q)
    assert [r["r_in"] for r in rows] == sizes and not any(r["exact_store"] for r in rows)
    for r in rows[4:]:
        assert r["rel_err"] < 1e-5 and abs(r["cosine"] - 1) < 1e-10
    # below d_in: exactly the part of x in the row space of the stored P_in leaks (hand computation via QR)
    proj = Projector(ProjectionSpec(r_in=16, r_out=8, seed=7), dtype=torch.float64)
    Qb, _ = torch.linalg.qr(proj.matrix(Q, "in", 16, 32).T)  # (32, 16) orthonormal basis of the row space
    assert abs(rows[2]["cosine"] - float((Qb.T @ x).norm() / x.norm())) < 1e-10
    cos = [r["cosine"] for r in rows[:4]]
    assert cos == sorted(cos) and cos[-1] < 0.99


@pytest.mark.parametrize("layer, first", [(Q, 1), ("model.layers.0.self_attn.v_proj", 0)])
def test_projected_token_recovery_rises_with_r_in(layer, first):
    """The feature holds the tokens whose output gradient is non-zero: never the last position (no loss), and
    for q_proj not position 0 either (its query meets a one-element softmax, so dL/dq_0 = 0)."""
    m = tiny_lm(vocab_size=V, hidden=D, layers=2)
    ids = torch.tensor([[3, 17, 42, 99, 150, 201, 7]])  # distinct tokens
    fg = _q_proj_factors(m, ids, layer)
    cands = layer0_candidates(m)  # (V, D)
    truth = set(ids[0, first:-1].tolist())
    recall = {}
    for r_in in (3, 12, 32):
        proj = Projector(ProjectionSpec(r_in=r_in, r_out=16, seed=1), dtype=torch.float64)
        feat = proj.layer_features(layer, fg)[0].view(16, r_in)
        P_in = proj.matrix(layer, "in", r_in, D)
        top, res = projected_token_recovery(feat, P_in, cands, T=7, n_return=len(truth))
        recall[r_in] = len(set(top.tolist()) & truth) / len(truth)
        if r_in == 32:
            found, _ = projected_token_recovery(feat, P_in, cands, T=7)
            assert set(found.tolist()) == truth
        if r_in == 3:
            assert float(res.max()) < 1e-6  # r_in < T: the row space is everything, nothing is learnt
    assert recall[3] < 0.5 and recall[32] == 1.0 and recall[3] <= recall[12] <= recall[32]


def test_tag_recovers_short_sequence():
    m = tiny_lm(vocab_size=64, hidden=32, layers=1)
    ids = _ids(1, 4, seed=2, vocab=64)
    tg = target_gradient(m, ids)
    start = tag_attack(m, tg, 4, 1, iters=1)  # the random initialisation projected to tokens
    out = tag_attack(m, tg, 4, 1, iters=120)
    acc0 = text_recovery_scores(start, ids)["position_acc"]
    acc = text_recovery_scores(out, ids)["position_acc"]
    assert acc >= 0.75 and acc > acc0
    # with the bag of words (LAMP) the candidates restrict the projection to present tokens
    bag = embedding_token_set(tg["model.embed_tokens.weight"])
    out_c = tag_attack(m, tg, 4, 1, iters=30, candidates=bag)
    assert set(out_c.flatten().tolist()) <= set(bag.tolist())


def test_text_recovery_scores_hand_example():
    true = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    pred = torch.tensor([[5, 6, 7, 9], [1, 2, 3, 4]])  # swapped order; one wrong token
    s = text_recovery_scores(pred, true)
    assert s["exact"] == 0.5 and s["position_acc"] == 7 / 8
    assert s["token_recall"] == 7 / 8 and s["token_precision"] == 7 / 8
    assert s["rouge1"] == pytest.approx((1 + 0.75) / 2) and s["rouge2"] == pytest.approx((1 + 2 / 3) / 2)


def test_text_corpus_ids_vocabulary():
    from gradsight.importance.text import sample_text

    tok = tiny_base_tokenizer()
    ids, id_map = text_corpus_ids(tok, n_seqs=5, seq_len=12, vocab_size=30, seed=3)
    assert ids.shape == (5, 12) and int(ids.max()) <= 29
    raw = tok(sample_text("calibration"), add_special_tokens=False)["input_ids"]
    top = [t for t, _ in sorted(Counter(raw).items(), key=lambda kv: (-kv[1], kv[0]))[:29]]
    assert id_map[:29].tolist() == top and int(id_map[29]) == -1
    text = sample_text("calibration")
    for row in ids:
        if int(row.max()) < 29:  # no <unk>: the window decodes to a piece of the text
            assert decode_ids(tok, row, id_map) in text
    with pytest.raises(ValueError, match="n_seqs"):
        text_corpus_ids(tok, n_seqs=10**6, seq_len=12, vocab_size=30)
