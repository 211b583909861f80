"""The attribution report (placeholder page: the run's tables)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...report import kit

__all__ = ["render", "print_summary", "run_findings"]


def _t(run: Path, name: str) -> pd.DataFrame | None:
    p = run / f"{name}.parquet"
    return pd.read_parquet(p) if p.exists() else None


def run_findings(run_dir) -> list[dict]:
    run = Path(run_dir)
    prec = _t(run, "precision")
    out = []
    if prec is not None and len(prec):
        out.append({"title": "same-group precision of the top proponents",
                    "lines": [f"{r.method}: precision@{r.k} {kit.fmt_num(r.precision)} over {r.n_queries} queries"
                              for r in prec.itertuples()]})
    return out


def render(run_dir, out=None) -> Path:
    run = Path(run_dir)
    tables = []
    for name in ("precision", "top", "self_influence", "curvature"):
        df = _t(run, name)
        if df is not None:
            tables.append(kit.table_section(name, df, file=f"{name}.parquet"))
    return kit.render_tables_page(run, out, analysis="attribute", findings=run_findings(run), tables=tables)


def print_summary(run_dir, console=None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    for f in run_findings(run_dir):
        console.print(Text(f["title"], style="bold"))
        for line in f["lines"]:
            console.print(Text("  " + line))
