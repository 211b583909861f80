"""Feature store: peak memory of an attribution run against the number of training examples.

The training features live on disk (safetensors shards); fitting (EK-FAC's eigenvalue correction) and scoring
stream them block by block, and only the running top-k per query is kept when the score matrix is not stored
(``max_dense=0``). What still grows with N is per-example bookkeeping (the engine's units, the examples table,
ids and losses: a few KB per example whatever the gradient size), not the features. So the benchmark runs two
feature sizes, 3 KB and 27 KB per example (a 64-256-256-10 MLP projected to 16 x 16 or 48 x 48 per layer), at
N = 4k and 32k, each in a fresh process (peak RSS from ``resource.getrusage``): if the features were held in
memory, the larger size would grow by 9x more; streamed, both grow by the same bookkeeping.

    python benchmarks/attribution_store.py            # -> benchmarks/results_attribution_store.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (4_000, 32_000)
RANKS = (16, 48)


def child(n: int, r: int, out: str) -> dict:
    import torch
    from torch import nn

    from gradsight.analyses.attribution import attribution_of

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1000, 64, generator=g), torch.randint(0, 10, (1000,), generator=g))
               for _ in range(n // 1000)]
    queries = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g))]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    attribution_of(net, "cross_entropy", batches, out, queries=queries, methods=("ekfac",), r_in=r, r_out=r,
                   max_dense=0, block_size=2048, flush_every=4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = sum(f.stat().st_size for f in Path(out, "features").glob("*.safetensors"))
    return {"n": n, "r": r, "peak_rss_mb": peak / 1024, "rss_before_run_mb": base / 1024, "seconds": time.perf_counter() - t0,
            "feature_store_mb": store / 2**20}


def main() -> None:
    rows = []
    for r in RANKS:
        for n in SIZES:
            with tempfile.TemporaryDirectory() as d:
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                p = subprocess.run([sys.executable, __file__, "--child", str(n), str(r), str(Path(d) / "run")],
                                   env=env, capture_output=True, text=True, check=True)
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
                x = rows[-1]
                print(f"r={r:>2} N={n:>6}: peak RSS {x['peak_rss_mb']:.0f} MB, feature store "
                      f"{x['feature_store_mb']:.0f} MB, {x['seconds']:.1f} s", flush=True)
    summary = {}
    for r in RANKS:
        a, b = [x for x in rows if x["r"] == r and x["n"] in (SIZES[0], SIZES[-1])]
        summary[r] = {"rss_growth_mb": b["peak_rss_mb"] - a["peak_rss_mb"],
                      "store_growth_mb": b["feature_store_mb"] - a["feature_store_mb"]}
        print(f"r={r}: {SIZES[0]} -> {SIZES[-1]} examples: the store grows {summary[r]['store_growth_mb']:.0f} MB, "
              f"peak RSS {summary[r]['rss_growth_mb']:.0f} MB")
    (HERE / "results_attribution_store.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
    else:
        main()
