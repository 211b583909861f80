"""The `attribute` page and terminal summary of a saved run: which training examples drive each query.

Reads the run directory only (manifest.json, the tables of `summarize`, attribution/methods.json when present)
and recomputes no score. The page answers "what does this number mean" at the top, then shows per query its
top proponents (most positive scores) and opponents (most negative), per method, with their text; per-token
shading of the proponents (language models); score distributions, per-layer shares, self-influence outliers,
same-group precision@k and the damping each method used.

Conventions (see `gradsight.attribution.methods`): every score is POSITIVE when training on the example HELPS
the query (lowers its loss, or raises its margin for TRAK on a classifier). score_per_n = score / N_train: for
the influence methods (raw, kfac, ekfac; C the curvature of the MEAN loss) the first-order RISE of the query's
loss if that one example were removed. TRAK's Φ'Φ is a SUM over the N examples, so its score itself is already
on that leave-one-out scale. z = score / std of the query's scores over the training set (dense matrix only).

Escaping as on every page (`gradsight.report.kit`): jinja autoescaping for all user text (prompts, responses,
ids, groups, tokens), `kit.ptext` before plotly, figures as script-safe JSON, no external URLs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...report.kit import (FigureRegistry, clip_text, finite, fmt_int, fmt_num, fmt_pct, na, out_path, read_table,
                           render_page, report_path_line, run_context, slug)
from ...runs.store import read_manifest
from .figures import OUTLIER_Z, constant_methods, layer_share_figure, score_distribution_figure, self_influence_figure

__all__ = ["render", "print_summary", "run_findings", "build_context", "load_attribution", "AttrData",
           "attribution_findings", "token_strip", "MAX_QUERIES", "MAX_TOKENS", "TOP_OUTLIERS"]

HERE = Path(__file__).parent  # the page template (attribution.html) lives next to this module
MAX_QUERIES = 20  # queries with their proponents on the page (all are in top.parquet)
MAX_TOKENS = 320  # tokens of one proponent shaded on the page (a window around its largest |token score|)
TOP_OUTLIERS = 10  # self-influence rows per method
HEAD, TAIL = 120, 80  # characters of a long prompt shown: its start and its end (the question sits at either)
INFLUENCE = {"raw": "the raw projected Gauss-Newton matrix (LoGra's “raw”)", "kfac": "K-FAC (S ⊗ A per layer)",
             "ekfac": "EK-FAC (K-FAC eigenbases with corrected eigenvalues, as kronfluence)"}


@dataclass
class AttrData:
    """An attribution run as read from disk: manifest, tables (None when missing), methods.json, notes."""

    run_dir: Path
    manifest: dict
    tables: dict
    info: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def t(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def attribution(self) -> dict:
        return self.manifest.get("attribution") or {}

    @property
    def methods(self) -> list[str]:
        ms = self.attribution.get("methods") or ((self.manifest.get("config") or {}).get("methods")) or []
        top = self.t("top")
        extra = list(dict.fromkeys(top["method"].astype(str))) if top is not None else []
        return list(dict.fromkeys([str(m) for m in ms] + extra))

    @property
    def self_mode(self) -> bool:
        return bool(self.attribution.get("train_x_train"))

    @property
    def is_lm(self) -> bool:
        return "loss" not in (self.manifest.get("identity") or {})

    @property
    def loss_unit(self) -> str:
        ident = self.manifest.get("identity") or {}
        if self.is_lm:
            red = (self.manifest.get("attribution_setup") or {}).get("reduction", "sum")
            return ("nats of the sequence's summed negative log-likelihood (response tokens)" if red == "sum"
                    else "nats per token (mean negative log-likelihood)")
        loss = str(ident.get("loss", "loss"))
        return "nats (cross-entropy)" if loss == "cross_entropy" else f"units of the loss ({loss})"

    @property
    def trak_margin(self) -> bool:
        """TRAK measured on the margin log(p / (1 - p)) (cross-entropy classifiers) rather than the loss."""
        out = (self.info.get("trak") or {}).get("out")  # recorded by the scorer; else the loss says it
        return out == "margin" if out else (self.manifest.get("identity") or {}).get("loss") == "cross_entropy"


def load_attribution(run_dir: Path | str) -> AttrData:
    """Read a run's manifest and tables (missing ones noted, never fatal)."""
    run = Path(run_dir)
    man = read_manifest(run)
    notes: list[str] = []
    why = "the run has not finished scoring" if not man.get("finished") else ""
    tables = {n: read_table(run / f"{n}.parquet", notes, f"{n} table", why)
              for n in ("top", "self_influence", "precision", "score_stats", "layer_share", "curvature")}
    tables["examples"] = read_table(run / "examples.parquet", [], "examples")
    tables["tokens"] = read_table(run / "tokens.parquet", [], "tokens")  # language models only
    info = {}
    p = run / "attribution" / "methods.json"
    if p.exists():
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"attribution/methods.json could not be read: {type(e).__name__}: {e}")
    return AttrData(run, man, tables, info, notes)


# ---------------------------------------------------------------------------------------------------------
# what the numbers mean, and the damping used


def _explain(m: str, data: AttrData) -> dict:
    """Plain-words meaning of method m's score and of its score_per_n."""
    unit = data.loss_unit
    if m in INFLUENCE:
        what = (f"Influence ⟨(C + λI)⁻¹ ∇ℓ_q, ∇ℓ_i⟩ with C = {INFLUENCE[m]}, the curvature of the MEAN training "
                "loss (Koh & Liang 2017; Grosse et al. 2023). Up-weighting example i by ε lowers the query's loss "
                "by ε × score, to first order.")
        per_n = (f"≈ how much the query's loss would RISE, in {unit}, if this one example were removed from the "
                 "N training examples (first order; negative: the loss would fall).")
    elif m == "trak":
        target = "margin log(p / (1 − p)) of the true class" if data.trak_margin else f"loss ({unit})"
        what = ("TRAK (Park et al. 2023): φ_q (Φ'Φ + λI)⁻¹ φ_i" + (" × (1 − p_i)" if data.trak_margin else "")
                + f", φ the gradient of the query's {target}, averaged over checkpoints.")
        per_n = (f"Φ'Φ SUMS over the N examples, so the score itself (not score / N) is on the leave-one-out "
                 f"scale: ≈ how much the query's {target} would move against it if the example were removed. "
                 "score_per_n divides by N once more; compare TRAK by score or z.")
    elif m == "grad_cos":
        what = ("cos(∇ℓ_q, ∇ℓ_i), summed over checkpoints with learning-rate weights (TracIn-cos): the direction "
                "only, in [−1, 1] per checkpoint; large-gradient (high-loss) examples get no extra weight.")
        per_n = "not meaningful for a cosine: compare by score or z."
    elif m == "tracin":
        what = ("TracInCP: Σ_k η_k ⟨∇ℓ_q, ∇ℓ_i⟩ over the checkpoints: the first-order decrease of the query's "
                "loss from the gradient steps taken on i (no curvature).")
        per_n = "no leave-one-out meaning (no curvature): compare by z."
    else:
        what = ("⟨∇ℓ_q, ∇ℓ_i⟩ at the final model: how much one gradient step on i (learning rate 1) lowers the "
                "query's loss, to first order. No curvature: examples with large gradients dominate.")
        per_n = "no leave-one-out meaning (no curvature): compare by z."
    return {"method": m, "what": what, "per_n": per_n}


def _damping_setting(m: str, data: AttrData) -> str:
    inf = data.info.get(m) or {}
    cfg = data.manifest.get("config") or {}
    if m in ("grad_dot", "grad_cos", "tracin"):
        return "none (no curvature)"
    d = inf.get("damping", cfg.get("damping"))
    mode = inf.get("damping_mode", cfg.get("damping_mode", "relative"))
    if d is None:
        return "the method's default"
    if mode == "relative":
        what = "each layer's mean eigenvalue" if m in INFLUENCE else "the mean eigenvalue of Φ'Φ"
        return f"{fmt_num(d)} × {what}"
    return f"{fmt_num(d)} (absolute)"


def method_rows(data: AttrData) -> list[dict]:
    """One row per method: meaning, damping setting, λ used (absolute), curvature eigenvalues, checkpoints."""
    curv = data.t("curvature")
    rows = []
    for m in data.methods:
        inf = data.info.get(m) or {}
        row = {**_explain(m, data), "setting": _damping_setting(m, data), "lam": "–", "eig": "–", "kind": "–",
               "weights": ", ".join(fmt_num(w) for w in inf.get("checkpoint_weights", [])) or "–"}
        c = curv[curv["method"] == m] if curv is not None and len(curv) else None
        if c is not None and len(c):
            lam = c["damping"].to_numpy(float)
            row["lam"] = fmt_num(lam.min()) if np.ptp(lam) == 0 else f"{fmt_num(lam.min())} … {fmt_num(lam.max())}"
            row["eig"] = (f"mean {fmt_num(c['mean_eigenvalue'].mean())}, max {fmt_num(c['max_eigenvalue'].max())} "
                          f"({c['layer'].nunique()} layers)")
            row["kind"] = ", ".join(dict.fromkeys(c["kind"].astype(str)))
        elif m == "trak":
            lam = [x for x in inf.get("lambda_abs", []) if finite(x)]
            row["lam"] = ", ".join(fmt_num(x) for x in lam) or "–"
            if inf.get("trak_dim"):
                row["kind"] = f"Φ'Φ of a {inf['trak_dim']}-dim whole-model feature ({inf.get('projection', '?')})"
        elif m in ("grad_dot", "grad_cos", "tracin"):
            row["kind"] = "identity"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# per query


def clip_both(s) -> dict:
    """`kit.clip_text`, but a long text shows its start AND its end."""
    c = clip_text(s)
    if c["long"]:
        t = "" if s is None else str(s)
        c["short"] = t[:HEAD].rstrip() + " … " + t[-TAIL:].lstrip()
    return c


def _txt(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else str(v)


def _show_token(t: str) -> str:
    t = str(t).replace("\n", "↵").replace("Ċ", "↵").replace("\t", "⇥")
    return (" " + t[1:]) if t[:1] in ("▁", "Ġ") else t


def token_strip(rows: pd.DataFrame, max_tokens: int = MAX_TOKENS) -> dict:
    """One proponent's tokens shaded by their score: green helps the query, red hurts, opacity = |score| /
    max |score| of the example. Longer examples show a window of `max_tokens` around the largest |score|.

    Args:
        rows: tokens.parquet rows of one (method, query, rank): position, token, is_target, score.

    Returns:
        {"tokens": [{"t", "style", "title", "cls"}], "before", "after", "total", "n"}.
    """
    r = rows.sort_values("position")
    s = r["score"].to_numpy(float)
    n = len(s)
    lo = 0
    if n > max_tokens:
        c = int(np.nanargmax(np.abs(s)))
        lo = min(max(c - max_tokens // 2, 0), n - max_tokens)
    top = float(np.nanmax(np.abs(s))) if n and np.isfinite(s).any() else 0.0
    toks = []
    for tok, tgt, v in zip(r["token"].iloc[lo:lo + max_tokens], r["is_target"].iloc[lo:lo + max_tokens],
                           s[lo:lo + max_tokens]):
        a = abs(v) / top if top > 0 and np.isfinite(v) else 0.0
        rgb = "0,158,115" if v >= 0 else "213,94,0"
        toks.append({"t": _show_token(tok), "style": f"background:rgba({rgb},{0.08 + 0.82 * a:.2f})",
                     "title": f"{fmt_num(v)}{' (target)' if tgt else ''}",
                     "cls": ("tp" if v >= 0 else "tn") + (" tg" if tgt else "")})
    return {"tokens": toks, "before": lo, "after": max(n - lo - max_tokens, 0), "total": fmt_num(np.nansum(s)),
            "n": n}


def _example_rows(d: pd.DataFrame, source: dict, strips: dict) -> list[dict]:
    out = []
    for r in d.sort_values("rank").to_dict("records"):
        out.append({"rank": int(r["rank"]), "train": int(r["train"]), "id": _txt(r.get("train_id")),
                    "group": _txt(r.get("train_group")), "same": bool(r.get("same_group")),
                    "score": fmt_num(r["score"]), "sign": "pos" if r["score"] > 0 else "neg",
                    "per_n": fmt_num(r["score_per_n"]), "z": na(r.get("z")),
                    "prompt": clip_both(_txt(r.get("train_prompt"))),
                    "response": clip_text(_txt(r.get("train_response"))),
                    "source": source.get(("train", int(r["train"])), ""),
                    "strip": strips.get((int(r["query"]), int(r["rank"]))) if r["side"] == "proponent" else None})
    return out


def _sources(data: AttrData) -> dict:
    """(set, example) -> where a row came from ("batch 0 row 3"): the only text of a plain nn.Module run."""
    ex = data.t("examples")
    if ex is None or not {"set", "example", "source"} <= set(ex.columns):
        return {}
    last = ex[ex["checkpoint"] == ex["checkpoint"].max()] if "checkpoint" in ex else ex
    return {(str(s), int(e)): _txt(src) for s, e, src in zip(last["set"], last["example"], last["source"])}


def query_sections(data: AttrData) -> tuple[list[dict], int]:
    """The first MAX_QUERIES queries, each with one panel per method; and the number of queries."""
    top = data.t("top")
    if top is None or top.empty:
        return [], 0
    src = _sources(data)
    qset = "train" if data.self_mode else "query"
    tokens, tok_method = data.t("tokens"), None
    strips: dict = {}
    queries = sorted(int(q) for q in top["query"].unique())
    shown = queries[:MAX_QUERIES]
    if tokens is not None and len(tokens):
        tok_method = str(tokens["method"].iloc[0])
        tk = tokens[(tokens["method"] == tok_method) & tokens["query"].isin(shown)]
        strips = {(int(q), int(k)): token_strip(g) for (q, k), g in tk.groupby(["query", "rank"])}
    out = []
    for q in shown:
        d = top[top["query"] == q]
        r0 = d.iloc[0]
        panels = []
        for m in data.methods:
            dm = d[d["method"] == m]
            if dm.empty:
                continue
            pro, opp = dm[dm["side"] == "proponent"], dm[dm["side"] == "opponent"]
            panels.append({"method": m, "pid": f"q{q}-{slug(m)}",
                           "props": _example_rows(pro, src, strips if m == tok_method else {}),
                           "opps": _example_rows(opp, src, {}),
                           # the k lowest scores need not be negative (nor the k highest positive)
                           "no_harm": bool(len(opp)) and bool((opp["score"] > 0).all()),
                           "no_help": bool(len(pro)) and bool((pro["score"] <= 0).all())})
        out.append({"query": q, "id": _txt(r0.get("query_id")), "group": _txt(r0.get("query_group")),
                    "prompt": clip_both(_txt(r0.get("query_prompt"))),
                    "response": clip_text(_txt(r0.get("query_response"))),
                    "source": src.get((qset, q), ""), "panels": panels, "tok_method": tok_method})
    return out, len(queries)


# ---------------------------------------------------------------------------------------------------------
# summaries


def _chance(data: AttrData, method: str) -> float:
    """Same-group precision of a random proponent: per query, the share of training examples in its group
    (itself excluded in train x train), averaged over the queries precision.parquet counts."""
    top, si = data.t("top"), data.t("self_influence")
    if top is None or si is None or si.empty:
        return float("nan")
    tg = si[si["method"] == si["method"].iloc[0]]
    counts = tg["group"].astype(str).value_counts()
    q = top[top["method"] == method].drop_duplicates("query")
    q = q[q["query_group"].astype(str).isin(counts.index)]
    if q.empty:
        return float("nan")
    n, own = len(tg), 1 if data.self_mode else 0
    return float(np.mean([(counts[str(g)] - own) / max(n - own, 1) for g in q["query_group"]]))


def precision_rows(data: AttrData) -> list[dict]:
    prec = data.t("precision")
    if prec is None or prec.empty:
        return []
    chance = {m: _chance(data, m) for m in prec["method"].unique()}
    top = data.t("top")
    kept = top.groupby("method")["rank"].max().to_dict() if top is not None and len(top) else {}
    # precision@k over fewer than k kept proponents is precision@top_k again: not shown
    prec = prec[[k <= kept.get(m, k) for m, k in zip(prec["method"], prec["k"])]]
    return [{"method": str(r.method), "k": int(r.k), "precision": fmt_pct(r.precision), "n": fmt_int(r.n_queries),
             "chance": fmt_pct(chance[r.method]), "above": finite(chance[r.method]) and r.precision > chance[r.method]}
            for r in prec.itertuples()]


def distribution_rows(data: AttrData) -> list[dict]:
    """Per method: the typical share of helpful training examples, spread of scores, z of the top rows."""
    st, top = data.t("score_stats"), data.t("top")
    rows = []
    for m in data.methods:
        s = st[st["method"] == m] if st is not None else pd.DataFrame()
        t = top[(top["method"] == m) & (top["rank"] == 1)] if top is not None else pd.DataFrame()
        zp = t.loc[t["side"] == "proponent", "z"] if len(t) else pd.Series(dtype=float)
        zo = t.loc[t["side"] == "opponent", "z"] if len(t) else pd.Series(dtype=float)
        rows.append({"method": m, "n": fmt_int(len(s)) if len(s) else "–",
                     "helpful": fmt_pct(s["frac_positive"].median()) if len(s) else "n/a",
                     "std": na(s["std"].median()) if len(s) else "n/a",
                     "median": na(s["median"].median()) if len(s) else "n/a",
                     "zp": na(zp.median()) if len(zp) else "n/a", "zo": na(zo.median()) if len(zo) else "n/a"})
    return rows


def self_sections(data: AttrData) -> list[dict]:
    """Per method with an informative self-influence: the TOP_OUTLIERS examples by robust z."""
    si = data.t("self_influence")
    if si is None or si.empty:
        return []
    const = constant_methods(si)
    src = _sources(data)
    out = []
    for m in data.methods:
        g = si[si["method"] == m]
        if g.empty:
            continue
        rows = [{"example": int(r["example"]), "id": _txt(r.get("id")), "group": _txt(r.get("group")),
                 "value": fmt_num(r["self_influence"]), "z": na(r["z"]), "outlier": bool(r["outlier"]),
                 "prompt": clip_both(_txt(r.get("prompt"))), "response": clip_text(_txt(r.get("response"))),
                 "source": src.get(("train", int(r["example"])), "")}
                for r in g.sort_values("z", ascending=False, kind="stable").head(TOP_OUTLIERS).to_dict("records")]
        out.append({"method": m, "pid": f"si-{slug(m)}", "constant": m in const, "rows": [] if m in const else rows,
                    "n_out": 0 if m in const else int(g["outlier"].sum()), "n": len(g)})
    return out


def attribution_findings(data: AttrData) -> list[dict]:
    """Plain sentences from the tables; the first is the headline (the index page shows its first lines)."""
    top = data.t("top")
    if top is None or top.empty:
        return []
    methods, prec = data.methods, data.t("precision")
    nq, nt = data.attribution.get("n_query", top["query"].nunique()), data.attribution.get("n_train", "?")
    head = []
    for m in methods:
        p = prec[(prec["method"] == m) & (prec["k"] == 1)] if prec is not None and len(prec) else pd.DataFrame()
        t1 = top[(top["method"] == m) & (top["side"] == "proponent") & (top["rank"] == 1)]
        z = f"; median z of the top proponent {na(t1['z'].median())}" if t1["z"].notna().any() else ""
        if len(p):
            r = p.iloc[0]
            head.append(f"{m}: the top proponent is in the query's own group for {fmt_pct(r['precision'])} of "
                        f"{fmt_int(r['n_queries'])} queries (chance {fmt_pct(_chance(data, m))}){z}.")
        elif len(t1):
            head.append(f"{m}: median score of the top proponent {fmt_num(t1['score'].median())}{z}.")
    si = data.t("self_influence")
    if si is not None and len(si):
        const = constant_methods(si)
        parts = [f"{m} {int(g['outlier'].sum())} of {len(g)}" for m, g in si.groupby("method", sort=False)
                 if m not in const]
        if parts:
            head.insert(1, f"Self-influence outliers (robust z > {OUTLIER_Z:g}): " + ", ".join(parts) + ".")
    mode = "train × train" if data.self_mode else f"{nq} queries"
    out = [{"title": f"Attribution of {mode} to {nt} training examples ({', '.join(methods)})", "lines": head}]
    m0 = methods[0] if methods else None
    lines = []
    for q in sorted(top["query"].unique())[:3]:
        r = top[(top["method"] == m0) & (top["query"] == q) & (top["side"] == "proponent")].sort_values("rank")
        if len(r):
            r = r.iloc[0]
            lines.append(f"query {_txt(r['query_id'])} ({_txt(r['query_group'])}): top proponent "
                         f"{_txt(r['train_id'])} ({_txt(r['train_group'])}{', same group' if r['same_group'] else ''})"
                         f", score {fmt_num(r['score'])}, per N {fmt_num(r['score_per_n'])}, z {na(r['z'])}.")
    if lines:
        out.append({"title": f"Top proponents ({m0})", "lines": lines})
    damp = [f"{r['method']}: damping {r['setting']}; λ used {r['lam']}." for r in method_rows(data)
            if r["setting"] != "none (no curvature)"]
    if damp:
        out.append({"title": "Damping", "lines": damp})
    return out


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables ([{"title", "lines"}], the headline first)."""
    return attribution_findings(load_attribution(run_dir))


# ---------------------------------------------------------------------------------------------------------
# page and terminal


def build_context(data: AttrData) -> dict:
    """The template fields of the attribution page."""
    man = data.manifest
    reg = FigureRegistry()
    queries, n_queries = query_sections(data)
    labels = {}
    top = data.t("top")
    if top is not None and len(top):
        labels = {int(q): _txt(i) or str(q) for q, i in zip(top["query"], top["query_id"])}
    layer_names = [x.get("name") if isinstance(x, dict) else str(x) for x in (man.get("model") or {}).get("layers", [])]
    setup = man.get("attribution_setup") or {}
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight attribution report: {(man.get('model') or {}).get('id') or data.run_dir.name}",
        "notes": data.notes, "findings": attribution_findings(data), "methods": method_rows(data),
        "n_train": data.attribution.get("n_train", setup.get("n_train")), "n_query": n_queries,
        "self_mode": data.self_mode, "is_lm": data.is_lm, "loss_unit": data.loss_unit,
        "dense": data.attribution.get("dense_scores"), "setup": setup,
        "features_from": data.attribution.get("features_from"),
        "queries": queries, "max_queries": MAX_QUERIES, "max_tokens": MAX_TOKENS, "outlier_z": OUTLIER_Z,
        "precision": precision_rows(data), "distribution": distribution_rows(data), "selfinf": self_sections(data),
        "fig_scores": reg.add("scores", score_distribution_figure(data.t("score_stats"), data.methods,
                                                                  sorted(labels), labels)),
        "fig_layers": reg.add("layers", layer_share_figure(data.t("layer_share"), data.methods, layer_names)),
        "fig_self": reg.add("self", self_influence_figure(data.t("self_influence"), data.methods)),
        "figures": reg.items,
    }


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of an attribution run; returns the written path. Self-contained."""
    data = load_attribution(run_dir)
    return render_page("attribution.html", build_context(data), out_path(run_dir, out), search=(HERE,))


def print_summary(run_dir: Path | str, console=None) -> None:
    """Print the findings, precision@k, the top proponent of the first queries and the self-influence outliers.

    User text (ids, groups, prompts) is printed as rich ``Text``, never parsed as markup.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    data = load_attribution(run_dir)

    def table(*cols: str) -> Table:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for c in cols:
            t.add_column(c, overflow="fold", max_width=40)
        return t

    console.print(Text.assemble(("gradsight attribution run ", "bold"), (str(data.run_dir), "cyan")))
    for n in data.notes:
        console.print(Text("note: ", style="dim") + Text(n))
    for f in attribution_findings(data):
        console.print(Text(f["title"], style="bold cyan"))
        for line in f["lines"]:
            console.print(Text("  " + line))
    qs, n = query_sections(data)
    if qs and qs[0]["panels"]:
        m0 = qs[0]["panels"][0]["method"]
        console.print(Text(f"Top proponent per query ({m0}; positive = helps the query)", style="bold"))
        t = table("query", "group", "text", "top proponent", "group ", "same", "score", "per N", "z")
        for q in qs[:5]:
            p = next((pp for pp in q["panels"] if pp["method"] == m0), None)
            if p and p["props"]:
                r = p["props"][0]
                t.add_row(Text(q["id"]), Text(q["group"]), Text(q["response"]["short"][:60] or q["source"]),
                          Text(r["id"]), Text(r["group"]), "yes" if r["same"] else "no", r["score"], r["per_n"], r["z"])
        console.print(t)
    pr = precision_rows(data)
    if pr:
        t = table("method", "k", "same-group precision", "chance", "queries")
        for r in pr:
            t.add_row(Text(r["method"]), str(r["k"]), r["precision"], r["chance"], r["n"])
        console.print(t)
    for s in self_sections(data):
        out = [r for r in s["rows"] if r["outlier"]][:5]
        if out:
            console.print(Text(f"Self-influence outliers ({s['method']}): {s['n_out']} of {s['n']}", style="bold"))
            for r in out:
                console.print(Text(f"  z {r['z']}  ") + Text(r["id"]) + Text(f"  ({r['group']})", style="dim"))
    console.print(report_path_line(data.run_dir))
