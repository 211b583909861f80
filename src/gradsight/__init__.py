"""gradsight: make the gradients of neural networks visible.

Per-example, per-layer gradient statistics (norms and exact spectra) of any PyTorch / Hugging Face model,
from ONE batched forward/backward per batch (factored gradients G_e^T A_e), compared across groups of data
with confidence intervals and permutation tests, stored as tidy parquet tables and rendered as a
self-contained HTML report.

Example:
    >>> import gradsight
    >>> run = gradsight.analyze_layers(data="data.jsonl", out="runs/fast-vs-slow")
    >>> run.summary.head()          # group x kind x block x metric: mean, sd, n, CI
    >>> run.report()                # runs/fast-vs-slow/report.html
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

# Lazy public front: `import gradsight` (and the report/CLI paths that don't need torch) stays cheap.
_EXPORTS = {
    "capture": ".capture", "loop_grads": ".capture", "FactoredGrad": ".capture", "DenseGrad": ".capture",
    "LayersConfig": ".config", "SummaryOptions": ".config", "GeometryConfig": ".config",
    "ProjectionSpec": ".measures.projection", "Projector": ".measures.projection",
    "run_geometry": ".geometry", "summarize_geometry": ".geometry", "select": ".geometry",
    "DataError": ".inputs.data", "EncodeOptions": ".inputs.data", "load_records": ".inputs.data",
    "ModelError": ".inputs.models", "list_layers": ".inputs.models", "load_model": ".inputs.models",
    "select_layers": ".inputs.models",
    "batch_spectra": ".measures.spectra", "spectral_stats": ".measures.spectra",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'gradsight' has no attribute {name!r}")


__all__ = ["analyze_layers", "analyze_geometry", "run_geometry", "summarize_geometry", "select",
           "GeometryConfig", "ProjectionSpec", "Projector", "capture", "loop_grads", "FactoredGrad",
           "DenseGrad", "LayersConfig", "SummaryOptions", "EncodeOptions", "DataError", "ModelError",
           "load_model", "load_records", "list_layers", "select_layers", "batch_spectra", "spectral_stats", "open_run", "__version__"]


def analyze_layers(data=None, out="runs/layers", *, model="smollm2-135m-instruct", progress=True,
                   report=True, **options):
    """Per-example, per-layer gradient spectra of `model` on `data`, compared across groups.

    Args:
        data: a .jsonl path, a saved HF dataset directory, a datasets.Dataset or a list of dicts with
            `group` and `prompt`/`response` (or chat `messages`).
        out: run directory (created; resumed when it holds the same configuration).
        model: a model spec (packaged name, HF directory, .gguf file) or a loaded model (then pass
            `tokenizer=`).
        **options: any LayersConfig field (kinds=("q","v"), blocks="0:10", max_length=512, ...) or
            EncodeOptions field, plus tokenizer=.

    Returns:
        LayersResult with .path, .examples, .summary, .layer_stats and .report().
    """
    return _analyze("layers", data, out, model, progress, report, options)


def analyze_geometry(data=None, out="runs/geometry", *, model="smollm2-135m-instruct", progress=True,
                     report=True, **options):
    """Gradient geometry of `model` on `data` (groups, preference pairs, rewarded rollouts, named terms).

    Args: as `analyze_layers`; **options may also hold any GeometryConfig field (r_in=32, exact=True, ...).

    Returns:
        GeometryResult with .path, .examples (one row per loss term), .tables ({"group_cosines", "pairs",
        "coherence", "terms", "entanglement", "entanglement_summary", "psr_nsr", "diversity", "noise",
        "scores"}) and .report().
    """
    return _analyze("geometry", data, out, model, progress, report, options)


def _analyze(analysis, data, out, model, progress, report, options):
    from dataclasses import fields

    from .config import GeometryConfig, LayersConfig, SummaryOptions
    from .inputs.data import EncodeOptions
    from .geometry import run_geometry
    from .pipeline import run_layers

    tokenizer = options.pop("tokenizer", None)
    enc_keys = {f.name for f in fields(EncodeOptions)}
    enc = EncodeOptions(**{k: options.pop(k) for k in list(options) if k in enc_keys})
    sum_keys = {f.name for f in fields(SummaryOptions)}
    summ = SummaryOptions(**{k: options.pop(k) for k in list(options) if k in sum_keys})
    if "kinds" in options and options["kinds"] is not None:
        options["kinds"] = tuple(options["kinds"])
    in_memory = not isinstance(data, (str, bytes)) and not hasattr(data, "__fspath__")
    loaded = not isinstance(model, str)
    cls, runner = (GeometryConfig, run_geometry) if analysis == "geometry" else (LayersConfig, run_layers)
    cfg = cls(model=model if not loaded else type(model).__name__,
              data="" if in_memory else str(data), encode=enc, summary=summ, **options)
    return runner(cfg, out, progress=progress, report=report, model=model if loaded else None,
                      tokenizer=tokenizer, records=data if in_memory else None)


def open_run(path):
    """Read a finished run: LayersResult with its tables."""
    from pathlib import Path

    from .pipeline import LayersResult
    from .runs.store import read_examples

    p = Path(path)
    summ = p / "summary.parquet"
    import pandas as pd

    return LayersResult(p, read_examples(p), pd.read_parquet(summ) if summ.exists() else None)
