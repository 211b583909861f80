"""Shared CLI helpers: expected errors become one readable message, never a traceback."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console

err_console = Console(stderr=True)


@contextlib.contextmanager
def friendly_errors():
    from ..capture.grads import CaptureError
    from ..inputs.data import DataError
    from ..inputs.models import ModelError
    from ..runs.store import RunMismatchError

    try:
        yield
    except (DataError, ModelError, RunMismatchError, CaptureError, FileNotFoundError, ValueError) as e:
        kind = {DataError: "data error", ModelError: "model error", RunMismatchError: "run directory",
                CaptureError: "capture error"}.get(type(e), "error")
        err_console.print(f"[bold red]gradsight: {kind}:[/] {e}", markup=True, highlight=False,
                          soft_wrap=True)
        if os.environ.get("GRADSIGHT_DEBUG"):
            raise
        sys.exit(2)


def split_csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())
