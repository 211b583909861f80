"""Options of `gradsight importance`."""

from __future__ import annotations

import math

from ...config import (Batching, EncodeOptions, LayerSelection, RunOptions, check_choices, check_positive, config,
                       csv_tuple, group, option)

__all__ = ["ImportanceConfig", "METHODS", "NEEDS", "GROUPS", "DEFAULT_GROUP"]

# method -> the calibration statistics it needs (stats.LayerStats fields; sq_in is always collected)
NEEDS = {"magnitude": (), "wanda": (), "gblm": ("g_sq",), "fisher": ("g_sq",), "taylor": ("g_sum",),
         "salun": ("g_sum",), "neuron": ("neuron",), "sparsegpt": ("xtx",)}
METHODS = tuple(NEEDS)
GROUPS = ("auto", "row", "layer", "global")
# the comparison group of each reference: magnitude per matrix (wanda's lib/prune.py), Wanda / GBLM per output
# row, SalUn over the whole model; Fisher-OBD and Taylor per row like the activation-aware scores
DEFAULT_GROUP = {"magnitude": "layer", "wanda": "row", "gblm": "row", "fisher": "row", "taylor": "row",
                 "salun": "global", "neuron": "row", "sparsegpt": "block"}
NEURON_METHODS = ("neuron", "magnitude", "wanda")


@config
class ImportanceConfig:
    """Options of `gradsight importance` (importance scores, pruning masks applied and evaluated).

    Statistics come from one captured pass over the calibration data (`--data`): per-example losses are token
    MEANS over the supervised tokens (GBLM's convention; use ``--loss-on all`` for plain text). Every
    (method, structure, sparsity) of the grid is applied to a copy of the model and evaluated on
    ``--eval-data`` (perplexity) or, for a plain module, on its batches (loss, accuracy).
    """

    omit = ("flush_every",)  # a shard is written every --batches-per-shard batches

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection)
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    batching: Batching = group(Batching, resume=False)
    methods: tuple[str, ...] = option(("magnitude", "wanda", "gblm", "sparsegpt"),
                                      "scores: magnitude, wanda, gblm, fisher (OBD), taylor, salun, neuron, "
                                      "sparsegpt (the classic reconstruction baseline)")
    sparsities: tuple[float, ...] = option((0.5,), "pruned fractions in (0, 1) (unstructured and neuron masks)")
    structures: tuple[str, ...] = option(("unstructured", "2:4"),
                                         "mask structures: unstructured, N:M (e.g. 2:4, 4:8), neuron")
    group: str = option("auto", "unstructured comparison group: auto (each method's reference: magnitude per "
                                "layer, Wanda/GBLM per row, SalUn global), row, layer, global", choices=GROUPS,
                         cli="--group")
    alpha: float = option(100.0, "GBLM's gradient scale (the reference's 100)")
    sequential: bool = option(True, "calibrate Wanda / GBLM / SparseGPT layer by layer on the outputs of the "
                                    "already pruned blocks (the references' protocol; decoder LMs only)")
    seqlen: int = option(256, "sequential calibration: window length (tokens) cut from the calibration data")
    eval_data: str | None = option(None, "held-out records for the perplexity (.jsonl or a saved dataset, or "
                                         "builtin:heldout = the shipped held-out text; default: the calibration "
                                         "data, flagged in-sample)")
    neuron_layers: str = option(r"(mlp\.down_proj|output\.dense|fc2|c_proj)$",
                                "regex of the layers whose INPUTS are MLP neurons (neuron masks)")
    save_scores: bool = option(True, "write each method's per-weight scores (scores/METHOD.safetensors)",
                               resume=False)
    save_model: str | None = option(None, "save the model pruned by METHOD:STRUCTURE:SPARSITY (e.g. "
                                          "gblm:2:4:0.5 or wanda:unstructured:0.5) into RUN/pruned "
                                          "(safetensors, loadable with transformers)", resume=False)
    batches_per_shard: int = option(8, "write a statistics shard every N batches (a killed run loses at most "
                                       "these)", resume=False)

    def __post_init__(self):
        from ...importance.masks import check_sparsity, parse_structure

        for name in ("methods", "structures"):
            object.__setattr__(self, name, csv_tuple(getattr(self, name)))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in csv_tuple(self.sparsities)))
        if not self.methods:
            raise ValueError("--methods is empty")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r}; expected some of {', '.join(METHODS)}")
        if not self.sparsities:
            raise ValueError("--sparsities is empty")
        for s in self.sparsities:
            check_sparsity(s)
        for s in self.structures:
            if s != "neuron":
                parse_structure(s)
        if not self.structures:
            raise ValueError("--structures is empty")
        if "neuron" in self.structures and not any(m in NEURON_METHODS for m in self.methods):
            raise ValueError(f"neuron masks need one of the methods {', '.join(NEURON_METHODS)}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        check_positive(self, "seqlen", minimum=2)
        check_positive(self, "batches_per_shard")
        check_choices(self)
        if self.eval_data and self.eval_data.startswith("builtin:"):
            from ...importance.text import SAMPLES

            if self.eval_data[8:] not in SAMPLES:
                raise ValueError(f"--eval-data {self.eval_data!r}: the built-in samples are "
                                 f"{', '.join('builtin:' + k for k in SAMPLES)}")
        if self.save_model is not None:
            parse_save_model(self.save_model, self)


def parse_save_model(spec: str, cfg=None) -> tuple[str, str, float]:
    """``METHOD:STRUCTURE:SPARSITY`` -> (method, structure, sparsity); N:M structures keep their colon."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--save-model {spec!r}: expected METHOD:STRUCTURE:SPARSITY, e.g. wanda:unstructured:0.5 "
                         "or gblm:2:4:0.5")
    method, structure, sparsity = parts[0], ":".join(parts[1:-1]), parts[-1]
    try:
        s = float(sparsity)
    except ValueError:
        raise ValueError(f"--save-model {spec!r}: sparsity {sparsity!r} is not a number") from None
    if cfg is not None:
        if method not in cfg.methods:
            raise ValueError(f"--save-model {spec!r}: method {method!r} is not in --methods")
        if structure not in cfg.structures:
            raise ValueError(f"--save-model {spec!r}: structure {structure!r} is not in --structures")
        if structure in ("unstructured", "neuron") and s not in cfg.sparsities:
            raise ValueError(f"--save-model {spec!r}: sparsity {s} is not in --sparsities")
    return method, structure, s
