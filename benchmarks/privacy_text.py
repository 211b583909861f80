"""Text leakage on a tiny causal LM (act.md C.4 tiny LM, C.5 items 5-6) and what gradsight's own store leaks.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_text.py                  # full run (~15-25 min, 1 core)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_text.py --tag-iters 20 --trials 1 --out /tmp/t.md

Setup: random-init Llama (vocab 2048, d=64, 2 layers, untied, float64; `gradsight.privacy.text.tiny_lm`) on real
English (the shipped calibration sample, SmolLM2-tokenised, remapped to its 2047 most frequent ids + <unk>),
sequences of --seq-len tokens. Loss: mean next-token cross-entropy.
1. Bag of words: per-example gradients (privacy.clip.per_example_grads_loop), flat clipping at C = the median
   per-example whole-model norm, noise N(0, sigma^2 C^2) on the clipped sum, divided by B (Opacus
   loss_reduction="mean"); only the input-embedding tensor is attacked, so only it receives noise here (noise on
   other tensors is independent of it). Rows above `noise_row_threshold(sigma C / B, d, V)` (Bonferroni,
   alpha = 0.05) are the recovered set; scored against all tokens of the batch and against the input positions
   0..T-2 (the last token of a causal-LM sequence is only a label).
2. TAG (`tag_attack`, soft labels, breaching's tag loss, scale 0.1) from the noiseless mean gradient: full
   vocabulary; candidates = the bag of words (LAMP); bag + the lm_head label set (`label_token_set`, which adds
   each sequence's last token); and the latter followed by `discrete_refine` (2 sweeps, exact TAG loss over
   all parameters, rolls / block moves / insertions / substitutions). Hungarian-matched exact / position
   accuracy / token P,R / ROUGE-1/2. B=1: --trials sequences; B=8: one batch.
3. Stored artefacts: factor_token_recovery on block-0 q_proj inputs; projected_leak for one real token's v_proj
   input and output gradient; projected_token_recovery over r_in for a T-token example (v_proj and q_proj).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gradsight.capture import capture
from gradsight.measures.projection import ProjectionSpec, Projector
from gradsight.privacy.clip import clip_coefs, per_example_grads_loop
from gradsight.privacy.metrics import token_scores
from gradsight.privacy.store import (factor_token_recovery, layer0_candidates, projected_leak,
                                     projected_token_recovery)
from gradsight.privacy.text import (causal_lm_loss, embedding_token_set, label_token_set, smollm2_tokenizer,
                                    tag_attack, target_gradient, text_corpus_ids, text_recovery_scores, tiny_lm,
                                    token_set_under_noise)

HERE = Path(__file__).parent
EMB = "model.embed_tokens.weight"
MARKER = "<!-- notes below are kept when the benchmark rewrites this file -->"


def table(head: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def dp_embedding_grad(model, ids, sigma: float, seed: int) -> tuple[torch.Tensor, float]:
    """(noisy mean embedding gradient (V, d), per-entry noise std sigma C / B) after flat clipping at the median."""
    B = ids.shape[0]
    per = per_example_grads_loop(
        model, lambda: torch.stack([causal_lm_loss(model, ids[e:e + 1]) for e in range(B)]), B)
    norms = torch.sqrt(sum(v.reshape(B, -1).pow(2).sum(1) for v in per.values()))  # (B,)
    C = float(norms.median())
    c = clip_coefs(norms, C)  # (B,)
    summed = (c.view(B, 1, 1) * per[EMB]).sum(0)  # (V, d)
    noise = torch.randn(summed.shape, generator=torch.Generator().manual_seed(seed), dtype=summed.dtype)
    return (summed + sigma * C * noise) / B, sigma * C / B


def bag_of_words(model, corpus, batch_sizes, sigmas, trials, log) -> str:
    rows = []
    for B in batch_sizes:
        for s in sigmas:
            acc = {k: [] for k in ("p", "r", "f1", "r_in", "exact_in", "n")}
            for t in range(trials):
                ids = corpus[t * B:(t + 1) * B]
                g, st = dp_embedding_grad(model, ids, s, seed=1000 * t + B)
                found = token_set_under_noise(g, st).tolist()
                full = token_scores(found, ids.flatten().tolist())
                inp = token_scores(found, ids[:, :-1].flatten().tolist())
                for k, v in (("p", full["precision"]), ("r", full["recall"]), ("f1", full["f1"]),
                             ("r_in", inp["recall"]), ("exact_in", float(inp["exact"])), ("n", float(len(found)))):
                    acc[k].append(v)
            rows.append([B, s] + [statistics.mean(acc[k]) for k in ("n", "p", "r", "f1", "r_in", "exact_in")])
            log(f"bag B={B} sigma={s}: {rows[-1][2:]}")
    return table(["B", "sigma", "tokens found", "precision (0 if none found)", "recall (all tokens)", "F1",
                  "recall (inputs 0..T-2)", "exact set (inputs)"], rows)


def tag_rows(model, corpus, batch_sizes, trials, iters, refine_evals, log) -> str:
    variants = [("full vocab", False, False, 0), ("bag of words (embedding rows)", True, False, 0),
                ("bag + lm_head labels", True, True, 0), ("bag + labels + discrete refine", True, True, 2)]
    rows = []
    for B in batch_sizes:
        n_trials = trials if B == 1 else 1
        for label, use_bag, use_labels, sweeps in variants:
            sc, secs = [], []
            for t in range(n_trials):
                ids = corpus[t * B:(t + 1) * B]
                tg = target_gradient(model, ids)
                bag = None
                if use_bag:
                    bag = embedding_token_set(tg[EMB])
                    if use_labels:
                        bag = torch.unique(torch.cat([bag, label_token_set(tg["lm_head.weight"])]))
                t0 = time.time()
                out = tag_attack(model, tg, ids.shape[1], B, iters=iters, candidates=bag, seed=t,
                                 refine_sweeps=sweeps, refine_evals=refine_evals)
                secs.append(time.time() - t0)
                sc.append(text_recovery_scores(out, ids))
                log(f"tag B={B} {label} trial {t}: {sc[-1]} ({secs[-1]:.0f} s)")
            m = {k: statistics.mean(s[k] for s in sc) for k in sc[0]}
            rows.append([B, label, n_trials, m["exact"], m["position_acc"], m["token_precision"],
                         m["token_recall"], m["rouge1"], m["rouge2"], statistics.mean(secs)])
    return table(["B", "candidates", "runs", "exact seqs", "position acc", "token P", "token R", "ROUGE-1 F1",
                  "ROUGE-2 F1", "s/run"], rows)


def factors(model, ids, layers):
    with capture(model, layers) as tape:
        logits = model(input_ids=ids).logits  # (B, T, V)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        ce.sum().backward()
        return tape.grads()


def store_rows(model, corpus, r_in_sizes, r_out, log) -> tuple[str, str, str]:
    Q, Vp = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    fg = factors(model, corpus[:8], [Q])[Q]
    hits = sum(int((factor_token_recovery(fg.A[b], model) == corpus[b]).sum()) for b in range(8))
    fac = f"factor_token_recovery, block-0 q_proj inputs of 8 x {corpus.shape[1]} real tokens: " \
          f"{hits}/{corpus[:8].numel()} positions exact."
    # one token: position 0 of a 2-token sequence (position 1 is the last: zero output gradient) -> rank one
    f2 = factors(model, corpus[:1, :2], [Vp])[Vp]
    x, g = f2.A[0, 0], f2.G[0, 0]
    leak = projected_leak(x, g, r_in_sizes, r_out=r_out, seed=0, name=Vp)
    leak_t = table(["r_in", "cosine(x_hat, x)", "rel. error (oracle scale)", "exact store"],
                   [[r["r_in"], r["cosine"], r["rel_err"], r["exact_store"]] for r in leak])
    cands = layer0_candidates(model)  # (V, d)
    rows = []
    for layer, first in ((Vp, 0), (Q, 1)):
        for b in range(4):
            ids = corpus[b:b + 1]
            T = ids.shape[1]
            fgl = factors(model, ids, [layer])[layer]
            truth = set(ids[0, first:-1].tolist())
            for r_in in r_in_sizes:
                proj = Projector(ProjectionSpec(r_in=r_in, r_out=r_out, seed=0), dtype=torch.float64)
                if proj.is_exact(fgl):
                    continue
                feat = proj.layer_features(layer, fgl)[0].view(r_out, r_in)
                P_in = proj.matrix(layer, "in", r_in, cands.shape[1])
                top, _ = projected_token_recovery(feat, P_in, cands, T, n_return=len(truth))
                thr, _ = projected_token_recovery(feat, P_in, cands, T)
                s = token_scores(thr.tolist(), truth)
                rows.append((layer.rsplit(".", 1)[-1], r_in, len(set(top.tolist()) & truth) / len(truth),
                             s["precision"], s["recall"]))
    agg = []
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        sel = [r for r in rows if (r[0], r[1]) == key]
        agg.append([key[0], key[1]] + [statistics.mean(r[i] for r in sel) for i in (2, 3, 4)])
    log(f"store done: {fac}")
    tok_t = table(["layer", "r_in", "top-k recall (k = #S)", "threshold precision", "threshold recall"], agg)
    return fac, leak_t, tok_t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--tag-iters", type=int, default=500)
    ap.add_argument("--refine-evals", type=int, default=1500, help="discrete-refine trials per sequence and sweep")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 3e-2, 1e-1, 1.0])
    ap.add_argument("--r-in", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32, 48, 64])
    ap.add_argument("--r-out", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "PRIVACY_TEXT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", flush=True)  # noqa: E731
    tok = smollm2_tokenizer()
    corpus, id_map = text_corpus_ids(tok, 8 * max(args.trials, 1), args.seq_len, vocab_size=2048)
    model = tiny_lm(vocab_size=2048, hidden=64, layers=2)
    bag = bag_of_words(model, corpus, [1, 8], args.sigmas, args.trials, log)
    tag = tag_rows(model, corpus, [1, 8], args.trials, args.tag_iters, args.refine_evals, log)
    fac, leak, toks = store_rows(model, corpus, args.r_in, args.r_out, log)
    text = "\n\n".join([
        "# Text leakage on a tiny LM and what gradsight's store leaks (`benchmarks/privacy_text.py`)",
        f"Generated in {time.time() - t0:.0f} s on {platform.machine()} ({os.cpu_count()} CPUs, 1 thread), "
        f"torch {torch.__version__}; seq_len {args.seq_len}, {args.trials} trials, TAG {args.tag_iters} "
        f"iterations.\n\n" + __doc__.split("\n\n", 2)[2].strip(),
        "## 1. Bag of words from the input-embedding gradient (DP: clip at median, noise sigma*C on the sum, / B)",
        bag,
        "## 2. TAG from the noiseless mean gradient (exact = fraction of sequences recovered exactly)", tag,
        "## 3. gradsight's stored artefacts", fac,
        f"Projected feature of one token (v_proj, block 0, B=1, T=1 effective; r_out={args.r_out}, d_in=64):",
        leak,
        f"Token recovery from the projected feature of one {args.seq_len}-token example (mean over 4 examples; "
        f"r_out={args.r_out}; S = tokens with non-zero output gradient: v_proj positions 0..T-2, q_proj "
        f"1..T-2; threshold = relative residual <= 1e-4; float64 features):", toks,
    ])
    old = args.out.read_text() if args.out.exists() else ""
    notes = old[old.index(MARKER):] if MARKER in old else MARKER + "\n"
    args.out.write_text(text + "\n\n" + notes)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
