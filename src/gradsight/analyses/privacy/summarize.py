"""The privacy run's final tables (from the shards and the manifest only; `gradsight report` reruns this).

    RUN/recovery.parquet   one row per (audited batch, defence, probe): psnr, cosine, exact, label_acc,
                           precision / recall / f1 of the token set, rouge1 / rouge2 (TAG), n_true,
                           n_found, sample (what was recovered, text) and truth; defence "stored" rows are the stored-artefact probe
    RUN/curves.parquet     recovery per (probe, defence, batch size, projection): mean and sd of each metric
                           over the audited batches
    RUN/defences.parquet   each defence: noise multiplier, clip norm (median over batches), and for dp:SIGMA and
                           dp-layer:SIGMA the epsilon at --delta of DP-SGD at --sample-rate for --epochs (Opacus' accountant; inf
                           for defences without a formal guarantee)
    RUN/utility.parquet    with --utility-epochs (plain modules): each defence's accuracy and loss after training a
                           copy of the model under it, with the epsilon of that training
    RUN/samples/*.safetensors   true inputs and reconstructions of the image probes, per batch and defence
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...runs.store import read_manifest, read_shards, write_parquet
from .compute import COLUMNS
from .config import parse_defence

__all__ = ["summarize", "finish", "result", "PrivacyResult", "curves", "defences_table", "METRICS"]

METRICS = ("psnr", "cosine", "exact", "label_acc", "precision", "recall", "f1", "rouge1", "rouge2")
OUT_TABLES = ("recovery", "curves", "defences", "utility")


def finish(plan, resumed: int) -> dict:
    """Manifest fields: the number of audited examples (for epsilon's q and the delta check) and the notes; with
    --utility-epochs (plain modules, rank 0) the utility training, written to RUN/utility.parquet."""
    st = plan.state
    if st.cfg.utility_epochs > 0 and (plan.info is None or plan.info.is_main):
        if st.source.kind == "module":
            write_parquet(utility(st), Path(plan.run_dir) / "utility.parquet")
        else:
            st.say_once("--utility-epochs: the utility training runs on plain modules only; skipped")
    notes = list(st.notes)
    if st.source.kind == "lm":
        tied = _tied(st.source.model)
        if tied:
            notes.append("tied input / output embeddings: the token probe reads the lookup's own gradient (an upper "
                         "bound on what the shared weight's gradient shows)")
    return {"privacy": {"n_examples": st.n_examples, "notes": notes}}


def utility(st) -> pd.DataFrame:
    """Each defence's accuracy cost: a copy of the model trained on every row of the run's batches for
    --utility-epochs (Poisson batches at q, plain SGD at --utility-lr, `privacy.dpsgd.train_defended`; C =
    --clip-norm or 1), then evaluated on the eval batches (`privacy_of(..., eval_batches=)`; default: the
    training batches, flagged in_sample): accuracy for integer labels, and the mean loss."""
    import copy

    import torch

    from ...inputs.module import row_losses, take_rows
    from ...privacy.dpsgd import train_defended
    from .compute import cat_batches

    cfg, src = st.cfg, st.source
    data = cat_batches(list(src.batches))
    n = int(sum(int(torch.as_tensor(b[0] if isinstance(b, (list, tuple)) else next(iter(b.values()))).shape[0])
                for b in src.batches))
    q = cfg.sample_rate if cfg.sample_rate > 0 else min(1.0, max(cfg.batch_sizes) / n)
    steps = max(1, int(math.ceil(cfg.utility_epochs / q)))
    evals = src.extras.get("eval")
    in_sample = not evals
    evals = list(evals) if evals else list(src.batches)
    rows = []
    for spec in cfg.defences:
        model = copy.deepcopy(src.model)
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(True)
        losses = row_losses(src.loss, src.forward)
        out = train_defended(model, lambda idx, m=model: losses(m, take_rows(data, idx)), n, spec, steps=steps,
                             sample_rate=q, lr=cfg.utility_lr, seed=cfg.seed, delta=cfg.delta,
                             max_grad_norm=cfg.clip_norm or 1.0, accountant=cfg.accountant, log=st.say_once)
        hit = tot = 0
        loss_sum = 0.0
        with torch.no_grad():
            for b in evals:
                o, y = src.forward(model, b)
                loss_sum += float(losses(model, b).sum())
                tot += int(o.shape[0])
                if torch.is_tensor(y) and not y.is_floating_point():
                    hit += int((o.argmax(-1) == y).sum())
        rows.append({"defence": spec, "accuracy": hit / tot if tot else math.nan,
                     "loss": loss_sum / tot if tot else math.nan, "epsilon": float(out["epsilon"]),
                     "steps": steps, "sample_rate": q, "clip_norm": float(out["max_grad_norm"]),
                     "epochs": float(cfg.utility_epochs), "in_sample": in_sample})
    return pd.DataFrame(rows)


def _tied(model) -> bool:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return emb is not None and out is not None and getattr(out, "weight", None) is getattr(emb, "weight", 0)


def read_recovery(run: Path) -> pd.DataFrame:
    """Every recovery row, in (unit, defence order, probe) order as committed."""
    df = read_shards(Path(run), "recovery")
    if df is None:
        p = Path(run) / "recovery.parquet"
        return pd.read_parquet(p) if p.exists() else pd.DataFrame(columns=list(COLUMNS))
    df["_order"] = np.arange(len(df))
    return df.sort_values(["unit", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def curves(rec: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd of each metric per (probe, defence, noise_multiplier, batch_size, projection)."""
    if rec.empty:
        return pd.DataFrame(columns=["probe", "defence", "noise_multiplier", "batch_size", "projection", "n"])
    keys = ["probe", "defence", "batch_size", "projection"]
    rows = []
    for k, g in rec[rec["probe"] != "skipped"].groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, k))
        row["noise_multiplier"] = float(g["noise_multiplier"].iloc[0])
        row["n"] = int(len(g))
        for m in METRICS:
            v = g[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            row[f"{m}_mean"] = float(v.mean()) if v.size else math.nan
            row[f"{m}_sd"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["probe", "projection", "batch_size"], kind="stable").reset_index(drop=True)


def defences_table(cfg, rec: pd.DataFrame, n_examples: int) -> pd.DataFrame:
    """Each defence with its formal guarantee: epsilon at delta for dp:SIGMA (DP-SGD with Poisson sampling at rate q
    for epochs/q steps), inf otherwise."""
    from ...privacy.accountant import epsilon
    from ...privacy.defences import FORMAL

    q = cfg.sample_rate if cfg.sample_rate > 0 else min(1.0, max(cfg.batch_sizes) / n_examples)
    steps = max(1, int(math.ceil(cfg.epochs / q)))
    rows = []
    for spec in cfg.defences:
        kind, val = parse_defence(spec)
        sub = rec[rec["defence"] == spec] if not rec.empty else rec
        c = sub["clip_norm"].to_numpy(dtype=float) if len(sub) else np.array([])
        c = c[np.isfinite(c)]
        eps = epsilon(val, q, steps, cfg.delta, accountant=cfg.accountant, n=n_examples) if kind in FORMAL \
            else math.inf
        rows.append({"defence": spec, "kind": kind, "value": math.nan if val is None else float(val),
                     "clip_norm": float(np.median(c)) if c.size else math.nan, "sample_rate": float(q),
                     "steps": steps, "delta": float(cfg.delta), "accountant": cfg.accountant,
                     "epsilon": float(eps), "formal": kind in FORMAL})
    return pd.DataFrame(rows)


def summarize(run: Path | str, cfg=None, info=None) -> dict[str, pd.DataFrame]:
    from .config import PrivacyConfig

    run = Path(run)
    man = read_manifest(run)
    if cfg is None:
        cfg = PrivacyConfig.from_dict(man["config"])
    rec = read_recovery(run)
    n = int(man.get("privacy", {}).get("n_examples", 0)) or 1
    out = {"recovery": rec, "curves": curves(rec), "defences": defences_table(cfg, rec, n)}
    for name, df in out.items():
        write_parquet(df, run / f"{name}.parquet")
    if (run / "utility.parquet").exists():
        out["utility"] = pd.read_parquet(run / "utility.parquet")
    return out


@dataclass
class PrivacyResult:
    """A finished privacy run: .recovery (every probe row), .curves, .defences (epsilon), .samples() and .report()."""

    path: Path
    tables: dict

    @property
    def recovery(self) -> pd.DataFrame | None:
        return self.tables.get("recovery")

    @property
    def curves(self) -> pd.DataFrame | None:
        return self.tables.get("curves")

    @property
    def defences(self) -> pd.DataFrame | None:
        return self.tables.get("defences")

    @property
    def utility(self) -> pd.DataFrame | None:
        return self.tables.get("utility")

    @property
    def manifest(self) -> dict:
        return read_manifest(self.path)

    def samples(self) -> dict:
        """{"UNIT/DEFENCE/PROBE/true|hat": (B, d) tensor} of the image probes' inputs and reconstructions."""
        from safetensors.torch import load_file

        out = {}
        for f in sorted((self.path / "samples").glob("r*-*.safetensors")):
            out.update(load_file(str(f)))
        return out

    def report(self) -> Path:
        from .report import render

        return render(self.path)


def result(run: Path | str, tables: dict | None = None) -> PrivacyResult:
    run = Path(run)
    if tables is None:
        tables = {t: pd.read_parquet(run / f"{t}.parquet") for t in OUT_TABLES if (run / f"{t}.parquet").exists()}
    return PrivacyResult(run, tables)
