"""Scopes: the parameter blocks a statistic is reported for (the whole selection, a kind, a block, a layer).

One `Scope` type serves every analysis. For a language model a scope is a set of selected layers:

    model        every selected layer                    name "model"
    kind:K       the selected layers of kind K            name "kind:q"
    block:B      the selected layers of transformer block  name "block:03"
    layer        one layer                                name = the module name

Geometry sums the layers' Grams over a scope (inner products add over disjoint parameters); curvature builds
one operator on the scope's weight parameters (`params`). For a plain module (`module_scopes`) a scope is a
named set of parameter tensors: "model" (all trainable), "block:NAME" (a child module or a user-given
regex / list) and one scope per tensor.

Every table with per-scope rows starts with `SCOPE_COLUMNS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from .inputs.models import ModelError

__all__ = ["Scope", "SCOPE_COLUMNS", "SCOPE_TYPES", "scopes_of", "weight_scopes", "module_scopes"]

SCOPE_COLUMNS = ["scope", "scope_type", "kind", "block"]
SCOPE_TYPES = ("model", "layer", "kind", "block")


@dataclass(frozen=True)
class Scope:
    """A named block of layers / parameters analysed as one unit.

    Attributes:
        name: "model", "kind:q", "block:03", a layer name, "block:NAME" (plain modules).
        scope_type: model, kind, block or layer.
        kind: the layer kind ("" when the scope mixes kinds).
        block: the block index (-1 when the scope is not one block).
        layers: member layer names (language models).
        params: member parameter names (curvature operators, plain modules).
    """

    name: str
    scope_type: str
    kind: str
    block: int
    layers: tuple[str, ...] = ()
    params: tuple[str, ...] = ()

    def row(self) -> dict:
        """The scope columns of a table row."""
        return {"scope": self.name, "scope_type": self.scope_type, "kind": self.kind, "block": int(self.block)}


def _info(li) -> dict:
    return li if isinstance(li, Mapping) else li.to_dict()


def scopes_of(layers: Iterable, types: Sequence[str] = ("model", "kind", "block", "layer")) -> list[Scope]:
    """Scopes of a layer selection, grouped by type in the order of `types`.

    Within a type: kinds in order of first appearance, blocks ascending, layers in selection order.

    Args:
        layers: LayerInfo objects or dicts with name, kind, block.
        types: scope types wanted, in the order they are listed.
    """
    info = [_info(li) for li in layers]
    bad = [t for t in types if t not in SCOPE_TYPES]
    if bad:
        raise ValueError(f"unknown scope type {bad[0]!r}; expected some of {', '.join(SCOPE_TYPES)}")
    out: list[Scope] = []
    for t in types:
        if t == "model":
            out.append(Scope("model", "model", "", -1, tuple(li["name"] for li in info)))
        elif t == "kind":
            for k in dict.fromkeys(li["kind"] for li in info):
                out.append(Scope(f"kind:{k}", "kind", k, -1, tuple(li["name"] for li in info if li["kind"] == k)))
        elif t == "block":
            for b in sorted({int(li["block"]) for li in info if int(li["block"]) >= 0}):
                out.append(Scope(f"block:{b:02d}", "block", "", b,
                                 tuple(li["name"] for li in info if int(li["block"]) == b)))
        else:
            out += [Scope(li["name"], "layer", li["kind"], int(li["block"]), (li["name"],)) for li in info]
    return out


def weight_scopes(layers: Iterable, types: Sequence[str], param_names: Sequence[str]) -> list[Scope]:
    """`scopes_of` with each scope's `params` set to its layers' ``.weight`` parameters.

    Raises:
        ModelError: a selected layer without a trainable ``weight`` (the message names it).
    """
    have = set(param_names)
    layers = [_info(li) for li in layers]
    for li in layers:
        if f"{li['name']}.weight" not in have:
            raise ModelError(f"layer {li['name']!r} has no trainable weight parameter; exclude it (--exclude)")
    return [replace(s, params=tuple(dict.fromkeys(f"{n}.weight" for n in s.layers))) for s in scopes_of(layers, types)]


def module_scopes(model, blocks=None, per: Sequence[str] = ("model", "block")) -> list[Scope]:
    """Scopes of a plain module: "model" (every trainable parameter), the blocks, and one per tensor.

    Args:
        blocks: None (each direct child module with trainable parameters is a block), a dict
            {block name: regex or list of parameter names}, or a list of regexes (named by themselves).
        per: "model", "block" and/or "layer" (one scope per parameter tensor).

    Raises:
        ValueError: a block that matches no trainable parameter (the message names it).
    """
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter with requires_grad=True")
    if blocks is None:
        groups: dict[str, list[str]] = {}
        for n in named:
            groups.setdefault(n.split(".", 1)[0] if "." in n else n, []).append(n)
    else:
        if isinstance(blocks, str):
            blocks = [blocks]
        items = blocks.items() if isinstance(blocks, Mapping) else [(b, b) for b in blocks]
        groups = {}
        for bname, sel in items:
            if isinstance(sel, str):
                rx = re.compile(sel)
                got = [n for n in named if rx.search(n)]
            else:
                sel = list(sel)
                unknown = [s for s in sel if s not in named]
                if unknown:
                    raise ValueError(f"block {bname!r}: unknown parameter name(s) {unknown[:5]}; the model has e.g. "
                                     f"{named[:8]}")
                got = [n for n in named if n in set(sel)]
            if not got:
                raise ValueError(f"block {bname!r} ({sel!r}) matches no trainable parameter; the model has e.g. "
                                 f"{named[:8]}")
            groups[str(bname)] = got
    out: list[Scope] = []
    if "model" in per:
        out.append(Scope("model", "model", "", -1, params=tuple(named)))
    if "block" in per:
        out += [Scope(f"block:{b}", "block", "", i, params=tuple(ps)) for i, (b, ps) in enumerate(groups.items())]
    if "layer" in per:
        out += [Scope(n, "layer", n.rsplit(".", 1)[-1], -1, params=(n,)) for n in named]
    if not out:
        raise ValueError(f"per={tuple(per)!r} selects no scope for a plain module (use model, block or layer)")
    return out
