"""Options of `gradsight layers`."""

from __future__ import annotations

from ...config import (Batching, EncodeOptions, LayerSelection, LossOptions, RunOptions, SpectraOptions,
                       SummaryOptions, config, group)

__all__ = ["LayersConfig"]


@config
class LayersConfig:
    """Options of `gradsight layers` (per-example, per-layer gradient spectra compared across groups)."""

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    loss: LossOptions = group(LossOptions)
    svd: SpectraOptions = group(SpectraOptions)
    batching: Batching = group(Batching, resume=False)
    summary: SummaryOptions = group(SummaryOptions, resume=False)
