"""Progress: plain lines when stdout is not a terminal, log-file lines, rate and ETA; bad --out directories."""

from __future__ import annotations

import io
import os

import pytest

from gradsight.runs.progress import Progress, RunLog, format_duration
from gradsight.runs.store import RunMismatchError, check_run_dir


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_on_a_pipe_with_rate_and_eta(tmp_path):
    clock, out = Clock(), io.StringIO()  # StringIO.isatty() is False: a pipe or a CI log
    log = RunLog(tmp_path / "log.txt")
    with Progress("curvature", 10, noun="scopes", bar=True, log=log, clock=clock, stream=out) as p:
        for i in range(10):
            clock.t += 6.0  # a unit every 6 s
            p.advance(1, what=f"block:{i:02d}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "curvature: 0 of 10 scopes done at start"
    # one line about every 10 s (at 12, 24, 36, 48 s), then the final one
    assert len(lines) == 1 + 4 + 1, lines
    assert lines[1].startswith("curvature: 2/10 scopes") and "ETA 48 s" in lines[1] and "(block:01)" in lines[1]
    assert lines[-1].startswith("curvature: finished: 10/10 scopes") and "elapsed 1 min 00 s" in lines[-1]
    text = (tmp_path / "log.txt").read_text()  # the log gets a line every 30 s plus start and end
    assert "0 of 10 scopes done at start" in text and "finished: 10/10" in text and text.count("\n") == 4


def test_no_plain_lines_without_progress_and_stopped_runs_say_so(tmp_path):
    clock, out = Clock(), io.StringIO()
    with Progress("layers", 3, bar=False, clock=clock, stream=out) as p:
        p.advance(3)
    assert out.getvalue() == ""
    with pytest.raises(KeyboardInterrupt):
        with Progress("layers", 3, bar=True, clock=clock, stream=out) as p:
            raise KeyboardInterrupt
    assert out.getvalue().splitlines()[-1].startswith("layers: stopped: 0/3")


def test_format_duration():
    assert [format_duration(x) for x in (0.4, 42, 185, 3725, None)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min", "?"]


def test_bad_out_directories_are_refused_early(tmp_path, monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RunMismatchError, match="is a file, not a run directory"):
        check_run_dir(f)
    with pytest.raises(RunMismatchError, match="is a file"):
        check_run_dir(f / "sub" / "run")
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(RunMismatchError, match="not writable"):
        check_run_dir(tmp_path / "new" / "run")


def test_cli_bad_out_is_one_line(tmp_path, capsys, data_file):
    from gradsight.cli import main

    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["layers", "--data", str(data_file), "--out", str(f), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "is a file, not a run directory" in err
