"""The data of a `geometry` run's report: its tables, read once, and the small helpers the page, its figures
and the terminal summary share to select rows.

Scopes: every geometry table carries ``scope, scope_type, kind, block``; scope_type is ``model`` (the
whole selected model), ``kind`` (all layers of one kind, e.g. "kind:q"), ``block`` (all selected layers of
one transformer block, e.g. "block:03") or ``layer``. Labels are the ``label`` values of the units
(group, "group:chosen", "group:positive", "group:term", ...); "__all__" (`ALL`) means all units.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ...report.kit import KIND_ORDER, PALETTE, finite, isnan, order, read_table, str_cols

__all__ = ["GeometryData", "load_geometry", "get_table", "scoped", "unordered", "first_row", "pair_row",
           "by_labels", "sqrt_norm", "note_text", "show_label", "pair_name", "ALL", "REQUIRED", "OPTIONAL"]

ALL = "__all__"
REQUIRED = ("group_cosines", "pairs", "coherence", "diversity", "noise")
OPTIONAL = ("terms", "entanglement", "entanglement_summary", "psr_nsr", "scores")
SCOPE_STR = ("scope", "scope_type", "kind")
STR_COLS = {
    "examples": ["id", "group", "source", "status", "reason", "prompt", "response", "term", "role", "label"],
    "group_cosines": SCOPE_STR + ("group_a", "group_b"),
    "pairs": SCOPE_STR + ("group_a", "group_b", "note"),
    "coherence": SCOPE_STR + ("group", "note"),
    "terms": SCOPE_STR + ("term_a", "term_b", "note"),
    "entanglement": SCOPE_STR + ("id", "group", "regime"),
    "entanglement_summary": SCOPE_STR,
    "psr_nsr": SCOPE_STR + ("group",),
    "diversity": ("label",),
    "noise": ("label", "layer", "kind"),
    "scores": ("id", "group", "term", "label", "target"),
}


def sqrt_norm(x: Any) -> float:
    """sqrt of a squared norm; NaN when missing or negative."""
    return math.sqrt(float(x)) if finite(x) and float(x) >= 0 else float("nan")


def note_text(x: Any) -> str:
    """A table's note column as text ("" when missing)."""
    return "" if isnan(x) else str(x).strip()


def show_label(label: str, all_name: str = "all units") -> str:
    """A label for display: `all_name` for "__all__"."""
    return all_name if label == ALL else label


def pair_name(a: str, b: str) -> str:
    """'within a' for a == b, else 'a vs b'."""
    return f"within {a}" if a == b else f"{a} vs {b}"


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GeometryData:
    run_dir: Path
    manifest: dict
    tables: dict[str, pd.DataFrame | None]
    notes: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def colors(self) -> dict[str, str]:
        return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(self.labels)}


def load_geometry(run_dir: Path | str) -> GeometryData:
    """Read the tables of a geometry run (missing required tables become notes; optional ones are skipped).

    Raises:
        FileNotFoundError: no manifest.json in run_dir.
        ValueError: the manifest names another analysis (e.g. a ``layers`` run: use ``render_html``).
    """
    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{run_dir} is not a gradsight run directory (no manifest.json)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    analysis = manifest.get("analysis")
    if analysis not in (None, "geometry"):
        raise ValueError(f"{run_dir} holds a {analysis!r} run, not a geometry run")
    notes: list[str] = []
    if analysis is None:
        notes.append("manifest.json does not name its analysis; read as a geometry run.")
    tables: dict[str, pd.DataFrame | None] = {}
    for name in ("examples",) + REQUIRED:
        tables[name] = str_cols(read_table(run_dir / f"{name}.parquet", notes, f"{name} table"), STR_COLS[name])
    for name in OPTIONAL:
        p = run_dir / f"{name}.parquet"
        tables[name] = str_cols(read_table(p, notes, f"{name} table"), STR_COLS[name]) if p.exists() else None
    ex = tables["examples"]
    if ex is not None and "idx" in ex:
        tables["examples"] = ex.sort_values("idx", kind="stable").reset_index(drop=True)

    seen: list[str] = []
    if ex is not None and "label" in ex:
        seen += list(ex["label"])
    for name, cols in (("coherence", ("group",)), ("group_cosines", ("group_a", "group_b")), ("diversity", ("label",))):
        df = tables[name]
        for c in cols:
            if df is not None and c in df:
                seen += list(df[c])
    labels = [x for x in dict.fromkeys(seen) if x and x != ALL]
    kinds: list[str] = []
    for df in tables.values():
        if df is not None and "kind" in df:
            kinds += [k for k in df["kind"] if k and k != "nan"]
    return GeometryData(run_dir=run_dir, manifest=manifest, tables=tables, notes=notes, labels=labels,
                        kinds=order(kinds, KIND_ORDER))


def get_table(tables: Mapping[str, pd.DataFrame | None] | GeometryData, name: str) -> pd.DataFrame | None:
    """The table `name` (a GeometryData or a name -> DataFrame mapping), None when absent or empty."""
    df = tables[name] if isinstance(tables, GeometryData) else tables.get(name)
    return None if df is None or df.empty else df


def scoped(df: pd.DataFrame | None, scope_type: str) -> pd.DataFrame:
    """Rows of one scope type (model rows also by scope name, for tables written before scope_type)."""
    if df is None or df.empty:
        return pd.DataFrame()
    if "scope_type" in df:
        out = df[df["scope_type"] == scope_type]
        if out.empty and scope_type == "model" and "scope" in df:
            out = df[df["scope"] == "model"]
        return out
    return df if scope_type == "model" else pd.DataFrame()


def unordered(df: pd.DataFrame, a: str = "group_a", b: str = "group_b", diagonal: bool = False) -> pd.DataFrame:
    """One row per scope and unordered pair {a, b} (first occurrence); the diagonal a == b only if asked."""
    if df.empty:
        return df
    scope = df["scope"] if "scope" in df else pd.Series([""] * len(df), index=df.index)
    keys = [(s, frozenset((x, y))) for s, x, y in zip(scope, df[a], df[b])]
    keep = ~pd.Series(keys, index=df.index).duplicated()
    if not diagonal:
        keep &= df[a] != df[b]
    return df[keep]


def first_row(df: pd.DataFrame, **eq: Any) -> dict | None:
    """The first row whose columns equal `eq`, as a dict (None if there is none)."""
    for c, v in eq.items():
        df = df[df[c] == v]
    return df.iloc[0].to_dict() if len(df) else None


def pair_row(pairs: pd.DataFrame, a: str, b: str) -> dict | None:
    """The first row of the pair (a, b) in either order, as a dict (None if there is none)."""
    if pairs.empty:
        return None
    m = ((pairs["group_a"] == a) & (pairs["group_b"] == b)) | ((pairs["group_a"] == b) & (pairs["group_b"] == a))
    d = pairs[m]
    return d.iloc[0].to_dict() if len(d) else None


def by_labels(df: pd.DataFrame, data: GeometryData, *cols: str) -> pd.DataFrame:
    """Rows sorted by the run's label order (the tables sort labels by name)."""
    if df.empty:
        return df
    rank = {g: i for i, g in enumerate(data.labels)}
    keys = [df[c].map(lambda g: rank.get(g, len(rank))) for c in cols]
    idx = sorted(range(len(df)), key=lambda i: tuple(int(k.iloc[i]) for k in keys))
    return df.iloc[idx]
