"""Factored per-example gradient math.

For a Linear-like layer the gradient of example e's loss with respect to the weight is

    M_e = G_e^T A_e        A_e: (T_e, d_in) layer inputs, G_e: (T_e, d_out) output gradients,

summed over e's T_e real tokens. Everything here works from the factors, batched over examples with zero
padding (a padded token has A = G = 0 and contributes nothing):

- squared Frobenius norm  ||M_e||_F^2 = sum(K_a * K_g)  (K_a = A A^T, K_g = G G^T, "ghost")     O(T^2 d)
                                     or ||G^T A||_F^2 by materialising                          O(T d_in d_out)
- singular values from the smallest of three symmetric eigenproblems with the same nonzero spectrum sigma^2:
      T x T          S = L^T K_g L,  K_a = L L^T (Cholesky)                  ("gram")
      d_out x d_out  M M^T = G^T K_a G  (or (G^T A)(G^T A)^T)              ("out")
      d_in x d_in    M^T M = A^T K_g A  (or (G^T A)^T (G^T A))             ("in")
  or the reference svdvals(G^T A) ("dense"). See `spectra_costs` for the cost model that picks one per example.
- inner products          <M_e, M_f> = sum((A_e A_f^T) * (G_e G_f^T))
- projections             P_out M_e P_in^T = (P_out G_e^T)(A_e P_in^T)

Precision. The eigenproblems run in float64: a float32 Gram matrix carries a relative error of ~6e-8, which
moves small singular values by ~sqrt(6e-8) * sigma_1 ~ 2e-4 sigma_1 and would spoil nuclear norms. All three
eigen-routes work with squared singular values, so they share one error class: eigenvalues are exact to
~n eps sigma_1^2 (n the problem size), i.e. a singular value sigma_i is exact to ~n eps sigma_1^2 / sigma_i
and numerically zero ones come out at most ~sqrt(n eps) sigma_1 (1e-8 .. 1e-7 sigma_1). Values beyond the
rank bound min(T_e, d_in, d_out) are set to exactly 0. "dense" does not square and is exact to ~eps sigma_1.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = [
    "ROUTES",
    "NORM_ROUTES",
    "gram",
    "factored_sq_norms",
    "factored_inner",
    "factored_singular_values",
    "singular_values",
    "dense_singular_values",
    "eigvalsh",
    "sym_sqrt_factor",
    "project_factored",
    "prefer_gram_route",
    "spectra_costs",
    "norm_costs",
    "choose_routes",
    "via_gram",
    "InputGrams",
]

ROUTES = ("auto", "gram", "out", "in", "dense")  # singular values; "auto" picks the cheapest eigen-route
NORM_ROUTES = ("auto", "ghost", "dense")  # squared norms

# Cost model constants, in multiply-adds of a float64 GEMM (an (m x k)(k x n) product costs m k n). Measured on
# the 2-core CPU of issue 10 (numpy's OpenBLAS, torch 2.x): numpy eigvalsh (syevd, values only) takes the time of
# 2.5-5 n^3 GEMM multiply-adds (n = 128 .. 1536), torch svdvals of an m x n matrix (m <= n) 6-9 m^2 n,
# a Cholesky 0.5-2 n^3.
EIG = 4.0  # n x n symmetric eigenvalues, values only
SVD = 8.0  # m x n singular values, m <= n
SVD32 = 2.0  # the same in float32, in float64 multiply-adds (measured 1.5-2.2 m^2 n for 576 x 576 .. 1536 x 576)
CHOL = 0.5  # n x n Cholesky factor
F32 = 0.55  # a float32 GEMM multiply-add, in float64 ones (measured 0.53-0.57 here; the materialised G^T A of
            # float32 factors is formed in float32, see `singular_values`)
CALL = 1e7  # fixed cost of one batched solve: ~0.5 ms of dispatch and numpy round trips at ~20 GFLOP/s; bounds a chunk's padding


# ----------------------------------------------------------------------------------------------------------
# primitives


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


_BLAS = None  # threadpoolctl's controller of numpy's BLAS, made on first use
ONE_THREAD_BELOW = 400  # eigenproblems of smaller n run numpy's LAPACK on one thread (see `eigvalsh`)


def _one_blas_thread():
    """A context that runs numpy's BLAS/LAPACK on one thread (threadpoolctl)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(user_api="blas")
    return _BLAS.limit(limits=1)


def eigvalsh(S: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a batch of symmetric matrices.

    On CPU through numpy's LAPACK driver: torch 2.13's CPU eigvalsh is 5-10x slower on the same matrices here
    (and up to 30x on rank-deficient ones, which Gram-route and G-Vendi matrices always are). numpy's OpenBLAS
    runs on one thread for matrices below ONE_THREAD_BELOW: its worker threads busy-wait after each call and, on
    few cores, starve torch's threads that run next (measured on 2 cores, 210 layers end to end: 5 x 77 tokens
    13 s -> 9 s, 343 tokens 23 s -> 14 s), while the 576 x 576 problems of long sequences gain from a second
    thread (814 tokens: 34 s with it, 38 s without)."""
    if S.device.type != "cpu" or S.requires_grad:
        return torch.linalg.eigvalsh(S)
    import numpy as np

    with _one_blas_thread() if S.shape[-1] < ONE_THREAD_BELOW else contextlib.nullcontext():
        return torch.from_numpy(np.linalg.eigvalsh(S.detach().numpy())).to(S.dtype)


def _product_dtype(A: torch.Tensor, G: torch.Tensor) -> tuple[bool, torch.dtype]:
    """(single, dtype) of a materialised G^T A: float64 for float64 factors, else float32 (single=True)."""
    if A.dtype == torch.float64 or G.dtype == torch.float64:
        return False, torch.float64
    return True, torch.float32


def _sym_eig_sv(S: torch.Tensor) -> torch.Tensor:
    """Singular values sqrt(max(eig(S), 0)), descending, of a batch of PSD matrices S (B, n, n)."""
    S = 0.5 * (S + S.transpose(-1, -2))
    return eigvalsh(S).clamp_min(0).sqrt().flip(-1)


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


def dense_singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of a batch of materialised gradients (B, m, n), computed in M's
    precision when M is float32 (the materialised gradient of float32 factors: an SVD does not square, so float32
    is as exact as M itself, ~eps sigma_1), else in float64."""
    return torch.linalg.svdvals(M if M.dtype == torch.float32 else M.double()).double()


# ----------------------------------------------------------------------------------------------------------
# cost model


def _variant_costs(T: int, d_in: int, d_out: int, share: int = 1, single: bool = False
                   ) -> dict[tuple[str, str], float]:
    """Multiply-adds of every (route, product) variant for one example of T real tokens (see spectra_costs)."""
    s = max(int(share), 1)
    Ka = T * T * d_in / s  # K_a = A A^T, amortised over the `share` layers reading A
    Kg = T * T * d_out
    M = T * d_in * d_out * (F32 if single else 1.0)  # materialised G^T A (in float32 for float32 factors)
    m, n = min(d_in, d_out), max(d_in, d_out)
    return {
        ("gram", "K"): Ka + CHOL * T**3 / s + Kg + 2 * T**3 + EIG * T**3,
        ("out", "K"): Ka + T * T * d_out + T * d_out**2 + EIG * d_out**3,
        ("out", "M"): M + d_out**2 * d_in + EIG * d_out**3,
        ("in", "K"): Kg + T * T * d_in + T * d_in**2 + EIG * d_in**3,
        ("in", "M"): M + d_in**2 * d_out + EIG * d_in**3,
        ("dense", "M"): M + (SVD32 if single else SVD) * m * m * n,
    }


def spectra_costs(T: int, d_in: int, d_out: int, share: int = 1, single: bool = False) -> dict[str, float]:
    """Estimated cost (float64 GEMM multiply-adds) of one example's singular values by each route.

    For T real tokens, with K_a = A A^T (T^2 d_in, computed once for the `share` layers that read the same
    input, e.g. q/k/v or gate/up, so each pays T^2 d_in / share), K_g = G G^T (T^2 d_out) and M = G^T A
    (T d_in d_out); EIG n^3 for an n x n symmetric eigenproblem (values only), CHOL T^3 for a Cholesky
    (shared like K_a) and SVD m^2 n for svdvals of m x n (m <= n):

        gram   K_a/share + CHOL T^3/share + K_g + L^T K_g L (2 T^3)                        + EIG T^3
        out    min(K_a/share + K_a G (T^2 d_out) + G^T (K_a G) (T d_out^2),  M + M M^T (d_out^2 d_in))
                                                                                          + EIG d_out^3
        in     min(K_g + K_g A (T^2 d_in) + A^T (K_g A) (T d_in^2),          M + M^T M (d_in^2 d_out))
                                                                                          + EIG d_in^3
        dense  M + SVD m^2 n     (the reference; float32 factors: SVD32 m^2 n in float32, then also an "auto"
                                  candidate, as exact as the float32 M)

    EIG = 4, SVD = 8, CHOL = 0.5 are this module's constants (measured; see their comment). The two product
    orders of "out"/"in" give the same matrix; the cheaper one is used. Short sequences (T well below d) pick
    "gram"; long ones (T > min(d_in, d_out)) the d x d problem of the smaller side. single: the factors are
    float32 (or narrower), so M = G^T A is formed in float32 and costs F32 of a float64 product.

    Returns:
        {"gram", "out", "in", "dense": multiply-adds}.
    """
    c = _variant_costs(T, d_in, d_out, share, single)
    return {r: min(v for (rr, _), v in c.items() if rr == r) for r in ("gram", "out", "in", "dense")}


def via_gram(route: str, T: int, d_in: int, d_out: int, share: int = 1, single: bool = False) -> bool:
    """For route "out" / "in": True when its d x d matrix is cheaper through the T x T Gram (G^T K_a G,
    A^T K_g A) than through the materialised M = G^T A (M M^T, M^T M), by the costs of `spectra_costs`."""
    c = _variant_costs(T, d_in, d_out, share, single)
    return c[(route, "K")] <= c[(route, "M")]


def norm_costs(T: int, d_in: int, d_out: int, share: int = 1, single: bool = False) -> dict[str, float]:
    """Estimated multiply-adds of one example's squared Frobenius norm by each route.

        ghost  sum(K_a * K_g):  T^2 d_in / share + T^2 d_out + T^2     (K_a shared like in spectra_costs)
        dense  ||G^T A||_F^2:   T d_in d_out + d_in d_out

    The ghost route wins while roughly T < d_in d_out / (d_in / share + d_out).
    """
    s = max(int(share), 1)
    return {"ghost": T * T * d_in / s + T * T * d_out + T * T,
            "dense": T * d_in * d_out * (F32 if single else 1.0) + d_in * d_out}


def choose_routes(lengths, d_in: int, d_out: int, route: str = "auto", share: int = 1, single: bool = False
                  ) -> list[str]:
    """Per-example singular-value route: `route` itself unless "auto", else the cheapest of gram/out/in (and
    dense for float32 factors, `single`).

    Args:
        lengths: real token counts T_e per example (the padded length plays no part).
        share: number of layers reading the same input (amortises K_a and its Cholesky factor).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    if route != "auto":
        return [route] * len(lengths)
    out = []
    candidates = ("gram", "out", "in", "dense") if single else ("gram", "out", "in")
    for T in lengths:
        c = spectra_costs(int(T), d_in, d_out, share, single)
        out.append(min(candidates, key=c.__getitem__))
    return out


def prefer_gram_route(T: int, d_in: int, d_out: int) -> bool:
    """True when the T x T route is the cheapest singular-value route for T tokens (see `spectra_costs`)."""
    return choose_routes([T], d_in, d_out)[0] == "gram"


def _chunks(rows: list[int], lengths: list[int], cost: Callable[[int], float]) -> list[list[int]]:
    """Split examples into batched solves: longest first, an example joins the current chunk (and is padded to
    its length T_c) while the padding costs no more than a separate call, cost(T_c) - cost(T_e) <= CALL."""
    out: list[list[int]] = []
    Tc = 0
    for e in sorted(rows, key=lambda e: -lengths[e]):
        if out and cost(Tc) - cost(lengths[e]) <= CALL:
            out[-1].append(e)
        else:
            out.append([e])
            Tc = lengths[e]
    return out


# ----------------------------------------------------------------------------------------------------------
# per-example batches: real tokens first, padded per chunk


class _Rows:
    """Real lengths of a padded batch and a gather of any rows' real tokens to the front (zero beyond)."""

    def __init__(self, tokens: torch.Tensor | None, B: int, T: int, device):
        self.B, self.T = B, T
        if tokens is None:
            self.tokens = None
            self.lengths: list[int] = [T] * B
            self.prefix = True
        else:
            self.tokens = tokens.to(device=device, dtype=torch.bool)
            n = self.tokens.sum(1)
            self.lengths = [int(x) for x in n.tolist()]
            self.prefix = bool((self.tokens == (torch.arange(T, device=device) < n.unsqueeze(1))).all())
        self._perm = None

    def short(self, rows: list[int], Tc: int) -> bool:
        """Some row has fewer than Tc real tokens (its chunk needs zero padding)."""
        return any(self.lengths[e] < Tc for e in rows)

    def take(self, X: torch.Tensor, rows: list[int], Tc: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(n, Tc, d) in `dtype`: rows' real tokens in order, zero after each row's length."""
        if self.prefix:
            Xc = X if (Tc == self.T and rows == list(range(self.B))) else X[rows, :Tc]
        else:
            if self._perm is None:  # stable: real tokens first, in their order
                self._perm = torch.argsort((~self.tokens).to(torch.int8), dim=1, stable=True)
            p = self._perm[rows, :Tc]
            Xc = X[rows].gather(1, p.unsqueeze(-1).expand(-1, -1, X.shape[-1]))
        Xc = Xc.to(dtype)
        if not self.short(rows, Tc):
            return Xc
        keep = self.mask(rows, Tc, X.device).unsqueeze(-1)
        return torch.where(keep, Xc, torch.zeros((), dtype=Xc.dtype, device=Xc.device))

    def mask(self, rows: list[int], Tc: int, device) -> torch.Tensor:
        """(n, Tc) bool: True at the real tokens of a gathered chunk."""
        n = torch.tensor([self.lengths[e] for e in rows], device=device)
        return torch.arange(Tc, device=device) < n.unsqueeze(1)


class InputGrams:
    """Per-example K_a = A_e A_e^T and a factor L_e (L_e L_e^T = K_a) of one layer input, computed on demand.

    Layers that read the same input tensor (q/k/v, gate/up) pass one InputGrams so that each example's
    K_a (T_e^2 d_in) and Cholesky factor (T_e^3 / 3) are computed once; `share` (how many layers read the input)
    enters the cost model. Kept as the batched chunks they were computed in (float64, (n, T_c, T_c)) with
    per-example views at the real length T_e, so a chunk asked for again costs nothing and another grouping of
    the examples is assembled from the views. `computed` counts the examples whose K ("K") and L ("L") were
    computed.

    Args:
        A: (B, T, d_in) input (any values at padded tokens: they are masked).
        tokens: (B, T) bool, True at real tokens (None: all real).
        share: number of layers reading A.
    """

    def __init__(self, A: torch.Tensor, tokens: torch.Tensor | None = None, share: int = 1):
        self.A = A
        self.share = max(int(share), 1)
        self.rows = _Rows(tokens, A.shape[0], A.shape[1], A.device)
        self._each: dict[str, dict[int, torch.Tensor]] = {"K": {}, "L": {}}
        self._chunk: dict[tuple, torch.Tensor] = {}
        self.computed = {"K": 0, "L": 0}

    @property
    def lengths(self) -> list[int]:
        return self.rows.lengths

    def check(self, A: torch.Tensor) -> None:
        if A.shape != self.A.shape:
            raise ValueError(f"InputGrams of an input {tuple(self.A.shape)} used for {tuple(A.shape)}")

    def _get(self, kind: str, rows: list[int], Tc: int, compute) -> torch.Tensor:
        key = (kind, tuple(rows), Tc)
        if key in self._chunk:
            return self._chunk[key]
        each = self._each[kind]
        miss = [e for e in rows if e not in each]
        if miss == rows and max(self.lengths[e] for e in rows) == Tc:  # the common case: one computed chunk
            X = compute(rows, Tc)
            self._keep(kind, key, rows, X)
            return X
        if miss:
            Tm = max(self.lengths[e] for e in miss)
            self._keep(kind, (kind, tuple(miss), Tm), miss, compute(miss, Tm))
        out = torch.zeros(len(rows), Tc, Tc, dtype=torch.float64, device=self.A.device)
        for i, e in enumerate(rows):
            n = self.lengths[e]
            out[i, :n, :n] = each[e]
        if kind == "L" and self.rows.short(rows, Tc):  # identity on the padding: blockdiag(L_e, I)
            out = out + torch.diag_embed((~self.rows.mask(rows, Tc, out.device)).to(out.dtype))
        return out

    def _keep(self, kind: str, key: tuple, rows: list[int], X: torch.Tensor) -> None:
        self._chunk[key] = X
        for i, e in enumerate(rows):
            n = self.lengths[e]
            self._each[kind][e] = X[i, :n, :n]
        self.computed[kind] += len(rows)

    def K(self, rows: list[int], Tc: int) -> torch.Tensor:
        """(n, Tc, Tc) float64 K_a of the rows' real tokens (gathered to the front), zero beyond."""
        return self._get("K", rows, Tc, lambda r, t: gram(self.rows.take(self.A, r, t)))

    def L(self, rows: list[int], Tc: int) -> torch.Tensor:
        """(n, Tc, Tc) float64 factors with L L^T = K_a on the real tokens and identity on the padding.

        Cholesky where it succeeds, else (rank-deficient K_a: repeated tokens, T_e > d_in, a zero input) the
        eigen square root U diag(sqrt(max(lam, 0))) of that example's own K_a (T_e x T_e)."""
        return self._get("L", rows, Tc, self._factor)

    def _factor(self, rows: list[int], Tc: int) -> torch.Tensor:
        K = self.K(rows, Tc)
        if self.rows.short(rows, Tc):
            K = K + torch.diag_embed((~self.rows.mask(rows, Tc, K.device)).to(K.dtype))
        L, info = torch.linalg.cholesky_ex(K)
        for i, bad in enumerate(info.tolist()):
            if bad:
                n = self.lengths[rows[i]]
                lam, U = torch.linalg.eigh(K[i, :n, :n])
                L[i] = torch.eye(Tc, dtype=L.dtype, device=L.device)
                L[i, :n, :n] = U * lam.clamp_min(0).sqrt().unsqueeze(-2)
        return L


# ----------------------------------------------------------------------------------------------------------
# singular values and norms, per example by the cheapest route


def factored_singular_values(A: torch.Tensor, G: torch.Tensor, tokens: torch.Tensor | None = None,
                             L_a: torch.Tensor | None = None, K_g: torch.Tensor | None = None) -> torch.Tensor:
    """Exact singular values of M_e = G_e^T A_e for a batch, by the T x T route at the padded length.

    With K_a = A A^T = L L^T, the nonzero eigenvalues of M^T M = A^T G G^T A equal those of the T x T
    symmetric matrix S = L^T K_g L, so sigma = sqrt(eig(S)) (clamped at 0). `singular_values` is the
    per-example version (real lengths, cheapest route); this one solves the whole padded batch at once.

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
    return _sym_eig_sv(L_a.transpose(-1, -2) @ K_g @ L_a)


def _prepare(A, G, tokens, shared):
    """The InputGrams of A (made from `tokens` unless given, and checked against A), and `_product_dtype`."""
    if shared is None:
        shared = InputGrams(A, tokens)
    shared.check(A)
    return (shared, *_product_dtype(A, G))


def singular_values(A: torch.Tensor, G: torch.Tensor, tokens: torch.Tensor | None = None, route: str = "auto",
                    shared: InputGrams | None = None) -> torch.Tensor:
    """Exact singular values of every M_e = G_e^T A_e, each example by its own route at its real length T_e.

    Examples are grouped by route (`choose_routes`: the cheapest of gram / out / in by `spectra_costs` at T_e,
    or the forced `route`) and each group is solved in batched chunks of similar length (`_chunks`), on the
    examples' real tokens only, gathered to the front and zero padded to the chunk's longest (exact: a zero
    token adds nothing to G^T A, K_a or K_g, and the T x T route puts an identity block under it, which adds
    exact zeros to S). Gram matrices, squared products and eigenproblems in float64; a materialised M = G^T A
    of float32 (or narrower) factors is formed in float32 and then squared in float64: it is as exact as the
    factors themselves (by Weyl, an entrywise error of eps |M| moves every singular value by at most
    ~eps sigma_1), while a Gram formed in float32 would move the small ones by ~sqrt(eps) sigma_1.

    Args:
        A: (B, T, d_in) inputs; G: (B, T, d_out) output gradients (any values at padded tokens: masked).
        tokens: (B, T) bool, True at real tokens (None: all real).
        route: one of ROUTES: "auto", "gram" (T x T), "out" (d_out x d_out), "in" (d_in x d_in), "dense"
            (materialise + svdvals, the reference).
        shared: the InputGrams of A, to share K_a and its factor with other layers reading A.

    Returns:
        (B, r) float64, descending, r = min(T, d_in, d_out) for the padded T; entries beyond the rank bound
        min(T_e, d_in, d_out) are exactly 0 (an example without real tokens is all zeros).
    """
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    shared, single, mdt = _prepare(A, G, tokens, shared)
    rows_of, L = shared.rows, shared.lengths
    routes = choose_routes(L, d_in, d_out, route, shared.share, single)
    r = min(T, d_in, d_out)
    out = torch.zeros(B, r, dtype=torch.float64, device=A.device)
    for rt in dict.fromkeys(routes):
        mine = [e for e in range(B) if routes[e] == rt and L[e] > 0]

        def cost(t, rt=rt):
            return spectra_costs(t, d_in, d_out, shared.share, single)[rt]

        for rows in _chunks(mine, L, cost):
            Tc = max(L[e] for e in rows)
            if rt in ("out", "in", "dense") and (rt == "dense" or not via_gram(rt, Tc, d_in, d_out, shared.share,
                                                                                 single)):
                Mc = rows_of.take(G, rows, Tc, mdt).transpose(-1, -2) @ rows_of.take(A, rows, Tc, mdt)
                if rt == "out":  # (n, d_out, d_in)
                    Mc = Mc.double()
                    s = _sym_eig_sv(Mc @ Mc.transpose(-1, -2))
                elif rt == "in":
                    Mc = Mc.double()
                    s = _sym_eig_sv(Mc.transpose(-1, -2) @ Mc)
                else:
                    s = dense_singular_values(Mc)
            else:
                Gc = rows_of.take(G, rows, Tc)
                if rt == "gram":
                    La = shared.L(rows, Tc)
                    s = _sym_eig_sv(La.transpose(-1, -2) @ gram(Gc) @ La)
                elif rt == "out":
                    s = _sym_eig_sv(Gc.transpose(-1, -2) @ (shared.K(rows, Tc) @ Gc))
                else:
                    Ac = rows_of.take(A, rows, Tc)
                    s = _sym_eig_sv(Ac.transpose(-1, -2) @ (gram(Gc) @ Ac))
            k = min(s.shape[-1], r)
            rank = [min(L[e], d_in, d_out) for e in rows]
            s = s[:, :k]
            if min(rank) < k:  # beyond the rank bound: exactly zero
                keep = torch.arange(k, device=s.device) < torch.tensor(rank, device=s.device).unsqueeze(1)
                s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
            out[rows, :k] = s
    return out


def _frobenius_sq(M: torch.Tensor) -> torch.Tensor:
    """(B,) float64 ||M_e||_F^2 of a batch (B, m, n). A float32 M: row norms in float32 (error ~ n eps relative at
    worst, like M's own rounding), squared and summed in float64, ~15x faster than converting M to float64; an
    overflowing float32 row norm (entries beyond ~1e19) falls back to float64."""
    if M.dtype != torch.float32:
        return M.double().pow(2).sum(dim=(-1, -2))
    v = torch.linalg.vector_norm(M, dim=-1).double().square().sum(-1)
    if not torch.isfinite(v).all():
        v = M.double().pow(2).sum(dim=(-1, -2))
    return v


def factored_sq_norms(A: torch.Tensor, G: torch.Tensor, K_a=None, K_g=None, tokens: torch.Tensor | None = None,
                      route: str = "auto", shared: InputGrams | None = None) -> torch.Tensor:
    """Squared Frobenius norms ||G_e^T A_e||_F^2 for a batch of examples, in float64.

    Per example by the cheaper (`norm_costs` at its real length T_e, or the forced `route`) of
    "ghost" sum(K_a * K_g) and "dense" ||G^T A||_F^2 (materialised), in chunks of similar length like
    `singular_values`. With explicit padded Grams K_a / K_g, the ghost formula runs on the whole padded batch
    (the missing Gram computed from A or G, which must then be zero at padded tokens).

    Args:
        A: (B, T, d_in) inputs; G: (B, T, d_out) output gradients (masked by tokens).
        K_a, K_g: optional precomputed Gram matrices (B, T, T).
        tokens: (B, T) bool, True at real tokens (None: all real).
        route: one of NORM_ROUTES ("auto", "ghost", "dense").
        shared: the InputGrams of A (its K_a is reused and kept for the other layers reading A).

    Returns:
        (B,) float64.
    """
    if K_a is not None or K_g is not None:
        K_a = gram(A) if K_a is None else K_a
        K_g = gram(G) if K_g is None else K_g
        return (K_a * K_g).sum(dim=(-1, -2))
    if route not in NORM_ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {NORM_ROUTES}")
    B, _, d_in = A.shape
    d_out = G.shape[-1]
    shared, single, mdt = _prepare(A, G, tokens, shared)
    rows_of, L = shared.rows, shared.lengths
    out = torch.zeros(B, dtype=torch.float64, device=A.device)
    costs = {t: norm_costs(t, d_in, d_out, shared.share, single) for t in set(L)}
    routes = [route if route != "auto" else min(costs[t], key=costs[t].__getitem__) for t in L]
    for rt in ("ghost", "dense"):
        mine = [e for e in range(B) if routes[e] == rt and L[e] > 0]
        for rows in _chunks(mine, L, lambda t, rt=rt: norm_costs(t, d_in, d_out, shared.share, single)[rt]):
            Tc = max(L[e] for e in rows)
            if rt == "ghost":
                v = (shared.K(rows, Tc) * gram(rows_of.take(G, rows, Tc))).sum(dim=(-1, -2))
            else:
                Mc = rows_of.take(G, rows, Tc, mdt).transpose(-1, -2) @ rows_of.take(A, rows, Tc, mdt)
                v = _frobenius_sq(Mc)
            out[rows] = v
    return out


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
