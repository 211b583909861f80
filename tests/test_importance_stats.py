"""The calibration statistics of `importance.stats` (one captured pass) against per-example loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradsight.capture.loop import loop_grads
from gradsight.importance.stats import (accumulate, activation_stats, calibration_stats, from_tensors, merge,
                                        new_stats, to_tensors)
from gradsight.inputs.losses import loss_fn_for
from gradsight.measures.step import backward_step

from helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WANT = ("g_sum", "g_sq", "xtx", "neuron")


def _lm_batch(lengths, seed=0, vocab=40):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    att = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        att[b, :n] = 1
        ids[b, n:] = 0
    tgt = att.bool().clone()
    tgt[:, 0] = False
    return {"input_ids": ids, "attention_mask": att, "target_mask": tgt}


def _reference(model, layers, batches, loss_fn):
    """Per example alone: its gradient (own backward, `loop_grads`), its inputs by a forward hook."""
    ref = {n: {"sq_in": 0, "g_sum": 0, "g_sq": 0, "xtx": 0, "neuron": 0} for n in layers}
    for batch in batches:
        grads, _ = loop_grads(model, layers, batch, loss_fn)
        for e in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][e].sum())
            one = {k: v[e:e + 1, :n] for k, v in batch.items()}
            xs = {}
            hs = [m.register_forward_pre_hook(lambda mod, a, name=name: xs.__setitem__(name, a[0][0].detach()))
                  for name, m in layers.items()]
            with torch.no_grad():
                loss_fn(model, one)
            for h in hs:
                h.remove()
            for name, m in layers.items():
                X = xs[name]  # (n, d_in)
                Ge = grads[name].g[e]  # (d_out, d_in)
                r = ref[name]
                r["sq_in"] = r["sq_in"] + X.pow(2).sum(0)
                r["xtx"] = r["xtx"] + X.T @ X
                r["g_sum"] = r["g_sum"] + Ge
                r["g_sq"] = r["g_sq"] + Ge.pow(2)
                # sum_t a_tj (W^T g_t)_j = sum_i W_ij G_e,ij: a column sum of W * G_e
                r["neuron"] = r["neuron"] + (m.weight.detach() * Ge).sum(0).abs()
    return ref


def test_lm_statistics_equal_per_example_loops_with_padding():
    model = copy.deepcopy(tiny_model(seed=0, dtype=torch.float64))
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_modules())
    layers = {n: named[n] for n in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
                                    "model.layers.2.mlp.up_proj")}
    batches = [_lm_batch([7, 4, 5], seed=1), _lm_batch([6, 6], seed=2)]
    loss_fn = loss_fn_for(model, "mean")
    fast = calibration_stats(model, batches, layers, loss_fn, want=WANT)
    ref = _reference(model, layers, batches, loss_fn)
    for name in layers:
        st, r = fast[name], ref[name]
        assert st.n_seq == 5 and st.n_tok == 7 + 4 + 5 + 12
        for f in ("sq_in", "g_sum", "g_sq", "xtx", "neuron"):
            torch.testing.assert_close(getattr(st, f), r[f], rtol=1e-6, atol=1e-9, msg=f"{name}.{f}")


def test_batch_composition_does_not_change_the_sums():
    # (Llama's eager attention takes its softmax in float32: padded and unpadded rows agree to ~1e-7)
    model = copy.deepcopy(tiny_model(seed=1, dtype=torch.float64))
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_modules())
    layers = {n: named[n] for n in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj")}
    loss_fn = loss_fn_for(model, "mean")
    together = calibration_stats(model, [_lm_batch([5, 8, 3], seed=3)], layers, loss_fn, want=WANT)
    a = _lm_batch([5, 8, 3], seed=3)
    alone = [{k: v[i:i + 1, :n] for k, v in a.items()} for i, n in enumerate((5, 8, 3))]
    parts = [calibration_stats(model, [b], layers, loss_fn, want=WANT) for b in alone]
    merged = merge(parts[0], merge(parts[1], parts[2]))
    for name in layers:
        for f in ("sq_in", "g_sum", "g_sq", "xtx", "neuron"):
            torch.testing.assert_close(getattr(together[name], f), getattr(merged[name], f), rtol=1e-5, atol=1e-7, msg=lambda m, n=name, f=f: f"{n}.{f}: {m}")
    # the forward-only path (no gradient wanted) gives the same activation sums
    fwd = activation_stats(model, [_lm_batch([5, 8, 3], seed=3)], layers, stats=new_stats(layers, ("xtx",)))
    for name in layers:
        torch.testing.assert_close(fwd[name].sq_in, together[name].sq_in, rtol=1e-10, atol=0)
        torch.testing.assert_close(fwd[name].xtx, together[name].xtx, rtol=1e-10, atol=0)
        assert fwd[name].n_seq == 3 and fwd[name].n_tok == 16


def test_one_token_rows_use_the_factorised_square():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, Y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    layers = {"0": net[0], "2": net[2]}

    def losses(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    st = calibration_stats(net, [(X[:4], Y[:4]), (X[4:], Y[4:])], layers, losses, want=("g_sum", "g_sq"))
    for name, m in layers.items():
        per = []
        for i in range(9):
            net.zero_grad()
            losses(net, (X[i:i + 1], Y[i:i + 1]))[0].backward()
            per.append(m.weight.grad.clone())
        per = torch.stack(per)
        torch.testing.assert_close(st[name].g_sq, per.pow(2).sum(0), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(st[name].g_sum, per.sum(0), rtol=1e-10, atol=1e-14)
        assert st[name].n_seq == 9


def test_shards_round_trip_and_flagged_rows_are_not_counted():
    model = copy.deepcopy(tiny_model(seed=0, dtype=torch.float64))
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_modules())
    layers = {"model.layers.0.mlp.down_proj": named["model.layers.0.mlp.down_proj"]}
    batch = _lm_batch([6, 5], seed=4)
    step = backward_step(model, layers, batch, loss_fn_for(model, "mean"), tokens=batch["attention_mask"])
    st = new_stats(layers, ("g_sq",))
    accumulate(st, step.grads, layers, keep=[1])
    assert st["model.layers.0.mlp.down_proj"].n_seq == 1 and st["model.layers.0.mlp.down_proj"].n_tok == 5
    back = from_tensors(to_tensors(st))
    s, b = st["model.layers.0.mlp.down_proj"], back["model.layers.0.mlp.down_proj"]
    assert (b.n_seq, b.n_tok) == (s.n_seq, s.n_tok)
    torch.testing.assert_close(b.g_sq, s.g_sq)
    with pytest.raises(ValueError, match="unknown statistic"):
        new_stats(layers, ("g_cube",))
