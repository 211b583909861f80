"""The privacy part of the demo: how much gradients leak, and what each defence costs.

- digits (`digits_privacy`): the 64-32-10 ReLU MLP of the attack literature on scikit-learn's digits scaled to
  [0, 1]; batches of 1, 4 and 16 images audited plain and under clipping, DP-SGD noise (sigma 0.1, 1; flat and per
  layer), gradient pruning, top-k and 4-bit quantisation; analytic recovery of the input, iDLG labels, Inverting
  Gradients at batch <= 8, the projected-feature leak; then a copy of the MLP trained under each defence (10 epochs
  of Poisson batches at q = 0.05, C = 1) and its test accuracy beside epsilon.
- SmolLM2 (`lm_privacy`): the token set of a few of the built-in problems from the input embedding's gradient
  (tied embeddings: the lookup's own gradient), plain and under DP noise, and what gradsight's stored factors and
  projected features of block 0's q_proj reveal.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["digits_privacy", "lm_privacy", "DIGITS_DEFENCES"]

DIGITS_DEFENCES = ("none", "clip", "dp:0.1", "dp:1", "dp-layer:1", "prune:0.9", "topk:0.1", "quantize:4")


def digits_privacy(out: str | Path, progress: bool = True, *, batch_sizes=(1, 4, 16), batches_per_size: int = 2,
                   attack_iters: int = 200, utility_epochs: float = 10.0, seed: int = 0):
    """The digits audit (see the module docstring); returns the PrivacyResult."""
    from ..analyses.privacy import privacy_of
    from ..privacy.digits import digits_net, load_digits01

    X, y = load_digits01()  # pixel intensities scaled to [0, 1], as the attacks assume
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1257], perm[1257:]
    net = digits_net("relu", seed=seed)
    train = [(X[tr[i:i + 64]], y[tr[i:i + 64]]) for i in range(0, len(tr), 64)]
    test = [(X[te], y[te])]
    return privacy_of(net, "cross_entropy", train, out, eval_batches=test, name="digits MLP 64-32-10",
                      batch_sizes=batch_sizes, batches_per_size=batches_per_size, defences=DIGITS_DEFENCES,
                      attacks=("ig",), attack_iters=attack_iters, projection_sizes=(4, 16, 64),
                      sample_rate=0.05, epochs=float(utility_epochs), utility_epochs=utility_epochs,
                      clip_norm=1.0, seed=seed, progress=progress, report=True)


def lm_privacy(out: str | Path, model: str = "smollm2-135m-instruct", progress: bool = True, *, n_problems: int = 2,
               batch_sizes=(1, 4), seed: int = 0):
    """The SmolLM2 audit (see the module docstring) on the first `n_problems` built-in problems (3 responses each);
    returns the PrivacyResult."""
    from ..analyses.privacy import PrivacyConfig, run_privacy
    from .problems import demo_records

    records = demo_records(n_problems=n_problems)
    cfg = PrivacyConfig(model=model, data=f"builtin:demo-{n_problems}", attn_implementation="eager",
                        batch_sizes=batch_sizes, batches_per_size=1,
                        defences=("none", "clip", "dp:0.01", "dp:0.1", "dp:1", "topk:0.01"),
                        projection_sizes=(16, 64, 256), delta=1e-3, seed=seed)
    return run_privacy(cfg, out, records=records, progress=progress)
