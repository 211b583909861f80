"""Per-example gradient clipping without per-example gradients (ghost norms + book-keeping sums), DP-SGD style.

One forward and ONE backward of the summed per-example losses with every parameter frozen; forward hooks record
each module's input and the gradient of its output. Per example e and parameter tensor p (Opacus semantics,
opacus/optimizers/optimizer.py `clip_and_accumulate`, perlayeroptimizer.py):

    flat       c_e = min(1, C / (||g_e|| + 1e-6)),        ||g_e||^2 = sum_p ||g_{e,p}||^2
    per-layer  c_{e,p} = min(1, C_p / (||g_{e,p}|| + 1e-6))
    p.grad  <- sum_e c_e g_{e,p}        (the clipped SUM; it OVERWRITES p.grad, it does not accumulate)

Per-example squared norms ||g_{e,p}||^2 by module kind, never forming the (B, *shape) per-example gradients:
- Linear / HF Conv1D weight, M_e = G_e^T A_e: the cheaper per example of "ghost" sum(K_a * K_g) (K = X X^T, T x T,
  Li et al. 2022 / opacus grad_sample/linear.py) and "dense" ||G^T A||_F^2 (gradsight.capture.linalg
  `factored_sq_norms`); bias ||sum_t G_t||^2.
- Embedding (V, d): g_e = sum_s onehot(id_s) G_s^T, so ||g_e||^2 = sum_{s,t} [id_s == id_t] G_s . G_t, computed as
  sum over distinct ids v of ||sum_{s: id_s = v} G_s||^2 (a segment sum, O(T d) instead of the Gram's O(T^2 d));
  tokens with id == padding_idx get no gradient (torch semantics), so they are dropped.
- A tensor used at several sites (tied embed_tokens / lm_head, a module called twice): g_e = sum_k g_e^k, so
  ||g_e||^2 = sum_k ||g_e^k||^2 + 2 sum_{k<l} <g_e^k, g_e^l>. Linear sites concatenate their tokens (one factored
  M_e); the Embedding x Linear cross term of weights W (V, d) is
      <sum_s onehot(id_s) G1_s^T, G2^T A2> = sum_{t,s} G2[t, id_s] (A2_t . G1_s).
- Any other module with trainable direct parameters (RMSNorm, LayerNorm, ...): per-example gradients by torch.func
  (vmap of the module's vjp over the batch, gradsight.capture.func); small. A module type outside these routes
  (not a norm layer) falls back to the same torch.func route, which is said once through `log` (or warnings.warn).
Clipped sums by book-keeping: Linear (c * G)^T A (one GEMM), bias sum_e c_e sum_t G_{e,t}, Embedding index_add of
c_e G rows, torch.func modules sum_e c_e g_e. Padded tokens (tokens mask False) contribute nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..capture.hooks import is_conv1d
from ..capture.linalg import NORM_ROUTES, factored_sq_norms

__all__ = ["PerExampleClipper", "ClipResult", "per_example_grads_loop", "clip_reference", "clip_coefs"]

EPS = 1e-6  # Opacus' denominator guard: c = C / (||g|| + 1e-6)


@dataclass
class ClipResult:
    """What one clipping step measured.

    Attributes:
        norms: (B,) float64 per-example gradient norms before clipping (whole model, over the clipped tensors).
        coefs: (B,) flat clip factors, or (B, L) per-layer factors in the order of `layer_norms`.
        layer_norms: {param name: (B,) float64} per-tensor per-example norms.
    """

    norms: torch.Tensor
    coefs: torch.Tensor
    layer_norms: dict[str, torch.Tensor]


def clip_coefs(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' factors c = min(1, C / (norm + 1e-6)) (float64); C = inf gives 1."""
    return (max_grad_norm / (norms.double() + EPS)).clamp(max=1.0)


def _check_bound(max_grad_norm, names: list[str]) -> None:
    if isinstance(max_grad_norm, dict):
        missing = [n for n in names if n not in max_grad_norm]
        if missing:
            raise ValueError(f"per-layer max_grad_norm has no bound for parameter(s) {missing[:5]}")
        bad = {n: c for n, c in max_grad_norm.items() if not c > 0}
    else:
        bad = {"max_grad_norm": max_grad_norm} if not max_grad_norm > 0 else {}
    if bad:
        raise ValueError(f"max_grad_norm must be > 0 (may be inf), got {bad}")


def _is_norm_layer(m: nn.Module) -> bool:
    return "Norm" in type(m).__name__  # LayerNorm, GroupNorm, LlamaRMSNorm, ...: the expected torch.func route


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear) or is_conv1d(m):
        return "linear"
    return "embedding" if isinstance(m, nn.Embedding) else "func"


class _Call:
    """One recorded module call: positional args, kwargs (detached) and the gradients of its tensor outputs."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs, self.grads = args, kwargs, {}


def _detach(v):
    return v.detach() if torch.is_tensor(v) else v


class PerExampleClipper:
    """Per-example clipping of a model's gradient from one forward/backward (see the module docstring).

    Args:
        model: examples must not interact in the forward (eval mode, no BatchNorm statistics in train mode).
        max_grad_norm: float C (flat clipping over all clipped tensors) or {param name: C_p} (per-layer, one bound
            per parameter tensor, Opacus' clipping="per_layer"); inf disables clipping.
        params: names (model.named_parameters()) to clip; default all. Parameters whose requires_grad is False at
            step time are skipped (their p.grad is left alone), as are parameters not listed.
        route: Linear weight norm route, one of linalg.NORM_ROUTES ("auto": cheaper of ghost and dense per example).
        log: callable(str) for the one-time torch.func fallback note (default warnings.warn).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float | dict[str, float], *, params: list[str] | None = None,
                 route: str = "auto", log: Callable[[str], None] | None = None):
        if route not in NORM_ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {NORM_ROUTES}")
        self.model, self.max_grad_norm, self.route, self.log = model, max_grad_norm, route, log
        named = dict(model.named_parameters())
        if params is not None:
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"no parameter named {unknown[0]!r} in the model")
        self.params = {n: p for n, p in named.items() if params is None or n in params}
        pname = {id(p): n for n, p in self.params.items()}
        # sites: module name -> (module, kind, [(attribute, canonical param name)]); tied tensors have several
        self.sites: dict[str, tuple[nn.Module, str, list[tuple[str, str]]]] = {}
        for mname, m in model.named_modules():
            own = [(a, pname[id(p)]) for a, p in m.named_parameters(recurse=False) if id(p) in pname]
            if own:
                self.sites[mname] = (m, _kind(m), own)
        self._said = False

    # ------------------------------------------------------------------------------------------------------
    def step(self, per_example_loss: Callable[[], torch.Tensor], tokens: torch.Tensor | None = None) -> ClipResult:
        """One forward/backward; writes the clipped sum sum_e c_e g_e into p.grad (overwriting) and returns norms.

        Args:
            per_example_loss: no-argument callable running the forward and returning the (B,) per-example losses;
                their SUM is backpropagated with all parameters frozen (restored afterwards).
            tokens: optional (B, T) mask, True at real tokens; module inputs / output gradients of shape (B, T, ...)
                are zeroed at padded tokens (they contribute nothing to norms or sums).
        """
        live = {n: p for n, p in self.params.items() if p.requires_grad}
        _check_bound(self.max_grad_norm, list(live))
        sites = {k: (m, kind, [(a, n) for a, n in own if n in live])
                 for k, (m, kind, own) in self.sites.items()}
        sites = {k: v for k, v in sites.items() if v[2]}
        self._say(sites)
        calls, B = self._record(sites, per_example_loss, None if tokens is None else tokens.shape[0])
        mask = None if tokens is None else tokens.bool()
        parts = {n: {"lin": [], "emb": [], "dense": []} for n in live}
        for k, (m, kind, own) in sites.items():
            for call in calls[k]:
                _add_parts(parts, m, kind, own, call, mask)
        layer_sq = {n: _sq_norm(parts[n], B, self.route, p.shape[0] if p.dim() else 1) for n, p in live.items()}
        layer_norms = {n: v.sqrt() for n, v in layer_sq.items()}
        total = torch.zeros(B, dtype=torch.float64)
        for v in layer_sq.values():
            total = total + v
        norms = total.sqrt()
        if isinstance(self.max_grad_norm, dict):
            coefs = {n: clip_coefs(layer_norms[n], self.max_grad_norm[n]) for n in live}
            coef_out = torch.stack([coefs[n] for n in live], 1) if live else torch.ones(B, 0, dtype=torch.float64)
        else:
            coef_out = clip_coefs(norms, self.max_grad_norm)
            coefs = {n: coef_out for n in live}
        for n, p in live.items():
            p.grad = _clipped_sum(parts[n], coefs[n], p)
        return ClipResult(norms=norms, coefs=coef_out, layer_norms=layer_norms)

    def _say(self, sites) -> None:
        odd = sorted({type(m).__name__ for m, kind, _ in sites.values() if kind == "func" and not _is_norm_layer(m)})
        if odd and not self._said:
            msg = (f"PerExampleClipper: no factored route for module type(s) {', '.join(odd)}; their per-example "
                   "gradients go through torch.func (materialised per module, exact but slower)")
            (self.log or (lambda s: warnings.warn(s, stacklevel=3)))(msg)
            self._said = True

    def _record(self, sites, per_example_loss, batch: int | None):
        """Run the forward/backward with frozen parameters and hooks; returns ({module name: [_Call]}, B).

        A call broadcast over the batch (tensor output with batch dim 1 while the batch has B > 1 examples, e.g.
        GPT-2's position embedding of (1, T) ids) is expanded to B in the forward (same values, so the same
        model output) so that its output gradient stays per example. B is `batch` (tokens.shape[0]) or else the
        largest batch dim of the calls seen so far."""
        calls = {k: [] for k in sites}
        seen = [batch or 1]
        flags = {p: p.requires_grad for p in self.model.parameters()}
        handles = []

        def make_hook(k):
            def hook(mod, args, kwargs, out):
                if not torch.is_grad_enabled():
                    return None
                if torch.is_tensor(out) and out.dim() > 0:
                    if out.shape[0] == 1 and seen[0] > 1:  # broadcast over the batch: make it per example
                        out = out.expand(seen[0], *out.shape[1:])
                        args = tuple(a.expand(seen[0], *a.shape[1:]) if torch.is_tensor(a) and a.dim() > 0 and
                                     a.shape[0] == 1 else a for a in args)
                    elif batch is None:
                        seen[0] = max(seen[0], out.shape[0])
                call = _Call(tuple(_detach(a) for a in args), {a: _detach(v) for a, v in kwargs.items()})
                calls[k].append(call)
                if not (torch.is_tensor(out) or isinstance(out, (tuple, list))):
                    raise ValueError(f"{type(mod).__name__} returns {type(out).__name__}; PerExampleClipper needs "
                                     "a tensor or a tuple of tensors from a module owning clipped parameters")
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                for i, o in enumerate(outs):
                    if torch.is_tensor(o) and o.is_floating_point():
                        if not o.requires_grad:  # frozen weights: start the graph here
                            outs[i] = o = o.detach().requires_grad_(True)
                        o.register_hook(lambda g, i=i: call.grads.__setitem__(i, g.detach()))
                if torch.is_tensor(out):
                    return outs[0]
                return type(out)(*outs) if hasattr(out, "_fields") else type(out)(outs)
            return hook

        try:
            for p in flags:
                p.requires_grad_(False)
            for k, (m, _, _) in sites.items():
                handles.append(m.register_forward_hook(make_hook(k), with_kwargs=True))
            losses = per_example_loss()
            if losses.dim() != 1:
                raise ValueError(f"per_example_loss must return (B,) losses, got shape {tuple(losses.shape)}")
            if losses.requires_grad:
                losses.sum().backward()
            for k, cs in calls.items():
                for c in cs:
                    g = c.grads.get(0)
                    if g is not None and g.dim() > 0 and g.shape[0] != losses.shape[0]:
                        raise ValueError(f"module {k!r} ran on batch dim {g.shape[0]}, not the {losses.shape[0]} "
                                         "examples; pass tokens= (B, T) so that broadcast calls are expanded")
        finally:
            for h in handles:
                h.remove()
            for p, f in flags.items():
                p.requires_grad_(f)
        return calls, losses.shape[0]


# ----------------------------------------------------------------------------------------------------------
# per-site parts: ("lin": (A, G) in the weight's orientation, "emb": (ids, G), "dense": (B, *shape))


def _token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) mask of x's first two dims if x is (B, T, ...) like `mask`, else None (all real)."""
    if mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask.to(x.device)
    return None


def _btd(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2) if x.dim() > 3 else x  # (B, T, d)


def _add_parts(parts, m, kind, own, call: _Call, mask) -> None:
    if not call.grads:
        return  # the call's output did not reach the loss: zero gradient
    if kind == "func":
        for a, gr in _func_grads(m, [a for a, _ in own], call, mask).items():
            parts[dict(own)[a]]["dense"].append(gr)
        return
    g = call.grads.get(0)
    if g is None:
        return
    x = call.args[0] if call.args else call.kwargs.get("input")
    if x is None:
        raise ValueError(f"{type(m).__name__}: expected the input as first positional argument")
    tm = _token_mask(g, mask)
    if tm is not None:
        g = g * tm.unsqueeze(-1).to(g.dtype)  # (B, T, d_out) zero at padded tokens
    if kind == "embedding":
        ids = x.reshape(x.shape[0], -1)  # (B, T)
        G = g.reshape(g.shape[0], -1, g.shape[-1])  # (B, T, d)
        keep = torch.ones_like(ids, dtype=torch.bool) if tm is None else tm.reshape(ids.shape)
        if m.padding_idx is not None:
            keep = keep & (ids != m.padding_idx)  # torch gives the padding row no gradient
        parts[dict(own)["weight"]]["emb"].append((ids, G * keep.unsqueeze(-1).to(G.dtype)))
        return
    A, G = _btd(x), _btd(g)  # (B, T, d_in), (B, T, d_out)
    for a, n in own:
        if a == "weight":
            T = A.shape[1]
            tmk = tm.reshape(tm.shape[0], -1) if tm is not None and tm[0].numel() == T else None
            parts[n]["lin"].append((G, A.to(G.dtype), tmk) if is_conv1d(m) else (A.to(G.dtype), G, tmk))
        elif a == "bias":
            parts[n]["dense"].append(G.sum(1))  # (B, d_out)


def _func_grads(m: nn.Module, names: list[str], call: _Call, mask) -> dict[str, torch.Tensor]:
    """Per-example gradients {attr: (B, *shape)} of m's direct parameters `names` for one call, by vmap of the
    module's vjp over every tensor argument whose first dim is the batch (gradsight.capture.func, generalised to
    several inputs / outputs)."""
    idx = sorted(call.grads)
    gs = []
    for i in idx:
        g = call.grads[i]
        tm = _token_mask(g, mask)
        gs.append(g if tm is None else g * tm.view(*tm.shape, *([1] * (g.dim() - 2))).to(g.dtype))
    B = gs[0].shape[0]
    keys = list(range(len(call.args))) + list(call.kwargs)
    vals = list(call.args) + list(call.kwargs.values())
    bat = [i for i, v in enumerate(vals) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B]
    theta = {n: getattr(m, n).detach() for n in names}

    def one(bvals, gvals):
        full = list(vals)
        for j, v in zip(bat, bvals):
            full[j] = v.unsqueeze(0)
        args = [full[i] for i, k in enumerate(keys) if isinstance(k, int)]
        kwargs = {k: full[i] for i, k in enumerate(keys) if not isinstance(k, int)}

        def f(th):
            out = functional_call(m, th, tuple(args), kwargs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            return tuple(outs[i] for i in idx)

        _, pull = vjp(f, theta)
        (gr,) = pull(tuple(g.unsqueeze(0) for g in gvals))
        return gr

    return vmap(one)([vals[j] for j in bat], gs)


# ----------------------------------------------------------------------------------------------------------
# norms and clipped sums of one parameter from its parts


def _cat_lin(lin):
    """(A, G, tokens) of all Linear sites of a tensor, tokens concatenated (M_e = sum over sites of G^T A)."""
    if len(lin) == 1:
        return lin[0]
    A = torch.cat([a for a, _, _ in lin], 1)  # (B, sum T, d_in)
    G = torch.cat([g for _, g, _ in lin], 1)
    tm = torch.cat([torch.ones(a.shape[:2], dtype=torch.bool, device=a.device) if t is None else t
                    for a, _, t in lin], 1)
    return A, G, tm


def _cat_emb(emb):
    return (torch.cat([i for i, _ in emb], 1), torch.cat([g for _, g in emb], 1)) if len(emb) > 1 else emb[0]


def _row_sq(X: torch.Tensor) -> torch.Tensor:
    """(B,) float64 squared row norms of X (B, n), the norm taken in X's precision (at least float32)."""
    return torch.linalg.vector_norm(X.to(torch.promote_types(X.dtype, torch.float32)), dim=1).double().square()


DENSE_CHUNK = 1 << 25  # elements of materialised (n, d_out, d_in) per chunk of the dense norm route


def _lin_sq_equal(A: torch.Tensor, G: torch.Tensor, route: str) -> torch.Tensor:
    """(B,) ||G_e^T A_e||_F^2 for examples of one length T, one batched route: "ghost" sum(K_a * K_g) costs
    T^2 (d_in + d_out), "dense" ||G^T A||_F^2 costs T d_in d_out ("auto": the cheaper). Products in the factors'
    precision (at least float32, like Opacus' norm samplers; a float32 Gram's relative error ~1e-7 only moves the
    norm by as much), sums in float64."""
    B, T, d_in = A.shape
    d_out = G.shape[-1]
    wd = torch.promote_types(A.dtype, torch.float32)
    A, G = A.to(wd), G.to(wd)
    if T == 1:
        return _row_sq(A[:, 0]) * _row_sq(G[:, 0])  # rank one: ||a||^2 ||g||^2
    if route == "auto":
        route = "ghost" if T * (d_in + d_out) < d_in * d_out else "dense"
    if route == "ghost":
        Ka, Kg = A @ A.transpose(1, 2), G @ G.transpose(1, 2)  # (B, T, T)
        return (Ka * Kg).sum((1, 2), dtype=torch.float64)
    out, n = [], max(1, DENSE_CHUNK // (d_in * d_out))
    for i in range(0, B, n):
        M = G[i:i + n].transpose(1, 2) @ A[i:i + n]  # (n, d_out, d_in)
        out.append(torch.linalg.vector_norm(M, dim=-1).double().square().sum(-1))
    return torch.cat(out)


def _lin_sq(A: torch.Tensor, G: torch.Tensor, tm: torch.Tensor | None, route: str) -> torch.Tensor:
    """(B,) ||G_e^T A_e||_F^2 (G zero at padded tokens). Right-padded batches: one batched call per distinct real
    length at that length (padding costs nothing); other masks: linalg.factored_sq_norms (per example, float64)."""
    if tm is None or A.shape[1] == 1 or bool(tm.all()):
        return _lin_sq_equal(A, G, route)
    n = tm.sum(1)  # (B,) real lengths
    if not bool((tm == (torch.arange(tm.shape[1], device=tm.device) < n.unsqueeze(1))).all()):
        return factored_sq_norms(A, G, tokens=tm, route=route)
    out = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
    for L in torch.unique(n).tolist():
        if L > 0:
            rows = (n == L).nonzero().squeeze(1)
            out[rows] = _lin_sq_equal(A[rows, :L], G[rows, :L], route)
    return out


def _emb_sq(ids: torch.Tensor, G: torch.Tensor, V: int) -> torch.Tensor:
    """(B,) sum_{s,t}[id_s == id_t] G_s . G_t as a segment sum over distinct (example, id) keys."""
    B = ids.shape[0]
    keys = (torch.arange(B, device=ids.device).unsqueeze(1) * V + ids).reshape(-1)  # (B T,)
    uniq, inv = torch.unique(keys, return_inverse=True)
    R = torch.zeros(uniq.numel(), G.shape[-1], dtype=torch.float64, device=G.device)
    R.index_add_(0, inv, G.reshape(-1, G.shape[-1]).double())  # (n_unique, d) summed rows
    return torch.zeros(B, dtype=torch.float64, device=G.device).index_add_(0, uniq // V, R.pow(2).sum(1))


def _emb_lin_cross(ids, G1, A2, G2) -> torch.Tensor:
    """(B,) <sum_s onehot(id_s) G1_s^T, G2^T A2> = sum_{t,s} G2[t, id_s] (A2_t . G1_s), example by example."""
    out = torch.zeros(ids.shape[0], dtype=torch.float64)
    for e in range(ids.shape[0]):
        P = G2[e].double().index_select(1, ids[e])  # (T2, T1): G2[t, id_s]
        Q = A2[e].double() @ G1[e].double().T  # (T2, T1): A2_t . G1_s
        out[e] = (P * Q).sum()
    return out


def _dense_lin(D, A, G):
    return ((G.double() @ D.double()) * A.double()).sum((1, 2))  # sum_t G_t^T D A_t


def _dense_emb(D, ids, G):
    rows = D.double().gather(1, ids.unsqueeze(-1).expand(*ids.shape, D.shape[-1]))  # (B, T, d): D[id_s]
    return (rows * G.double()).sum((1, 2))


def _sq_norm(pp: dict, B: int, route: str, V: int) -> torch.Tensor:
    """(B,) float64 squared norm of the per-example gradient summed over a parameter's sites (cross terms)."""
    out = torch.zeros(B, dtype=torch.float64)
    lin = _cat_lin(pp["lin"]) if pp["lin"] else None
    emb = _cat_emb(pp["emb"]) if pp["emb"] else None
    D = None
    for d in pp["dense"]:
        D = d if D is None else D + d
    if lin is not None:
        A, G, tm = lin
        out += _lin_sq(A, G, tm, route)
    if emb is not None:
        out += _emb_sq(*emb, V)
    if D is not None:
        out += _row_sq(D.reshape(B, -1))
    if lin is not None and emb is not None:
        out += 2 * _emb_lin_cross(emb[0], emb[1], *lin[:2])
    if D is not None and lin is not None:
        out += 2 * _dense_lin(D, *lin[:2])
    if D is not None and emb is not None:
        out += 2 * _dense_emb(D, *emb)
    return out.clamp_min(0)


def _clipped_sum(pp: dict, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_e c_e g_e of one parameter, by book-keeping on its parts, in p's dtype and shape."""
    terms = []
    for A, G, tm in pp["lin"]:
        cG = (G * c.to(G.dtype).view(-1, 1, 1)).reshape(-1, G.shape[-1])  # (B T, d_out)
        A = A.reshape(-1, A.shape[-1])  # (B T, d_in)
        if tm is not None and not bool(tm.all()):  # only real tokens enter the GEMM
            keep = tm.reshape(-1).nonzero().squeeze(1)
            cG, A = cG.index_select(0, keep), A.index_select(0, keep)
        terms.append((cG.T @ A).to(p.dtype))  # one GEMM: sum_e c_e G_e^T A_e
    for D in pp["dense"]:
        terms.append(torch.einsum("b,b...->...", c.to(D.dtype), D).reshape(p.shape).to(p.dtype))
    grad = terms[0].contiguous() if terms else torch.zeros_like(p, memory_format=torch.contiguous_format)
    for t in terms[1:]:
        grad += t
    for ids, G in pp["emb"]:
        cG = (G * c.to(G.dtype).view(-1, 1, 1)).reshape(-1, G.shape[-1])
        grad.index_add_(0, ids.reshape(-1), cG.to(p.dtype))  # row id_s += c_e G_s
    return grad


# ----------------------------------------------------------------------------------------------------------
# references (materialised, slow)


def per_example_grads_loop(model: nn.Module, per_example_loss_fn: Callable[[], torch.Tensor], batch_size: int
                           ) -> dict[str, torch.Tensor]:
    """Reference per-example gradients {name: (B, *shape)} of every parameter with requires_grad, by one forward
    and B backward passes (torch.autograd.grad of each loss_e; a tied tensor gets its total gradient)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    losses = per_example_loss_fn()
    if tuple(losses.shape) != (batch_size,):
        raise ValueError(f"per_example_loss_fn returned shape {tuple(losses.shape)}, expected ({batch_size},)")
    out = {n: torch.zeros(batch_size, *p.shape, dtype=p.dtype) for n, p in params.items()}
    for e in range(batch_size):
        gs = torch.autograd.grad(losses[e], list(params.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(params, gs):
            if g is not None:
                out[n][e] = g
    return out


def clip_reference(model: nn.Module, per_example_loss_fn: Callable[[], torch.Tensor], B: int,
                   max_grad_norm: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Materialised clipped sum {name: sum_e c_e g_e} from `per_example_grads_loop` (Opacus formulas, flat or
    per-layer as in PerExampleClipper)."""
    g = per_example_grads_loop(model, per_example_loss_fn, B)
    _check_bound(max_grad_norm, list(g))
    sq = {n: v.double().reshape(B, -1).pow(2).sum(1) for n, v in g.items()}
    if isinstance(max_grad_norm, dict):
        c = {n: clip_coefs(sq[n].sqrt(), max_grad_norm[n]) for n in g}
    else:
        flat = clip_coefs(sum(sq.values()).sqrt(), max_grad_norm)
        c = {n: flat for n in g}
    return {n: torch.einsum("b,b...->...", c[n].to(v.dtype), v) for n, v in g.items()}
