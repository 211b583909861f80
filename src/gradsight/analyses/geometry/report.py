"""The `geometry` page and terminal summary of a saved run.

Reads the run directory only (manifest.json with ``"analysis": "geometry"`` and its parquet tables, see
`data.load_geometry`) and never recomputes a statistic: cosines, conflict rates, coherence, entanglement,
PSR/NSR, G-Vendi and the noise scale, with their CIs, come from the tables. The page (template
``analyses/geometry/geometry.html``, figures in `figures`) is built with `gradsight.report.kit` like every
page: plotly.js inlined once, every figure embedded as script-safe JSON (`kit.script_json`), every user string
autoescaped by jinja, and text handed to plotly (which renders a small HTML subset in labels and hover text)
entity-escaped first (`kit.ptext`).

Scopes: every geometry table carries ``scope, scope_type, kind, block``; scope_type is ``model`` (the
whole selected model), ``kind`` (all layers of one kind, e.g. "kind:q"), ``block`` (all selected layers of
one transformer block, e.g. "block:03") or ``layer``. Labels are the ``label`` values of the units
(group, "group:chosen", "group:positive", "group:term", ...); "__all__" means all units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from ...report.kit import (
    report_path_line,
    FigureRegistry,
    clip_text,
    finite,
    flatten,
    fmt_ci,
    fmt_int,
    fmt_num,
    fmt_pct,
    isnan,
    na,
    out_path,
    render_page,
    run_context,
    skip_reason_counts,
    slug,
)
from .data import (
    ALL,
    OPTIONAL,
    REQUIRED,
    GeometryData,
    by_labels,
    first_row,
    get_table,
    load_geometry,
    note_text,
    pair_name,
    pair_row,
    scoped,
    show_label,
    sqrt_norm,
    unordered,
)
from .figures import (
    MAX_PAIR_BARS,
    coherence_figure,
    conflict_depth_figure,
    conflict_kind_figure,
    cosine_depth_figure,
    cosine_heatmaps,
    diversity_figure,
    entanglement_scatter,
    noise_figure,
    psr_cos_depth_figure,
    psr_norm_figure,
    ratio_depth_figure,
    regime_share_figure,
    terms_depth_figure,
)

__all__ = ["run_findings", 
    "render",
    "print_summary",
    "build_context",
    "geometry_findings",
    "load_geometry",
    "GeometryData",
    "entanglement_scatter",
    "fmt_pct",
]

HERE = Path(__file__).parent  # the page template (geometry.html) lives next to this module
SCORE_METRICS = {
    "grad_norm": "gradient norm",
    "cos_target": "cosine to the target label's mean gradient",
    "diversity": "leave-one-out G-Vendi contribution",
    "erank": "effective rank",
}
TOP_SCORES = 10


# ---------------------------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------------------------


def _cos_sentence(r: dict, pairs: pd.DataFrame, what: str) -> str:
    a, b = r["group_a"], r["group_b"]
    s = f"{what}: {a} and {b}, cosine of the mean gradients {fmt_num(r['cosine'])}"
    p = pair_row(pairs, a, b)
    if p is not None and finite(p.get("mean")):
        s += (f"; mean example-pair cosine {fmt_num(p['mean'])} (CI {fmt_ci(p.get('mean_ci_lo'), p.get('mean_ci_hi'))}"
              f", {fmt_int(p.get('n_pairs'))} pairs)")
        if note_text(p.get("note")):
            s += f" ({note_text(p.get('note'))})"
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
    gc = get_table(tables, "group_cosines")
    pairs_all = get_table(tables, "pairs")
    pairs = scoped(pairs_all, "model")

    # --- label alignment at model scope --------------------------------------------------------------------
    if gc is not None:
        m = unordered(scoped(gc, "model"))
        m = m[m["cosine"].map(finite)] if not m.empty else m
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
        bl = unordered(scoped(gc, "block"))
        bl = bl[bl["cosine"].map(finite)] if not bl.empty else bl
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
        p = pairs[pairs["conflict_rate"].map(finite)]
        if len(p):
            r = p.loc[p["conflict_rate"].idxmax()].to_dict()
            if r["conflict_rate"] > 0:
                line = (f"Highest conflict rate (share of example pairs with a negative cosine): "
                        f"{pair_name(r['group_a'], r['group_b'])} {fmt_pct(r['conflict_rate'])} "
                        f"(CI {fmt_ci(r.get('conflict_ci_lo'), r.get('conflict_ci_hi'), pct=True)}, "
                        f"{fmt_int(r.get('n_pairs'))} pairs).")
            else:
                line = f"No example pair has a negative cosine at model scope ({len(p)} label pairs)."
            n_conf = int((p["conflict_rate"] > 0).sum())
            out.append({"title": "Conflict", "lines": [
                line, f"{n_conf} of {len(p)} label pairs (within and between) contain conflicting example pairs."]})

    # --- coherence -----------------------------------------------------------------------------------------------
    coh = scoped(get_table(tables, "coherence"), "model")
    if len(coh):
        lines = []
        ok = coh[coh["coherence"].map(finite) & (coh["n"] >= 2)]
        if len(ok):
            r = ok.loc[ok["coherence"].idxmax()]
            lines.append(f"Most coherent label: {r['group']}, coherence {fmt_num(r['coherence'])} "
                         f"(CI {fmt_ci(r['ci_lo'], r['ci_hi'])}) vs {fmt_num(r['expected'])} expected without "
                         f"alignment (1/n, n = {fmt_int(r['n'])}).")
            withci = ok[ok["ci_lo"].map(finite)]
            above = int((withci["ci_lo"] > withci["expected"]).sum())
            lines.append(f"{above} of {len(withci)} labels with a CI are more coherent than 1/n (CI above 1/n).")
        for r in coh.to_dict("records"):
            if not finite(r.get("ci_lo")) and note_text(r.get("note")):
                lines.append(f"{r['group']}: CI n/a ({note_text(r['note'])}).")
        out.append({"title": "Coherence", "lines": lines})

    # --- loss terms ----------------------------------------------------------------------------------------------
    terms = scoped(get_table(tables, "terms"), "model")
    if len(terms):
        lines = []
        for r in terms.to_dict("records"):
            s = (f"{r['term_a']} vs {r['term_b']}: mean per-record cosine {na(r['mean'])} "
                 f"(CI {fmt_ci(r['ci_lo'], r['ci_hi'])}), conflict rate {fmt_pct(r['conflict_rate'])}, cosine of the "
                 f"mean gradients {na(r['mean_gradient_cosine'])}, {fmt_int(r['n_examples'])} records.")
            if note_text(r.get("note")):
                s += f" ({note_text(r['note'])})"
            lines.append(s)
        out.append({"title": "Loss terms", "lines": lines})

    # --- entanglement ----------------------------------------------------------------------------------------------
    es = get_table(tables, "entanglement_summary")
    r = first_row(scoped(es, "model")) if es is not None else None
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
        kd = scoped(es, "kind")
        kd = kd[kd["share_ideal"].map(finite)] if len(kd) else kd
        if len(kd) > 1:
            k = kd.loc[kd["share_ideal"].idxmin()]
            lines.append(f"Fewest ideal pairs in layer kind {k['kind']} ({fmt_pct(k['share_ideal'])}).")
        out.append({"title": "Chosen vs rejected (gradient entanglement)", "lines": lines})

    # --- PSR / NSR ---------------------------------------------------------------------------------------------------
    ps = scoped(get_table(tables, "psr_nsr"), "model")
    if len(ps):
        r = first_row(ps, group=ALL) or ps.iloc[0].to_dict()
        n_psr, n_nsr = sqrt_norm(r["sq_norm_psr"]), sqrt_norm(r["sq_norm_nsr"])
        who = "all rollouts" if r["group"] == ALL else f"group {r['group']}"
        lines = [
            f"{who}: {fmt_int(r['n'])} rollouts ({fmt_int(r['n_positive'])} positive, {fmt_int(r['n_negative'])} "
            f"negative, {fmt_int(r['n_excluded'])} excluded); cos(g+, g−) = {na(r['cos'])}.",
            f"‖g+‖ = {na(n_psr)} (positive sample reinforcement), ‖g−‖ = {na(n_nsr)} (negative sample reinforcement); "
            f"W-REINFORCE (λ = {fmt_num(r['lam'])}) norm {na(r['w_reinforce_norm'])}, RLVR norm {na(r['rlvr_norm'])}.",
        ]
        out.append({"title": "Positive vs negative rollouts (PSR / NSR)", "lines": lines})

    # --- diversity ---------------------------------------------------------------------------------------------------
    dv = get_table(tables, "diversity")
    if dv is not None:
        per = [f"{r['label']} {na(r['g_vendi'])} (n = {fmt_int(r['n'])})" for r in dv.to_dict("records")
               if r["label"] != ALL]
        lines = []
        q = dv["q"].dropna().unique() if "q" in dv else []
        qtxt = f" (q = {fmt_num(q[0])})" if len(q) == 1 else ""
        if per:
            lines.append(f"G-Vendi{qtxt} per label: " + ", ".join(per) + ".")
        a = first_row(dv, label=ALL)
        if a is not None:
            lines.append(f"All units: G-Vendi {na(a['g_vendi'])} of n = {fmt_int(a['n'])}"
                         + (f" ({fmt_int(a.get('n_skipped'))} skipped)" if finite(a.get("n_skipped")) and a["n_skipped"]
                            else "") + ".")
        lines.append("G-Vendi grows with n: compare labels at equal n.")
        out.append({"title": "Diversity (G-Vendi: effective number of distinct gradient directions)", "lines": lines})

    # --- noise ---------------------------------------------------------------------------------------------
    nz = get_table(tables, "noise")
    if nz is not None:
        tot = first_row(nz, label=ALL, layer="total")
        lines = []
        if tot is not None:
            b = tot["b_simple"]
            if finite(b):
                ci = fmt_ci(tot["b_ci_lo"], tot["b_ci_hi"])
                lines.append(f"B_simple (all units, whole model) = {fmt_num(b)} (CI {ci}), "
                             f"n = {fmt_int(tot['n'])}; mean GSNR {na(tot['gsnr_mean'])}.")
            elif not isnan(b):
                lines.append(f"B_simple (all units, whole model) = {fmt_num(b)}: the estimate of ‖G‖² is not positive "
                             f"(no signal detected at n = {fmt_int(tot['n'])}).")
            else:
                lines.append(f"B_simple (all units) n/a (n = {fmt_int(tot['n'])}).")
        lay = nz[(nz["label"] == ALL) & (nz["layer"] != "total")]
        lay = lay[lay["b_simple"].map(finite)]
        if len(lay) > 1:
            hi, lo = lay.loc[lay["b_simple"].idxmax()], lay.loc[lay["b_simple"].idxmin()]
            lines.append(f"Per layer, B_simple ranges from {fmt_num(lo['b_simple'])} ({lo['layer']}) to "
                         f"{fmt_num(hi['b_simple'])} ({hi['layer']}).")
        if lines:
            out.append({"title": "Gradient noise scale", "lines": lines})
    return out


# ---------------------------------------------------------------------------------------------------------
# tables for the page
# ---------------------------------------------------------------------------------------------------------


def label_counts(data: GeometryData) -> list[dict]:
    ex = get_table(data, "examples")
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


def pairs_rows(data: GeometryData) -> list[dict]:
    pm = scoped(get_table(data, "pairs"), "model")
    if pm.empty:
        return []
    order = {g: i for i, g in enumerate(data.labels)}
    swap = pm["group_a"].map(lambda g: order.get(g, 0)) > pm["group_b"].map(lambda g: order.get(g, 0))
    pm = pm.copy()  # list each pair as (earlier label, later label) in the run's label order
    for x, y in (("group_a", "group_b"), ("n_a", "n_b")):
        pm.loc[swap, [x, y]] = pm.loc[swap, [y, x]].to_numpy()
    pm = by_labels(pm, data, "group_a", "group_b")
    out = []
    for r in pm.to_dict("records"):
        out.append(dict(pair=pair_name(r["group_a"], r["group_b"]), within=r["group_a"] == r["group_b"],
                        n_a=fmt_int(r["n_a"]), n_b=fmt_int(r["n_b"]), n_pairs=fmt_int(r["n_pairs"]),
                        mean=na(r["mean"]), mean_ci=fmt_ci(r["mean_ci_lo"], r["mean_ci_hi"]),
                        median=na(r["median"]), q=fmt_ci(r["q05"], r["q95"]), conflict=fmt_pct(r["conflict_rate"]),
                        conflict_ci=fmt_ci(r["conflict_ci_lo"], r["conflict_ci_hi"], pct=True),
                        excluded=fmt_int(r["n_excluded_zero"]), note=note_text(r.get("note")),
                        high=finite(r["conflict_rate"]) and r["conflict_rate"] > 0))
    return out


def coherence_rows(data: GeometryData) -> list[dict]:
    return [dict(label=r["group"], n=fmt_int(r["n"]), excluded=fmt_int(r["n_excluded"]), coherence=na(r["coherence"]),
                 expected=na(r["expected"]), alignment=na(r["alignment"]), ci=fmt_ci(r["ci_lo"], r["ci_hi"]),
                 note=note_text(r.get("note")), above=finite(r["ci_lo"]) and r["ci_lo"] > r["expected"])
            for r in by_labels(scoped(get_table(data, "coherence"), "model"), data, "group").to_dict("records")]


def terms_rows(data: GeometryData) -> list[dict]:
    return [dict(pair=f"{r['term_a']} vs {r['term_b']}", n=fmt_int(r["n_examples"]), excluded=fmt_int(r["n_excluded"]),
                 mean=na(r["mean"]), ci=fmt_ci(r["ci_lo"], r["ci_hi"]), median=na(r["median"]),
                 conflict=fmt_pct(r["conflict_rate"]),
                 conflict_ci=fmt_ci(r["conflict_ci_lo"], r["conflict_ci_hi"], pct=True),
                 mgc=na(r["mean_gradient_cosine"]), note=note_text(r.get("note")))
            for r in scoped(get_table(data, "terms"), "model").to_dict("records")]


def entanglement_rows(data: GeometryData) -> list[dict]:
    es = get_table(data, "entanglement_summary")
    if es is None:
        return []
    recs = [("model", r) for r in scoped(es, "model").to_dict("records")]
    kd = scoped(es, "kind")
    for k in data.kinds:
        recs += [(f"kind {k}", r) for r in (kd[kd["kind"] == k].to_dict("records") if len(kd) else [])]
    return [dict(scope=s, n=fmt_int(r["n_pairs"]), invalid=fmt_int(r["n_invalid"]), mean_cos=na(r["mean_cos"]),
                 ratio=na(r["mean_ratio"]), ratio_ci=fmt_ci(r["ratio_ci_lo"], r["ratio_ci_hi"]),
                 median_ratio=na(r["median_ratio"]),
                 **_rec(r, ("share_ideal", "share_both_up", "share_both_down", "share_other"),
                        pct=("share_ideal", "share_both_up", "share_both_down", "share_other")))
            for s, r in recs]


def psr_rows(data: GeometryData) -> list[dict]:
    ps = scoped(get_table(data, "psr_nsr"), "model")
    out = []
    for r in ps.to_dict("records"):
        out.append(dict(group=show_label(r["group"], "all rollouts"), n=fmt_int(r["n"]), pos=fmt_int(r["n_positive"]),
                        neg=fmt_int(r["n_negative"]), excluded=fmt_int(r["n_excluded"]),
                        psr=na(sqrt_norm(r["sq_norm_psr"])), nsr=na(sqrt_norm(r["sq_norm_nsr"])),
                        inner=na(r["inner"]), cos=na(r["cos"]), lam=na(r["lam"]), w=na(r["w_reinforce_norm"]),
                        rlvr=na(r["rlvr_norm"])))
    return out


def diversity_rows(data: GeometryData) -> list[dict]:
    dv = get_table(data, "diversity")
    if dv is None:
        return []
    return [dict(label=show_label(r["label"]), n=fmt_int(r["n"]), skipped=fmt_int(r.get("n_skipped")),
                 g_vendi=na(r["g_vendi"]), q=na(r.get("q"))) for r in dv.to_dict("records")]


def noise_rows(data: GeometryData) -> list[dict]:
    nz = get_table(data, "noise")
    if nz is None:
        return []
    tot = nz[nz["layer"] == "total"]
    tot = pd.concat([tot[tot["label"] == ALL], tot[tot["label"] != ALL]])
    return [dict(label=show_label(r["label"]), n=fmt_int(r["n"]), trace=na(r["trace_sigma"]), g_sq=na(r["g_sq"]),
                 b=na(r["b_simple"]), ci=fmt_ci(r["b_ci_lo"], r["b_ci_hi"]), gsnr=na(r["gsnr_mean"]),
                 note="needs at least 2 units" if finite(r["n"]) and r["n"] < 2 else
                 ("‖G‖² estimate not positive: no signal detected" if finite(r["g_sq"]) and r["g_sq"] <= 0 else ""))
            for r in tot.to_dict("records")]


def score_tables(data: GeometryData) -> list[dict]:
    sc = get_table(data, "scores")
    if sc is None:
        return []
    ex = get_table(data, "examples")
    text = {}
    if ex is not None and "idx" in ex:
        text = {int(i): (p, r) for i, p, r in zip(ex["idx"], ex.get("prompt", [""] * len(ex)),
                                                  ex.get("response", [""] * len(ex)))}
    metrics = [m for m in SCORE_METRICS if m in sc and sc[m].map(finite).any()]
    out = []
    for m in metrics:
        d = sc[sc[m].map(finite)].sort_values(m, ascending=False, kind="stable")
        parts = []
        n_low = min(TOP_SCORES, max(len(d) - TOP_SCORES, 0))  # the lowest rows not already among the highest
        for which, rows in (("highest", d.head(TOP_SCORES)), ("lowest", d.tail(n_low).iloc[::-1])):
            recs = []
            for r in rows.to_dict("records"):
                p, resp = text.get(int(r["idx"]), ("", ""))
                recs.append(dict(idx=fmt_int(r["idx"]), id=r.get("id", ""), label=r.get("label", ""),
                                 term=r.get("term", ""), value=na(r[m]),
                                 others=[(k, na(r.get(k))) for k in metrics if k != m],
                                 prompt=clip_text(p), response=clip_text(resp)))
            if recs:
                parts.append({"which": which, "rows": recs})
        target = ""
        if m == "cos_target" and "target" in sc:
            t = [x for x in dict.fromkeys(sc["target"]) if x and x != "nan"]
            target = ", ".join(t)
        out.append({"metric": m, "id": f"scores-{slug(m)}", "label": SCORE_METRICS[m], "parts": parts,
                    "target": target, "others": [k for k in metrics if k != m]})
    return out


def skipped_rows(data: GeometryData) -> list[dict]:
    ex = get_table(data, "examples")
    if ex is None or "status" not in ex:
        return []
    sk = ex[ex["status"] != "ok"]
    return [dict(idx=fmt_int(r.get("idx")), id=r.get("id", ""), group=r.get("group", ""), term=r.get("term", ""),
                 label=r.get("label", ""), reason=r.get("reason", "")) for r in sk.to_dict("records")]


def _ci_level(manifest: dict) -> str:
    for k, v in flatten(manifest.get("config") or {}).items():
        if k.split(".")[-1].lower() == "ci" and finite(v):
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


def build_context(data: GeometryData) -> dict:
    """The template fields of the geometry page."""
    man = data.manifest
    model = man.get("model") or {}
    registry = FigureRegistry()
    fig = registry.add

    scatter, n_shown, n_total = entanglement_scatter(data)
    ex = get_table(data, "examples")
    counts = label_counts(data)
    status = ex["status"] if ex is not None and "status" in ex else pd.Series(dtype=str)
    n_records = int(ex["record_idx"].nunique()) if ex is not None and "record_idx" in ex else None
    has = {name: get_table(data, name) is not None for name in REQUIRED + OPTIONAL}
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


def run_findings(run_dir: Path | str) -> list[dict]:
    """The findings of the run's page from its tables."""
    return geometry_findings(load_geometry(run_dir))


def render(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) of a geometry run; returns the written path.

    The page is self-contained (plotly.js inlined once, no external URLs); sections whose optional table
    is absent (terms, entanglement, psr_nsr, scores) are left out.
    """
    data = load_geometry(run_dir)
    return render_page("geometry.html", build_context(data), out_path(run_dir, out), search=(HERE,))


# ---------------------------------------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------------------------------------


def print_summary(run_dir: Path | str, console=None) -> None:
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
    ex = get_table(data, "examples")
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

    console.print(report_path_line(run_dir))
