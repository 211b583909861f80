"""The registry of analyses: one declared `Analysis` per name, read by the engine, CLI, reports and front.

An analysis is a folder (``gradsight/analyses/<name>/``) whose ``__init__.py`` calls `register(Analysis(...))`.
Adding one touches no core file: the command line gets a command, `gradsight report` renders its runs,
`gradsight.analyze(name, ...)` and `gradsight.open_run(path)` find it. Third-party code (or a test) may
register its own analyses the same way; `gradsight.analyses()` lists what is registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Analysis", "ReportSpec", "Plan", "Unit", "register", "get", "names", "load_builtin",
           "BUILTIN", "UnknownAnalysis", "lazy", "folder", "RunKind", "register_kind", "kind", "report_of"]

# the order of the first analyses on the command line; every folder of gradsight/analyses/ is found by itself
BUILTIN = ("layers", "geometry", "curvature", "landscape")


class UnknownAnalysis(KeyError):
    def __str__(self) -> str:
        return f"unknown analysis {self.args[0]!r}; registered: {', '.join(names())}"


@dataclass(frozen=True)
class ReportSpec:
    """How a run of the analysis is shown.

    Attributes:
        render: ``render(run_dir, out=None) -> Path``: the self-contained HTML page (reads the run only).
        summary: ``summary(run_dir, console=None)``: the terminal summary.
        findings: ``findings(run_dir) -> [{"title": str, "lines": [str]}]``: the key findings of the report
            page, from the run's tables only (the index page of a run tree shows the first); None: none.
    """

    render: Callable[..., Path]
    summary: Callable[..., None]
    findings: Callable[..., list] | None = None


@dataclass
class Unit:
    """One piece of work the engine schedules, skips when done and commits.

    Attributes:
        key: the unit's id, as stored in the done-marker table's unit column (an int or a str).
        shard: for collective analyses, the name of the unit's shard files (e.g. ``"0003"``).
        payload: whatever the analysis' compute needs for it (a record, a scope, a chunk of points).
        ready: False for units that only produce a flagged skip row (no forward / backward).
    """

    key: Any
    payload: Any = None
    shard: str | None = None
    ready: bool = True


@dataclass
class Plan:
    """What an analysis' `setup` hands to the engine: the units and whatever its compute needs.

    Attributes:
        units: every unit of the run in a fixed order (the same on every rank and on every resume).
        state: the analysis' own working state (model, layers, batches, projector, directions, ...).
        batches: ``batches(units) -> iterable of unit lists``: how pending units group into one `compute`
            call (default: one unit per call).
        finish: ``finish(plan, resumed) -> dict`` after the last unit, on every rank (collective work is
            allowed): fields merged into the manifest.
        revisit_done: feed finished units to compute again (their rows are not committed twice; used when a
            run-wide accumulator needs every unit, e.g. exact cross-example Grams).
        prepare: ``prepare(plan)`` run once before the first compute, only when there is work to do
            (expensive set-up such as directions or checkpoints).
        done: set by the engine before compute: keys of the units already committed.
        run_dir, info: set by the engine: the run directory and the process' DistInfo.
    """

    units: list[Unit]
    state: Any = None
    batches: Callable[[list[Unit]], Any] | None = None
    finish: Callable[["Plan", int], dict] | None = None
    prepare: Callable[["Plan"], None] | None = None
    revisit_done: bool = False
    done: set = field(default_factory=set)
    run_dir: Path | None = None
    info: Any = None


@dataclass(frozen=True)
class Analysis:
    """A declared analysis: everything the engine, the CLI and the reports need to run and show it.

    Attributes:
        name: manifest "analysis", CLI command, report key.
        Config: its `config.config` dataclass (option groups + own options).
        help: one paragraph for ``gradsight NAME --help`` and `analyses()`.
        setup: ``setup(cfg, source, info) -> Plan`` (source: an input adapter's `Source`).
        compute: ``compute(plan, units) -> {table: DataFrame | Tensors}``: one batch of work, no I/O.
        summarize: ``summarize(run_dir, cfg, info) -> {table: DataFrame} | None``: the run's final tables from
            its shards only (rerun by `gradsight report`).
        report: the page and terminal summary.
        open: ``open(run_dir, tables=None) -> result``: the analysis' result object for a run directory.
        tables: shard tables in commit order; the LAST marks its units done (one resume rule for all).
        unit_column: column of the marker table that holds the unit keys.
        layout: path template of a table's shards (``{table}``, ``{key}``), per table or ``"*"``; ``.parquet``
            or ``.safetensors`` is appended.
        collective: every rank works on every unit together (products all-reduced across ranks) and rank 0
            writes; otherwise each rank takes every world_size-th unit and writes its own shards.
        collective_summary: `summarize` runs on every rank (it all-reduces); else on rank 0.
        inputs: the input adapters it accepts: "lm" (HF language model + records), "module" (nn.Module +
            batches + loss).
        loss_terms: its LM records may use the loss-term layouts (preference pairs, rollouts, named terms).
        loss_meta: ``loss_meta(cfg) -> dict``: the manifest's "loss" block of an LM run.
        noun: what a unit is called in progress and resume messages.
        identity: ``identity(cfg, source, plan) -> dict``: extra identity of a run beyond its config, model and
            data (e.g. the parameter blocks of a plain module's scopes).
        meta: ``meta(cfg, source, plan) -> dict``: informational manifest fields written when the run is created.
        check: ``check(cfg, info)``: refuse a configuration early (e.g. a mode that needs one process).
        recompute: options of its Config that `gradsight report` may change before re-summarizing.
        quick: options that make a run small and fast (smoke runs; the contract test runs every registered
            analysis with them on a tiny model).
    """

    name: str
    Config: type
    help: str
    setup: Callable
    compute: Callable
    summarize: Callable
    report: ReportSpec
    open: Callable
    tables: tuple[str, ...]
    unit_column: str = "idx"
    layout: dict[str, str] = field(default_factory=lambda: {"*": "{table}/{key}"})
    collective: bool = False
    collective_summary: bool = False
    inputs: tuple[str, ...] = ("lm", "module")
    loss_terms: bool = False
    loss_meta: Callable | None = None
    noun: str = "units"
    identity: Callable | None = None
    meta: Callable | None = None
    check: Callable | None = None
    recompute: tuple[str, ...] = ()
    quick: dict = field(default_factory=dict)

    @property
    def marker(self) -> str:
        return self.tables[-1]

    def path_template(self, table: str) -> str:
        return self.layout.get(table, self.layout.get("*", "{table}/{key}"))


def lazy(target: str) -> Callable:
    """A function that imports ``"module:attr"`` on its first call (keeps `import gradsight.cli` light)."""
    mod, _, attr = target.partition(":")

    def call(*args, **kw):
        return getattr(importlib.import_module(mod), attr)(*args, **kw)

    call.__name__, call.__qualname__, call.target = attr, target, target
    return call


def folder(package: str) -> dict:
    """The parts of an analysis laid out as a folder, by convention (lazily imported on first use):

        compute.py    setup(cfg, source, info) -> Plan;  compute(plan, units) -> tables
        summarize.py  summarize(run_dir, cfg, info) -> tables;  result(run_dir, tables) -> result object
        report.py     render(run_dir, out=None) -> Path;  print_summary(run_dir, console=None);
                      run_findings(run_dir) -> [{"title", "lines"}]

    Use as ``Analysis(name=..., Config=..., **folder(__name__), tables=...)``.
    """
    return {"setup": lazy(f"{package}.compute:setup"), "compute": lazy(f"{package}.compute:compute"),
            "summarize": lazy(f"{package}.summarize:summarize"), "open": lazy(f"{package}.summarize:result"),
            "report": ReportSpec(render=lazy(f"{package}.report:render"),
                                 summary=lazy(f"{package}.report:print_summary"),
                                 findings=lazy(f"{package}.report:run_findings"))}


_REGISTRY: dict[str, Analysis] = {}


def register(spec: Analysis, *, replace: bool = False) -> Analysis:
    """Add an analysis (its name must be new unless replace=True); returns it."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"an analysis named {spec.name!r} is already registered")
    if not spec.tables:
        raise ValueError(f"analysis {spec.name!r} declares no tables")
    _REGISTRY[spec.name] = spec
    return spec


def load_builtin() -> None:
    """Import every folder of gradsight/analyses/ (each registers itself): a new folder needs no other edit."""
    for mod in pkgutil.iter_modules(importlib.import_module("gradsight.analyses").__path__):
        if mod.ispkg and not mod.name.startswith("_"):
            importlib.import_module(f"gradsight.analyses.{mod.name}")


def get(name: str) -> Analysis:
    """The registered analysis `name` (the shipped ones are loaded on first use)."""
    if name not in _REGISTRY:
        load_builtin()
    if name not in _REGISTRY:
        raise UnknownAnalysis(name)
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered analysis names: layers, geometry, curvature, landscape, then the others in registration order."""
    load_builtin()
    return [n for n in BUILTIN if n in _REGISTRY] + [n for n in _REGISTRY if n not in BUILTIN]


# ----------------------------------------------------------------------------------------------------------
# run kinds: run directories written outside the engine (the training monitor writes while a loop trains),
# which `gradsight report`, the index page and `open_run` still summarise and show


@dataclass(frozen=True)
class RunKind:
    """A run directory written outside the engine: how it is re-summarised and shown.

    Attributes:
        name: the manifest's "analysis" value (e.g. "train").
        summarize: ``summarize(run_dir) -> {table: DataFrame}``: the summary tables, from the run's shards only.
        report: its page, terminal summary and findings.
        open: ``open(run_dir) -> result``: the run read back (`gradsight.open_run`).
    """

    name: str
    summarize: Callable
    report: ReportSpec
    open: Callable | None = None


# the modules that register the built-in run kinds (imported on first use)
KINDS = {"train": "gradsight.train.kind"}
_KINDS: dict[str, RunKind] = {}


def register_kind(k: RunKind, *, replace: bool = False) -> RunKind:
    if (k.name in _KINDS and not replace and _KINDS[k.name] is not k) or k.name in _REGISTRY:
        raise ValueError(f"a run kind or analysis named {k.name!r} is already registered")
    _KINDS[k.name] = k
    return k


def kind(name: str) -> RunKind | None:
    """The run kind `name` (None when `name` is not one)."""
    if name not in _KINDS and name in KINDS:
        importlib.import_module(KINDS[name])
    return _KINDS.get(name)


def report_of(name: str) -> ReportSpec:
    """The report of an analysis or run kind named `name`."""
    k = kind(name)
    return k.report if k is not None else get(name).report
