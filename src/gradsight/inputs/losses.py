"""Per-example losses for batched, right-padded language-model inputs.

Convention: the loss of example e is the token-mean (reduction="mean", the papers' choice) or the sum
(reduction="sum") of -log p(token_j | tokens_<j) over e's supervised targets j (target_mask[e, j]).
The batch objective that capture backpropagates is the SUM over examples of these losses, so every
example's gradient is the gradient of its own loss.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["causal_lm_losses", "masked_lm_losses", "loss_fn_for", "loss_block"]

# Causal LMs whose forward is exactly `lm_head(base_model(...))` (no logit scaling or soft-capping):
# for these the head is applied only at supervised positions, which skips most of the vocabulary GEMM.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo", "olmo2", "gpt_neox"}


def _reduce(tok_loss: torch.Tensor, rows: torch.Tensor, B: int, reduction: str) -> torch.Tensor:
    total = torch.zeros(B, dtype=tok_loss.dtype, device=tok_loss.device).index_add(0, rows, tok_loss)
    if reduction == "sum":
        return total
    if reduction == "mean":
        count = torch.bincount(rows, minlength=B).to(tok_loss.dtype)
        return total / count  # NaN (0/0) for an example with no target: callers skip those first
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def plain_head(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _PLAIN_HEAD:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    return base, head


def causal_lm_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean",
                     gather_head: bool = True) -> torch.Tensor:
    """(B,) per-example next-token losses over the supervised targets.

    Args:
        model: a Hugging Face causal LM (or any module returning `.logits` (B, T, V)).
        batch: input_ids (B, T), attention_mask (B, T), target_mask (B, T) bool (True at supervised
            target tokens; position 0 is never a target).
        reduction: "mean" (token-mean per example) or "sum".
        gather_head: apply the LM head only at the positions that predict a target (exact, cheaper).
    """
    ids, att, tgt = batch["input_ids"], batch["attention_mask"], batch["target_mask"].bool()
    B = ids.shape[0]
    pred = tgt[:, 1:]  # (B, T-1): position j-1 predicts target j
    rows, cols = pred.nonzero(as_tuple=True)
    labels = ids[:, 1:][rows, cols]
    plain = plain_head(model) if gather_head else None
    if plain is not None:
        base, head = plain
        h = base(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, d)
        logits = head(h[rows, cols])  # (N, V)
    else:
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1][rows, cols]  # (N, V)
    tok = F.cross_entropy(upcast(logits), labels, reduction="none")  # (N,)
    return _reduce(tok, rows, B, reduction)


def masked_lm_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """(B,) per-example losses of an encoder with an LM head, predicting each target token at its own
    position (BERT-style; the inputs are not masked, which is fine for gradient statistics)."""
    ids, att, tgt = batch["input_ids"], batch["attention_mask"], batch["target_mask"].bool()
    rows, cols = tgt.nonzero(as_tuple=True)
    logits = model(input_ids=ids, attention_mask=att).logits[rows, cols]
    tok = F.cross_entropy(upcast(logits), ids[rows, cols], reduction="none")
    return _reduce(tok, rows, ids.shape[0], reduction)


def loss_fn_for(model: nn.Module, reduction: str = "mean"):
    """The per-example loss function suited to `model` (causal LM unless the config says encoder)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and not getattr(cfg, "is_decoder", False) and getattr(cfg, "model_type", "") in {
            "bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2"}:
        return lambda m, b: masked_lm_losses(m, b, reduction)
    return lambda m, b: causal_lm_losses(m, b, reduction)


def loss_block(cfg) -> dict:
    """The manifest's "loss" block of a per-example LM analysis (layers, geometry): how each example's loss is
    defined and computed."""
    return {"reduction": cfg.reduction, "loss_on": cfg.loss_on, "mode": "eval", "dtype": cfg.dtype,
            "stat_dtype": "float64"}
