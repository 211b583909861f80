"""The front of every analysis: run it on a language model or on a plain module, open a finished run.

    run_lm(name, cfg, out, model=None, tokenizer=None, records=None)     HF model + records
    run_module(name, model, loss, batches, out, **options)               nn.Module + batches + loss
    analyze(name, data, out, **options)                                  either, by what `data` / `loss` are
    open_run(path)                                                       the analysis' result object

Each analysis folder exposes the same functions under its own names (``run_layers``, ``layers_of``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from . import registry
from .engine import run as engine_run
from .store import read_manifest

__all__ = ["run_lm", "run_module", "analyze", "open_run", "config_for"]


def run_lm(name: str, cfg, out: str | Path, *, model: Any = None, tokenizer: Any = None, records: Any = None,
           progress: bool = True, report: bool = True, log: Callable[[str], None] = print) -> Any:
    """Run analysis `name` with options `cfg` on a Hugging Face language model and records.

    Args:
        cfg: the analysis' Config (model and data come from it unless given here).
        out: run directory (created; resumed when it holds the same configuration).
        model, tokenizer: an already loaded model and its tokenizer (default: load ``cfg.model``).
        records: data as a list of dicts or a datasets.Dataset (default: read ``cfg.data``).
        progress: progress bar on rank 0 (RUN/log.txt is always written). report: write report.html.
    """
    from ..inputs.lm import lm_source

    spec = registry.get(name)
    source = lm_source(model, tokenizer, records, terms=spec.loss_terms, loss_meta=spec.loss_meta)
    return engine_run(spec, cfg, out, source, progress=progress, report=report, log=log)


def run_module(name: str, model, loss, batches, out: str | Path, *, groups: Sequence[str] | None = None,
               forward: Callable | None = None, name_in_report: str | None = None, progress: bool = False,
               report: bool = False, log: Callable[[str], None] = print, extras: dict | None = None,
               **options) -> Any:
    """Run analysis `name` on a plain ``nn.Module`` with its batches and loss (see `inputs.module`).

    Args:
        loss: "cross_entropy", "mse" or ``loss(outputs, targets) -> mean over rows``.
        batches: list of batches or a DataLoader (materialised once).
        groups: one label per row across the batches (per-example analyses compare them).
        forward: ``forward(model, batch) -> (outputs, targets)`` (default ``(model(x), y)``).
        name_in_report: the model's name in the manifest and report (default: its class name).
        extras: in-memory inputs of the analysis that are not options (checkpoints, blocks, ...).
        **options: any option of the analysis' Config.
    """
    from ..inputs.module import check_module_inputs, module_source

    spec = registry.get(name)
    batches, dtype = check_module_inputs(model, batches, name)
    base = {"model": type(model).__name__, "data": "<in-memory>", "dtype": dtype, "device": "cpu"}
    cfg = spec.Config(**{k: v for k, v in base.items() if k in spec.Config.options() and k not in options},
                      **options)
    source = module_source(model, loss, batches, groups=groups, forward=forward, name=name_in_report,
                           what=name, **(extras or {}))
    return engine_run(spec, cfg, out, source, progress=progress, report=report, log=log)


def config_for(name: str, **options):
    """The Config of analysis `name` from flat options (``kinds=["q"]`` lists become tuples)."""
    spec = registry.get(name)
    return spec.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def analyze(name: str, data: Any = None, out: str | Path | None = None, *, model: Any = "smollm2-135m-instruct",
            loss: Any = None, tokenizer: Any = None, progress: bool = True, report: bool = True,
            **options) -> Any:
    """Run any registered analysis (see `analyses()`), on a language model or on a plain module.

    Args:
        name: the analysis ("layers", "geometry", "curvature", "landscape", or a registered one).
        data: language model: a .jsonl path, a saved HF dataset directory, a datasets.Dataset or a list of
            dicts; plain module (when `loss` is given): the batches.
        out: run directory (default runs/NAME).
        model: a model spec (packaged name, HF directory, .gguf file), a loaded HF model (then pass
            `tokenizer=`), or an ``nn.Module`` with `loss`.
        loss: for a plain module: "cross_entropy", "mse" or ``loss(outputs, targets)``.
        **options: options of the analysis' Config (flat: ``kinds=("q", "v")``, ``max_length=512``, ...); for
            plain modules also `groups=`, `forward=`.

    Returns:
        the analysis' result object (e.g. LayersResult: .path, .examples, .summary, .report()).

    Example:
        >>> run = gradsight.analyze("layers", "data.jsonl", "runs/fast-vs-slow", kinds=("q", "v"))
        >>> run.summary.head()
    """
    out = out if out is not None else Path("runs") / name
    if loss is not None:
        groups, forward = options.pop("groups", None), options.pop("forward", None)
        return run_module(name, model, loss, data, out, groups=groups, forward=forward, progress=progress,
                          report=report, **options)
    in_memory = data is not None and not isinstance(data, (str, bytes)) and not hasattr(data, "__fspath__")
    loaded = not isinstance(model, str)
    cfg = config_for(name, model=type(model).__name__ if loaded else model,
                     data="" if in_memory or data is None else str(data), **options)
    return run_lm(name, cfg, out, model=model if loaded else None, tokenizer=tokenizer,
                  records=data if in_memory else None, progress=progress, report=report)


def open_run(path: str | Path) -> Any:
    """A finished (or partial) run as its analysis' result object (LayersResult, GeometryResult, ...)."""
    man = read_manifest(Path(path))
    name = man.get("analysis", "layers")
    kind = registry.kind(name)
    if kind is not None and kind.open is not None:  # a run written outside the engine (a training monitor)
        return kind.open(Path(path))
    return registry.get(name).open(Path(path), None)
