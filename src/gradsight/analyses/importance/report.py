"""The `importance` page and terminal summary of a saved run: which weights matter, as pruned copies evaluated.

Reads the run directory only (manifest.json; evaluation, layers, scores, neurons, examples and, when present,
unlearning .parquet) and recomputes nothing. The page answers "what does this number mean" first: perplexity
(language models) = exp(mean negative log-likelihood per supervised token) of the pruned copy on the evaluation
text, lower is better; ratio = value / the dense model's value (for perplexity: exp(ΔNLL)). Then the grid
(method x structure x sparsity), the sparsity-perplexity curves, the per-layer sparsity of each configuration,
where the gradient methods prune other weights than magnitude (overlap = |pruned by the method ∩ pruned by
magnitude| / |pruned by the method|, at the same structure and sparsity; a random mask reaches magnitude's
pruned fraction), per-layer score summaries, the top MLP neurons and, when present, the unlearning table.

Escaping as on every page (`gradsight.report.kit`): jinja autoescaping for all user text (groups, ids, prompts,
reasons, notes), `kit.ptext` before plotly, figures as script-safe JSON, no external URLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...report.kit import (RunData, FigureRegistry, clip_text, finite, fmt_int, fmt_num, fmt_pct, isnan, order, out_path,
                           read_table, render_page, report_path_line, run_context, skip_reason_counts)
from ...runs.store import read_manifest
from .figures import (allocation_summary, at, cfg_label, curve_figure, family, layer_labels, layer_order,
                      layer_sparsity_figure, method_colors, overlap_figure, overlap_summary, pct, score_figure,
                      score_summary)

__all__ = ["render", "print_summary", "run_findings", "build_context", "load_importance", "ImpData",
           "importance_findings", "grid_rows", "best_per_config", "pivot", "METHOD_INFO", "NOT_FINITE"]

HERE = Path(__file__).parent  # the page template (importance.html) lives next to this module
NOT_FINITE = "not finite - not saved"
NEURONS_PER_LAYER = 10  # top neurons per layer on the page (neurons.parquet keeps 20)
MAX_NEURON_ROWS = 200
MAX_EXAMPLES = 50  # calibration examples listed on the page
METHOD_INFO = {  # method -> (score of weight W_ij; N calibration examples, X_j input j, G / g gradients), reference
    "magnitude": ("|W_ij| (no data)", "the classic baseline"),
    "wanda": ("|W_ij| · ‖X_j‖₂ / √N", "Sun et al., ICLR 2024 (Wanda)"),
    "gblm": ("|W_ij| · (‖X_j‖₂ / √N + α · √Σ_n G_n,ij²)", "Das et al. 2023 (GBLM-Pruner)"),
    "fisher": ("½ · (1/N) Σ_n g_n,ij² · W_ij²", "LeCun et al. 1989 (Optimal Brain Damage, empirical Fisher)"),
    "taylor": ("|(1/N) Σ_n g_n,ij · W_ij|", "Molchanov et al., CVPR 2019 (first-order Taylor)"),
    "salun": ("|Σ_n g_n,ij|", "Fan et al., ICLR 2024 (SalUn saliency)"),
    "neuron": ("(1/N) Σ_n |Σ_t a_tj (Wᵀ g_t)_j| per MLP neuron j", "gradient × activation (neuron masks only)"),
    "sparsegpt": ("no score: OBS reconstruction with H = 2 XᵀX / N; kept weights are updated",
                  "Frantar & Alistarh, ICML 2023 (SparseGPT)"),
}
GROUPS = {"layer": "within each weight matrix", "row": "within each output row", "global": "across the whole model",
          "block": "SparseGPT's column blocks", "neuron": "whole MLP neurons (input columns of the neuron layers)"}


@dataclass
class ImpData(RunData):
    """An importance run as read from disk (`report.kit.RunData`: manifest, tables, notes; `info` = manifest["importance"])."""

    key = "importance"

    @property
    def is_lm(self) -> bool:
        ev = self.t("evaluation")
        if "loss" in (self.manifest.get("identity") or {}):  # plain-module runs record their loss
            return False
        return ev is None or "ppl" not in ev or bool(ev["ppl"].notna().any())

    @property
    def metric(self) -> str:
        return "ppl" if self.is_lm else "nll"

    @property
    def label(self) -> str:
        return "perplexity" if self.is_lm else "loss"

    @property
    def has_acc(self) -> bool:
        ev = self.t("evaluation")
        return ev is not None and "accuracy" in ev and bool(ev["accuracy"].notna().any())

    @property
    def methods(self) -> list[str]:
        ev = self.t("evaluation")
        seen = [str(m) for m in ev["method"] if str(m) != "dense"] if ev is not None else []
        return order(seen, [str(m) for m in self.cfg.get("methods") or []])

    @property
    def dense(self) -> dict:
        ev = self.t("evaluation")
        d = ev[ev["method"].astype(str) == "dense"] if ev is not None else pd.DataFrame()
        return d.iloc[0].to_dict() if len(d) else {}


def load_importance(run_dir: Path | str) -> ImpData:
    """Read a run's manifest and tables (missing ones noted, never fatal)."""
    run = Path(run_dir)
    man = read_manifest(run)
    notes: list[str] = []
    why = "the run has not finished" if not man.get("finished") else ""
    tables = {n: read_table(run / f"{n}.parquet", notes, f"{n} table", why) for n in ("evaluation", "layers", "scores")}
    for n in ("neurons", "examples", "unlearning"):  # optional: no note when absent
        tables[n] = read_table(run / f"{n}.parquet", notes, f"{n} table") if (run / f"{n}.parquet").exists() else None
    return ImpData(run, man, tables, notes)


# ---------------------------------------------------------------------------------------------------------
# the grid


def configs(data: ImpData) -> list[tuple[str, float]]:
    """(structure, sparsity_target) of the pruned configurations, in evaluation order."""
    ev = data.t("evaluation")
    if ev is None:
        return []
    d = ev[ev["method"].astype(str) != "dense"]
    return list(dict.fromkeys((str(s), float(p)) for s, p in zip(d["structure"], d["sparsity_target"])))


def _ok(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    fin = df["finite"].astype(bool) if "finite" in df else pd.Series(True, index=df.index)
    return df[fin & np.isfinite(df[metric].astype(float))]


def best_per_config(data: ImpData) -> dict[tuple[str, float], dict]:
    """Per configuration, its finite rows sorted by the metric (lower is better): {"rows", "n", "best"}."""
    ev, out = data.t("evaluation"), {}
    for s, p in configs(data):
        d = at(ev[ev["method"].astype(str) != "dense"], s, p)
        ok = _ok(d, data.metric).sort_values(data.metric, kind="stable")
        out[(s, p)] = {"rows": ok, "n": d["method"].nunique(), "best": str(ok["method"].iloc[0]) if len(ok) else None,
                       "bad": [str(m) for m in d["method"] if str(m) not in set(ok["method"].astype(str))]}
    return out


def _ratio(v, dense) -> str:
    """'×1.012': value / dense value (3 decimals, so that a 0.1% change shows); '–' when undefined."""
    if isnan(v) or not (finite(dense) and float(dense)):
        return "–"
    r = float(v) / float(dense)
    if not math.isfinite(r):
        return "×∞" if r > 0 else "–"
    return f"×{r:.3f}" if abs(r) < 10 else f"×{r:.3g}"


def _seconds(data: ImpData) -> dict[tuple[str, str, float], float]:
    """(method, structure, sparsity) -> seconds to prune and evaluate that copy: the manifest's
    importance.seconds (timings are kept out of the tables), else an evaluation.parquet column."""
    out = {}
    for r in data.info.get("seconds") or []:
        if isinstance(r, dict) and finite(r.get("seconds")) and finite(r.get("sparsity")):
            out[(str(r.get("method")), str(r.get("structure")), round(float(r["sparsity"]), 6))] = float(r["seconds"])
    ev = data.t("evaluation")
    if not out and ev is not None and "seconds" in ev:
        out = {(str(m), str(s), round(float(p), 6)): v for m, s, p, v in
               zip(ev["method"], ev["structure"], ev["sparsity_target"], ev["seconds"])}
    return out


def grid_rows(data: ImpData) -> list[dict]:
    """One row per evaluated configuration (dense first) with the formatted cells of the grid table."""
    ev = data.t("evaluation")
    if ev is None or ev.empty:
        return []
    dv, best = data.dense.get(data.metric), best_per_config(data)
    d_acc, secs = data.dense.get("accuracy"), _seconds(data)
    rows = []
    for r in ev.to_dict("records"):
        m, s, p = str(r["method"]), str(r["structure"]), float(r["sparsity_target"])
        fin = bool(r.get("finite", True))
        acc = r.get("accuracy")
        rows.append({"method": m, "structure": s, "target": "–" if m == "dense" else pct(p), "sparsity": p,
                     "achieved": fmt_pct(r.get("sparsity")), "group": "" if isnan(r.get("group")) else str(r["group"]),
                     "calibration": str(r.get("calibration", "")), "value": fmt_num(r.get(data.metric)),
                     "nll": fmt_num(r.get("nll")), "ratio": "×1" if m == "dense" else _ratio(r.get(data.metric), dv),
                     "acc": fmt_pct(acc), "d_acc": "–" if m == "dense" or not (finite(acc) and finite(d_acc))
                     else f"{100 * (float(acc) - float(d_acc)):+.1f} pt", "tokens": fmt_int(r.get("n_tokens")),
                     "seconds": fmt_num(secs.get((m, s, round(p, 6)))), "finite": fin, "dense": m == "dense",
                     "best": m != "dense" and best.get((s, p), {}).get("best") == m})
    return rows


def pivot(data: ImpData) -> dict:
    """The at-a-glance matrix: methods x configurations, each cell the metric and its ratio to dense (or None)."""
    cols = configs(data)
    cells = {(r["method"], r["structure"], round(r["sparsity"], 6)): r for r in grid_rows(data) if not r["dense"]}
    rows = [{"method": m, "cells": [cells.get((m, s, round(p, 6))) for s, p in cols]} for m in data.methods]
    return {"columns": [cfg_label(s, p) for s, p in cols], "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# per layer and per method


def neuron_rows(data: ImpData, names: list[str], labels: dict) -> tuple[list[dict], int]:
    """The top NEURONS_PER_LAYER neurons of each neuron layer in block order (at most MAX_NEURON_ROWS rows), and
    the number of rows left out."""
    nt = data.t("neurons")
    if nt is None or nt.empty:
        return [], 0
    d = nt[nt["rank"] <= NEURONS_PER_LAYER]
    pos = {n: i for i, n in enumerate(names)}
    d = d.assign(_o=d["layer"].astype(str).map(lambda n: pos.get(n, len(pos))))
    d = d.sort_values(["_o", "rank"], kind="stable")
    rows = [{"layer": str(r["layer"]), "label": labels.get(str(r["layer"]), str(r["layer"])), "rank": int(r["rank"]),
             "neuron": int(r["neuron"]), "score": fmt_num(r["score"]), "share": fmt_pct(r["share"])}
            for r in d.head(MAX_NEURON_ROWS).to_dict("records")]
    return rows, max(0, len(d) - MAX_NEURON_ROWS)


def _unlearning(data: ImpData) -> tuple[pd.DataFrame | None, str | None]:
    """unlearning.parquet with a "method" column (`digits_unlearning` indexes by method), and the unlearning
    method with the lowest gap to Retrain (the original and Retrain themselves excluded)."""
    u = data.t("unlearning")
    if u is None or u.empty:
        return None, None
    if "method" not in u:
        u = u.reset_index().rename(columns={"index": "method"})
    cand = u[~u["method"].astype(str).isin(["original", "retrain"])] if "gap" in u else u.iloc[:0]
    cand = cand[cand["gap"].astype(float).notna()] if len(cand) else cand
    return u, (str(cand.loc[cand["gap"].astype(float).idxmin(), "method"]) if len(cand) else None)


def unlearning_table(data: ImpData) -> dict | None:
    """unlearning.parquet as formatted rows; the unlearning method closest to Retrain (lowest gap) marked."""
    u, best = _unlearning(data)
    if u is None:
        return None
    cols = [c for c in u.columns if c != "method"]
    rows = [{"method": str(r["method"]), "best": str(r["method"]) == best,
             "cells": [fmt_num(r[c]) if isinstance(r[c], (int, float, np.number)) else str(r[c]) for c in cols]}
            for r in u.to_dict("records")]
    return {"columns": cols, "rows": rows, "best": best}


# ---------------------------------------------------------------------------------------------------------
# findings


def _config_line(data: ImpData, s: str, p: float, b: dict) -> str | None:
    ok, dv = b["rows"], data.dense.get(data.metric)
    where = f"At {s} ({pct(p)})" if family(s) == "N:M" else (f"At {pct(p)} of the neurons removed" if s == "neuron"
                                                               else f"At {pct(p)} {s}")
    if ok.empty:
        return f"{where}: no finite evaluation ({', '.join(b['bad'])})."
    r = ok.iloc[0]
    short = "ppl" if data.is_lm else "loss"
    acc = f", accuracy {fmt_pct(r['accuracy'])}" if data.has_acc else ""
    line = (f"{where}, {r['method']}: {short} {fmt_num(r[data.metric])} ({_ratio(r[data.metric], dv)} dense{acc}), "
            f"best of {b['n']} method{'s' if b['n'] != 1 else ''}")
    mag = ok[ok["method"].astype(str) == "magnitude"]
    if len(mag) and r["method"] != "magnitude":
        mv = float(mag[data.metric].iloc[0])
        better = [str(m) for m, v in zip(ok["method"], ok[data.metric]) if v < mv and m != "magnitude"]
        worse = [str(m) for m, v in zip(ok["method"], ok[data.metric]) if v > mv]
        line += f"; better than magnitude ({fmt_num(mv)}): {', '.join(better)}"
        line += f"; worse: {', '.join(worse)}" if worse else ""
    elif r["method"] == "magnitude" and len(ok) > 1:
        line += "; no method beats magnitude here"
    if b["bad"]:
        line += f"; not finite: {', '.join(b['bad'])}"
    return line + "."


def importance_findings(data: ImpData) -> list[dict]:
    """Plain sentences from the tables; the first is the headline (the index page shows its first lines)."""
    ev = data.t("evaluation")
    if ev is None or ev.empty:
        return []
    best = best_per_config(data)
    n_cal = data.info.get("n_calibration", "?")
    where = "the calibration data (in-sample)" if data.info.get("in_sample") else "held-out data"
    head = [x for (s, p), b in best.items() if (x := _config_line(data, s, p, b))]
    dense = data.dense
    if dense:
        head.insert(0, f"Dense model: {data.label} {fmt_num(dense.get(data.metric))} on {where}"
                       + (f", {fmt_int(dense.get('n_tokens'))} tokens." if data.is_lm else
                          f", {fmt_int(dense.get('n_tokens'))} rows."))
    out = [{"title": f"Pruning: {len(best)} configuration{'s' if len(best) != 1 else ''} of {len(data.methods)} "
                     f"methods, scored on {n_cal} calibration examples ({data.label}, lower is better)",
            "lines": head}]
    ov = overlap_summary(data.t("layers"))
    if ov:
        lines = []
        for cfg in dict.fromkeys(r["config"] for r in ov):
            rs = [r for r in ov if r["config"] == cfg]
            parts = ", ".join(f"{r['method']} {fmt_pct(r['overlap'])}" for r in rs)
            lines.append(f"{cfg}: share of the pruned weights that magnitude prunes too: {parts} "
                         f"(a random mask: {fmt_pct(rs[0]['chance'])}).")
        out.append({"title": "Where the methods prune other weights than magnitude", "lines": lines})
    al = allocation_summary(data.t("layers"))
    if al:
        out.append({"title": "Uneven per-layer sparsity", "lines": [
            f"{r['method']} at {r['config']}: pruned fraction from {r['lo']} ({r['lo_layer']}) to {r['hi']} "
            f"({r['hi_layer']})" + (f"; {r['n_full']} of {r['n']} layers pruned ENTIRELY" if r["n_full"] else "") + "."
            for r in al[:8]]})
    u, best = _unlearning(data)
    if best is not None:
        parts = ", ".join(f"{m} {fmt_num(g)}" for m, g in zip(u["method"], u["gap"])
                          if m not in ("original", "retrain"))
        out.append({"title": "Unlearning", "lines": [f"Gap to Retrain (mean |Δ| of UA, RA, TA, MIA; lower is closer): "
                                                      f"{parts}; closest: {best}."]})
    return out


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables ([{"title", "lines"}], the headline first)."""
    return importance_findings(load_importance(run_dir))


# ---------------------------------------------------------------------------------------------------------
# page and terminal


def _txt(v) -> str:
    return "" if isnan(v) else str(v)


def _examples(data: ImpData) -> tuple[list[dict], int]:
    """The first MAX_EXAMPLES calibration examples (user text: escaped by the template) and their number."""
    ex = data.t("examples")
    if ex is None or ex.empty:
        return [], 0
    rows = [{"idx": fmt_int(r.get("idx")), "id": _txt(r.get("id")), "group": _txt(r.get("group")),
             "status": _txt(r.get("status")), "reason": _txt(r.get("reason")), "loss": fmt_num(r.get("loss")),
             "tokens": fmt_int(r.get("n_tokens")), "prompt": clip_text(_txt(r.get("prompt"))),
             "response": clip_text(_txt(r.get("response"))), "source": _txt(r.get("source"))}
            for r in ex.head(MAX_EXAMPLES).to_dict("records")]
    return rows, len(ex)


def build_context(data: ImpData) -> dict:
    """The template fields of the importance page."""
    man, reg = data.manifest, FigureRegistry()
    lay, sc, nt = data.t("layers"), data.t("scores"), data.t("neurons")
    pref = [x.get("name") if isinstance(x, dict) else str(x) for x in (man.get("model") or {}).get("layers", [])]
    names, labels = layer_order(pref, lay, sc, nt), layer_labels(lay, sc, nt)
    colors = method_colors(data.methods)
    ev, cfg, calib = data.t("evaluation"), data.cfg, {}
    if ev is not None and "calibration" in ev:  # protocol -> the methods calibrated that way
        for m, c in zip(ev["method"].astype(str), ev["calibration"].astype(str)):
            if m != "dense" and m not in calib.setdefault(c, []):
                calib[c].append(m)
    examples, n_examples = _examples(data)
    neurons, n_omitted = neuron_rows(data, names, labels)
    ov = [dict(r, overlap_s=fmt_pct(r["overlap"]), chance_s=fmt_pct(r["chance"]), low_s=fmt_pct(r["low"]))
          for r in overlap_summary(lay)]
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight importance report: {(man.get('model') or {}).get('id') or data.run_dir.name}",
        "notes": data.notes, "run_notes": [str(n) for n in data.info.get("notes") or []],
        "findings": importance_findings(data), "is_lm": data.is_lm, "label": data.label, "has_acc": data.has_acc,
        "info": data.info, "in_sample": bool(data.info.get("in_sample")), "eval_data": cfg.get("eval_data"),
        "dense": {"value": fmt_num(data.dense.get(data.metric)), "tokens": fmt_int(data.dense.get("n_tokens"))},
        "calibration": calib, "alpha": fmt_num(cfg.get("alpha")),
        "group": cfg.get("group", "auto"), "seqlen": cfg.get("seqlen"), "groups": GROUPS,
        "methods": [{"method": m, "formula": METHOD_INFO.get(m, ("", ""))[0], "ref": METHOD_INFO.get(m, ("", ""))[1],
                     "color": colors[m]} for m in data.methods],
        "grid": grid_rows(data), "pivot": pivot(data), "not_finite": NOT_FINITE,
        "allocation": allocation_summary(lay), "overlap": ov,
        "mean_overlap": fmt_pct(np.mean([r["overlap"] for r in ov])) if ov else "n/a",
        "mean_chance": fmt_pct(np.nanmean([r["chance"] for r in ov])) if ov else "n/a",
        "scores": score_summary(sc, data.methods, {m: v[0] for m, v in METHOD_INFO.items()}),
        "neurons": neurons, "neurons_omitted": n_omitted,
        "neurons_per_layer": NEURONS_PER_LAYER, "unlearning": unlearning_table(data),
        "examples": examples, "n_examples": n_examples, "max_examples": MAX_EXAMPLES,
        "skips": skip_reason_counts(data.t("examples")),
        "fig_curves": reg.add("curves", curve_figure(ev, data.methods, data.metric, data.label, data.is_lm, colors)),
        "fig_alloc": reg.add("alloc", layer_sparsity_figure(lay, names, labels, colors)),
        "fig_overlap": reg.add("overlap", overlap_figure(lay, names, labels, colors)),
        "fig_scores": reg.add("scores", score_figure(sc, data.methods, names, labels, colors)),
        "figures": reg.items,
    }


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of an importance run; returns the written path. Self-contained."""
    data = load_importance(run_dir)
    return render_page("importance.html", build_context(data), out_path(run_dir, out), search=(HERE,))


def print_summary(run_dir: Path | str, console=None) -> None:
    """Print the grid (methods x configurations: metric and ratio to dense, * = best), the best method per
    configuration and the agreement with magnitude. User text is printed as rich ``Text``, never markup."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    data = load_importance(run_dir)
    console.print(Text.assemble(("gradsight importance run ", "bold"), (str(data.run_dir), "cyan")))
    for n in data.notes + [str(x) for x in data.info.get("notes") or []]:
        console.print(Text("note: ", style="dim") + Text(n))
    if data.info.get("in_sample"):
        console.print(Text("evaluated on the calibration data itself (in-sample): optimistic numbers", style="yellow"))
    pv = pivot(data)
    if pv["rows"]:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  title=f"{data.label} (× dense {fmt_num(data.dense.get(data.metric))}; * best; lower is better)")
        t.add_column("method")
        for c in pv["columns"]:
            t.add_column(c, justify="right", overflow="fold")
        for r in pv["rows"]:
            cells = ["" if c is None else ("not finite" if not c["finite"] else
                                           f"{c['value']} {c['ratio']}{' *' if c['best'] else ''}")
                     for c in r["cells"]]
            t.add_row(Text(r["method"]), *cells)
        console.print(t)
    for f in importance_findings(data):
        console.print(Text(f["title"], style="bold cyan"))
        for line in f["lines"]:
            console.print(Text("  " + line))
    console.print(report_path_line(data.run_dir))
