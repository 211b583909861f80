"""The command line keeps every command and option it had before the engine (tests/data/cli_options_v1.json,
captured from the previous release), every --help works, and options map back to Config fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from gradsight.cli import build_app
from gradsight.cli.options import parse, to_args
from gradsight.runs import registry

BEFORE = json.loads((Path(__file__).parent / "data" / "cli_options_v1.json").read_text())


def _commands():
    return typer.main.get_command(build_app()).commands


def test_every_command_and_option_is_kept():
    now = _commands()
    for name, options in BEFORE.items():
        assert name in now, f"command {name!r} is gone"
        have = {spelling: p for p in now[name].params for spelling in [*p.opts, *p.secondary_opts]}
        for o in options:  # matched by the spelling a user types (the parameter's name may differ)
            assert o["opts"][0] in have, (name, o["opts"])
            p = have[o["opts"][0]]
            assert set(o["opts"]) <= set(p.opts) | set(p.secondary_opts), (name, o["name"], p.opts)
            assert p.required == o["required"], (name, o["name"])
            if not o["required"] and o["default"] is not None:
                assert str(p.default) == str(o["default"]), (name, o["name"], p.default, o["default"])


def test_one_command_per_registered_analysis():
    now = _commands()
    for name in registry.names():
        if "lm" in registry.get(name).inputs:
            assert name in now


@pytest.mark.parametrize("command", sorted(BEFORE))
def test_help_of_every_command(command):
    p = subprocess.run([sys.executable, "-m", "gradsight", command, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Usage" in p.stdout


@pytest.mark.parametrize("name", registry.names())
def test_options_round_trip_through_the_command_line(name):
    spec = registry.get(name)
    cfg = spec.Config(**{k: v for k, v in spec.quick.items()})
    args = to_args(spec.Config, spec.quick)
    cmd = typer.main.get_command(build_app()).commands[name]
    ctx = cmd.make_context(name, ["--data", "d.jsonl", "--out", "o", *args])
    values = {k: v for k, v in ctx.params.items() if k not in ("out", "quiet", "no_report")}
    assert spec.Config(**parse(spec.Config, values)) == cfg.updated(data="d.jsonl")
