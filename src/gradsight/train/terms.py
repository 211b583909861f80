"""Named loss terms for `Monitor.terms`: the terms the seed papers watch, built from a batch's log-probabilities."""

from __future__ import annotations

import torch

__all__ = ["psr_nsr_terms", "dpo_terms"]


def psr_nsr_terms(logps: torch.Tensor, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """The PSR / NSR terms of a rewarded-rollout batch (Zhu et al. 2025): the policy-gradient loss of the
    rollouts with positive advantage and of those with negative advantage, for `Monitor.terms`.

    Args:
        logps: (N,) summed log-probabilities of the rollouts' responses (with grad).
        advantages: (N,) their advantages (or rewards); zero-advantage rollouts belong to neither term.
    """
    a = advantages.detach().to(logps.dtype)
    pos, neg = a > 0, a < 0
    if not bool(pos.any()) or not bool(neg.any()):
        raise ValueError("psr_nsr_terms: the batch needs rollouts with positive and with negative advantage")
    return {"psr": -(a[pos] * logps[pos]).sum(), "nsr": -(a[neg] * logps[neg]).sum()}


def dpo_terms(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The chosen / rejected terms of a preference batch for `Monitor.terms`: the summed log-probabilities of
    the chosen and of the rejected responses. Their gradients' cosine is the gradient entanglement of
    DPO-style training (a DPO step moves along ∇log π(y_w) − ∇log π(y_l); when the two are aligned, pushing
    the rejected response down also pushes the chosen one down)."""
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"dpo_terms: chosen {tuple(chosen_logps.shape)} and rejected "
                         f"{tuple(rejected_logps.shape)} log-probabilities must pair up")
    return {"chosen": chosen_logps.sum(), "rejected": rejected_logps.sum()}
