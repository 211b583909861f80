"""Options of `gradsight privacy`."""

from __future__ import annotations

import math

from ...config import (EncodeOptions, LayerSelection, RunOptions, check_choices, check_positive, config, csv_tuple,
                       group, option)

__all__ = ["PrivacyConfig", "PROBES", "ATTACKS", "parse_defence"]

# leakage probes that need no optimisation (cheap, on by default) and the optimisation attacks (opt-in)
PROBES = ("analytic", "labels", "tokens", "store")
ATTACKS = ("dlg", "ig", "tag")


def parse_defence(spec: str) -> tuple[str, float | None]:
    """`gradsight.privacy.defences.parse_defence`, its errors prefixed with the option's name."""
    from ...privacy.defences import parse_defence as parse

    try:
        return parse(spec)
    except ValueError as e:
        raise ValueError(f"--defences: {e}") from None


@config
class PrivacyConfig:
    """Options of `gradsight privacy` (how much the gradients of a model on its data leak, under defences).

    Batches of each size in ``--batch-sizes`` are taken from the data in order. For each batch, the gradient an
    observer would see (the mean over the batch, as in federated SGD) is formed plain and under each defence:
    per-example clipping at C (``clip``), clipping plus Gaussian noise of std sigma*C on the clipped sum (``dp:SIGMA``,
    the DP-SGD release; epsilon from Opacus' accountant at ``--sample-rate``, ``--epochs``, ``--delta``), pruning
    the smallest gradients, top-k sparsification or quantisation. The leakage probes then try to recover the
    batch: analytic recovery of the first Linear layer's input and iDLG labels (plain modules), the token set from
    the input embedding's gradient (language models), and what gradsight's own stored artefacts reveal (layer
    inputs A_e, and projected features at each ``--projection-sizes``).
    """

    run: RunOptions = group(RunOptions)
    layers: LayerSelection = group(LayerSelection, title="Stored layer (the first selected layer of the first "
                                                         "block: its factors and projected features are probed)")
    encode: EncodeOptions = group(EncodeOptions, title="Tokenization and loss")
    batch_sizes: tuple[int, ...] = option((1, 8), "batch sizes of the audited gradients")
    batches_per_size: int = option(2, "batches audited at each batch size (taken from the data in order)")
    defences: tuple[str, ...] = option(("none", "clip", "dp:0.01", "dp:0.1", "dp:1"),
                                       "defences: none, clip (per-example clipping at C), dp:SIGMA (clipping plus "
                                       "Gaussian noise sigma*C on the sum), dp-layer:SIGMA (per-layer clipping, "
                                       "C_l = C/sqrt(L)), prune:P (zero the smallest fraction P), topk:P (keep the "
                                       "largest), random:P (zero a random fraction), quantize:BITS, noise:SIGMA "
                                       "(Gaussian noise without clipping)")
    clip_norm: float = option(0.0, "per-example clipping bound C (0: the median per-example gradient norm of each "
                                   "audited batch)")
    probes: tuple[str, ...] = option(PROBES, "leakage probes: analytic (first Linear layer's input), labels "
                                             "(iDLG), tokens (bag of words from the embedding gradient), store "
                                             "(gradsight's stored factors and projected features); each runs where "
                                             "it applies")
    attacks: tuple[str, ...] = option((), "optimisation attacks (slow): dlg, ig (Inverting Gradients) on plain "
                                          "modules at batch size <= 8, tag (embedding-space, TAG-like) on "
                                          "language models")
    attack_iters: int = option(300, "iterations of each optimisation attack")
    projection_sizes: tuple[int, ...] = option((4, 16, 64), "input-side projection sizes r_in of the stored-feature "
                                                            "probe (gradsight's Projector, r_out = 16)")
    sample_rate: float = option(0.0, "DP-SGD sampling rate q for epsilon (0: the largest batch size / the number "
                                     "of examples)")
    epochs: float = option(1.0, "DP-SGD epochs for epsilon (steps = epochs / q)")
    delta: float = option(1e-5, "delta of (epsilon, delta)-DP; must be < 1 / (number of examples)")
    accountant: str = option("rdp", "accountant for epsilon: rdp, prv or gdp (Opacus')",
                             choices=("rdp", "prv", "gdp"))
    utility_epochs: float = option(0.0, "plain modules: train a copy of the model under each defence for this many "
                                        "epochs of Poisson batches (DP-SGD for dp / dp-layer) and report its "
                                        "accuracy on the eval batches (0: no utility training)")
    utility_lr: float = option(0.5, "learning rate of the utility training (plain SGD, as DP-SGD)")

    def __post_init__(self):
        for name in ("defences", "probes", "attacks"):
            object.__setattr__(self, name, csv_tuple(getattr(self, name)))
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in csv_tuple(self.batch_sizes)))
        object.__setattr__(self, "projection_sizes", tuple(int(b) for b in csv_tuple(self.projection_sizes)))
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be integers >= 1, got {self.batch_sizes}")
        if not self.defences:
            raise ValueError("--defences is empty")
        for d in self.defences:
            parse_defence(d)
        for name, known in (("probes", PROBES), ("attacks", ATTACKS)):
            bad = [p for p in getattr(self, name) if p not in known]
            if bad:
                raise ValueError(f"--{name}: unknown {bad[0]!r}; expected some of {', '.join(known)}")
        if self.projection_sizes and min(self.projection_sizes) < 1:
            raise ValueError(f"--projection-sizes must be >= 1, got {self.projection_sizes}")
        check_positive(self, "batches_per_size", "attack_iters")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"--clip-norm must be >= 0 (0: the batch median), got {self.clip_norm}")
        if not 0 <= self.sample_rate <= 1:
            raise ValueError(f"--sample-rate must be in (0, 1] (0: automatic), got {self.sample_rate}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if not (math.isfinite(self.utility_epochs) and self.utility_epochs >= 0):
            raise ValueError(f"--utility-epochs must be >= 0, got {self.utility_epochs}")
        if not (math.isfinite(self.utility_lr) and self.utility_lr > 0):
            raise ValueError(f"--utility-lr must be > 0, got {self.utility_lr}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta}")
        check_choices(self)
