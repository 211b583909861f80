"""Attribution on SmolLM2-135M-Instruct: does it find the right training records, and what does a record cost?

Data: the realistic mixed-length set (benchmarks/realistic.py; no download). Per problem, the training records
are its ``direct`` answer, its short ``step`` solution and its long chain of thought (``cot``, several hundred
tokens); the query is the problem's ``wrong_cot`` (a long chain of thought with one slip). Training records and
queries carry the problem as their group, so the same-group precision@k of each query's top proponents says
whether attribution finds the records of the same problem ahead of the others (chance: 3 / N_train).

Cost: the attribution analysis' work per training batch (one captured forward/backward with frozen weights,
Kronecker projection of every linear layer of the 30 blocks to 32 x 32, the K-FAC covariance sums) against the
physical limit of a plain training step on the same batch (forward, backward with every weight gradient),
timed interleaved over the run's own batches, 1 thread. Goal: <= 1.5x.

    python benchmarks/attribution_lm.py [--problems 8] [--rounds 3]    -> benchmarks/results_attribution_lm.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realistic import realistic_records  # noqa: E402
from run import interleaved, log, paired_ratio, secs  # noqa: E402


def data(n_problems: int) -> tuple[list[dict], list[dict]]:
    recs = realistic_records(n_problems=n_problems)
    train = [dict(r, group=f"p{r['problem']:03d}") for r in recs if r["group"] != "wrong_cot"]
    queries = [dict(r, group=f"p{r['problem']:03d}") for r in recs if r["group"] == "wrong_cot"]
    return train, queries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from gradsight.analyses.attribution import AttributionConfig, run_attribution
    from gradsight.attribution.features import Featurizer
    from gradsight.inputs.data import encode, load_records
    from gradsight.inputs.examples import layer_modules
    from gradsight.inputs.lm import collate_units, lm_source
    from gradsight.inputs.losses import loss_fn_for
    from gradsight.inputs.batching import make_batches
    from gradsight.inputs.lm import batch_cost
    from gradsight.measures.step import backward_step
    from gradsight.runs.distributed import DistInfo

    train, queries = data(args.problems)
    tmp = Path(tempfile.mkdtemp())
    qfile = tmp / "queries.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in queries))
    cfg = AttributionConfig(model="smollm2-135m-instruct", data="", queries=str(qfile),
                            methods=("ekfac", "grad_cos", "trak"))
    log(f"attribution of {len(queries)} queries to {len(train)} training records (SmolLM2, every linear layer)")
    t0 = time.perf_counter()
    res = run_attribution(cfg, tmp / "run", records=train, progress=False, report=False)
    run_s = time.perf_counter() - t0
    prec = res.precision
    log(f"run: {run_s:.0f} s\n{prec.to_string(index=False)}")

    # cost per training batch: the analysis' step vs a plain training step, on the same batches
    src = lm_source(records=train)(cfg, DistInfo())
    model, tok = src.model, src.tokenizer
    recs, _ = load_records(train)
    encs = [e for e in (encode(r, tok, cfg.encode) for r in recs) if e.ok]
    groups = make_batches(encs, token_budget=cfg.token_budget, max_batch=cfg.max_batch, cost=batch_cost(cfg, src))
    batches = [collate_units([encs[i] for i in g], tok.pad_token_id, "cpu") for g in groups]
    lengths = sorted(e.n_tokens for e in encs)
    mods = layer_modules(src)
    fz = Featurizer(cfg.feature_spec(), {n: m.bias is not None for n, m in mods.items()})
    losses = loss_fn_for(model, "sum")

    def attribution_pass():
        for b in batches:
            step = backward_step(model, mods, b, losses, tokens=b["attention_mask"])
            fz(step.grads, covariance=True)

    def plain_pass():
        for b in batches:
            model.zero_grad(set_to_none=True)
            losses(model, b).sum().backward()
        model.zero_grad(set_to_none=True)

    for p in model.parameters():
        p.requires_grad_(True)
    times = interleaved({"attribution": attribution_pass, "plain fwd+bwd": plain_pass}, rounds=args.rounds,
                        warmup=False)
    ratio, note = paired_ratio(times["attribution"], times["plain fwd+bwd"])
    log(f"cost per training example: {ratio:.3f}x a plain forward+backward ({note})")
    out = {"n_train": len(train), "n_query": len(queries), "lengths": {"min": lengths[0], "median":
           lengths[len(lengths) // 2], "max": lengths[-1]}, "n_batches": len(batches),
           "layers": len(mods), "features_per_layer": [cfg.r_out, cfg.r_in], "run_seconds": run_s,
           "precision": prec.to_dict("records"), "chance_precision": 3 / len(train),
           "cost_ratio": ratio, "cost_note": note, "attribution_pass_s": secs(times["attribution"]),
           "plain_pass_s": secs(times["plain fwd+bwd"]), "goal": "cost_ratio <= 1.5"}
    (HERE / "results_attribution_lm.json").write_text(json.dumps(out, indent=1, default=float))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
