"""gradsight: make the gradients of neural networks visible.

Per-example, per-layer gradient statistics of any PyTorch / Hugging Face model from ONE batched
forward/backward per batch (factored gradients G_e^T A_e): norms and exact spectra compared across groups
(`layers`), alignment, conflict, entanglement, diversity and noise (`geometry`), Hessian / GGN / Fisher
spectra (`curvature`) and loss landscapes (`landscape`). Every analysis runs through one engine into a
resumable run directory of tidy parquet tables and renders a self-contained HTML report.

Example:
    >>> import gradsight
    >>> gradsight.analyses()                      # ['layers', 'geometry', 'curvature', 'landscape']
    >>> run = gradsight.analyze("layers", "data.jsonl", "runs/fast-vs-slow", kinds=("q", "v"))
    >>> run.summary.head()                        # group x kind x block x metric: mean, sd, n, CI
    >>> run.report()                              # runs/fast-vs-slow/report.html
    >>> gradsight.open_run("runs/fast-vs-slow")   # the same result, read back
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

# Lazy public front: `import gradsight` (and the report / CLI paths that don't need torch) stays cheap.
_EXPORTS = {
    "analyze": ".runs.api", "open_run": ".runs.api",
    "Analysis": ".runs.registry", "register": ".runs.registry",
    "LayersConfig": ".analyses.layers", "run_layers": ".analyses.layers", "layers_of": ".analyses.layers",
    "GeometryConfig": ".analyses.geometry", "run_geometry": ".analyses.geometry",
    "geometry_of": ".analyses.geometry", "select": ".analyses.geometry",
    "CurvatureConfig": ".analyses.curvature", "run_curvature": ".analyses.curvature",
    "curvature_of": ".analyses.curvature", "load_eigenvectors": ".analyses.curvature",
    "LandscapeConfig": ".analyses.landscape", "run_landscape": ".analyses.landscape",
    "landscape_of": ".analyses.landscape",
    "SummaryOptions": ".config", "EncodeOptions": ".config",
    "loop_grads": ".capture", "FactoredGrad": ".capture", "DenseGrad": ".capture",
    "Measure": ".measures.base", "combine": ".measures.base", "backward_step": ".measures.step",
    "ProjectionSpec": ".measures.projection", "Projector": ".measures.projection",
    "batch_spectra": ".measures.spectra", "spectral_stats": ".measures.spectra",
    "DataError": ".inputs.data", "load_records": ".inputs.data",
    "ModelError": ".inputs.models", "list_layers": ".inputs.models", "load_model": ".inputs.models",
    "select_layers": ".inputs.models",
}


def __getattr__(name):
    if name in ("analyses", "capture"):  # callable packages: analyses() lists them, capture(...) records
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'gradsight' has no attribute {name!r}")


__all__ = ["analyze", "open_run", "analyses", "capture", "analyze_layers", "analyze_geometry", *_EXPORTS,
           "__version__"]
__all__ = list(dict.fromkeys(__all__))


def analyze_layers(data=None, out="runs/layers", *, model="smollm2-135m-instruct", progress=True,
                   report=True, **options):
    """`analyze("layers", ...)`: per-example, per-layer gradient spectra of `model` on `data`, by group.

    Args:
        data: a .jsonl path, a saved HF dataset directory, a datasets.Dataset or a list of dicts with
            `group` and `prompt`/`response` (or chat `messages`).
        out: run directory (created; resumed when it holds the same configuration).
        model: a model spec (packaged name, HF directory, .gguf file) or a loaded model (then pass
            `tokenizer=`).
        **options: any LayersConfig option (kinds=("q","v"), blocks="0:10", max_length=512, ...).

    Returns:
        LayersResult with .path, .examples, .summary, .layer_stats and .report().
    """
    from .runs.api import analyze

    return analyze("layers", data, out, model=model, progress=progress, report=report, **options)


def analyze_geometry(data=None, out="runs/geometry", *, model="smollm2-135m-instruct", progress=True,
                     report=True, **options):
    """`analyze("geometry", ...)`: gradient geometry of `model` on `data` (groups, preference pairs,
    rewarded rollouts, named terms).

    Returns:
        GeometryResult with .path, .examples (one row per loss term), .tables and .report().
    """
    from .runs.api import analyze

    return analyze("geometry", data, out, model=model, progress=progress, report=report, **options)
