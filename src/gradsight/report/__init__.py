"""Reports of a saved run: a self-contained HTML page and a compact terminal summary.

Both read the run directory only (manifest.json and the parquet tables); neither loads a model nor
recomputes statistics.
"""

from .html import render_html
from .terminal import print_summary

__all__ = ["render_html", "print_summary"]
