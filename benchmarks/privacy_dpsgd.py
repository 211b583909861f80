"""DP-SGD step time: gradsight PerExampleClipper vs Opacus 1.6 GradSampleModule "hooks" and "ghost" (issue 14).

One DP-SGD step = per-example clipping + the clipped sum + Gaussian noise N(0, sigma^2 C^2) + divide by the expected
batch size (Opacus loss_reduction="mean") + the optimizer step (SGD). Every method runs on a deep copy of the SAME
model and the SAME batch, with the same noise multiplier, clip bound and sample rate, so the same epsilon (printed,
opacus RDPAccountant). "plain" is the physical limit: one ordinary forward/backward of the mean loss + SGD step.

Cases:
  mlp      digits (sklearn load_digits / 16) MLP 64-256-256-10 (ReLU), B = 256
  lm-mixed GPT-2-like transformer (token + position nn.Embedding, nn.LayerNorm, nn.Linear; d = 256, 4 layers,
           4 heads, vocab 8192, untied head), B = 8, lengths 200..1000 (right padded to 1000), per-example loss = mean
           next-token loss over its real targets
  lm-short the same model, B = 32 x 128 tokens

Timing: methods interleaved in rounds (order rotated each round), warm-up rounds first, median of the timed
rounds; ratios are of the medians. Before timing, gradsight's clipped sum is compared with Opacus' (hooks: the
optimizer's summed_grad after clip_and_accumulate; ghost: p.grad after its double backward) on the same batch.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/privacy_dpsgd.py [--rounds 5] [--warmup 2] [--threads 1]
       [--only mlp,lm-mixed,lm-short] [--out benchmarks/results_privacy_dpsgd.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gradsight.privacy.clip import PerExampleClipper

SIGMA, C, DELTA, LR = 1.0, 1.0, 1e-5, 0.05
IGNORE = -100


# ---------------------------------------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-LN GPT-2-like block: causal self-attention (key padding masked) + GELU MLP, Opacus-supported layers."""

    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):  # x (B, T, d); mask (B, 1, T, T) bool, True = may attend
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # (B, h, T, dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=8192, d=256, layers=4, heads=4, max_len=1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids, attn):  # ids (B, T); attn (B, T) 1 at real tokens
        B, T = ids.shape
        pos = torch.arange(T).unsqueeze(0).repeat(B, 1)  # (B, T): batch-first ids for the per-example hooks
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (causal & attn.bool()[:, None, :]).unsqueeze(1)  # (B, 1, T, T); row 0 always sees key 0
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))  # (B, T, V)


def mlp_case(B=256):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    idx = torch.randperm(len(X))[:B]
    x = torch.tensor(X, dtype=torch.float32)[idx] / 16
    yy = torch.tensor(y)[idx]
    return dict(name=f"digits MLP 64-256-256-10, B={B}", model=model, inputs=(x,), target=yy, tokens=None,
                n=len(X), B=B, lm=False)


def lm_case(lengths, seed=0):
    torch.manual_seed(seed)
    model = TinyGPT()
    B, T = len(lengths), max(lengths)
    ids = torch.randint(1, 8192, (B, T))
    attn = torch.zeros(B, T, dtype=torch.long)
    for i, L in enumerate(lengths):
        attn[i, :L] = 1
    ids[attn == 0] = 0
    tgt = ids[:, 1:].clone()
    tgt[attn[:, 1:] == 0] = IGNORE
    desc = f"GPT-like d=256 x4, vocab 8192, B={B}, lengths {min(lengths)}..{max(lengths)} (padded to {T})"
    return dict(name=desc, model=model, inputs=(ids, attn), target=tgt, tokens=attn.bool(), n=10_000, B=B, lm=True)


# ---------------------------------------------------------------------------------------------------------- losses


def per_example_loss(case, model):
    """(B,) per-example losses: CE (MLP) or mean next-token CE over real targets (LM)."""
    out = model(*case["inputs"])
    if not case["lm"]:
        return F.cross_entropy(out, case["target"], reduction="none")
    lt = F.cross_entropy(out[:, :-1].transpose(1, 2), case["target"], reduction="none", ignore_index=IGNORE)
    return lt.sum(1) / (case["target"] != IGNORE).sum(1)


def ghost_loss(case, model, crit):
    out = model(*case["inputs"])
    if not case["lm"]:
        return crit(out, case["target"])
    logits = out[:, :-1]
    return crit(logits.reshape(-1, logits.shape[-1]), case["target"].reshape(-1), shape=logits.shape)


# ---------------------------------------------------------------------------------------------------------- methods


def make_methods(case):
    """{name: (step callable, clipped-sum reader or None)} on deep copies of the case's model."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    B, methods = case["B"], {}
    loader = DataLoader(TensorDataset(torch.zeros(case["n"], 1)), batch_size=B)  # sets the expected batch size

    m = copy.deepcopy(case["model"])
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    clipper = PerExampleClipper(m, C, log=lambda s: None)
    gen = torch.Generator().manual_seed(1)

    def gradsight_step():
        clipper.step(lambda: per_example_loss(case, m), tokens=case["tokens"])
        for p in m.parameters():  # Opacus' add_noise + scale_grad ("mean": the expected batch size)
            p.grad.add_(torch.randn(p.shape, generator=gen) * (SIGMA * C)).div_(B)
        opt.step()

    def gradsight_sum():
        clipper.step(lambda: per_example_loss(case, m), tokens=case["tokens"])
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    methods["gradsight"] = (gradsight_step, gradsight_sum)

    m2 = copy.deepcopy(case["model"])
    gm, hopt, _ = PrivacyEngine().make_private(module=m2, optimizer=torch.optim.SGD(m2.parameters(), lr=LR),
                                               data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C,
                                               poisson_sampling=False, grad_sample_mode="hooks")

    def hooks_step():
        hopt.zero_grad()
        per_example_loss(case, gm).mean().backward()
        hopt.step()

    def hooks_sum():
        hopt.zero_grad()
        per_example_loss(case, gm).mean().backward()
        hopt.clip_and_accumulate()
        out = {n: p.summed_grad.clone() for n, p in gm._module.named_parameters()}
        hopt.zero_grad()
        return out

    methods["opacus-hooks"] = (hooks_step, hooks_sum)

    m3 = copy.deepcopy(case["model"])
    crit0 = nn.CrossEntropyLoss(ignore_index=IGNORE)
    gg, gopt, crit, _ = PrivacyEngine().make_private(module=m3, optimizer=torch.optim.SGD(m3.parameters(), lr=LR),
                                                     data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C,
                                                     poisson_sampling=False, grad_sample_mode="ghost",
                                                     criterion=crit0)

    def ghost_step():
        gopt.zero_grad()
        ghost_loss(case, gg, crit).backward()
        gopt.step()

    def ghost_sum():
        gopt.zero_grad()
        ghost_loss(case, gg, crit).backward()  # p.grad = sum_e c_e g_e (its second backward)
        out = {n: p.grad.clone() for n, p in gg._module.named_parameters()}
        gopt.zero_grad()
        return out

    methods["opacus-ghost"] = (ghost_step, ghost_sum)

    m4 = copy.deepcopy(case["model"])
    popt = torch.optim.SGD(m4.parameters(), lr=LR)

    def plain_step():
        popt.zero_grad()
        per_example_loss(case, m4).mean().backward()
        popt.step()

    methods["plain"] = (plain_step, None)
    return methods


def epsilon(case, steps=1000):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(SIGMA, case["B"] / case["n"], steps)]
    return acc.get_epsilon(DELTA)


def run_case(case, rounds, warmup):
    methods = make_methods(case)
    ref = methods["gradsight"][1]()
    diffs = {}
    for k in ("opacus-hooks", "opacus-ghost"):
        theirs = methods[k][1]()
        diffs[k] = max((ref[n] - theirs[n]).abs().max().item() for n in ref)
    scale = max(v.abs().max().item() for v in ref.values())
    names = list(methods)
    times = {k: [] for k in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            methods[k][0]()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    eps = epsilon(case)
    res = dict(case=case["name"], B=case["B"], sample_rate=case["B"] / case["n"], sigma=SIGMA, C=C,
               epsilon_1000_steps={"gradsight": eps, "opacus": eps}, delta=DELTA, median_s=med,
               times_s=times, max_abs_diff_clipped_sum=diffs, max_abs_clipped_sum=scale,
               ratio={"gradsight/opacus-hooks": med["gradsight"] / med["opacus-hooks"],
                      "gradsight/opacus-ghost": med["gradsight"] / med["opacus-ghost"],
                      "gradsight/plain": med["gradsight"] / med["plain"]})
    print(f"\n== {case['name']}  (q={res['sample_rate']:.4f}, sigma={SIGMA}, C={C}; eps(1000 steps, delta={DELTA})"
          f" = {eps:.3f} for both)")
    for k in names:
        print(f"  {k:13s} median {med[k] * 1e3:9.1f} ms   ({', '.join(f'{t * 1e3:.0f}' for t in times[k])})")
    for k, v in res["ratio"].items():
        print(f"  {k:24s} {v:.3f}")
    for k, v in diffs.items():
        print(f"  clipped sum max|gradsight - {k}| = {v:.2e}  (max|sum| {scale:.2e})")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default="mlp,lm-mixed,lm-short")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    cases = {"mlp": lambda: mlp_case(),
             "lm-mixed": lambda: lm_case([int(v) for v in torch.linspace(200, 1000, 8).round()]),
             "lm-short": lambda: lm_case([128] * 32)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    out = {k: run_case(cases[k](), a.rounds, a.warmup) for k in a.only.split(",")}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(threads=torch.get_num_threads(), results=out), f, indent=1)


if __name__ == "__main__":
    main()
