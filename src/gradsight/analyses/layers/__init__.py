"""`layers`: per-example, per-layer gradient norms and spectra, compared across the data's groups.

For every example and every selected layer, the singular values of the example's weight gradient
G_e^T A_e (exact, from T x T Gram matrices; Li, Li, Zhou, ACL 2025): nuclear, spectral and Frobenius norms,
sigma1 ratio, effective and stable rank. Then group curves over depth with bootstrap CIs, MAD (whole depth
and thirds), relative differences to a reference group, and permutation tests with Benjamini-Hochberg.

    RUN/examples.parquet, RUN/layer_stats/*.parquet, RUN/summary|mad|rd|tests.parquet, RUN/report.html

Python:
    run_layers(cfg, out, model=None, tokenizer=None, records=None)     a Hugging Face model + records
    layers_of(model, loss, batches, out, groups=None, **options)         any nn.Module (one row = one example)
"""

from __future__ import annotations

from ...inputs.losses import loss_block
from ...runs.registry import Analysis, folder, register
from .config import LayersConfig

__all__ = ["LayersConfig", "run_layers", "layers_of", "SPEC"]


SPEC = register(Analysis(
    name="layers",
    Config=LayersConfig,
    help="Per-example, per-layer gradient norms and spectra, compared across the data's groups.",
    **folder(__name__),
    tables=("layer_stats", "examples"),
    noun="examples",
    loss_meta=loss_block,
    recompute=("reference", "n_boot", "n_perm"),
    quick={"n_boot": 50, "n_perm": 50, "max_batch": 2, "flush_every": 1},
))


def run_layers(cfg: LayersConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
               report: bool = True, log=print):
    """Run the layer-wise gradient analysis into the run directory `out` (resumes if it exists).

    Args:
        cfg: options (LayersConfig).
        out: run directory.
        model, tokenizer: an already loaded model/tokenizer (default: load cfg.model).
        records: data as a list of dicts or a datasets.Dataset instead of cfg.data.
        progress: show a progress bar (rank 0). report: write report.html when done.

    Returns:
        LayersResult with .path, .examples, .summary, .layer_stats and .report().
    """
    from ...runs.api import run_lm

    return run_lm("layers", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def layers_of(model, loss, batches, out, *, groups=None, forward=None, name=None, progress: bool = False,
              report: bool = False, log=print, **options):
    """Per-example, per-layer gradient spectra of any nn.Module: each row of the batches is one example.

    Args:
        model: the module (eval mode; every nn.Linear is analysed, or `pattern=` a regex on module names).
        loss: "cross_entropy", "mse" or ``loss(outputs, targets) -> mean over rows``.
        batches: list of ``(x, y)`` batches (or what `forward(model, batch) -> (outputs, targets)` takes).
        out: run directory. groups: one label per row (the groups compared).
        **options: LayersConfig options (n_boot, n_perm, reference, route, ...).
    """
    from ...runs.api import run_module

    return run_module("layers", model, loss, batches, out, groups=groups, forward=forward, name_in_report=name,
                      progress=progress, report=report, log=log, **options)
