"""Options of `gradsight attribute`."""

from __future__ import annotations

from ...attribution.features import FeatureSpec
from ...attribution.methods import check_method
from ...config import (Batching, EncodeOptions, LayerSelection, RunOptions, check_choices, check_positive, config,
                       group, option)

__all__ = ["AttributionConfig"]


@config
class AttributionConfig:
    """Options of `gradsight attribute` (training features once, then query sets scored against them).

    Per-example losses are token SUMS by default (the sequence negative log-likelihood; kronfluence's and
    TRAK's convention): an example's influence then does not depend on how its loss is averaged.
    """

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    batching: Batching = group(Batching, resume=False)
    queries: str | None = option(None, "query records (.jsonl or a saved dataset), scored against the training "
                                       "data (default: the training records themselves, train x train)")
    features_from: str | None = option(None, "reuse the training features of this attribution run (same model, "
                                             "data, layers and feature options; refused otherwise) and only "
                                             "featurise and score the queries", resume=False)
    methods: tuple[str, ...] = option(("ekfac", "trak", "grad_cos"),
                                      "methods: grad_dot, grad_cos, tracin, raw, kfac, ekfac, trak")
    reduction: str = option("sum", "per-example loss: 'sum' over response tokens (sequence NLL) or 'mean'",
                            choices=("sum", "mean"))
    r_in: int = option(32, "input-side projection per layer (0: full space)", cli="--r-in")
    r_out: int = option(32, "output-side projection per layer (0: full space)", cli="--r-out")
    r_dense: int = option(256, "projection of non-Linear layers' flattened gradients")
    feature_dtype: str = option("float32", "stored feature dtype", choices=("float32", "float16", "float64"))
    damping: float | None = option(None, "damping (relative to each layer's mean eigenvalue unless "
                                         "--damping-mode absolute); default 0.5 for raw, 0.1 for kfac/ekfac, 1 for "
                                         "trak (LDS on digits, benchmarks/ATTRIBUTION.md)")
    damping_mode: str = option("relative", "damping: relative (x mean eigenvalue per layer) or absolute",
                               choices=("relative", "absolute"))
    trak_dim: int = option(2048, "TRAK's whole-model feature size")
    checkpoints: tuple[str, ...] = option((), "earlier checkpoints (model specs) for TracIn / TRAK ensembles; "
                                              "the model itself is the last")
    lrs: tuple[float, ...] = option((), "learning rate at each checkpoint, the model's last (TracIn weights)")
    adam_state: tuple[str, ...] = option((), "LESS: Adam moments per checkpoint (safetensors from "
                                             "gradsight.attribution.save_adam_state; the model's last): the training "
                                             "features become Adam-preconditioned (grad_dot, grad_cos, tracin only)")
    top_k: int = option(10, "proponents and opponents kept per query and method", resume=False)
    per_token: int = option(3, "per-token breakdown over the tokens of each query's top-N proponents (LM; 0: "
                                "off)", resume=False)
    max_dense: int = option(50_000_000, "store the full N_train x N_query score matrix when it has at most this "
                                        "many entries", resume=False)
    block_size: int = option(4096, "training examples scored per block", resume=False)

    def __post_init__(self):
        for m in self.methods:
            check_method(m)
        if not self.methods:
            raise ValueError("--methods is empty")
        check_positive(self, "trak_dim", "r_dense", "block_size", "top_k")
        for name in ("r_in", "r_out", "per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_choices(self)
        if self.adam_state:
            if len(self.adam_state) != len(self.checkpoints) + 1:
                raise ValueError(f"--adam-state needs one file per checkpoint plus the model's: "
                                 f"{len(self.checkpoints) + 1}, got {len(self.adam_state)}")
            other = [m for m in self.methods if m not in ("grad_dot", "grad_cos", "tracin")]
            if other:
                raise ValueError(f"--adam-state (LESS) preconditions first-order features; methods {other} need "
                                 "plain gradients (run them without --adam-state)")

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(r_in=self.r_in or None, r_out=self.r_out or None, r_dense=self.r_dense, seed=self.seed)
