"""The packaged SmolLM2-135M-Instruct (real weights, offline): engine vs reference, real chat template."""

from __future__ import annotations

import pytest
import torch

from gradsight.capture import loop_grads
from gradsight.analyses.layers import LayersConfig
from gradsight.analyses.layers.compute import batch_layer_stats
from gradsight.demo.problems import demo_records
from gradsight.inputs.data import EncodeOptions, collate, encode, load_records
from gradsight.inputs.losses import causal_lm_losses
from gradsight.inputs.models import load_model, select_layers
from gradsight.measures.spectra import spectral_stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct")


def test_layer_names_and_kinds(smollm):
    model, _ = smollm
    layers = select_layers(model)
    assert len(layers) == 30 * 7
    assert {li.kind for li in layers} == {"q", "k", "v", "o", "gate", "up", "down"}
    k = next(li for li in layers if li.kind == "k")
    assert (k.d_in, k.d_out) == (576, 192)  # GQA: 3 kv heads x 64
    assert len(select_layers(model, kinds=["q", "v"], blocks="-4:")) == 8


def test_chat_template_boundary_is_exact(smollm):
    _, tok = smollm
    recs, _ = load_records(demo_records(n_problems=2))
    for r in recs:
        e = encode(r, tok, EncodeOptions(max_length=512))
        resp = [t for t, m in zip(e.input_ids, e.target_mask) if m]
        assert tok.decode(resp) == r.response
        assert tok.decode(e.input_ids[: e.n_prompt]).endswith("<|im_start|>assistant\n")


def test_engine_equals_per_example_backward_on_real_model(smollm):
    model, tok = smollm
    layers = select_layers(model, blocks="0,14,29")
    recs, _ = load_records(demo_records(n_problems=2))
    encs = [encode(r, tok, EncodeOptions(max_length=512)) for r in recs[:4]]
    batch = collate(encs, tok.pad_token_id)
    losses, fast, bad = batch_layer_stats(model, layers, batch, lambda m, b: causal_lm_losses(m, b),
                                          LayersConfig())
    assert not bad
    mods = dict(model.named_modules())
    ref, ref_losses = loop_grads(model, {li.name: mods[li.name] for li in layers}, batch, causal_lm_losses)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    worst = 0.0
    for li in layers:
        slow = spectral_stats(torch.linalg.svdvals(ref[li.name].g.double()))
        rel = ((fast[li.name]["nuclear"] - slow["nuclear"]).abs() / slow["nuclear"]).max().item()
        worst = max(worst, rel)
        torch.testing.assert_close(fast[li.name]["sigma1_ratio"], slow["sigma1_ratio"], rtol=1e-3, atol=0)
    assert worst < 1e-4, worst
