"""Matrix-free curvature operators (Hessian, generalized Gauss-Newton, Fisher) over a fixed set of batches.

Every operator is the curvature of ONE objective: the mean loss over all rows of the whole fixed data set.

Normalisation (the "rows" convention, stated once for all operators):
    A `forward_fn(model, batch) -> (outputs, targets)` turns a batch into `outputs` (N_b, ...) with one row
    per supervised unit (an example for plain models, a supervised token for causal LMs) and `targets`.
    With N = sum_b N_b over all batches (and, under torch.distributed, over all ranks),

        L(theta) = (1/N) sum_b N_b * loss_fn(outputs_b, targets_b)      # loss_fn is a mean over rows
                 = (1/N) sum_{rows n} l_n(theta)

    so the products do not depend on how the rows are split into batches:
        H v = (1/N) sum_b N_b H_b v                       (H_b: Hessian of the batch mean loss)
        G v = (1/N) sum_n J_n^T H_n J_n v                 (H_n: Hessian of l_n w.r.t. output row n)
        F v = (1/N) sum_n J_n^T E[r_n r_n^T] J_n v        (r_n = d l_n / d output row n)
    For causal LMs this is the token-mean over ALL supervised tokens of the data set (tokens pooled across
    examples), not the mean over examples of per-example token-means. A custom `weight_fn(outputs, targets)`
    replaces N_b if `loss_fn` is normalised differently.

Built-in losses (strings accepted wherever a loss is asked for):
    "cross_entropy": l_n = -log softmax(z_n)[y_n], outputs (N, C) logits, targets (N,) class ids;
                     H_n = diag(p_n) - p_n p_n^T.
    "mse":           l_n = 0.5 * ||f_n - t_n||^2 (summed over the output dimension, mean over rows), outputs
                     reshaped to (N, D); H_n = I. This is the Gaussian negative log-likelihood with unit
                     variance, so its true Fisher equals its GGN. (F.mse_loss's "mean" reduction is this
                     objective times 2 / D.)

Parameter blocks: `params` is None (all parameters with requires_grad), a regex (re.search on the names) or a
list of exact names; flat vectors concatenate the block's tensors in `model.named_parameters()` order
(row-major within each tensor). Products are computed with `torch.func.functional_call` on detached copies of
the parameters: the model's parameters and their `.grad` are never modified.

Model mode: products run in eval mode (BatchNorm in train mode makes the loss depend on batch statistics,
dropout makes products random; PyHessian does the same); the previous mode is restored after each product.
A model handed over in train mode is recorded (`switched_to_eval = True`) and, if it has BatchNorm or
dropout layers, a warning is issued. Hugging Face models configured with `attn_implementation="sdpa"` run
their products under the math SDPA backend (`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`), which
supports double backward and forward-mode AD; recorded as `sdpa_math = True`.

Distributed: if torch.distributed is initialised with world_size > 1, each rank holds its own batches and
every product all-reduces the row-weighted sum and the row count, so every rank gets the operator of the
union of all ranks' data (identical to one process holding all batches; the MC Fisher draws its labels with
a generator seeded by (seed, rank), so its samples differ from a single-process run).

Cost: every product re-runs the forward (and backward) of every batch; nothing is cached between products,
so memory stays at one batch's double-backward graph. `HessianOperator.matmat` (double_backward) reuses each
batch's gradient graph for up to `matmat_chunk` columns at once, which makes `dense()` and block methods cheap.

Reference: PyHessian (Yao et al., 2020) for the sample-weighted full-data Hessian; Martens (2020), "New
insights and perspectives on the natural gradient method", for GGN / Fisher / empirical Fisher.

Example:
    >>> H = HessianOperator(model, "cross_entropy", [(x1, y1), (x2, y2)], params=r"^fc2\\.")
    >>> Hv = H.matvec(torch.randn(H.dim, dtype=H.dtype))
    >>> G = GGNOperator(model, [(x1, y1), (x2, y2)], loss="cross_entropy")
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator",
    "select_params", "default_forward", "causal_lm_forward", "LOSSES",
]

ForwardFn = Callable[[nn.Module, Any], "tuple[Tensor, Tensor]"]
MAX_DENSE_DIM = 5000


# --------------------------------------------------------------------------------------------------------
# losses, forward functions, parameter selection


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets)


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    diff = (outputs - targets).reshape(outputs.shape[0], -1)  # (N, D)
    return 0.5 * diff.pow(2).sum(-1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(loss) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(f"unknown loss {loss!r}; expected a callable or one of {sorted(LOSSES)}")


def _to(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def default_forward(model: nn.Module, batch) -> tuple[Tensor, Tensor]:
    """`(model(x), y)` for a batch `(x, y)` (moved to the model's device)."""
    x, y = _to(batch, _device_of(model))
    return model(x), y


def causal_lm_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(logits (N, V), labels (N,)) of a causal LM at its N supervised target tokens.

    `batch` holds input_ids (B, T), attention_mask (B, T) and optionally target_mask (B, T) (True at the
    supervised target tokens; default: attention_mask). Position j-1 predicts token j, so position 0 is never
    a target (same gathering as `gradsight.inputs.losses.causal_lm_losses`). Rows are tokens: with the operators'
    row normalisation, the objective is the token-mean over all supervised tokens of the data set.
    """
    from ..inputs.losses import plain_head, upcast

    batch = _to(batch, _device_of(model))
    ids, att = batch["input_ids"], batch["attention_mask"]
    tgt = batch.get("target_mask", att).bool()
    rows, cols = tgt[:, 1:].nonzero(as_tuple=True)  # position cols predicts token cols + 1
    labels = ids[:, 1:][rows, cols]  # (N,)
    plain = plain_head(model)
    if plain is not None:  # lm_head only at the N predicting positions
        base, head = plain
        h = base(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, d)
        logits = head(h[rows, cols])  # (N, V)
    else:
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1][rows, cols]  # (N, V)
    return upcast(logits), labels


def select_params(model: nn.Module, pattern: str | None = None,
                  names: Sequence[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """A parameter block, in `model.named_parameters()` order.

    Args:
        model: the module.
        pattern: regex matched with `re.search` against parameter names (requires_grad parameters only).
        names: exact parameter names (each must exist). With neither: all requires_grad parameters.

    Raises:
        ValueError: if nothing matches (the message names the pattern) or a name does not exist.
    """
    named = list(model.named_parameters())
    if names is not None:
        if isinstance(names, str):
            raise TypeError("names must be a list of parameter names; pass a regex as `pattern`")
        have = dict(named)
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"unknown parameter name(s) {missing}; the model has e.g. {list(have)[:8]}")
        wanted = set(names)
        block = [(n, p) for n, p in named if n in wanted]
    else:
        rx = re.compile(pattern) if pattern is not None else None
        block = [(n, p) for n, p in named if p.requires_grad and (rx is None or rx.search(n))]
    if not block:
        what = f"pattern '{pattern}'" if pattern is not None else "requires_grad=True"
        raise ValueError(f"no parameter matches {what}; the model has e.g. {[n for n, _ in named[:8]]}")
    return block


def _has_sdpa(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None) == "sdpa"


_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class _Call(nn.Module):
    """Wraps `forward_fn(model, batch)` as a module so functional_call swaps the parameters of every
    submodule the forward_fn touches (e.g. `model.base_model` and `model.lm_head` separately)."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch):
        return self.forward_fn(self.model, batch)


# --------------------------------------------------------------------------------------------------------
# base class


class CurvatureOperator:
    """A symmetric (dim, dim) curvature matrix available only through products.

    Attributes:
        dim: number of parameters in the block.
        dtype, device: of the block (products take and return vectors of this dtype/device).
        n_products: matrix-vector products performed so far (a matmat with k columns counts k).
        params: the block, list of (name, parameter), in order.
        switched_to_eval: the model was in train mode when the operator was built (products run in eval).
        sdpa_math: products run under the math SDPA backend.
        info: a dict recording objective, normalisation, block, mode and dtype (for reports).
    """

    kind: str = "curvature"

    def __init__(self, model: nn.Module, batches: Iterable, params=None,
                 forward_fn: ForwardFn | None = None, weight_fn: Callable[[Tensor, Tensor], Any] | None = None):
        self.model = model
        if params is None or isinstance(params, str):
            self.params = select_params(model, pattern=params)
        else:
            self.params = select_params(model, names=list(params))
        self.names = [n for n, _ in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.numels = [p.numel() for _, p in self.params]
        self.dim = sum(self.numels)
        first = self.params[0][1]
        self.dtype, self.device = first.dtype, first.device
        if any(p.dtype != self.dtype for _, p in self.params):
            raise ValueError("all parameters of a block must share one dtype; "
                             f"got {sorted({str(p.dtype) for _, p in self.params})}")
        self.batches = list(batches)  # one fixed, ordered pass (a shuffling DataLoader is frozen here)
        if not self.batches:
            raise ValueError("batches is empty: the curvature needs at least one batch")
        self.forward_fn = forward_fn or default_forward
        self.weight_fn = weight_fn or (lambda outputs, targets: outputs.shape[0])
        self._call = _Call(model, self.forward_fn)
        self.n_products = 0
        self.sdpa_math = _has_sdpa(model)
        self.switched_to_eval = bool(model.training)
        if self.switched_to_eval:
            stochastic = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _STOCHASTIC)})
            if stochastic:
                warnings.warn(f"{type(self).__name__}: the model is in train mode and has {stochastic} layers; "
                              "curvature products are computed in eval mode (running BatchNorm statistics, no "
                              "dropout). Call model.eval() first to silence this warning.", stacklevel=3)
        self.rank, self.world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    # ---- flat vectors
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """(dim,) concatenation of block-shaped tensors (in block order)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Block-shaped views of a (dim,) vector."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return [c.view(s) for c, s in zip(v.split(self.numels), self.shapes)]

    # ---- products
    def matvec(self, v: Tensor) -> Tensor:
        """(dim,) -> (dim,) product with the curvature matrix (same dtype/device as the block)."""
        v = torch.as_tensor(v).to(device=self.device, dtype=self.dtype)
        vs = self.unflatten(v.contiguous())
        acc = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        weight = 0.0
        with self._context():
            for i, batch in enumerate(self.batches):
                part, w = self._batch_product(i, batch, vs)
                acc += part
                weight += float(w)
        acc, weight = self._all_reduce(acc, weight)
        if weight <= 0:
            raise ValueError("the batches hold no rows (total weight 0): nothing to average over")
        self.n_products += 1
        return acc / weight

    def matmat(self, V: Tensor) -> Tensor:
        """(dim, k) -> (dim, k), one matvec per column (subclasses may batch columns)."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected a matrix of shape ({self.dim}, k), got {tuple(V.shape)}")
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _matmat_reduced(self, V: Tensor, batch_product) -> Tensor:
        """(dim, k) products from `batch_product(i, batch, Vs) -> ((dim, k) weighted sum, weight)` with Vs the
        block-shaped (k, *shape) slices of V: the same row-weighted reduction as matvec, for k columns."""
        V = V.to(device=self.device, dtype=self.dtype)
        k = V.shape[1]
        Vs = [c.T.reshape(k, *s) for c, s in zip(V.split(self.numels), self.shapes)]  # (k, *shape)
        acc = torch.zeros(self.dim, k, dtype=self.dtype, device=self.device)
        weight = 0.0
        with self._context():
            for i, batch in enumerate(self.batches):
                part, w = batch_product(i, batch, Vs)
                acc += part
                weight += float(w)
        flat, weight = self._all_reduce(acc.reshape(-1), weight)
        if weight <= 0:
            raise ValueError("the batches hold no rows (total weight 0): nothing to average over")
        self.n_products += k
        return flat.view(self.dim, k) / weight

    def dense(self) -> Tensor:
        """The (dim, dim) matrix from dim matvecs (tests and tiny blocks only; refuses dim > 5000)."""
        if self.dim > MAX_DENSE_DIM:
            raise ValueError(f"dense() builds a {self.dim} x {self.dim} matrix with {self.dim} products; refused for "
                             f"dim > {MAX_DENSE_DIM}: select a smaller parameter block or use matvec")
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, dim={self.dim}, dtype={self.dtype}, "
                f"n_batches={len(self.batches)}, n_products={self.n_products})")

    @property
    def info(self) -> dict:
        return {"operator": type(self).__name__, "kind": self.kind, "dim": self.dim, "params": list(self.names),
                "normalisation": "mean over all rows of all batches (rows = outputs.shape[0])",
                "mode": "eval", "switched_to_eval": self.switched_to_eval, "sdpa_math": self.sdpa_math,
                "dtype": str(self.dtype), "n_batches": len(self.batches), "world_size": self.world_size}

    # ---- internals
    def _batch_product(self, i: int, batch, vs: list[Tensor]) -> tuple[Tensor, float]:
        """(weighted sum (dim,), weight) of batch i; subclasses implement."""
        raise NotImplementedError

    def _state(self, block: Sequence[Tensor]) -> dict[str, Tensor]:
        """functional_call state: the block tensors given, every other parameter detached."""
        wanted = set(self.names)
        state = {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if n not in wanted}
        state.update({f"model.{n}": t for n, t in zip(self.names, block)})
        return state

    def _forward(self, block: Sequence[Tensor], batch) -> tuple[Tensor, Tensor]:
        return functional_call(self._call, self._state(block), (batch,))

    @contextlib.contextmanager
    def _context(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with contextlib.ExitStack() as stack:
                if self.sdpa_math:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
                yield
        except (RuntimeError, NotImplementedError) as e:
            msg = str(e).lower()
            if "forward ad" in msg or "forward-mode" in msg or "jvp" in msg or "double backward" in msg:
                raise RuntimeError(
                    f"{type(self).__name__}: an operator of the model does not support the automatic "
                    f"differentiation this product needs ({e}). For Hugging Face models load them with "
                    "attn_implementation='eager'; otherwise try method='double_backward' (Hessian) or "
                    "method='reverse' (GGN / Fisher).") from e
            raise
        finally:
            self.model.train(was_training)

    def _all_reduce(self, acc: Tensor, weight: float) -> tuple[Tensor, float]:
        if self.world_size <= 1:
            return acc, weight
        buf = torch.cat([acc, acc.new_tensor([weight])])
        dist.all_reduce(buf)
        return buf[:-1], float(buf[-1])


# --------------------------------------------------------------------------------------------------------
# Hessian


class HessianOperator(CurvatureOperator):
    """Hessian of the mean data loss w.r.t. a parameter block, by Hessian-vector products.

    H v = (1/N) sum_b N_b * d^2 loss_fn(forward_fn(model, batch_b)) / d theta^2 . v  (rows convention, see the
    module docstring), with theta the block and all other parameters held fixed.

    Args:
        model: any nn.Module (Hugging Face models too, with `forward_fn=causal_lm_forward`).
        loss_fn: `loss_fn(outputs, targets) -> scalar` MEAN over the batch's rows, or "cross_entropy" / "mse".
        batches: the fixed data set, an iterable of batches (materialised once, in order).
        params: None (all trainable), a regex, or a list of names: the block.
        method: "double_backward" (grad of <grad L, v>, reverse-over-reverse) or "forward_over_reverse"
            (torch.func.jvp of torch.func.grad over functional_call; needs forward-mode AD for every op).
        forward_fn: `forward_fn(model, batch) -> (outputs, targets)`; default `(model(x), y)`.
        weight_fn: `weight_fn(outputs, targets) -> N_b` (default outputs.shape[0]).

    Returns (matvec): H v, shape (dim,). H is symmetric, not necessarily PSD.
    """

    kind = "hessian"

    def __init__(self, model: nn.Module, loss_fn, batches: Iterable, params=None, method: str = "double_backward",
                 forward_fn: ForwardFn | None = None, weight_fn=None):
        if method not in ("double_backward", "forward_over_reverse"):
            raise ValueError(f"unknown method {method!r}; expected 'double_backward' or 'forward_over_reverse'")
        super().__init__(model, batches, params, forward_fn, weight_fn)
        self.loss_fn = resolve_loss(loss_fn)
        self.method = method

    @property
    def info(self) -> dict:
        return {**super().info, "method": self.method}

    matmat_chunk = 64  # columns per batched double-backward call (memory grows with it)

    def matmat(self, V: Tensor) -> Tensor:
        """(dim, k) -> (dim, k). With double_backward, each batch's gradient graph is built once and
        differentiated for up to `matmat_chunk` columns at a time (autograd is_grads_batched); falls back to
        one matvec per column if an operator of the model cannot be vmapped."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected a matrix of shape ({self.dim}, k), got {tuple(V.shape)}")
        if self.method != "double_backward" or not self._batched_ok:
            return super().matmat(V)
        cols = []
        for j in range(0, V.shape[1], self.matmat_chunk):
            try:
                cols.append(self._matmat_reduced(V[:, j:j + self.matmat_chunk], self._batch_products))
            except RuntimeError:  # e.g. an op without a vmap rule: exact but slower loop from here on
                self._batched_ok = False
                cols.append(super().matmat(V[:, j:]))
                break
        return torch.cat(cols, dim=1)

    _batched_ok = True

    def _batch_products(self, i, batch, Vs):
        k = Vs[0].shape[0]
        block = [p.detach().requires_grad_() for _, p in self.params]
        with torch.enable_grad():
            outputs, targets = self._forward(block, batch)
            w = float(self.weight_fn(outputs, targets))
            gs = torch.autograd.grad(self.loss_fn(outputs, targets), block, create_graph=True, allow_unused=True)
            live = [(g, V) for g, V in zip(gs, Vs) if g is not None and g.requires_grad]
            hv = torch.autograd.grad([g for g, _ in live], block, grad_outputs=[V for _, V in live],
                                     allow_unused=True, is_grads_batched=True) if live else [None] * len(block)
        hv = [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if h is None else h for h, p in zip(hv, block)]
        return w * torch.cat([h.detach().reshape(k, -1) for h in hv], dim=1).T, w  # (dim, k)

    def _batch_product(self, i, batch, vs):
        if self.method == "double_backward":
            block = [p.detach().requires_grad_() for _, p in self.params]
            with torch.enable_grad():
                outputs, targets = self._forward(block, batch)
                w = self.weight_fn(outputs, targets)
                loss = self.loss_fn(outputs, targets)
                gs = torch.autograd.grad(loss, block, create_graph=True, allow_unused=True)
                live = [(g, v) for g, v in zip(gs, vs) if g is not None and g.requires_grad]
                if live:  # a block the gradient does not depend on (e.g. a last bias under MSE) has H = 0
                    hv = torch.autograd.grad([g for g, _ in live], block, grad_outputs=[v for _, v in live],
                                             allow_unused=True)
                else:
                    hv = [None] * len(block)
            hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, block)]
        else:
            block = [p.detach() for _, p in self.params]

            def loss_of(theta):
                outputs, targets = self._forward(theta, batch)
                w = self.weight_fn(outputs, targets)
                return self.loss_fn(outputs, targets), torch.as_tensor(w).detach()  # aux must be a tensor

            with torch.no_grad():  # torch.func transforms ignore the outer no_grad; it stops a stray graph
                _, hv, w = torch.func.jvp(torch.func.grad(loss_of, has_aux=True), (tuple(block),), (tuple(vs),),
                                          has_aux=True)
        w = float(w)
        return w * self.flatten(hv).detach(), w


# --------------------------------------------------------------------------------------------------------
# output-space curvature: GGN and Fisher share  J^T (per-row output curvature) J


def _ce_rows(outputs: Tensor) -> Tensor:
    return torch.softmax(outputs, dim=-1)  # (N, C)


class _OutputCurvature(CurvatureOperator):
    """C v = (1/N) sum_n J_n^T M_n J_n v with a per-row output-space matrix M_n (subclasses: `_out_product`).

    Jv by forward mode (method="forward": torch.func.jvp, then torch.func.vjp) or by the double-vjp trick
    (method="reverse": one forward, J v = d/du <J^T u, v>, reverse mode only; works wherever double backward
    works).
    """

    def __init__(self, model, batches, loss, params, method, forward_fn, weight_fn):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; GGN / Fisher need a closed-form output curvature: "
                             f"expected one of {sorted(LOSSES)}")
        if method not in ("forward", "reverse"):
            raise ValueError(f"unknown method {method!r}; expected 'forward' or 'reverse'")
        super().__init__(model, batches, params, forward_fn, weight_fn)
        self.loss = loss
        self.method = method

    @property
    def info(self) -> dict:
        return {**super().info, "loss": self.loss, "method": self.method,
                "loss_convention": ("mean over rows of -log softmax(z)[y]" if self.loss == "cross_entropy"
                                    else "mean over rows of 0.5 * ||f - t||^2 (sum over output dims)")}

    def _out_product(self, i: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """(N, D) rows M_n u_n, with outputs, u reshaped to (N, D) (summed over rows, not averaged)."""
        raise NotImplementedError

    def _batch_product(self, i, batch, vs):
        if self.method == "forward":
            block = tuple(p.detach() for _, p in self.params)
            f = lambda theta: self._forward(theta, batch)  # noqa: E731  (outputs, aux=targets)
            with torch.no_grad():
                outputs, Jv, targets = torch.func.jvp(f, (block,), (tuple(vs),), has_aux=True)
                N = outputs.shape[0]
                Mu = self._out_product(i, outputs.reshape(N, -1), targets, Jv.reshape(N, -1))  # (N, D)
                _, vjp_fn, _ = torch.func.vjp(f, block, has_aux=True)
                (out,) = vjp_fn(Mu.reshape(outputs.shape).to(outputs.dtype))
        else:
            block = [p.detach().requires_grad_() for _, p in self.params]
            with torch.enable_grad():
                outputs, targets = self._forward(block, batch)
                N = outputs.shape[0]
                dummy = torch.zeros_like(outputs, requires_grad=True)  # J^T dummy is linear in dummy
                jt = torch.autograd.grad(outputs, block, grad_outputs=dummy, create_graph=True, allow_unused=True)
                live = [(g, v) for g, v in zip(jt, vs) if g is not None]
                Jv = torch.autograd.grad([g for g, _ in live], dummy, grad_outputs=[v for _, v in live],
                                         allow_unused=True)[0] if live else None
                Jv = torch.zeros_like(outputs) if Jv is None else Jv
                Mu = self._out_product(i, outputs.detach().reshape(N, -1), targets, Jv.detach().reshape(N, -1))
                out = torch.autograd.grad(outputs, block, grad_outputs=Mu.reshape(outputs.shape).to(outputs.dtype),
                                          allow_unused=True)
            out = [torch.zeros_like(p) if o is None else o for o, p in zip(out, block)]
        w = float(self.weight_fn(outputs, targets))
        # _out_product sums over rows: this is N_b times the batch-mean curvature, i.e. weight w = N_b
        return self.flatten(out).detach(), w

    def _exact_out_product(self, outputs: Tensor, u: Tensor) -> Tensor:
        """GGN / true-Fisher rows: (diag p - p p^T) u for cross-entropy, u for 0.5 ||.||^2."""
        if self.loss == "cross_entropy":
            p = _ce_rows(outputs)  # (N, C)
            return p * u - p * (p * u).sum(-1, keepdim=True)  # (N, C)
        return u


class GGNOperator(_OutputCurvature):
    """Generalized Gauss-Newton G = (1/N) sum_n J_n^T H_n J_n (PSD for convex losses).

    J_n = d outputs_n / d theta (the block), H_n the Hessian of the per-row loss w.r.t. output row n in closed
    form: cross-entropy diag(p) - p p^T with p = softmax(z); MSE (0.5 ||f - t||^2 convention) the identity.
    Product: u = J v (jvp), w = H_n u_n per row, G v = J^T w (vjp); rows convention of the module docstring.
    For softmax cross-entropy and Gaussian MSE, G equals the true Fisher; for a model linear in theta, G = H.

    Args:
        model, batches, params, forward_fn, weight_fn: as in HessianOperator (forward_fn's outputs must be
            logits (N, C) for cross-entropy, or (N, D) / (N,) predictions for MSE).
        loss: "cross_entropy" or "mse".
        method: "reverse" (double-vjp trick, one forward, reverse mode only) or "forward" (torch.func.jvp +
            torch.func.vjp).
    """

    kind = "ggn"

    def __init__(self, model: nn.Module, batches: Iterable, loss: str = "cross_entropy", params=None,
                 method: str = "reverse", forward_fn: ForwardFn | None = None, weight_fn=None):
        super().__init__(model, batches, loss, params, method, forward_fn, weight_fn)

    def _out_product(self, i, outputs, targets, u):
        return self._exact_out_product(outputs, u)


class FisherOperator(_OutputCurvature):
    """Fisher information of the model's predictive distribution, labelled by `kind`.

    With r_n = d l_n / d output row n (cross-entropy: p_n - onehot(y); MSE: f_n - t) and g_n = J_n^T r_n the
    per-row gradient, F v = (1/N) sum_n J_n^T E[r_n r_n^T] J_n v = (1/N) sum_n g_n <g_n, v>, computed
    as J^T (rank-1 output products) J v: no per-example gradients are materialised, and it works for any
    forward_fn (tokens of a causal LM share one forward).

    kind:
        "true": y ~ p_theta(y | x) in closed form: E[r r^T] = diag(p) - p p^T (cross-entropy) or I (MSE,
            unit-variance Gaussian) -- equal to the GGN for these losses.
        "mc": y sampled from the model, n_samples per row, drawn ONCE at construction with a generator
            seeded by (seed, rank), so the operator is a fixed symmetric matrix (usable by Lanczos);
            E[r r^T] estimated by (1/S) sum_s r_ns r_ns^T. Unbiased for the true Fisher.
        "empirical": y = the data targets: (1/N) sum_n g_n g_n^T. Not a curvature approximation in general,
            and very different from the true Fisher away from an optimum (Kunstner et al., 2019).
    """

    def __init__(self, model: nn.Module, batches: Iterable, kind: str = "true", loss: str = "cross_entropy",
                 params=None, n_samples: int = 1, seed: int = 0, method: str = "reverse",
                 forward_fn: ForwardFn | None = None, weight_fn=None):
        if kind not in ("true", "mc", "empirical"):
            raise ValueError(f"unknown Fisher kind {kind!r}; expected 'true', 'mc' or 'empirical'")
        if kind == "mc" and n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        super().__init__(model, batches, loss, params, method, forward_fn, weight_fn)
        self.kind = kind
        self.n_samples = n_samples if kind == "mc" else None
        self.seed = seed if kind == "mc" else None
        self._samples: list[Tensor] | None = None
        if kind == "mc":
            self._samples = self._draw()

    @property
    def info(self) -> dict:
        return {**super().info, "n_samples": self.n_samples, "seed": self.seed}

    def _draw(self) -> list[Tensor]:
        """Per batch, the sampled targets: (N, S) class ids (cross-entropy) or (S, N, D) values (MSE)."""
        gen = torch.Generator(device=self.device).manual_seed(int(self.seed) + 1_000_003 * self.rank)
        samples = []
        block = [p.detach() for _, p in self.params]
        with self._context(), torch.no_grad():
            for batch in self.batches:
                outputs, _ = self._forward(block, batch)
                z = outputs.reshape(outputs.shape[0], -1)  # (N, D)
                if self.loss == "cross_entropy":
                    samples.append(torch.multinomial(_ce_rows(z), self.n_samples, replacement=True, generator=gen))
                else:
                    eps = torch.randn((self.n_samples, *z.shape), generator=gen, dtype=z.dtype, device=z.device)
                    samples.append(z + eps)  # (S, N, D)
        return samples

    def _residuals(self, i: int, outputs: Tensor, targets: Tensor) -> Tensor:
        """(S, N, D) r = d l_n / d output row n for each target sample."""
        if self.loss == "cross_entropy":
            p = _ce_rows(outputs)  # (N, C)
            y = targets.reshape(-1, 1) if self.kind == "empirical" else self._samples[i]  # (N, S)
            onehot = F.one_hot(y.T, p.shape[-1]).to(p.dtype)  # (S, N, C)
            return p.unsqueeze(0) - onehot
        t = targets.reshape(1, *outputs.shape) if self.kind == "empirical" else self._samples[i]
        return outputs.unsqueeze(0) - t.to(outputs.dtype)  # (S, N, D)

    def _out_product(self, i, outputs, targets, u):
        if self.kind == "true":
            return self._exact_out_product(outputs, u)
        r = self._residuals(i, outputs, targets)  # (S, N, D)
        return (r * (r * u).sum(-1, keepdim=True)).mean(0)  # (N, D)
