"""PerExampleClipper (gradsight.privacy.clip): ghost norms and book-keeping clipped sums against materialised
per-example gradients (per_example_grads_loop: one backward per example) and against Opacus 1.6 (C.5.3).

Opacus is a peer: its tests are skipped only when `import opacus` fails AND GRADSIGHT_REQUIRE_PEERS != "1".
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsight.privacy.clip import PerExampleClipper, clip_reference, per_example_grads_loop

from helpers import tiny_model

RTOL = 1e-10


def _opacus():
    try:
        import opacus
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        if os.environ.get("GRADSIGHT_REQUIRE_PEERS") == "1":
            pytest.fail(f"opacus cannot be imported ({e}) and GRADSIGHT_REQUIRE_PEERS=1")
        pytest.skip(f"opacus is not installed ({e})")
    return opacus


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _mlp_batch(B=7, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, generator=g, dtype=dtype)
    x[0] *= 1e6  # a huge-norm example (clipped hard)
    return x, torch.randint(0, 3, (B,), generator=g)


def _close(a, b, rtol=RTOL):
    scale = b.abs().max().clamp_min(1e-300)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


def _ref_norms(ref, B):
    layer = {n: v.reshape(B, -1).double().norm(dim=1) for n, v in ref.items()}
    return layer, torch.stack(list(layer.values()), 1).norm(dim=1)


def _check_all(model, fn, B, C, tokens=None, route="auto"):
    """Norms and clipped sums of PerExampleClipper equal the materialised references."""
    ref = per_example_grads_loop(model, fn, B)
    res = PerExampleClipper(model, C, route=route).step(fn, tokens=tokens)
    layer, total = _ref_norms(ref, B)
    for n in ref:
        _close(res.layer_norms[n], layer[n])
    _close(res.norms, total)
    want = clip_reference(model, fn, B, C)
    for n, p in model.named_parameters():
        _close(p.grad, want[n])
    return res, ref


# ---------------------------------------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("route", ["auto", "ghost", "dense"])
@pytest.mark.parametrize("T", [None, 4])
def test_mlp_norms_and_clipped_sum(route, T):
    """(B, d) inputs (rank-one per example) and (B, T, d) sequences (ghost / dense / auto batched routes)."""
    model = _mlp()
    x, y = _mlp_batch()
    if T is not None:
        x = x.unsqueeze(1) * torch.linspace(0.5, 1.5, T, dtype=x.dtype).view(1, T, 1)  # (B, T, 6)
        x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
        fn = lambda: F.cross_entropy(model(x).transpose(1, 2), y.unsqueeze(1).expand(7, T),  # noqa: E731
                                     reduction="none").mean(1)
    else:
        fn = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    res, _ = _check_all(model, fn, 7, 0.5, route=route)
    assert res.coefs.shape == (7,) and res.coefs[0] < 1e-3  # the huge example is clipped


def test_per_layer_and_clipped_norms_bounded():
    """Per-layer bounds (one per tensor) match the reference; ||c_e g_e|| <= C for every e, flat and per layer."""
    model = _mlp()
    x, y = _mlp_batch()
    fn = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    Cs = {n: 0.05 * (i + 1) for i, (n, _) in enumerate(model.named_parameters())}
    res, ref = _check_all(model, fn, 7, Cs)
    assert res.coefs.shape == (7, len(Cs))
    for i, (n, C) in enumerate(Cs.items()):
        clipped = (res.coefs[:, i].unsqueeze(1) * ref[n].reshape(7, -1)).norm(dim=1)
        assert (clipped <= C).all()
    res = PerExampleClipper(model, 0.3).step(fn)
    _, total = _ref_norms(ref, 7)
    assert (res.coefs * total <= 0.3).all() and total[0] > 1e3


def test_infinite_bound_gives_plain_summed_gradient():
    """C = inf (and no noise): the clipped sum is the plain gradient of the summed loss."""
    model = _mlp()
    x, y = _mlp_batch()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    res = PerExampleClipper(model, float("inf")).step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert (res.coefs == 1).all()
    for n, p in model.named_parameters():
        _close(p.grad, plain[n], 1e-12)


def test_frozen_and_unlisted_parameters_are_skipped():
    model = _mlp()
    x, y = _mlp_batch()
    model[0].weight.requires_grad_(False)
    sentinel = torch.full_like(model[2].bias, 7.0)
    model[2].bias.grad = sentinel.clone()
    fn = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    names = [n for n, p in model.named_parameters() if n != "2.bias"]
    res = PerExampleClipper(model, 0.5, params=names).step(fn)
    assert "0.weight" not in res.layer_norms and "2.bias" not in res.layer_norms
    assert model[0].weight.grad is None and torch.equal(model[2].bias.grad, sentinel)
    assert model[0].weight.requires_grad is False and model[2].weight.requires_grad is True  # flags restored
    ref = per_example_grads_loop(model, fn, 7)
    total = torch.stack([ref[n].reshape(7, -1).norm(dim=1) for n in res.layer_norms], 1).norm(dim=1)
    _close(res.norms, total)


def test_bad_arguments_raise():
    model = _mlp()
    with pytest.raises(ValueError, match="route"):
        PerExampleClipper(model, 1.0, route="fast")
    with pytest.raises(ValueError, match="nope"):
        PerExampleClipper(model, 1.0, params=["nope"])
    x, y = _mlp_batch()
    with pytest.raises(ValueError, match="no bound"):
        PerExampleClipper(model, {"0.weight": 1.0}).step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="> 0"):
        PerExampleClipper(model, -1.0).step(lambda: F.cross_entropy(model(x), y, reduction="none"))


# ---------------------------------------------------------------------------------------------------------- LMs


def _lm_loss(model, ids, mask):
    """(B,) per-example mean next-token loss over real targets."""
    def fn():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        w = mask[:, 1:].double()
        lt = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        return (lt * w).sum(1) / w.sum(1)
    return fn


def _padded(seqs, pad=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def _seqs(n, seed, V=106, lo=3, hi=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _norms_of(model, seqs, C=0.2):
    ids, mask = _padded(seqs)
    return PerExampleClipper(model, C).step(_lm_loss(model, ids, mask), tokens=mask.bool()).norms


def test_tiny_llama_padded_mixed_lengths_and_invariance():
    """Untied tiny Llama (RMSNorm through torch.func): padded batch of mixed lengths equals the loop reference;
    an example's norm is the same alone (no padding) and with other batch companions."""
    model = tiny_model(dtype=torch.float64)
    seqs = _seqs(4, 0)
    ids, mask = _padded(seqs)
    res, _ = _check_all(model, _lm_loss(model, ids, mask), 4, 0.2, tokens=mask.bool())
    short = min(range(4), key=lambda i: len(seqs[i]))
    alone = _norms_of(model, [seqs[short]])
    _close(alone[0], res.norms[short], 1e-9)
    other = _norms_of(model, [seqs[short]] + _seqs(2, 5, lo=12, hi=16))  # longer companions, more padding
    _close(other[0], res.norms[short], 1e-9)


def test_tied_embedding_llama_cross_term():
    """tie_word_embeddings=True: the shared (V, d) tensor's per-example norm includes 2 <embedding, lm_head>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=106, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).double().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = _padded(_seqs(3, 2))
    res, ref = _check_all(model, _lm_loss(model, ids, mask), 3, 0.3, tokens=mask.bool())
    _check_all(model, _lm_loss(model, ids, mask), 3, {n: 0.1 for n in ref}, tokens=mask.bool())


class _Gate(nn.Module):
    """A module with no factored route: two tensor inputs, one parameter."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x, z):
        return torch.tanh(x * self.w) + z


class _Head(nn.Module):
    """Uses another module's weight (tied) functionally: a torch.func site of a shared tensor."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return h @ self.weight.T


class _Odd(nn.Module):
    def __init__(self, V=13, d=5):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(V, d, padding_idx=0).double()
        self.lin = nn.Linear(d, d).double()
        self.gate = _Gate(d)
        self.head = _Head(self.emb.weight)  # embedding weight also at a func site (dense x embedding cross)
        self.head2 = _Head(self.lin.weight)  # Linear weight also at a func site (dense x Linear cross)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, d)
        h = self.lin(torch.tanh(self.lin(h)))  # the same Linear twice: tokens concatenate
        h = self.gate(h, h.roll(1, dims=-1)) + self.head2(h)
        return self.head(h)  # (B, T, V)


def test_embedding_padding_idx_shared_sites_and_fallback_said_once():
    model = _Odd()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 13, (5, 6), generator=g)
    ids[:, 0] = 0  # padding_idx rows get no gradient
    ids[1, 2:] = 3  # repeated ids: the id-equality Gram has off-diagonal terms
    tgt = torch.randint(0, 13, (5, 6), generator=g)
    tokens = torch.rand(5, 6, generator=g) > 0.3  # not a prefix mask: tokens need not be at the front
    tokens[:, 1] = True
    w = tokens.double()
    fn = lambda: (F.cross_entropy(model(ids).transpose(1, 2), tgt, reduction="none") * w).sum(1)  # noqa: E731
    ref = per_example_grads_loop(model, fn, 5)
    said = []
    clipper = PerExampleClipper(model, 0.4, log=said.append)
    for _ in range(2):
        res = clipper.step(fn, tokens=tokens)
    assert len(said) == 1 and "_Gate" in said[0] and "_Head" in said[0]
    layer, total = _ref_norms(ref, 5)
    for n in ref:
        _close(res.layer_norms[n], layer[n])
    want = clip_reference(model, fn, 5, 0.4)
    for n, p in model.named_parameters():
        _close(p.grad, want[n])


# ---------------------------------------------------------------------------------------------------------- Opacus


def _opacus_grads(model, x, y, C, clipping, mode):
    """Opacus' clipped sum p.grad (noise_multiplier 0, loss_reduction "sum") through make_private."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    kw = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
              clipping=clipping, grad_sample_mode=mode, poisson_sampling=False, loss_reduction="sum")
    if mode == "ghost":
        crit = nn.CrossEntropyLoss(reduction="sum")
        gm, dopt, crit, _ = PrivacyEngine().make_private(criterion=crit, **kw)
        dopt.zero_grad()
        crit(gm(x), y).backward()  # two backward passes; p.grad = clipped sum
    else:
        gm, dopt, _ = PrivacyEngine().make_private(**kw)
        dopt.zero_grad()
        F.cross_entropy(gm(x), y, reduction="sum").backward()
        dopt.pre_step()  # clip + accumulate + zero noise; loss_reduction "sum": no scaling
    out = {n: p.grad.detach().clone() for n, p in gm._module.named_parameters()}
    if hasattr(gm, "_close"):
        gm._close()
    return out


@pytest.mark.parametrize("mode,clipping", [("hooks", "flat"), ("hooks", "per_layer"), ("ghost", "flat")])
def test_equals_opacus_clipped_sum(mode, clipping):
    _opacus()
    x, y = _mlp_batch(B=16, dtype=torch.float32)
    x[0] /= 1e4  # large but float32-friendly
    names = [n for n, _ in _mlp().named_parameters()]
    C = [0.2 + 0.1 * i for i in range(len(names))] if clipping == "per_layer" else 1.0
    theirs = _opacus_grads(_mlp(dtype=torch.float32), x, y, C, clipping, mode)
    model = _mlp(dtype=torch.float32)
    bound = dict(zip(names, C)) if clipping == "per_layer" else C
    PerExampleClipper(model, bound).step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    for n, p in model.named_parameters():
        assert (p.grad - theirs[n]).abs().max().item() <= 1e-6, n


def test_gpt2_conv1d_tied_and_position_embeddings():
    """transformers GPT-2: Conv1D weights stored (d_in, d_out), LayerNorm, wte tied to lm_head, wpe positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=1, n_head=2, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask = _padded(_seqs(3, 7, V=60))
    _check_all(model, _lm_loss(model, ids, mask), 3, 0.3, tokens=mask.bool())
