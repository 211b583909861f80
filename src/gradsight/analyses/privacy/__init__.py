"""`privacy`: how much a model's gradients reveal about its data, and what a defence buys (`gradsight privacy`).

Batches of each audited size are taken from the data; the gradient an observer would see (the batch mean, as in
federated SGD) is formed plain and under each defence: per-example clipping (ghost norms from the factored
gradients, `gradsight.privacy.clip`), clipping plus Gaussian noise (DP-SGD's release, with epsilon from Opacus'
accountant), gradient pruning, top-k or quantisation. Leakage probes try to recover the batch: the first Linear
layer's input, analytically, and the labels (iDLG) for plain modules; the token set from the input embedding's
gradient for language models; what gradsight's own stored factors and projected features reveal; optionally the
optimisation attacks DLG, Inverting Gradients and a TAG-like text attack. The report shows recovery against batch
size and noise, epsilon beside each defence and example reconstructions.

Python:
    run_privacy(cfg, out, model=None, tokenizer=None, records=None)
    privacy_of(model, loss, batches, out, **options)
Math (no I/O): `gradsight.privacy` (attacks, metrics, text, store, clip, accountant, dpsgd, digits).
"""

from __future__ import annotations

from ...runs.registry import Analysis, folder, register
from .config import PrivacyConfig

__all__ = ["PrivacyConfig", "run_privacy", "privacy_of", "SPEC"]


def _identity(cfg, source, plan) -> dict:
    if source.kind != "module":
        return {}
    from ...inputs.module import data_hash

    ev = source.extras.get("eval")
    return {"eval_sha256": data_hash(list(ev)) if ev else ""}


SPEC = register(Analysis(
    name="privacy",
    Config=PrivacyConfig,
    identity=_identity,
    help="Gradient privacy audit: what the gradients of a batch reveal (analytic input and label recovery, the "
         "token set of text, gradsight's own stored features, optional DLG / Inverting Gradients / TAG attacks), "
         "plain and under defences (per-example clipping, DP-SGD noise with epsilon, pruning, top-k, "
         "quantisation).",
    **folder(__name__),
    tables=("samples", "recovery"),
    unit_column="unit",
    noun="batches",
    quick={"batch_sizes": (1, 2), "batches_per_size": 2, "defences": ("none", "clip", "dp:0.1", "prune:0.5"),
           "projection_sizes": (2, 8), "delta": 1e-3},
))


def run_privacy(cfg: PrivacyConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                report: bool = True, log=print):
    """The audit for a language model on records (cfg.data). Returns a PrivacyResult (.recovery, .curves,
    .defences, .samples())."""
    from ...runs.api import run_lm

    return run_lm("privacy", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def privacy_of(model, loss, batches, out, *, eval_batches=None, groups=None, forward=None, name=None,
               progress: bool = False, report: bool = False, log=print, **options):
    """The audit for any nn.Module on `batches` (its first Linear layer with a bias is the analytic probe's target,
    its last Linear layer the label probe's). With ``utility_epochs > 0`` a copy of the model is trained on the
    batches' rows under each defence and evaluated on `eval_batches` (default: the same batches, flagged
    in-sample)."""
    from ...runs.api import run_module

    return run_module("privacy", model, loss, batches, out, groups=groups, forward=forward, name_in_report=name,
                      progress=progress, report=report, log=log, extras={"eval": eval_batches}, **options)
