"""SparseGPT: one-shot pruning with an OBS weight update, per layer (Frantar and Alistarh, ICML 2023).

``sparsegpt`` follows IST-DASLab/sparsegpt ``sparsegpt.py`` ``SparseGPT.fasterprune`` line by line:

    H = (2/N) sum X^T X  (d_in, d_in);  dead = diag(H) == 0 -> H[dead, dead] = 1, W[:, dead] = 0
    H += percdamp * mean(diag H) * I
    U = upper Cholesky factor of H^-1   (cholesky_inverse(cholesky(H)), then cholesky(., upper=True))
    per block of ``blocksize`` columns [i1, i2):
        unstructured: score W1^2 / diag(U1)^2 of the block, ONE selection over the whole (d_out x block)
        N:M: at every column i with i % M == 0, prune per row the N lowest of W1[:, i:i+M]^2 / diag(U1)^2
        for each column i: q = w with the pruned rows zeroed, err = (w - q) / U_ii,
                           W1[:, i:] -= err U[i, i:],   Q1[:, i] = q
        W[:, i1:i2] = Q1;  W[:, i2:] -= Err1 @ U[i1:i2, i2:]   (lazy batch update of the later columns)

Deviations (documented): the unstructured selection prunes exactly int(numel * s) entries per block by a stable
rank (ties in index order), while the reference prunes every entry <= the value at sorted index int(numel * s),
i.e. one more (plus ties); ``exact=False`` reproduces the reference rule. N:M uses a stable sort instead of
torch.topk (same choice except among ties). The caller's W and H are never modified.

``sparsegpt_reference`` is an independent float64 numpy implementation (plain column loop, immediate
full-matrix updates, numpy inverse and Cholesky) used by the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from .masks import check_sparsity, parse_structure

__all__ = ["sparsegpt", "sparsegpt_reference", "hessian_from_xtx"]


def hessian_from_xtx(xtx: torch.Tensor, n_seq: int) -> torch.Tensor:
    """SparseGPT's layer Hessian H = (2 / n_seq) sum_{seq, t} x x^T from LayerStats.xtx.

    The reference's ``nsamples`` counts sequences (inp.shape[0] of a (B, T, d) input). The result of
    ``sparsegpt`` does not depend on this scale (the damping is relative and the update is scale-free).
    """
    if n_seq <= 0:
        raise ValueError(f"n_seq must be positive, got {n_seq}")
    return (2.0 / n_seq) * xtx


def _check(W, H, sparsity, structure, blocksize):
    kind, nm = parse_structure(structure)
    if kind == "unstructured":
        check_sparsity(sparsity)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (d_out, d_in), got shape {tuple(W.shape)}")
    d_in = W.shape[1]
    if tuple(H.shape) != (d_in, d_in):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({d_in}, {d_in}) for W of shape {tuple(W.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if nm is not None:
        n, m = nm
        if d_in % m != 0:
            raise ValueError(f"N:M pruning needs d_in divisible by M; got d_in={d_in}, M={m}")
        if blocksize % m != 0:
            raise ValueError(f"N:M pruning needs blocksize divisible by M; got blocksize={blocksize}, M={m}")
    return nm


def _upper_hinv(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-input handling, damping and the upper Cholesky factor U of H^-1 (H^-1 = U^T U).

    Returns:
        (U (d_in, d_in), dead (d_in,) bool).
    """
    H = H.clone()
    dead = torch.diag(H) == 0  # (d_in,) inputs never active: no curvature
    H[dead, dead] = 1
    idx = torch.arange(H.shape[0])
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the damped Hessian is not positive definite (percdamp={percdamp}); "
                         f"increase percdamp or use more calibration data ({e})") from None
    return U, dead


def _block_mask_unstructured(W1, d2, sparsity, exact):
    """(d_out, count) bool, True = PRUNE: the lowest of W1^2 / diag(U1)^2 over the whole block."""
    tmp = W1 ** 2 / d2[None, :]  # (d_out, count)
    k = int(tmp.numel() * sparsity)
    flat = tmp.reshape(-1)
    if not exact:  # reference rule: everything <= the value at sorted index k
        return tmp <= torch.sort(flat).values[k]
    pr = torch.zeros(flat.shape, dtype=torch.bool)
    if k > 0:
        pr[torch.sort(flat, stable=True).indices[:k]] = True
    return pr.reshape(tmp.shape)


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, structure: str = "unstructured",
              blocksize: int = 128, percdamp: float = 0.01, exact: bool = True, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer with SparseGPT (mask selection and OBS update of the remaining weights).

    Args:
        W: (d_out, d_in) weight (not modified).
        H: (d_in, d_in) layer Hessian (2/N) sum X^T X (``hessian_from_xtx``); any positive scale works.
        sparsity: pruned fraction for "unstructured" (ignored for N:M, where it is N/M).
        structure: "unstructured" or "N:M" (d_in and blocksize divisible by M).
        blocksize: columns per lazy-update block (reference 128).
        percdamp: dampening, a fraction of mean(diag H) added to the diagonal (reference 0.01).
        exact: prune exactly int(numel * s) per block (True) or the reference's "<= k-th value" rule (False).
        dtype: compute dtype; default float64 if W or H is float64, else float32 (the reference's).
    Returns:
        (W_new in W's dtype, keep-mask bool (d_out, d_in)). Dead input columns (H_ii = 0) are zeroed in W_new
        even where the mask keeps them (reference behaviour).
    """
    nm = _check(W, H, sparsity, structure, blocksize)
    dt = dtype or (torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32)
    Wc = W.detach().to(dt).clone()  # (d_out, d_in) updated in place below
    U, dead = _upper_hinv(H.detach().to(dt), percdamp)
    Wc[:, dead] = 0
    d_out, d_in = Wc.shape
    pruned = torch.zeros(d_out, d_in, dtype=torch.bool)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = Wc[:, i1:i2].clone()  # (d_out, count)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]  # (count, count)
        d2 = torch.diag(U1) ** 2  # (count,)
        pr1 = _block_mask_unstructured(W1, d2, sparsity, exact) if nm is None else \
            torch.zeros_like(W1, dtype=torch.bool)
        prf = pr1.to(dt)  # (d_out, count) 1.0 = prune; filled group by group for N:M
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / d2[None, i:i + nm[1]]  # (d_out, M)
                low = torch.sort(tmp, dim=1, stable=True).indices[:, :nm[0]]  # (d_out, N)
                pr1.scatter_(1, i + low, True)
                prf[:, i:i + nm[1]] = pr1[:, i:i + nm[1]].to(dt)
            err = W1[:, i] * prf[:, i] / U1[i, i]  # (d_out,) (w - q) / U_ii, q = w with pruned rows zeroed
            Err1[:, i] = err
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # OBS update of this block's later columns
        Wc[:, i1:i2] = W1.masked_fill_(pr1, 0.0)  # = Q1: kept columns got exactly q = w, pruned -> 0
        Wc[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of all later columns
        pruned[:, i1:i2] = pr1
    return Wc.to(W.dtype), ~pruned


def sparsegpt_reference(W, H, sparsity: float = 0.5, structure: str = "unstructured", blocksize: int = 128,
                        percdamp: float = 0.01, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 numpy SparseGPT: one loop over columns, every update applied to all later columns
    at once (no lazy blocks); masks chosen at the same points (block starts / every M-th column).

    Returns:
        (W_new float64 tensor, keep-mask bool tensor).
    """
    nm = _check(torch.as_tensor(W), torch.as_tensor(H), sparsity, structure, blocksize)
    W = np.array(torch.as_tensor(W).detach().cpu().double().numpy())  # (d_out, d_in) a copy
    H = np.array(torch.as_tensor(H).detach().cpu().double().numpy())  # (d_in, d_in) a copy
    d_out, d_in = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(d_in)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    du2 = np.diag(U) ** 2
    pruned = np.zeros((d_out, d_in), dtype=bool)
    for i in range(d_in):
        if nm is None and i % blocksize == 0:
            j = min(i + blocksize, d_in)
            tmp = W[:, i:j] ** 2 / du2[i:j]
            k = int(tmp.size * sparsity)
            blk = np.zeros(tmp.size, dtype=bool)
            if exact:
                blk[np.argsort(tmp.ravel(), kind="stable")[:k]] = True
            else:
                blk = tmp.ravel() <= np.sort(tmp.ravel())[k]
            pruned[:, i:j] = blk.reshape(tmp.shape)
        if nm is not None and i % nm[1] == 0:
            tmp = W[:, i:i + nm[1]] ** 2 / du2[i:i + nm[1]]
            low = np.argsort(tmp, axis=1, kind="stable")[:, :nm[0]]
            for r in range(d_out):
                pruned[r, i + low[r]] = True
        q = np.where(pruned[:, i], 0.0, W[:, i])
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
        W[:, i] = q
    return torch.from_numpy(W), torch.from_numpy(~pruned)
