"""Options of `gradsight geometry`."""

from __future__ import annotations

from dataclasses import dataclass

from ...measures.projection import ProjectionSpec
from ...config import (Batching, EncodeOptions, LayerSelection, LossOptions, RunOptions, SpectraOptions,
                       SummaryOptions, check_choices, check_positive, config, group, option)

__all__ = ["GeometryConfig", "FeatureOptions", "SUM_ROLES"]

SUM_ROLES = ("pair", "rollout")  # log-probability terms: sequence sums


@dataclass(frozen=True)
class FeatureOptions:
    """Gradient features (seeded projections)"""

    r_in: int = option(16, "input-side projection size per layer (features are r_out x r_in per layer)")
    r_out: int = option(16, "output-side projection size per layer")
    r_dense: int = option(256, "projection size of dense (torch.func) per-example gradients")
    proj_kind: str = option("gaussian", "projection entries: gaussian or rademacher",
                            choices=("gaussian", "rademacher"))
    r_model: int = option(512, "size of the whole-model feature (a seeded projection of all layers' features), "
                               "used for G-Vendi and selection")
    feature_dtype: str = option("float32", "dtype of the stored features: float32 or float16",
                                choices=("float32", "float16"))
    exact: bool = option(False, "exact mode: cross-example inner products from the factors, no projection "
                                "(small problems; one process)", cli="--exact")

    def __post_init__(self):
        check_positive(self, "r_in", "r_out", "r_dense", "r_model")
        check_choices(self)


@config
class GeometryConfig:
    """Options of `gradsight geometry` (gradient features, alignment, entanglement, diversity, noise).

    Loss terms: plain records and named terms use `reduction` (token-mean by default); preference-pair
    sides and rewarded rollouts use the sequence log-probability (sum over response tokens), as the
    entanglement and PSR/NSR analyses are defined for log pi(y|x).
    """

    omit = ("reference", "n_perm")  # geometry compares labels by bootstrap CIs only

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    loss: LossOptions = group(LossOptions)
    svd: SpectraOptions = group(SpectraOptions)
    batching: Batching = group(Batching, resume=False)
    summary: SummaryOptions = group(SummaryOptions, resume=False)
    features: FeatureOptions = group(FeatureOptions)
    spectra: bool = option(True, "also compute per-example spectra (effective rank for the score table)")
    target: str | None = option(None, "label whose mean gradient the score table's cos_target refers to "
                                      "(default: the first label in sorted order)", resume=False)
    threshold: float = option(0.5, "rollouts with reward > threshold are positive (PSR), the others negative "
                                   "(NSR)", resume=False)
    lam: float = option(0.1, "W-REINFORCE weight of the positive part", resume=False)
    q: float = option(1.0, "order of the Vendi score (1 = entropy)", resume=False)

    def __post_init__(self):
        if self.q < 0:
            raise ValueError(f"q must be >= 0, got {self.q}")

    def projection(self):
        """The seeded projection of this run's features."""
        return ProjectionSpec(r_in=self.r_in, r_out=self.r_out, r_dense=self.r_dense, kind=self.proj_kind,
                              seed=self.seed)
