"""Text leakage from shared gradients: a tiny causal LM, bag-of-words token recovery and a TAG-like attack.

Bag of words (LAMP, lamp attack.py ``--use_embedding``; breaching ``token_strategy: embedding-norm``): the
input embedding E (V x d) enters the loss only through the lookup e_t = E[id_t], so

    dL/dE[v] = sum_{t : id_t = v} dL/de_t        (exactly zero for every token absent from the batch)

and the rows with a non-zero gradient are the batch's token set, at any batch size -- of the INPUT positions
0..T-2 of each sequence: in a causal LM the last token feeds no prediction (it is only the label of position
T-2), so its row is exactly zero unless it also occurs earlier. With tied embeddings the
shared weight's gradient adds the dense lm_head term sum_t (softmax_t - onehot_t) h_t^T, so every row is non-zero;
gradsight audits the lookup's own term through a hook on the embedding output (`lookup_gradient`).

TAG (Deng et al. 2021; breaching config/attack/tag.yaml): optimise continuous inputs_embeds x so that the
gradient they produce matches the observed one, ||dW(x) - dW*||^2 + scale * ||dW(x) - dW*||_1 summed over all
parameters except the input embedding (whose gradient a continuous input cannot produce), Adam with the input's
gradient clipped to norm 1, then project each position to its nearest embedding row (cosine); LAMP restricts
that projection to the recovered bag of words (`candidates`). The bag misses each sequence's last token; the
lm_head gradient's label rows (`label_token_set`) add it. `discrete_refine` then searches hard tokens (LAMP's
discrete moves) on the exact gradient-matching loss, which is 0 at the truth.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["tiny_lm", "smollm2_tokenizer", "text_corpus_ids", "decode_ids", "causal_lm_loss", "target_gradient",
           "embedding_token_set", "lookup_gradient", "noise_row_threshold", "token_set_under_noise",
           "label_token_set", "tag_attack", "discrete_refine", "text_recovery_scores"]


# ----------------------------------------------------------------------------------------------------------
# model and data


def tiny_lm(vocab_size: int = 2048, hidden: int = 64, layers: int = 2, tie: bool = False, seed: int = 0,
            dtype: torch.dtype = torch.float64, heads: int = 4, intermediate: int | None = None,
            max_positions: int = 256) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (eager attention, eval mode), reproducible from `seed`.

    Args:
        vocab_size, hidden, layers, heads: the Llama config (kv heads = heads); intermediate defaults to 2*hidden.
        tie: tie the input embedding and the lm_head (SmolLM2 is tied).
        seed: torch seed for the initialisation (the global RNG is left untouched).
        dtype: parameter dtype (float64 for exact comparisons).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size < 2 or hidden % heads:
        raise ValueError(f"need vocab_size >= 2 and hidden divisible by heads, got {vocab_size}, {hidden}, {heads}")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie,
                      attn_implementation="eager", pad_token_id=None, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def smollm2_tokenizer():
    """The packaged SmolLM2 tokenizer, read alone from gradsight's de-quantised cache when it exists (else the
    whole model is loaded once through `load_model`, which creates that cache)."""
    from transformers import AutoTokenizer

    from ..inputs.models import gguf_cache_dir, load_model, resolve_model_path

    d, gguf = resolve_model_path("smollm2-135m-instruct")
    cache = gguf_cache_dir(d, gguf) if gguf else d
    if cache is not None and (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    return load_model("smollm2-135m-instruct", dtype="float32", attn_implementation="eager")[1]


def text_corpus_ids(tokenizer, n_seqs: int, seq_len: int, *, vocab_size: int = 2048, sample: str = "calibration",
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-text token windows remapped to a small vocabulary.

    The shipped sample (`gradsight.importance.text.sample_text`) is tokenised once; the vocab_size - 1 most
    frequent ids (ties: smaller id first) become 0..vocab_size-2 by frequency rank, everything else the <unk>
    id vocab_size - 1. The text is cut into consecutive non-overlapping windows and n_seqs of them are drawn
    (seeded), windows with the fewest <unk> first.

    Returns:
        ids: LongTensor (n_seqs, seq_len) in the small vocabulary;
        id_map: LongTensor (vocab_size,), id_map[new] = original tokenizer id, -1 for <unk> and unused ids.
    """
    from ..importance.text import sample_text

    if n_seqs < 1 or seq_len < 2 or vocab_size < 2:
        raise ValueError(f"need n_seqs >= 1, seq_len >= 2, vocab_size >= 2; got {n_seqs}, {seq_len}, {vocab_size}")
    raw = torch.tensor(tokenizer(sample_text(sample), add_special_tokens=False)["input_ids"])  # (L,)
    counts = torch.bincount(raw)  # (max id + 1,)
    order = torch.sort(-counts, stable=True).indices  # most frequent first, smaller id on ties
    kept = order[: min(vocab_size - 1, int((counts > 0).sum()))]
    unk = vocab_size - 1
    lut = torch.full((counts.numel(),), unk, dtype=torch.long)
    lut[kept] = torch.arange(kept.numel())
    id_map = torch.full((vocab_size,), -1, dtype=torch.long)
    id_map[: kept.numel()] = kept
    small = lut[raw]  # (L,)
    n_win = small.numel() // seq_len
    if n_seqs > n_win:
        raise ValueError(f"the sample has {n_win} windows of {seq_len} tokens, fewer than n_seqs={n_seqs}")
    windows = small[: n_win * seq_len].view(n_win, seq_len)  # (n_win, seq_len)
    perm = torch.randperm(n_win, generator=torch.Generator().manual_seed(seed))
    n_unk = (windows[perm] == unk).sum(1)
    chosen = perm[torch.sort(n_unk, stable=True).indices[:n_seqs]]
    return windows[chosen].clone(), id_map


def decode_ids(tokenizer, ids: Sequence[int] | torch.Tensor, id_map: torch.Tensor) -> str:
    """Text of small-vocabulary ids (runs of known ids decoded together; <unk> where id_map is -1)."""
    out, run = [], []
    for i in torch.as_tensor(ids).flatten().tolist():
        orig = int(id_map[i]) if 0 <= i < id_map.numel() else -1
        if orig < 0:
            out.append(tokenizer.decode(run) if run else "")
            out.append("<unk>")
            run = []
        else:
            run.append(orig)
    out.append(tokenizer.decode(run) if run else "")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------
# gradients


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor | None = None, *, inputs_embeds=None,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over all B*(T-1) predicted positions (labels default to the inputs;
    the model shifts them: position t predicts label t+1)."""
    labels = input_ids if labels is None else labels
    return model(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels).loss


def target_gradient(model: nn.Module, input_ids: torch.Tensor, loss_fn: Callable | None = None) -> dict:
    """{parameter name: gradient of the mean batch loss} (FedSGD's shared update), parameters as
    model.named_parameters() lists them (a tied weight once)."""
    loss_fn = loss_fn or causal_lm_loss
    named = dict(model.named_parameters())
    with _requires_grad(named.values()):
        grads = torch.autograd.grad(loss_fn(model, input_ids), list(named.values()))
    return {n: g.detach() for n, g in zip(named, grads)}


@contextlib.contextmanager
def _requires_grad(params):
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def lookup_gradient(model: nn.Module, input_ids: torch.Tensor, loss_fn: Callable | None = None) -> torch.Tensor:
    """The embedding lookup's own gradient (V, d): sum_{t: id_t = v} dL/de_t, scatter-added by token id.

    A forward hook on the input embedding keeps its output e (B, T, d); dL/de is taken by autograd and
    index-added into the rows of the ids. For an untied model this equals the embedding weight's gradient; for
    a tied model it is that gradient minus the lm_head term (what an audit with hooks can separate).
    """
    loss_fn = loss_fn or causal_lm_loss
    emb = model.get_input_embeddings()
    kept = {}

    def hook(module, inputs, out):
        out = out if out.requires_grad else out.detach().requires_grad_(True)
        kept["e"] = out
        return out

    handle = emb.register_forward_hook(hook)
    try:
        loss = loss_fn(model, input_ids)
    finally:
        handle.remove()
    (de,) = torch.autograd.grad(loss, kept["e"])  # (B, T, d)
    V, d = emb.weight.shape
    return torch.zeros(V, d, dtype=de.dtype).index_add_(0, input_ids.flatten(), de.reshape(-1, d))  # (V, d)


# ----------------------------------------------------------------------------------------------------------
# bag of words


def embedding_token_set(grad_embedding: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Ids v (sorted) whose gradient row has ||dL/dE[v]|| > threshold (0: exactly the tokens at input
    positions 0..T-2; a causal LM's last token of a sequence is only a label)."""
    if grad_embedding.dim() != 2:
        raise ValueError(f"the embedding gradient must be (V, d), got shape {tuple(grad_embedding.shape)}")
    return torch.nonzero(grad_embedding.norm(dim=1) > threshold).flatten()


def label_token_set(grad_lm_head: torch.Tensor, ratio: float = 10.0) -> torch.Tensor:
    """Label ids from an untied lm_head gradient (V, d): rows with norm > ratio * median row norm.

    dL/dW_head[v] = (1/N) sum_t (p_t(v) - [y_t = v]) h_t: a label row carries -h_t, any other row only p_t(v) h_t.
    Near initialisation p_t(v) ~ 1/V, so label rows are ~V times larger than the bulk (tiny LM: > 70x the median
    vs < 1.5x for the rest); a trained model blurs this (breaching's decoder-bias strategies estimate counts
    instead). The labels are positions 1..T-1, so with `embedding_token_set` they give the whole text's set.
    """
    norms = grad_lm_head.norm(dim=1)  # (V,)
    return torch.nonzero(norms > ratio * norms.median()).flatten()


def noise_row_threshold(sigma_total: float, d: int, V: int, k: float | None = None, alpha: float = 0.05) -> float:
    """Row-norm threshold tau separating present tokens from pure Gaussian noise.

    A row of an absent token is pure noise n ~ N(0, sigma^2 I_d), so ||n||^2 / sigma^2 ~ chi^2_d and
    P(||n|| > tau) = Q_chi2_d(tau^2 / sigma^2). We set that per-row false-positive rate to p and solve
    tau = sigma * sqrt(chi2.isf(p, d)):
      - k given: p = Phi(-k), a one-sided k-"sigma" rule on the exact chi^2 law (k = 3: p = 0.00135);
      - k None (default): p = alpha / V (Bonferroni), so P(any absent token passes) <= alpha.
    For large d this is tau ~ sigma * sqrt(d + z_p sqrt(2d)), the "k sigma sqrt(d)" rule with the chi^2 spread.
    """
    from scipy.stats import chi2, norm

    if sigma_total < 0 or d < 1 or V < 1:
        raise ValueError(f"need sigma_total >= 0, d >= 1, V >= 1; got {sigma_total}, {d}, {V}")
    if sigma_total == 0:
        return 0.0
    p = float(norm.sf(k)) if k is not None else alpha / V
    return float(sigma_total * math.sqrt(chi2.isf(p, d)))


def token_set_under_noise(grad: torch.Tensor, sigma_total: float, k: float | None = None,
                          alpha: float = 0.05) -> torch.Tensor:
    """Token set from a noisy embedding gradient (entries of noise std sigma_total): rows with norm above
    `noise_row_threshold(sigma_total, d, V, k, alpha)`; sigma_total = 0 gives the exact set."""
    V, d = grad.shape
    return embedding_token_set(grad, noise_row_threshold(sigma_total, d, V, k, alpha))


# ----------------------------------------------------------------------------------------------------------
# TAG


def _nearest(x: torch.Tensor, pool: torch.Tensor, pool_ids: torch.Tensor) -> torch.Tensor:
    """Ids of the pool rows with the largest cosine to each x (..., d)."""
    sims = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(pool, dim=-1).T  # (..., P)
    return pool_ids[sims.argmax(-1)]


def _estimate_loss(model, x, pool, pool_ids, labels: str, beta: float) -> torch.Tensor:
    """The causal-LM loss of the current estimate x (n, T, d) with labels read off x itself.

    hard: labels = nearest pool tokens of x (detached); soft: label distribution q_t = softmax(beta cos(x_t, pool))
    over the pool (differentiable, so the last position, which feeds no prediction, still moves through its role
    as the label of position T-2): loss = mean_t -sum_v q_{t+1, v} log p_t(v)."""
    if labels == "hard":
        return causal_lm_loss(model, inputs_embeds=x, labels=_nearest(x.detach(), pool, pool_ids))
    logp = torch.log_softmax(model(inputs_embeds=x).logits[:, :-1], dim=-1)  # (n, T-1, V)
    sims = nn.functional.normalize(x[:, 1:], dim=-1) @ nn.functional.normalize(pool, dim=-1).T  # (n, T-1, P)
    q = torch.softmax(beta * sims, dim=-1)  # (n, T-1, P)
    return -(q * logp[..., pool_ids]).sum(-1).mean()


def tag_attack(model: nn.Module, target: dict, seq_len: int, n_seqs: int = 1, *, iters: int = 500,
               lr: float = 0.05, scale: float = 0.1, loss: str = "tag", candidates: torch.Tensor | None = None,
               labels: str = "soft", beta: float = 20.0, refine_sweeps: int = 0, refine_evals: int = 3000,
               seed: int = 0, return_info: bool = False, log: Callable[[str], None] | None = None):
    """TAG-like reconstruction of a causal-LM batch from its mean gradient.

    Loss over every parameter in `target` except the input embedding (breaching tag.yaml):
        "tag": sum_p ||dW_p(x) - dW*_p||^2 + scale * ||dW_p(x) - dW*_p||_1   (breaching tag_scale 0.1)
        "cos": 1 - <dW(x), dW*> / (||dW(x)|| ||dW*||) over the concatenated gradients (LAMP's cosine).
    x: inputs_embeds (n_seqs, seq_len, d), random init N(0, std(E)^2); Adam(lr), input gradient clipped to norm
    1, step decay x0.1 at 3/8, 5/8, 7/8 of `iters` (breaching's step-lr); the best iterate by loss is kept.

    Labels (our choice): a causal LM's labels are its own inputs shifted, unknown to the attacker, so they are
    read off the estimate itself (`_estimate_loss`): "soft" (default) q_t = softmax(beta cos(x_t, E)), which
    keeps the last position trainable (it feeds no prediction, only the label of position T-2: with "hard"
    nearest-token labels it gets no gradient and stays at its random start); "hard" the detached nearest
    tokens. On 1 x 4-token problems soft (beta 20) recovered 2 of 3 sequences exactly, hard none (the last token
    always wrong). breaching instead reads an unordered label set from the embedding/decoder-bias gradients
    (token_strategy); with `candidates` both the labels and the final projection are restricted to that bag of
    words, as LAMP does.

    refine_sweeps > 0 follows with `discrete_refine` over the same pool (at most refine_evals trials per sequence
    and sweep; LAMP alternates continuous and discrete steps, we do the discrete ones once at the end).

    Returns:
        ids LongTensor (n_seqs, seq_len); with return_info also dict(loss=[per-iteration], x=final embeddings).
    """
    if loss not in ("tag", "cos") or labels not in ("soft", "hard"):
        raise ValueError(f"loss must be 'tag' or 'cos' and labels 'soft' or 'hard', got {loss!r}, {labels!r}")
    if iters < 1 or seq_len < 2 or n_seqs < 1:
        raise ValueError(f"need iters >= 1, seq_len >= 2, n_seqs >= 1; got {iters}, {seq_len}, {n_seqs}")
    emb_w = model.get_input_embeddings().weight
    named = dict(model.named_parameters())
    names = [n for n in target if n in named and named[n] is not emb_w]
    if not names:
        raise ValueError("the target gradient has no parameter besides the input embedding")
    params, tgt = [named[n] for n in names], [target[n].to(emb_w.dtype) for n in names]
    E = emb_w.detach()  # (V, d)
    pool_ids = torch.arange(E.shape[0]) if candidates is None else torch.as_tensor(candidates).long().flatten()
    pool = E[pool_ids]  # (P, d)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n_seqs, seq_len, E.shape[1], generator=gen, dtype=E.dtype) * E.std()).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)], 0.1)
    tnorm = torch.sqrt(sum((t * t).sum() for t in tgt))
    history, best, best_x = [], math.inf, x.detach().clone()
    with _requires_grad(params):
        for it in range(iters):
            grads = torch.autograd.grad(_estimate_loss(model, x, pool, pool_ids, labels, beta), params,
                                        create_graph=True)
            if loss == "tag":
                rec = sum((g - t).pow(2).sum() + scale * (g - t).abs().sum() for g, t in zip(grads, tgt))
            else:
                dot = sum((g * t).sum() for g, t in zip(grads, tgt))
                gnorm = torch.sqrt(sum((g * g).sum() for g in grads))
                rec = 1 - dot / (gnorm * tnorm + 1e-30)
            (gx,) = torch.autograd.grad(rec, x)
            value = float(rec.detach())
            history.append(value)
            if value < best:
                best, best_x = value, x.detach().clone()
            x.grad = gx * min(1.0, 1.0 / (float(gx.norm()) + 1e-12))  # clip the input gradient to norm 1
            opt.step()
            sched.step()
            if log is not None and (it % max(1, iters // 5) == 0 or it == iters - 1):
                log(f"tag iter {it}: loss {value:.4g}")
    ids = _nearest(best_x, pool, pool_ids)  # (n_seqs, seq_len)
    if refine_sweeps:
        ids = discrete_refine(model, target, ids, pool_ids, x=best_x, sweeps=refine_sweeps, max_evals=refine_evals,
                              scale=scale, log=log)
    return (ids, {"loss": history, "x": best_x}) if return_info else ids


def _seq_grads(model, params, ids_row) -> list[torch.Tensor]:
    with _requires_grad(params):
        return [g.detach() for g in torch.autograd.grad(causal_lm_loss(model, ids_row.view(1, -1)), params)]


def _moves(row: torch.Tensor, options: list[list[int]]) -> list[torch.Tensor]:
    """Candidate rows: every sub-range [i, j] rolled by every amount (moves a token or a block elsewhere; the
    whole row rolled by +-1 first), a proposal inserted at t (suffix shifted right, last token dropped), a
    proposal substituted at t (LAMP's swap / move transformations)."""
    T, out = row.numel(), [row.roll(1), row.roll(-1)]
    for i in range(T):
        for j in range(i + 1, T):
            out += [torch.cat([row[:i], row[i:j + 1].roll(k), row[j + 1:]]) for k in range(1, j - i + 1)]
    for t in range(T):
        for v in options[t]:
            out.append(torch.cat([row[:t], torch.tensor([v]), row[t:-1]]))
            if v != int(row[t]):
                out.append(row.clone().index_fill_(0, torch.tensor(t), v))
    return out


def discrete_refine(model: nn.Module, target: dict, ids: torch.Tensor, pool_ids: torch.Tensor, *,
                    x: torch.Tensor | None = None, top_k: int = 8, sweeps: int = 2, max_evals: int = 3000,
                    scale: float = 0.1, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """Greedy discrete search on hard tokens (LAMP's discrete transformations, simplified): minimise the exact
    TAG loss sum_p ||dW_p(ids) - dW*_p||^2 + scale ||.||_1 over EVERY observed parameter (the input embedding
    included: with hard tokens its gradient is reproducible), which is 0 at the truth of a noiseless target.

    Per sequence, first-improvement local search over `_moves` (rolls undo the one-position shifts that RoPE's
    relative positions make nearly free; moves/insertions repair dropped or duplicated tokens); the list is
    rebuilt after each accepted move; a sequence stops after a full pass without gain or max_evals trials.
    Proposals: the whole pool when it has at most 3*top_k tokens, else the top_k pool tokens nearest (cosine)
    to the continuous estimate x at positions t-1..t+1. Sequences have equal length, so the mean gradient is
    the mean of per-sequence gradients and a trial re-runs only its own sequence. `sweeps` passes over the batch;
    the search ends early once the loss is below 1e-12 of its value at a zero gradient (matched exactly).
    """
    named = dict(model.named_parameters())
    names = [n for n in target if n in named]
    params, tgt = [named[n] for n in names], [target[n] for n in names]
    cur, (n, T) = ids.clone(), ids.shape
    per = [_seq_grads(model, params, cur[b]) for b in range(n)]
    total = [sum(p[i] for p in per) / n for i in range(len(params))]

    def cost(tot):
        return float(sum((g - t).pow(2).sum() + scale * (g - t).abs().sum() for g, t in zip(tot, tgt)))

    best, done = cost(total), 1e-12 * cost([torch.zeros_like(t) for t in tgt])  # done: the gradient is matched
    pool_ids = torch.as_tensor(pool_ids).long()
    small = x is None or pool_ids.numel() <= 3 * top_k
    if not small:
        E = model.get_input_embeddings().weight.detach()[pool_ids]  # (P, d)
        sims = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(E, dim=-1).T  # (n, T, P)
        near = pool_ids[sims.topk(min(top_k, pool_ids.numel()), dim=-1).indices]  # (n, T, k)
    for sweep in range(sweeps):
        start = best
        for b in range(n):
            options = [pool_ids.tolist() if small else sorted(set(near[b, max(t - 1, 0):t + 2].flatten().tolist()))
                       for t in range(T)]
            moves, i, idle, evals = _moves(cur[b], options), 0, 0, 0
            while idle < len(moves) and evals < max_evals and best > done:
                row = moves[i % len(moves)]
                i, evals = i + 1, evals + 1
                gb = _seq_grads(model, params, row)
                tot = [t + (g - o) / n for t, g, o in zip(total, gb, per[b])]
                c = cost(tot)
                if c < best:
                    best, per[b], total, idle = c, gb, tot, 0
                    cur[b] = row
                    moves = _moves(cur[b], options)
                else:
                    idle += 1
        if log is not None:
            log(f"refine sweep {sweep}: loss {start:.4g} -> {best:.4g}")
        if best >= start or best <= done:
            break
    return cur


# ----------------------------------------------------------------------------------------------------------
# scores


def text_recovery_scores(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """Scores of recovered sequences (n, T) against the truth (n, T).

    Sequences are paired by a Hungarian assignment maximising ROUGE-1 F1 + ROUGE-2 F1 (LAMP matches its
    reconstructions to the batch the same way). Returns exact (fraction of sequences recovered exactly),
    position accuracy (matched pairs), token precision / recall / F1 of the whole batch's token set, and mean
    ROUGE-1 / ROUGE-2 F1 over the matched pairs.
    """
    from scipy.optimize import linear_sum_assignment

    from .metrics import rouge_n, token_scores

    pred, true = torch.as_tensor(pred).long(), torch.as_tensor(true).long()
    if pred.dim() != 2 or true.dim() != 2:
        raise ValueError(f"pred and true must be (n, T), got {tuple(pred.shape)} and {tuple(true.shape)}")
    P, Q = pred.tolist(), true.tolist()
    gain = torch.tensor([[rouge_n(p, q, 1)["f1"] + rouge_n(p, q, 2)["f1"] for q in Q] for p in P])
    rows, cols = linear_sum_assignment(-gain.numpy())
    pairs = list(zip(rows.tolist(), cols.tolist()))
    bag = token_scores(pred.flatten().tolist(), true.flatten().tolist())
    n = max(len(pairs), 1)
    return {
        "exact": sum(P[i] == Q[j] for i, j in pairs) / len(Q),
        "position_acc": sum(sum(a == b for a, b in zip(P[i], Q[j])) for i, j in pairs) / (len(Q) * len(Q[0])),
        "token_precision": bag["precision"], "token_recall": bag["recall"], "token_f1": bag["f1"],
        "rouge1": sum(rouge_n(P[i], Q[j], 1)["f1"] for i, j in pairs) / n,
        "rouge2": sum(rouge_n(P[i], Q[j], 2)["f1"] for i, j in pairs) / n,
    }
