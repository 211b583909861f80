"""What gradsight's own stored artefacts leak (issue 14): factors and projected features.

gradsight stores, per Linear layer and example, either the factors (A_e = layer inputs (T, d_in), G_e = output
gradients (T, d_out)) or the projected feature (measures/projection.py)

    phi_e = P_out G_e^T A_e P_in^T = sum_t (P_out g_t)(P_in a_t)^T       (r_out x r_in),

with P_in, P_out seeded from (spec.seed, layer name), i.e. reproducible by anyone holding the manifest.
  - Factors: A_e IS the data for the first layer; for a Llama block-0 projection a_t = RMSNorm(E[id_t]) * gamma,
    whose direction names the token (`factor_token_recovery`). This is the analytic Linear attack of
    breaching attacks/analytic_attack.py (x = dW_i / db_i) with the division already done.
  - Projected features at one token: phi = (P_out g)(P_in x)^T is rank one; its top right singular vector is
    P_in x up to scale, and x follows by least squares with the seeded P_in (`projected_leak`).
  - Projected features at T tokens: the row space of phi is span{P_in a_t} when r_out >= T (the P_out g_t
    independent), so a candidate token whose P_in a_v lies in the top right singular subspace was present
    (`projected_token_recovery`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..capture.grads import FactoredGrad
from ..measures.projection import ProjectionSpec, Projector

__all__ = ["layer0_candidates", "factor_token_recovery", "recover_input", "projected_leak",
           "projected_token_recovery"]


def _layer0_norm(model: nn.Module) -> nn.Module:
    try:
        return model.model.layers[0].input_layernorm
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no model.layers[0].input_layernorm (a Llama-family "
                         "causal LM is expected)") from None


def layer0_candidates(model: nn.Module) -> torch.Tensor:
    """(V, d) the block-0 q/k/v_proj input each token would produce: RMSNorm(E[v]) * gamma (the norm module
    itself is applied, so eps and gamma are exactly the model's)."""
    E = model.get_input_embeddings().weight.detach()  # (V, d)
    with torch.no_grad():
        return _layer0_norm(model)(E.unsqueeze(0)).squeeze(0)  # (V, d)


def factor_token_recovery(A: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Token ids (T,) behind the stored inputs A (T, d) of a block-0 attention projection (q/k/v_proj).

    a_t = E[id_t] / sqrt(mean(E[id_t]^2) + eps) * gamma, so a_t / gamma is E[id_t] scaled by a positive number:
    id_t = argmax_v cos(a_t / gamma, E[v]) (exact unless two embedding rows are positively collinear).
    """
    if A.dim() != 2:
        raise ValueError(f"A must be (T, d), got shape {tuple(A.shape)}")
    gamma = _layer0_norm(model).weight.detach()  # (d,)
    if bool((gamma == 0).any()):
        raise ValueError("the block-0 RMSNorm weight has zero entries: those input coordinates are lost")
    E = model.get_input_embeddings().weight.detach()  # (V, d)
    u = nn.functional.normalize(A.to(E.dtype) / gamma, dim=-1)  # (T, d)
    return (u @ nn.functional.normalize(E, dim=-1).T).argmax(-1)  # (T,)


def recover_input(feature: torch.Tensor, P_in: torch.Tensor) -> torch.Tensor:
    """x_hat (d_in,) from a rank-one stored feature (r_out, r_in) = (P_out g)(P_in x)^T, up to scale and sign.

    v = top right singular vector of the feature (= P_in x / ||P_in x||, up to sign);
    x_hat = pinv(P_in) v: the least-squares solution when r_in >= d_in (exact: P_in has full column rank), the
    minimum-norm one (the projection of x onto the row space of P_in, rescaled) when r_in < d_in.
    """
    _, _, Vh = torch.linalg.svd(feature.double(), full_matrices=False)
    return torch.linalg.pinv(P_in.double()) @ Vh[0]  # (d_in,)


def projected_leak(x: torch.Tensor, g: torch.Tensor, r_in_sizes, r_out: int = 16, seed: int = 0,
                   name: str = "model.layers.0.self_attn.q_proj", kind: str = "gaussian") -> list[dict]:
    """How much of a one-token input x (d_in,) leaks from gradsight's stored feature of a Linear (B=1, T=1).

    For each r_in the feature is made by `Projector(ProjectionSpec(r_in, r_out, seed=seed, kind=kind))`
    (float64), exactly as a run stores it (the exact branch vec(g x^T) when d_in d_out <= r_in r_out), then
    x_hat = recover_input(feature, P_in). Scores: cosine = |<x_hat, x>| / (||x_hat|| ||x||) (the sign is not
    identifiable) and rel_err = min_s ||s x_hat - x|| / ||x|| with the ORACLE scale s = <x_hat, x> / ||x_hat||^2
    (the rank-one feature fixes only the product of the scales of g and x; for a block-0 input ||x|| = sqrt(d)
    * rms(gamma) is known, which removes it up to sign).

    Returns:
        [dict(r_in, cosine, rel_err, exact_store)] in the order of r_in_sizes.
    """
    x, g = x.double().flatten(), g.double().flatten()
    d_in, d_out = x.numel(), g.numel()
    rows = []
    for r_in in r_in_sizes:
        proj = Projector(ProjectionSpec(r_in=int(r_in), r_out=r_out, seed=seed, kind=kind), dtype=torch.float64)
        fg = FactoredGrad(x.view(1, 1, d_in), g.view(1, 1, d_out), torch.ones(1, 1, dtype=torch.bool))
        exact = proj.is_exact(fg)
        feat = proj.layer_features(name, fg)[0]  # (D,)
        if exact:
            feat, P_in = feat.view(d_out, d_in), torch.eye(d_in, dtype=torch.float64)
        else:
            feat, P_in = feat.view(r_out, int(r_in)), proj.matrix(name, "in", int(r_in), d_in)
        x_hat = recover_input(feat, P_in)
        dot = float(x_hat @ x)
        s = dot / float(x_hat @ x_hat)
        rows.append({"r_in": int(r_in), "cosine": abs(dot) / float(x_hat.norm() * x.norm()),
                     "rel_err": float((s * x_hat - x).norm() / x.norm()), "exact_store": exact})
    return rows


def projected_token_recovery(feature: torch.Tensor, P_in: torch.Tensor, candidate_inputs: torch.Tensor, T: int,
                             *, n_return: int | None = None, threshold: float = 1e-4,
                             rank_rtol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of a T-token example from its stored projected feature (r_out, r_in).

    feature = sum_t (P_out g_t)(P_in a_t)^T, so its row space S (the top-k right singular vectors, k = the
    numerical rank, at most min(T, r_out, r_in)) lies in span{P_in a_t} and equals it when the P_out g_t are
    independent (r_out >= #distinct tokens). Each candidate v with layer input a_v is scored by the relative
    residual of u_v = P_in a_v outside S:

        res_v = ||u_v - V_k V_k^T u_v|| / ||u_v||        (0 for the tokens present; ~sqrt(1 - k/r_in) otherwise)

    When r_in <= k, S is all of R^{r_in} and every residual is 0: nothing is learnt.

    Args:
        feature: (r_out, r_in); P_in: (r_in, d_in) the seeded input projection; candidate_inputs: (V, d_in)
            what each token would feed the layer (`layer0_candidates` for block 0); T: tokens in the example.
        n_return: return the n_return smallest residuals; None: every id with res_v <= threshold.
    Returns:
        (ids LongTensor sorted by residual, residuals (V,) float64).
    """
    if feature.dim() != 2 or feature.shape[1] != P_in.shape[0] or P_in.shape[1] != candidate_inputs.shape[1]:
        raise ValueError(f"shapes do not chain: feature {tuple(feature.shape)}, P_in {tuple(P_in.shape)}, "
                         f"candidates {tuple(candidate_inputs.shape)}")
    _, S, Vh = torch.linalg.svd(feature.double(), full_matrices=False)
    k = min(int((S > S[0] * rank_rtol).sum()) if S[0] > 0 else 0, T)
    Vk = Vh[:k]  # (k, r_in)
    U = candidate_inputs.double() @ P_in.double().T  # (V, r_in)
    res = (U - (U @ Vk.T) @ Vk).norm(dim=1) / U.norm(dim=1).clamp_min(1e-300)  # (V,)
    order = torch.sort(res, stable=True).indices
    ids = order[:n_return] if n_return is not None else order[res[order] <= threshold]
    return ids, res
