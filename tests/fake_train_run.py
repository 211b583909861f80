"""Synthetic training-monitor run directory for the training report tests (no model, no torch).

`make_fake_train_run` writes what the report reads: manifest.json and the three summary tables of
`gradsight.train.schema` (series, alerts, diagnoses) with exactly the schema's columns and dtypes. The numbers
are plausible and known: a decaying loss with a spike, a warmup-then-cosine lr, per-layer gradient norms with
a x50 spike in the layer named with EVIL at SPIKE_STEP and a NaN in another layer at NAN_STEP, clipping at 1,
scheduled noise-scale / GSNR / per-example-norm values, term cosines, and optionally sharpness and softmax
collapse. Layer names, alert messages and a diagnosis carry ``<script>`` text and rich markup to check escaping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gradsight.runs.store import SCHEMA_VERSION
from gradsight.train import schema as S

EVIL = "<script>alert(1)</script>"
EVIL_LAYER = f"model.layers.1.{EVIL}.weight"
MARKUP = "[bold]not markup[/bold]"  # must be printed literally by the terminal summary
NAN_LAYER = "model.layers.1.mlp.down_proj.weight"
LAYERS = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
          EVIL_LAYER, NAN_LAYER, "lm_head.weight"]
SPIKE_STEP, NAN_STEP, SPIKE = 120, 150, 50.0
CLIP = 1.0
LR = 1e-3


def layer_norm(n_steps: int, seed: int = 0) -> np.ndarray:
    """The per-layer pre-clip gradient norms (steps x layers) written by `make_fake_train_run`."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps)
    base = np.array([0.05, 0.2, 0.3, 0.15, 0.25, 0.4])[: len(LAYERS)]
    g = base[None, :] * (0.3 + np.exp(-t / 80.0))[:, None] * np.exp(0.1 * rng.standard_normal((n_steps, len(LAYERS))))
    if SPIKE_STEP < n_steps:
        g[SPIKE_STEP, LAYERS.index(EVIL_LAYER)] *= SPIKE
    if NAN_STEP < n_steps:
        g[NAN_STEP, LAYERS.index(NAN_LAYER)] = np.nan
    return g


def _rows(steps, layer: str, metric: str, values) -> pd.DataFrame:
    steps = np.asarray(steps, dtype=np.int64)
    return pd.DataFrame({"step": steps, "layer": layer, "metric": metric,
                         "value": np.broadcast_to(np.asarray(values, dtype=np.float64), steps.shape).copy()})


def fake_series(n_steps: int, *, seed: int = 0, noise: bool = True, conflict: bool = True, pe: bool = True,
                sharpness: bool = False, softmax: bool = False) -> pd.DataFrame:
    """The SERIES table of the fake run (SCALAR_COLUMNS)."""
    rng = np.random.default_rng(seed + 1)
    t = np.arange(n_steps)
    parts = []
    loss = 0.6 + 2.5 * np.exp(-t / 60.0) + 0.02 * rng.standard_normal(n_steps)
    if SPIKE_STEP < n_steps:
        loss[SPIKE_STEP] *= 3
    warm = 20
    lr = np.where(t < warm, LR * (t + 1) / warm, LR * 0.5 * (1 + np.cos(np.pi * (t - warm) / max(1, n_steps - warm))))
    parts += [_rows(t, S.MODEL, S.LOSS, loss), _rows(t, S.MODEL, S.LR, lr)]
    g = layer_norm(n_steps, seed)
    total = np.sqrt((g ** 2).sum(axis=1))  # NaN at NAN_STEP, as a real all-reduced norm would be
    clipped = np.minimum(total, CLIP)
    parts += [_rows(t, S.MODEL, S.GRAD_NORM, total), _rows(t, S.MODEL, S.GRAD_NORM_CLIPPED, clipped),
              _rows(t, S.MODEL, S.CLIP_COEF, clipped / total),
              _rows(t, S.MODEL, S.NONFINITE, np.isnan(total).astype(float))]
    ratio = 1e-3 * np.exp(0.2 * rng.standard_normal((n_steps, len(LAYERS))))
    for j, name in enumerate(LAYERS):
        parts += [_rows(t, name, S.GRAD_NORM, g[:, j]), _rows(t, name, S.GRAD_NORM_CLIPPED, g[:, j] * clipped / total),
                  _rows(t, name, S.UPDATE_RATIO, ratio[:, j])]
    parts += [_rows(t, S.MODEL, S.UPDATE_RATIO, ratio.mean(axis=1)),
              _rows(t, S.MODEL, S.PARAM_NORM, 30 + 0.01 * t)]
    sched = t[::10]
    if noise:
        parts += [_rows(sched, S.MODEL, S.NOISE_SCALE, 50 + 2 * sched),
                  _rows(sched, S.MODEL, S.GSNR, 0.1 / (1 + sched))]
        for j, name in enumerate(LAYERS):
            parts.append(_rows(sched, name, S.NOISE_SCALE, (10 + j) * (1 + sched / 50)))
    if pe:
        parts += [_rows(sched, S.MODEL, m, q * (1 + np.exp(-sched / 80.0)))
                  for m, q in ((S.PE_Q10, 0.5), (S.PE_Q50, 1.0), (S.PE_Q90, 2.0), (S.PE_MAX, 4.0))]
    if conflict:
        pair = f"{S.COS_PREFIX}lm|{EVIL}"
        c5 = t[::5]
        parts.append(_rows(c5, S.MODEL, pair, np.cos(c5 / 30.0)))
        parts += [_rows(c5, S.MODEL, f"{S.TERM_NORM_PREFIX}lm", 1 + 0 * c5),
                  _rows(c5, S.MODEL, f"{S.TERM_NORM_PREFIX}{EVIL}", 0.5 + 0 * c5)]
        for j, name in enumerate(LAYERS):
            parts.append(_rows(c5, name, pair, np.cos(c5 / 30.0 + j)))
    if sharpness:
        s20 = t[::20]
        thr = (2 + 2 * 0.9) / ((1 - 0.9) * np.maximum(lr[s20], 1e-6))
        parts += [_rows(s20, S.MODEL, S.SHARPNESS, 0.2 * thr * (1 + s20 / 50.0)),
                  _rows(s20, S.MODEL, S.SHARPNESS_THRESHOLD, thr)]
    if softmax:
        parts += [_rows(sched, S.MODEL, S.SC_FP32, np.minimum(1, sched / 400.0)),
                  _rows(sched, S.MODEL, S.SC_BF16, np.minimum(1, sched / 200.0))]
    return pd.concat(parts, ignore_index=True)[S.SCALAR_COLUMNS]


def fake_alerts(n_steps: int) -> pd.DataFrame:
    """The ALERTS table: a norm_z alert on the EVIL layer at SPIKE_STEP, a nonfinite one at NAN_STEP and spam
    alerts on two layers every 40 steps."""
    rows = []
    if SPIKE_STEP < n_steps:
        rows.append((SPIKE_STEP, EVIL_LAYER, S.RULE_NORM_Z, 9.5, 6.0, f"gradient norm z-score 9.5 in {EVIL} {MARKUP}"))
    if NAN_STEP < n_steps:
        rows.append((NAN_STEP, NAN_LAYER, S.RULE_NONFINITE, float("nan"), 0.0, "non-finite gradient"))
    for s in range(40, n_steps, 40):
        for name in LAYERS[1:3]:
            rows.append((s, name, S.RULE_SPAM, 0.002, 5000.0, f"SPAM rule fired on 0.2% of entries of {name}"))
    df = pd.DataFrame(rows, columns=S.ALERT_COLUMNS)
    return df.astype({"step": np.int64, "value": np.float64, "threshold": np.float64})


def fake_diagnoses(n_steps: int) -> pd.DataFrame:
    """The DIAGNOSES table: an error (NaN gradient), a warning (spike in the EVIL layer) and an info line."""
    rows = [
        ("loss_plateau", 0, n_steps - 1, S.MODEL, "info", "The loss fell from 3.1 to 0.6 and is still falling.",
         json.dumps({"first": 3.1, "final": 0.6}), "Nothing to do."),
        (S.RULE_NORM_Z, SPIKE_STEP, SPIKE_STEP + 2, EVIL_LAYER, "warning",
         f"Gradient norm spike x{SPIKE:g} in {EVIL} {MARKUP}", json.dumps({"z": 9.5, "layer": EVIL}),
         "Clip per layer (gradsight.transforms.clip_per_layer) or lower the lr."),
        (S.RULE_NONFINITE, NAN_STEP, NAN_STEP, NAN_LAYER, "error", "A NaN gradient in the down projection.",
         json.dumps({"n": 1}), "Skip non-finite steps (gradsight.transforms.apply_if_finite)."),
    ]
    df = pd.DataFrame(rows, columns=S.DIAGNOSIS_COLUMNS)
    return df.astype({"step": np.int64, "last_step": np.int64})


def _manifest(n_steps: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "analysis": "train",
        "identity": {"analysis": "train",
                     "config": {"every": 1, "noise_every": 10, "norm_z": 6.0, "sinks": ["parquet"]},
                     "params": {name: [16, 8] for name in LAYERS}},
        "model": {"id": "fake/tiny-mlp"},
        "optimizer": {"name": "AdamW", "lr": LR, "betas": [0.9, 0.999], "momentum": None, "weight_decay": 0.01},
        "versions": {"gradsight": "0.1.0", "torch": "2.13.0"},
        "world_size": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "steps": n_steps,
        "finished": True,
    }


def make_fake_train_run(path, n_steps: int = 200, *, empty: bool = False, **series_kw) -> Path:
    """Write a fake monitor run of `n_steps` steps into `path` (created); `empty=True` writes the three tables
    with no rows. `series_kw` go to `fake_series` (noise, conflict, pe, sharpness, softmax, seed)."""
    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(json.dumps(_manifest(0 if empty else n_steps), indent=2))
    if empty:
        series = _rows([], S.MODEL, S.LOSS, [])
        alerts, diags = fake_alerts(0).iloc[:0], fake_diagnoses(0).iloc[:0]
    else:
        series, alerts, diags = fake_series(n_steps, **series_kw), fake_alerts(n_steps), fake_diagnoses(n_steps)
    series.to_parquet(run / f"{S.SERIES}.parquet", index=False)
    alerts.to_parquet(run / f"{S.ALERTS}.parquet", index=False)
    diags.to_parquet(run / f"{S.DIAGNOSES}.parquet", index=False)
    return run
