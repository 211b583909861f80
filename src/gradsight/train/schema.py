"""The tables of a training-monitor run directory (written by `train.Monitor`, read by diagnoses and the report).

A run directory of the monitor holds:

    manifest.json            analysis "train"; identity (monitor config, model parameter names and shapes);
                             "optimizer" {"name", "lr", "betas", "momentum", "weight_decay"}; "finished"
    scalars/r0-00000.parquet shard table SCALARS, one row per (step, layer, metric)
    alerts/r0-00000.parquet  shard table ALERTS, one row per alert the online detectors raised
    steps/r0-00000.parquet   marker table STEPS (the steps of each commit; written last, atomically)
    tb/                      TensorBoard event files (when the TensorBoard sink is on)
    series.parquet           summary: SCALARS merged, the last write of each (step, layer, metric) wins
    diagnoses.parquet        summary: the diagnoses of `train.diagnose` over the series and alerts
    report.html              the training report

Tidy (long) tables, so that a measure added later needs no new column:

SCALARS columns: step (int64, the optimizer step, 0-based), layer (str: a parameter name such as
"model.layers.0.mlp.up_proj.weight", a term pair, or MODEL = "" for model-wide values), metric (str, below),
value (float64; NaN allowed and meaningful: non-finite gradients are recorded, never dropped).

ALERTS columns: step (int64), layer (str), rule (str, one of the RULE_* below), value (float64: the evidence),
threshold (float64: what it was compared with), message (str: one readable sentence).

DIAGNOSES columns: rule (str), step (int64: first step concerned), last_step (int64), layer (str),
severity ("info" | "warning" | "error"), message (str: what happened, with numbers), evidence (str: JSON of
the numbers behind it), action (str: the suggested action, naming a gradsight transform where one applies).
"""

from __future__ import annotations

__all__ = ["SCALARS", "ALERTS", "STEPS", "SERIES", "DIAGNOSES", "MODEL", "SCALAR_COLUMNS", "ALERT_COLUMNS",
           "DIAGNOSIS_COLUMNS"]

SCALARS, ALERTS, STEPS = "scalars", "alerts", "steps"
SERIES, DIAGNOSES = "series", "diagnoses"
MODEL = ""  # the layer of model-wide metrics

SCALAR_COLUMNS = ["step", "layer", "metric", "value"]
ALERT_COLUMNS = ["step", "layer", "rule", "value", "threshold", "message"]
DIAGNOSIS_COLUMNS = ["rule", "step", "last_step", "layer", "severity", "message", "evidence", "action"]

# --- metrics, model-wide (layer MODEL) -------------------------------------------------------------------
LOSS = "loss"                          # the training loss of the step (mean over its micro-batches)
LR = "lr"                              # the optimizer's learning rate (first param group)
GRAD_NORM = "grad_norm"                # pre-clip L2 norm (also per layer); unscaled under AMP; after all-reduce
GRAD_NORM_CLIPPED = "grad_norm_clipped"  # the norm the optimizer received (also per layer)
CLIP_COEF = "clip_coef"                # grad_norm_clipped / grad_norm (1: not clipped)
UPDATE_RATIO = "update_ratio"          # ||delta theta|| / ||theta|| (also per layer)
PARAM_NORM = "param_norm"              # ||theta|| (also per layer)
LOSS_SCALE = "loss_scale"              # GradScaler scale (fp16 AMP)
NONFINITE = "nonfinite"                # number of parameter tensors with a NaN/inf gradient (per layer: 0/1)
SKIPPED = "skipped"                    # 1 when the optimizer step was skipped (AMP overflow)
# spikes (per layer)
SPAM_FRAC = "spam_frac"                # share of entries with g^2 > theta v (SPAM's element rule, Adam's v)
NORM_Z = "norm_z"                      # z-score of log ||g_l|| against its EMA (beta 0.99)
MAXABS = "max_abs"                     # max |g| of the tensor
MAXABS_RATIO = "max_abs_ratio"         # max|g| / bias-corrected EMA of max|g| (Stable-SPAM's rule, theta 0.999)
# per-example (scheduled; from the factored capture, no per-sample materialisation)
PE_Q10, PE_Q50, PE_Q90, PE_MAX = "pe_norm_q10", "pe_norm_q50", "pe_norm_q90", "pe_norm_max"
NOISE_SCALE = "noise_scale"            # B_simple = EMA(tr Sigma) / EMA(|G|^2) (per layer and model-wide)
TRACE_SIGMA = "trace_sigma"            # unbiased tr(Sigma) of the step
GRAD_SQ = "grad_sq"                    # unbiased |G|^2 of the step
GSNR = "gsnr"                          # mean over entries of mean^2 / (var + 1e-5) (cockpit's definition)
# conflict between terms / micro-batches (layer = parameter name or MODEL; metric "cos:<a>|<b>")
COS_PREFIX = "cos:"
TERM_NORM_PREFIX = "term_norm:"        # "term_norm:<a>": norm of term a's gradient
# curvature and numerics (scheduled)
SHARPNESS = "sharpness"                # lambda_max of the (preconditioned, for Adam) Hessian on the probe batch
SHARPNESS_THRESHOLD = "sharpness_threshold"  # 2/lr (GD), (2+2 beta)/lr (momentum), (2+2 b1)/((1-b1) lr) (Adam)
SC_FP32 = "softmax_collapse_fp32"      # share of rows whose sum exp(z - max z) == 1 exactly in float32
SC_BF16 = "softmax_collapse_bf16"
ZERO_LOSS = "zero_loss_frac"           # share of per-row CE losses == 0

# --- online alert rules (ALERTS.rule) ---------------------------------------------------------------------
RULE_SPAM = "spam"                     # SPAM element rule fired on >= 1 entry of a layer
RULE_NORM_Z = "norm_z"                 # |z| of log||g_l|| above the threshold (default 6)
RULE_MAXABS = "max_abs"                # max|g| above Stable-SPAM's EMA estimate by a factor (default 10)
RULE_NONFINITE = "nonfinite"           # a NaN/inf gradient
RULE_SHARPNESS = "sharpness"           # sharpness above its stability threshold
