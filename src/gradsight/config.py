"""Options as frozen dataclasses: small option GROUPS, composed into one Config per analysis.

A group is a frozen dataclass whose fields carry their help text (and CLI spelling) in the field metadata;
each default is written once, in the field. An analysis' Config is declared with `@config` as a frozen
dataclass whose fields are groups (``run: RunOptions = group(RunOptions)``) or options of its own
(``top_k: int = option(5, "...")``). It is never a subclass of another analysis' Config: curvature has no
``rel_tol`` because it does not compose the singular-value group, so a change of it cannot refuse a resume.

A Config is built and read flat or by group, whichever is handier::

    LayersConfig(model="m", kinds=("q",), max_length=256)            # flat: routed to their groups
    LayersConfig(encode=EncodeOptions(max_length=256), token_budget=600)
    cfg.max_length == cfg.encode.max_length                          # flat reads go to the group

Fields marked ``resume=False`` (batching, device, summary options) do not change per-unit results and may
differ when a run is resumed; every other field is part of the run's identity: a rerun into the same
directory with a different value is refused, naming the key. A Config may ``omit`` options of a group that
do not apply to it (e.g. curvature computes no per-example loss, so it has no ``flush_every``): they are
neither accepted nor shown on its command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

from .inputs.data import EncodeOptions

__all__ = ["option", "group", "config", "leaves", "semantic_dict", "config_hash", "csv_tuple",
           "RunOptions", "LayerSelection", "Batching", "SpectraOptions", "SummaryOptions", "LossOptions", "Objective",
           "EncodeOptions", "OptionError"]


class OptionError(TypeError):
    """An option that the Config does not have (the message lists the ones it has)."""


def option(default: Any, help: str, *, resume: bool = True, cli: str | None = None, short: str | None = None,
           required: bool = False, choices: tuple | None = None) -> Any:
    """A config field with its help text.

    Args:
        default: the one default of the option.
        help: help text (CLI, docs).
        resume: False when the option does not change per-unit results (may differ on resume).
        cli: the command-line spelling when it is not ``--field-name`` (``"--attn"``; for a bool ``"--exact"``
            makes a flag without a ``--no-`` form).
        short: a one-letter alias (``"-d"``).
        required: the command line requires it (the Python API may leave the default, e.g. in-memory data).
        choices: allowed values, checked at construction and listed in the help.
    """
    meta = {"help": help, "resume": resume, "cli": cli, "short": short, "required": required,
            "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


def group(cls: type, *, resume: bool = True, title: str | None = None) -> Any:
    """A Config field holding an option group (a frozen dataclass with `option` fields)."""
    return field(default_factory=cls, metadata={"group": True, "resume": resume,
                                                "title": title or (cls.__doc__ or cls.__name__).split("\n")[0]})


def is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def csv_tuple(v: Any) -> tuple:
    """A tuple from a tuple, a list, None or a comma-separated string."""
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    return tuple(v)


def check_choices(obj: Any) -> None:
    """Raise ValueError for a field value outside its declared choices."""
    for f in fields(obj):
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(obj, f.name) not in allowed:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, allowed))}; "
                             f"got {getattr(obj, f.name)!r}")


def check_positive(obj: Any, *names: str, minimum: int = 1) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {v}")


def _tuple_fields(obj: Any) -> None:
    """Normalise tuple-typed fields given as lists or comma-separated strings (frozen: object.__setattr__)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if typing.get_origin(_strip_optional(hints[f.name])) is tuple:
            v = getattr(obj, f.name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(obj, f.name, tuple(int(x) for x in csv_tuple(v))
                                   if _tuple_item(hints[f.name]) is int else csv_tuple(v))


def _strip_optional(tp):
    """X for `X | None`, else tp."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _tuple_item(tp):
    args = typing.get_args(_strip_optional(tp))
    return args[0] if args else str


# ----------------------------------------------------------------------------------------------------------
# option groups shared by the analyses


@dataclass(frozen=True)
class RunOptions:
    """Model and data"""

    model: str = option("smollm2-135m-instruct", "model: a HF model directory, a .gguf file, or a packaged name",
                        short="-m")
    data: str = option("", "data: a .jsonl file or a saved Hugging Face dataset directory", short="-d",
                       required=True)
    split: str = option("train", "dataset split (HF datasets only)")
    dtype: str = option("float32", "model dtype: float32, float64, bfloat16",
                        choices=("float32", "float64", "bfloat16", "float16"))
    attn_implementation: str = option("sdpa", "attention kernel: sdpa, eager", cli="--attn",
                                      choices=("sdpa", "eager"))
    on_bad: str = option("error", "bad records: 'error' stops with file:line:field, 'skip' flags and counts them",
                         choices=("error", "skip"))
    seed: int = option(0, "seed (bootstrap, permutations, projections, probes, directions: anything random)")
    device: str = option("auto", "auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:1, ...",
                         resume=False)

    def __post_init__(self):
        check_choices(self)


@dataclass(frozen=True)
class LayerSelection:
    """Layer selection"""

    kinds: tuple[str, ...] = option((), "layer kinds to analyse, e.g. q,k,v,o (default: every linear layer "
                                        "inside the transformer blocks)")
    blocks: str | None = option(None, "block range, e.g. '0-9', '0:10', '-4:' (default: all)")
    pattern: str | None = option(None, "regex on module names selecting layers (also non-linear modules, "
                                       "handled by the torch.func backend)")
    exclude: str | None = option(None, "regex on module names excluding layers")

    def __post_init__(self):
        _tuple_fields(self)


@dataclass(frozen=True)
class Batching:
    """Batching (not part of a run's identity)"""

    token_budget: int = option(4096, "max padded tokens per batch (length-bucketed)", resume=False)
    max_batch: int = option(32, "max examples per batch", resume=False)
    batch_by: str = option("cost", "batch composition: cost (a cost model of the model and device: similar "
                                   "lengths together, very long sequences alone) or budget (fill each batch up "
                                   "to the token budget)", choices=("cost", "budget"), resume=False)
    flush_every: int = option(4, "write a result shard every N batches (a killed run loses at most these)",
                              resume=False)

    def __post_init__(self):
        check_positive(self, "token_budget", "max_batch", "flush_every")
        check_choices(self)


@dataclass(frozen=True)
class SpectraOptions:
    """Singular values"""

    route: str = option("auto", "singular values: auto (the cheapest eigenproblem per example and layer), gram "
                                "(T x T), out (d_out x d_out), in (d_in x d_in) or dense (materialise + svdvals)",
                        choices=("auto", "gram", "out", "in", "dense"))
    erank_weights: str = option("sv", "effective-rank weights: sv (p ~ s, the paper's code) or energy (p ~ s^2)",
                                choices=("sv", "energy"))
    rel_tol: float = option(0.0, "drop singular values below rel_tol * s1 before ratios (0 keeps all)")

    def __post_init__(self):
        check_choices(self)
        if self.rel_tol < 0:
            raise ValueError(f"rel_tol must be >= 0, got {self.rel_tol}")


@dataclass(frozen=True)
class SummaryOptions:
    """Group comparison (recomputed by `gradsight report`; not part of a run's identity)"""

    reference: str | None = option(None, "reference group for relative differences (default: first group "
                                         "in sorted order)", resume=False)
    n_boot: int = option(1000, "bootstrap resamples for confidence intervals", resume=False)
    n_perm: int = option(2000, "label permutations for the group-difference tests", resume=False)
    ci: float = option(0.95, "confidence level of the bootstrap intervals", resume=False)
    bounds: tuple[int, ...] | None = option(None, "early/middle/late block boundaries for segment MAD, e.g. 8,22 "
                                                  "(default: the paper's for its depths, else thirds)",
                                            resume=False)

    def __post_init__(self):
        if self.bounds is not None and not isinstance(self.bounds, tuple):
            object.__setattr__(self, "bounds", tuple(int(x) for x in csv_tuple(self.bounds)) or None)
        if self.bounds is not None and len(self.bounds) != 2:
            raise ValueError(f"bounds must be two block indices, got {self.bounds!r}")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be at least 10, got {self.n_boot}")
        if self.n_perm < 10:
            raise ValueError(f"n_perm must be at least 10, got {self.n_perm}")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")


@dataclass(frozen=True)
class LossOptions:
    """Per-example loss"""

    reduction: str = option("mean", "per-example loss: 'mean' (token-mean, as the papers) or 'sum'",
                            choices=("mean", "sum"))

    def __post_init__(self):
        check_choices(self)


@dataclass(frozen=True)
class Objective:
    """Objective (pooled over the data set)"""

    n_examples: int | None = option(None, "use only the first N usable examples (by record order)")

    def __post_init__(self):
        check_positive(self, "n_examples")


# ----------------------------------------------------------------------------------------------------------
# Config machinery


def _group_fields(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if is_group(f)}


def _index(cls: type) -> dict[str, str | None]:
    """flat option name -> group field name (None for the Config's own options)."""
    out: dict[str, str | None] = {}
    omit = set(getattr(cls, "omit", ()))
    for f in fields(cls):
        if is_group(f):
            for g in fields(_group_fields(cls)[f.name]):
                if g.name in omit:
                    continue
                if g.name in out:
                    raise TypeError(f"{cls.__name__}: option {g.name!r} is in two groups")
                out[g.name] = f.name
        else:
            if f.name in out:
                raise TypeError(f"{cls.__name__}: option {f.name!r} is also in a group")
            out[f.name] = None
    return out


def config(cls: type) -> type:
    """Make `cls` a frozen Config dataclass that is built and read flat or by group (module docstring)."""
    cls = dataclass(frozen=True)(cls)
    index = _index(cls)
    groups = _group_fields(cls)
    grouped_init = cls.__init__

    def __init__(self, **kw):
        own: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        for k, v in kw.items():
            if k in groups:
                own[k] = v
            elif k in index:
                if index[k] is None:
                    own[k] = v
                else:
                    parts.setdefault(index[k], {})[k] = v
            else:
                raise OptionError(f"{cls.__name__} has no option {k!r}; options: {', '.join(sorted(index))}")
        for gname, values in parts.items():
            base = own.get(gname)
            own[gname] = replace(base, **values) if base is not None else groups[gname](**values)
        grouped_init(self, **own)

    def __getattr__(self, name):
        g = index.get(name)
        if g is not None:
            return getattr(object.__getattribute__(self, g), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(klass, d: dict):
        """A Config from `to_dict()` output (or a flat dict of options); lists become tuples."""
        flat: dict[str, Any] = {}
        for k, v in d.items():
            if k in groups and isinstance(v, dict):
                known = {f.name for f in fields(groups[k])}
                flat.update({kk: vv for kk, vv in v.items() if kk in known and kk in index})
            elif k in index:
                flat[k] = v
        return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()})

    def updated(self, **kw):
        """A copy with some options changed (flat or by group)."""
        cur = {f.name: getattr(self, f.name) for f in fields(self)}
        out = dict(cur)
        for k, v in kw.items():
            if k in groups or index.get(k, "") is None:
                out[k] = v
            elif k in index:
                out[index[k]] = replace(out[index[k]], **{k: v})
            else:
                raise OptionError(f"{type(self).__name__} has no option {k!r}")
        return type(self)(**out)

    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
    cls.to_dict = to_dict
    cls.from_dict = from_dict
    cls.updated = updated
    cls.options = staticmethod(lambda: dict(index))
    return cls


@dataclass(frozen=True)
class Leaf:
    """One option of a Config: its flat name, group (None for own options), Field and resolved type."""

    name: str
    group: str | None
    group_title: str
    field: dataclasses.Field
    type: Any


def leaves(cls: type) -> Iterator[Leaf]:
    """Every option of a Config class in declaration order (groups expanded, omitted options left out)."""
    hints = typing.get_type_hints(cls)
    omit = set(getattr(cls, "omit", ()))
    for f in fields(cls):
        if is_group(f):
            gcls = hints[f.name]
            ghints = typing.get_type_hints(gcls)
            for g in fields(gcls):
                if g.name not in omit:
                    yield Leaf(g.name, f.name, f.metadata["title"], g, ghints[g.name])
        else:
            yield Leaf(f.name, None, getattr(cls, "title", cls.__name__.removesuffix("Config")), f, hints[f.name])


def semantic_dict(cfg) -> dict:
    """The fields of a config that define a run's identity (resume=False fields and groups dropped)."""
    out = {}
    omit = set(getattr(type(cfg), "omit", ()))
    for f in fields(cfg):
        if not f.metadata.get("resume", True) or f.name in omit:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = semantic_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finite_positive(name: str, v: Any) -> None:
    if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
