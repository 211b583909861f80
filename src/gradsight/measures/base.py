"""Measures: per-batch kernels over captured per-example gradients, with no I/O.

A `Measure` is three pure functions, in the manner of optax's ``init / update``:

    state = m.init()
    state, out = m.update(state, step)     # step: one captured forward/backward (`measures.step.Step`)
    result = m.finalize(state)

``out`` is what the batch yields per example (e.g. ``{layer: (B,)}`` squared norms, ``{layer: (B, D)}``
projected features); ``state`` carries what accumulates across batches (moments, exact Grams). The same
measures serve the offline engine (an analysis' compute), a training monitor (every N steps, outside any run
directory) and gradient transforms. `combine` runs several on one step.

Example:
    >>> m = combine(sq_norms(), spectra())
    >>> state = m.init()
    >>> step = backward_step(model, layers, batch, losses_fn)
    >>> state, out = m.update(state, step)
    >>> out["sq_norms"]["model.layers.0.mlp.down_proj"]      # (B,) float64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Measure", "combine", "stateless"]


@dataclass(frozen=True)
class Measure:
    """A per-batch kernel: ``init() -> state``, ``update(state, step) -> (state, out)``, ``finalize(state)``.

    Attributes:
        name: the key of its output in `combine`.
        init, update, finalize: the three functions (pure; no files, no global state).
    """

    name: str
    init: Callable[[], Any]
    update: Callable[[Any, Any], tuple[Any, Any]]
    finalize: Callable[[Any], Any] = lambda state: state

    def __call__(self, step) -> Any:
        """The per-example output of a single step (no accumulation)."""
        return self.update(self.init(), step)[1]


def stateless(name: str, fn: Callable[[Any], Any]) -> Measure:
    """A measure whose output depends on the batch only: ``fn(step) -> out``."""
    return Measure(name, init=lambda: None, update=lambda state, step: (None, fn(step)),
                   finalize=lambda state: None)


def combine(*measures: Measure) -> Measure:
    """One measure running `measures` on the same step; outputs and results are dicts by name."""
    names = [m.name for m in measures]
    if len(set(names)) != len(names):
        raise ValueError(f"measure names must be unique, got {names}")

    def init():
        return tuple(m.init() for m in measures)

    def update(state, step):
        new, out = [], {}
        for m, s in zip(measures, state):
            s, o = m.update(s, step)
            new.append(s)
            out[m.name] = o
        return tuple(new), out

    def finalize(state):
        return {m.name: m.finalize(s) for m, s in zip(measures, state)}

    return Measure("+".join(names), init, update, finalize)
