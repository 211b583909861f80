"""The `gradsight` command line: one command per registered analysis, plus report, select, demo and env.

An analysis' command is generated from its Config (`cli.options`): every option with its default and help
text, in a panel per option group, plus --out, --no-report and --quiet. Analyses registered by plugins are
found through the ``gradsight.analyses`` entry-point group or the ``GRADSIGHT_PLUGINS`` environment variable
(comma-separated importable modules), so adding one touches no file here.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from ..runs import registry
from . import demo as demo_cmd
from . import env as env_cmd
from . import lds as lds_cmd
from . import report as report_cmd
from . import select as select_cmd
from . import unlearn as unlearn_cmd
from .common import friendly_errors, print_summary_on_main
from .options import command_parameters, config_parameters, parse, with_signature

__all__ = ["build_app", "main", "analysis_command", "load_plugins"]


def load_plugins() -> list[str]:
    """Import plugin modules that register analyses; returns their names."""
    names = [m.strip() for m in os.environ.get("GRADSIGHT_PLUGINS", "").split(",") if m.strip()]
    for name in names:
        importlib.import_module(name)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="gradsight.analyses"):
            ep.load()
            names.append(ep.value)
    except Exception as e:  # a broken third-party plugin must not break the built-in commands
        print(f"gradsight: could not load an analysis plugin: {type(e).__name__}: {e}", file=sys.stderr)
    return names


def analysis_command(spec: registry.Analysis):
    """The typer command of a registered analysis (signature generated from its Config)."""

    def command(**kw):
        out, quiet = kw.pop("out"), kw.pop("quiet")
        no_report = kw.pop("no_report", False)
        cfg = spec.Config(**parse(spec.Config, kw))
        from ..runs.api import run_lm

        run_lm(spec.name, cfg, out, progress=not quiet, report=not no_report)
        print_summary_on_main(out, quiet)

    params = command_parameters() + config_parameters(spec.Config)
    return with_signature(command, params, spec.help)


def build_app() -> typer.Typer:
    """The typer app with every analysis registered now (plugins loaded first)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="gradsight: per-example, per-layer gradient statistics of neural networks.")
    load_plugins()
    for name in registry.names():
        spec = registry.get(name)
        if "lm" in spec.inputs:
            app.command(name, help=spec.help)(analysis_command(spec))
    app.command("report")(report_cmd.report)
    app.command("demo")(demo_cmd.demo)
    app.command("select")(select_cmd.select)
    app.command("env")(env_cmd.env)
    app.command("lds")(lds_cmd.lds)
    app.command("unlearn")(unlearn_cmd.unlearn)
    return app


def main(argv: list[str] | None = None) -> None:
    """Console entry point; expected errors become one clear line and exit code 2."""
    with friendly_errors():
        build_app()(args=argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
