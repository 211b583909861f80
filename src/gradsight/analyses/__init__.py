"""The analyses: one folder each, registered with `gradsight.runs.registry` when imported.

Every folder here is found by `registry.load_builtin()` (no list to edit): ``__init__.py`` declares the
`Analysis` (lazily pointing at its compute, summarize and report modules, so that the command line starts
fast), ``config.py`` its options, ``compute.py`` its units and per-batch work, ``summarize.py`` its final
tables and result type, ``report.py`` its page and terminal summary.
"""

import sys
import types


class _Analyses(types.ModuleType):
    """`gradsight.analyses` is this package and also the front's `gradsight.analyses()`: calling it lists the
    registered analyses (one name for one concept, whichever way it is reached)."""

    def __call__(self) -> list[str]:
        from ..runs.registry import names

        return names()


sys.modules[__name__].__class__ = _Analyses
