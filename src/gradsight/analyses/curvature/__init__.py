"""`curvature`: Hessian / GGN / Fisher eigenvalues, trace, spectral density and stability per scope.

Scopes (the whole selection, each block, kind, layer; for a plain module its child modules or named
parameter blocks) are the units; each is one matrix-free operator of the mean loss over fixed batches:
top / bottom eigenvalues by Lanczos, a Hutch++ trace with a standard error, an SLQ density, spectral criteria
(bulk edge, outliers, negative mass) and, with a learning rate, lr * lambda_max and lr * trace against 2.

Python:
    run_curvature(cfg, out, model=None, tokenizer=None, records=None)     a causal LM
    curvature_of(model, loss_fn, batches, out, blocks=None, **options)     any nn.Module
    load_eigenvectors(run)                                                  the model scope's top-2 vectors
"""

from __future__ import annotations

from ...runs.registry import Analysis, folder, lazy, register
from .config import OBJECTIVE, OPERATORS, CurvatureConfig

__all__ = ["CurvatureConfig", "OPERATORS", "run_curvature", "curvature_of", "load_eigenvectors", "SPEC"]

load_eigenvectors = lazy("gradsight.analyses.curvature.compute:load_eigenvectors")


def _loss_meta(cfg) -> dict:
    return {"objective": OBJECTIVE, "mode": "eval", "dtype": cfg.dtype}


SPEC = register(Analysis(
    name="curvature",
    Config=CurvatureConfig,
    help="Curvature of the loss: top/bottom eigenvalues (Lanczos), trace (Hutch++), spectral density (SLQ), "
         "spectral criteria and gradient-descent stability, for the whole layer selection and per "
         "block/kind/layer.",
    **folder(__name__),
    tables=("eigenvectors", "trace", "density", "slq_nodes", "spectral_criteria", "eigenvalues"),
    unit_column="scope",
    layout={"eigenvectors": "tensors/eigenvectors", "*": "scopes/{key}.{table}"},
    collective=True,
    noun="scopes",
    loss_meta=_loss_meta,
    meta=lazy("gradsight.analyses.curvature.compute:meta"),
    identity=lazy("gradsight.analyses.curvature.compute:identity"),
    quick={"per": ("model", "block"), "top_k": 2, "n_products": 9, "n_probes": 1, "n_steps": 5},
))


def run_curvature(cfg: CurvatureConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                  report: bool = True, log=print):
    """Curvature of a causal LM's loss on grouped data into the run directory `out` (resumes if it exists).

    Args:
        cfg: options (CurvatureConfig; layer selection, data and model options as `layers`).
        out: run directory.
        model, tokenizer: an already loaded model/tokenizer (Python API); default: load cfg.model.
        records: data as a list of dicts or a datasets.Dataset instead of cfg.data.
        progress: progress bar (rank 0). report: write report.html.

    Returns:
        CurvatureResult (.path, .tables, .eigenvalues, .trace, .report()).
    """
    from ...runs.api import run_lm

    return run_lm("curvature", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def curvature_of(model, loss_fn, batches, out, *, blocks=None, forward_fn=None, progress: bool = False,
                 report: bool = False, name: str | None = None, log=print, **options):
    """Curvature tables of any PyTorch module, written into the run directory `out` (the tables of
    `run_curvature`; resumable, config-guarded).

    Args:
        model: the module (evaluated in eval mode; a train-mode model with BatchNorm is warned about and
            recorded as switched_to_eval).
        loss_fn: "cross_entropy", "mse" or a callable `loss_fn(outputs, targets) -> mean over rows` (Hessian
            only).
        batches: a list of batches or a DataLoader (materialised once, in order): `(x, y)` by default, or any
            batch your `forward_fn(model, batch) -> (outputs, targets)` understands.
        out: run directory.
        blocks: None (each direct child module with parameters is a block), a dict {block name: regex or list
            of parameter names}, or a list of regexes (named by themselves).
        name: the model's name in the manifest and report (default: its class name).
        **options: CurvatureConfig options: per, operator, method, top_k, bottom_k, tol, max_iter,
            n_products, density_scopes, trace_scopes, n_probes, n_steps, max_vectors, mc_samples, lr, seed.
    """
    from ...runs.api import run_module

    return run_module("curvature", model, loss_fn, batches, out, forward=forward_fn, name_in_report=name,
                      progress=progress, report=report, log=log, extras={"blocks": blocks}, **options)
