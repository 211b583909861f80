"""Compare the final tables of two run trees (e.g. the demo written by two gradsight versions).

    python benchmarks/compare_runs.py OLD_RUNS NEW_RUNS [--rtol 1e-9] [--atol 1e-12]

Every run directory under OLD (a folder with manifest.json) is matched with the same relative path under NEW;
every top-level table (*.parquet) must exist in both with the same columns, the same rows, equal non-float
columns and float columns within rtol/atol (NaN where the other is NaN). Prints one line per table and the
largest relative difference seen; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def compare_table(a: pd.DataFrame, b: pd.DataFrame, rtol: float, atol: float) -> tuple[bool, str, float]:
    if list(a.columns) != list(b.columns):
        return False, f"columns differ: {list(a.columns)} vs {list(b.columns)}", np.nan
    if a.shape != b.shape:
        return False, f"shapes differ: {a.shape} vs {b.shape}", np.nan
    worst = 0.0
    for c in a.columns:
        x, y = a[c], b[c]
        if x.dtype.kind in "fc" or y.dtype.kind in "fc":
            u, v = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
            if not np.array_equal(np.isnan(u), np.isnan(v)):
                return False, f"{c}: NaN at different rows", np.nan
            m = ~np.isnan(u)
            if m.any():
                d = np.abs(u[m] - v[m])
                if not np.all(d <= atol + rtol * np.abs(v[m])):
                    i = int(np.argmax(d - rtol * np.abs(v[m])))
                    return False, f"{c}: {u[m][i]!r} vs {v[m][i]!r}", np.nan
                scale = np.maximum(np.abs(v[m]), atol)
                worst = max(worst, float(np.max(d / scale)))
        elif not x.astype(str).equals(y.astype(str)):
            i = int(np.flatnonzero(x.astype(str).to_numpy() != y.astype(str).to_numpy())[0])
            return False, f"{c}: {x.iloc[i]!r} vs {y.iloc[i]!r}", np.nan
    return True, "", worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--atol", type=float, default=1e-12)
    args = ap.parse_args(argv)
    runs = sorted(p.parent for p in args.old.rglob("manifest.json"))
    bad, n, worst = 0, 0, 0.0
    for run in runs:
        rel = run.relative_to(args.old)
        other = args.new / rel
        for t in sorted(run.glob("*.parquet")):
            n += 1
            u = other / t.name
            if not u.exists():
                print(f"MISSING  {rel / t.name}")
                bad += 1
                continue
            ok, why, w = compare_table(pd.read_parquet(t), pd.read_parquet(u), args.rtol, args.atol)
            worst = max(worst, w) if ok else worst
            print(f"{'ok' if ok else 'DIFFERS':8s} {rel / t.name}" + (f"  max rel diff {w:.2e}" if ok else f"  {why}"))
            bad += not ok
    print(f"{n - bad} of {n} tables equal (rtol {args.rtol:g}, atol {args.atol:g}); largest relative difference "
          f"{worst:.2e}")
    return 1 if bad or not n else 0


if __name__ == "__main__":
    sys.exit(main())
