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


def test_cached_copy_of_the_gguf_model_is_the_gguf_model(smollm, tmp_path, monkeypatch):
    """The de-quantised copy that `load_model` keeps (safetensors, config, tokenizer) loads the very model the
    GGUF file gives: every weight, the tokenizer, the chat template and the logits; a second load reads the
    copy, and GRADSIGHT_CACHE=off reads the GGUF file."""
    from gradsight.inputs import models

    monkeypatch.setenv("GRADSIGHT_CACHE", str(tmp_path / "cache"))
    d, gguf = models.resolve_model_path("smollm2-135m-instruct")
    cache = models.gguf_cache_dir(d, gguf)
    assert cache.parent == tmp_path / "cache" / "gguf" and not cache.exists()
    cached, tok_c = load_model("smollm2-135m-instruct")  # reads the GGUF file, writes the copy, loads it
    assert (cache / "model.safetensors").exists() and not list(cache.parent.glob("*.tmp-*"))
    monkeypatch.setenv("GRADSIGHT_CACHE", "off")
    assert models.gguf_cache_dir(d, gguf) is None
    direct, tok_d = load_model("smollm2-135m-instruct")
    sd_c, sd_d = cached.state_dict(), direct.state_dict()
    assert sd_c.keys() == sd_d.keys() and all(torch.equal(sd_c[k], sd_d[k]) for k in sd_c)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # tied, as in the GGUF model
    msgs = [{"role": "user", "content": "Ann has 3 apples. How many?"}, {"role": "assistant", "content": "3."}]
    assert tok_c.apply_chat_template(msgs, tokenize=False) == tok_d.apply_chat_template(msgs, tokenize=False)
    text = "Ann has 3 apples; Bob gives her 17 more. ä ß 😀"
    assert tok_c(text)["input_ids"] == tok_d(text)["input_ids"]
    assert (tok_c.pad_token_id, tok_c.eos_token_id) == (tok_d.pad_token_id, tok_d.eos_token_id)
    ids = tok_d(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)
