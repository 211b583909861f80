"""`attribution`: which training examples drive a prediction (`gradsight attribute`).

Training features are computed once (Kronecker-projected per-example gradients and K-FAC covariances, stored,
resumable, sharded under torchrun); query sets are scored against them in blocks with grad_dot, grad_cos,
TracIn, raw / K-FAC / EK-FAC influence and TRAK (see `gradsight.attribution`). The report lists each query's
top proponents and opponents with their text, score distributions, per-layer shares, self-influence outliers
and the damping each method used.

Python:
    run_attribution(cfg, out, model=None, tokenizer=None, records=None)
    attribution_of(model, loss, batches, out, queries=None, checkpoints=None, **options)
"""

from __future__ import annotations

from ...runs.registry import Analysis, folder, register
from .config import AttributionConfig

__all__ = ["AttributionConfig", "run_attribution", "attribution_of", "SPEC"]


def _meta(cfg, source, plan) -> dict:
    st = plan.state
    return {"attribution_setup": {"features": cfg.feature_spec().to_dict(), "feature_dtype": cfg.feature_dtype,
                                  "reduction": cfg.reduction, "n_train": st.n_train, "n_query": st.n_query,
                                  "n_checkpoints": st.n_ckpt, "lrs": st.lrs}}


def _identity(cfg, source, plan) -> dict:
    from .compute import identity

    return identity(cfg, source, plan)


SPEC = register(Analysis(
    name="attribute",
    Config=AttributionConfig,
    help="Data attribution: the training examples that drive each query's loss (grad-dot/cos, TracIn, "
         "K-FAC/EK-FAC influence, TRAK), with self-influence outliers and per-token breakdowns.",
    **folder(__name__),
    tables=("features", "covariance", "examples"),
    noun="examples",
    identity=_identity,
    meta=_meta,
    # float64 features in quick runs: the contract compares 1 and 2 ranks at rtol 1e-4, and float32 features carry
    # ~1e-7 of the largest score as noise into the smallest per-token scores
    quick={"r_in": 4, "r_out": 4, "trak_dim": 64, "max_batch": 2, "flush_every": 1, "top_k": 3,
           "feature_dtype": "float64"},
))


def run_attribution(cfg: AttributionConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                    report: bool = True, log=print):
    """Attribution of a language model's queries (cfg.queries) to its training records (cfg.data).
    Returns an AttributionResult (.top, .self_influence, .precision, .scores(method))."""
    from ...runs.api import run_lm

    return run_lm("attribute", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def attribution_of(model, loss, batches, out, *, queries=None, query_groups=None, checkpoints=None, adam=None,
                   groups=None, forward=None, name=None, progress: bool = False, report: bool = False, log=print,
                   **options):
    """Attribution for any nn.Module: rows of `batches` are the training examples, rows of `queries` (a list
    of batches; default: the training rows themselves) the queries; `checkpoints`: earlier state dicts (the
    model is the last), with `lrs=` one learning rate each plus the model's; `adam`: one
    `gradsight.attribution.AdamPreconditioner` per checkpoint (LESS's preconditioned training features)."""
    from ...runs.api import run_module

    extras = {"queries": queries, "query_groups": query_groups, "checkpoints": checkpoints, "adam": adam}
    return run_module("attribute", model, loss, batches, out, groups=groups, forward=forward, name_in_report=name,
                      progress=progress, report=report, log=log, extras=extras, **options)
