"""Report of a `gradsight geometry` run: a self-contained HTML page and a terminal summary.

Reads the run directory only (manifest.json with ``"analysis": "geometry"`` and its parquet tables) and
never recomputes a statistic: cosines, conflict rates, coherence, entanglement, PSR/NSR, G-Vendi and the
noise scale, with their CIs, come from the tables. The page follows the layers report (``html.py``):
plotly.js inlined once, every figure embedded as script-safe JSON (``_script_json``), every user string
autoescaped by jinja, and text handed to plotly (which renders a small HTML subset in labels and hover
text) entity-escaped first (``_ptext``).

Scopes: every geometry table carries ``scope, scope_type, kind, block``; scope_type is ``model`` (the
whole selected model), ``kind`` (all layers of one kind, e.g. "kind:q"), ``block`` (all selected layers of
one transformer block, e.g. "block:03") or ``layer``. Labels are the ``label`` values of the units
(group, "group:chosen", "group:positive", "group:term", ...); "__all__" means all units.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from .html import (
    FigureRegistry,
    KIND_ORDER,
    PALETTE,
    _atomic_write,
    _clip_text,
    _env,
    _figure,
    _flatten,
    _floats,
    _hex_rgba,
    _isnan,
    _order,
    _ptext,
    _read_table,
    _slug,
    _str_cols,
    _Subplots,
    fmt_int,
    fmt_num,
    skip_reason_counts,
    run_context,
)

__all__ = [
    "render_geometry_html",
    "print_geometry_summary",
    "geometry_findings",
    "load_geometry",
    "GeometryData",
    "fmt_pct",
]

ALL = "__all__"
REQUIRED = ("group_cosines", "pairs", "coherence", "diversity", "noise")
OPTIONAL = ("terms", "entanglement", "entanglement_summary", "psr_nsr", "scores")
SCOPE_STR = ("scope", "scope_type", "kind")
STR_COLS = {
    "examples": ["id", "group", "source", "status", "reason", "prompt", "response", "term", "role", "label"],
    "group_cosines": SCOPE_STR + ("group_a", "group_b"),
    "pairs": SCOPE_STR + ("group_a", "group_b", "note"),
    "coherence": SCOPE_STR + ("group", "note"),
    "terms": SCOPE_STR + ("term_a", "term_b", "note"),
    "entanglement": SCOPE_STR + ("id", "group", "regime"),
    "entanglement_summary": SCOPE_STR,
    "psr_nsr": SCOPE_STR + ("group",),
    "diversity": ("label",),
    "noise": ("label", "layer", "kind"),
    "scores": ("id", "group", "term", "label", "target"),
}
REGIME_COLORS = {"ideal": "#009E73", "both_up": "#E69F00", "both_down": "#0072B2", "reversed": "#D55E00",
                 "tie": "#7f7f7f", "invalid": "#000000"}
REGIME_TEXT = {"ideal": "ideal (chosen ↑, rejected ↓)", "both_up": "both up", "both_down": "both down",
               "reversed": "reversed", "tie": "tie", "invalid": "invalid", "other": "other (tie / reversed)"}
SCORE_METRICS = {
    "grad_norm": "gradient norm",
    "cos_target": "cosine to the target label's mean gradient",
    "diversity": "leave-one-out G-Vendi contribution",
    "erank": "effective rank",
}
MAX_SCATTER = 5000  # entanglement points drawn before subsampling
MAX_PAIR_BARS = 15  # label pairs in the conflict-rate bar chart and conflict-vs-depth lines
TOP_SCORES = 10


# ---------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------


def _fin(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def na(x: Any) -> str:
    """fmt_num, but 'n/a' for a missing value (NaN / None)."""
    return "n/a" if _isnan(x) else fmt_num(x)


def fmt_pct(x: Any) -> str:
    """Share in [0, 1] as a percentage with one decimal ('37.5%'), 'n/a' when missing."""
    return f"{100 * float(x):.1f}%" if _fin(x) else "n/a"


def fmt_ci(lo: Any, hi: Any, pct: bool = False) -> str:
    if not (_fin(lo) and _fin(hi)):
        return "n/a"
    f = fmt_pct if pct else fmt_num
    return f"[{f(lo)}, {f(hi)}]"


def _sqrt(x: Any) -> float:
    """sqrt of a squared norm; NaN when missing or negative."""
    return math.sqrt(float(x)) if _fin(x) and float(x) >= 0 else float("nan")


def _note(x: Any) -> str:
    return "" if _isnan(x) else str(x).strip()


def _show_label(label: str, all_name: str = "all units") -> str:
    return all_name if label == ALL else label


def _pair_name(a: str, b: str) -> str:
    return f"within {a}" if a == b else f"{a} vs {b}"


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GeometryData:
    run_dir: Path
    manifest: dict
    tables: dict[str, pd.DataFrame | None]
    notes: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def colors(self) -> dict[str, str]:
        return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(self.labels)}


def load_geometry(run_dir: Path | str) -> GeometryData:
    """Read the tables of a geometry run (missing required tables become notes; optional ones are skipped).

    Raises:
        FileNotFoundError: no manifest.json in run_dir.
        ValueError: the manifest names another analysis (e.g. a ``layers`` run: use ``render_html``).
    """
    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{run_dir} is not a gradsight run directory (no manifest.json)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    analysis = manifest.get("analysis")
    if analysis not in (None, "geometry"):
        raise ValueError(f"{run_dir} holds a {analysis!r} run, not a geometry run")
    notes: list[str] = []
    if analysis is None:
        notes.append("manifest.json does not name its analysis; read as a geometry run.")
    tables: dict[str, pd.DataFrame | None] = {}
    for name in ("examples",) + REQUIRED:
        tables[name] = _str_cols(_read_table(run_dir / f"{name}.parquet", notes, f"{name} table"), STR_COLS[name])
    for name in OPTIONAL:
        p = run_dir / f"{name}.parquet"
        tables[name] = _str_cols(_read_table(p, notes, f"{name} table"), STR_COLS[name]) if p.exists() else None
    ex = tables["examples"]
    if ex is not None and "idx" in ex:
        tables["examples"] = ex.sort_values("idx", kind="stable").reset_index(drop=True)

    seen: list[str] = []
    if ex is not None and "label" in ex:
        seen += list(ex["label"])
    for name, cols in (("coherence", ("group",)), ("group_cosines", ("group_a", "group_b")), ("diversity", ("label",))):
        df = tables[name]
        for c in cols:
            if df is not None and c in df:
                seen += list(df[c])
    labels = [x for x in dict.fromkeys(seen) if x and x != ALL]
    kinds: list[str] = []
    for df in tables.values():
        if df is not None and "kind" in df:
            kinds += [k for k in df["kind"] if k and k != "nan"]
    return GeometryData(run_dir=run_dir, manifest=manifest, tables=tables, notes=notes, labels=labels,
                        kinds=_order(kinds, KIND_ORDER))


def _tbl(tables: Mapping[str, pd.DataFrame | None] | GeometryData, name: str) -> pd.DataFrame | None:
    df = tables[name] if isinstance(tables, GeometryData) else tables.get(name)
    return None if df is None or df.empty else df


def _scoped(df: pd.DataFrame | None, scope_type: str) -> pd.DataFrame:
    """Rows of one scope type (model rows also by scope name, for tables written before scope_type)."""
    if df is None or df.empty:
        return pd.DataFrame()
    if "scope_type" in df:
        out = df[df["scope_type"] == scope_type]
        if out.empty and scope_type == "model" and "scope" in df:
            out = df[df["scope"] == "model"]
        return out
    return df if scope_type == "model" else pd.DataFrame()


def _unordered(df: pd.DataFrame, a: str = "group_a", b: str = "group_b", diagonal: bool = False) -> pd.DataFrame:
    """One row per scope and unordered pair {a, b} (first occurrence); the diagonal a == b only if asked."""
    if df.empty:
        return df
    scope = df["scope"] if "scope" in df else pd.Series([""] * len(df), index=df.index)
    keys = [(s, frozenset((x, y))) for s, x, y in zip(scope, df[a], df[b])]
    keep = ~pd.Series(keys, index=df.index).duplicated()
    if not diagonal:
        keep &= df[a] != df[b]
    return df[keep]


def _first(df: pd.DataFrame, **eq: Any) -> dict | None:
    for c, v in eq.items():
        df = df[df[c] == v]
    return df.iloc[0].to_dict() if len(df) else None


def _pair_row(pairs: pd.DataFrame, a: str, b: str) -> dict | None:
    if pairs.empty:
        return None
    m = ((pairs["group_a"] == a) & (pairs["group_b"] == b)) | ((pairs["group_a"] == b) & (pairs["group_b"] == a))
    d = pairs[m]
    return d.iloc[0].to_dict() if len(d) else None


# ---------------------------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------------------------


def _cos_sentence(r: dict, pairs: pd.DataFrame, what: str) -> str:
    a, b = r["group_a"], r["group_b"]
    s = f"{what}: {a} and {b}, cosine of the mean gradients {fmt_num(r['cosine'])}"
    p = _pair_row(pairs, a, b)
    if p is not None and _fin(p.get("mean")):
        s += (f"; mean example-pair cosine {fmt_num(p['mean'])} (CI {fmt_ci(p.get('mean_ci_lo'), p.get('mean_ci_hi'))}"
              f", {fmt_int(p.get('n_pairs'))} pairs)")
        if _note(p.get("note")):
            s += f" ({_note(p.get('note'))})"
    return s + "."


def geometry_findings(tables: Mapping[str, pd.DataFrame | None] | GeometryData) -> list[dict]:
    """Plain sentences with numbers, derived from the run's tables.

    Args:
        tables: table name (without ".parquet": "group_cosines", "pairs", "coherence", "terms",
            "entanglement_summary", "psr_nsr", "diversity", "noise", ...) -> DataFrame or None; or a
            ``GeometryData``. Missing tables yield no finding.

    Returns:
        list of {"title": str, "lines": [str, ...]}.
    """
    out: list[dict] = []
    gc = _tbl(tables, "group_cosines")
    pairs_all = _tbl(tables, "pairs")
    pairs = _scoped(pairs_all, "model")

    # --- label alignment at model scope --------------------------------------------------------------------
    if gc is not None:
        m = _unordered(_scoped(gc, "model"))
        m = m[m["cosine"].map(_fin)] if not m.empty else m
        if len(m):
            hi = m.loc[m["cosine"].idxmax()].to_dict()
            lo = m.loc[m["cosine"].idxmin()].to_dict()
            lines = [_cos_sentence(hi, pairs, "Most aligned labels")]
            if len(m) > 1:
                lines.append(_cos_sentence(lo, pairs, "Least aligned labels"))
            n_neg = int((m["cosine"] < 0).sum())
            lines.append(f"{n_neg} of {len(m)} label pairs have a negative cosine between their mean gradients.")
            out.append({"title": "Alignment between labels (whole model)", "lines": lines})
        # --- depth -------------------------------------------------------------------------------------------
        bl = _unordered(_scoped(gc, "block"))
        bl = bl[bl["cosine"].map(_fin)] if not bl.empty else bl
        if len(bl) and bl["block"].nunique() > 1:
            r = bl.loc[bl["cosine"].idxmin()]
            by = bl.groupby("block")["cosine"].mean()
            out.append({"title": "Alignment by depth", "lines": [
                f"The lowest cross-label cosine is {fmt_num(r['cosine'])} ({r['group_a']} vs {r['group_b']}, "
                f"block {int(r['block'])}).",
                f"Averaged over label pairs, the cosine is lowest at block {int(by.idxmin())} ({fmt_num(by.min())}) "
                f"and highest at block {int(by.idxmax())} ({fmt_num(by.max())}).",
            ]})

    # --- conflict ----------------------------------------------------------------------------------------------
    if len(pairs):
        p = pairs[pairs["conflict_rate"].map(_fin)]
        if len(p):
            r = p.loc[p["conflict_rate"].idxmax()].to_dict()
            if r["conflict_rate"] > 0:
                line = (f"Highest conflict rate (share of example pairs with a negative cosine): "
                        f"{_pair_name(r['group_a'], r['group_b'])} {fmt_pct(r['conflict_rate'])} "
                        f"(CI {fmt_ci(r.get('conflict_ci_lo'), r.get('conflict_ci_hi'), pct=True)}, "
                        f"{fmt_int(r.get('n_pairs'))} pairs).")
            else:
                line = f"No example pair has a negative cosine at model scope ({len(p)} label pairs)."
            n_conf = int((p["conflict_rate"] > 0).sum())
            out.append({"title": "Conflict", "lines": [
                line, f"{n_conf} of {len(p)} label pairs (within and between) contain conflicting example pairs."]})

    # --- coherence -----------------------------------------------------------------------------------------------
    coh = _scoped(_tbl(tables, "coherence"), "model")
    if len(coh):
        lines = []
        ok = coh[coh["coherence"].map(_fin) & (coh["n"] >= 2)]
        if len(ok):
            r = ok.loc[ok["coherence"].idxmax()]
            lines.append(f"Most coherent label: {r['group']}, coherence {fmt_num(r['coherence'])} "
                         f"(CI {fmt_ci(r['ci_lo'], r['ci_hi'])}) vs {fmt_num(r['expected'])} expected without "
                         f"alignment (1/n, n = {fmt_int(r['n'])}).")
            withci = ok[ok["ci_lo"].map(_fin)]
            above = int((withci["ci_lo"] > withci["expected"]).sum())
            lines.append(f"{above} of {len(withci)} labels with a CI are more coherent than 1/n (CI above 1/n).")
        for r in coh.to_dict("records"):
            if not _fin(r.get("ci_lo")) and _note(r.get("note")):
                lines.append(f"{r['group']}: CI n/a ({_note(r['note'])}).")
        out.append({"title": "Coherence", "lines": lines})

    # --- loss terms ----------------------------------------------------------------------------------------------
    terms = _scoped(_tbl(tables, "terms"), "model")
    if len(terms):
        lines = []
        for r in terms.to_dict("records"):
            s = (f"{r['term_a']} vs {r['term_b']}: mean per-record cosine {na(r['mean'])} "
                 f"(CI {fmt_ci(r['ci_lo'], r['ci_hi'])}), conflict rate {fmt_pct(r['conflict_rate'])}, cosine of the "
                 f"mean gradients {na(r['mean_gradient_cosine'])}, {fmt_int(r['n_examples'])} records.")
            if _note(r.get("note")):
                s += f" ({_note(r['note'])})"
            lines.append(s)
        out.append({"title": "Loss terms", "lines": lines})

    # --- entanglement ----------------------------------------------------------------------------------------------
    es = _tbl(tables, "entanglement_summary")
    r = _first(_scoped(es, "model")) if es is not None else None
    if r is not None:
        lines = [
            f"{fmt_int(r['n_pairs'])} preference pairs ({fmt_int(r['n_invalid'])} invalid): mean cos(chosen, rejected) "
            f"{na(r['mean_cos'])}.",
            "Predicted first-order change after one step: ideal (chosen up, rejected down) "
            f"{fmt_pct(r['share_ideal'])}, "
            f"both up {fmt_pct(r['share_both_up'])}, both down {fmt_pct(r['share_both_down'])}, other "
            f"{fmt_pct(r['share_other'])}.",
            f"Mean entanglement ratio ⟨a, b⟩ / min(‖a‖², ‖b‖²) = {na(r['mean_ratio'])} "
            f"(CI {fmt_ci(r['ratio_ci_lo'], r['ratio_ci_hi'])}), median {na(r['median_ratio'])}; a ratio ≥ 1 means at "
            "least one of the two log-probabilities moves the wrong way.",
        ]
        kd = _scoped(es, "kind")
        kd = kd[kd["share_ideal"].map(_fin)] if len(kd) else kd
        if len(kd) > 1:
            k = kd.loc[kd["share_ideal"].idxmin()]
            lines.append(f"Fewest ideal pairs in layer kind {k['kind']} ({fmt_pct(k['share_ideal'])}).")
        out.append({"title": "Chosen vs rejected (gradient entanglement)", "lines": lines})

    # --- PSR / NSR ---------------------------------------------------------------------------------------------------
    ps = _scoped(_tbl(tables, "psr_nsr"), "model")
    if len(ps):
        r = _first(ps, group=ALL) or ps.iloc[0].to_dict()
        n_psr, n_nsr = _sqrt(r["sq_norm_psr"]), _sqrt(r["sq_norm_nsr"])
        who = "all rollouts" if r["group"] == ALL else f"group {r['group']}"
        lines = [
            f"{who}: {fmt_int(r['n'])} rollouts ({fmt_int(r['n_positive'])} positive, {fmt_int(r['n_negative'])} "
            f"negative, {fmt_int(r['n_excluded'])} excluded); cos(g+, g−) = {na(r['cos'])}.",
            f"‖g+‖ = {na(n_psr)} (positive sample reinforcement), ‖g−‖ = {na(n_nsr)} (negative sample reinforcement); "
            f"W-REINFORCE (λ = {fmt_num(r['lam'])}) norm {na(r['w_reinforce_norm'])}, RLVR norm {na(r['rlvr_norm'])}.",
        ]
        out.append({"title": "Positive vs negative rollouts (PSR / NSR)", "lines": lines})

    # --- diversity ---------------------------------------------------------------------------------------------------
    dv = _tbl(tables, "diversity")
    if dv is not None:
        per = [f"{r['label']} {na(r['g_vendi'])} (n = {fmt_int(r['n'])})" for r in dv.to_dict("records")
               if r["label"] != ALL]
        lines = []
        q = dv["q"].dropna().unique() if "q" in dv else []
        qtxt = f" (q = {fmt_num(q[0])})" if len(q) == 1 else ""
        if per:
            lines.append(f"G-Vendi{qtxt} per label: " + ", ".join(per) + ".")
        a = _first(dv, label=ALL)
        if a is not None:
            lines.append(f"All units: G-Vendi {na(a['g_vendi'])} of n = {fmt_int(a['n'])}"
                         + (f" ({fmt_int(a.get('n_skipped'))} skipped)" if _fin(a.get("n_skipped")) and a["n_skipped"]
                            else "") + ".")
        lines.append("G-Vendi grows with n: compare labels at equal n.")
        out.append({"title": "Diversity (G-Vendi: effective number of distinct gradient directions)", "lines": lines})

    # --- noise ---------------------------------------------------------------------------------------------
    nz = _tbl(tables, "noise")
    if nz is not None:
        tot = _first(nz, label=ALL, layer="total")
        lines = []
        if tot is not None:
            b = tot["b_simple"]
            if _fin(b):
                ci = fmt_ci(tot["b_ci_lo"], tot["b_ci_hi"])
                lines.append(f"B_simple (all units, whole model) = {fmt_num(b)} (CI {ci}), "
                             f"n = {fmt_int(tot['n'])}; mean GSNR {na(tot['gsnr_mean'])}.")
            elif not _isnan(b):
                lines.append(f"B_simple (all units, whole model) = {fmt_num(b)}: the estimate of ‖G‖² is not positive "
                             f"(no signal detected at n = {fmt_int(tot['n'])}).")
            else:
                lines.append(f"B_simple (all units) n/a (n = {fmt_int(tot['n'])}).")
        lay = nz[(nz["label"] == ALL) & (nz["layer"] != "total")]
        lay = lay[lay["b_simple"].map(_fin)]
        if len(lay) > 1:
            hi, lo = lay.loc[lay["b_simple"].idxmax()], lay.loc[lay["b_simple"].idxmin()]
            lines.append(f"Per layer, B_simple ranges from {fmt_num(lo['b_simple'])} ({lo['layer']}) to "
                         f"{fmt_num(hi['b_simple'])} ({hi['layer']}).")
        if lines:
            out.append({"title": "Gradient noise scale", "lines": lines})
    return out


# ---------------------------------------------------------------------------------------------------------
# figures (plain plotly JSON; user text through _ptext)
# ---------------------------------------------------------------------------------------------------------


def _cos_fmt(x: Any) -> str:
    return f"{float(x):.2f}" if _fin(x) else "n/a"


def cosine_heatmaps(data: GeometryData, scope_type: str) -> dict | None:
    """Label x label cosine heatmap(s): one panel at model scope, or one per kind (labels as #codes)."""
    gc = _scoped(_tbl(data, "group_cosines"), scope_type)
    if gc.empty:
        return None
    panels = ["model"] if scope_type == "model" else [k for k in data.kinds if k in set(gc["kind"])]
    if not panels:
        return None
    labels = [g for g in data.labels if g in set(gc["group_a"]) | set(gc["group_b"])]
    codes = scope_type != "model"
    ticks = [f"#{i + 1}" for i in range(len(labels))] if codes else [_ptext(g) for g in labels]
    sp = _Subplots([_ptext(p) if codes else "" for p in panels], max_cols=3, hspace=0.06 if codes else None)
    traces = []
    for i, p in enumerate(panels):
        d = gc if not codes else gc[gc["kind"] == p]
        look = {(a, b): c for a, b, c in zip(d["group_a"], d["group_b"], d["cosine"])}
        z = [[look.get((a, b)) if _fin(look.get((a, b))) else None for b in labels] for a in labels]
        traces.append(dict(
            sp.refs(i), type="heatmap", x=ticks, y=ticks, z=z, coloraxis="coloraxis", xgap=1, ygap=1,
            text=[[_cos_fmt(look.get((a, b))) for b in labels] for a in labels], texttemplate="%{text}",
            customdata=[[[_ptext(a), _ptext(b)] for b in labels] for a in labels],
            hovertemplate="%{customdata[0]} · %{customdata[1]}<br>cosine %{text}<extra></extra>",
        ))
    for ax in sp.axes("yaxis"):
        ax.update(autorange="reversed", type="category", automargin=True)
    for ax in sp.axes("xaxis"):
        ax.update(type="category", automargin=True, tickangle=-30 if not codes else 0)
    cell = 34 if not codes else 22
    per_row = max(220, cell * len(labels) + 80)
    return _figure(traces, sp, per_row * sp.rows + 80,
                   coloraxis={"colorscale": "RdBu", "cmin": -1, "cmax": 1,
                              "colorbar": {"title": {"text": "cosine", "side": "right"}, "thickness": 14}},
                   margin={"l": 60, "r": 20, "t": 40, "b": 40})


def _depth_lines(rows: pd.DataFrame, key_cols: tuple[str, str], y: str, names: list[tuple[str, str]],
                 colors: list[str], lo: str | None = None, hi: str | None = None, percent: bool = False,
                 ytitle: str = "", ref_line: float | None = None, height: int = 380) -> dict | None:
    """One line (and optional CI band) per pair of keys, y against block."""
    traces: list[dict] = []
    fmt = ".1%" if percent else ".3g"
    for (a, b), col in zip(names, colors):
        d = rows[(rows[key_cols[0]] == a) & (rows[key_cols[1]] == b)].sort_values("block")
        if d.empty:
            continue
        x = [int(v) for v in d["block"]]
        name = _ptext(_pair_name(a, b) if key_cols[0] != key_cols[1] else a)
        if lo and hi:
            band = d[d[lo].map(_fin) & d[hi].map(_fin)]
            if len(band):
                bx = [int(v) for v in band["block"]]
                traces.append(dict(type="scatter", mode="lines", x=bx + bx[::-1],
                                   y=_floats(band[hi]) + _floats(band[lo])[::-1], fill="toself",
                                   fillcolor=_hex_rgba(col, 0.15), line={"width": 0}, hoverinfo="skip",
                                   showlegend=False, legendgroup=name, name=name))
        traces.append(dict(type="scatter", mode="lines+markers", x=x, y=_floats(d[y]), name=name, legendgroup=name,
                           line={"color": col, "width": 2}, marker={"size": 5, "color": col},
                           hovertemplate=f"%{{fullData.name}}<br>block %{{x}}: %{{y:{fmt}}}<extra></extra>"))
    if not traces:
        return None
    shapes = []
    if ref_line is not None:
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": ref_line, "y1": ref_line,
                       "line": {"dash": "dot", "color": "#888", "width": 1}})
    yaxis: dict = {"title": {"text": ytitle}, "zeroline": True}
    if percent:
        yaxis["tickformat"] = ".0%"
    return {"data": traces, "layout": {
        "height": height, "margin": {"l": 60, "r": 20, "t": 20, "b": 50}, "hovermode": "closest",
        "xaxis": {"title": {"text": "block"}, "tickformat": "d"}, "yaxis": yaxis, "shapes": shapes,
        "legend": {"font": {"size": 11}}, "font": {"size": 12}}}


def _pair_colors(n: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def cosine_depth_figure(data: GeometryData) -> dict | None:
    gc = _unordered(_scoped(_tbl(data, "group_cosines"), "block"))
    if gc.empty or gc["block"].nunique() < 2:
        return None
    order = {g: i for i, g in enumerate(data.labels)}
    names = {(a, b) if order.get(a, 0) <= order.get(b, 0) else (b, a) for a, b in zip(gc["group_a"], gc["group_b"])}
    names = sorted(names, key=lambda t: (order.get(t[0], 99), order.get(t[1], 99)))
    rows = _symmetrize(gc)
    return _depth_lines(rows, ("group_a", "group_b"), "cosine", names, _pair_colors(len(names)),
                        ytitle="cosine of the mean gradients", ref_line=0.0)


def _symmetrize(df: pd.DataFrame) -> pd.DataFrame:
    flip = df.rename(columns={"group_a": "group_b", "group_b": "group_a"})
    return pd.concat([df, flip], ignore_index=True)


def _top_conflict_pairs(data: GeometryData, scope_type: str) -> list[tuple[str, str]]:
    """Label pairs ranked by their whole-model conflict rate, ties by the largest rate over `scope_type`."""
    pairs = _tbl(data, "pairs")
    pm = _scoped(pairs, "model")
    if pm.empty:
        return []
    pm = pm[pm["conflict_rate"].map(_fin)]
    other = _scoped(pairs, scope_type)
    peak = (other.groupby(["group_a", "group_b"])["conflict_rate"].max() if len(other)
            else pd.Series(dtype=float))
    key = [(-float(c), -float(peak.get((a, b), 0.0)) if _fin(peak.get((a, b))) else 0.0)
           for a, b, c in zip(pm["group_a"], pm["group_b"], pm["conflict_rate"])]
    order = sorted(range(len(pm)), key=lambda i: key[i])
    names = list(zip(pm["group_a"], pm["group_b"]))
    return [names[i] for i in order][:MAX_PAIR_BARS]


def conflict_kind_figure(data: GeometryData) -> dict | None:
    pairs = _tbl(data, "pairs")
    top = _top_conflict_pairs(data, "kind")
    if pairs is None or not top:
        return None
    scopes = [("model", _scoped(pairs, "model"))]
    kd = _scoped(pairs, "kind")
    scopes += [(f"kind {k}", kd[kd["kind"] == k]) for k in data.kinds if len(kd) and k in set(kd["kind"])]
    cats = [_ptext(_pair_name(a, b)) for a, b in top]
    traces = []
    for j, (name, d) in enumerate(scopes):
        xs, lo, hi, n = [], [], [], []
        for a, b in top:
            r = _pair_row(d, a, b) or {}
            v = r.get("conflict_rate")
            xs.append(float(v) if _fin(v) else None)
            l, h = r.get("conflict_ci_lo"), r.get("conflict_ci_hi")
            lo.append(float(v) - float(l) if _fin(v) and _fin(l) else None)
            hi.append(float(h) - float(v) if _fin(v) and _fin(h) else None)
            n.append(fmt_int(r.get("n_pairs")))
        col = "#1d2330" if name == "model" else PALETTE[(j - 1) % len(PALETTE)]
        traces.append(dict(type="bar", orientation="h", y=cats, x=xs, name=_ptext(name), marker={"color": col},
                           error_x={"type": "data", "array": hi, "arrayminus": lo, "visible": True, "thickness": 1},
                           customdata=n, hovertemplate="%{y}<br>" + _ptext(name)
                           + ": %{x:.1%} of %{customdata} pairs<extra></extra>"))
    h = 80 + len(top) * (8 * len(scopes) + 14)
    return {"data": traces, "layout": {
        "height": max(260, h), "barmode": "group", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "xaxis": {"title": {"text": "conflict rate (share of example pairs with cos < 0)"}, "tickformat": ".0%",
                  "rangemode": "tozero"},
        "yaxis": {"autorange": "reversed", "automargin": True, "type": "category"},
        "legend": {"orientation": "h", "y": 1, "yanchor": "bottom"}, "font": {"size": 12}, "hovermode": "closest"}}


def conflict_depth_figure(data: GeometryData) -> dict | None:
    bl = _scoped(_tbl(data, "pairs"), "block")
    top = _top_conflict_pairs(data, "block")
    if bl.empty or bl["block"].nunique() < 2 or not top:
        return None
    return _depth_lines(_symmetrize(bl), ("group_a", "group_b"), "conflict_rate", top, _pair_colors(len(top)),
                        percent=True, ytitle="conflict rate")


def coherence_figure(data: GeometryData) -> dict | None:
    coh = _scoped(_tbl(data, "coherence"), "model")
    if coh.empty:
        return None
    coh = _by_labels(coh, data, "group")
    cats = [_ptext(g) for g in coh["group"]]
    y = _floats(coh["coherence"])
    lo = [v - l if v is not None and _fin(l) else None for v, l in zip(y, coh["ci_lo"])]
    hi = [h - v if v is not None and _fin(h) else None for v, h in zip(y, coh["ci_hi"])]
    colors = [data.colors.get(g, "#888") for g in coh["group"]]
    custom = [[fmt_int(n), fmt_ci(a, b), _ptext(_note(t)) or "–"] for n, a, b, t in
              zip(coh["n"], coh["ci_lo"], coh["ci_hi"], coh["note"])]
    traces = [
        dict(type="bar", x=cats, y=y, name="coherence", marker={"color": colors}, customdata=custom,
             error_y={"type": "data", "array": hi, "arrayminus": lo, "visible": True, "thickness": 1.2},
             hovertemplate="%{x}<br>coherence %{y:.3g}<br>CI %{customdata[1]}<br>n %{customdata[0]}"
                           "<br>%{customdata[2]}<extra></extra>"),
        dict(type="scatter", mode="markers", x=cats, y=_floats(coh["expected"]), name="1/n (no alignment)",
             marker={"symbol": "line-ew-open", "size": 28, "line": {"width": 2.5, "color": "#D55E00"}},
             hovertemplate="%{x}<br>expected 1/n = %{y:.3g}<extra></extra>"),
    ]
    return {"data": traces, "layout": {
        "height": 380, "margin": {"l": 60, "r": 20, "t": 20, "b": 60}, "hovermode": "closest",
        "yaxis": {"title": {"text": "coherence ‖mean g‖² / mean ‖g‖²"}, "rangemode": "tozero"},
        "xaxis": {"automargin": True, "type": "category"}, "legend": {"orientation": "h", "y": 1.02,
                                                                       "yanchor": "bottom"},
        "font": {"size": 12}}}


def terms_depth_figure(data: GeometryData) -> dict | None:
    t = _scoped(_tbl(data, "terms"), "block")
    if t.empty or t["block"].nunique() < 2:
        return None
    names = list(dict.fromkeys(zip(t["term_a"], t["term_b"])))
    return _depth_lines(t, ("term_a", "term_b"), "mean", names, _pair_colors(len(names)), lo="ci_lo", hi="ci_hi",
                        ytitle="mean per-record cosine", ref_line=0.0)


def entanglement_scatter(data: GeometryData) -> tuple[dict | None, int, int]:
    """Inner product vs min(‖a‖², ‖b‖²) per pair at model scope; returns (figure, n shown, n total)."""
    e = _scoped(_tbl(data, "entanglement"), "model")
    if e.empty:
        return None, 0, 0
    e = e[e["inner"].map(_fin) & e["sq_norm_chosen"].map(_fin) & e["sq_norm_rejected"].map(_fin)]
    n_total = len(e)
    if n_total == 0:
        return None, 0, 0
    if n_total > MAX_SCATTER:
        e = e.sample(MAX_SCATTER, random_state=0).sort_index()
    xm = np.minimum(e["sq_norm_chosen"].to_numpy(float), e["sq_norm_rejected"].to_numpy(float))
    e = e.assign(_x=xm)
    traces = []
    for reg in _order(e["regime"], list(REGIME_COLORS)):
        d = e[e["regime"] == reg]
        traces.append(dict(
            type="scatter", mode="markers", x=_floats(d["_x"]),
            y=_floats(d["inner"]), name=_ptext(REGIME_TEXT.get(reg, reg)),
            marker={"color": REGIME_COLORS.get(reg, "#888"), "size": 6, "opacity": 0.8},
            text=[_ptext(f"{i} ({g})") for i, g in zip(d["id"], d["group"])],
            customdata=[[na(c), na(r), na(a), na(b)] for c, r, a, b in
                        zip(d["cos"], d["ratio"], d["sq_norm_chosen"], d["sq_norm_rejected"])],
            hovertemplate="%{text}<br>⟨a, b⟩ %{y:.4g}<br>‖a‖² %{customdata[2]}, ‖b‖² %{customdata[3]}"
                          "<br>cos %{customdata[0]}, ratio %{customdata[1]}<extra></extra>"))
    hi = float(max(xm.max(), e["inner"].max()))
    traces.append(dict(type="scatter", mode="lines", x=[0.0, hi], y=[0.0, hi],
                       name="⟨a, b⟩ = min(‖a‖², ‖b‖²)", line={"dash": "dash", "color": "#555", "width": 1},
                       hoverinfo="skip"))
    fig = {"data": traces, "layout": {
        "height": 440, "margin": {"l": 70, "r": 20, "t": 20, "b": 60}, "hovermode": "closest",
        "xaxis": {"title": {"text": "min(‖a‖², ‖b‖²)  (a = ∇ log π(chosen), b = ∇ log π(rejected))"},
                  "rangemode": "tozero"},
        "yaxis": {"title": {"text": "⟨a, b⟩"}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"},
        "font": {"size": 12}}}
    return fig, len(e), n_total


def regime_share_figure(data: GeometryData) -> dict | None:
    es = _tbl(data, "entanglement_summary")
    if es is None:
        return None
    rows = [("model", _first(_scoped(es, "model")))]
    kd = _scoped(es, "kind")
    rows += [(k, _first(kd, kind=k)) for k in data.kinds if len(kd) and k in set(kd["kind"])]
    rows = [(n, r) for n, r in rows if r is not None]
    if not rows:
        return None
    cats = [_ptext(n) for n, _ in rows]
    traces = []
    for key in ("ideal", "both_up", "both_down", "other"):
        traces.append(dict(type="bar", x=cats, y=[float(r[f"share_{key}"]) if _fin(r[f"share_{key}"]) else None
                                                  for _, r in rows],
                           name=_ptext(REGIME_TEXT[key]), marker={"color": REGIME_COLORS.get(key, "#bbbbbb")},
                           customdata=[fmt_int(r["n_pairs"]) for _, r in rows],
                           hovertemplate="%{x}: %{y:.1%} of %{customdata} pairs<extra>%{fullData.name}</extra>"))
    return {"data": traces, "layout": {
        "height": 340, "barmode": "stack", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "yaxis": {"title": {"text": "share of pairs"}, "tickformat": ".0%", "range": [0, 1]},
        "xaxis": {"type": "category", "title": {"text": "scope (whole model, then per layer kind)"}},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"}, "font": {"size": 12}}}


def ratio_depth_figure(data: GeometryData) -> dict | None:
    es = _tbl(data, "entanglement_summary")
    bl = _scoped(es, "block")
    if bl.empty or bl["block"].nunique() < 2:
        return None
    rows = bl.assign(_a="all kinds")
    fig = _depth_lines(rows, ("_a", "_a"), "mean_ratio", [("all kinds", "all kinds")], ["#1d2330"],
                       lo="ratio_ci_lo", hi="ratio_ci_hi", ytitle="mean ratio ⟨a, b⟩ / min(‖a‖², ‖b‖²)",
                       ref_line=1.0)
    lay = _scoped(es, "layer")
    if fig is not None and len(lay):
        for i, k in enumerate(k for k in data.kinds if k in set(lay["kind"])):
            d = lay[lay["kind"] == k].sort_values("block")
            fig["data"].append(dict(type="scatter", mode="lines+markers", x=[int(b) for b in d["block"]],
                                    y=_floats(d["mean_ratio"]), name=_ptext(f"kind {k}"),
                                    line={"dash": "dot", "width": 1.5, "color": PALETTE[i % len(PALETTE)]},
                                    marker={"size": 4}, visible="legendonly" if i >= 4 else True,
                                    hovertemplate="%{fullData.name}<br>block %{x}: %{y:.3g}<extra></extra>"))
    return fig


def psr_norm_figure(data: GeometryData) -> dict | None:
    ps = _scoped(_tbl(data, "psr_nsr"), "model")
    if ps.empty:
        return None
    ps = pd.concat([ps[ps["group"] == ALL], ps[ps["group"] != ALL]])
    cats = [_ptext(_show_label(g, "all rollouts")) for g in ps["group"]]

    def root(v):
        return _floats(_sqrt(x) for x in v)

    lam = ps["lam"].iloc[0]
    series = [("‖g+‖ (PSR)", root(ps["sq_norm_psr"]), "#009E73"), ("‖g−‖ (NSR)", root(ps["sq_norm_nsr"]), "#D55E00"),
              (f"W-REINFORCE ‖λg+ + g−‖, λ = {fmt_num(lam)}", _floats(ps["w_reinforce_norm"]), "#0072B2"),
              ("RLVR ‖g+ + g−‖", _floats(ps["rlvr_norm"]), "#7f7f7f")]
    custom = [[fmt_int(n), fmt_int(p), fmt_int(q), na(c)] for n, p, q, c in
              zip(ps["n"], ps["n_positive"], ps["n_negative"], ps["cos"])]
    traces = [dict(type="bar", x=cats, y=y, name=_ptext(name), marker={"color": col}, customdata=custom,
                   hovertemplate="%{x}<br>%{fullData.name} = %{y:.4g}<br>n %{customdata[0]} (+%{customdata[1]} / "
                                 "−%{customdata[2]}), cos(g+, g−) %{customdata[3]}<extra></extra>")
              for name, y, col in series]
    return {"data": traces, "layout": {
        "height": 340, "barmode": "group", "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
        "yaxis": {"title": {"text": "gradient norm (sum over rollouts)"}}, "xaxis": {"type": "category"},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom"}, "font": {"size": 12}}}


def psr_cos_depth_figure(data: GeometryData) -> dict | None:
    bl = _scoped(_tbl(data, "psr_nsr"), "block")
    if bl.empty or bl["block"].nunique() < 2:
        return None
    groups = [ALL] + [g for g in dict.fromkeys(bl["group"]) if g != ALL]
    rows = bl.assign(_g=bl["group"].map(lambda g: _show_label(g, "all rollouts")))
    names = [(_show_label(g, "all rollouts"),) * 2 for g in groups if g in set(bl["group"])]
    return _depth_lines(rows, ("_g", "_g"), "cos", names, ["#1d2330"] + PALETTE, ytitle="cos(g+, g−)",
                        ref_line=0.0)


def diversity_figure(data: GeometryData) -> dict | None:
    dv = _tbl(data, "diversity")
    if dv is None:
        return None
    dv = pd.concat([dv[dv["label"] == ALL], dv[dv["label"] != ALL]])
    cats = [_ptext(_show_label(g)) for g in dv["label"]]
    colors = ["#1d2330" if g == ALL else data.colors.get(g, "#888") for g in dv["label"]]
    return {"data": [dict(type="bar", x=cats, y=_floats(dv["g_vendi"]), marker={"color": colors},
                          text=[f"n = {fmt_int(n)}" for n in dv["n"]], textposition="outside",
                          cliponaxis=False, hovertemplate="%{x}<br>G-Vendi %{y:.4g}<br>%{text}<extra></extra>",
                          name="G-Vendi")],
            "layout": {"height": 360, "margin": {"l": 60, "r": 20, "t": 30, "b": 60}, "showlegend": False,
                       "yaxis": {"title": {"text": "G-Vendi (effective number of directions)"},
                                 "rangemode": "tozero"},
                       "xaxis": {"type": "category", "automargin": True}, "font": {"size": 12}}}


def noise_figure(data: GeometryData) -> dict | None:
    nz = _tbl(data, "noise")
    if nz is None:
        return None
    lay = nz[(nz["label"] == ALL) & (nz["layer"] != "total") & (nz["block"] >= 0)]
    if lay.empty:
        return None
    kinds = [k for k in data.kinds if k in set(lay["kind"])] or list(dict.fromkeys(lay["kind"]))
    sp = _Subplots(["B_simple = tr(Σ) / ‖G‖² per layer", "mean GSNR per layer"], max_cols=2, hspace=0.1)
    traces = []
    for i, k in enumerate(kinds):
        d = lay[lay["kind"] == k].sort_values("block")
        col = PALETTE[i % len(PALETTE)]
        for j, (y, fmt) in enumerate((("b_simple", ".4g"), ("gsnr_mean", ".3g"))):
            traces.append(dict(sp.refs(j), type="scatter", mode="lines+markers", x=[int(b) for b in d["block"]],
                               y=_floats(d[y]), name=_ptext(k), legendgroup=_ptext(k), showlegend=j == 0,
                               line={"color": col, "width": 2}, marker={"size": 5, "color": col},
                               text=[_ptext(x) for x in d["layer"]],
                               hovertemplate=f"%{{text}}<br>%{{y:{fmt}}}<extra></extra>"))
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d", title={"text": "block"})
    sp.layout["yaxis"].update(type="log", exponentformat="power")
    return _figure(traces, sp, 380)


# ---------------------------------------------------------------------------------------------------------
# tables for the page
# ---------------------------------------------------------------------------------------------------------


def label_counts(data: GeometryData) -> list[dict]:
    ex = _tbl(data, "examples")
    if ex is None or "label" not in ex:
        return []
    rows = []
    for lab in data.labels:
        d = ex[ex["label"] == lab]
        if d.empty:
            continue
        ok = d[d["status"] == "ok"] if "status" in d else d

        def mean(col: str) -> str:
            return na(ok[col].mean()) if col in ok and len(ok) and ok[col].notna().any() else "–"

        rows.append(dict(label=lab, color=data.colors[lab], group=", ".join(dict.fromkeys(d.get("group", []))),
                         role=", ".join(dict.fromkeys(d.get("role", []))), units=len(d), ok=len(ok),
                         skipped=len(d) - len(ok), n_target=mean("n_target"), loss=mean("loss"),
                         reward=mean("reward")))
    return rows


def _rec(r: dict, cols: Iterable[str], pct: Iterable[str] = ()) -> dict:
    pct = set(pct)
    return {c: (fmt_pct(r.get(c)) if c in pct else na(r.get(c))) for c in cols}


def _by_labels(df: pd.DataFrame, data: GeometryData, *cols: str) -> pd.DataFrame:
    """Rows sorted by the run's label order (the tables sort labels by name)."""
    if df.empty:
        return df
    order = {g: i for i, g in enumerate(data.labels)}
    keys = [df[c].map(lambda g: order.get(g, len(order))) for c in cols]
    idx = sorted(range(len(df)), key=lambda i: tuple(int(k.iloc[i]) for k in keys))
    return df.iloc[idx]


def pairs_rows(data: GeometryData) -> list[dict]:
    pm = _scoped(_tbl(data, "pairs"), "model")
    if pm.empty:
        return []
    order = {g: i for i, g in enumerate(data.labels)}
    swap = pm["group_a"].map(lambda g: order.get(g, 0)) > pm["group_b"].map(lambda g: order.get(g, 0))
    pm = pm.copy()  # list each pair as (earlier label, later label) in the run's label order
    for x, y in (("group_a", "group_b"), ("n_a", "n_b")):
        pm.loc[swap, [x, y]] = pm.loc[swap, [y, x]].to_numpy()
    pm = _by_labels(pm, data, "group_a", "group_b")
    out = []
    for r in pm.to_dict("records"):
        out.append(dict(pair=_pair_name(r["group_a"], r["group_b"]), within=r["group_a"] == r["group_b"],
                        n_a=fmt_int(r["n_a"]), n_b=fmt_int(r["n_b"]), n_pairs=fmt_int(r["n_pairs"]),
                        mean=na(r["mean"]), mean_ci=fmt_ci(r["mean_ci_lo"], r["mean_ci_hi"]),
                        median=na(r["median"]), q=fmt_ci(r["q05"], r["q95"]), conflict=fmt_pct(r["conflict_rate"]),
                        conflict_ci=fmt_ci(r["conflict_ci_lo"], r["conflict_ci_hi"], pct=True),
                        excluded=fmt_int(r["n_excluded_zero"]), note=_note(r.get("note")),
                        high=_fin(r["conflict_rate"]) and r["conflict_rate"] > 0))
    return out


def coherence_rows(data: GeometryData) -> list[dict]:
    return [dict(label=r["group"], n=fmt_int(r["n"]), excluded=fmt_int(r["n_excluded"]), coherence=na(r["coherence"]),
                 expected=na(r["expected"]), alignment=na(r["alignment"]), ci=fmt_ci(r["ci_lo"], r["ci_hi"]),
                 note=_note(r.get("note")), above=_fin(r["ci_lo"]) and r["ci_lo"] > r["expected"])
            for r in _by_labels(_scoped(_tbl(data, "coherence"), "model"), data, "group").to_dict("records")]


def terms_rows(data: GeometryData) -> list[dict]:
    return [dict(pair=f"{r['term_a']} vs {r['term_b']}", n=fmt_int(r["n_examples"]), excluded=fmt_int(r["n_excluded"]),
                 mean=na(r["mean"]), ci=fmt_ci(r["ci_lo"], r["ci_hi"]), median=na(r["median"]),
                 conflict=fmt_pct(r["conflict_rate"]),
                 conflict_ci=fmt_ci(r["conflict_ci_lo"], r["conflict_ci_hi"], pct=True),
                 mgc=na(r["mean_gradient_cosine"]), note=_note(r.get("note")))
            for r in _scoped(_tbl(data, "terms"), "model").to_dict("records")]


def entanglement_rows(data: GeometryData) -> list[dict]:
    es = _tbl(data, "entanglement_summary")
    if es is None:
        return []
    recs = [("model", r) for r in _scoped(es, "model").to_dict("records")]
    kd = _scoped(es, "kind")
    for k in data.kinds:
        recs += [(f"kind {k}", r) for r in (kd[kd["kind"] == k].to_dict("records") if len(kd) else [])]
    return [dict(scope=s, n=fmt_int(r["n_pairs"]), invalid=fmt_int(r["n_invalid"]), mean_cos=na(r["mean_cos"]),
                 ratio=na(r["mean_ratio"]), ratio_ci=fmt_ci(r["ratio_ci_lo"], r["ratio_ci_hi"]),
                 median_ratio=na(r["median_ratio"]),
                 **_rec(r, ("share_ideal", "share_both_up", "share_both_down", "share_other"),
                        pct=("share_ideal", "share_both_up", "share_both_down", "share_other")))
            for s, r in recs]


def psr_rows(data: GeometryData) -> list[dict]:
    ps = _scoped(_tbl(data, "psr_nsr"), "model")
    out = []
    for r in ps.to_dict("records"):
        out.append(dict(group=_show_label(r["group"], "all rollouts"), n=fmt_int(r["n"]), pos=fmt_int(r["n_positive"]),
                        neg=fmt_int(r["n_negative"]), excluded=fmt_int(r["n_excluded"]),
                        psr=na(_sqrt(r["sq_norm_psr"])), nsr=na(_sqrt(r["sq_norm_nsr"])),
                        inner=na(r["inner"]), cos=na(r["cos"]), lam=na(r["lam"]), w=na(r["w_reinforce_norm"]),
                        rlvr=na(r["rlvr_norm"])))
    return out


def diversity_rows(data: GeometryData) -> list[dict]:
    dv = _tbl(data, "diversity")
    if dv is None:
        return []
    return [dict(label=_show_label(r["label"]), n=fmt_int(r["n"]), skipped=fmt_int(r.get("n_skipped")),
                 g_vendi=na(r["g_vendi"]), q=na(r.get("q"))) for r in dv.to_dict("records")]


def noise_rows(data: GeometryData) -> list[dict]:
    nz = _tbl(data, "noise")
    if nz is None:
        return []
    tot = nz[nz["layer"] == "total"]
    tot = pd.concat([tot[tot["label"] == ALL], tot[tot["label"] != ALL]])
    return [dict(label=_show_label(r["label"]), n=fmt_int(r["n"]), trace=na(r["trace_sigma"]), g_sq=na(r["g_sq"]),
                 b=na(r["b_simple"]), ci=fmt_ci(r["b_ci_lo"], r["b_ci_hi"]), gsnr=na(r["gsnr_mean"]),
                 note="needs at least 2 units" if _fin(r["n"]) and r["n"] < 2 else
                 ("‖G‖² estimate not positive: no signal detected" if _fin(r["g_sq"]) and r["g_sq"] <= 0 else ""))
            for r in tot.to_dict("records")]


def score_tables(data: GeometryData) -> list[dict]:
    sc = _tbl(data, "scores")
    if sc is None:
        return []
    ex = _tbl(data, "examples")
    text = {}
    if ex is not None and "idx" in ex:
        text = {int(i): (p, r) for i, p, r in zip(ex["idx"], ex.get("prompt", [""] * len(ex)),
                                                  ex.get("response", [""] * len(ex)))}
    metrics = [m for m in SCORE_METRICS if m in sc and sc[m].map(_fin).any()]
    out = []
    for m in metrics:
        d = sc[sc[m].map(_fin)].sort_values(m, ascending=False, kind="stable")
        parts = []
        n_low = min(TOP_SCORES, max(len(d) - TOP_SCORES, 0))  # the lowest rows not already among the highest
        for which, rows in (("highest", d.head(TOP_SCORES)), ("lowest", d.tail(n_low).iloc[::-1])):
            recs = []
            for r in rows.to_dict("records"):
                p, resp = text.get(int(r["idx"]), ("", ""))
                recs.append(dict(idx=fmt_int(r["idx"]), id=r.get("id", ""), label=r.get("label", ""),
                                 term=r.get("term", ""), value=na(r[m]),
                                 others=[(k, na(r.get(k))) for k in metrics if k != m],
                                 prompt=_clip_text(p), response=_clip_text(resp)))
            if recs:
                parts.append({"which": which, "rows": recs})
        target = ""
        if m == "cos_target" and "target" in sc:
            t = [x for x in dict.fromkeys(sc["target"]) if x and x != "nan"]
            target = ", ".join(t)
        out.append({"metric": m, "id": f"scores-{_slug(m)}", "label": SCORE_METRICS[m], "parts": parts,
                    "target": target, "others": [k for k in metrics if k != m]})
    return out


def skipped_rows(data: GeometryData) -> list[dict]:
    ex = _tbl(data, "examples")
    if ex is None or "status" not in ex:
        return []
    sk = ex[ex["status"] != "ok"]
    return [dict(idx=fmt_int(r.get("idx")), id=r.get("id", ""), group=r.get("group", ""), term=r.get("term", ""),
                 label=r.get("label", ""), reason=r.get("reason", "")) for r in sk.to_dict("records")]


def _ci_level(manifest: dict) -> str:
    for k, v in _flatten(manifest.get("config") or {}).items():
        if k.split(".")[-1].lower() == "ci" and _fin(v):
            return f"{100 * float(v):g}%"
    return ""


def geometry_config(manifest: dict) -> list[tuple[str, str]]:
    geo = manifest.get("geometry") or {}
    out = []
    for k, v in geo.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        out.append((str(k), "(none)" if v is None else str(v)))
    return out


# ---------------------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------------------


def build_geometry_context(data: GeometryData) -> dict:
    man = data.manifest
    model = man.get("model") or {}
    registry = FigureRegistry()
    fig = registry.add

    scatter, n_shown, n_total = entanglement_scatter(data)
    ex = _tbl(data, "examples")
    counts = label_counts(data)
    status = ex["status"] if ex is not None and "status" in ex else pd.Series(dtype=str)
    n_records = int(ex["record_idx"].nunique()) if ex is not None and "record_idx" in ex else None
    has = {name: _tbl(data, name) is not None for name in REQUIRED + OPTIONAL}
    has["entanglement"] = has["entanglement"] or has["entanglement_summary"]
    ctx = {
        **run_context(man, data.run_dir),
        "title": f"gradsight geometry report: {model.get('id') or data.run_dir.name}",
        "kinds": data.kinds,
        "geometry_config": geometry_config(man),
        "ci_level": _ci_level(man),
        "totals": {"units": int(len(ex)) if ex is not None else 0, "ok": int((status == "ok").sum()),
                   "skipped": int((status != "ok").sum()) if len(status) else 0, "records": n_records},
        "counts": counts,
        "skip_reasons": skip_reason_counts(ex),
        "skipped": skipped_rows(data),
        "notes": data.notes,
        "findings": geometry_findings(data),
        "labels": [{"name": g, "color": c, "code": f"#{i + 1}"} for i, (g, c) in enumerate(data.colors.items())],
        "has": has,
        "fig_cos_model": fig("cos-model", cosine_heatmaps(data, "model")),
        "fig_cos_kind": fig("cos-kind", cosine_heatmaps(data, "kind")),
        "fig_cos_depth": fig("cos-depth", cosine_depth_figure(data)),
        "pairs": pairs_rows(data),
        "max_pair_bars": MAX_PAIR_BARS,
        "fig_conflict_kind": fig("conflict-kind", conflict_kind_figure(data)),
        "fig_conflict_depth": fig("conflict-depth", conflict_depth_figure(data)),
        "coherence": coherence_rows(data),
        "fig_coherence": fig("coherence", coherence_figure(data)),
        "terms": terms_rows(data),
        "fig_terms_depth": fig("terms-depth", terms_depth_figure(data)),
        "entanglement": entanglement_rows(data),
        "fig_ent_scatter": fig("ent-scatter", scatter),
        "ent_shown": n_shown,
        "ent_total": n_total,
        "fig_ent_regimes": fig("ent-regimes", regime_share_figure(data)),
        "fig_ent_ratio": fig("ent-ratio", ratio_depth_figure(data)),
        "psr": psr_rows(data),
        "fig_psr_norms": fig("psr-norms", psr_norm_figure(data)),
        "fig_psr_depth": fig("psr-depth", psr_cos_depth_figure(data)),
        "diversity": diversity_rows(data),
        "fig_diversity": fig("diversity", diversity_figure(data)),
        "noise": noise_rows(data),
        "fig_noise": fig("noise", noise_figure(data)),
        "scores": score_tables(data),
        "figures": registry.items,
    }
    return ctx


def render_geometry_html(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a geometry run; returns the written path.

    The page is self-contained (plotly.js inlined once, no external URLs); sections whose optional table
    is absent (terms, entanglement, psr_nsr, scores) are left out.
    """
    data = load_geometry(run_dir)
    page = _env().get_template("geometry.html").render(**build_geometry_context(data))
    out_path = Path(out) if out is not None else Path(run_dir) / "report.html"
    _atomic_write(out_path, page)
    return out_path


# ---------------------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------------------


def print_geometry_summary(run_dir: Path | str, console=None) -> None:
    """Print counts per label, skip reasons, findings, G-Vendi, the noise scale and entanglement shares.

    User text (labels, reasons, paths) is printed as rich ``Text``, never parsed as markup.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    run_dir = Path(run_dir)
    console = console or Console()
    data = load_geometry(run_dir)
    man = data.manifest
    model, dsrc, geo = man.get("model") or {}, man.get("data") or {}, man.get("geometry") or {}

    def table(*cols: str, right: Iterable[str] = ()) -> Table:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        right = set(right)
        for c in cols:
            t.add_column(c, justify="right" if c in right else "left", overflow="fold",
                         max_width=None if c in right else 40)
        return t

    console.print(Text.assemble(("gradsight geometry run ", "bold"), (str(run_dir), "cyan")))
    head = Text("model ", style="dim")
    head.append(str(model.get("id") or "(unknown)"))
    if model.get("n_blocks") is not None:
        head.append(f"  ({model.get('n_blocks')} blocks, {len(model.get('layers') or [])} layers)", style="dim")
    console.print(head)
    console.print(Text("data  ", style="dim") + Text(str(dsrc.get("path") or "(unknown)")))
    if geo:
        console.print(Text("mode  ", style="dim") + Text(", ".join(f"{k} {v}" for k, v in geometry_config(man))))

    counts = label_counts(data)
    if counts:
        t = table("label", "role", "units", "ok", "skipped", right=("units", "ok", "skipped"))
        for c in counts:
            t.add_row(Text(c["label"]), Text(c["role"]), str(c["units"]), str(c["ok"]),
                      Text(str(c["skipped"]), style="bold yellow" if c["skipped"] else ""))
        console.print(t)
    ex = _tbl(data, "examples")
    reasons = skip_reason_counts(ex)
    if reasons:
        n_skip = sum(n for _, n in reasons)
        console.print(Text(f"WARNING: {n_skip} of {len(ex)} units skipped", style="bold yellow"))
        for reason, n in reasons:
            console.print(Text("  - ") + Text(reason) + Text(f": {n}", style="bold"))
    for note in data.notes:
        console.print(Text("note: ", style="dim") + Text(note))

    findings = geometry_findings(data)
    if findings:
        console.print()
        console.print(Text("Findings", style="bold"))
        for f in findings:
            console.print(Text(f["title"], style="bold cyan"))
            for line in f["lines"]:
                console.print(Text("  " + line))

    dv = diversity_rows(data)
    if dv:
        console.print()
        console.print(Text("G-Vendi per label (grows with n)", style="bold"))
        t = table("label", "n", "G-Vendi", right=("n", "G-Vendi"))
        for r in dv:
            t.add_row(Text(r["label"]), r["n"], r["g_vendi"])
        console.print(t)

    nz = noise_rows(data)
    if nz:
        console.print(Text("Noise scale B_simple (whole model)", style="bold"))
        t = table("label", "n", "B_simple", "CI", right=("n", "B_simple", "CI"))
        for r in nz:
            t.add_row(Text(r["label"]), r["n"], r["b"], r["ci"])
        console.print(t)

    en = entanglement_rows(data)
    if en:
        console.print(Text("Entanglement of chosen vs rejected: share of pairs per regime", style="bold"))
        t = table("scope", "pairs", "ideal", "both up", "both down", "other", "mean ratio",
                  right=("pairs", "ideal", "both up", "both down", "other", "mean ratio"))
        for r in en:
            t.add_row(Text(r["scope"]), r["n"], r["share_ideal"], r["share_both_up"], r["share_both_down"],
                      r["share_other"], r["ratio"])
        console.print(t)

    rp = run_dir / "report.html"
    line = Text("report ", style="dim")
    line.append(str(rp), style="cyan")
    if not rp.exists():
        line.append("  (not written yet: gradsight.report.geometry.render_geometry_html(run_dir))", style="dim")
    console.print(line)
