"""A Config dataclass as a typer command signature (the one place options become command-line flags).

Every option of a Config (its groups expanded) becomes ``--name`` (or the field's ``cli`` spelling, plus its
``short`` alias) with the field's default and help text, in a help panel per option group. Tuples are
comma-separated strings on the command line (``--kinds q,k,v``); bools are ``--x/--no-x`` unless the field
names a single flag (``--exact``). `parse` turns the parsed values back into Config keyword arguments.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..config import leaves

__all__ = ["config_parameters", "parse", "command_parameters", "split_csv", "with_signature", "to_args"]


def split_csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _base(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(tp):
        return args[0], True
    return tp, False


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter (with a typer.Option default) per option of the Config class `cls`."""
    out = []
    for leaf in leaves(cls):
        meta = leaf.field.metadata
        base, optional = _base(leaf.type)
        default = leaf.field.default
        flag = "--" + leaf.name.replace("_", "-")
        help_ = meta.get("help", "")
        if base is bool:
            decls = [meta["cli"]] if meta.get("cli") else [f"{flag}/--no-{leaf.name.replace('_', '-')}"]
            annotation: Any = bool
        elif typing.get_origin(base) is tuple:
            decls = [meta.get("cli") or flag]
            annotation = Optional[str]
            default = ",".join(str(v) for v in default) if default else None
            if "comma-separated" not in help_:
                help_ += " (comma-separated)"
        else:
            decls = [meta.get("cli") or flag]
            annotation = Optional[base] if optional else base
        if meta.get("short"):
            decls.append(meta["short"])
        opt = typer.Option(... if meta.get("required") else default, *decls, help=help_,
                           rich_help_panel=leaf.group_title)
        out.append(inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    return out


def parse(cls: type, values: dict) -> dict:
    """Config keyword arguments from parsed command-line values (comma-separated tuples split)."""
    out = {}
    for leaf in leaves(cls):
        if leaf.name not in values:
            continue
        v = values[leaf.name]
        base, _ = _base(leaf.type)
        if typing.get_origin(base) is tuple:
            items = split_csv(v)
            item = (typing.get_args(base) or (str,))[0]
            v = tuple(int(x) for x in items) if item is int else items
            if v == () and leaf.field.default is None:
                v = None
        out[leaf.name] = v
    return out


def command_parameters(report: bool = True) -> list[inspect.Parameter]:
    """--out / --no-report / --quiet of every analysis command."""
    K = inspect.Parameter.KEYWORD_ONLY
    ps = [inspect.Parameter("out", K, annotation=Path, default=typer.Option(
        ..., "--out", "-o", help="run directory (resumed if it holds the same configuration)",
        rich_help_panel="Run"))]
    if report:
        ps.append(inspect.Parameter("no_report", K, annotation=bool, default=typer.Option(
            False, "--no-report", help="skip report.html", rich_help_panel="Run")))
    ps.append(inspect.Parameter("quiet", K, annotation=bool, default=typer.Option(
        False, "--quiet", "-q", help="no progress bar or summary", rich_help_panel="Run")))
    return ps


def with_signature(fn: Callable, params: list[inspect.Parameter], doc: str) -> Callable:
    """`fn(**kw)` presented to typer with the given parameters and help text."""
    fn.__signature__ = inspect.Signature(params)
    fn.__doc__ = doc
    return fn


def to_args(cls: type, options: dict) -> list[str]:
    """The command-line arguments that give a Config of class `cls` these options (inverse of `parse`)."""
    by_name = {leaf.name: leaf for leaf in leaves(cls)}
    out: list[str] = []
    for name, v in options.items():
        leaf = by_name[name]
        flag = leaf.field.metadata.get("cli") or "--" + name.replace("_", "-")
        base, _ = _base(leaf.type)
        if base is bool:
            if leaf.field.metadata.get("cli"):
                out += [flag] if v else []
            else:
                out.append(flag if v else "--no-" + name.replace("_", "-"))
        elif v is None:
            continue
        elif typing.get_origin(base) is tuple:
            out += [flag, ",".join(str(x) for x in v)]
        else:
            out += [flag, str(v)]
    return out
