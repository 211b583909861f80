"""Progress of a run: one bar with rate and ETA in the terminal, the same lines in RUN/log.txt.

`Progress` is used by the engine for every analysis (units done / total, units per second, time left) and
by anything else that loops for a long time. On a terminal the bar is rich's (rank 0, only when asked for);
when stdout is not a terminal (a pipe, a CI log, ``nohup``) it prints a plain line instead, at the start,
about every `print_every_s` seconds and at the end. The log file gets a line at the start, about every
`every_s` seconds and at the end, so a run that is watched with ``tail -f RUN/log.txt`` (or killed and
inspected later) tells how far it got.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["Progress", "RunLog", "format_duration"]


def format_duration(s: float | None) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min' ('?' when unknown)."""
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class RunLog:
    """Append-only text log of a run (RUN/log.txt): time-stamped lines; `echo` also prints them."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None = None):
        self.path = Path(path) if path is not None else None
        self.echo = echo

    def write(self, message: str, *, echo: bool = True) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now().isoformat(timespec="seconds")
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"{stamp} {message}\n")
        if echo and self.echo is not None:
            self.echo(message)


class Progress:
    """Units done out of a total, with rate and ETA; a rich bar when `bar` is True, log lines always.

    Args:
        label: what runs (the analysis name).
        total: units to do in this process (finished units of a resumed run count as done already).
        done: units already done when it starts (a resumed run).
        noun: what a unit is called ("examples", "scopes", ...).
        bar: draw the terminal bar.
        log: a RunLog for the periodic lines (or None).
        every_s: seconds between log lines.
        print_every_s: seconds between plain lines on a stdout that is not a terminal.
        clock: time source (tests). stream: where plain lines go (default sys.stdout).
    """

    def __init__(self, label: str, total: int, *, done: int = 0, noun: str = "units", bar: bool = False,
                 log: RunLog | None = None, every_s: float = 30.0, print_every_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter, stream=None):
        self.label, self.total, self.noun = label, int(total), noun
        self.start_done = self.n = int(done)
        self.log, self.every_s, self.print_every_s, self.clock = log, every_s, print_every_s, clock
        self.t0 = self._last = self._last_print = clock()
        self._bar, self._task = None, None
        self.stream = stream or sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._want_bar = bar and tty
        self._plain = bar and not tty

    def __enter__(self) -> "Progress":
        if self._want_bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}", style="progress.data.speed"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[what]}"), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.n, rate="", what="")
        if self.log is not None:
            self.log.write(f"{self.label}: {self.n} of {self.total} {self.noun} done at start", echo=False)
        if self._plain:
            self._print(f"{self.label}: {self.n} of {self.total} {self.noun} done at start")
        return self

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        state = "stopped" if exc[0] is not None else "finished"
        if self.log is not None:
            self.log.write(f"{self.label}: {state}: {self.line()}", echo=False)
        if self._plain:
            self._print(f"{self.label}: {state}: {self.line()}")

    @property
    def rate(self) -> float | None:
        dt_ = self.clock() - self.t0
        k = self.n - self.start_done
        return k / dt_ if dt_ > 0 and k > 0 else None

    @property
    def eta(self) -> float | None:
        r = self.rate
        return (self.total - self.n) / r if r else None

    def line(self) -> str:
        r = self.rate
        rate = f"{r:.2f} {self.noun}/s" if r is not None and r >= 0.1 else \
            f"{1 / r:.1f} s per unit" if r else "-"
        return (f"{self.n}/{self.total} {self.noun}, {rate}, elapsed {format_duration(self.clock() - self.t0)}, "
                f"ETA {format_duration(self.eta) if self.n < self.total else '0 s'}")

    def advance(self, k: int = 1, what: str = "") -> None:
        """k more units done (`what`: the unit just finished, shown next to the bar)."""
        self.n += k
        if self._bar is not None:
            r = self.rate
            self._bar.update(self._task, advance=k, what=what,
                             rate=f"{r:.2f} {self.noun}/s" if r is not None and r >= 0.1 else
                             f"{1 / r:.1f} s/unit" if r else "")
        now = self.clock()
        if self.log is not None and now - self._last >= self.every_s:
            self._last = now
            self.log.write(f"{self.label}: {self.line()}", echo=False)
        if self._plain and now - self._last_print >= self.print_every_s and self.n < self.total:
            self._last_print = now
            self._print(f"{self.label}: {self.line()}" + (f" ({what})" if what else ""))

    def working_on(self, what: str) -> None:
        """Show the unit now being computed (long units: curvature scopes)."""
        if self._bar is not None:
            self._bar.update(self._task, what=what)


@contextlib.contextmanager
def progress(label: str, total: int, **kw) -> Iterator[Progress]:
    with Progress(label, total, **kw) as p:
        yield p
