"""The `privacy` page and terminal summary of a saved run: what an observer of the batch-mean gradient recovers,
and what each defence buys.

Reads the run directory only (manifest.json; recovery, curves, defences and the optional utility .parquet;
samples/*.safetensors; manifest["privacy"]["notes"]) and recomputes nothing but means (curves.parquet is rebuilt
from the recovery rows by `summarize.curves` when a run stopped before its summary). The page says what the
numbers mean first:

    PSNR = 10 log10(range^2 / MSE) in dB between a true input and its matched reconstruction (higher = better
    reconstructed; about 8-12 dB is a random image, > 30 dB recognisable, > 80 dB exact to float precision);
    token precision / recall / F1 of the recovered token SET against the batch's tokens; ROUGE-1 / 2 F1 of the
    recovered sequences (TAG); exact = share recovered exactly; label accuracy = share of the batch's labels
    recovered (multiset); epsilon of (epsilon, delta)-DP from Opacus' accountant (lower = more private; inf = no
    formal guarantee).

then the defences (each kind of `privacy.defences.KINDS` explained; epsilon only for `defences.FORMAL`) with
epsilon beside their headline recovery at the smallest batch size and, with utility.parquet, what each costs: the
accuracy of a model trained under it beside the epsilon of that training and the drop in points against "none",
the curves against batch size and noise multiplier (dp and dp-layer rows), the stored-artefact leak against r_in,
example reconstructions (inline PNG data URIs) and recovered token sets, the notes and the run.

Escaping as on every page (`gradsight.report.kit`): jinja autoescaping for all user text (recovered and true
tokens, labels, notes, defence names), `kit.ptext` before plotly, figures as script-safe JSON, no external URLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...privacy.defences import FORMAL, KINDS
from ...report.kit import (RunData, FigureRegistry, clip_text, finite, fmt_int, fmt_num, fmt_pct, isnan, order, out_path,
                           read_table, render_page, report_path_line, run_context)
from ...runs.store import read_manifest
from .figures import (IMAGE_PROBES, SEQUENCE_PROBES, STORED, batch_figure, defence_colors, headline_metric,
                      load_samples, metric_label, multiset_diff, noise_figure, png_data_uri, psnr_word, stored_figure,
                      to_image, utility_figure, utility_metric)

__all__ = ["render", "print_summary", "run_findings", "build_context", "load_privacy", "PrivData",
           "privacy_findings", "defence_rows", "headline", "fmt_value", "fmt_eps", "image_examples",
           "text_examples", "stored_rows", "utility_rows", "fmt_drop", "DEFENCE_INFO", "DEFENCE_SPEC"]

HERE = Path(__file__).parent  # the page template (privacy.html) lives next to this module
MAX_SIZES = 3  # batch sizes with example reconstructions / token sets on the page
MAX_IMAGES = 6  # images per example batch
MAX_TEXT_ROWS = 80
DEFENCE_SPEC = {"dp": "dp:σ", "dp-layer": "dp-layer:σ", "prune": "prune:P", "topk": "topk:P", "random": "random:P",
                "quantize": "quantize:BITS", "noise": "noise:σ"}  # how a kind is written in --defences
DEFENCE_INFO = {  # privacy.defences' kinds; only FORMAL ones (dp, dp-layer) have an epsilon
    "none": "no defence: the plain batch-mean gradient",
    "clip": "per-example clipping at C, no noise (bounds each example's influence, hides nothing: no guarantee)",
    "dp": "DP-SGD: each example's whole gradient clipped to norm C, Gaussian noise of std σ·C on the clipped sum "
          "(formal (ε, δ) guarantee)",
    "dp-layer": "DP-SGD with per-layer clipping: each parameter tensor clipped to its own bound (their root sum "
                "of squares = C), noise of std σ·C on the clipped sum (formal guarantee; the same ε as dp at the "
                "same σ)",
    "prune": "the smallest fraction P of each gradient tensor's entries zeroed (DLG's defence; no guarantee)",
    "topk": "only the largest fraction P of all gradient entries kept (sparsified updates; no guarantee)",
    "random": "a random fraction P of the gradient entries zeroed (LAMP's masking defence; no guarantee)",
    "quantize": "each gradient tensor uniformly quantised to BITS bits (no guarantee)",
    "noise": "Gaussian noise of std σ on every coordinate of the averaged gradient, no clipping (LAMP's noise "
             "defence; unbounded sensitivity, so no formal guarantee)",
}


@dataclass
class PrivData(RunData):
    """A privacy run as read from disk (`report.kit.RunData`: manifest, tables, notes; `info` = manifest["privacy"])."""

    key = "privacy"

    @property
    def defences(self) -> list[str]:
        """Defence names in the order of the run (defences table, then the config, then the rows)."""
        dt, rec = self.t("defences"), self.t("recovery")
        seen = list(dt["defence"].astype(str)) if dt is not None else []
        seen += [str(d) for d in self.cfg.get("defences") or []]
        if rec is not None:
            seen += [d for d in rec["defence"].astype(str) if d not in (STORED, "", "nan")]
        if self.t("utility") is not None:
            seen += list(self.t("utility")["defence"].astype(str))
        return list(dict.fromkeys(seen))

    @property
    def probes(self) -> list[str]:
        """The probes with rows under a defence (not the stored-artefact probe), in row order."""
        c = self.t("curves")
        if c is None or c.empty:
            return []
        c = c[(c["defence"].astype(str) != STORED) & (c["probe"].astype(str) != "skipped")]
        return order(c["probe"].astype(str), list(IMAGE_PROBES) + ["labels", "tokens", "tag"])

    @property
    def batch_sizes(self) -> list[int]:
        c = self.t("curves")
        return sorted({int(b) for b in c["batch_size"]}) if c is not None and len(c) else []

    @property
    def epsilons(self) -> dict[str, float]:
        dt = self.t("defences")
        return {} if dt is None else {str(d): float(e) for d, e in zip(dt["defence"], dt["epsilon"])}


def load_privacy(run_dir: Path | str) -> PrivData:
    """Read a run's manifest and tables (missing ones noted, never fatal)."""
    from .compute import COLUMNS
    from .summarize import curves, read_recovery

    run = Path(run_dir)
    man = read_manifest(run)
    notes: list[str] = []
    why = "the run has not finished" if not man.get("finished") else ""
    tables = {n: read_table(run / f"{n}.parquet", notes, f"{n} table", why) for n in ("recovery", "defences")}
    if tables["recovery"] is None:  # an unfinished run: its committed shards
        rec = read_recovery(run)
        tables["recovery"] = rec if len(rec) else None
    upath = run / "utility.parquet"  # optional: written with --utility-epochs only
    tables["utility"] = read_table(upath, notes, "utility table") if upath.exists() else None
    cpath = run / "curves.parquet"
    tables["curves"] = read_table(cpath, notes, "curves table") if cpath.exists() else None
    if tables["curves"] is None and tables["recovery"] is not None:  # older rows may lack newer columns
        rec = tables["recovery"]
        tables["curves"] = curves(rec.reindex(columns=list(dict.fromkeys([*COLUMNS, *rec.columns]))))
    return PrivData(run, man, tables, notes)


# ---------------------------------------------------------------------------------------------------------
# numbers


def fmt_value(metric: str, v) -> str:
    """A headline value: '85.3 dB' for PSNR, a percentage for shares (F1, label accuracy, exact, cosine as a
    number), '–' when missing."""
    if not finite(v):
        return "–"
    if metric == "psnr":
        return f"{float(v):.3g} dB"
    if metric == "cosine":
        return fmt_num(v)
    return fmt_pct(v)


def fmt_eps(eps, delta=None) -> str:
    """'2.11 (δ = 0.001)' for a formal guarantee, '∞ (no formal guarantee)' otherwise."""
    if not finite(eps):
        return "∞ (no formal guarantee)" if not isnan(eps) else "–"
    return fmt_num(eps) + (f" (δ = {fmt_num(delta)})" if finite(delta) else "")


def headline(data: PrivData, defence: str, probe: str, batch_size: int) -> tuple[str, float, dict]:
    """(metric, its mean over the audited batches, the curves row) of a probe under a defence at a batch size;
    NaN when the run has no such row."""
    c = data.t("curves")
    g = c[(c["defence"].astype(str) == defence) & (c["probe"].astype(str) == probe)
          & (c["batch_size"] == batch_size)] if c is not None and len(c) else pd.DataFrame()
    if g.empty:
        return headline_metric(probe), math.nan, {}
    row = g.iloc[0].to_dict()
    m = headline_metric(probe, row)
    return m, float(row.get(f"{m}_mean", math.nan)), row


def defence_rows(data: PrivData) -> list[dict]:
    """One row per defence: its parameters, epsilon (accountant, q, steps, delta), the accuracy of the model
    trained under it (utility.parquet, when present) and the headline recovery of each probe at the smallest
    batch size."""
    dt = data.t("defences")
    info = {str(r["defence"]): r for r in dt.to_dict("records")} if dt is not None else {}
    util = {r["defence"]: r for r in utility_rows(data)}
    b0 = data.batch_sizes[0] if data.batch_sizes else None
    rows = []
    for d in data.defences:
        r = info.get(d, {})
        kind = str(r.get("kind") or d.partition(":")[0])
        cells = []
        for p in data.probes:
            m, v, row = headline(data, d, p, b0) if b0 is not None else (headline_metric(p), math.nan, {})
            ex = row.get("exact_mean") if m == "psnr" else None
            cells.append({"probe": p, "metric": m, "value": fmt_value(m, v), "raw": v,
                          "word": psnr_word(v) if m == "psnr" else "",
                          "exact": fmt_pct(ex) if finite(ex) and ex > 0 else ""})  # 0% exact: no news
        eps, u = r.get("epsilon", math.nan), util.get(d)
        rows.append({"defence": d, "kind": kind, "what": DEFENCE_INFO.get(kind, ""),
                     "sigma": fmt_num(r.get("value")) if kind in FORMAL else "–",
                     "value": fmt_num(r.get("value")) if kind not in (*FORMAL, "none", "clip") else "–",
                     "clip": fmt_num(r.get("clip_norm")), "eps": fmt_num(eps) if r else "–", "eps_raw": eps,
                     "utility": u["cell"] if u else "–", "short": u["short"] if u else "–",
                     "formal": bool(r.get("formal", kind in FORMAL)), "accountant": str(r.get("accountant", "")),
                     "q": fmt_num(r.get("sample_rate")), "steps": fmt_num(r.get("steps")),
                     "delta": fmt_num(r.get("delta")), "delta_raw": r.get("delta"), "cells": cells})
    return rows


def fmt_drop(v, base, metric: str = "accuracy") -> str:
    """The change against the undefended model: accuracy in percentage points ('-1.9 points'), loss as a
    difference ('+0.064'); '–' when either is missing."""
    if not (finite(v) and finite(base)):
        return "–"
    if metric == "accuracy":
        pts = round(100.0 * (float(v) - float(base)), 1)
        return f"{pts:+.1f} points" if pts else "0.0 points"
    return f"{float(v) - float(base):+.3g}"


def utility_rows(data: PrivData) -> list[dict]:
    """What each defence costs (utility.parquet): the accuracy and mean loss of a copy of the model trained under
    it, the change against "none" (accuracy drop in points = 100 (acc_defence - acc_none); the loss when the
    labels are no classes), and the epsilon of that training (inf: no guarantee); [] without the table."""
    u = data.t("utility")
    if u is None or u.empty:
        return []
    metric = utility_metric(u)
    recs = {str(r["defence"]): r for r in u.to_dict("records")}
    base = recs.get("none", {}).get(metric, math.nan)
    rows = []
    for d in [x for x in data.defences if x in recs]:
        r, kind = recs[d], d.partition(":")[0]
        eps, v = r.get("epsilon", math.nan), r.get(metric, math.nan)
        formal = kind in FORMAL and finite(eps)
        drop = fmt_drop(v, base, metric) if d != "none" else "baseline"
        main = fmt_pct(v) if metric == "accuracy" else fmt_num(v)
        rows.append({"defence": d, "kind": kind, "what": DEFENCE_INFO.get(kind, ""), "metric": metric,
                     "accuracy": fmt_pct(r.get("accuracy")), "loss": fmt_num(r.get("loss")), "value": main,
                     "raw": float(v) if finite(v) else math.nan, "drop": drop, "eps": fmt_num(eps) if formal else "∞",
                     "eps_raw": eps, "formal": formal,
                     "cell": main if d == "none" or drop == "–" else f"{main} ({drop})",
                     "short": main if d == "none" or drop == "–" else f"{main} ({drop.split()[0]})",
                     "clip": fmt_num(r.get("clip_norm")) if finite(r.get("clip_norm")) else "–",
                     "steps": fmt_int(r.get("steps")), "q": fmt_num(r.get("sample_rate")),
                     "epochs": fmt_num(r.get("epochs")), "in_sample": bool(r.get("in_sample", False))})
    return rows


def stored_rows(data: PrivData) -> list[dict]:
    """The stored-artefact probe (defence "stored"): per (probe, r_in) the mean cosine, exact and token recall
    over the audited batches (r_in 0: the factors, no projection)."""
    rec = data.t("recovery")
    if rec is None or rec.empty:
        return []
    s = rec[rec["defence"].astype(str) == STORED]
    out = []
    for (p, r), g in s.groupby([s["probe"].astype(str), "projection"], sort=False):
        txt = next((str(x) for x in g["sample"] if not isnan(x) and str(x)), "")
        out.append({"probe": p, "r_in": int(r), "r_in_s": str(int(r)) if r > 0 else "– (factors)", "n": len(g),
                    "cosine": fmt_num(g["cosine"].astype(float).mean()),
                    **{m: fmt_pct(g[m].astype(float).mean()) for m in ("exact", "recall", "precision")},
                    "exact_raw": float(g["exact"].astype(float).mean()), "sample": clip_text(txt)})
    return sorted(out, key=lambda r: (r["probe"] != "factors", r["probe"], r["r_in"]))


# ---------------------------------------------------------------------------------------------------------
# examples


def _example_units(rec: pd.DataFrame, probes: list[str]) -> list[tuple[int, int]]:
    """(batch size, unit) of the first audited batch of each of the MAX_SIZES smallest batch sizes."""
    r = rec[rec["probe"].astype(str).isin(probes)]
    firsts = r.groupby("batch_size")["unit"].min().sort_index()
    return [(int(b), int(u)) for b, u in firsts.head(MAX_SIZES).items()]


def image_examples(data: PrivData) -> list[dict]:
    """Per image probe and example batch: the true images and each defence's reconstruction (matched to them),
    as PNG data URIs, with the batch's PSNR under that defence."""
    rec = data.t("recovery")
    if rec is None or rec.empty or not (data.run_dir / "samples").exists():
        return []
    samples = load_samples(data.run_dir)
    out = []
    for p in [p for p in data.probes if p in IMAGE_PROBES]:
        for b, u in _example_units(rec, [p]):
            have = [d for d in data.defences if (u, d, p) in samples and {"true", "hat"} <= set(samples[(u, d, p)])]
            if not have:
                continue
            true = np.asarray(samples[(u, have[0], p)]["true"], dtype=np.float64)
            lo, hi = float(np.nanmin(true)), float(np.nanmax(true))
            k = min(MAX_IMAGES, true.shape[0])
            rows = []
            for d in have:
                hat = np.asarray(samples[(u, d, p)]["hat"], dtype=np.float64)
                m = rec[(rec["unit"] == u) & (rec["defence"].astype(str) == d) & (rec["probe"].astype(str) == p)]
                v = float(m["psnr"].iloc[0]) if len(m) else math.nan
                rows.append({"defence": d, "psnr": fmt_value("psnr", v), "word": psnr_word(v),
                             "images": [png_data_uri(to_image(hat[i], lo, hi)) for i in range(min(k, len(hat)))]})
            out.append({"probe": p, "batch_size": b, "unit": u, "shown": k, "n": int(true.shape[0]),
                        "strip": math.isqrt(true.shape[-1]) ** 2 != true.shape[-1],
                        "truth": [png_data_uri(to_image(true[i], lo, hi)) for i in range(k)], "rows": rows})
    return out


def text_examples(data: PrivData) -> list[dict]:
    """The recovered token sets / labels vs the truth of the first batch of the smallest batch sizes, per defence
    and probe (user text: escaped by the template, long lists folded)."""
    rec = data.t("recovery")
    if rec is None or rec.empty:
        return []
    txt = rec[~rec["probe"].astype(str).isin(list(IMAGE_PROBES) + ["skipped"])]
    txt = txt[txt["truth"].fillna("").astype(str) != ""]  # rows that recover something comparable to the batch
    rows = []
    for b, u in _example_units(txt, list(dict.fromkeys(txt["probe"].astype(str)))):
        for r in txt[txt["unit"] == u].to_dict("records"):
            p, s, t = str(r["probe"]), "" if isnan(r["sample"]) else str(r["sample"]), \
                "" if isnan(r["truth"]) else str(r["truth"])
            m = headline_metric(p, r)
            listed = p not in SEQUENCE_PROBES and bool(t)  # sequences are decoded text, not item lists
            rows.append({"batch_size": b, "defence": str(r["defence"]), "probe": p, "metric": metric_label(m),
                         "score": fmt_value(m, r.get(m)), "precision": fmt_pct(r.get("precision")),
                         "recall": fmt_pct(r.get("recall")), "sample": clip_text(s), "truth": clip_text(t),
                         "missed": clip_text(multiset_diff(t, s) if listed else ""),
                         "spurious": clip_text(multiset_diff(s, t) if listed else "")})
    return rows[:MAX_TEXT_ROWS]


# ---------------------------------------------------------------------------------------------------------
# findings


def _cell_text(c: dict) -> str:
    if c["metric"] == "psnr":
        ex = f"; {c['exact']} of the inputs recovered exactly" if c["exact"] else ""
        return f"{c['probe']} PSNR {c['value']} ({c['word']}{ex})"
    if c["metric"] == "label_acc":
        return f"{c['probe']} {c['value']} recovered"
    return f"{c['probe']}: {metric_label(c['metric'])} {c['value']}"


def _cost_finding(data: PrivData, rows: list[dict]) -> dict | None:
    """One line per trained defence: 'dp:1: accuracy 95.0% (-1.9 points) at ε = 9.111; analytic PSNR 6.29 dB
    (...) at batch size 1' -- its accuracy cost, the epsilon of that training, and what it still lets through."""
    util = utility_rows(data)
    if not util:
        return None
    cells = {r["defence"]: [c for c in r["cells"] if c["value"] != "–"][:1] for r in rows}
    b0 = data.batch_sizes[0] if data.batch_sizes else None
    lines = []
    for u in util:
        what = "accuracy" if u["metric"] == "accuracy" else "loss"
        drop = "the undefended baseline" if u["drop"] == "baseline" else \
            (u["drop"] if u["metric"] == "accuracy" else f"{u['drop']} vs none")
        guard = f"at ε = {u['eps']}" if u["formal"] else "with no formal guarantee"
        leak = "".join(f"; {_cell_text(c)} at batch size {b0}" for c in cells.get(u["defence"], []))
        lines.append(f"{u['defence']}: {what} {u['value']} ({drop}) {guard}{leak}.")
    where = "on the training rows" if any(u["in_sample"] for u in util) else "on the eval rows"
    return {"title": f"What each defence costs: the model trained under it for {util[0]['epochs']} epochs, "
                     f"evaluated {where}", "lines": lines}


def privacy_findings(data: PrivData) -> list[dict]:
    """Plain sentences from the tables; the first is the headline (the index page shows its first lines)."""
    out = []
    sizes, rows = data.batch_sizes, defence_rows(data)
    if sizes and data.probes:
        lines = []
        for r in rows:
            cells = [c for c in r["cells"] if c["value"] != "–"]
            if not cells:
                continue
            guard = f"ε = {r['eps']} at δ = {r['delta']}" if r["formal"] and finite(r["eps_raw"]) else \
                "no formal guarantee"
            lines.append(f"{r['defence']} ({guard}): " + "; ".join(_cell_text(c) for c in cells) + ".")
        out.append({"title": f"What the batch-mean gradient reveals at batch size {sizes[0]} (the smallest audited)",
                    "lines": lines})
    costs = _cost_finding(data, rows)
    if costs:
        out.append(costs)
    base = "none" if "none" in data.defences else (data.defences[0] if data.defences else None)
    if base is not None and len(sizes) > 1:
        lines = []
        for p in data.probes:
            vals = [(b, *headline(data, base, p, b)[:2]) for b in sizes]
            parts = [f"{fmt_value(m, v)} at batch size {b}" for b, m, v in vals if finite(v)]
            if parts:
                lines.append(f"{p} ({metric_label(vals[0][1])}): " + ", ".join(parts) + ".")
        if lines:
            out.append({"title": f"Against batch size ({'no defence' if base == 'none' else base})", "lines": lines})
    st = stored_rows(data)
    if st:
        lines = []
        for p in dict.fromkeys(r["probe"] for r in st):
            rs = [r for r in st if r["probe"] == p]
            parts = [(f"r_in {r['r_in']}: " if r["r_in"] else "") + ", ".join(
                f"{name} {r[k]}" for k, name in (("cosine", "cosine"), ("exact", "exact"),
                                                 ("precision", "token precision"), ("recall", "token recall"))
                if r[k] not in ("–", "n/a")) for r in rs]
            lines.append(f"{p}: " + "; ".join(parts) + ".")
        out.append({"title": "What gradsight's own stored artefacts reveal (the first example of each batch)",
                    "lines": lines})
    return out


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables ([{"title", "lines"}], the headline first)."""
    return privacy_findings(load_privacy(run_dir))


# ---------------------------------------------------------------------------------------------------------
# page and terminal


def build_context(data: PrivData) -> dict:
    """The template fields of the privacy page."""
    man, reg = data.manifest, FigureRegistry()
    colors = defence_colors(data.defences)
    eps = data.epsilons
    dt = data.t("defences")
    first = dt.iloc[0].to_dict() if dt is not None and len(dt) else {}
    probes, util = data.probes, utility_rows(data)
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight privacy report: {(man.get('model') or {}).get('id') or data.run_dir.name}",
        "notes": data.notes, "run_notes": [str(n) for n in data.info.get("notes") or []],
        "findings": privacy_findings(data), "n_examples": data.info.get("n_examples", "?"),
        "batch_sizes": data.batch_sizes, "b0": data.batch_sizes[0] if data.batch_sizes else None,
        "has_images": any(p in IMAGE_PROBES for p in probes), "has_tokens": "tokens" in probes,
        "has_tag": "tag" in probes,
        "has_labels": "labels" in probes, "probes": probes,
        "probe_heads": [{"probe": p, "metric": metric_label(headline_metric(p))} for p in probes],
        "accountant": str(first.get("accountant") or data.cfg.get("accountant") or ""),
        "q": fmt_num(first.get("sample_rate")), "steps": fmt_num(first.get("steps")),
        "delta": fmt_num(first.get("delta", data.cfg.get("delta"))), "epochs": fmt_num(data.cfg.get("epochs")),
        "clip_cfg": data.cfg.get("clip_norm"),
        "defences": [dict(r, color=colors.get(r["defence"], "#000")) for r in defence_rows(data)],
        "glossary": [{"kind": k, "spec": DEFENCE_SPEC.get(k, k), "what": DEFENCE_INFO[k], "formal": k in FORMAL,
                      "used": k in {d.partition(":")[0] for d in data.defences}} for k in KINDS],
        "utility": util, "has_utility": bool(util), "util_in_sample": any(u["in_sample"] for u in util),
        "util_metric": util[0]["metric"] if util else "accuracy", "util_lr": fmt_num(data.cfg.get("utility_lr")),
        "util_first": util[0] if util else {},
        "fig_utility": reg.add("utility", utility_figure(data.t("utility"), colors)),
        "stored": stored_rows(data), "images": image_examples(data), "texts": text_examples(data),
        "fig_batch": reg.add("batch", batch_figure(data.t("curves"), data.defences, colors, eps)),
        "fig_noise": reg.add("noise", noise_figure(data.t("curves"), eps)),
        "fig_stored": reg.add("stored", stored_figure(data.t("recovery"))),
        "figures": reg.items,
    }


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a privacy run; returns the written path. Self-contained."""
    data = load_privacy(run_dir)
    return render_page("privacy.html", build_context(data), out_path(run_dir, out), search=(HERE,))


def print_summary(run_dir: Path | str, console=None) -> None:
    """Print the defences (noise multiplier, clip norm, epsilon; the accuracy of the model trained under each when
    the run has utility.parquet) with the headline recovery of each probe at the smallest batch size, then the
    findings. User text is printed as rich ``Text``, never markup."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    data = load_privacy(run_dir)
    console.print(Text.assemble(("gradsight privacy run ", "bold"), (str(data.run_dir), "cyan")))
    for n in data.notes + [str(x) for x in data.info.get("notes") or []]:
        console.print(Text("note: ", style="dim") + Text(n))
    rows = defence_rows(data)
    if rows:
        b0 = data.batch_sizes[0] if data.batch_sizes else "?"
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  title=f"defences: epsilon (lower = more private) and recovery at batch size {b0}")
        util = utility_rows(data)
        for c in ("defence", "σ", "clip C", "ε") + (("accuracy (Δ points)" if util[0]["metric"] == "accuracy"
                                                    else "loss (Δ)",) if util else ()):
            t.add_column(c, justify="left" if c == "defence" else "right")
        for p in data.probes:
            t.add_column(Text(f"{p}: {metric_label(headline_metric(p))}"), justify="right")
        for r in rows:
            t.add_row(Text(r["defence"]), r["sigma"], r["clip"], r["eps"] if r["eps"] != "∞" else "∞ (none)",
                      *([r["short"]] if util else []), *[c["value"] for c in r["cells"]])
        console.print(t)
    for f in privacy_findings(data):
        console.print(Text(f["title"], style="bold cyan"))
        for line in f["lines"]:
            console.print(Text("  " + line))
    console.print(report_path_line(data.run_dir))
