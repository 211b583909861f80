"""Self-contained HTML report of a saved run (reads the run directory only, never a model).

The page is a single file: plotly.js is inlined once, every figure is embedded as JSON and drawn with
``Plotly.newPlot``; there are no external URLs. All user text (prompts, responses, ids, group names, reasons,
paths) goes through jinja2 autoescaping; JSON placed inside ``<script>`` has ``<``, ``>`` and ``&`` escaped as
``\\u003c`` etc., and text handed to plotly (which renders a small HTML subset) is entity-escaped first.

The report never recomputes statistics: curves, CIs, MAD, RD and tests are read from the run's tables. It
only averages over depth for display (depth-mean of the summary curves and of each example's layer values).
"""

from __future__ import annotations

import html as _html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

__all__ = ["render_html", "load_run", "RunData", "fmt_num", "fmt_p", "skip_reason_counts"]

TEMPLATE_DIR = Path(__file__).parent / "templates"

METRIC_ORDER = ["nuclear", "sigma1_ratio", "erank", "frobenius", "spectral", "stable_rank"]
METRIC_LABELS = {
    "nuclear": "Nuclear norm ‖G‖*",
    "sigma1_ratio": "σ1 ratio (σ1 / Σσ)",
    "erank": "Effective rank",
    "frobenius": "Frobenius norm ‖G‖F",
    "spectral": "Spectral norm σ1",
    "stable_rank": "Stable rank ‖G‖F² / σ1²",
}
KIND_ORDER = [
    "q", "k", "v", "o", "gate", "up", "down",
    "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj",
    "query", "key", "value", "attn.dense", "intermediate", "output",
]
SEGMENTS = ["all", "early", "middle", "late"]
# Okabe-Ito (colour-blind safe), then tab10 for many groups.
PALETTE = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
DIST_METRICS = ("nuclear", "erank")
MAD_METRICS = ("nuclear", "sigma1_ratio", "erank")
MAX_TEXT = 200  # characters shown in the examples table before <details>
MAX_FULL_TEXT = 20_000  # full text cap inside <details>
MAX_EXAMPLE_ROWS = 2000  # ok rows beyond this are left out of the table (skipped rows are always shown)
ALPHA = 0.05
CONFIG_KEYS = (
    "loss_on", "max_length", "dtype", "reduction", "layers", "include", "exclude", "pattern", "select",
    "kinds", "metrics", "n_perm", "n_boot", "backend", "chat_template", "token_budget", "segments",
)


# ---------------------------------------------------------------------------------------------------------
# formatting helpers (shared with the terminal summary)
# ---------------------------------------------------------------------------------------------------------


def _isnan(x: Any) -> bool:
    try:
        return x is None or (isinstance(x, float) and math.isnan(x)) or bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def fmt_num(x: Any) -> str:
    """Compact number: 4 significant digits, scientific for very small/large magnitudes, '–' for NaN."""
    if _isnan(x):
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def fmt_int(x: Any) -> str:
    if _isnan(x):
        return "–"
    try:
        return str(int(x))
    except (TypeError, ValueError):
        return str(x)


def fmt_p(p: Any, n_perm: Any = None) -> str:
    """p-value: '<0.001' at the permutation resolution limit 1/(n_perm+1), else 3 significant digits."""
    if _isnan(p):
        return "–"
    p = float(p)
    if not _isnan(n_perm):
        try:
            n = int(n_perm)
        except (TypeError, ValueError):
            n = 0
        if n > 0:
            lim = 1.0 / (n + 1)
            if p <= lim * (1 + 1e-9):
                return f"<{lim:.2g}"
    if p >= 1e-3:
        return f"{p:.3g}"
    return f"{p:.1e}"


def _short_reason(reason: str) -> str:
    """Group skip reasons for counting: drop a trailing parenthesised detail (token counts etc.)."""
    r = re.sub(r"\s*\([^()]*\)\s*$", "", str(reason).strip())
    return r or "unspecified"


def skip_reason_counts(examples: pd.DataFrame | None) -> list[tuple[str, int]]:
    if examples is None or "status" not in examples:
        return []
    sk = examples[examples["status"].astype(str) != "ok"]
    if sk.empty:
        return []
    reasons = sk["reason"].fillna("").astype(str) if "reason" in sk else pd.Series([""] * len(sk))
    counts = reasons.map(_short_reason).value_counts()
    return [(str(k), int(v)) for k, v in counts.items()]


def _ptext(s: Any) -> str:
    """Text for plotly (which renders a small HTML subset in labels): entity-escape it."""
    return _html.escape(str(s), quote=False)


def _script_json(obj: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>', '&' or JS line separators survive literally."""
    from plotly.io.json import to_json_plotly

    s = to_json_plotly(obj, engine="json")
    return (
        s.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "x"


def _order(values: Iterable[str], preferred: list[str]) -> list[str]:
    vals = list(dict.fromkeys(str(v) for v in values))
    first = [v for v in preferred if v in vals]
    return first + [v for v in vals if v not in preferred]


def _hex_rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    r, g, b = int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    return f"rgba({r},{g},{b},{alpha})"


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    run_dir: Path
    manifest: dict
    examples: pd.DataFrame | None
    summary: pd.DataFrame | None
    mad: pd.DataFrame | None
    rd: pd.DataFrame | None
    tests: pd.DataFrame | None
    depth_means: pd.DataFrame | None  # idx, group, kind, metric, value (per-example depth mean)
    notes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    @property
    def colors(self) -> dict[str, str]:
        return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(self.groups)}


def _read_table(path: Path, notes: list[str], label: str, why_missing: str = "") -> pd.DataFrame | None:
    if not path.exists():
        notes.append(f"{label} not found ({path.name}){': ' + why_missing if why_missing else ''}.")
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # a corrupt table must not prevent the rest of the report
        notes.append(f"{label} could not be read ({path.name}): {type(e).__name__}: {e}")
        return None
    return df


def _str_cols(df: pd.DataFrame | None, cols: Iterable[str]) -> pd.DataFrame | None:
    if df is None:
        return None
    df = df.copy()
    for c in cols:
        if c in df:
            df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    return df


def _depth_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows used for a depth average: blocks >= 0, except kinds that only exist outside the blocks."""
    in_blocks = df["block"] >= 0
    kinds_in_blocks = set(df.loc[in_blocks, "kind"])
    return df[in_blocks | ~df["kind"].isin(kinds_in_blocks)]


def load_run(run_dir: Path | str, depth_metrics: Iterable[str] | None = DIST_METRICS) -> RunData:
    """Read every table of a run directory (missing optional tables become notes, not errors)."""
    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{run_dir} is not a gradsight run directory (no manifest.json)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    notes: list[str] = []

    examples = None
    if (run_dir / "examples.parquet").exists():
        examples = _read_table(run_dir / "examples.parquet", notes, "Examples table")
    elif (run_dir / "examples").is_dir() and any((run_dir / "examples").glob("*.parquet")):
        try:
            examples = pd.read_parquet(run_dir / "examples")
            notes.append("examples.parquet not merged yet; read the per-rank shards in examples/.")
        except Exception as e:
            notes.append(f"Examples shards could not be read: {type(e).__name__}: {e}")
    else:
        notes.append("Examples table not found (examples.parquet).")
    examples = _str_cols(examples, ["id", "group", "source", "status", "reason", "prompt", "response"])
    if examples is not None and "idx" in examples:
        examples = examples.sort_values("idx", kind="stable").reset_index(drop=True)

    summary = _str_cols(_read_table(run_dir / "summary.parquet", notes, "Summary table (group curves)"),
                        ["group", "kind", "metric"])
    mad = _str_cols(_read_table(run_dir / "mad.parquet", notes, "MAD table"), ["group", "kind", "metric", "segment"])

    groups_seen: list[str] = []
    if examples is not None and "group" in examples:
        groups_seen += list(examples["group"])
    for df in (summary, mad):
        if df is not None and "group" in df:
            groups_seen += list(df["group"])
    groups = list(dict.fromkeys(groups_seen))
    single = len(groups) < 2
    why = "only one group, so there is nothing to compare" if single else ""
    rd = _str_cols(_read_table(run_dir / "rd.parquet", notes, "Relative-difference table", why),
                   ["reference", "group", "kind", "metric", "top_blocks"])
    tests = _str_cols(_read_table(run_dir / "tests.parquet", notes, "Tests table", why),
                      ["group_a", "group_b", "kind", "metric", "test", "note"])
    if tests is not None:
        if "block" not in tests:
            tests["block"] = -1
        for c in ("q_value", "n_dropped", "n_perm", "n_a", "n_b", "statistic", "p_value"):
            if c not in tests:
                tests[c] = float("nan")
        if "note" not in tests:
            tests["note"] = ""

    depth_means = None
    metrics_wanted = list(depth_metrics or [])
    ls_dir = run_dir / "layer_stats"
    if metrics_wanted:
        if ls_dir.is_dir() and any(ls_dir.glob("*.parquet")):
            try:
                cols = ["idx", "group", "kind", "block", "metric", "value"]
                try:
                    ls = pd.read_parquet(ls_dir, columns=cols, filters=[("metric", "in", metrics_wanted)])
                except Exception:  # e.g. shards whose schemas differ slightly: read them one by one
                    shards = sorted(f for f in ls_dir.glob("*.parquet") if not f.name.startswith((".", "_")))
                    ls = pd.concat([pd.read_parquet(f, columns=cols) for f in shards], ignore_index=True)
                    ls = ls[ls["metric"].astype(str).isin(metrics_wanted)]
                ls = _str_cols(ls, ["group", "kind", "metric"])
                if not ls.empty:
                    depth_means = (
                        _depth_rows(ls)
                        .groupby(["idx", "group", "kind", "metric"], sort=False)["value"]
                        .mean()
                        .reset_index()
                    )
            except Exception as e:
                notes.append(f"Per-example layer stats could not be read: {type(e).__name__}: {e}")
        else:
            notes.append("Per-example layer stats (layer_stats/) not found: no distribution plots.")

    kinds_seen: list[str] = []
    metrics_seen: list[str] = []
    for df in (summary, mad, depth_means):
        if df is not None and "kind" in df:
            kinds_seen += list(df["kind"])
            metrics_seen += list(df["metric"])
    return RunData(
        run_dir=run_dir,
        manifest=manifest,
        examples=examples,
        summary=summary,
        mad=mad,
        rd=rd,
        tests=tests,
        depth_means=depth_means,
        notes=notes,
        groups=groups,
        kinds=_order(kinds_seen, KIND_ORDER),
        metrics=_order(metrics_seen, METRIC_ORDER),
    )


# ---------------------------------------------------------------------------------------------------------
# numbers for the header and the findings
# ---------------------------------------------------------------------------------------------------------


def group_counts(data: RunData) -> list[dict]:
    ex = data.examples
    rows = []
    for g in data.groups:
        if ex is None or "group" not in ex:
            rows.append(dict(group=g, records=0, ok=0, skipped=0, n_target=float("nan"), n_tokens=float("nan"),
                             loss=float("nan")))
            continue
        d = ex[ex["group"] == g]
        ok = d[d["status"] == "ok"] if "status" in d else d
        rows.append(
            dict(
                group=g,
                records=len(d),
                ok=len(ok),
                skipped=len(d) - len(ok),
                n_target=float(ok["n_target"].mean()) if "n_target" in ok and len(ok) else float("nan"),
                n_tokens=float(ok["n_tokens"].mean()) if "n_tokens" in ok and len(ok) else float("nan"),
                loss=float(ok["loss"].mean()) if "loss" in ok and len(ok) else float("nan"),
            )
        )
    return rows


def depth_mean_table(data: RunData) -> pd.DataFrame | None:
    """Depth-mean of the summary curves: index (group, kind, metric) -> value."""
    s = data.summary
    if s is None or s.empty or not {"group", "kind", "metric", "block", "mean"} <= set(s.columns):
        return None
    return _depth_rows(s).groupby(["group", "kind", "metric"])["mean"].mean()


def mad_value(data: RunData, group: str, kind: str, metric: str, segment: str = "all",
              column: str = "value") -> float:
    m = data.mad
    if m is None or m.empty or column not in m.columns:
        return float("nan")
    r = m[(m["group"] == group) & (m["kind"] == kind) & (m["metric"] == metric) & (m["segment"] == segment)]
    return float(r[column].iloc[0]) if len(r) else float("nan")


def whole_depth_tests(data: RunData) -> pd.DataFrame | None:
    t = data.tests
    if t is None or t.empty:
        return None
    w = t[(t["test"] != "layer_mean_diff") & (t["block"].fillna(-1) < 0)]
    if "segment" in w:  # only whole-depth MAD tests, if the table ever splits them by segment
        w = w[w["segment"].isna() | (w["segment"].astype(str).isin(["all", "", "nan"]))]
    return w


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _cfg_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "(none)"
    if v is None:
        return "(default)"
    return str(v)


def key_config(manifest: dict) -> list[tuple[str, str]]:
    flat = _flatten(manifest.get("config") or {})
    rows = []
    for k, v in flat.items():
        last = k.split(".")[-1].lower()
        if any(key in last for key in CONFIG_KEYS):
            rows.append((k, _cfg_value(v)))
    return rows


def loss_reduction(manifest: dict) -> str:
    for k, v in _flatten(manifest.get("config") or {}).items():
        if k.split(".")[-1].lower() == "reduction" and isinstance(v, str):
            return v.lower()
    return "mean"


def _sig(p: float, q: float | None = None) -> bool:
    x = q if q is not None and not _isnan(q) else p
    return not _isnan(x) and float(x) < ALPHA


def p_phrase(p: Any, n_perm: Any = None, name: str = "p") -> str:
    s = fmt_p(p, n_perm)
    return f"{name} {s[0]} {s[1:]}" if s.startswith("<") else f"{name} = {s}"


def _sig_phrase(recs: list[dict]) -> str:
    """'p < 0.001 (significant at 0.05)' for one pair; for several pairs, which are and which are not."""

    def pair(r: dict) -> str:
        return f"{r['group_a']} vs {r['group_b']}"

    untested = [r for r in recs if _isnan(r.get("p_value"))]
    recs = [r for r in recs if not _isnan(r.get("p_value"))]
    parts = []
    if len(recs) == 1:
        r = recs[0]
        s = "significant" if _sig(r.get("p_value")) else "not significant"
        parts.append(f"{pair(r)}: {p_phrase(r.get('p_value'), r.get('n_perm'))} ({s} at {ALPHA})")
    elif recs:
        sig = [r for r in recs if _sig(r.get("p_value"))]
        non = [r for r in recs if not _sig(r.get("p_value"))]
        if not sig:
            parts.append(f"not significant at {ALPHA} for any pair")
        else:
            parts.append(f"significant at {ALPHA} for {len(sig)} of {len(recs)} pairs")
            if non:
                parts.append("not for " + ", ".join(
                    f"{pair(r)} ({p_phrase(r.get('p_value'), r.get('n_perm'))})" for r in non))
    for r in untested:
        note = str(r.get("note") or "").strip()
        parts.append(f"{pair(r)} not tested" + (f" ({note})" if note and note != "nan" else ""))
    return "; ".join(parts)


def findings(data: RunData) -> list[dict]:
    """Short sentences generated from the tables. Each item: {"title": str, "lines": [str, ...]}."""
    out: list[dict] = []
    dm = depth_mean_table(data)
    groups = data.groups
    wt = whole_depth_tests(data)
    counts = group_counts(data)

    def tests_for(kind: str, metric: str, test: str) -> list[dict]:
        if wt is None:
            return []
        r = wt[(wt["kind"] == kind) & (wt["metric"] == metric) & (wt["test"] == test)]
        return r.to_dict("records")

    # --- headline over kinds -------------------------------------------------------------------------------
    if dm is not None and "nuclear" in data.metrics and len(groups) >= 2:
        largest: dict[str, int] = {}
        flattest_not: dict[str, int] = {}
        n_k = 0
        for kind in data.kinds:
            vals = {g: dm.get((g, kind, "nuclear"), float("nan")) for g in groups}
            vals = {g: v for g, v in vals.items() if not _isnan(v)}
            if len(vals) < 2:
                continue
            n_k += 1
            gmax = max(vals, key=vals.get)
            largest[gmax] = largest.get(gmax, 0) + 1
            mads = {g: mad_value(data, g, kind, "nuclear") for g in vals}
            mads = {g: v for g, v in mads.items() if not _isnan(v)}
            if mads:
                gm = max(mads, key=mads.get)
                flattest_not[gm] = flattest_not.get(gm, 0) + 1
        if n_k:
            lines = []
            g1 = max(largest, key=largest.get)
            lines.append(f"{g1} has the largest depth-mean nuclear norm in {largest[g1]} of {n_k} layer kinds.")
            if flattest_not:
                g2 = max(flattest_not, key=flattest_not.get)
                lines.append(
                    f"{g2} has the least flat nuclear-norm curve (largest MAD over the whole depth) in "
                    f"{flattest_not[g2]} of {n_k} layer kinds."
                )
            out.append({"title": "Overview", "lines": lines})

    # --- response length caveat ----------------------------------------------------------------------------
    lens = [(c["group"], c["n_target"]) for c in counts if not _isnan(c["n_target"])]
    if lens:
        txt = ", ".join(f"{g} {v:.1f}" for g, v in lens)
        lines = [f"Mean response length (supervised target tokens, ok examples): {txt}."]
        red = loss_reduction(data.manifest)
        if len(lens) >= 2:
            glong = max(lens, key=lambda t: t[1])
            gshort = min(lens, key=lambda t: t[1])
            ratio = glong[1] / gshort[1] if gshort[1] > 0 else float("inf")
        else:
            glong = gshort = lens[0]
            ratio = 1.0
        if red == "sum":
            lines.append(
                "The loss is summed over response tokens (reduction=sum), so gradient norms grow with response "
                "length; longer responses are expected to give larger norms for that reason alone."
            )
        else:
            lines.append(
                "The loss is the token-mean over response tokens, so at equal per-token difficulty the gradient "
                "shrinks as the response gets longer: a group with longer responses is expected to have smaller "
                "norms for that reason alone."
            )
        if len(lens) >= 2 and ratio >= 1.5:
            lines.append(
                f"Here {glong[0]} responses are {ratio:.1f}× longer than {gshort[0]}: compare at matched lengths "
                "or with a summed loss (reduction \"sum\") before attributing norm differences to the answer style."
            )
        if "erank" in data.metrics:
            lines.append(
                "Effective rank and σ1 ratio are bounded by the token count (rank(G) ≤ T): longer sequences can "
                "have a higher effective rank for purely structural reasons."
            )
        out.append({"title": "Response length", "lines": lines})

    # --- per kind, nuclear norm ----------------------------------------------------------------------------
    if dm is not None and "nuclear" in data.metrics:
        for kind in data.kinds:
            vals = [(g, dm.get((g, kind, "nuclear"), float("nan"))) for g in groups]
            vals = [(g, v) for g, v in vals if not _isnan(v)]
            if not vals:
                continue
            lines = []
            vals.sort(key=lambda t: -t[1])
            g0, v0 = vals[0]
            if len(vals) == 1:
                lines.append(f"Depth-mean nuclear norm of {g0}: {fmt_num(v0)}.")
            elif len(vals) == 2:
                g1, v1 = vals[1]
                fac = f"{v0 / v1:.2f}×" if v1 > 0 else "∞×"
                lines.append(
                    f"{g0} has the larger depth-mean nuclear norm: {fmt_num(v0)} vs {fmt_num(v1)} for {g1} ({fac})."
                )
            else:
                rest = ", ".join(
                    f"{g} {fmt_num(v)} ({v0 / v:.2f}× smaller)" if v > 0 else f"{g} {fmt_num(v)}"
                    for g, v in vals[1:]
                )
                lines.append(f"{g0} has the largest depth-mean nuclear norm ({fmt_num(v0)}); then {rest}.")
            mads = [(g, mad_value(data, g, kind, "nuclear")) for g in groups]
            mads = [(g, v) for g, v in mads if not _isnan(v)]
            txt = ""
            if mads:
                txt = "MAD over the whole depth: " + ", ".join(f"{g} {fmt_num(v)}" for g, v in mads) + "."
            rels = [(g, mad_value(data, g, kind, "nuclear", column="rel_value")) for g in groups]
            rels = [(g, v) for g, v in rels if not _isnan(v)]
            if rels:
                txt += (" Scale-free flatness MAD/mean (level removed): "
                        + ", ".join(f"{g} {fmt_num(v)}" for g, v in rels) + ".")
            sig_txt = []
            for test, label in (("mad_diff", "MAD difference"), ("rel_mad_diff", "MAD/mean difference"),
                                ("mean_diff", "mean difference")):
                recs = tests_for(kind, "nuclear", test)
                if recs:
                    sig_txt.append(f"{label} {_sig_phrase(recs)}")
            if sig_txt:
                joined = "; ".join(sig_txt)
                txt += (" " if txt else "") + joined[0].upper() + joined[1:] + "."
            if txt:
                lines.append(txt)
            out.append({"title": f"Nuclear norm, {kind}", "lines": lines})

    # --- sigma1 ratio / erank, averaged over kinds ---------------------------------------------------------
    if dm is not None:
        for metric in ("sigma1_ratio", "erank"):
            if metric not in data.metrics:
                continue
            vals = []
            for g in groups:
                v = [dm.get((g, k, metric), float("nan")) for k in data.kinds]
                v = [x for x in v if not _isnan(x)]
                if v:
                    vals.append((g, sum(v) / len(v)))
            if vals:
                txt = ", ".join(f"{g} {fmt_num(v)}" for g, v in vals)
                out.append(
                    {
                        "title": METRIC_LABELS.get(metric, metric),
                        "lines": [f"Depth-mean averaged over layer kinds: {txt}."],
                    }
                )
    if len(data.kinds) > 1:
        out.append(
            {
                "title": "Reading across kinds",
                "lines": [
                    "Compare groups within a layer kind, not kinds with each other: matrices of different shapes "
                    "(e.g. K/V under grouped-query attention, MLP vs attention) are not on the same scale."
                ],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# figures (plain plotly JSON dicts; no graph_objects validation, which is slow and not needed here)
# ---------------------------------------------------------------------------------------------------------


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


class _Subplots:
    """A rows x cols grid of cartesian subplots laid out in paper coordinates, filled row by row."""

    def __init__(self, titles: list[str], max_cols: int = 4, hspace: float | None = None, vpad: float = 0.0):
        self.n = max(1, len(titles))
        self.rows, self.cols = _grid(self.n, max_cols)
        hs = hspace if hspace is not None else (0.05 if self.cols > 2 else 0.08)
        vs = (0.12 if self.rows > 1 else 0.0) + vpad
        w = (1 - hs * (self.cols - 1)) / self.cols
        h = (1 - vs * (self.rows - 1)) / self.rows
        self.layout: dict[str, Any] = {"annotations": []}
        for i, title in enumerate(titles):
            r, c = divmod(i, self.cols)
            x0 = c * (w + hs)
            y1 = 1 - r * (h + vs)
            k = "" if i == 0 else str(i + 1)
            self.layout[f"xaxis{k}"] = {"domain": [round(x0, 4), round(x0 + w, 4)], "anchor": f"y{k}"}
            self.layout[f"yaxis{k}"] = {"domain": [round(y1 - h, 4), round(y1, 4)], "anchor": f"x{k}"}
            self.layout["annotations"].append(
                {"text": title, "x": round(x0 + w / 2, 4), "y": round(y1, 4), "xref": "paper", "yref": "paper",
                 "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 13}}
            )

    def refs(self, i: int) -> dict[str, str]:
        k = "" if i == 0 else str(i + 1)
        return {"xaxis": f"x{k}", "yaxis": f"y{k}"}

    def axes(self, which: str) -> list[dict]:
        return [v for key, v in self.layout.items() if key.startswith(which)]

    def bottom_x(self) -> list[dict]:
        """x axes of the lowest subplot in each column."""
        out = []
        for c in range(self.cols):
            last = max(i for i in range(self.n) if i % self.cols == c)
            out.append(self.layout["xaxis" + ("" if last == 0 else str(last + 1))])
        return out


def _figure(traces: list[dict], sp: _Subplots, height: int, **layout: Any) -> dict:
    lay = dict(sp.layout)
    lay.update(
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1, "yanchor": "top", "yref": "container"},
        hovermode="closest",
        font={"size": 12},
    )
    lay.update(layout)
    return {"data": traces, "layout": lay}


def _floats(values: Iterable[Any], digits: int = 6) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(float(f"{f:.{digits}g}") if math.isfinite(f) else None)
    return out


def _metric_rows(df: pd.DataFrame | None, data: RunData, metric: str) -> tuple[pd.DataFrame, list[str]] | None:
    """Rows of one metric and the run's kinds present in them (None when there is nothing to plot)."""
    if df is None or df.empty:
        return None
    rows = df[df["metric"] == metric]
    kinds = [k for k in data.kinds if k in set(rows["kind"])]
    return (rows, kinds) if kinds else None


def curves_figure(data: RunData, metric: str) -> dict | None:
    got = _metric_rows(data.summary, data, metric)
    if got is None:
        return None
    sm, kinds = got
    sp = _Subplots([_ptext(k) for k in kinds])
    colors = data.colors
    traces: list[dict] = []
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        ref = sp.refs(i)
        dk = _depth_rows(sm[sm["kind"] == kind])
        for g in data.groups:
            d = dk[dk["group"] == g].sort_values("block")
            if d.empty:
                continue
            col = colors[g]
            x = [int(b) for b in d["block"]]
            if {"ci_lo", "ci_hi"} <= set(d.columns):
                band = d.dropna(subset=["ci_lo", "ci_hi"])
                if len(band):
                    bx = [int(b) for b in band["block"]]
                    traces.append(
                        dict(ref, type="scatter", mode="lines", x=bx + bx[::-1],
                             y=_floats(band["ci_hi"]) + _floats(band["ci_lo"])[::-1],
                             fill="toself", fillcolor=_hex_rgba(col, 0.18), line={"width": 0},
                             hoverinfo="skip", showlegend=False, legendgroup=_ptext(g), name=_ptext(g))
                    )
            n = d["n"] if "n" in d else [None] * len(d)
            lo = d["ci_lo"] if "ci_lo" in d else [None] * len(d)
            hi = d["ci_hi"] if "ci_hi" in d else [None] * len(d)
            traces.append(
                dict(
                    ref,
                    type="scatter",
                    mode="lines+markers",
                    x=x,
                    y=_floats(d["mean"]),
                    marker={"size": 4, "color": col},
                    line={"width": 2, "color": col},
                    name=_ptext(g),
                    legendgroup=_ptext(g),
                    showlegend=g not in shown,
                    customdata=[[fmt_int(a), fmt_num(b), fmt_num(c)] for a, b, c in zip(n, lo, hi)],
                    hovertemplate=(
                        "%{fullData.name}<br>" + _ptext(kind) + ", block %{x}<br>mean %{y:.4g}"
                        "<br>CI [%{customdata[1]}, %{customdata[2]}]<br>n %{customdata[0]}<extra></extra>"
                    ),
                )
            )
            shown.add(g)
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d", zeroline=False)
    for ax in sp.axes("yaxis"):
        ax.update(zeroline=False, exponentformat="power")
    for ax in sp.bottom_x():
        ax["title"] = {"text": "block"}
    return _figure(traces, sp, 260 * sp.rows + 110)


def distribution_figure(data: RunData, metric: str) -> dict | None:
    got = _metric_rows(data.depth_means, data, metric)
    if got is None:
        return None
    d_m, kinds = got
    ids: dict[int, str] = {}
    if data.examples is not None and {"idx", "id"} <= set(data.examples.columns):
        ids = dict(zip(data.examples["idx"].astype(int), data.examples["id"]))
    sp = _Subplots([_ptext(k) for k in kinds])
    colors = data.colors
    traces: list[dict] = []
    shown: set[str] = set()
    for i, kind in enumerate(kinds):
        ref = sp.refs(i)
        dk = d_m[d_m["kind"] == kind]
        for g in data.groups:
            d = dk[dk["group"] == g]
            if d.empty:
                continue
            traces.append(
                dict(
                    ref,
                    type="box",
                    y=_floats(d["value"], 5),
                    name=_ptext(g),
                    legendgroup=_ptext(g),
                    showlegend=g not in shown,
                    marker={"color": colors[g], "size": 3},
                    line={"color": colors[g]},
                    boxpoints="all",
                    jitter=0.4,
                    pointpos=0,
                    boxmean=True,
                    text=[_ptext(ids.get(int(ix), ix)) for ix in d["idx"]],
                    hovertemplate="%{fullData.name}<br>id %{text}<br>%{y:.4g}<extra></extra>",
                )
            )
            shown.add(g)
    for ax in sp.axes("xaxis"):
        ax["showticklabels"] = False
    for ax in sp.axes("yaxis"):
        ax["exponentformat"] = "power"
    return _figure(traces, sp, 260 * sp.rows + 90)


def heatmap_figure(data: RunData, metric: str) -> dict | None:
    t = data.tests
    if t is None or t.empty:
        return None
    lt = t[(t["test"] == "layer_mean_diff") & (t["metric"] == metric) & (t["block"] >= 0)]
    if lt.empty:
        return None
    use_q = bool(lt["q_value"].notna().any())
    pcol = "q_value" if use_q else "p_value"
    pairs = list(dict.fromkeys(zip(lt["group_a"], lt["group_b"])))
    kinds = _order(lt["kind"], data.kinds)
    blocks = sorted(int(b) for b in set(lt["block"]))
    sp = _Subplots([_ptext(f"{a} vs {b}") for a, b in pairs], max_cols=2, hspace=0.08)
    traces: list[dict] = []
    zmax = 1.0
    for i, (a, b) in enumerate(pairs):
        d = lt[(lt["group_a"] == a) & (lt["group_b"] == b)]
        lookup = {(str(k), int(bl)): (q, st) for k, bl, q, st in zip(d["kind"], d["block"], d[pcol], d["statistic"])}
        z, text, custom = [], [], []
        for k in kinds:
            zr, tr, cr = [], [], []
            for bl in blocks:
                q, stat = lookup.get((k, bl), (float("nan"), float("nan")))
                if _isnan(q):
                    zr.append(None)
                    tr.append("")
                    cr.append(["–", "–"])
                    continue
                qf = max(float(q), 1e-300)
                sign = -1.0 if (not _isnan(stat) and float(stat) < 0) else 1.0
                v = sign * -math.log10(qf)
                zmax = max(zmax, abs(v))
                zr.append(round(v, 3))
                tr.append("*" if qf < ALPHA else "")
                cr.append([fmt_p(q), fmt_num(stat)])
            z.append(zr)
            text.append(tr)
            custom.append(cr)
        traces.append(
            dict(
                sp.refs(i),
                type="heatmap",
                z=z,
                x=blocks,
                y=[_ptext(k) for k in kinds],
                text=text,
                texttemplate="%{text}",
                customdata=custom,
                coloraxis="coloraxis",
                xgap=1,
                ygap=1,
                hovertemplate=(
                    "kind %{y}, block %{x}<br>" + ("q" if use_q else "p") + " = %{customdata[0]}"
                    "<br>statistic = %{customdata[1]}<extra></extra>"
                ),
            )
        )
    for ax in sp.axes("xaxis"):
        ax.update(tickformat="d")
    for ax in sp.axes("yaxis"):
        ax.update(autorange="reversed", type="category")
    for ax in sp.bottom_x():
        ax["title"] = {"text": "block"}
    per_row = max(160, 22 * len(kinds) + 90)
    label = "−log10 q" if use_q else "−log10 p"
    return _figure(
        traces,
        sp,
        per_row * sp.rows + 60,
        coloraxis={
            "colorscale": "RdBu",  # plotly's RdBu runs blue (low) -> red (high)
            "cmin": -zmax,
            "cmax": zmax,
            "colorbar": {"title": {"text": label + "<br>× sign", "side": "right"}, "thickness": 14},
        },
        margin={"l": 70, "r": 20, "t": 40, "b": 50},
    )


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------


def mad_tables(data: RunData) -> list[dict]:
    m = data.mad
    if m is None or m.empty:
        return []
    out = []
    present = set(m["metric"])
    metrics = [x for x in MAD_METRICS if x in present] or [x for x in data.metrics if x in present][:3]
    for metric in metrics:
        mm = m[m["metric"] == metric]
        segs = [s for s in SEGMENTS if s in set(mm["segment"])] + sorted(set(mm["segment"]) - set(SEGMENTS))
        headers = []
        for s in segs:
            r = mm[mm["segment"] == s]
            rng = ""
            if len(r) and {"start", "stop"} <= set(r.columns):
                starts, stops = set(r["start"].dropna().astype(int)), set(r["stop"].dropna().astype(int))
                if len(starts) == 1 and len(stops) == 1:
                    rng = f"blocks [{next(iter(starts))}, {next(iter(stops))})"
                else:
                    rng = "blocks vary by kind"
            headers.append({"name": s, "range": rng})
        has_rel = "rel_value" in mm.columns
        if has_rel:
            headers.append({"name": "all: MAD/mean", "range": "scale-free"})
        rows = []
        for kind in data.kinds:
            for g in data.groups:
                d = mm[(mm["kind"] == kind) & (mm["group"] == g)]
                if d.empty:
                    continue
                vals = {str(s): v for s, v in zip(d["segment"], d["value"])}
                values = [fmt_num(vals.get(s)) for s in segs]
                if has_rel:
                    rel = d.loc[d["segment"] == "all", "rel_value"]
                    values.append(fmt_num(float(rel.iloc[0])) if len(rel) else "")
                rows.append({"kind": kind, "group": g, "color": data.colors[g], "values": values})
        out.append({"metric": metric, "label": METRIC_LABELS.get(metric, metric), "headers": headers, "rows": rows})
    return out


def rd_rows(data: RunData) -> list[dict]:
    r = data.rd
    if r is None or r.empty:
        return []
    morder = {m: i for i, m in enumerate(data.metrics)}
    korder = {k: i for i, k in enumerate(data.kinds)}
    recs = r.to_dict("records")
    recs.sort(key=lambda x: (morder.get(x["metric"], 99), str(x["reference"]), str(x["group"]),
                             korder.get(x["kind"], 99)))
    return [
        {
            "reference": x["reference"],
            "group": x["group"],
            "kind": x["kind"],
            "metric": x["metric"],
            "rd": fmt_num(x.get("rd")),
            "top_blocks": str(x.get("top_blocks", "")).replace(",", ", "),
        }
        for x in recs
    ]


def _test_row(x: dict) -> dict:
    p, q = x.get("p_value"), x.get("q_value")
    return {
        "group_a": x["group_a"],
        "group_b": x["group_b"],
        "kind": x["kind"],
        "metric": x["metric"],
        "test": x["test"],
        "block": fmt_int(x.get("block")) if not _isnan(x.get("block")) and int(x.get("block")) >= 0 else "all",
        "statistic": fmt_num(x.get("statistic")),
        "p": fmt_p(p, x.get("n_perm")),
        "q": fmt_p(q),
        "n_perm": fmt_int(x.get("n_perm")),
        "n_a": fmt_int(x.get("n_a")),
        "n_b": fmt_int(x.get("n_b")),
        "n_dropped": fmt_int(x.get("n_dropped")),
        "note": "" if _isnan(x.get("note")) else str(x.get("note")),
        "sig": _sig(p, q if x["test"] == "layer_mean_diff" else None),
    }


def test_rows(data: RunData) -> list[dict]:
    w = whole_depth_tests(data)
    if w is None or w.empty:
        return []
    morder = {m: i for i, m in enumerate(data.metrics)}
    korder = {k: i for i, k in enumerate(data.kinds)}
    torder = {"mad_diff": 0, "rel_mad_diff": 1, "mean_diff": 2}
    recs = w.to_dict("records")
    recs.sort(key=lambda x: (morder.get(x["metric"], 99), torder.get(x["test"], 9), str(x["group_a"]),
                             str(x["group_b"]), korder.get(x["kind"], 99)))
    return [_test_row(x) for x in recs]


def layer_test_summary(data: RunData) -> tuple[list[dict], list[dict]]:
    t = data.tests
    if t is None or t.empty:
        return [], []
    lt = t[(t["test"] == "layer_mean_diff") & (t["block"] >= 0)]
    if lt.empty:
        return [], []
    col = "q_value" if lt["q_value"].notna().any() else "p_value"
    summ = []
    for (a, b, m), d in lt.groupby(["group_a", "group_b", "metric"], sort=False):
        n_sig = int((d[col] < ALPHA).sum())
        summ.append({"group_a": a, "group_b": b, "metric": m, "n_sig": n_sig, "n": len(d),
                     "by": "q" if col == "q_value" else "p"})
    morder = {m: i for i, m in enumerate(data.metrics)}
    summ.sort(key=lambda x: (morder.get(x["metric"], 99), x["group_a"], x["group_b"]))
    top = lt.sort_values([col, "p_value"]).head(30)
    return summ, [_test_row(x) for x in top.to_dict("records")]


def _clip_text(s: str) -> dict:
    s = "" if s is None else str(s)
    full = s if len(s) <= MAX_FULL_TEXT else s[:MAX_FULL_TEXT] + f" … [{len(s) - MAX_FULL_TEXT} more characters]"
    short = s if len(s) <= MAX_TEXT else s[:MAX_TEXT].rstrip() + " …"
    return {"short": short, "full": full, "long": len(s) > MAX_TEXT, "n": len(s)}


def example_rows(data: RunData) -> tuple[list[dict], int]:
    ex = data.examples
    if ex is None or ex.empty:
        return [], 0
    status = ex["status"] if "status" in ex else pd.Series(["ok"] * len(ex), index=ex.index)
    ok_idx = ex.index[status == "ok"]
    keep = ex.index
    omitted = 0
    if len(ok_idx) > MAX_EXAMPLE_ROWS:
        drop = ok_idx[MAX_EXAMPLE_ROWS:]
        omitted = len(drop)
        keep = ex.index.difference(drop)
    rows = []
    for x in ex.loc[keep].to_dict("records"):
        rows.append(
            {
                "idx": fmt_int(x.get("idx")),
                "id": x.get("id", ""),
                "group": x.get("group", ""),
                "source": x.get("source", ""),
                "status": x.get("status", "ok"),
                "reason": x.get("reason", ""),
                "n_tokens": fmt_int(x.get("n_tokens")),
                "n_target": fmt_int(x.get("n_target")),
                "loss": fmt_num(x.get("loss")),
                "prompt": _clip_text(x.get("prompt", "")),
                "response": _clip_text(x.get("response", "")),
            }
        )
    return rows, omitted


# ---------------------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------------------


def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    # defensive: a literal "</script" would end the inline script early
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def _plotly_js_version() -> str:
    from plotly.offline import get_plotlyjs

    m = re.search(r"plotly\.js v([0-9][0-9A-Za-z.\-]*)", get_plotlyjs()[:300])
    return m.group(1) if m else "?"


class FigureRegistry:
    """Figures of one page: `add(fid, figure)` embeds it (script-safe JSON) under the element id "fig-{fid}"
    and returns that id, or None for a missing figure; `items` goes to the template's figure loop."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, fid: str, fig: dict | None) -> str | None:
        from markupsafe import Markup

        if fig is None:
            return None
        self.items.append({"id": f"fig-{fid}", "json": Markup(_script_json(fig))})
        return f"fig-{fid}"


def run_context(man: dict, run_dir: Path) -> dict:
    """The template fields every report shares: run, model and data identity, versions, configuration, and
    the inlined plotly.js with its page-wide template and config."""
    import plotly
    import plotly.io as pio
    from markupsafe import Markup

    model = man.get("model") or {}
    dsrc = man.get("data") or {}
    layers = model.get("layers") or []
    layer_names = [x if isinstance(x, str) else str(x.get("name", x)) if isinstance(x, dict) else str(x)
                   for x in layers]
    versions = man.get("versions") or {}
    if "plotly" not in versions:
        versions = dict(versions, **{"plotly (report)": plotly.__version__})
    return {
        "run_dir": str(run_dir),
        "model_id": model.get("id") or "(unknown)",
        "fingerprint": model.get("fingerprint") or "",
        "n_blocks": model.get("n_blocks"),
        "n_layers": len(layer_names),
        "layer_names": layer_names,
        "data_path": dsrc.get("path") or "(unknown)",
        "data_sha": dsrc.get("sha256") or "",
        "n_records": dsrc.get("n_records"),
        "schema_version": man.get("schema_version"),
        "config_hash": man.get("config_hash") or "",
        "created": man.get("created") or "",
        "seed": man.get("seed"),
        "world_size": man.get("world_size"),
        "versions": [(str(k), str(v)) for k, v in versions.items()],
        "key_config": key_config(man),
        "config_json": json.dumps(man.get("config") or {}, indent=2, default=str, ensure_ascii=False),
        "template_json": Markup(_script_json(pio.templates["plotly_white"].to_plotly_json())),
        "plotly_config_json": Markup(_script_json({"displaylogo": False, "responsive": True})),
        "plotly_js": Markup(_plotly_js()),
        "plotly_version": _plotly_js_version(),
    }


def build_context(data: RunData) -> dict:
    from markupsafe import Markup

    man = data.manifest
    model = man.get("model") or {}
    counts = group_counts(data)
    tot = {
        "records": sum(c["records"] for c in counts),
        "ok": sum(c["ok"] for c in counts),
        "skipped": sum(c["skipped"] for c in counts),
    }

    figures: list[dict] = []
    used_ids: set[str] = set()

    def add_fig(kind: str, metric: str, fig: dict | None) -> dict | None:
        if fig is None:
            return None
        base = f"fig-{kind}-{_slug(metric)}"
        fid, n = base, 1
        while fid in used_ids:
            n += 1
            fid = f"{base}-{n}"
        used_ids.add(fid)
        item = {"id": fid, "metric": metric, "label": METRIC_LABELS.get(metric, metric),
                "json": Markup(_script_json(fig))}
        figures.append(item)
        return item

    curve_figs = [f for f in (add_fig("curves", m, curves_figure(data, m)) for m in data.metrics) if f]
    dist_figs = [f for f in (add_fig("dist", m, distribution_figure(data, m)) for m in DIST_METRICS) if f]
    heat_metrics = []
    if data.tests is not None and not data.tests.empty:
        lm = data.tests[data.tests["test"] == "layer_mean_diff"]["metric"]
        heat_metrics = _order(set(lm), data.metrics)
    heat_figs = [f for f in (add_fig("heat", m, heatmap_figure(data, m)) for m in heat_metrics) if f]

    layer_summary, layer_top = layer_test_summary(data)
    ex_rows, ex_omitted = example_rows(data)
    single_group = len(data.groups) < 2

    trows = test_rows(data)
    return {
        **run_context(man, data.run_dir),
        "title": f"gradsight report: {model.get('id') or data.run_dir.name}",
        "kinds": data.kinds,
        "counts": [dict(c, n_target=fmt_num(c["n_target"]), n_tokens=fmt_num(c["n_tokens"]), loss=fmt_num(c["loss"]))
                   for c in counts],
        "totals": tot,
        "skip_reasons": skip_reason_counts(data.examples),
        "notes": data.notes,
        "findings": findings(data),
        "groups": [{"name": g, "color": data.colors[g]} for g in data.groups],
        "single_group": single_group,
        "curve_figs": curve_figs,
        "dist_figs": dist_figs,
        "heat_figs": heat_figs,
        "figures": figures,
        "mad_tables": mad_tables(data),
        "has_mad": data.mad is not None,
        "rd_rows": rd_rows(data),
        "has_rd": data.rd is not None,
        "test_rows": trows,
        "has_tests": data.tests is not None,
        "test_metrics": _order({r["metric"] for r in trows}, data.metrics),
        "test_kinds": _order({r["kind"] for r in trows}, data.kinds),
        "layer_summary": layer_summary,
        "layer_top": layer_top,
        "alpha": ALPHA,
        "examples": ex_rows,
        "examples_omitted": ex_omitted,
        "max_example_rows": MAX_EXAMPLE_ROWS,
        "statuses": sorted({r["status"] for r in ex_rows}),
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def render_html(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render RUN/report.html (or `out`) from the run directory; returns the written path."""
    data = load_run(run_dir)
    ctx = build_context(data)
    page = _env().get_template("report.html").render(**ctx)
    out_path = Path(out) if out is not None else Path(run_dir) / "report.html"
    _atomic_write(out_path, page)
    return out_path
