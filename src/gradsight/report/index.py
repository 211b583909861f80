"""The index page of a run tree: one self-contained page that links every report below a folder.

    render_index("runs/demo")            # writes runs/demo/index.html, returns its path
    render_index("runs", "all.html")     # any user's tree, the page anywhere (links are relative to it)

Every directory at or below the root that holds a ``manifest.json`` is a run (the root itself may be one,
as with the full `gradsight demo`, whose layers run sits in OUT itself). For each run the page shows a
relative link to its ``report.html`` (or how to write it), the analysis, model, data, status (finished or
not, examples skipped), the elapsed time recorded in its manifest, and its key findings: the first finding
of its report page (title and first two sentences), the others folded below. The findings are computed by
the analysis' own report module, from the run's tables only (the registry's ``report.findings``); an analysis
that declares none (e.g. a plugin) is listed without findings.

Reads run directories only, never a model. Escaping rules of every page (`report.kit`): jinja2
autoescaping for every string (paths, group names inside findings, model ids), links percent-encoded, no
external URL, no plotly (the page is small); its only script is an inline row filter that reads no data.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from .kit import render_page

__all__ = ["render_index", "find_runs", "index_rows", "run_findings", "KEY_LINES"]

KEY_LINES = 2  # sentences of the first finding shown as the run's key findings
SKIP_DIRS = {"__pycache__", "node_modules"}


def find_runs(root: Path | str) -> list[Path]:
    """Every run directory (a folder with manifest.json) at or below `root`, in path order.

    Hidden folders and symbolic links to folders are not followed; a run's own folders are searched too
    (a run may hold others, like the full demo's)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith(".") and s not in SKIP_DIRS)
        if "manifest.json" in files:
            runs.append(Path(d))
    return sorted(runs, key=lambda p: p.relative_to(root).parts)


def _findings_of(analysis: str) -> Callable[[Path], list] | None:
    """The registered analysis' findings function (None: unknown analysis, or it declares none)."""
    from ..runs import registry

    try:
        return registry.report_of(analysis).findings
    except registry.UnknownAnalysis:
        return None


def run_findings(run_dir: Path | str, analysis: str | None = None) -> list[dict]:
    """The findings of a run's report page ([] for an analysis that declares none)."""
    run_dir = Path(run_dir)
    if analysis is None:
        analysis = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("analysis", "layers")
    fn = _findings_of(analysis)
    return [] if fn is None else list(fn(run_dir))


def _elapsed(s) -> str:
    from ..runs.progress import format_duration

    try:
        return format_duration(float(s)) if s is not None else "–"
    except (TypeError, ValueError):
        return "–"


def _href(target: Path, base: Path) -> str:
    """`target` relative to the folder `base`, percent-encoded (a folder named "a:b" is not a URL scheme)."""
    rel = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return "./" + quote(rel, safe="/")


def _row(run_dir: Path, root: Path, base: Path) -> dict:
    rel = run_dir.relative_to(root).as_posix()
    report = run_dir / "report.html"
    row = {"path": rel, "href": _href(report, base) if report.exists() else None, "run_dir": str(run_dir),
           "analysis": "?", "model": "(unknown)", "data": "(unknown)", "n_records": None, "finished": False,
           "status": "unreadable", "detail": "", "elapsed_s": None, "elapsed": "–", "created": "",
           "key": None, "more": [], "n_findings": 0, "notes": []}
    try:
        man = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(man, dict):
            raise ValueError("manifest.json is not a JSON object")
    except (OSError, ValueError) as e:
        row["notes"].append(f"manifest.json could not be read: {type(e).__name__}: {e}")
        return row
    model, data = man.get("model") or {}, man.get("data") or {}
    finished = bool(man.get("finished"))
    detail = []
    if man.get("n_ok") is not None:
        detail.append(f"{man['n_ok']} ok")
    if man.get("n_skipped"):
        detail.append(f"{man['n_skipped']} skipped")
    row.update(analysis=str(man.get("analysis", "layers")), model=str(model.get("id") or "(unknown)"),
               data=str(data.get("path") or "(unknown)"), n_records=data.get("n_records"), finished=finished,
               status="finished" if finished else "not finished", detail=", ".join(detail),
               elapsed_s=man.get("elapsed_s"), elapsed=_elapsed(man.get("elapsed_s")),
               created=str(man.get("created") or ""))
    if not finished:
        row["notes"].append("the run has not finished: rerun its command to resume it.")
    if _findings_of(row["analysis"]) is None:
        row["notes"].append(f"no findings summary for {row['analysis']} runs on this page; see the report.")
        return row
    try:
        found = [f for f in run_findings(run_dir, row["analysis"]) if f.get("lines")]
    except Exception as e:  # a partial or damaged run must not prevent the index
        row["notes"].append(f"findings could not be computed: {type(e).__name__}: {e}")
        return row
    if found:
        first = found[0]
        row["key"] = {"title": str(first["title"]), "lines": [str(x) for x in first["lines"][:KEY_LINES]]}
        rest = [str(x) for x in first["lines"][KEY_LINES:]]
        row["more"] = ([{"title": row["key"]["title"], "lines": rest}] if rest else []) + [
            {"title": str(f["title"]), "lines": [str(x) for x in f["lines"]]} for f in found[1:]]
        row["n_findings"] = sum(len(f["lines"]) for f in found)
    return row


def index_rows(root: Path | str, base: Path | str | None = None) -> list[dict]:
    """One dict per run below `root` (see the module docstring), links relative to the folder `base`
    (default: `root`); ordered by analysis (the registered order) then path."""
    from ..runs import registry

    root = Path(root)
    base = Path(base) if base is not None else root
    rows = [_row(d, root, base) for d in find_runs(root)]
    rank = {name: i for i, name in enumerate(registry.names())}
    return sorted(rows, key=lambda r: (rank.get(r["analysis"], len(rank)), r["path"].split("/")))


def render_index(root: Path | str, out: Path | str | None = None, *, title: str | None = None,
                 wall_s: float | None = None, intro: str | None = None) -> Path:
    """Write the index page of the run tree `root` to `out` (default ROOT/index.html); returns its path.

    Args:
        root: a folder; every folder at or below it with a manifest.json is listed (none: an empty list).
        out: the page (its links are relative to its folder, so keep them together when moving them).
        title: the page title (default "gradsight runs: ROOT").
        wall_s: the wall time of the command that wrote the tree (shown next to the runs' own times, which
            are what each run's manifest records: model loading and computing, not the reports).
        intro: one plain-text paragraph under the title (escaped like everything else).
    """
    root = Path(root)
    path = Path(out) if out is not None else root / "index.html"
    rows = index_rows(root, path.parent)
    times = [float(r["elapsed_s"]) for r in rows if isinstance(r["elapsed_s"], (int, float))]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["analysis"]] = counts.get(r["analysis"], 0) + 1
    ctx = {
        "generator": "gradsight index", "title": title or f"gradsight runs: {root}", "intro": intro or "",
        "root": str(root), "rows": rows, "n_finished": sum(r["finished"] for r in rows),
        "counts": sorted(counts.items()), "sum_elapsed": _elapsed(sum(times)) if times else "–",
        "wall": _elapsed(wall_s) if wall_s is not None else "",
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return render_page("index.html", ctx, path)
