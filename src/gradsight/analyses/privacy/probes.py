"""The leakage probes of one audited batch (see compute.py for the flow).

Each probe returns rows of the "recovery" table. Metrics:
- psnr: 10 log10(range^2 / MSE) between each true input and its matched reconstruction (Hungarian matching on
  MSE; an example no candidate matches counts against a zero reconstruction); range = max - min of the batch's
  true inputs (1 for digits scaled to [0, 1]). Averaged over the batch.
- cosine: mean cosine similarity of matched pairs (scale-free; the projected-feature probe recovers x up to scale).
- exact: fraction of the batch's examples (tokens for text) recovered exactly (max |error| <= 1e-4 range; same id).
- precision / recall / f1: of the recovered token SET against the batch's tokens (padding left out).
- label_acc: fraction of the batch's labels recovered (as a multiset).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from ...capture.grads import FactoredGrad
from ...runs.registry import Unit
from .compute import PrivState, first_last_linear, input_embedding, make_batch

__all__ = ["audit_batch", "defended_views", "lookup_gradient_sum"]


class _Recorder:
    """Forward hooks that keep a module's input and (for a grad-requiring output) its output gradient."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for name, m in self.modules.items():
            def hook(mod, args, out, _n=name):
                if torch.is_tensor(args[0]):
                    self.inputs[_n] = args[0].detach()
                if torch.is_tensor(out) and out.requires_grad:
                    out.register_hook(lambda g, _k=_n: self.grads.__setitem__(_k, g.detach()))
                return None

            self.handles.append(m.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _clipped_pass(st: PrivState, batch, C: float, watch: dict):
    """One forward/backward through the ghost clipper: (ClipResult, {param: summed (clipped) gradient}, recorder)."""
    from ...privacy.clip import PerExampleClipper

    model = st.source.model
    rec = _Recorder(watch)

    def losses():
        with rec:
            return st.losses(model, batch)

    tokens = batch.get("attention_mask") if isinstance(batch, dict) else None
    res = PerExampleClipper(model, C, log=st.say_once).step(losses, tokens=tokens)
    sums = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return res, sums, rec


def lookup_gradient_sum(G: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, coefs: torch.Tensor | None,
                        vocab: int) -> torch.Tensor:
    """(V, d) sum_e c_e * (the lookup's own gradient of example e): row v gathers G at the positions holding v.

    G: (B, T, d) gradient of the summed per-example losses w.r.t. the embedding output; ids: (B, T);
    mask: (B, T) real tokens; coefs: (B,) clipping factors (None: 1)."""
    B, T, d = G.shape
    w = torch.ones(B, T, dtype=G.dtype, device=G.device) if mask is None else mask.to(G.dtype)
    if coefs is not None:
        w = w * coefs.to(G.device, G.dtype)[:, None]
    out = torch.zeros(vocab, d, dtype=G.dtype, device=G.device)
    return out.index_add_(0, ids.reshape(-1), (G * w[..., None]).reshape(-1, d))


def defended_views(kind: str, val, plain: dict, clipped: dict | None, C: float, B: int,
                   gen: torch.Generator) -> dict:
    """The batch-mean gradient an observer sees under one defence (dicts of new tensors).

    plain / clipped: summed gradients (clipped: flat at C for clip / dp, per layer at C_l = C / sqrt(L) for
    dp-layer, whose noise std is then sqrt(sum C_l^2) = C as well). Noise is drawn from `gen` in sorted name order."""
    if kind == "none":
        return {n: g / B for n, g in plain.items()}
    if kind == "clip":
        return {n: g / B for n, g in clipped.items()}
    if kind in ("dp", "dp-layer"):  # the DP-SGD release: (clipped sum + N(0, (sigma C)^2 I)) / B
        out = {}
        for n in sorted(clipped):
            g = clipped[n]
            z = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype)
            out[n] = (g + (val * C) * z) / B
        return out
    from ...privacy.defences import transform_for

    tx = transform_for(kind, val, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    grads = {n: g / B for n, g in plain.items()}
    grads, _ = tx.update(grads, tx.init(grads))
    return grads


def _image_rows(x_true: torch.Tensor, x_hat: torch.Tensor) -> dict:
    from ...privacy.metrics import match, psnr

    x_true = x_true.double()
    x_hat = x_hat.double()
    rng = float(x_true.max() - x_true.min()) or 1.0
    full = torch.zeros_like(x_true)
    if x_hat.numel():
        rows_hat, rows_true = match(x_hat, x_true)
        full[torch.as_tensor(rows_true, dtype=torch.long)] = x_hat[torch.as_tensor(rows_hat, dtype=torch.long)]
    p = psnr(full, x_true, data_range=rng)
    cos = torch.nn.functional.cosine_similarity(full, x_true, dim=1, eps=1e-30)
    exact = ((full - x_true).abs().amax(1) <= 1e-4 * rng).double()
    return {"psnr": float(p.mean()), "cosine": float(cos.mean()), "exact": float(exact.mean()),
            "n_true": int(x_true.shape[0]), "n_found": int(x_hat.shape[0])}, full


def _token_row(pred, true, tok) -> dict:
    from ...privacy.metrics import token_scores

    s = token_scores(pred, true)
    names = (lambda ids: " ".join(map(str, tok.convert_ids_to_tokens(sorted(ids)[:40])))) if tok is not None else \
        (lambda ids: " ".join(map(str, sorted(ids)[:40])))
    return {"precision": s["precision"], "recall": s["recall"], "f1": s["f1"], "exact": float(s["exact"]),
            "n_true": len(set(true)), "n_found": len(set(pred)), "sample": names(set(pred)), "truth": names(set(true))}


def audit_batch(st: PrivState, u: Unit) -> tuple[list[dict], dict]:
    cfg, src = st.cfg, st.source
    model = src.model
    B = u.payload["batch_size"]
    batch = make_batch(st, u.payload["members"])
    base = {"unit": u.key, "batch_size": B, "batch": u.payload["batch"]}
    lm = src.kind == "lm"
    emb = input_embedding(model) if lm else None
    first, last = first_last_linear(model) if not lm else (None, None)
    watch = {k: m for k, m in (("embedding", emb), ("first", first and first[1])) if m is not None}
    layer = stored_layer(st) if lm and "store" in st.cfg.probes else None
    if layer is not None:  # the store probe reads this layer's factors from the same pass
        watch["stored"] = dict(model.named_modules())[layer]

    res0, plain, rec = _clipped_pass(st, batch, math.inf, watch)
    norms = res0.norms
    if not bool(torch.isfinite(norms).all()):
        st.say_once("a batch with a non-finite per-example gradient was not audited (flagged rows)")
        return [{**base, "probe": "skipped", "sample": "non-finite gradient"}], {}
    C = float(cfg.clip_norm) if cfg.clip_norm > 0 else float(norms.median())
    if not (math.isfinite(C) and C > 0):
        C = 1.0
    clipped, coefs, layered, lcoefs = None, None, None, None
    if any(k in ("clip", "dp") for _, k, _ in st.defences):
        res, clipped, _ = _clipped_pass(st, batch, C, {})
        coefs = res.coefs
    if any(k == "dp-layer" for _, k, _ in st.defences):
        live = [n for n, p in model.named_parameters() if p.requires_grad]
        res, layered, _ = _clipped_pass(st, batch, {n: C / math.sqrt(len(live)) for n in live}, {})
        emb_name = next((n for n, p in model.named_parameters() if emb is not None and p is emb.weight), None)
        lcoefs = res.coefs[:, live.index(emb_name)] if emb_name in live else None
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(u.key))
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    lookup = None
    if lm and emb is not None and "embedding" in rec.grads:
        ids, G = rec.inputs["embedding"], rec.grads["embedding"]
        V = emb.weight.shape[0]
        lookup = {"plain": lookup_gradient_sum(G, ids, mask, None, V),
                  "clip": lookup_gradient_sum(G, ids, mask, coefs, V) if coefs is not None else None,
                  "layer": lookup_gradient_sum(G, ids, mask, lcoefs, V) if lcoefs is not None else None}
        true_ids = set(ids[mask.bool()].tolist()) if mask is not None else set(ids.reshape(-1).tolist())

    rows, tensors = [], {}
    for spec, kind, val in st.defences:
        d = {**base, "defence": spec, "noise_multiplier": val if kind in ("dp", "dp-layer", "noise") else math.nan,
             "clip_norm": C if kind in ("clip", "dp", "dp-layer") else math.nan}
        view = defended_views(kind, val, plain, layered if kind == "dp-layer" else clipped, C, B, gen)
        if not lm:
            rows += _module_probes(st, d, view, rec, first, last, batch, B, tensors, u.key, spec)
        elif lookup is not None and "tokens" in cfg.probes:
            lc = lookup["layer"] if kind == "dp-layer" else lookup["clip"]
            lk = defended_views(kind, val, {"e": lookup["plain"]}, {"e": lc} if lc is not None else None, C, B,
                                gen)["e"]
            from ...privacy.text import embedding_token_set, token_set_under_noise

            if kind in ("dp", "dp-layer", "noise"):  # threshold rows above the noise floor
                pred = token_set_under_noise(lk, val * C / B if kind != "noise" else val)
            else:
                pred = embedding_token_set(lk)
            rows.append({**d, "probe": "tokens", **_token_row(set(pred.tolist()), true_ids, src.tokenizer)})
            if "tag" in cfg.attacks and B <= 8:
                rows.append({**d, **_tag_row(st, view, batch, pred)})
    if "store" in cfg.probes:
        rows += _store_rows(st, base, batch, rec, first, lm)
    return rows, tensors


def _tag_row(st: PrivState, view: dict, batch: dict, bag: torch.Tensor) -> dict:
    """The TAG-like attack (`privacy.text.tag_attack`) on the defended gradient, its final projection restricted
    to the recovered bag of words (LAMP), scored by ROUGE-1/2 F1 and exact recovery of the real tokens of each
    sequence (Hungarian pairing). The attacker models the loss on every position, labels read off its estimate."""
    from scipy.optimize import linear_sum_assignment

    from ...privacy.metrics import rouge_n
    from ...privacy.text import tag_attack

    cfg, tok = st.cfg, st.source.tokenizer
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    true = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
    cands = bag if bag.numel() else None
    pred = tag_attack(st.source.model, {n: g.detach() for n, g in view.items()}, int(ids.shape[1]),
                      int(ids.shape[0]), iters=cfg.attack_iters, candidates=cands, seed=cfg.seed)
    P = [pred[i][: len(max(true, key=len))].tolist() for i in range(pred.shape[0])]
    gain = [[rouge_n(p[: len(q)], q, 1)["f1"] + rouge_n(p[: len(q)], q, 2)["f1"] for q in true] for p in P]
    r, c = linear_sum_assignment(-torch.tensor(gain).numpy())
    pairs = list(zip(r.tolist(), c.tolist()))
    r1 = sum(rouge_n(P[i][: len(true[j])], true[j], 1)["f1"] for i, j in pairs) / len(true)
    r2 = sum(rouge_n(P[i][: len(true[j])], true[j], 2)["f1"] for i, j in pairs) / len(true)
    exact = sum(P[i][: len(true[j])] == true[j] for i, j in pairs) / len(true)
    text = (lambda x: tok.decode(x) if tok is not None else " ".join(map(str, x)))
    i0, j0 = pairs[0]
    return {"probe": "tag", "rouge1": r1, "rouge2": r2, "exact": exact, "n_true": len(true), "n_found": len(P),
            "sample": text(P[i0][: len(true[j0])])[:300], "truth": text(true[j0])[:300]}


def _module_probes(st, d, view, rec, first, last, batch, B, tensors, key, spec) -> list[dict]:
    from ...privacy import attacks

    cfg = st.cfg
    rows = []
    x_true = rec.inputs.get("first")
    if "analytic" in cfg.probes and first is not None and x_true is not None and x_true.dim() == 2:
        gW, gb = view[f"{first[0]}.weight"], view[f"{first[0]}.bias"]
        x_hat = attacks.analytic_linear_single(gW, gb)[None] if B == 1 else attacks.analytic_linear(gW, gb)[0]
        m, full = _image_rows(x_true, x_hat)
        rows.append({**d, "probe": "analytic", **m})
        tensors[f"{key}/{spec}/analytic/true"] = x_true.double().cpu().contiguous()
        tensors[f"{key}/{spec}/analytic/hat"] = full.cpu().contiguous()
    y = None
    out = st.source.forward(st.source.model, batch) if ("labels" in cfg.probes or cfg.attacks) else None
    if out is not None and torch.is_tensor(out[1]) and not out[1].is_floating_point() and out[1].dim() == 1:
        y = out[1]
    if "labels" in cfg.probes and y is not None and last is not None and last[1].out_features == out[0].shape[-1]:
        gW = view[f"{last[0]}.weight"]
        gb = view.get(f"{last[0]}.bias")
        pred = torch.tensor([attacks.idlg_label(gW)]) if B == 1 else attacks.batch_labels(gW, gb, B)
        hit = sum((Counter(pred.tolist()) & Counter(y.tolist())).values())
        rows.append({**d, "probe": "labels", "label_acc": hit / B, "n_true": B, "n_found": int(pred.numel()),
                     "sample": " ".join(map(str, sorted(pred.tolist()))), "truth": " ".join(map(str, sorted(y.tolist())))})
    if x_true is not None and x_true.dim() == 2 and y is not None and B <= 8:
        for name in cfg.attacks:
            if name not in ("dlg", "ig"):
                continue
            target = {n: g.detach() for n, g in view.items()}
            if name == "dlg":
                x_hat, _ = attacks.dlg(st.source.model, target, tuple(x_true.shape), int(out[0].shape[-1]),
                                       iters=cfg.attack_iters, seed=cfg.seed)
            else:
                x_hat = attacks.inverting_gradients(st.source.model, target, y, tuple(x_true.shape),
                                                    iters=cfg.attack_iters, seed=cfg.seed)
            m, full = _image_rows(x_true, x_hat.detach())
            rows.append({**d, "probe": name, **m})
            tensors[f"{key}/{spec}/{name}/true"] = x_true.double().cpu().contiguous()
            tensors[f"{key}/{spec}/{name}/hat"] = full.cpu().contiguous()
    return rows


def _store_rows(st, base, batch, rec, first, lm) -> list[dict]:
    """What gradsight's own store would reveal about the batch's first example (defence-independent)."""
    from ...privacy import store

    cfg = st.cfg
    d = {**base, "defence": "stored"}
    rows = []
    if not lm:
        x, g = rec.inputs.get("first"), rec.grads.get("first")
        if first is None or x is None or g is None or x.dim() != 2:
            return rows
        rows.append({**d, "probe": "factors", "cosine": 1.0, "exact": 1.0, "n_true": 1, "n_found": 1,
                     "sample": f"A_e of {first[0]} is the input itself"})
        for r in store.projected_leak(x[0], g[0], cfg.projection_sizes, seed=cfg.seed, name=first[0]):
            rows.append({**d, "probe": "projected", "projection": int(r["r_in"]), "cosine": r["cosine"],
                         "exact": float(r["rel_err"] < 1e-5), "n_true": 1, "n_found": 1})
        return rows
    layer = stored_layer(st)
    if layer is None or "stored" not in rec.grads:
        st.say_once("store probe skipped: no block-0 attention projection (q/k/v_proj after an RMSNorm) to probe")
        return rows
    mask = batch["attention_mask"][:1].bool()
    fg = FactoredGrad(A=rec.inputs["stored"][:1], G=rec.grads["stored"][:1], tokens=mask)
    for r in lm_store_probe(st.source.model, fg, batch["input_ids"][0][mask[0]], layer, cfg.projection_sizes,
                            seed=cfg.seed):
        rows.append({**d, "probe": r["probe"], "projection": int(r["r_in"]),
                     **_token_row(r["pred"], r["true"], st.source.tokenizer), "exact": r["exact"]})
    return rows


_ATTN0 = re.compile(r"(^|\.)layers\.0\.self_attn\.(q|k|v)_proj$")


def stored_layer(st: PrivState) -> str | None:
    """The layer whose stored artefacts are probed: the first selected block-0 q/k/v projection (its input is
    RMSNorm(embedding) * gamma), else the model's block-0 q_proj; None for other architectures."""
    names = [li.name for li in st.source.layers if _ATTN0.search(li.name)]
    if not names:
        names = [n for n, _ in st.source.model.named_modules() if _ATTN0.search(n) and n.endswith("q_proj")]
    model = st.source.model
    if not names or getattr(getattr(getattr(model, "model", None), "layers", [None])[0], "input_layernorm",
                                None) is None:
        return None
    return names[0]


def lm_store_probe(model: nn.Module, fg: FactoredGrad, true_ids: torch.Tensor, layer: str, sizes, *, seed: int = 0,
                   r_out: int = 16) -> list[dict]:
    """Token recovery from what gradsight stores for ONE example at a block-0 attention projection: the factor A_e
    (its inputs: `store.factor_token_recovery`) and the projected feature P_out G_e^T A_e P_in^T at each r_in
    (`store.projected_token_recovery`: candidates whose projected input lies in the feature's row space).

    Args:
        fg: the example's factors at `layer` (A (1, T, d_in), G (1, T, d_out), tokens (1, T)), as a capture of the
            audited pass records them; true_ids: its T' real token ids.
    Returns rows {probe, r_in, pred (set), true (set), exact}."""
    from ...measures.projection import ProjectionSpec, Projector
    from ...privacy import store

    m = fg.tokens[0].bool()
    T = int(m.sum())
    pred = store.factor_token_recovery(fg.A[0][m], model)
    rows = [{"probe": "factors", "r_in": 0, "pred": set(pred.tolist()), "true": set(true_ids.tolist()),
             "exact": float((pred == true_ids).double().mean())}]
    cands = store.layer0_candidates(model)
    d_in = fg.A.shape[-1]
    for r in sizes:
        proj = Projector(ProjectionSpec(r_in=int(r), r_out=r_out, seed=seed), dtype=torch.float64)
        feat = proj.layer_features(layer, fg)[0]
        if proj.is_exact(fg):
            feat, P_in = feat.view(-1, d_in), torch.eye(d_in, dtype=torch.float64)
        else:
            feat, P_in = feat.view(r_out, int(r)), proj.matrix(layer, "in", int(r), d_in)
        ids, _ = store.projected_token_recovery(feat, P_in, cands, T)
        got, true = set(ids.tolist()), set(true_ids.tolist())
        rows.append({"probe": "projected", "r_in": int(r), "pred": got, "true": true, "exact": float(got == true)})
    return rows
