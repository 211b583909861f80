"""How per-example gradients are obtained: factored hooks, torch.func, and a per-example loop reference."""

from .grads import CaptureError, DenseGrad, FactoredGrad
from .hooks import Tape, capture, is_conv1d, is_factorable
from .loop import loop_grads

__all__ = ["capture", "Tape", "FactoredGrad", "DenseGrad", "CaptureError", "loop_grads",
           "is_factorable", "is_conv1d"]
