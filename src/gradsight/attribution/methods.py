"""Attribution methods as streaming scorers over stored features: fit on the training set, score in blocks.

Every method scores a training example i against a query q from their per-layer features phi (see
`attribution.features`), one checkpoint k at a time, and combines checkpoints with weights:

    name      per checkpoint k                                      over checkpoints
    grad_dot  <phi_q, phi_i>                                         the last checkpoint only
    grad_cos  <phi_q, phi_i> / (||phi_q|| ||phi_i||)                sum_k eta_k (dattri's TracIn-cos)
    tracin    <phi_q, phi_i>                                         sum_k eta_k  (TracInCP, Pruthi et al. 2020)
    raw       sum_l <(C_l + lambda)^{-1} phi_q,l, phi_i,l>, C = projected Gauss-Newton (LoGra "raw")   mean_k
    kfac      the same with C_l = S (x) A                                                             mean_k
    ekfac     the same with the eigenvalue-corrected K-FAC (Grosse et al. 2023, as kronfluence)       mean_k
    trak      TRAK (Park et al. 2023), below                                                           ensemble

eta_k is checkpoint k's learning rate (captum and dattri use the same weights). Every score is positive when
training on i HELPS q (lowers its loss / raises its margin to first order).

TRAK. With a cross-entropy classifier the model output is the margin f = log(p / (1 - p)), p = the probability
of the true class = exp(-loss), and d f / d theta = -(1 / (1 - p)) d loss / d theta exactly (any number of
classes), so TRAK's after-kernel features follow from the stored loss-gradient features x:
phi_i = -x_i / (1 - p_i), and its weights are Q_i = 1 - p_i. With Phi the (N, k) matrix of the checkpoint's
training features (the whole-model feature, below),

    tau(q, i) = [ (1/M) sum_m phi_q^m (Phi^m' Phi^m + lambda I)^{-1} phi_i^m ] * [ (1/M) sum_m Q_i^m ]

(the two factors averaged separately over the M checkpoints, as traker's finalize_scores and dattri do).
For other losses (`out="loss"`, e.g. a language model's sequence NLL) phi = x and Q = 1.
The whole-model feature concatenates the layers' features when their total size is at most `trak_dim`
(exact: P = I) and otherwise sums per-layer seeded projections to `trak_dim` (Gaussian N(0, 1/k) while the
matrices fit in 2^26 entries, else a CountSketch). lambda defaults to 1 x the mean eigenvalue of Phi'Phi (TRAK's own default is 0, which is singular when N < k,
TRAK issue #24; on digits lambda = 1 x mean gives LDS 0.60 / 0.74 (MLP / LR, TRAK-10) against 0.36 / 0.59 at 0,
benchmarks/ATTRIBUTION.md); with damping 0 a pseudo-inverse drops eigenvalues below 1e-6 x the largest.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .curvature import CurvatureFit, LayerCurvature, sym_eigh
from .features import LayerCovariance

__all__ = ["METHODS", "Block", "Checkpoint", "Scorer", "score_matrix", "check_method"]

METHODS = ("grad_dot", "grad_cos", "tracin", "raw", "kfac", "ekfac", "trak")
CURVATURE = {"raw": "raw", "kfac": "kfac", "ekfac": "ekfac"}
DEFAULT_DAMPING = {"raw": 0.5, "kfac": 0.1, "ekfac": 0.1, "trak": 1.0}
MAX_GAUSSIAN = 2**26
RCOND = 1e-6  # relative cutoff of TRAK's pseudo-inverse


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; expected one of {', '.join(METHODS)}")
    return name


@dataclass
class Block:
    """A block of examples' features of one checkpoint.

    Attributes:
        feats: {layer: (n, k_out, k_in)}.
        losses: (n,) each example's loss (TRAK's p = exp(-loss) for cross-entropy).
        ids: (n,) example ids (unit keys).
    """

    feats: dict[str, torch.Tensor]
    losses: torch.Tensor
    ids: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.losses.shape[0])


@dataclass
class Checkpoint:
    """The training side of one checkpoint: a re-iterable stream of feature blocks, covariances and weight.

    Attributes:
        blocks: ``blocks() -> iterable of Block`` (the training features, in any order; called once per pass).
        covs: {layer: LayerCovariance} (for kfac / ekfac).
        shapes: {layer: (k_out, k_in)}.
        lr: the learning rate eta_k in force at the checkpoint (TracIn / grad_cos weights).
        name: a label.
        fisher: ``fisher() -> iterable of ({layer: (n, k_out, k_in)}, n_examples)``: the pseudo-gradient
            features the curvature is estimated from when it is not the empirical Fisher (sampled labels, the
            GGN's output directions); None: the training features themselves (empirical Fisher).
    """

    blocks: Callable[[], Iterable[Block]]
    covs: Mapping[str, LayerCovariance]
    shapes: Mapping[str, tuple[int, int]]
    lr: float = 1.0
    name: str = "final"
    fisher: Callable[[], Iterable[tuple[dict, int]]] | None = None


def _seed(base: int, name: str) -> int:
    return (base * 1_000_003 + zlib.crc32(f"trak|{name}".encode())) % (2**63 - 1)


class ModelFeature:
    """TRAK's whole-model feature: (n, k) from per-layer features (see the module docstring)."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], dim: int, seed: int = 0):
        self.names = list(shapes)
        self.sizes = {n: s[0] * s[1] for n, s in shapes.items()}
        total = sum(self.sizes.values())
        self.exact = total <= dim
        self.dim = total if self.exact else dim
        self.kind = "exact" if self.exact else ("gaussian" if total * dim <= MAX_GAUSSIAN else "countsketch")
        self.seed = seed
        self._P: dict[str, torch.Tensor] = {}

    def _proj(self, name: str) -> torch.Tensor:
        if name not in self._P:
            g = torch.Generator().manual_seed(_seed(self.seed, name))
            d = self.sizes[name]
            if self.kind == "gaussian":
                self._P[name] = torch.randn(d, self.dim, generator=g, dtype=torch.float64) / self.dim**0.5
            else:  # CountSketch: coordinate j -> bucket h(j) with sign s(j); E<Px, Py> = <x, y>
                h = torch.randint(0, self.dim, (d,), generator=g)
                s = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
                self._P[name] = torch.stack([h.double(), s])
        return self._P[name]

    def __call__(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(n, dim) in the features' own dtype (float32 features: float32 GEMMs)."""
        flats = [feats[n].reshape(feats[n].shape[0], -1) for n in self.names]  # (n, D_l)
        dt = flats[0].dtype
        if self.exact:
            return torch.cat(flats, dim=1)
        out = torch.zeros(flats[0].shape[0], self.dim, dtype=dt)
        for name, X in zip(self.names, flats):
            P = self._proj(name)
            if self.kind == "gaussian":
                out += X.to(dt) @ P.to(dt)
            else:
                out.index_add_(1, P[0].long(), X.to(dt) * P[1].to(dt))
        return out


@dataclass
class _Fitted:
    layers: dict[str, LayerCurvature] = field(default_factory=dict)
    trak: tuple | None = None  # (Q, damped inverse eigenvalues) of Phi' Phi


class Scorer:
    """One attribution method fitted on the training checkpoints, scoring query blocks against train blocks.

        sc = Scorer("ekfac", damping=0.1)
        sc.fit(checkpoints)                              # one pass over the training features where needed
        prep = sc.prepare(query_blocks_per_checkpoint)   # the preconditioned queries (small: M rows)
        for k, ckpt in enumerate(checkpoints):           # then stream the training features
            for b in ckpt.blocks():
                S_part = sc.score(prep, k, b)            # (n, M) contribution of checkpoint k, weighted

    The total score of (i, q) is the sum over checkpoints of `score` (weights applied inside), times the TRAK
    Q-average factor for trak (applied inside too, from `fit`'s per-example Q; see `q_weight`).

    Args:
        method: one of METHODS.
        damping: relative (default) or absolute lambda (see `attribution.curvature`); None: the method's default
            (0.5 relative for raw, 0.1 for kfac / ekfac, 1 for trak; chosen by LDS on digits,
            benchmarks/ATTRIBUTION.md).
        damping_mode: "relative" or "absolute".
        trak_dim: size of TRAK's whole-model feature.
        out: "margin" (cross-entropy classifiers; TRAK's margin and Q = 1 - p) or "loss" (phi = x, Q = 1).
        seed: seed of TRAK's whole-model projection.
    """

    def __init__(self, method: str, damping: float | None = None, damping_mode: str = "relative",
                 trak_dim: int = 2048, out: str = "margin", seed: int = 0):
        self.method = check_method(method)
        self.damping = DEFAULT_DAMPING.get(method, 0.0) if damping is None else float(damping)
        self.damping_mode = damping_mode
        if out not in ("margin", "loss"):
            raise ValueError(f"out must be 'margin' or 'loss', got {out!r}")
        self.out, self.trak_dim, self.seed = out, trak_dim, seed
        self.fitted: list[_Fitted] = []
        self.weights: list[float] = []
        self.q_mean: dict[int, float] = {}  # TRAK: example id -> mean over checkpoints of Q
        self.model_features: dict[int, ModelFeature] = {}  # TRAK: one projection per checkpoint (ensemble member)

    # ---- weights over checkpoints
    def _weights(self, ckpts: Sequence[Checkpoint]) -> list[float]:
        K = len(ckpts)
        if self.method == "grad_dot":
            return [0.0] * (K - 1) + [1.0]
        if self.method in ("tracin", "grad_cos"):
            return [float(c.lr) for c in ckpts]
        return [1.0 / K] * K

    def _p(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(-losses.double()).clamp(max=1 - 1e-12)

    def fit(self, ckpts: Sequence[Checkpoint], reduce: Callable[[dict], dict] | None = None) -> "Scorer":
        """Fit every checkpoint (curvature passes over its training features; TRAK's Phi'Phi and Q).

        Args:
            reduce: optional ``reduce({name: tensor}) -> {name: tensor}`` summing pass statistics across
                processes (torch.distributed all_reduce); None in one process.
        """
        if not ckpts:
            raise ValueError("no checkpoints to fit")
        self.weights = self._weights(ckpts)
        self.fitted = []
        q_sum: dict[int, float] = {}
        for k, ck in enumerate(ckpts):
            f = _Fitted()
            if self.weights[k] == 0.0:
                self.fitted.append(f)
                continue
            if self.method in CURVATURE:
                fit = CurvatureFit(CURVATURE[self.method], ck.covs, ck.shapes)
                if fit.needs_pass:
                    for item in (ck.fisher() if ck.fisher is not None else ((b.feats, b.n) for b in ck.blocks())):
                        fit.update(*(item if isinstance(item, tuple) else (item,)))
                if reduce is not None:
                    fit.load(reduce(fit.state()))
                f.layers = fit.finalize(self.damping, self.damping_mode)
            elif self.method == "trak":
                # each member gets its own projection (as traker and dattri draw one per model): with one shared
                # projection, members that converged to the same weights would add nothing
                mf = self.model_features[k] = ModelFeature(ck.shapes, self.trak_dim, self.seed + 7919 * k)
                H = torch.zeros(mf.dim, mf.dim, dtype=torch.float64)
                n = 0
                for b in ck.blocks():
                    phi = self._trak_phi(b, k)
                    H += (phi.T @ phi).double()
                    n += b.n
                    if self.out == "margin":
                        for i, q in zip(b.ids.tolist(), (1 - self._p(b.losses)).tolist()):
                            q_sum[int(i)] = q_sum.get(int(i), 0.0) + q
                if reduce is not None:
                    H = reduce({"H": H})["H"]
                H = (H + H.T) / 2
                lam = self.damping * float(torch.diagonal(H).mean()) if self.damping_mode == "relative" \
                    else self.damping
                if lam > 0:  # damped: a Cholesky factor (eigh of a k x k matrix costs 5-10x more)
                    L, bad = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], dtype=H.dtype))
                    if int(bad) == 0:
                        f.trak = (None, L, lam)
                        self.fitted.append(f)
                        continue
                w, Q = sym_eigh(H)
                d = w + lam
                # a pseudo-inverse below rcond (float32 features carry ~1e-7 relative noise: eigenvalues under
                # 1e-6 x the largest are noise, and with N < k there are k - N exact zeros)
                inv = torch.where(d > RCOND * max(float(w.max()), 1e-300), 1.0 / d.clamp_min(1e-300),
                                  torch.zeros_like(d))
                f.trak = (Q, inv, lam)
            self.fitted.append(f)
        if self.method == "trak" and self.out == "margin":
            if reduce is not None and q_sum:  # ranks hold disjoint examples: gather by summing id-indexed vectors
                n_max = max(q_sum) + 1
                v = torch.zeros(n_max, dtype=torch.float64)
                v[list(q_sum)] = torch.tensor(list(q_sum.values()), dtype=torch.float64)
                q_sum = {i: float(x) for i, x in enumerate(reduce({"Q": v})["Q"].tolist())}
            self.q_mean = {i: s / len(ckpts) for i, s in q_sum.items()}
        return self

    def _trak_phi(self, b: Block, k: int) -> torch.Tensor:
        x = self.model_features[k](b.feats)  # (n, k)
        if self.out == "margin":  # sign dropped: it cancels in phi_q . phi_i
            x = x / (1 - self._p(b.losses)).unsqueeze(1).to(x.dtype)
        return x

    def prepare(self, queries: Sequence[Block]) -> list:
        """Per checkpoint, the query side ready for dot products with training features (float64)."""
        if len(queries) != len(self.fitted):
            raise ValueError(f"{len(queries)} query feature sets for {len(self.fitted)} checkpoints")
        return [self._prep_one(k, q) for k, q in enumerate(queries)]

    def _prep_one(self, k: int, q: Block) -> dict | None:
        f, w = self.fitted[k], self.weights[k]
        if w == 0.0:
            return None
        if self.method == "trak":
            Q, inv, _ = f.trak
            phi = self._trak_phi(q, k).double()
            if Q is None:  # inv is the Cholesky factor of Phi'Phi + lambda
                return {"__model__": torch.cholesky_solve(phi.T, inv).T}  # (M, k)
            return {"__model__": ((phi @ Q) * inv) @ Q.T}
        if self.method in CURVATURE:
            return {n: f.layers[n].solve(X) for n, X in q.feats.items()}
        if self.method == "grad_cos":
            return _normalised(q.feats)
        return {n: X.double() for n, X in q.feats.items()}

    def self_score(self, k: int, b: Block) -> torch.Tensor:
        """(n,) checkpoint k's weighted self-influence of each example of b: its score against itself (for
        grad_cos the constant 1 x eta_k). Large values flag outliers and mislabeled examples."""
        w = self.weights[k]
        if w == 0.0:
            return torch.zeros(b.n, dtype=torch.float64)
        P = self._prep_one(k, b)
        if self.method == "trak":
            s = (self._trak_phi(b, k).double() * P["__model__"]).sum(1)
            if self.out == "margin":
                s = s * torch.tensor([self.q_mean.get(int(i), 0.0) for i in b.ids.tolist()], dtype=torch.float64)
            return w * s
        feats = _normalised(b.feats) if self.method == "grad_cos" else b.feats
        return w * sum((X.double().reshape(b.n, -1) * P[n].reshape(b.n, -1)).sum(1) for n, X in feats.items())

    def score(self, prep: list, k: int, b: Block, per_layer: bool = False):
        """(n, M) weighted contribution of checkpoint k's training block b (float64); with `per_layer`, also
        {layer: (n, M)} (not for trak). TRAK's Q factor is applied here (its mean over checkpoints)."""
        w = self.weights[k]
        if w == 0.0:
            z = torch.zeros(b.n, _m(prep), dtype=torch.float64)
            return (z, {}) if per_layer else z
        P = prep[k]
        if self.method == "trak":
            S = self._trak_phi(b, k).double() @ P["__model__"].T  # (n, M)
            if self.out == "margin":
                S = S * torch.tensor([self.q_mean.get(int(i), 0.0) for i in b.ids.tolist()],
                                     dtype=torch.float64).unsqueeze(1)
            S = S * w
            return (S, {}) if per_layer else S
        feats = _normalised(b.feats) if self.method == "grad_cos" else b.feats
        parts = {n: w * (X.double().reshape(X.shape[0], -1) @ P[n].reshape(P[n].shape[0], -1).T)
                 for n, X in feats.items()}  # (n, M) per layer
        S = sum(parts.values())
        return (S, parts) if per_layer else S

    def info(self) -> dict:
        """The method's conventions and the damping actually used (absolute, per layer and checkpoint)."""
        out = {"method": self.method, "damping": self.damping, "damping_mode": self.damping_mode,
               "checkpoint_weights": list(self.weights), "out": self.out}
        if self.method in CURVATURE:
            out["layers"] = [{n: lc.info() for n, lc in f.layers.items()} for f in self.fitted]
        if self.method == "trak" and self.model_features:
            mf = next(iter(self.model_features.values()))
            out.update(trak_dim=mf.dim, projection=mf.kind,
                       lambda_abs=[f.trak[2] if f.trak else None for f in self.fitted])
        return out


def _m(prep: list) -> int:
    for p in prep:
        if p:
            return next(iter(p.values())).shape[0]
    return 0


def _normalised(feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Features divided by each example's whole-gradient norm (over all layers)."""
    sq = sum(X.double().reshape(X.shape[0], -1).pow(2).sum(1) for X in feats.values())
    inv = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))  # a zero gradient scores 0
    return {n: X.double() * inv.view(-1, *[1] * (X.dim() - 1)) for n, X in feats.items()}


def score_matrix(method: str, train: Sequence[Checkpoint], queries: Sequence[Block], **options) -> tuple:
    """(N_train, N_query) float64 scores with rows in the order of the training blocks' ids (sorted), and the
    scorer's info. In memory: for small problems and tests (the analysis streams instead)."""
    sc = Scorer(method, **options).fit(train)
    prep = sc.prepare(queries)
    rows: dict[int, torch.Tensor] = {}
    for k, ck in enumerate(train):
        for b in ck.blocks():
            S = sc.score(prep, k, b)
            for j, i in enumerate(b.ids.tolist()):
                rows[int(i)] = rows[int(i)] + S[j] if int(i) in rows else S[j].clone()
    ids = sorted(rows)
    return torch.stack([rows[i] for i in ids]).numpy(), sc.info()
