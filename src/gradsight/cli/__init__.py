"""The `gradsight` command line: one file per subcommand (typer)."""

from __future__ import annotations

import sys

import typer

from . import curvature as _curvature
from . import demo as _demo
from . import env as _env
from . import geometry as _geometry
from . import landscape as _landscape
from . import layers as _layers
from . import report as _report
from . import select as _select
from ._common import friendly_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gradsight: per-example, per-layer gradient statistics of neural networks.")
app.command("layers")(_layers.layers)
app.command("geometry")(_geometry.geometry)
app.command("curvature")(_curvature.curvature)
app.command("landscape")(_landscape.landscape)
app.command("report")(_report.report)
app.command("demo")(_demo.demo)
app.command("select")(_select.select)
app.command("env")(_env.env)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; expected errors become one clear line and exit code 2."""
    with friendly_errors():
        app(args=argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
