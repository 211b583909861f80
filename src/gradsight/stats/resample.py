"""Seeded randomness and bootstrap resampling shared by the statistics modules.

- ``rng(seed, *keys)``: a numpy Generator seeded from an integer seed plus the *names* involved (group, pair,
  statistic, ...) through ``numpy.random.SeedSequence`` (names enter as crc32 of their ``str``), so a result
  never depends on dict ordering nor on which other names are present.
- ``boot_weights(n, n_boot, rng)``: bootstrap resamples of n positions as multiplicities, W[r, i] = how often
  position i is drawn in resample r (n draws with replacement per resample).
- ``check_boot_args(n_boot, ci)``: validates the bootstrap arguments.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["rng", "boot_weights", "check_boot_args"]


def rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator seeded from an integer seed and names (crc32, stable across runs and platforms)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF] + [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def boot_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) multiplicities: W[r, i] = how often example i is drawn in resample r (n draws)."""
    draws = rng.integers(0, n, size=(n_boot, n))
    W = np.zeros((n_boot, n))
    np.add.at(W, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    return W


def check_boot_args(n_boot: int, ci: float) -> int:
    """``int(n_boot)`` after checking n_boot >= 1 and 0 < ci < 1 (ValueError otherwise)."""
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    return int(n_boot)
