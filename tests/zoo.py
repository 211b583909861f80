"""Tiny random test problems as plain data: model factory, batch factory, loss (BackPACK/STYLE habit 2)."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from gradsight.inputs.losses import causal_lm_losses, masked_lm_losses

VOCAB = 97


def tiny_llama(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="eager", tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForMaskedLM(cfg).to(dtype).eval()


PROBLEMS = {
    "llama": (tiny_llama, causal_lm_losses),
    "gpt2": (tiny_gpt2, causal_lm_losses),
    "bert": (tiny_bert, masked_lm_losses),
}


def make_example(length: int, n_prompt: int, seed: int) -> tuple[list[int], list[bool]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
    mask = [j >= n_prompt for j in range(length)]
    return ids, mask


def make_batch(examples, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch from [(ids, target_mask)]."""
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.zeros(B, T, dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        att[i, : len(ids)] = 1
        tgt[i, : len(ids)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": att, "target_mask": tgt}


def mixed_examples(n=4, seed=0, min_len=5, max_len=21):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(min_len, max_len, (1,), generator=g))
        p = int(torch.randint(1, L - 1, (1,), generator=g))
        out.append(make_example(L, p, seed * 1000 + i))
    return out
