"""GAPrune on all-MiniLM-L6-v2: 50% unstructured pruning of the MLP matrices, five scores, retrieval evaluation.

    .venv/bin/python benchmarks/gaprune.py                     # all 150 calibration pairs per dataset
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gaprune.py   # one thread (shared machine)
    .venv/bin/python benchmarks/gaprune.py --n-calib 40 --out /tmp/g.json   # quick smoke run

Data: the shipped GENERAL (Python reference prose) and DOMAIN (licence texts) pair samples,
gradsight/importance/data/pairs_{general,domain}.jsonl, 300 pairs each. Even positions calibrate, odd positions
evaluate (no overlap). Calibration triplets: hard negative = the positive of another calibration pair.
Methods (12 MLP matrices = intermediate.dense + output.dense of 6 layers, 7.08M weights):
    magnitude   |W|, one global threshold (GAPrune's "global" strategy)
    fisher_obd  0.5 F_dom W^2 (domain Fisher, GAPrune's estimator), global
    dai_code    GAPrune DAI exactly as SparseModel.py (beta 1, gamma 0.5), global
    dai_scaled  DAI with per-tensor normalised terms (METHODS.md 3), global
    wanda       |W| sqrt(sum x^2 / N) on the domain calibration queries, per output row
Metrics on each evaluation half: recall@1 and MRR of retrieving each query's positive among all positives,
mean positive cosine, and cos_retention = mean cosine between pruned and dense embeddings of the same texts.
Writes benchmarks/results_gaprune.json (atomically) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from gradsight.importance import embedding as E
from gradsight.importance.masks import global_masks, row_mask, tie_fraction
from gradsight.importance.scores import fisher_obd, magnitude, wanda

HERE = Path(__file__).parent
FP16_TINY = 2.0 ** -24  # smallest float16 subnormal (~5.96e-8): GAPrune stores F and alignment in float16


def _evaluate(model, tok, evals, dense):
    return {k: E.evaluate_pairs(model, tok, pairs, dense_embeddings=dense.get(k)) for k, pairs in evals.items()}


def _with_masks(model, params, masks, fn):
    """Run fn() with W <- W * mask for every masked weight, then restore the dense weights."""
    saved = {n: params[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m.to(params[n].dtype))
        return fn()
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                params[n].copy_(w)


def _agreement(masks, ref):
    """Fraction of the pruned weights of `masks` that `ref` also prunes (1 = identical masks at equal counts)."""
    both = sum(int((~masks[n] & ~ref[n]).sum()) for n in masks)
    return both / max(1, sum(int((~masks[n]).sum()) for n in masks))


def _ranks(tensors):
    """Average ranks (ties share their mean rank) of the concatenated, flattened tensors."""
    from scipy.stats import rankdata
    return rankdata(torch.cat([t.detach().flatten().double() for t in tensors]).numpy())


def _spearman_ranks(rs, rw) -> float:
    """Pearson correlation of two rank vectors = Spearman rank correlation."""
    return float(((rs - rs.mean()) * (rw - rw.mean())).mean() / (rs.std() * rw.std()))


def run(n_calib: int | None, sparsity: float, batch_size: int, fisher_batch: int) -> dict:
    t0, c0 = time.time(), time.process_time()
    model, tok = E.load_minilm()
    params = E.prunable_params(model, "mlp")
    splits = {k: E.split_pairs(E.load_pairs(k)) for k in ("general", "domain")}
    calib = {k: E.make_triplets(splits[k][0][:n_calib]) for k in splits}
    evals = {k: splits[k][1] for k in splits}
    out = {"config": {"model": "all-MiniLM-L6-v2", "sparsity": sparsity, "prunable": sorted(params),
                      "n_weights": sum(p.numel() for p in params.values()), "batch_size": batch_size,
                      "fisher_batch_size": fisher_batch,
                      "n_calib": {k: len(v) for k, v in calib.items()}, "n_eval": {k: len(v) for k, v in evals.items()},
                      "max_length": 128, "threads": torch.get_num_threads()}, "timings_s": {}}

    t = time.time()
    dense = {k: E.pair_embeddings(model, tok, pairs) for k, pairs in evals.items()}
    results = {"dense": {k: {**E.retrieval_metrics(e[:len(evals[k])], e[len(evals[k]):]), "cos_retention": 1.0}
                         for k, e in dense.items()}}
    out["timings_s"]["dense_eval"] = time.time() - t

    t = time.time()
    stats = E.gaprune_stats(model, calib["general"], calib["domain"], params, batch_size,
                            fisher_batch_size=fisher_batch, tok=tok)
    out["timings_s"]["fisher_and_alignment"] = time.time() - t
    t = time.time()
    sq, n_seq = E.activation_sq_in(model, tok, [x["query"] for x in calib["domain"]], list(params))
    out["timings_s"]["wanda_activations"] = time.time() - t

    W = {n: p.detach() for n, p in params.items()}
    dai_code, diag_code = E.gaprune_scores(model, [], [], mode="code", params=params, stats=stats)
    dai_scaled, diag_scaled = E.gaprune_scores(model, [], [], mode="scaled", params=params, stats=stats)
    scores = {"magnitude": {n: magnitude(w) for n, w in W.items()},
              "fisher_obd": {n: fisher_obd(w, stats.fisher_dom[n], 1) for n, w in W.items()},
              "dai_code": dai_code, "dai_scaled": dai_scaled}
    masks = {k: global_masks(s, sparsity) for k, s in scores.items()}
    scores["wanda"] = {n: wanda(w, sq[n], n_seq) for n, w in W.items()}
    masks["wanda"] = {n: row_mask(scores["wanda"][n], sparsity) for n in W}

    t = time.time()
    rank_w = _ranks(w.abs() for w in W.values())  # ranks of |W| over all prunable weights, for the Spearman column
    for k, m in masks.items():
        results[k] = _with_masks(model, params, m, lambda: _evaluate(model, tok, evals, dense))
        results[k]["mask"] = {"agreement_with_magnitude": _agreement(m, masks["magnitude"]),
                              "sparsity": sum(int((~v).sum()) for v in m.values()) / out["config"]["n_weights"],
                              "tie_fraction": tie_fraction(scores[k], m) if k != "wanda" else None,
                              "spearman_with_abs_w": _spearman_ranks(_ranks(scores[k][n] for n in W), rank_w),
                              "per_tensor_pruned": {n: float((~v).double().mean()) for n, v in m.items()}}
    out["timings_s"]["pruned_evals"] = time.time() - t
    out["results"] = results

    fisher_raw = {n: {"F_dom_mean": float(stats.fisher_dom[n].mean()), "F_dom_max": float(stats.fisher_dom[n].max()),
                      "F_gen_mean": float(stats.fisher_gen[n].mean()),
                      "frac_F_dom_below_fp16_tiny": float((stats.fisher_dom[n] - 1e-8 < FP16_TINY).double().mean()),
                      "W_abs_mean": float(W[n].abs().mean())} for n in W}
    out["dai_terms"] = {"code": diag_code.to_dict(orient="records"), "scaled": diag_scaled.to_dict(orient="records"),
                        "fisher_raw": fisher_raw, "alignment_steps": stats.steps}
    out["timings_s"]["total"] = time.time() - t0
    out["timings_s"]["total_cpu"] = time.process_time() - c0  # ~ wall time on a quiet machine at 1 thread
    return out


def tables(res: dict) -> str:
    """Markdown: the metric table and the DAI-term table."""
    lines = ["| method | general R@1 | general MRR | general cos ret. | domain R@1 | domain MRR | domain cos ret. "
             "| pruned-set overlap with magnitude | Spearman(score, abs W) |", "|---" * 9 + "|"]
    for k, r in res["results"].items():
        g, d, m = r["general"], r["domain"], r.get("mask", {})
        cr = lambda x: "—" if x["cos_retention"] is None else f"{x['cos_retention']:.4f}"  # noqa: E731
        ov = f"{m['agreement_with_magnitude']:.4f}" if m else "—"
        sp = f"{m['spearman_with_abs_w']:.4f}" if m else "—"
        lines.append(f"| {k} | {g['recall_at_1']:.3f} | {g['mrr']:.3f} | {cr(g)} | {d['recall_at_1']:.3f} | "
                     f"{d['mrr']:.3f} | {cr(d)} | {ov} | {sp} |")
    lines += ["", "| tensor | mean abs Fisher term | mean regulariser | mean abs 0.2a | Fisher/reg | align inert "
              "| s_T | conflict rate | Spearman(DAI-code, abs W) | Spearman(DAI-scaled, abs W) |", "|---" * 10 + "|"]
    for c, s in zip(res["dai_terms"]["code"], res["dai_terms"]["scaled"]):
        name = c["tensor"].replace("encoder.layer.", "L").replace(".weight", "")
        lines.append(f"| {name} | {c['fisher']:.2e} | {c['regulariser']:.3f} | {c['align']:.1e} | "
                     f"{c['fisher_over_reg']:.1e} | {c['align_inert']:.3f} | {c['s_T']:+.3f} | "
                     f"{c['conflict_rate']:.2f} | {c['spearman_abs_w']:.6f} | {s['spearman_abs_w']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results_gaprune.json"))
    ap.add_argument("--n-calib", type=int, default=None, help="calibration pairs per dataset (default: all 150)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=4, help="alignment step: half general, half domain (4)")
    ap.add_argument("--fisher-batch", type=int, default=4,
                    help="Fisher micro-batch: 4 = GAPrune's documented batch; 2 (= batch-size / 2) reuses the "
                         "alignment gradients (one gradient pass, ~100 s less CPU) but changes F (see GAPRUNE.md)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, e.g. OMP_NUM_THREADS)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.n_calib, a.sparsity, a.batch_size, a.fisher_batch)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, a.out)
    print(tables(res))
    print(f"\ntimings (s): {json.dumps({k: round(v, 1) for k, v in res['timings_s'].items()})}  -> {a.out}")


if __name__ == "__main__":
    main()
