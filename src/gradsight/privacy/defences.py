"""Defence specs: one parser for the audit (`gradsight privacy --defences`) and the utility training.

    none                no defence
    clip                per-example clipping at C, no noise (no formal guarantee)
    dp:SIGMA            DP-SGD: flat per-example clipping at C plus N(0, (SIGMA C)^2) on the clipped sum (SIGMA > 0)
    dp-layer:SIGMA      the same with per-layer clipping (one bound per parameter tensor, total C)
    prune:P             zero the smallest fraction P of each gradient tensor (DLG's defence)
    topk:P              keep the largest fraction P of all gradient entries (sparsified updates)
    random:P            zero a random fraction P of the entries (LAMP's --defense_pct_mask)
    quantize:BITS       per-tensor uniform quantisation to BITS bits (2..16)
    noise:SIGMA         N(0, SIGMA^2) on every coordinate of the averaged gradient, no clipping (LAMP's
                        --defense_noise; unbounded sensitivity, so no formal guarantee)

Only dp and dp-layer have an epsilon; the others are heuristics the audit measures.
"""

from __future__ import annotations

import math

__all__ = ["parse_defence", "KINDS", "FORMAL", "transform_for"]

KINDS = ("none", "clip", "dp", "dp-layer", "prune", "topk", "random", "quantize", "noise")
FORMAL = ("dp", "dp-layer")  # the kinds with a formal (epsilon, delta) guarantee
_RANGES = {"dp": "> 0", "dp-layer": "> 0", "prune": "in [0, 1)", "topk": "in (0, 1]", "random": "in [0, 1)",
           "quantize": "an integer in 2..16", "noise": ">= 0"}


def _ok(kind: str, v: float) -> bool:
    if not math.isfinite(v):
        return False
    return {"dp": v > 0, "dp-layer": v > 0, "prune": 0 <= v < 1, "topk": 0 < v <= 1, "random": 0 <= v < 1,
            "quantize": v == int(v) and 2 <= v <= 16, "noise": v >= 0}[kind]


def parse_defence(spec: str) -> tuple[str, float | None]:
    """``"dp:1.5"`` -> ("dp", 1.5); ``"none"`` -> ("none", None); a clear ValueError naming the spec otherwise."""
    kind, colon, arg = str(spec).partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown defence {spec!r}; expected one of none, clip, dp:SIGMA, dp-layer:SIGMA, prune:P, "
                         "topk:P, random:P, quantize:BITS, noise:SIGMA")
    if kind in ("none", "clip"):
        if colon:
            raise ValueError(f"defence {kind!r} takes no value (got {spec!r})")
        return kind, None
    try:
        v = float(arg)
    except ValueError:
        raise ValueError(f"defence {spec!r} needs a number after the colon") from None
    if not _ok(kind, v):
        extra = "; use 'clip' for clipping without noise" if kind in FORMAL else ""
        what = "noise multiplier" if kind in ("dp", "dp-layer", "noise") else "bits" if kind == "quantize" \
            else "fraction"
        raise ValueError(f"defence {spec!r}: the {what} must be {_RANGES[kind]} (got {v:g}){extra}")
    return kind, v


def transform_for(kind: str, value: float, seed: int = 0):
    """The gradient transform of a gradient-only defence (prune, topk, random, quantize, noise), applied to the
    averaged gradient; None for none / clip / dp (those act on per-example gradients)."""
    from ..transforms import privacy as tp

    if kind == "prune":
        return tp.prune_gradients(value)
    if kind == "topk":
        return tp.top_k(value)
    if kind == "random":
        return tp.random_mask(value, seed)
    if kind == "quantize":
        return tp.quantize(int(value))
    if kind == "noise":
        return tp.dp_noise(value, 1.0, 1.0, seed)  # g + SIGMA z: C = 1 and divisor 1
    return None
