"""When a monitor measure runs: every N steps, logarithmically, or by a predicate.

    Schedule.of(1)        every step (the cheap first-order set)
    Schedule.of(50)       steps 0, 50, 100, ...
    Schedule.of("log")    steps 0, 1, 2, 4, 8, ... then every 1000 (dense early, sparse late; Cockpit's idea)
    Schedule.of(fn)       fn(step) -> bool
    Schedule.of(None)     never (the measure is off)

Steps are optimizer steps counted from 0 (the step about to be taken).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A predicate over optimizer steps, with a readable description for the manifest."""

    every: int | None = None
    kind: str = "every"  # "every" | "log" | "never" | "custom"
    fn: Callable[[int], bool] | None = None
    cap: int = 1000  # "log": powers of two up to cap, then every cap steps

    @classmethod
    def of(cls, spec, *, what: str = "schedule") -> "Schedule":
        """A Schedule from an int N >= 1, "log", "log:CAP", a callable, None/0/False (never) or a Schedule."""
        if isinstance(spec, Schedule):
            return spec
        if spec is None or spec is False or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 0):
            return cls(kind="never")
        if isinstance(spec, bool):
            return cls(every=1) if spec else cls(kind="never")
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"{what}: every={spec} makes no sense; use an int >= 1, 'log', a callable or None")
            return cls(every=spec)
        if isinstance(spec, str):
            head, _, tail = spec.partition(":")
            if head == "log":
                cap = 1000
                if tail:
                    if not tail.isdigit() or int(tail) < 1:
                        raise ValueError(f"{what}: {spec!r}: the cap after 'log:' must be an int >= 1")
                    cap = int(tail)
                return cls(kind="log", cap=cap)
            if spec.isdigit():
                return cls.of(int(spec), what=what)
            raise ValueError(f"{what}: {spec!r} is not a schedule; use an int >= 1, 'log', 'log:CAP', a callable "
                             "or None")
        if callable(spec):
            return cls(kind="custom", fn=spec)
        raise ValueError(f"{what}: {spec!r} ({type(spec).__name__}) is not a schedule")

    def __call__(self, step: int) -> bool:
        if self.kind == "never":
            return False
        if self.kind == "every":
            return step % self.every == 0
        if self.kind == "log":
            if step < self.cap:
                return step == 0 or (step & (step - 1)) == 0
            return step % self.cap == 0
        return bool(self.fn(step))

    @property
    def on(self) -> bool:
        return self.kind != "never"

    def describe(self) -> str:
        return {"never": "off", "every": f"every {self.every}", "log": f"log (cap {self.cap})",
                "custom": "custom"}[self.kind]
