"""Sequential LM pruning driver, perplexity, safe saving and the shipped text samples (gradsight.importance).

Every check compares with an independent computation on the tiny float64 Llama of tests/helpers.py: hooks on the
dense model and a numpy stable sort (Wanda's rule), a hand loop over positions (perplexity), a manual forward
through the pruned block 0 (sequential inputs), a fresh transformers reload (saving).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import tiny_model, tiny_tokenizer

from gradsight.importance.evaluate import (PrunedModelError, apply_masks, check_finite, perplexity, save_pruned,
                                           sparsity_of)
from gradsight.importance.sequential import block_linears, prune_oneshot, prune_sequential
from gradsight.importance.sparsegpt import sparsegpt
from gradsight.importance.text import sample_text, token_windows

T = 32  # tokens per window (character-level tokenizer)


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=0, dtype=torch.float64)  # cached elsewhere too: only ever deep-copied here


@pytest.fixture(scope="module")
def cal():
    return token_windows(tiny_tokenizer(), sample_text("calibration"), T, n=8, seed=0)  # (8, T)


@pytest.fixture(scope="module")
def ev():
    return token_windows(tiny_tokenizer(), sample_text("heldout"), T, n=6)  # (6, T)


def one_block(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:1]
    m.config.num_hidden_layers = 1
    return m


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def hooked_inputs(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block Linear's inputs (N*T, d_in) from one plain forward of the (dense) model."""
    xs: dict[str, list[torch.Tensor]] = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: xs.setdefault(n, []).append(a[0].detach()))
          for n, m in linears(model).items()]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hs:
        h.remove()
    return {n: torch.cat(v).reshape(-1, v[0].shape[-1]) for n, v in xs.items()}


def row_rule(score: np.ndarray, s: float) -> np.ndarray:
    """Reference per-row rule: prune the floor(s*d_in) lowest of each row, ties in index order."""
    keep = np.ones(score.shape, dtype=bool)
    k = int(s * score.shape[1])
    for i, row in enumerate(score):
        keep[i, np.argsort(row, kind="stable")[:k]] = False
    return keep


def test_wanda_one_block_matches_hooked_reference(base, cal):
    dense = one_block(base)
    X = hooked_inputs(dense, cal)
    pruned = copy.deepcopy(dense)
    df = prune_sequential(pruned, cal, "wanda", sparsity=0.5, batch_size=3)  # 3 batches: 3 + 3 + 2
    assert len(df) == 7 and set(df.layer) == set(X)
    named = dict(pruned.named_modules())
    for name, x in X.items():
        W = dict(dense.named_modules())[name].weight.detach().numpy()
        act = np.sqrt((x.numpy() ** 2).sum(0) / cal.shape[0])  # ||X_j|| / sqrt(N_seq)
        keep = row_rule(np.abs(W) * act[None, :], 0.5)
        np.testing.assert_array_equal(named[name].weight.detach().numpy(), W * keep)
        # recon_err from the same inputs by hand
        D = W - W * keep
        want = ((x.numpy() @ D.T) ** 2).sum() / ((x.numpy() @ W.T) ** 2).sum()
        got = float(df.set_index("layer").loc[name, "recon_err"])
        assert got == pytest.approx(want, rel=1e-9)


def test_sparsegpt_one_block_uses_reference_hessian(base, cal):
    dense = one_block(base)
    X = hooked_inputs(dense, cal)
    pruned = copy.deepcopy(dense)
    prune_sequential(pruned, cal, "sparsegpt", structure="2:4", batch_size=3)
    named, dn = dict(pruned.named_modules()), dict(dense.named_modules())
    for name, x in X.items():
        H = (2.0 / cal.shape[0]) * x.T @ x  # SparseGPT: (2 / N_seq) sum x x^T
        W_ref, _ = sparsegpt(dn[name].weight.detach(), H, structure="2:4")
        torch.testing.assert_close(named[name].weight.detach(), W_ref, rtol=1e-9, atol=1e-12)


def test_gblm_zero_gradient_is_wanda_and_fisher_rule(base, cal):
    g0 = {n: torch.zeros_like(m.weight) for n, m in linears(base).items()}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    prune_sequential(a, cal, "wanda")
    prune_sequential(b, cal, "gblm", g_sq=g0)
    for (n, p), q in zip(linears(a).items(), linears(b).values()):
        assert torch.equal(p.weight, q.weight), n
    g = {n: torch.rand_like(m.weight) for n, m in linears(base).items()}
    f = copy.deepcopy(base)
    prune_sequential(f, cal, "fisher", g_sq=g)
    for n, m in linears(f).items():
        W = linears(base)[n].weight.detach().numpy()
        keep = row_rule(0.5 * g[n].numpy() / cal.shape[0] * W ** 2, 0.5)
        np.testing.assert_array_equal(m.weight.detach().numpy(), W * keep)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_achieved_sparsity_exact(base, cal, method, structure):
    m = copy.deepcopy(base)
    df = prune_sequential(m, cal, method, structure=structure, sparsity=0.5)
    assert len(df) == 21 and (df.sparsity == 0.5).all() and (df.sparsity_target == 0.5).all()
    for name, lin in linears(m).items():
        Z = (lin.weight == 0)
        if structure == "2:4":
            assert (Z.reshape(Z.shape[0], -1, 4).sum(-1) == 2).all(), name  # every group of 4 loses exactly 2
        elif method in ("magnitude", "sparsegpt"):  # per tensor (SparseGPT: per 128-column block, d_in <= 48)
            assert int(Z.sum()) == Z.numel() // 2, name
        else:
            assert (Z.sum(1) == Z.shape[1] // 2).all(), name  # per row
    sp = sparsity_of(m, list(linears(m)))
    assert sp["overall"] == 0.5 and sp["n_zero"] * 2 == sp["n"]


def test_block1_is_calibrated_on_pruned_block0(base, cal):
    m = copy.deepcopy(base)
    seen: list[torch.Tensor] = []
    h = m.model.layers[1].register_forward_pre_hook(
        lambda mod, args, kw: seen.append((args[0] if args else kw["hidden_states"]).detach().clone()),
        with_kwargs=True)
    prune_sequential(m, cal, "wanda", batch_size=4)
    h.remove()
    first_pass = torch.cat(seen[:2])  # block 1's calibration pass: 2 batches of 4
    with torch.no_grad():
        pruned_h1 = m(input_ids=cal, output_hidden_states=True).hidden_states[1]  # pruned block 0's outputs
        dense_h1 = base(input_ids=cal, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(first_pass, pruned_h1, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first_pass, dense_h1, atol=1e-6)  # the dense outputs would be wrong


def test_perplexity_matches_hand_loop(base, ev):
    got = perplexity(base, ev, batch_size=4)
    total, n = 0.0, 0
    with torch.no_grad():
        for w in ev:
            logits = base(input_ids=w[None]).logits[0]  # (T, V)
            for t in range(len(w) - 1):
                total -= float(torch.log_softmax(logits[t], -1)[w[t + 1]])
                n += 1
    assert got["n_tokens"] == n == ev.shape[0] * (T - 1)
    assert got["nll"] == pytest.approx(total / n, rel=1e-10)
    assert got["ppl"] == pytest.approx(math.exp(total / n), rel=1e-10)


def test_check_finite_and_save_refuse_nan(base, ev, tmp_path):
    m = copy.deepcopy(base)
    check_finite(m, ev)  # dense is fine
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(PrunedModelError, match="NaN or infinite"):
        check_finite(m, ev)
    with pytest.raises(PrunedModelError):
        save_pruned(m, tiny_tokenizer(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


def test_save_pruned_round_trip(base, cal, tmp_path):
    from transformers import AutoModelForCausalLM

    m = copy.deepcopy(base)
    prune_sequential(m, cal, "wanda", structure="2:4")
    out = save_pruned(m, tiny_tokenizer(), tmp_path / "pruned")
    back = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float64)
    sd = back.state_dict()
    for name, t in m.state_dict().items():
        assert torch.equal(sd[name], t), name
    for name, lin in linears(back).items():
        assert float((lin.weight == 0).double().mean()) == 0.5, name
    assert (out / "tokenizer_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temp dir left
    with pytest.raises(FileExistsError):
        save_pruned(m, tiny_tokenizer(), out)


def test_apply_masks_and_oneshot(base):
    m = copy.deepcopy(base)
    name = "model.layers.2.mlp.up_proj"
    W = dict(m.named_modules())[name].weight.detach().clone()
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    apply_masks(m, {name: mask})
    assert torch.equal(dict(m.named_modules())[name].weight, W * mask)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_masks(m, {name: mask.double()})
    m2 = copy.deepcopy(base)
    df = prune_oneshot(m2, {name: W.abs()}, "unstructured", 0.25, group="row")
    keep = row_rule(W.abs().numpy(), 0.25)
    np.testing.assert_array_equal(dict(m2.named_modules())[name].weight.detach().numpy(), W.numpy() * keep)
    assert df.block.tolist() == [2] and df.sparsity.tolist() == [0.25]


def test_bad_arguments(base, cal):
    m = copy.deepcopy(base)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_sequential(m, cal, "random")
    with pytest.raises(ValueError, match="needs g_sq"):
        prune_sequential(m, cal, "gblm")
    with pytest.raises(ValueError, match="not an nn.Linear inside a decoder block"):
        prune_sequential(m, cal, "wanda", layers=["lm_head"])
    with pytest.raises(ValueError, match="open interval"):
        prune_sequential(m, cal, "wanda", sparsity=1.0)
    per = block_linears(m, ["model.layers.1.self_attn.q_proj"])
    assert per == [[], ["model.layers.1.self_attn.q_proj"], []]


def test_token_windows():
    tok = tiny_tokenizer()
    text = sample_text("heldout")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    ev = token_windows(tok, text, 64)
    assert ev.shape == (len(ids) // 64, 64) and ev.dtype == torch.long
    assert torch.equal(ev.reshape(-1), ids[: ev.numel()])  # consecutive, non-overlapping
    assert token_windows(tok, text, 64, n=5).shape == (5, 64)
    a, b = token_windows(tok, text, 64, n=7, seed=0), token_windows(tok, text, 64, n=7, seed=0)
    assert a.shape == (7, 64) and torch.equal(a, b)
    assert not torch.equal(a, token_windows(tok, text, 64, n=7, seed=1))
    stream = ids.tolist()
    for w in a.tolist():  # every random window is a contiguous slice of the text
        assert any(stream[i:i + 64] == w for i in range(len(stream) - 63))
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, "short text", 64)
    with pytest.raises(ValueError, match="need the number of windows"):
        token_windows(tok, text, 64, seed=0)


def test_heldout_and_calibration_share_no_window():
    tok = tiny_tokenizer()
    cal_text, ev_text = sample_text("calibration"), sample_text("heldout")
    assert 35_000 < len(cal_text) < 45_000 and 35_000 < len(ev_text) < 45_000
    c = tok(cal_text, add_special_tokens=False)["input_ids"]
    grams = {tuple(c[i:i + 64]) for i in range(len(c) - 63)}  # every 64-token window of the calibration text
    held = token_windows(tok, ev_text, 64)
    assert not any(tuple(w) in grams for w in held.tolist())
    cal_rand = token_windows(tok, cal_text, 64, n=32, seed=0)
    assert all(tuple(w) in grams for w in cal_rand.tolist())  # sanity: the check can see a shared window
