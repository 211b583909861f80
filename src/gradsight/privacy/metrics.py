"""Reconstruction metrics for the gradient-privacy audit: PSNR, Hungarian matching, token-set scores, ROUGE-n.

References:
    - PSNR and matching as breaching (`breaching/analysis/metrics.py`, `analysis.report`): PSNR on the data range
      [0, 1], and at batch size B > 1 the reconstructions are paired with the true images by a linear assignment
      (scipy `linear_sum_assignment`) that minimises the pairwise MSE before any score is averaged.
    - Token scores and ROUGE-n as LAMP (eth-sri/lamp, ROUGE-1/2 with clipped n-gram counts, Lin 2004).

No I/O, no printing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["psnr", "mse_matrix", "match", "matched_psnr", "token_scores", "rouge_n"]


def psnr(x_hat: Tensor, x: Tensor, data_range: float = 1.0, max_db: float = 200.0) -> Tensor:
    """Peak signal-to-noise ratio of each row.

    PSNR_b = 10 log10(range^2 / MSE_b), MSE_b = mean_d (x_hat[b, d] - x[b, d])^2; an exact row (MSE 0) gets
    `max_db`, and every value is capped at `max_db` (so float64 round-off does not give 300+ dB).

    Args:
        x_hat: reconstructions (B, *) (any trailing shape; flattened per row).
        x: true data (B, *), same shape as x_hat.
        data_range: the data range (1.0 for digits / 16).
        max_db: value for MSE = 0 and the cap.

    Returns:
        (B,) float64 PSNR in dB.
    """
    if x_hat.shape != x.shape:
        raise ValueError(f"psnr needs equal shapes, got x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    d = (x_hat.detach().double() - x.detach().double()).reshape(len(x), -1)  # (B, D)
    mse = d.pow(2).mean(1)  # (B,)
    out = torch.full_like(mse, float(max_db))
    pos = mse > 0
    out[pos] = 10.0 * torch.log10(data_range ** 2 / mse[pos])
    return out.clamp(max=float(max_db))


def mse_matrix(x_hat: Tensor, x: Tensor) -> Tensor:
    """Pairwise MSE: M[k, b] = mean_d (x_hat[k, d] - x[b, d])^2 for x_hat (K, D), x (B, D); returns (K, B)."""
    a = x_hat.detach().double().reshape(len(x_hat), -1)  # (K, D)
    b = x.detach().double().reshape(len(x), -1)  # (B, D)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"match needs equal row sizes, got {a.shape[1]} and {b.shape[1]}")
    return (a[:, None, :] - b[None, :, :]).pow(2).mean(-1)  # (K, B)


def match(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Hungarian assignment of reconstructions to true rows minimising the summed MSE.

    min over injective pairings pi of sum_j MSE(x_hat[rows_hat[j]], x[rows_true[j]]), solved by
    scipy.optimize.linear_sum_assignment on the (K, B) MSE matrix. K may differ from B: min(K, B) pairs are
    returned (with K > B the best B candidates are chosen -- the oracle pairing breaching also uses).

    Args:
        x_hat: (K, D) reconstructions; x: (B, D) true rows.

    Returns:
        (rows_hat, rows_true): LongTensors (min(K, B),), rows_true sorted ascending.
    """
    from scipy.optimize import linear_sum_assignment

    if len(x_hat) == 0 or len(x) == 0:
        raise ValueError(f"match needs at least one row on each side, got K={len(x_hat)}, B={len(x)}")
    cost = mse_matrix(x_hat, x).numpy()  # (K, B)
    cost = np.where(np.isfinite(cost), cost, 1e300)  # a diverged candidate is never preferred
    r_hat, r_true = linear_sum_assignment(cost)
    order = np.argsort(r_true)
    return torch.as_tensor(r_hat[order], dtype=torch.long), torch.as_tensor(r_true[order], dtype=torch.long)


def matched_psnr(x_hat: Tensor, x: Tensor, data_range: float = 1.0, max_db: float = 200.0) -> Tensor:
    """PSNR of each matched pair (see `match`); returns (min(K, B),) in the order of the true rows."""
    rh, rt = match(x_hat, x)
    return psnr(x_hat[rh], x[rt], data_range=data_range, max_db=max_db)


def token_scores(pred: Iterable[int], true: Iterable[int]) -> dict:
    """Set precision / recall / F1 of recovered token ids.

    P = |S_pred ∩ S_true| / |S_pred|, R = |S_pred ∩ S_true| / |S_true|, F1 = 2PR / (P + R) (0 when P + R = 0);
    an empty set has precision (or recall) 1 only when both are empty. exact = (S_pred == S_true).

    Returns:
        dict(precision, recall, f1, exact) (floats and a bool).
    """
    p, t = {int(i) for i in pred}, {int(i) for i in true}
    inter = len(p & t)
    prec = inter / len(p) if p else float(not t)
    rec = inter / len(t) if t else float(not p)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "exact": p == t}


def _ngrams(seq: Sequence, n: int) -> Counter:
    s = list(seq)
    return Counter(tuple(s[i:i + n]) for i in range(len(s) - n + 1))


def rouge_n(pred_seq: Sequence, true_seq: Sequence, n: int) -> dict:
    """ROUGE-n with clipped n-gram counts (Lin 2004; LAMP's ROUGE-1/2).

    overlap = sum_g min(count_pred(g), count_true(g)); P = overlap / #pred n-grams, R = overlap / #true n-grams,
    F1 = 2PR / (P + R) (0 when P + R = 0 or a side has no n-gram).

    Args:
        pred_seq, true_seq: token sequences (ids or strings).
        n: n-gram order >= 1.

    Returns:
        dict(precision, recall, f1).
    """
    if n < 1:
        raise ValueError(f"rouge_n needs n >= 1, got n={n}")
    cp, ct = _ngrams(pred_seq, n), _ngrams(true_seq, n)
    overlap = sum(min(c, ct[g]) for g, c in cp.items())
    np_, nt = sum(cp.values()), sum(ct.values())
    prec = overlap / np_ if np_ else 0.0
    rec = overlap / nt if nt else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {"precision": prec, "recall": rec, "f1": f1}
