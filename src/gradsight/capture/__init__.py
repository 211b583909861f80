"""How per-example gradients are obtained: factored hooks, torch.func, and a per-example loop reference."""

from .grads import CaptureError, DenseGrad, FactoredGrad
from .hooks import Tape, capture, is_conv1d, is_factorable
from .loop import loop_grads

__all__ = ["capture", "Tape", "FactoredGrad", "DenseGrad", "CaptureError", "loop_grads",
           "is_factorable", "is_conv1d"]

import sys
import types


class _CapturePackage(types.ModuleType):
    """`from gradsight import capture` gives this package whichever way it is reached; calling it is
    `capture.capture(...)`, the context manager (one name, one meaning)."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CapturePackage
