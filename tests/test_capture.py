"""The factored engine against the per-example-backward reference, on tiny random Llama/GPT-2/BERT."""

import pytest
import torch

from gradsight.capture import capture, loop_grads
from gradsight.capture.grads import CaptureError, FactoredGrad
from gradsight.inputs.models import select_layers
from gradsight.measures.spectra import METRICS, batch_spectra, spectral_stats

from zoo import PROBLEMS, make_batch, mixed_examples


def _factored(model, layers, batch, loss_fn):
    with capture(model, {li.name: dict(model.named_modules())[li.name] for li in layers}) as tape:
        tape.set_tokens(batch["attention_mask"].bool())
        losses = loss_fn(model, batch)
        losses.sum().backward()
        return tape.grads(), losses.detach()


@pytest.mark.parametrize("arch", sorted(PROBLEMS))
def test_factored_equals_loop_every_statistic(arch):
    factory, loss_fn = PROBLEMS[arch]
    model = factory()
    layers = select_layers(model)
    assert len(layers) >= 8  # every linear layer of both blocks
    batch = make_batch(mixed_examples(n=5, seed=1))
    grads, losses = _factored(model, layers, batch, loss_fn)
    ref, ref_losses = loop_grads(model, {li.name: dict(model.named_modules())[li.name] for li in layers},
                                 batch, loss_fn)
    # Llama upcasts softmax and RMSNorm to float32 internally: float64 agreement is ~1e-9, not 1e-15
    torch.testing.assert_close(losses, ref_losses, rtol=1e-7, atol=1e-12)
    fast = batch_spectra(grads)
    for name, g in grads.items():
        # materialised per-example gradients agree (norm-wise: Llama's float32 RMSNorm/softmax internals
        # leave ~1e-7 relative noise, which tiny entries of a matrix amplify entry-wise)
        M, R = g.materialize(), ref[name].g
        err = (M - R).flatten(1).norm(dim=1) / R.flatten(1).norm(dim=1)
        assert err.max() < 1e-6, (arch, name, err)
        slow = spectral_stats(torch.linalg.svdvals(ref[name].g))
        for metric in METRICS:
            torch.testing.assert_close(fast[name][metric], slow[metric], rtol=1e-5, atol=1e-12,
                                       msg=f"{arch} {name} {metric}")
        torch.testing.assert_close(g.sq_norms(), ref[name].sq_norms(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", sorted(PROBLEMS))
def test_gram_and_dense_routes_agree(arch):
    factory, loss_fn = PROBLEMS[arch]
    model = factory(seed=3)
    layers = select_layers(model)
    grads, _ = _factored(model, layers, make_batch(mixed_examples(n=3, seed=2)), loss_fn)
    g = batch_spectra(grads, route="gram")
    d = batch_spectra(grads, route="dense")
    for name in grads:
        for metric in METRICS:
            torch.testing.assert_close(g[name][metric], d[name][metric], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("arch", sorted(PROBLEMS))
def test_batch_companions_do_not_change_an_example(arch):
    factory, loss_fn = PROBLEMS[arch]
    model = factory(seed=5)
    layers = select_layers(model)
    target = mixed_examples(n=1, seed=7, min_len=9, max_len=10)[0]
    # Gram-route eigenvalues carry a ~1e-8 * sigma_1 floor (float64 eigvalsh of squared values), and
    # Llama/GPT-2/BERT eager attention softmax runs in float32, so invariance holds to ~1e-7 (erank sums p ln p over the floor), not 1e-15.
    alone = batch_spectra(_factored(model, layers, make_batch([target]), loss_fn)[0])
    for companions, pos in [(mixed_examples(n=3, seed=11, min_len=12, max_len=30), 1),
                            (mixed_examples(n=6, seed=12, min_len=3, max_len=6), 0)]:
        exs = companions[:pos] + [target] + companions[pos:]
        stats = batch_spectra(_factored(model, layers, make_batch(exs), loss_fn)[0])
        for name in alone:
            for metric in METRICS:
                torch.testing.assert_close(stats[name][metric][pos], alone[name][metric][0], rtol=1e-6,
                                           atol=1e-12)


def test_rank_one_single_token():
    """METHODS §1 test 1: one supervised token through one linear layer gives a rank-one gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    with capture(lin, {"": lin}) as tape:
        lin(x).pow(2).sum().backward()
        g = tape.grads()[""]
    st = spectral_stats(g.singular_values())
    torch.testing.assert_close(st["nuclear"], st["frobenius"])
    torch.testing.assert_close(st["nuclear"], st["spectral"])
    torch.testing.assert_close(st["sigma1_ratio"], torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(st["erank"], torch.ones(1, dtype=torch.float64))


def test_masking_prompt_labels_do_not_matter():
    """METHODS §1 test 2: prompt tokens' identities matter (context) but not as targets; targets do."""
    factory, loss_fn = PROBLEMS["llama"]
    model = factory()
    ids, m = mixed_examples(n=1, seed=3, min_len=12, max_len=13)[0]
    b1 = make_batch([(ids, m)])
    b2 = make_batch([(ids, [False] * len(ids))])
    b2["target_mask"] = b1["target_mask"].clone()
    l1 = loss_fn(model, b1)
    # changing which prompt positions are (not) targets: all prompt positions are already non-targets
    flipped = list(m)
    first = flipped.index(True)
    flipped[first] = False  # drop one response target: the loss must change
    l3 = loss_fn(model, make_batch([(ids, flipped)]))
    assert not torch.allclose(l1, l3)
    torch.testing.assert_close(l1, loss_fn(model, b2))


def test_hooks_removed_and_flags_restored_on_error():
    factory, loss_fn = PROBLEMS["gpt2"]
    model = factory()
    flags = [p.requires_grad for p in model.parameters()]
    names = [li.name for li in select_layers(model)]
    with pytest.raises(RuntimeError):
        with capture(model, names):
            raise RuntimeError("boom")
    assert [p.requires_grad for p in model.parameters()] == flags
    for _, m in model.named_modules():
        assert not m._forward_hooks


def test_unknown_layer_name_is_clear():
    factory, _ = PROBLEMS["llama"]
    with pytest.raises(CaptureError, match="no module named"):
        with capture(factory(), ["model.layers.9.self_attn.q_proj"]):
            pass


def _rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm.forward without its float32 round trip (the same math in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_func_backend_equals_loop_for_norm_layers(monkeypatch):
    # HF's RMSNorm and eager attention softmax compute in float32 even for a float64 model, so the batched
    # (padded) and the looped (unpadded) backward would agree only to float32 rounding, and how closely depends
    # on the CPU's vector width (seen: equal on one machine, 3e-7 apart on another). Keep both in float64.
    from transformers.models.llama import modeling_llama

    softmax = torch.nn.functional.softmax

    def softmax_keep_float64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax_keep_float64)
    factory, loss_fn = PROBLEMS["llama"]
    model = factory()
    layers = select_layers(model, pattern=r"layernorm$")
    assert layers and all(li.module_type == "LlamaRMSNorm" for li in layers)
    batch = make_batch(mixed_examples(n=4, seed=4))
    mods = {li.name: dict(model.named_modules())[li.name] for li in layers}
    with capture(model, mods) as tape:
        tape.set_tokens(batch["attention_mask"].bool())
        loss_fn(model, batch).sum().backward()
        grads = tape.grads()
    ref, _ = loop_grads(model, mods, batch, loss_fn)
    for name in mods:
        torch.testing.assert_close(grads[name].materialize(), ref[name].g, rtol=1e-8, atol=1e-12)


def test_projection_equals_dense():
    torch.manual_seed(0)
    A = torch.randn(3, 7, 10, dtype=torch.float64)
    G = torch.randn(3, 7, 6, dtype=torch.float64)
    tokens = torch.ones(3, 7, dtype=torch.bool)
    tokens[1, 5:] = False
    fg = FactoredGrad(A, G, tokens)
    P_in, P_out = torch.randn(4, 10, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    M = fg.materialize()
    torch.testing.assert_close(fg.project(P_in, P_out), P_out @ M @ P_in.T)
    torch.testing.assert_close(fg.inner(fg), M.flatten(1) @ M.flatten(1).T)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_example_loss_equals_hf_loss(arch):
    """The gathered-head loss equals the full-logits path and HF's own loss on each example alone."""
    from gradsight.inputs.losses import causal_lm_losses

    factory, _ = PROBLEMS[arch]
    model = factory()
    exs = mixed_examples(n=4, seed=9)
    batch = make_batch(exs)
    fast = causal_lm_losses(model, batch, gather_head=True)
    full = causal_lm_losses(model, batch, gather_head=False)
    torch.testing.assert_close(fast, full, rtol=1e-7, atol=1e-10)
    summed = causal_lm_losses(model, batch, reduction="sum")
    for e, (ids, m) in enumerate(exs):
        x = torch.tensor([ids])
        labels = torch.where(torch.tensor([m]), x, torch.full_like(x, -100))
        hf = model(input_ids=x, labels=labels).loss.double()  # HF upcasts logits to float32 in its loss
        torch.testing.assert_close(fast[e], hf, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(summed[e], hf * sum(m[1:]), rtol=1e-6, atol=1e-8)


def test_factored_grad_finite_flags_real_tokens_only():
    from gradsight.capture.grads import FactoredGrad

    A = torch.randn(4, 5, 3) * 1e30  # large but finite (float32): not flagged
    G = torch.randn(4, 5, 2)
    tokens = torch.ones(4, 5, dtype=torch.bool)
    tokens[3, 4] = False
    A[1, 2, 0] = float("nan")
    G[2, 0, 1] = float("inf")
    A[3, 4, 1] = float("nan")  # at a padded position: ignored
    assert FactoredGrad(A, G, tokens).finite().tolist() == [True, False, False, True]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_per_example_gradients_of_a_plain_pass(reentrant):
    """Checkpointing re-runs forwards inside backward (non-reentrant: the re-run gets no gradient; reentrant:
    the first pass runs without grad): either way the captured per-example gradients are the plain ones."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with capture(seq, ["0", "2"], freeze=False) as tape:
        checkpoint(seq, x, use_reentrant=reentrant).pow(2).sum().backward()
        got = {k: g.materialize() for k, g in tape.grads().items()}
    with capture(seq, ["0", "2"], freeze=False) as tape:
        seq(x).pow(2).sum().backward()
        want = {k: g.materialize() for k, g in tape.grads().items()}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
