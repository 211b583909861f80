"""Structure rules of the package: small files, no private names across modules, one name per concept,
a light command-line start, and the engine / registry carrying every analysis."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "gradsight"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _resolve(mods: dict[str, Path], cur: str, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = cur.split(".") if mods[cur].name == "__init__.py" else cur.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def private_uses() -> list[str]:
    """`from X import _y` and `X._y` where X is another gradsight module (dunder names allowed)."""
    mods, hits = _modules(), []
    for cur, f in mods.items():
        tree = ast.parse(f.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _resolve(mods, cur, node.level, node.module)
                for a in node.names:
                    if f"{src}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{src}.{a.name}"
                    elif src.startswith("gradsight") and a.name.startswith("_") and not a.name.startswith("__"):
                        hits.append(f"{cur}:{node.lineno}: from {src} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                hits.append(f"{cur}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return sorted(set(hits))


def test_no_file_is_longer_than_the_limit():
    long = {str(f.relative_to(SRC)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_private_names_cross_module_borders():
    assert private_uses() == []


def test_one_name_per_concept():
    stems = [f.stem for f in PKG.rglob("*.py") if f.stem != "__init__"]
    assert stems.count("geometry") == 0, "the name 'geometry' belongs to the analysis folder only"
    folders = {p.name for p in (PKG / "analyses").iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert {"layers", "geometry", "curvature", "landscape"} <= folders
    # the old drivers are gone: every analysis runs through runs/engine.py
    for old in ("pipeline.py", "geometry.py", "curvature/pipeline.py", "features.py", "landscape.py", "store.py"):
        assert not (PKG / old).exists(), old


def test_command_line_start_stays_light():
    code = ("import sys, gradsight.cli; "
            "print(','.join(m for m in ('pandas', 'transformers', 'plotly', 'jinja2', 'scipy') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"`import gradsight.cli` pulls in {p.stdout.strip()}"


def test_public_names_are_not_shadowed_by_submodules():
    """Importing a submodule sets an attribute of its package: a function named like a module file would be
    replaced by the module (gradsight.select vs a select.py). After importing everything, every public name of
    the front and of each analysis package is still what it says (the analyses package is callable)."""
    import importlib
    import pkgutil
    import types

    import gradsight

    for m in pkgutil.walk_packages(gradsight.__path__, "gradsight."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    packages = [gradsight] + [importlib.import_module(f"gradsight.analyses.{n}") for n in gradsight.analyses()
                              if importlib.util.find_spec(f"gradsight.analyses.{n}") is not None]
    for pkg in packages:
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            assert not isinstance(obj, types.ModuleType) or callable(obj), f"{pkg.__name__}.{name} is a module"
