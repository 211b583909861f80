"""The monitor's per-step detectors, as small stateful objects with no I/O and no hooks.

- `norms`: per-tensor norms in one foreach call (full-tensor norms of DTensor shards).
- `SpikeDetector`: per parameter tensor, a z-score of log‖g‖ against an EMA of its mean and variance (spikes
  kept out of the EMA), max|g| against Stable-SPAM's bias-corrected EMA of it, and SPAM's element rule
  g² > θ·v on Adam's second moment v before the update (the share of entries that would be clipped).
- `NoiseAccumulator`: per-example squared norms of each example's gradient from the factored capture, and the
  unbiased estimators of McCandlish et al. with B_small = 1 and B_big = the micro-batch (METHODS §9.1):

      |G|²  = (B·S_big − S_small) / (B − 1)        tr Σ = (S_small − S_big) / (1 − 1/B)
      S_small = mean_e ‖g_e‖²,  S_big = ‖mean_e g_e‖²,  g_e = B·c_e (c_e: e's share of the batch gradient)

  with EMAs of numerator and denominator kept separately (B_simple = EMA(tr Σ) / EMA(|G|²)); and cockpit's
  GSNR per layer (`gsnr_layer`).

All values stay on the device; the monitor moves them to the host once per flush.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stats.noise import two_batch_estimates
from . import schema as S

__all__ = ["Thresholds", "norms", "max_abs", "is_dtensor", "SpikeDetector", "NoiseAccumulator", "gsnr_layer"]


@dataclass(frozen=True)
class Thresholds:
    """The online detectors' settings (recorded in the run's identity).

    Attributes:
        spam: SPAM's element threshold θ on g²/v (5000: |g| > 70.7·sqrt(v)); `spam_skip` first steps unchecked
            (v is still being built, SPAM's own warm-up of 20 steps).
        ema: β of the EMA of log‖g_l‖ (mean and variance) behind the z-score; `warmup` steps before any z.
        z_alert: |z| at which a layer's norm is a spike (not fed into the EMA).
        max_abs_ema: θ of Stable-SPAM's EMA of max|g|; `max_abs_alert`: ratio max|g| / EMA that alerts.
        noise_ema: β of the EMAs of the noise-scale numerator and denominator (NeoX: 0.99).
    """

    spam: float = 5000.0
    spam_skip: int = 20
    ema: float = 0.99
    warmup: int = 20
    z_alert: float = 6.0
    max_abs_ema: float = 0.999
    max_abs_alert: float = 10.0
    noise_ema: float = 0.99


def norms(tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """(L,) norms of `tensors` in one foreach call (see `_stack` for the dtype); full-tensor norms for DTensor
    shards."""
    if not tensors:
        return torch.zeros(0)
    if is_dtensor(tensors[0]):
        out = []
        for t in tensors:
            n = torch.linalg.vector_norm(t, ord)
            out.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
        return _stack(out)
    return _stack(torch._foreach_norm(tensors, ord))


def max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(L,) max |t| per tensor: `torch.aminmax` per tensor (the foreach inf-norm takes a slow path on CPU, ~8x
    slower here); DTensor shards through the full-tensor inf-norm."""
    if tensors and is_dtensor(tensors[0]):
        return norms(tensors, float("inf"))
    return _stack([torch.maximum(lo.neg(), hi) for lo, hi in (torch.aminmax(t) for t in tensors)])


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _stack(norms) -> torch.Tensor:
    """One (L,) vector: float64 when any norm is float64 (exact tests, float64 models), else float32 (half and
    bfloat16 norms are upcast: norms of fp16 gradients overflow)."""
    dt = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.stack([n.to(dt) for n in norms])




class SpikeDetector:
    """Online spike scores per parameter tensor (see the module docstring); `update` once per optimizer step."""

    def __init__(self, n_tensors: int, device, thresholds: Thresholds):
        self.th = thresholds
        self.nan = torch.full((n_tensors,), float("nan"), device=device)
        self.z = {"m": torch.zeros(n_tensors, device=device), "v": torch.zeros(n_tensors, device=device), "n": 0}
        self.mx = {"m": torch.zeros(n_tensors, device=device), "n": 0}

    def update(self, pre: torch.Tensor | None, post: torch.Tensor, grads: list[torch.Tensor],
               second_moments: list[torch.Tensor | None] | None, step: int) -> dict[str, torch.Tensor]:
        """The step's spike rows {metric: (L,)}.

        Args:
            pre: (L,) end-of-backward (pre-clip) norms, None when not read; post: (L,) the norms the optimizer
                receives; grads: the gradients the optimizer receives; second_moments: Adam's exp_avg_sq per
                tensor (None entries or None: no SPAM rule); step: the optimizer step (SPAM skips the first).
        """
        th = self.th
        # the larger of the end-of-backward norm and the norm the optimizer receives: clipping only shrinks
        # a gradient, so a larger received norm means it was changed after the backward (e.g. scaled)
        pre = torch.maximum(pre, post) if pre is not None else post
        rows: dict[str, torch.Tensor] = {}
        x = torch.log(pre.clamp_min(1e-30))
        ok = torch.isfinite(pre) & (pre > 0)
        z, n = self.z, self.z["n"]
        if n >= th.warmup:
            corr = 1.0 - th.ema ** n
            m, v = z["m"] / corr, z["v"] / corr
            zs = torch.where(ok, (x - m) / torch.sqrt((v - m * m).clamp_min(1e-12)), self.nan)
        else:
            zs = self.nan
        rows[S.NORM_Z] = zs
        keep = ok & ~(torch.nan_to_num(zs.abs(), nan=0.0) >= th.z_alert)
        b = th.ema
        z["m"] = torch.where(keep, b * z["m"] + (1 - b) * x, z["m"])
        z["v"] = torch.where(keep, b * z["v"] + (1 - b) * x * x, z["v"])
        z["n"] = n + 1
        # max |g| before clipping: the received max scaled by the layer's norm ratio (exact for any clipping
        # that scales a tensor uniformly: global or per-layer norm clipping)
        mx = max_abs(grads) * torch.where(post > 0, pre / post, torch.ones_like(post))
        rows[S.MAXABS] = mx
        q = self.mx
        if q["n"] >= th.warmup:
            est = q["m"] / (1.0 - th.max_abs_ema ** q["n"])
            rows[S.MAXABS_RATIO] = torch.where(ok, mx / est.clamp_min(1e-30), self.nan)
            big = torch.nan_to_num(rows[S.MAXABS_RATIO], nan=0.0) >= th.max_abs_alert
        else:
            rows[S.MAXABS_RATIO] = self.nan
            big = torch.zeros_like(ok)
        upd = ok & ~big
        q["m"] = torch.where(upd, th.max_abs_ema * q["m"] + (1 - th.max_abs_ema) * mx, q["m"])
        q["n"] += 1
        vs = second_moments
        if step >= th.spam_skip and vs is not None and all(v is not None for v in vs):
            # one temporary: g*g - theta*v in place, then the count of its positive entries as the squared
            # L2 norm of their signs (foreach L2 norms are ~4x faster than ord-0 or ord-1 ones on CPU)
            g2 = torch._foreach_mul(grads, grads)
            torch._foreach_add_(g2, vs, alpha=-th.spam)
            torch._foreach_clamp_min_(g2, 0.0)
            torch._foreach_sign_(g2)
            counts = norms(g2).double().pow(2).round().float()
            numel = torch.tensor([float(g.numel()) for g in grads], device=counts.device)
            rows[S.SPAM_FRAC] = counts / numel
        return rows


class NoiseAccumulator:
    """Per-example norms and the noise-scale estimators of one optimizer step's micro-batches, with EMAs across
    steps (see the module docstring). `add` per captured micro-batch, `finish` per step."""

    def __init__(self, names: list[str], ema: float):
        self.names, self.ema = names, ema
        self.parts: dict[str, list[dict]] = {}
        self.state = {"S": None, "G": None, "St": None, "Gt": None}

    def add(self, name: str, g, sq: torch.Tensor, inv: torch.Tensor | None, gsnr: bool) -> None:
        """One micro-batch of layer `name`: its FactoredGrad `g`, the (B,) squared norms of the examples'
        contributions `sq`, the AMP inverse scale `inv` (None: none)."""
        B = g.batch_size
        f = 1.0 if inv is None else inv.double() ** 2
        s = sq.double() * (B * B) * f  # per-example gradients g_e = B * c_e (their mean is the batch gradient)
        A, G = g.masked(g.A), g.masked(g.G)
        big = torch.einsum("btd,bte->de", G.double(), A.double()).pow(2).sum() * f  # ||sum_e c_e||^2
        part = {"s": s, "big": big, "B": B}
        if gsnr:
            part["gsnr"] = gsnr_layer(g, B)
        self.parts.setdefault(name, []).append(part)

    def finish(self) -> dict | None:
        """The step's results (None when nothing was captured): names, per-layer trace_sigma / grad_sq /
        noise_scale (L',), their model-wide totals, the per-example norm quantiles, GSNR per layer."""
        if not self.parts:
            return None
        names = [k for k in self.names if k in self.parts]
        per_ex, S_hat, G_hat, gsnr = None, [], [], {}
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        for k in names:
            parts = self.parts[k]
            s_all = torch.cat([p["s"] for p in parts])
            per_ex = s_all if per_ex is None else per_ex + s_all
            sh, gh = [], []  # averaged over the step's micro-batches (B_big = one micro-batch)
            for p in parts:
                B = p["B"]
                if B < 2:
                    continue
                g_sq, trace = two_batch_estimates(p["s"].mean(), p["big"], 1.0, float(B))  # B_small = 1
                gh.append(g_sq)
                sh.append(trace)
            S_hat.append(torch.stack(sh).mean() if sh else nan.to(s_all.device))
            G_hat.append(torch.stack(gh).mean() if gh else nan.to(s_all.device))
            if "gsnr" in parts[0]:
                gsnr[k] = torch.stack([p["gsnr"] for p in parts]).mean()
        S_hat, G_hat = torch.stack(S_hat), torch.stack(G_hat)
        ok = torch.isfinite(S_hat) & torch.isfinite(G_hat)
        tot_S, tot_G = S_hat[ok].sum(), G_hat[ok].sum()
        st, b = self.state, self.ema
        if st["S"] is None or st["S"].shape != S_hat.shape:
            st.update(S=torch.zeros_like(S_hat), G=torch.zeros_like(G_hat), St=torch.zeros_like(tot_S),
                      Gt=torch.zeros_like(tot_G))
        st["S"] = torch.where(ok, b * st["S"] + (1 - b) * S_hat, st["S"])
        st["G"] = torch.where(ok, b * st["G"] + (1 - b) * G_hat, st["G"])
        st["St"] = b * st["St"] + (1 - b) * tot_S
        st["Gt"] = b * st["Gt"] + (1 - b) * tot_G
        pe = per_ex.sqrt()
        q = torch.quantile(pe, torch.tensor([0.1, 0.5, 0.9], dtype=pe.dtype, device=pe.device))
        self.parts = {}
        return {"names": names, S.TRACE_SIGMA: S_hat, S.GRAD_SQ: G_hat, S.NOISE_SCALE: st["S"] / st["G"],
                "totals": {S.TRACE_SIGMA: tot_S, S.GRAD_SQ: tot_G, S.NOISE_SCALE: st["St"] / st["Gt"],
                           S.PE_Q10: q[0], S.PE_Q50: q[1], S.PE_Q90: q[2], S.PE_MAX: pe.max()},
                S.GSNR: gsnr}


def gsnr_layer(g, B: int, cap: int = 1 << 24) -> torch.Tensor:
    """Cockpit's GSNR of one factored layer: mean over entries of mean_e(g)² / (var_e(g) + 1e-5), with the
    per-example gradients g_e = B·c_e materialised in chunks of examples (population variance); NaN when
    d_out·d_in exceeds `cap` (too large to materialise)."""
    d = g.param_shape[0] * g.param_shape[1]
    if d > cap:
        return torch.tensor(float("nan"), dtype=torch.float64)
    A, G = g.masked(g.A).double(), g.masked(g.G).double()
    chunk = max(1, cap // max(d, 1))
    s1 = torch.zeros(g.G.shape[-1], g.A.shape[-1], dtype=torch.float64, device=A.device)
    s2 = torch.zeros_like(s1)
    for i in range(0, B, chunk):
        M = torch.einsum("bto,bti->boi", G[i:i + chunk], A[i:i + chunk]) * B
        s1 += M.sum(0)
        s2 += (M * M).sum(0)
    mean = s1 / B
    var = (s2 / B - mean * mean).clamp_min(0.0)
    return (mean * mean / (var + 1e-5)).mean()


