"""The run directory: manifest, append-only parquet shards, atomic writes, resume, config guard.

    RUN/manifest.json                     config, its hash, model fingerprint, data hash, versions, schema
    RUN/layer_stats/r{rank}-{seq}.parquet per-example x layer x metric rows (append-only)
    RUN/examples/r{rank}-{seq}.parquet    one row per finished (or skipped) example
    RUN/examples.parquet, summary.parquet, mad.parquet, rd.parquet, tests.parquet, report.html

A shard pair is committed by writing layer_stats first and examples second, each atomically (temp file +
os.replace). An example counts as done iff it has an examples row; layer_stats shards without their
examples twin (a run killed between the two writes) are removed when the run resumes. So a killed run loses
at most one flush, and a rerun produces exactly the tables of an uninterrupted run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["SCHEMA_VERSION", "RunStore", "RunMismatchError", "atomic_write_bytes", "atomic_write_text",
           "write_parquet", "read_manifest", "read_layer_stats", "read_examples", "versions"]

SCHEMA_VERSION = 1
_SHARD_RE = re.compile(r"^r(\d+)-(\d+)\.parquet$")

EXAMPLE_COLUMNS = ["idx", "id", "group", "source", "status", "reason", "n_tokens", "n_target", "loss",
                   "prompt", "response"]


class RunMismatchError(RuntimeError):
    """The run directory holds results of a different configuration."""


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
    files = sorted(f for f in d.glob("r*-*.parquet") if _SHARD_RE.match(f.name)) if d.exists() else []
    if not files:
        return None
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


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


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (in the run) vs {b!r} (now)"]


class RunStore:
    """One rank's view of a run directory."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size

    # identity -------------------------------------------------------------------------------------------
    def open(self, identity: dict, extra: dict) -> dict:
        """Create the manifest (rank 0) or check an existing one; returns the manifest.

        Args:
            identity: what defines the results (semantic config, model fingerprint, data hash); a run
                directory whose identity differs is refused with the differing keys.
            extra: informational fields (versions, world size, full config).
        """
        mpath = self.path / "manifest.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if old.get("schema_version") != SCHEMA_VERSION:
                raise RunMismatchError(f"{self.path}: schema version {old.get('schema_version')} "
                                       f"!= {SCHEMA_VERSION}; use a new output directory")
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
    def _shards(self, kind: str) -> dict[str, Path]:
        d = self.path / kind
        return {f.name: f for f in d.glob("r*-*.parquet") if _SHARD_RE.match(f.name)} if d.exists() else {}

    def cleanup(self) -> int:
        """Remove temp files and layer-stats shards without their examples twin; returns how many."""
        n = 0
        for d in (self.path / "layer_stats", self.path / "examples", self.path / "features", self.path):
            if d.exists():
                for f in d.glob(".*.tmp"):
                    f.unlink(missing_ok=True)
                    n += 1
        ex = self._shards("examples")
        for name, f in self._shards("layer_stats").items():
            if name not in ex:
                f.unlink(missing_ok=True)
                n += 1
        fdir = self.path / "features"
        for f in (fdir.glob("r*-*.safetensors") if fdir.exists() else []):
            if f.name.replace(".safetensors", ".parquet") not in ex:  # features of an unfinished flush
                f.unlink(missing_ok=True)
                n += 1
        return n

    def done(self) -> set[int]:
        """idx of every example with an examples row (any rank)."""
        df = _read_dir(self.path / "examples")
        return set() if df is None else set(int(i) for i in df["idx"])

    def _next_seq(self) -> int:
        seqs = [int(m.group(2)) for name in self._shards("examples") | self._shards("layer_stats")
                if (m := _SHARD_RE.match(name)) and int(m.group(1)) == self.rank]
        return 1 + max(seqs, default=-1)

    def append(self, examples: pd.DataFrame, layer_stats: pd.DataFrame | None) -> None:
        """Commit one shard pair: layer stats first, then the examples rows that mark them done."""
        if examples.empty:
            return
        name = f"r{self.rank}-{self._next_seq():05d}.parquet"
        if layer_stats is not None and not layer_stats.empty:
            write_parquet(layer_stats, self.path / "layer_stats" / name)
        cols = EXAMPLE_COLUMNS + [c for c in examples.columns if c not in EXAMPLE_COLUMNS]  # analysis extras
        write_parquet(examples[cols], self.path / "examples" / name)

    def append_features(self, idx: list[int], feats: dict, metadata: dict[str, str] | None = None) -> None:
        """Write one features shard (layer -> (B, D) tensor) for the examples `idx`.

        Call before `append` of the same examples: an example is done only once its examples row exists,
        and feature shards of unfinished examples are ignored on resume (their idx are filtered by done()).
        """
        import torch

        name = f"r{self.rank}-{self._next_seq():05d}.safetensors"
        tensors = dict(feats)
        tensors["__idx__"] = torch.tensor(idx, dtype=torch.int64)
        write_safetensors(tensors, self.path / "features" / name, metadata)

    def merge_examples(self) -> pd.DataFrame:
        """Write RUN/examples.parquet from all examples shards (rank 0)."""
        df = _read_dir(self.path / "examples")
        df = pd.DataFrame(columns=EXAMPLE_COLUMNS) if df is None else df
        df = df.sort_values("idx", kind="stable").drop_duplicates("idx", keep="first").reset_index(drop=True)
        if self.rank == 0:
            write_parquet(df, self.path / "examples.parquet")
        return df
