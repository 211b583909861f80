"""Shared CLI helpers: expected errors become one readable message, never a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rich.console import Console

err_console = Console(stderr=True)

__all__ = ["friendly_errors", "print_summary_on_main", "err_console"]


@contextlib.contextmanager
def friendly_errors():
    from ..capture.grads import CaptureError
    from ..config import OptionError
    from ..inputs.data import DataError
    from ..inputs.models import ModelError
    from ..runs.registry import UnknownAnalysis
    from ..runs.store import RunMismatchError

    try:
        yield
    except (DataError, ModelError, RunMismatchError, CaptureError, OptionError, UnknownAnalysis,
            FileNotFoundError, ValueError) as e:
        kind = {DataError: "data error", ModelError: "model error", RunMismatchError: "run directory",
                CaptureError: "capture error"}.get(type(e), "error")
        err_console.print(f"[bold red]gradsight: {kind}:[/] {e}", markup=True, highlight=False,
                          soft_wrap=True)
        if os.environ.get("GRADSIGHT_DEBUG"):
            raise
        sys.exit(2)


def print_summary_on_main(path: Path, quiet: bool) -> None:
    """The run's terminal summary, on rank 0 only, unless quiet."""
    if quiet or os.environ.get("RANK", "0") != "0":
        return
    from ..report import print_summary

    print_summary(path)
