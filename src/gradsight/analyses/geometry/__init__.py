"""`geometry`: alignment, conflict, entanglement, diversity and noise of per-example gradients.

Units are loss terms (plain responses, preference-pair sides, rewarded rollouts, named terms) or rows of a
plain module's batches. Their gradients become seeded Kronecker features (exact inner products in exact
mode); from the Grams per scope: label x label cosines, pairwise conflict rates, coherence, term alignment,
entanglement of preference pairs, PSR / NSR; G-Vendi per label, the gradient noise scale and GSNR, and a
per-unit score table for selection (`select`).

Python:
    run_geometry(cfg, out, model=None, tokenizer=None, records=None)
    geometry_of(model, loss, batches, out, groups=None, **options)
    select(run, budget, by="diversity", ...)
"""

from __future__ import annotations

from ...inputs.losses import loss_block
from ...runs.registry import Analysis, folder, lazy, register
from .config import SUM_ROLES, FeatureOptions, GeometryConfig

__all__ = ["GeometryConfig", "FeatureOptions", "run_geometry", "geometry_of", "select", "SPEC"]

select = lazy("gradsight.analyses.geometry.selection:select")


def _meta(cfg, source, plan) -> dict:
    return {"geometry": {"mode": "exact" if cfg.exact else "projected",
                         "projection": {"r_in": cfg.r_in, "r_out": cfg.r_out, "r_dense": cfg.r_dense,
                                        "kind": cfg.proj_kind, "seed": cfg.seed},
                         "r_model": cfg.r_model, "feature_dtype": cfg.feature_dtype, "target": cfg.target,
                         "threshold": cfg.threshold, "lam": cfg.lam, "q": cfg.q, "sum_roles": list(SUM_ROLES)}}


def _check(cfg, info) -> None:
    if cfg.exact and info.world_size > 1:
        raise ValueError("exact mode keeps every unit's factors in one process; run it without torchrun "
                         "(or use projected features, the default)")


SPEC = register(Analysis(
    name="geometry",
    Config=GeometryConfig,
    help="Gradient geometry: group / term alignment and conflict, entanglement of preference pairs, PSR/NSR of "
         "rewarded rollouts, G-Vendi diversity, gradient noise scale and a per-example score table.",
    **folder(__name__),
    tables=("features", "layer_stats", "examples"),
    collective_summary=True,
    noun="units",
    loss_terms=True,
    loss_meta=loss_block,
    meta=_meta,
    check=_check,
    recompute=("n_boot",),
    quick={"n_boot": 50, "r_in": 4, "r_out": 4, "r_model": 16, "max_batch": 2, "flush_every": 1},
))


def run_geometry(cfg: GeometryConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                 report: bool = True, log=print):
    """Run the gradient-geometry analysis into the run directory `out` (resumes if it exists).

    Args: as `run_layers`; `cfg` is a GeometryConfig. Returns a GeometryResult (.path, .examples, .tables).
    """
    from ...runs.api import run_lm

    return run_lm("geometry", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def geometry_of(model, loss, batches, out, *, groups=None, forward=None, name=None, progress: bool = False,
                report: bool = False, log=print, **options):
    """Gradient geometry of any nn.Module: each row of the batches is a unit labelled by `groups`.

    Args: as `layers_of`; **options are GeometryConfig options (r_in, r_model, exact, n_boot, ...).
    """
    from ...runs.api import run_module

    return run_module("geometry", model, loss, batches, out, groups=groups, forward=forward, name_in_report=name,
                      progress=progress, report=report, log=log, **options)
