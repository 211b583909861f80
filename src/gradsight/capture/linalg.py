"""Factored per-example gradient math.

For a Linear-like layer the gradient of example e's loss with respect to the weight is

    M_e = G_e^T A_e        A_e: (T, d_in) layer inputs, G_e: (T, d_out) output gradients,

summed over e's tokens. Everything here works from the factors, batched over examples with zero padding
(a padded token has A = G = 0 and contributes nothing):

- squared Frobenius norm  ||M_e||_F^2 = sum((A_e A_e^T) * (G_e G_e^T))                     O(T^2 d)
- singular values         sigma(M_e)^2 = eig(L^T K_g L) with K_a = A A^T = L L^T (Cholesky)  O(T^2 d + T^3)
- inner products          <M_e, M_f> = sum((A_e A_f^T) * (G_e G_f^T))
- projections             P_out M_e P_in^T = (P_out G_e^T)(A_e P_in^T)

The T x T eigenproblems run in float64: a float32 Gram matrix carries a relative error of ~6e-8, which
moves small singular values by ~sqrt(6e-8) * sigma_1 ~ 2e-4 sigma_1 and would spoil nuclear norms.
"""

from __future__ import annotations

import torch

__all__ = [
    "gram",
    "factored_sq_norms",
    "factored_inner",
    "factored_singular_values",
    "dense_singular_values",
    "eigvalsh",
    "project_factored",
    "prefer_gram_route",
]


def gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Batched Gram matrix X Y^T in float64.

    Args:
        X: (B, T, d) tensor.
        Y: (B, S, d) tensor, or None for X itself.

    Returns:
        (B, T, S) float64 tensor.
    """
    X = X.double()
    Y = X if Y is None else Y.double()
    return X @ Y.transpose(-1, -2)


def factored_sq_norms(A: torch.Tensor, G: torch.Tensor, K_a=None, K_g=None) -> torch.Tensor:
    """Squared Frobenius norms ||G_e^T A_e||_F^2 for a batch of examples, in float64.

    Args:
        A: (B, T, d_in) inputs (zero at padded tokens).
        G: (B, T, d_out) output gradients (zero at padded tokens).
        K_a, K_g: optional precomputed Gram matrices (B, T, T).

    Returns:
        (B,) float64.
    """
    K_a = gram(A) if K_a is None else K_a
    K_g = gram(G) if K_g is None else K_g
    return (K_a * K_g).sum(dim=(-1, -2))


def factored_inner(A1, G1, A2, G2) -> torch.Tensor:
    """Inner products <G1_e^T A1_e, G2_f^T A2_f> between every pair of examples of two batches.

    Args:
        A1: (B1, T1, d_in), G1: (B1, T1, d_out), A2: (B2, T2, d_in), G2: (B2, T2, d_out).

    Returns:
        (B1, B2) float64 matrix; with the same batch twice its diagonal equals factored_sq_norms.
    """
    # sum_{t,s} (a1_t . a2_s)(g1_t . g2_s) for every pair (e, f)
    Ka = torch.einsum("etd,fsd->efts", A1.double(), A2.double())  # (B1, B2, T1, T2)
    Kg = torch.einsum("etd,fsd->efts", G1.double(), G2.double())
    return (Ka * Kg).sum(dim=(-1, -2))


def sym_sqrt_factor(K: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """A factor L with L L^T = K for a batch of PSD matrices (B, T, T), float64.

    Cholesky where it succeeds (the common case: T <= d and distinct tokens), else the eigen square root
    U diag(sqrt(max(lam, 0))) for the failing entries. Padded tokens carry an identity block so a padded
    batch stays positive definite; their G rows are zero, so the identity adds only zero singular values.
    """
    if tokens is not None:
        pad = ~tokens  # (B, T)
        K = K + torch.diag_embed(pad.to(K.dtype))
    L, info = torch.linalg.cholesky_ex(K)
    bad = info != 0
    if bool(bad.any()):
        lam, U = torch.linalg.eigh(K[bad])
        L[bad] = U * lam.clamp_min(0).sqrt().unsqueeze(-2)
    return L


def factored_singular_values(A: torch.Tensor, G: torch.Tensor, tokens: torch.Tensor | None = None,
                             L_a: torch.Tensor | None = None, K_g: torch.Tensor | None = None) -> torch.Tensor:
    """Exact singular values of M_e = G_e^T A_e for a batch, by the Gram route.

    With K_a = A A^T = L L^T, the nonzero eigenvalues of M^T M = A^T G G^T A equal those of the T x T
    symmetric matrix S = L^T K_g L, so sigma = sqrt(eig(S)) (clamped at 0).

    Args:
        A: (B, T, d_in); G: (B, T, d_out); zero at padded tokens.
        tokens: (B, T) bool, True at real tokens (None: all real).
        L_a: optional precomputed factor of K_a (shared by layers that read the same input, e.g. q/k/v).
        K_g: optional precomputed K_g.

    Returns:
        (B, T) float64, descending; padded / rank-deficient entries are (numerically) zero.
    """
    if L_a is None:
        L_a = sym_sqrt_factor(gram(A), tokens)
    K_g = gram(G) if K_g is None else K_g
    S = L_a.transpose(-1, -2) @ K_g @ L_a  # (B, T, T)
    S = 0.5 * (S + S.transpose(-1, -2))
    lam = eigvalsh(S)  # ascending
    return lam.clamp_min(0).sqrt().flip(-1)


def eigvalsh(S: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a batch of symmetric matrices.

    On CPU through numpy's LAPACK driver: torch 2.13's CPU eigvalsh is 5-10x slower on the same matrices here
    (and up to 30x on rank-deficient ones, which Gram-route and G-Vendi matrices always are)."""
    if S.device.type != "cpu" or S.requires_grad:
        return torch.linalg.eigvalsh(S)
    import numpy as np

    return torch.from_numpy(np.linalg.eigvalsh(S.detach().numpy())).to(S.dtype)


def dense_singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values of a batch of materialised gradients (B, m, n) in float64, descending."""
    return torch.linalg.svdvals(M.double())


def prefer_gram_route(T: int, d_in: int, d_out: int) -> bool:
    """True when the T x T Gram route is cheaper than materialising (d_out x d_in) and taking svdvals.

    Gram route: ~T^2 (d_in + d_out) + ~4 T^3 flops; dense: T d_in d_out + ~4 m n min(m, n) (svdvals).
    Also the Gram route only makes sense while T <= min(d_in, d_out) + something: beyond that the rank
    is bounded by min(d_in, d_out) and the dense matrix is smaller than the T x T one.
    """
    gram_cost = T * T * (d_in + d_out) + 4 * T**3
    m, n = min(d_in, d_out), max(d_in, d_out)
    dense_cost = T * d_in * d_out + 4 * m * m * n
    return gram_cost <= dense_cost


def project_factored(A: torch.Tensor, G: torch.Tensor, P_in: torch.Tensor, P_out: torch.Tensor) -> torch.Tensor:
    """Kronecker-structured projection P_out (G_e^T A_e) P_in^T without materialising M_e.

    Args:
        A: (B, T, d_in); G: (B, T, d_out); P_in: (r_in, d_in); P_out: (r_out, d_out).

    Returns:
        (B, r_out, r_in) in the dtype of A.
    """
    GP = G @ P_out.T.to(G.dtype)  # (B, T, r_out)
    AP = A @ P_in.T.to(A.dtype)  # (B, T, r_in)
    return GP.transpose(-1, -2) @ AP
