"""Shared test fixtures, built fully offline.

Tokenizers
----------
`tiny_tokenizer()` and `tiny_base_tokenizer()` are character-level `transformers` fast tokenizers over printable
ASCII plus the special tokens below (vocab size 106). Encoding a string with `add_special_tokens=True` prepends
`<s>` (like Llama); `decode` concatenates characters, so `decode(encode(s)) == s` for ASCII text. The chat
tokenizer carries a ChatML template that inserts a default system message when the conversation starts with
another role (like SmolLM2's). Both are cached: treat them as read-only.
"""

from __future__ import annotations

import functools
import string
import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>")
DEFAULT_SYSTEM = "You are a helpful assistant."

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _backend():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character (special tokens are matched before pre-tokenization).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def _wrap(chat_template: str | None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = chat_template
    return tok


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """Character-level tokenizer with a ChatML chat template (default system message like SmolLM2)."""
    return _wrap(CHATML_TEMPLATE)


@functools.lru_cache(maxsize=None)
def tiny_base_tokenizer():
    """The same tokenizer without a chat template (a "base model" tokenizer)."""
    return _wrap(None)


def tiny_model(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(dtype).eval()


def external_refs(page: str) -> list[str]:
    """src / href values of a page's tags that point elsewhere (a self-contained page has none)."""
    from html.parser import HTMLParser

    refs: list[str] = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            refs.extend(v for k, v in attrs if k in ("src", "href") and v and "://" in v)

    P().feed(page)
    return refs
