"""Data attribution: which training examples drive a prediction (math and in-memory front; no I/O).

    features.py    Kronecker-projected per-example gradients (LoGra) and K-FAC covariance sums
    curvature.py   damped inverse curvature per layer: identity, raw, K-FAC, EK-FAC; KroneckerOperator
    methods.py     streaming scorers: grad_dot, grad_cos, tracin, raw / kfac / ekfac influence, trak
    api.py         attribute(model, loss, train, queries, method=...) for plain modules, in memory
    lds.py         the linear datamodeling score (LDS) and leave-one-out checks
    digits.py      the offline retraining ground truth on scikit-learn's digits

The run-directory analysis is `gradsight.analyses.attribution` (`gradsight attribute`).
"""

from .api import attribute, featurize, load_adam_state, save_adam_state
from .curvature import KINDS, CurvatureFit, KroneckerOperator, LayerCurvature
from .features import AdamPreconditioner, FeatureSpec, Featurizer, LayerCovariance
from .methods import METHODS, Block, Checkpoint, Scorer, score_matrix

__all__ = ["attribute", "featurize", "save_adam_state", "load_adam_state", "AdamPreconditioner", "KINDS", "CurvatureFit", "KroneckerOperator", "LayerCurvature", "FeatureSpec",
           "Featurizer", "LayerCovariance", "METHODS", "Block", "Checkpoint", "Scorer", "score_matrix"]
