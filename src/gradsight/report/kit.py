"""The kit every report page is built from: number formatting, escaping, table reading, plotly figure helpers,
the shared run header, the jinja environment and the page writer.

Each analysis renders its page in its own folder (``gradsight/analyses/<name>/report.py`` with the page template
next to it); the partials every page includes (``_style.css.html``, ``_scripts.html``, ``_identity.html``,
``_findings.html``) live in ``report/templates/``.

Escaping rules of every page: a page is a single file, plotly.js is inlined once (`run_context`), every figure
is embedded as JSON and drawn with ``Plotly.newPlot``; there are no external URLs. All user text (prompts,
responses, ids, group names, reasons, paths) goes through jinja2 autoescaping (`env`); JSON placed inside
``<script>`` has ``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc. (`script_json`), and text handed to plotly
(which renders a small HTML subset in labels and hover text) is entity-escaped first (`ptext`).
"""

from __future__ import annotations

import html as _html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import pandas as pd

from ..runs.store import atomic_write_text, read_manifest

__all__ = [
    "TEMPLATE_DIR", "KIND_ORDER", "PALETTE", "CONFIG_KEYS", "MAX_TEXT", "MAX_FULL_TEXT",
    "isnan", "finite", "fmt_num", "fmt_int", "fmt_p", "fmt_pct", "fmt_ci", "na", "skip_reason_counts",
    "ptext", "script_json", "slug", "order", "hex_rgba", "read_table", "str_cols", "flatten", "key_config",
    "clip_text", "Subplots", "figure", "floats", "env", "plotly_js", "plotly_js_version", "FigureRegistry",
    "run_context", "out_path", "render_page", "table_section", "render_tables_page", "report_path_line",
]

TEMPLATE_DIR = Path(__file__).parent / "templates"  # the partials shared by every page

KIND_ORDER = [
    "q", "k", "v", "o", "gate", "up", "down",
    "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj",
    "query", "key", "value", "attn.dense", "intermediate", "output",
]
# Okabe-Ito (colour-blind safe), then tab10 for many groups.
PALETTE = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]
MAX_TEXT = 200  # characters shown in the examples table before <details>
MAX_FULL_TEXT = 20_000  # full text cap inside <details>
CONFIG_KEYS = (
    "loss_on", "max_length", "dtype", "reduction", "layers", "include", "exclude", "pattern", "select",
    "kinds", "metrics", "n_perm", "n_boot", "backend", "chat_template", "token_budget", "segments",
)


# ---------------------------------------------------------------------------------------------------------
# formatting (shared by the pages and the terminal summaries)
# ---------------------------------------------------------------------------------------------------------


def isnan(x: Any) -> bool:
    """None, NaN or a pandas missing value."""
    try:
        return x is None or (isinstance(x, float) and math.isnan(x)) or bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def finite(x: Any) -> bool:
    """A finite number (False for None, NaN, ±inf and non-numbers)."""
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_num(x: Any) -> str:
    """Compact number: 4 significant digits, scientific for very small/large magnitudes, '–' for NaN."""
    if isnan(x):
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
    if isnan(x):
        return "–"
    try:
        return str(int(x))
    except (TypeError, ValueError):
        return str(x)


def fmt_p(p: Any, n_perm: Any = None) -> str:
    """p-value: '<0.001' at the permutation resolution limit 1/(n_perm+1), else 3 significant digits."""
    if isnan(p):
        return "–"
    p = float(p)
    if not isnan(n_perm):
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


def na(x: Any) -> str:
    """fmt_num, but 'n/a' for a missing value (NaN / None)."""
    return "n/a" if isnan(x) else fmt_num(x)


def fmt_pct(x: Any) -> str:
    """Share in [0, 1] as a percentage with one decimal ('37.5%'), 'n/a' when missing."""
    return f"{100 * float(x):.1f}%" if finite(x) else "n/a"


def fmt_ci(lo: Any, hi: Any, pct: bool = False) -> str:
    if not (finite(lo) and finite(hi)):
        return "n/a"
    f = fmt_pct if pct else fmt_num
    return f"[{f(lo)}, {f(hi)}]"


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


def ptext(s: Any) -> str:
    """Text for plotly (which renders a small HTML subset in labels): entity-escape it."""
    return _html.escape(str(s), quote=False)


def script_json(obj: Any) -> str:
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


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "x"


def order(values: Iterable[str], preferred: list[str]) -> list[str]:
    """Distinct values as strings: those in `preferred` first (in its order), then the rest as they come."""
    vals = list(dict.fromkeys(str(v) for v in values))
    first = [v for v in preferred if v in vals]
    return first + [v for v in vals if v not in preferred]


def hex_rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    r, g, b = int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    return f"rgba({r},{g},{b},{alpha})"


# ---------------------------------------------------------------------------------------------------------
# reading a run's tables
# ---------------------------------------------------------------------------------------------------------


def read_table(path: Path, notes: list[str], label: str, why_missing: str = "") -> pd.DataFrame | None:
    """A parquet table, or None with a note when it is missing or cannot be read."""
    if not path.exists():
        notes.append(f"{label} not found ({path.name}){': ' + why_missing if why_missing else ''}.")
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # a corrupt table must not prevent the rest of the report
        notes.append(f"{label} could not be read ({path.name}): {type(e).__name__}: {e}")
        return None
    return df


def str_cols(df: pd.DataFrame | None, cols: Iterable[str]) -> pd.DataFrame | None:
    """A copy with the given columns as strings (missing values become "")."""
    if df is None:
        return None
    df = df.copy()
    for c in cols:
        if c in df:
            df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    return df


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
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
    flat = flatten(manifest.get("config") or {})
    rows = []
    for k, v in flat.items():
        last = k.split(".")[-1].lower()
        if any(key in last for key in CONFIG_KEYS):
            rows.append((k, _cfg_value(v)))
    return rows


def clip_text(s: str) -> dict:
    """A long user text for a table cell: its first MAX_TEXT characters and the full text (capped)."""
    s = "" if s is None else str(s)
    full = s if len(s) <= MAX_FULL_TEXT else s[:MAX_FULL_TEXT] + f" … [{len(s) - MAX_FULL_TEXT} more characters]"
    short = s if len(s) <= MAX_TEXT else s[:MAX_TEXT].rstrip() + " …"
    return {"short": short, "full": full, "long": len(s) > MAX_TEXT, "n": len(s)}


# ---------------------------------------------------------------------------------------------------------
# figures (plain plotly JSON dicts; no graph_objects validation, which is slow and not needed here)
# ---------------------------------------------------------------------------------------------------------


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


@dataclass
class RunData:
    """A run as read from disk by its report: manifest, tables (None when missing) and notes. Subclasses name the
    manifest block of their analysis in `key` (`info` reads it)."""

    run_dir: Path
    manifest: dict
    tables: dict
    notes: list = field(default_factory=list)
    key: ClassVar[str] = ""

    def t(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    @property
    def info(self) -> dict:
        return self.manifest.get(self.key) or {}

    @property
    def cfg(self) -> dict:
        return self.manifest.get("config") or {}


class Subplots:
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


def figure(traces: list[dict], sp: Subplots, height: int, **layout: Any) -> dict:
    """A plotly figure dict on the grid `sp`, with the pages' common layout (overridden by `layout`)."""
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


def floats(values: Iterable[Any], digits: int = 6) -> list[float | None]:
    """Numbers rounded to `digits` significant digits for the page; None for missing or non-finite ones."""
    out: list[float | None] = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(float(f"{f:.{digits}g}") if math.isfinite(f) else None)
    return out


# ---------------------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------------------


def env(search: Sequence[Path | str] = ()):
    """The jinja environment of the pages: templates looked up in `search` (an analysis' own folder) first,
    then in report/templates/ (the shared partials); autoescaping on, undefined names are errors."""
    import jinja2

    loaders = [jinja2.FileSystemLoader(str(p)) for p in search] + [jinja2.FileSystemLoader(str(TEMPLATE_DIR))]
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def plotly_js() -> str:
    """The plotly.js bundle, safe to inline in a <script> element."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    # defensive: a literal "</script" would end the inline script early
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def plotly_js_version() -> str:
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
        self.items.append({"id": f"fig-{fid}", "json": Markup(script_json(fig))})
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
        "template_json": Markup(script_json(pio.templates["plotly_white"].to_plotly_json())),
        "plotly_config_json": Markup(script_json({"displaylogo": False, "responsive": True})),
        "plotly_js": Markup(plotly_js()),
        "plotly_version": plotly_js_version(),
    }


def out_path(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Where a page goes: `out`, else RUN/report.html."""
    return Path(out) if out is not None else Path(run_dir) / "report.html"


def render_page(template_name: str, context: dict, out: Path | str, search: Sequence[Path | str] = ()) -> Path:
    """Render the page template `template_name` (looked up in `search` first, then report/templates/) with
    `context` and write it to `out` atomically (temp file, fsync, os.replace); returns the written path."""
    page = env(search).get_template(template_name).render(**context)
    path = Path(out)
    atomic_write_text(path, page)
    return path


def table_section(heading: str, df: pd.DataFrame, *, caption: str = "", max_rows: int = 200,
                  file: str = "") -> dict:
    """A table of a page: formatted cells (numbers by `fmt_num`), at most `max_rows` rows."""
    cols = [{"name": str(c), "num": df[c].dtype.kind in "iuf"} for c in df.columns]
    rows = [[fmt_num(v) if c["num"] else ("" if isnan(v) else str(v)) for v, c in zip(r, cols)]
            for r in df.head(max_rows).itertuples(index=False)]
    return {"slug": slug(heading), "heading": heading, "caption": caption, "columns": cols, "rows": rows,
            "omitted": max(0, len(df) - max_rows), "file": file}


def render_tables_page(run_dir: Path | str, out: Path | str | None = None, *, analysis: str,
                       title: str | None = None, findings: Sequence[dict] = (), tables: Sequence[dict] = (),
                       figures: Sequence[tuple[str, dict]] = (), notes: Sequence[str] = ()) -> Path:
    """A complete page for any analysis from its findings, tables (`table_section`) and figures.

    An analysis without a page template of its own (e.g. a new one) gets a report on day one: the run's
    identity, findings, each table and figure, and the configuration, with the escaping rules of every page.
    """
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    registry = FigureRegistry()
    figure_list = [{"title": t, "id": registry.add(f"f{i}", fig)} for i, (t, fig) in enumerate(figures)
                   if fig is not None]
    ctx = {**run_context(man, run_dir), "analysis": analysis, "zip": zip,
           "title": title or f"gradsight {analysis} report: {(man.get('model') or {}).get('id') or run_dir.name}",
           "findings": list(findings), "tables": list(tables), "figure_list": figure_list, "notes": list(notes),
           "figures": registry.items}
    return render_page("tables.html", ctx, out_path(run_dir, out))


def report_path_line(run_dir: Path | str):
    """The last line of every terminal summary: where the page is (or how to write it)."""
    from rich.text import Text

    rp = Path(run_dir) / "report.html"
    line = Text("report ", style="dim")
    line.append(str(rp), style="cyan")
    if not rp.exists():
        line.append("  (not written yet: gradsight report RUN)", style="dim")
    return line
