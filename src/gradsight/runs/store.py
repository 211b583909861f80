"""The run directory: manifest, shard tables, atomic writes, one resume rule, config guard.

    RUN/manifest.json      schema version, identity (analysis, semantic config, model fingerprint, data hash,
                           the analysis' extra identity), config, versions, world size, analysis blocks
    RUN/log.txt            progress lines, resume and finish messages
    RUN/<shards>           per the analysis' `Layout`: e.g. examples/r{rank}-{seq:05d}.parquet,
                           features/r{rank}-{seq:05d}.safetensors, scopes/{i:04d}.{table}.parquet
    RUN/<table>.parquet    the final tables (written by the analysis' summarize)

One resume rule for every analysis: a commit writes its tables' shards in the layout's order and the marker
table (the last) last, each atomically (temp file + os.replace). A unit is done iff its key is in a marker
shard; shards of a commit without its marker (a run killed between two writes) are removed when the run
resumes. So a killed run loses at most one commit, and a rerun produces exactly the tables of an
uninterrupted run. Tensors are written as safetensors (never pickle); their unit ids go in "__idx__".
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

__all__ = ["SCHEMA_VERSION", "RunStore", "RunMismatchError", "check_run_dir", "Layout", "Tensors", "atomic_write_bytes",
           "atomic_write_text", "write_parquet", "write_safetensors", "read_manifest", "read_layer_stats",
           "read_examples", "read_features", "read_shards", "merge_shards", "concat_tables", "versions", "EXAMPLE_COLUMNS"]

SCHEMA_VERSION = 2
_RANK_KEY = re.compile(r"^r(\d+)-(\d+)$")

EXAMPLE_COLUMNS = ["idx", "id", "group", "source", "status", "reason", "n_tokens", "n_target", "loss",
                   "prompt", "response"]


class RunMismatchError(RuntimeError):
    """The run directory holds results of a different configuration, or cannot be a run directory."""


def check_run_dir(path: Path) -> None:
    """Refuse early (before any model loads) an output that cannot become a run directory: an existing file,
    or a place where the directory cannot be created (the first existing ancestor is not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunMismatchError(f"{path} is a file, not a run directory; choose another --out")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunMismatchError(f"cannot create the run directory {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunMismatchError(f"cannot write the run directory {path}: {probe} is not writable")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as parquet atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors atomically (never pickle)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


@dataclass
class Tensors:
    """A tensor table of a commit: {name: (B, ...) tensor} for the units `ids` (None: not per unit)."""

    tensors: dict[str, Any]
    ids: list | None = None
    metadata: dict[str, str] | None = None


def concat_tables(parts: list) -> Any:
    """One commit's table from the parts of several batches (DataFrames or Tensors)."""
    if isinstance(parts[0], pd.DataFrame):
        parts = [p for p in parts if not p.empty] or parts[:1]
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
    import torch

    keys = parts[0].tensors.keys()
    ids = None if parts[0].ids is None else [i for p in parts for i in p.ids]
    return Tensors({k: torch.cat([p.tensors[k] for p in parts]) for k in keys}, ids, parts[0].metadata)


@dataclass(frozen=True)
class Layout:
    """Where an analysis' shards go.

    Attributes:
        tables: the shard tables in commit order; the last is the done marker.
        templates: table -> path template relative to the run ("{table}", "{key}"; "*" for the rest); the
            suffix (.parquet or .safetensors) is added.
        unit_column: the marker table's column holding the unit keys.
    """

    tables: tuple[str, ...] = ("layer_stats", "examples")
    templates: Mapping[str, str] = field(default_factory=lambda: {"*": "{table}/{key}"})
    unit_column: str = "idx"

    @property
    def marker(self) -> str:
        return self.tables[-1]

    def template(self, table: str) -> str:
        return self.templates.get(table, self.templates.get("*", "{table}/{key}"))

    def path(self, run: Path, table: str, key: str, suffix: str) -> Path:
        return Path(run) / (self.template(table).format(table=table, key=key) + suffix)

    def shards(self, run: Path, table: str) -> dict[str, Path]:
        """key -> file of every shard of `table` (templates without {key} hold one file, key "")."""
        tpl = self.template(table)
        if "{key}" not in tpl:
            out = {}
            for suffix in (".parquet", ".safetensors"):
                p = Path(run) / (tpl.format(table=table) + suffix)
                if p.exists():
                    out[""] = p
            return out
        pre, post = tpl.format(table=table, key="\0").split("\0")
        base = Path(run) / pre
        d, head = (base.parent, base.name) if not pre.endswith("/") else (base, "")
        if not d.exists():
            return {}
        out = {}
        for f in d.iterdir():
            name = f.name
            for suffix in (".parquet", ".safetensors"):
                end = post + suffix
                if name.startswith(head) and name.endswith(end) and not name.startswith("."):
                    key = name[len(head):len(name) - len(end)]
                    if key and "/" not in key:
                        out[key] = f
        return out

    def dirs(self, run: Path) -> set[Path]:
        return {self.path(run, t, "x", "").parent for t in self.tables} | {Path(run)}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("gradsight", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_manifest(run: Path) -> dict:
    p = Path(run) / "manifest.json"
    if not p.exists():
        raise FileNotFoundError(f"{run}: not a gradsight run directory (no manifest.json)")
    return json.loads(p.read_text())


def _read_dir(d: Path) -> pd.DataFrame | None:
    files = sorted(f for f in d.glob("r*-*.parquet") if _RANK_KEY.match(f.stem)) if d.exists() else []
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_shards(run: Path, table: str) -> pd.DataFrame | None:
    """Every committed shard of a table (all ranks, in rank-then-key order), or None when it has none."""
    return _read_dir(Path(run) / table)


def read_layer_stats(run: Path) -> pd.DataFrame:
    """All layer-stats shards of a run, sorted by (idx, layer, metric)."""
    df = _read_dir(Path(run) / "layer_stats")
    if df is None:
        return pd.DataFrame(columns=["idx", "group", "layer", "block", "kind", "metric", "value"])
    return df.sort_values(["idx", "layer", "metric"], kind="stable").reset_index(drop=True)


def read_examples(run: Path) -> pd.DataFrame:
    """examples.parquet if merged, else the shards; sorted by idx."""
    run = Path(run)
    merged = run / "examples.parquet"
    df = pd.read_parquet(merged) if merged.exists() else _read_dir(run / "examples")
    if df is None:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    return df.sort_values("idx", kind="stable").reset_index(drop=True)


def merge_shards(run: Path, table: str = "examples", unit_column: str = "idx") -> pd.DataFrame:
    """Write RUN/{table}.parquet from the table's per-rank shards (sorted, one row per unit); returns it.

    Without shards (a run read back later), the merged file as it is."""
    run = Path(run)
    df = _read_dir(run / table)
    if df is None:
        return read_examples(run) if table == "examples" else pd.read_parquet(run / f"{table}.parquet")
    df = df.sort_values(unit_column, kind="stable").drop_duplicates(unit_column, keep="first").reset_index(drop=True)
    if table == "examples":
        df = df[EXAMPLE_COLUMNS + [c for c in df.columns if c not in EXAMPLE_COLUMNS]]
    write_parquet(df, run / f"{table}.parquet")
    return df


def read_features(run: Path, layers: list[str] | None = None):
    """(idx (n,) int64, {layer: (n, D) tensor}) from all feature shards of a run, sorted by idx.

    Shards hold one tensor per layer (key = layer name) and "__idx__". Loaded with safetensors (no pickle).
    """
    import torch
    from safetensors.torch import load_file

    d = Path(run) / "features"
    files = sorted(f for f in d.glob("r*-*.safetensors")) if d.exists() else []
    if not files:
        return torch.zeros(0, dtype=torch.int64), {}
    parts = [load_file(str(f)) for f in files]
    idx = torch.cat([p["__idx__"] for p in parts])
    order = torch.argsort(idx)
    names = layers or [k for k in parts[0] if k != "__idx__"]
    return idx[order], {n: torch.cat([p[n] for p in parts])[order] for n in names}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (in the run) vs {b!r} (now)"]


class RunStore:
    """One rank's view of a run directory, for an analysis' shard `layout`."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1, layout: Layout | None = None):
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self.layout = layout or Layout()
        self._seq: int | None = None

    # identity -------------------------------------------------------------------------------------------
    def open(self, identity: dict, extra: dict) -> dict:
        """Create the manifest (rank 0) or check an existing one; returns the manifest.

        Args:
            identity: what defines the results (analysis, semantic config, model fingerprint, data hash); a
                run directory whose identity differs is refused with the differing keys.
            extra: informational fields (versions, world size, full config).
        """
        mpath = self.path / "manifest.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if old.get("schema_version") != SCHEMA_VERSION:
                raise RunMismatchError(f"{self.path}: schema version {old.get('schema_version')} "
                                       f"!= {SCHEMA_VERSION} (written by another gradsight version); use a new "
                                       "output directory")
            diffs = _diff(old.get("identity", {}), json.loads(json.dumps(identity, default=str)))
            if diffs:
                raise RunMismatchError(
                    f"{self.path} holds a run with a different configuration; refusing to mix results.\n  "
                    + "\n  ".join(diffs[:10]) + "\nUse another --out directory, or delete this one.")
            return old
        if self.path.exists() and any(p for p in self.path.iterdir() if not p.name.startswith(".")):
            raise RunMismatchError(f"{self.path} exists, is not empty and has no manifest.json; "
                                   "refusing to write into it")
        manifest = {"schema_version": SCHEMA_VERSION, "identity": identity, **extra,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if self.rank == 0:
            atomic_write_text(mpath, json.dumps(manifest, indent=2, default=str))
        return json.loads(json.dumps(manifest, default=str))

    def update_manifest(self, **fields) -> None:
        if self.rank != 0:
            return
        m = read_manifest(self.path)
        m.update(fields)
        atomic_write_text(self.path / "manifest.json", json.dumps(m, indent=2, default=str))

    # shards ---------------------------------------------------------------------------------------------
    def cleanup(self) -> int:
        """Remove temp files and the shards of unfinished commits (no marker shard); returns how many."""
        n = 0
        for d in self.layout.dirs(self.path):
            if d.exists():
                for f in d.glob(".*.tmp"):
                    f.unlink(missing_ok=True)
                    n += 1
        done = set(self.layout.shards(self.path, self.layout.marker))
        for table in self.layout.tables[:-1]:
            if "{key}" not in self.layout.template(table):
                continue
            for key, f in self.layout.shards(self.path, table).items():
                if key not in done:
                    f.unlink(missing_ok=True)
                    n += 1
        return n

    def done(self) -> set:
        """Keys of every unit in a marker shard (any rank)."""
        col = self.layout.unit_column
        out: set = set()
        for f in self.layout.shards(self.path, self.layout.marker).values():
            try:
                df = pd.read_parquet(f, columns=[col])
            except Exception:  # a torn file cannot exist (atomic writes); never trust a foreign one
                continue
            out.update(v.item() if hasattr(v, "item") else v for v in df[col].unique())
        return out

    def next_key(self) -> str:
        """This rank's next commit key "r{rank}-{seq:05d}" (after every shard of any table it wrote).

        The directory is scanned once; later keys count on from there (this process is the only writer of
        its rank's shards)."""
        if self._seq is None:
            seqs = [int(m.group(2)) for t in self.layout.tables for k in self.layout.shards(self.path, t)
                    if (m := _RANK_KEY.match(k)) and int(m.group(1)) == self.rank]
            self._seq = 1 + max(seqs, default=-1)
        key = f"r{self.rank}-{self._seq:05d}"
        self._seq += 1
        return key

    def write(self, table: str, key: str, value: Any) -> None:
        """One shard: a DataFrame as parquet, Tensors as safetensors (unit ids as "__idx__")."""
        if isinstance(value, Tensors):
            import torch

            tensors = dict(value.tensors)
            if value.ids is not None:
                tensors["__idx__"] = torch.tensor(value.ids, dtype=torch.int64)
            write_safetensors(tensors, self.layout.path(self.path, table, key, ".safetensors"), value.metadata)
        else:
            if table == "examples":
                value = value[EXAMPLE_COLUMNS + [c for c in value.columns if c not in EXAMPLE_COLUMNS]]
            write_parquet(value, self.layout.path(self.path, table, key, ".parquet"))

    def commit(self, tables: Mapping[str, Any], key: str | None = None) -> str:
        """Write one commit's shards in layout order, the marker last; returns the key used."""
        key = key or self.next_key()
        unknown = set(tables) - set(self.layout.tables)
        if unknown:
            raise ValueError(f"tables {sorted(unknown)} are not in the layout {self.layout.tables}")
        for table in self.layout.tables:
            value = tables.get(table)
            if value is None or (isinstance(value, pd.DataFrame) and value.empty and table != self.layout.marker):
                continue
            self.write(table, key, value)
        return key
