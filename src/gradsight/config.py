"""Options of every analysis as frozen dataclasses (help text in field metadata; saved in the run).

Fields marked `resume=False` do not change per-example results (batching, progress, summary options) and
may differ when a run is resumed; every other field is part of the run's identity: a rerun into the same
directory with a different value is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from .inputs.data import EncodeOptions

__all__ = ["LayersConfig", "GeometryConfig", "CurvatureConfig", "LandscapeConfig", "SummaryOptions", "semantic_dict",
           "config_hash"]


def _f(default, help: str, resume: bool = True, **kw):
    return field(default=default, metadata={"help": help, "resume": resume}, **kw)


@dataclass(frozen=True)
class SummaryOptions:
    """How groups are compared (recomputed by `gradsight report`; not part of the run's identity)."""

    reference: str | None = _f(None, "reference group for relative differences (default: first group "
                                     "in sorted order)", resume=False)
    n_boot: int = _f(1000, "bootstrap resamples for confidence intervals", resume=False)
    n_perm: int = _f(2000, "label permutations for the group-difference tests", resume=False)
    ci: float = _f(0.95, "confidence level of the bootstrap intervals", resume=False)
    bounds: tuple[int, int] | None = _f(None, "early/middle/late block boundaries for segment MAD "
                                              "(default: the paper's for its depths, else thirds)",
                                        resume=False)

    def __post_init__(self):
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be at least 10, got {self.n_boot}")
        if self.n_perm < 10:
            raise ValueError(f"n_perm must be at least 10, got {self.n_perm}")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")


@dataclass(frozen=True)
class LayersConfig:
    """Options of `gradsight layers` (per-example, per-layer gradient spectra)."""

    model: str = _f("smollm2-135m-instruct", "model: a HF model directory, a .gguf file, or a packaged name")
    data: str = _f("", "data: a .jsonl file or a saved Hugging Face dataset directory")
    split: str = _f("train", "dataset split (HF datasets only)")
    kinds: tuple[str, ...] = _f((), "layer kinds to analyse, e.g. q,k,v,o (default: every linear layer "
                                    "inside the transformer blocks)")
    blocks: str | None = _f(None, "block range, e.g. '0-9', '0:10', '-4:' (default: all)")
    pattern: str | None = _f(None, "regex on module names selecting layers (also non-linear modules, "
                                   "handled by the torch.func backend)")
    exclude: str | None = _f(None, "regex on module names excluding layers")
    encode: EncodeOptions = field(default_factory=EncodeOptions,
                                  metadata={"help": "tokenization and loss options", "resume": True})
    reduction: str = _f("mean", "per-example loss: 'mean' (token-mean, as the papers) or 'sum'")
    dtype: str = _f("float32", "model dtype: float32, float64, bfloat16")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa, eager")
    route: str = _f("auto", "singular values: auto, gram (T x T eigenproblem) or dense (materialise)")
    erank_weights: str = _f("sv", "effective-rank weights: sv (p ~ s, the paper's code) or energy (p ~ s^2)")
    rel_tol: float = _f(0.0, "drop singular values below rel_tol * s1 before ratios (0 keeps all)")
    on_bad: str = _f("error", "bad records: 'error' stops with file:line:field, 'skip' flags and counts them")
    seed: int = _f(0, "seed (bootstrap, permutations, anything random)")
    token_budget: int = _f(4096, "max padded tokens per batch (length-bucketed)", resume=False)
    max_batch: int = _f(32, "max examples per batch", resume=False)
    flush_every: int = _f(4, "write a result shard every N batches (a killed run loses at most these)",
                          resume=False)
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1, ...",
                     resume=False)
    summary: SummaryOptions = field(default_factory=SummaryOptions,
                                    metadata={"help": "group comparison options", "resume": False})

    def __post_init__(self):
        choices = {"reduction": ("mean", "sum"), "route": ("auto", "gram", "dense"),
                   "erank_weights": ("sv", "energy"), "on_bad": ("error", "skip"),
                   "dtype": ("float32", "float64", "bfloat16", "float16"),
                   "attn_implementation": ("sdpa", "eager")}
        for name, allowed in choices.items():
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {v!r}")
        for name in ("token_budget", "max_batch", "flush_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rel_tol < 0:
            raise ValueError(f"rel_tol must be >= 0, got {self.rel_tol}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayersConfig":
        d = dict(d)
        d["kinds"] = tuple(d.get("kinds") or ())
        d["encode"] = EncodeOptions(**d.get("encode", {}))
        s = dict(d.get("summary") or {})
        if s.get("bounds") is not None:
            s["bounds"] = tuple(s["bounds"])
        d["summary"] = SummaryOptions(**s)
        return cls(**d)


def semantic_dict(cfg) -> dict:
    """The fields of a config that define a run's identity (resume=False fields dropped)."""
    out = {}
    for f in fields(cfg):
        if not f.metadata.get("resume", True):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = semantic_dict(v) if hasattr(v, "__dataclass_fields__") else v
    return out


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GeometryConfig(LayersConfig):
    """Options of `gradsight geometry` (gradient features, alignment, entanglement, diversity, noise).

    Loss terms: plain records and named terms use `reduction` (token-mean by default); preference-pair
    sides and rewarded rollouts use the sequence log-probability (sum over response tokens), as the
    entanglement and PSR/NSR analyses are defined for log pi(y|x).
    """

    r_in: int = _f(16, "input-side projection size per layer (features are r_out x r_in per layer)")
    r_out: int = _f(16, "output-side projection size per layer")
    r_dense: int = _f(256, "projection size of dense (torch.func) per-example gradients")
    proj_kind: str = _f("gaussian", "projection entries: gaussian or rademacher")
    r_model: int = _f(512, "size of the whole-model feature (a seeded projection of all layers' features), "
                           "used for G-Vendi and selection")
    feature_dtype: str = _f("float32", "dtype of the stored features: float32 or float16")
    exact: bool = _f(False, "exact mode: cross-example inner products from the factors, no projection "
                            "(small problems; one process)")
    spectra: bool = _f(True, "also compute per-example spectra (effective rank for the score table)")
    target: str | None = _f(None, "label whose mean gradient the score table's cos_target refers to "
                                  "(default: the first label in sorted order)", resume=False)
    threshold: float = _f(0.5, "rollouts with reward > threshold are positive (PSR), the others negative "
                               "(NSR)", resume=False)
    lam: float = _f(0.1, "W-REINFORCE weight of the positive part", resume=False)
    q: float = _f(1.0, "order of the Vendi score (1 = entropy)", resume=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("r_in", "r_out", "r_dense", "r_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.proj_kind not in ("gaussian", "rademacher"):
            raise ValueError(f"proj_kind must be gaussian or rademacher; got {self.proj_kind!r}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"feature_dtype must be float32 or float16; got {self.feature_dtype!r}")
        if self.q < 0:
            raise ValueError(f"q must be >= 0, got {self.q}")

    def projection(self):
        from .measures.projection import ProjectionSpec

        return ProjectionSpec(r_in=self.r_in, r_out=self.r_out, r_dense=self.r_dense, kind=self.proj_kind,
                              seed=self.seed)


OPERATORS = ("hessian", "ggn", "fisher_true", "fisher_mc", "fisher_empirical")
SCOPE_TYPES = ("model", "layer", "kind", "block")


def _csv_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    return tuple(v)


@dataclass(frozen=True)
class CurvatureConfig(LayersConfig):
    """Options of `gradsight curvature` (Hessian / GGN / Fisher spectra, trace, density, stability).

    The objective is the token-mean cross-entropy over ALL supervised tokens of the (capped) data set,
    pooled across examples (`curvature.operators` "rows" convention); `reduction` does not apply. Scopes
    are parameter blocks made of the weights of the selected linear layers: the whole selection ("model"),
    each layer, each kind, each transformer block.
    """

    operator: str = _f("hessian", "curvature matrix: hessian, ggn, fisher_true, fisher_mc, fisher_empirical")
    method: str = _f("double_backward", "product method: double_backward (reverse over reverse; GGN/Fisher: "
                                        "double-vjp) or forward_over_reverse (forward-mode AD)")
    per: tuple[str, ...] = _f(("model", "block"), "scopes: model, layer, kind, block (comma-separated)")
    top_k: int = _f(5, "largest eigenvalues per scope (Lanczos)")
    bottom_k: int = _f(0, "smallest eigenvalues per scope (same Krylov space; 0 = none)")
    tol: float = _f(1e-4, "Lanczos stopping rule: residual <= tol * |eigenvalue| (eigenvalue error ~ tol^2)")
    max_iter: int | None = _f(None, "maximum Lanczos products per scope (default min(dim, max(300, 20 k)))")
    n_products: int = _f(99, "Hutch++ trace budget (products) per scope")
    trace_scopes: tuple[str, ...] = _f(("model", "layer", "kind", "block"), "scope types with a Hutch++ trace")
    density_scopes: tuple[str, ...] = _f(("model",), "scope types with an SLQ spectral density")
    n_probes: int = _f(3, "SLQ probe vectors")
    n_steps: int = _f(60, "SLQ Lanczos steps per probe")
    max_vectors: int | None = _f(None, "SLQ: bound on stored Lanczos vectors (default: all, full "
                                       "re-orthogonalisation)")
    mc_samples: int = _f(1, "fisher_mc: sampled labels per token")
    lr: float | None = _f(None, "learning rate: report the stability numbers lr * lambda_max and lr * trace "
                                "against 2")
    n_examples: int | None = _f(None, "use only the first N usable examples (by record order)")

    def __post_init__(self):
        object.__setattr__(self, "per", _csv_tuple(self.per))
        object.__setattr__(self, "density_scopes", _csv_tuple(self.density_scopes))
        object.__setattr__(self, "trace_scopes", _csv_tuple(self.trace_scopes))
        super().__post_init__()
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"curvature needs dtype float32 or float64 (half-precision products overflow); "
                             f"got {self.dtype!r}")
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {', '.join(OPERATORS)}; got {self.operator!r}")
        if self.method not in ("double_backward", "forward_over_reverse"):
            raise ValueError(f"method must be double_backward or forward_over_reverse; got {self.method!r}")
        for name in ("per", "density_scopes", "trace_scopes"):
            bad = [s for s in getattr(self, name) if s not in SCOPE_TYPES]
            if bad:
                raise ValueError(f"{name}: unknown scope type {bad[0]!r}; expected some of {', '.join(SCOPE_TYPES)}")
        if not self.per:
            raise ValueError("per: choose at least one scope type (model, layer, kind, block)")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.bottom_k < 0:
            raise ValueError(f"bottom_k must be >= 0, got {self.bottom_k}")
        if not (self.tol > 0):
            raise ValueError(f"tol must be > 0, got {self.tol}")
        for name, lo in (("n_products", 3), ("n_probes", 1), ("n_steps", 1), ("mc_samples", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be at least {lo}, got {getattr(self, name)}")
        if self.max_iter is not None and self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.max_vectors is not None and self.max_vectors < 2:
            raise ValueError(f"max_vectors must be at least 2, got {self.max_vectors}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be at least 1, got {self.n_examples}")
        if self.lr is not None:
            import math

            if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
                raise ValueError(f"lr must be a finite learning rate > 0, got {self.lr!r}")

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        for k in ("per", "density_scopes"):
            if k in d:
                d[k] = tuple(d[k] or ())
        return super().from_dict.__func__(cls, d)


@dataclass(frozen=True)
class LandscapeConfig(LayersConfig):
    """Options of `gradsight landscape` (loss along 1-D slices / 2-D grids of the selected layers' weights).

    The loss is the curvature objective (token-mean over all supervised tokens, pooled), evaluated in eval
    mode at theta* + alpha d1 (+ beta d2); non-finite points are recorded as NaN.
    """

    kind: str = _f("random", "directions: random (filter-normalised Gaussian), hessian (top-2 eigenvectors of "
                             "a curvature run, --from-curvature), interpolate (towards --to), pca (principal "
                             "components of --trajectory), gradient (unit gradient; 2-D: plus a random axis)")
    dims: int = _f(2, "1 (slice) or 2 (grid)")
    steps: int = _f(11, "points per axis")
    span: float = _f(1.0, "alpha, beta range: [-span, span] (interpolate: t in [0, 1] widened by span - 1 "
                          "on both sides when span > 1)")
    from_curvature: str | None = _f(None, "curvature run directory holding the eigenvectors (kind hessian)")
    to: str | None = _f(None, "second model for kind interpolate (same architecture)")
    trajectory: tuple[str, ...] = _f((), "kind pca: earlier checkpoints of the model in training order "
                                         "(comma-separated model specs; the model itself is the final point)")
    norm: str = _f("filter", "random direction normalisation: filter, layer, weight, dfilter, dlayer, none")
    n_examples: int | None = _f(None, "use only the first N usable examples (by record order)")

    def __post_init__(self):
        object.__setattr__(self, "trajectory", _csv_tuple(self.trajectory))
        super().__post_init__()
        if self.kind not in ("random", "hessian", "interpolate", "pca", "gradient"):
            raise ValueError(f"kind must be random, hessian, interpolate, pca or gradient; got {self.kind!r}")
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {self.dims}")
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if not (self.span > 0):
            raise ValueError(f"span must be > 0, got {self.span}")
        if self.kind == "hessian" and not self.from_curvature:
            raise ValueError("kind hessian needs --from-curvature RUN (a curvature run with eigenvectors)")
        if self.kind == "interpolate" and not self.to:
            raise ValueError("kind interpolate needs --to MODEL (the other end of the segment)")
        if self.kind == "pca" and not self.trajectory:
            raise ValueError("kind pca needs --trajectory CKPT1,CKPT2,... (earlier checkpoints of the model)")
        if self.norm not in ("filter", "layer", "weight", "dfilter", "dlayer", "none"):
            raise ValueError(f"norm must be filter, layer, weight, dfilter, dlayer or none; got {self.norm!r}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be at least 1, got {self.n_examples}")
