"""The data of a `layers` run's report: every table of the run directory, read once (never a model).

`load_run` reads the examples, summary, MAD, RD and tests tables and the per-example layer stats (averaged over
depth for the distribution plots); missing optional tables become notes, not errors. The numbers shared by
the page and the terminal summary (counts per group, depth-means of the group curves, MAD values, whole-depth
tests) are read from those tables, never recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from ...report.kit import KIND_ORDER, PALETTE, order, read_table, str_cols

__all__ = ["RunData", "load_run", "depth_rows", "group_counts", "depth_mean_table", "mad_value",
           "whole_depth_tests", "METRIC_ORDER", "METRIC_LABELS", "SEGMENTS", "DIST_METRICS", "MAD_METRICS",
           "MAX_EXAMPLE_ROWS", "ALPHA"]

METRIC_ORDER = ["nuclear", "sigma1_ratio", "erank", "frobenius", "spectral", "stable_rank"]
METRIC_LABELS = {
    "nuclear": "Nuclear norm ‖G‖*",
    "sigma1_ratio": "σ1 ratio (σ1 / Σσ)",
    "erank": "Effective rank",
    "frobenius": "Frobenius norm ‖G‖F",
    "spectral": "Spectral norm σ1",
    "stable_rank": "Stable rank ‖G‖F² / σ1²",
}
SEGMENTS = ["all", "early", "middle", "late"]
DIST_METRICS = ("nuclear", "erank")
MAD_METRICS = ("nuclear", "sigma1_ratio", "erank")
MAX_EXAMPLE_ROWS = 2000  # ok rows beyond this are left out of the table (skipped rows are always shown)
ALPHA = 0.05


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


def depth_rows(df: pd.DataFrame) -> pd.DataFrame:
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
        examples = read_table(run_dir / "examples.parquet", notes, "Examples table")
    elif (run_dir / "examples").is_dir() and any((run_dir / "examples").glob("*.parquet")):
        try:
            examples = pd.read_parquet(run_dir / "examples")
            notes.append("examples.parquet not merged yet; read the per-rank shards in examples/.")
        except Exception as e:
            notes.append(f"Examples shards could not be read: {type(e).__name__}: {e}")
    else:
        notes.append("Examples table not found (examples.parquet).")
    examples = str_cols(examples, ["id", "group", "source", "status", "reason", "prompt", "response"])
    if examples is not None and "idx" in examples:
        examples = examples.sort_values("idx", kind="stable").reset_index(drop=True)

    summary = str_cols(read_table(run_dir / "summary.parquet", notes, "Summary table (group curves)"),
                        ["group", "kind", "metric"])
    mad = str_cols(read_table(run_dir / "mad.parquet", notes, "MAD table"), ["group", "kind", "metric", "segment"])

    groups_seen: list[str] = []
    if examples is not None and "group" in examples:
        groups_seen += list(examples["group"])
    for df in (summary, mad):
        if df is not None and "group" in df:
            groups_seen += list(df["group"])
    groups = list(dict.fromkeys(groups_seen))
    single = len(groups) < 2
    why = "only one group, so there is nothing to compare" if single else ""
    rd = str_cols(read_table(run_dir / "rd.parquet", notes, "Relative-difference table", why),
                   ["reference", "group", "kind", "metric", "top_blocks"])
    tests = str_cols(read_table(run_dir / "tests.parquet", notes, "Tests table", why),
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
                ls = str_cols(ls, ["group", "kind", "metric"])
                if not ls.empty:
                    depth_means = (
                        depth_rows(ls)
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
        kinds=order(kinds_seen, KIND_ORDER),
        metrics=order(metrics_seen, METRIC_ORDER),
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
    return depth_rows(s).groupby(["group", "kind", "metric"])["mean"].mean()


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

