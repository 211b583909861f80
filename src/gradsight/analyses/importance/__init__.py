"""`importance`: which weights matter, as masks applied and evaluated (`gradsight importance`).

One captured pass over a calibration set gives, per Linear layer, the sums every score needs (`importance.stats`):
magnitude, Wanda, GBLM-Pruner, the Fisher diagonal (OBD), first-order Taylor, SalUn saliency and gradient x
activation per MLP neuron. The grid of masks (unstructured per row / per layer / global, N:M, neurons) is
applied to copies of the model — Wanda, GBLM and the SparseGPT baseline calibrated block by block on the pruned
model as their references do — and evaluated: perplexity on held-out text for a language model, loss and
accuracy for a plain module. The report shows the sparsity-perplexity grid, per-layer sparsity and where the
gradient methods prune other weights than magnitude.

Python:
    run_importance(cfg, out, model=None, tokenizer=None, records=None)
    importance_of(model, loss, batches, out, eval_batches=None, **options)
Math (no I/O): `gradsight.importance` (scores, masks, sparsegpt, sequential, unlearn, embedding).
"""

from __future__ import annotations

from ...runs.registry import Analysis, folder, register
from .config import ImportanceConfig

__all__ = ["ImportanceConfig", "run_importance", "importance_of", "SPEC"]


def _meta(cfg, source, plan) -> dict:
    st = plan.state
    return {"importance_setup": {"statistics": ["sq_in", *st.want], "layers": len(st.modules),
                                 "accumulator_dtype": str(st.dtype).replace("torch.", "")}}


def _identity(cfg, source, plan) -> dict:
    from ...inputs.data import fingerprint

    if source.kind == "lm":
        if cfg.eval_data and cfg.eval_data.startswith("builtin:"):
            import hashlib

            from ...importance.text import sample_text

            return {"eval_sha256": hashlib.sha256(sample_text(cfg.eval_data[8:]).encode()).hexdigest()}
        return {"eval_sha256": fingerprint(cfg.eval_data) if cfg.eval_data else ""}
    from ...inputs.module import data_hash

    ev = source.extras.get("eval")
    return {"eval_sha256": data_hash(list(ev)) if ev else ""}


SPEC = register(Analysis(
    name="importance",
    Config=ImportanceConfig,
    help="Weight importance from gradients (magnitude, Wanda, GBLM, Fisher, Taylor, SalUn, neuron attribution) "
         "and a SparseGPT baseline: unstructured / N:M / neuron masks applied to copies of the model and "
         "evaluated (perplexity, or loss and accuracy).",
    **folder(__name__),
    tables=("stats", "examples"),
    noun="examples",
    identity=_identity,
    meta=_meta,
    quick={"methods": ("magnitude", "wanda", "gblm", "fisher", "taylor", "salun", "neuron", "sparsegpt"),
           "structures": ("unstructured", "2:4", "neuron"), "sparsities": (0.5,), "max_batch": 2,
           "batches_per_shard": 1, "seqlen": 16},
))


def run_importance(cfg: ImportanceConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                   report: bool = True, log=print):
    """Importance scores, masks and their evaluation for a language model on calibration records (cfg.data).
    Returns an ImportanceResult (.evaluation, .layers, .score_summary, .neurons, .scores(method))."""
    from ...runs.api import run_lm

    return run_lm("importance", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def importance_of(model, loss, batches, out, *, eval_batches=None, groups=None, forward=None, name=None,
                  progress: bool = False, report: bool = False, log=print, **options):
    """Importance for any nn.Module: `batches` calibrate the scores; `eval_batches` (default: the same batches,
    flagged in-sample) evaluate every pruned copy (mean loss, and accuracy for cross-entropy)."""
    from ...runs.api import run_module

    return run_module("importance", model, loss, batches, out, groups=groups, forward=forward, name_in_report=name,
                      progress=progress, report=report, log=log, extras={"eval": eval_batches}, **options)
