"""Placeholder page (replaced by the report module)."""
from __future__ import annotations
from pathlib import Path
def render(run_dir, out=None) -> Path:
    p = Path(out) if out else Path(run_dir) / "report.html"
    p.write_text("<!DOCTYPE html><html><body>importance</body></html>")
    return p
def print_summary(run_dir, console=None):
    pass
def run_findings(run_dir):
    return []
