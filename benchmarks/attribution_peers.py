"""Peer adapters for the attribution benchmark: TRAK, kronfluence and dattri, each through its OWN package.

Every adapter takes the same trained checkpoints and data as gradsight's methods and returns one score matrix
in one convention, so the benchmark can put the peers' LDS and wall time next to gradsight's in one run:

    fn(make_model, checkpoints, X_train (N, d), y_train (N,), X_test (M, d), y_test (M,), **opts) -> PeerResult

    PeerResult.scores   (N, M) float64; S[i, x] > 0 means "helpful": training on i raises test point x's margin
                        / lowers its loss (the sign every peer below produces natively, checked in
                        tests/test_attribution_peers.py; no adapter flips a sign).
    PeerResult.seconds  wall time (time.perf_counter) of the whole attribution: featurisation, factor fitting,
                        inversion and scoring; not model training, not imports, not the float32 copies.
    PeerResult.info     versions, the options actually used, the checkpoints used, the sign and scale notes.

Models are small classifiers (nn.Linear(64, 10), MLP 64-32-10) trained with cross-entropy; peers run them on
CPU in float32 (float64 checkpoints and data are cast on a copy) with one thread.

What each peer computes (checkpoints theta_1..theta_K; g = per-example gradient; P = seeded Gaussian projection):
  * TRAK (traker 0.3.2): output f(z) = logit_y - logsumexp_{c != y} logit_c (the margin),
    phi_i = P grad f(z_i) / sqrt(|theta|), Q_i = 1 - p_y(z_i), and
    S = [(1/K) sum_k Phi_k (Phi_k^T Phi_k + lambda I)^{-1} phi_x^k] * [(1/K) sum_k Q^k]
    (traker also divides each (Phi^T Phi)^{-1} by its mean |entry|, which re-weights the ensemble members).
  * kronfluence 1.0.1: S[i, x] = grad m(x)^T (F + lambda I)^{-1} grad L(z_i) summed over Linear modules; F the
    (E)K-FAC Fisher of the summed CE loss (labels sampled from the model unless use_empirical_fisher); the
    measurement m = -margin (kronfluence's own classification example, examples/cifar/analyze.py), so S > 0
    means i raises x's margin. No checkpoint ensemble in kronfluence: the last checkpoint is used. Scores are
    unnormalised (not divided by N).
  * dattri 0.3.0: "trak" as above but (Phi^T Phi + lambda I) solved directly, no rescaling; "tracin"
    S = sum_k eta_k <g_k(z_i), g_k(x)> (CE loss); "grad_dot" / "grad_cos" the same on the last checkpoint with
    eta = 1 (cosine for grad_cos); "if_explicit" / "if_cg" S = g(z_i)^T (H + lambda I)^{-1} g(x), H the Hessian
    of the MEAN training CE (explicit matrix / CG); "logra" the block-projected IF with the per-layer empirical
    Fisher and relative damping lambda * tr(H)/d.
Sign, checked by reading the code and empirically (LDS > 0, same-class train points score higher): all of
them are "positive = helpful" as produced; no adapter flips a sign.

The singular-kernel trap (TRAK #24): with lambda = 0, Phi^T Phi (k x k) is invertible only if
k <= rank(Phi) <= min(N, |theta|), and per-example margin gradients are rank deficient (the logit gradient of
the margin sums to zero; dead pixels and dead ReLUs add null directions): the digits LR's features have rank
505 < |theta| = 650 at N = 1000, so even k = min(N, |theta|) is singular and gives noise. With lambda = 0 the
adapters therefore cap k at `_RANK_FRACTION` * min(N, |theta|); `info["proj_dim_capped"]` says when that
happened, `info["feature_rank"]` (traker) is the numerical rank of model 0's projected train features,
computed after the clock stops. The requested k is kept when lambda > 0.

Peer bugs worked around here (each at its call site): traker's BasicProjector reuses a freed matrix when k <= 100
and one model is scored; kronfluence recurses forever in .to() when the model root is itself an nn.Linear;
dattri's LoGra indexes the sample batch twice (2-D inputs fail); dattri's TRAK/TracIn mutate a module-level
projector dict. dattri's example TRAK output log p - log(1 - p) overflows at p = 1 in float32; the adapters use
the algebraically equal stable margin instead.

Usage (the benchmark calls these; nothing here trains models or builds ground truth):
    res = trak_scores(make_model, ckpts, Xtr, ytr, Xte, yte, proj_dim=2048)
    res = kronfluence_scores(make_model, ckpts, Xtr, ytr, Xte, yte, strategy="ekfac")
    res = dattri_scores(make_model, ckpts, Xtr, ytr, Xte, yte, method="tracin", lrs=[0.05] * len(ckpts))
Install (no torch, no torchvision is pulled): see PEER_PIP_LINES.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PeerResult", "PEERS", "PEER_PIP_LINES", "DATTRI_METHODS", "trak_scores", "kronfluence_scores",
           "dattri_scores", "peer_available"]

# The install line (`make install` copies it): --no-deps, so neither torch nor torchvision (kronfluence declares
# it, never imports it) is pulled. Imported at import time besides gradsight's own dependencies (accelerate,
# safetensors, scipy, pyyaml, tqdm, packaging): einconv, einops, opt-einsum (kronfluence). dattri's pretty_midi
# is only imported by its MAESTRO benchmark, never here.
PEER_PIP_LINES = (
    "python -m pip install --no-deps traker==0.3.2 kronfluence==1.0.1 dattri==0.3.0 einconv==0.1.0 einops==0.8.2 "
    "opt-einsum==3.4.0",
)
DATTRI_METHODS = ("trak", "tracin", "grad_dot", "grad_cos", "if_explicit", "if_cg", "logra")
_RANK_FRACTION = 0.5  # lambda = 0: k <= 0.5 * min(N, |theta|) keeps Phi^T Phi well conditioned (see docstring)
_PACKAGES = {"trak": "traker", "kronfluence": "kronfluence", "dattri": "dattri"}


@dataclass(frozen=True)
class PeerResult:
    """One peer's attribution on one task.

    Attributes:
        scores: (N_train, N_test) float64, positive = helpful (raises the test margin / lowers its loss).
        seconds: wall time of the attribution (featurise + fit + score), model training excluded.
        info: versions, options actually used, checkpoints used, sign convention.
    """

    scores: np.ndarray
    seconds: float
    info: dict = field(default_factory=dict)


def peer_available(peer: str) -> bool:
    """True when the peer's package ("trak", "kronfluence" or "dattri") imports in this environment."""
    if peer not in _PACKAGES:
        raise ValueError(f"peer must be one of {sorted(_PACKAGES)}, got {peer!r}")
    try:
        __import__(peer)
    except Exception:  # noqa: BLE001 -- any import failure means "not usable here"
        return False
    return True


# --------------------------------------------------------------------------------------------- shared helpers
@dataclass
class _Inputs:
    model: nn.Module
    ckpts: list[dict]
    Xtr: torch.Tensor  # (N, d) float32
    ytr: torch.Tensor  # (N,) int64
    Xte: torch.Tensor  # (M, d) float32
    yte: torch.Tensor  # (M,) int64

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _prepare(make_model: Callable[[], nn.Module], checkpoints: Sequence[dict], X_train, y_train, X_test,
             y_test) -> _Inputs:
    """Validate the contract's arguments and return float32 copies (the caller's tensors are never modified)."""
    if not callable(make_model):
        raise ValueError(f"make_model must be a callable returning an nn.Module, got {type(make_model).__name__}")
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence) or len(checkpoints) == 0:
        size = len(checkpoints) if hasattr(checkpoints, "__len__") else "?"
        raise ValueError(f"checkpoints must be a non-empty list of state dicts, got {type(checkpoints).__name__} "
                         f"of length {size}")
    tensors = {}
    for name, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        X, y = torch.as_tensor(X), torch.as_tensor(y)
        if X.ndim != 2:
            raise ValueError(f"X_{name} must be (n, d), got shape {tuple(X.shape)}")
        if y.shape != (X.shape[0],) or y.is_floating_point():
            raise ValueError(f"y_{name} must be integer labels of shape ({X.shape[0]},), got {y.dtype} "
                             f"{tuple(y.shape)}")
        tensors[name] = (X.detach().to(torch.float32).clone(), y.detach().to(torch.int64).clone())
    if tensors["train"][0].shape[1] != tensors["test"][0].shape[1]:
        raise ValueError(f"X_train and X_test feature sizes differ: {tensors['train'][0].shape[1]} vs "
                         f"{tensors['test'][0].shape[1]}")
    ckpts = [{k: (v.detach().to(torch.float32).clone() if v.is_floating_point() else v.detach().clone())
              for k, v in ck.items()} for ck in checkpoints]
    model = make_model().to(torch.float32)
    model.load_state_dict(ckpts[-1])
    model.eval()
    return _Inputs(model, ckpts, *tensors["train"], *tensors["test"])


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's output f = logit_y - logsumexp_{c != y} logit_c = log(p_y / (1 - p_y)), stable. (B, C) -> (B,)"""
    is_label = torch.arange(logits.shape[-1], device=logits.device) == labels[:, None]  # (B, C); vmap-safe
    others = logits.masked_fill(is_label, float("-inf"))  # (B, C)
    return logits.gather(-1, labels[:, None])[:, 0] - others.logsumexp(-1)  # (B,)


def _version(peer: str) -> str:
    return importlib.metadata.version(_PACKAGES[peer])


@contextlib.contextmanager
def _one_thread_seeded(seed: int) -> Iterator[None]:
    """One torch thread and a fixed seed for the peer call; the caller's threads and RNG state are restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _effective_proj_dim(proj_dim: int, lambda_reg: float, n_train: int, n_params: int) -> tuple[int, bool]:
    """The projection size actually used: proj_dim, capped when lambda = 0 would make Phi^T Phi singular."""
    if not isinstance(proj_dim, int) or proj_dim < 1:
        raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
    if lambda_reg < 0:
        raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg!r}")
    if lambda_reg > 0:
        return proj_dim, False
    cap = max(1, int(_RANK_FRACTION * min(n_train, n_params)))
    return min(proj_dim, cap), proj_dim > cap


def _numerical_rank(features: np.ndarray) -> int:
    """Rank of an (N, k) feature matrix at float32 precision: singular values above max(N, k) * eps * s_max."""
    s = np.linalg.svd(np.asarray(features, dtype=np.float64), compute_uv=False)
    return int((s > s[0] * max(features.shape) * np.finfo(np.float32).eps).sum()) if s.size else 0


def _base_info(peer: str, inp: _Inputs, **opts) -> dict:
    return {"peer": peer, "version": _version(peer), "torch": torch.__version__, "dtype": "float32",
            "device": "cpu", "threads": 1, "n_train": int(inp.Xtr.shape[0]), "n_test": int(inp.Xte.shape[0]),
            "n_params": inp.n_params, "sign": "positive = helpful (native, not flipped)", **opts}


# ------------------------------------------------------------------------------------------------------- TRAK
def trak_scores(make_model, checkpoints, X_train, y_train, X_test, y_test, *, proj_dim: int = 2048,
                lambda_reg: float = 0.0, projector_seed: int = 0, seed: int = 0) -> PeerResult:
    """TRAK scores with traker's own TRAKer: one model_id per checkpoint (the ensemble), BasicProjector, float32.

    Args:
        make_model, checkpoints, X_train, y_train, X_test, y_test: the adapter contract (module docstring).
        proj_dim: requested JL dimension k (traker's default 2048); capped when lambda_reg = 0 (module docstring).
        lambda_reg: ridge lambda added to Phi^T Phi (traker's default 0).
        projector_seed: seed of the Gaussian projection (member k uses seeds derived from it and k).
        seed: global torch seed (nothing in TRAK is random besides the projection; kept for symmetry).

    Returns:
        PeerResult with (N, M) scores; info has proj_dim requested / used, lambda_reg, models used, feature rank.
    """
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    inp = _prepare(make_model, checkpoints, X_train, y_train, X_test, y_test)
    n, m = inp.Xtr.shape[0], inp.Xte.shape[0]
    k, capped = _effective_proj_dim(proj_dim, lambda_reg, n, inp.n_params)
    with _one_thread_seeded(seed), tempfile.TemporaryDirectory(prefix="trak_") as save_dir:
        t0 = time.perf_counter()
        projector = BasicProjector(grad_dim=inp.n_params, proj_dim=k, seed=projector_seed,
                                   proj_type=ProjectionType.normal, device="cpu", dtype=torch.float32)
        traker = TRAKer(model=inp.model, task="image_classification", train_set_size=n, save_dir=save_dir,
                        device="cpu", projector=projector, use_half_precision=False,
                        lambda_reg=float(lambda_reg), logging_level=logging.WARNING)
        for model_id, ck in enumerate(inp.ckpts):
            traker.load_checkpoint(ck, model_id=model_id)
            traker.featurize(batch=(inp.Xtr, inp.ytr), num_samples=n)
        traker.finalize_features()
        # traker 0.3.2 bug: finalize_features() frees the projection matrix, and with one block (k <= 100) and an
        # unchanged model_id BasicProjector.project() then uses the freed matrix (AttributeError). An impossible
        # model_id makes the next project() regenerate the matrix from (seed, model_id), the same matrix as before.
        projector.model_id = -1
        for model_id, ck in enumerate(inp.ckpts):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=ck, model_id=model_id, num_targets=m)
            traker.score(batch=(inp.Xte, inp.yte), num_samples=m)
        scores = np.array(traker.finalize_scores(exp_name="test"), dtype=np.float64)  # (N, M)
        seconds = time.perf_counter() - t0
        traker.saver.load_current_store(0)
        rank = _numerical_rank(np.array(traker.saver.current_store["grads"]))  # (N, k) of model 0
    info = _base_info("trak", inp, task="image_classification (margin f, Q = 1 - p)", projector="BasicProjector",
                      proj_type="normal", proj_dim_requested=proj_dim, proj_dim=k, proj_dim_capped=capped,
                      lambda_reg=float(lambda_reg), projector_seed=projector_seed, use_half_precision=False,
                      checkpoints_used=list(range(len(inp.ckpts))), feature_rank=rank,
                      singular=bool(rank < k), note="each (Phi^T Phi)^-1 divided by its mean |entry| (traker)")
    return PeerResult(scores, seconds, info)


# ------------------------------------------------------------------------------------------------ kronfluence
def _kronfluence_task(measurement: str):
    from kronfluence.task import Task

    class DigitsClassificationTask(Task):
        """kronfluence's examples/cifar ClassificationTask: summed CE (sampled labels for the Fisher), -margin."""

        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)  # (B, C)
            if sample:  # true Fisher: labels drawn from the model's own predictive distribution
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(logits.detach(), -1), num_samples=1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            logits = model(inputs)  # (B, C)
            if measurement == "loss":
                return F.cross_entropy(logits, labels, reduction="sum")
            return -_margin(logits, labels).sum()

    return DigitsClassificationTask()


def kronfluence_scores(make_model, checkpoints, X_train, y_train, X_test, y_test, *, strategy: str = "ekfac",
                       damping: float | None = 1e-8, use_empirical_fisher: bool = False,
                       measurement: str = "margin", seed: int = 0) -> PeerResult:
    """Influence scores from kronfluence's Analyzer (fit_all_factors, compute_pairwise_scores), last checkpoint.

    Args:
        make_model, checkpoints, X_train, y_train, X_test, y_test: the adapter contract (module docstring).
        strategy: "identity", "diagonal", "kfac" or "ekfac" (kronfluence's default).
        damping: ScoreArguments.damping_factor: absolute lambda (kronfluence's default 1e-8), or None for
            kronfluence's heuristic 0.1 * mean eigenvalue per module.
        use_empirical_fisher: fit the Fisher with the true labels instead of labels sampled from the model.
        measurement: "margin" (measurement = -margin, kronfluence's classification example) or "loss" (CE).
        seed: torch seed for the sampled labels (the only randomness).

    Returns:
        PeerResult with (N, M) scores (kronfluence's (M, N) transposed); positive = helpful for both measurements.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    if strategy not in ("identity", "diagonal", "kfac", "ekfac"):
        raise ValueError(f"strategy must be identity, diagonal, kfac or ekfac, got {strategy!r}")
    if measurement not in ("margin", "loss"):
        raise ValueError(f"measurement must be 'margin' or 'loss', got {measurement!r}")
    if damping is not None and damping < 0:
        raise ValueError(f"damping must be None or >= 0, got {damping!r}")
    inp = _prepare(make_model, checkpoints, X_train, y_train, X_test, y_test)
    n, m = inp.Xtr.shape[0], inp.Xte.shape[0]
    train_ds = torch.utils.data.TensorDataset(inp.Xtr, inp.ytr)
    test_ds = torch.utils.data.TensorDataset(inp.Xte, inp.yte)
    with _one_thread_seeded(seed), tempfile.TemporaryDirectory(prefix="kronfluence_") as out_dir:
        t0 = time.perf_counter()
        task = _kronfluence_task(measurement)
        # The last checkpoint is already loaded. A bare nn.Linear root cannot be wrapped in place (kronfluence
        # replaces children of a parent; the root recurses forever in .to()), so always give it a parent.
        model = prepare_model(nn.Sequential(inp.model), task)
        analyzer = Analyzer(analysis_name="peer", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=out_dir, log_level=logging.WARNING)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=use_empirical_fisher)
        analyzer.fit_all_factors(factors_name="factors", dataset=train_ds, per_device_batch_size=n,
                                 factor_args=factor_args)
        score_args = ScoreArguments(damping_factor=damping)
        analyzer.compute_pairwise_scores(scores_name="scores", factors_name="factors", query_dataset=test_ds,
                                         train_dataset=train_ds, per_device_query_batch_size=m,
                                         per_device_train_batch_size=n, score_args=score_args)
        pairwise = analyzer.load_pairwise_scores("scores")["all_modules"]  # (M, N)
        scores = pairwise.T.to(torch.float64).numpy().copy()  # (N, M)
        seconds = time.perf_counter() - t0
    info = _base_info("kronfluence", inp, strategy=strategy, damping=damping,
                      damping_meaning="absolute" if damping is not None else "0.1 * mean eigenvalue per module",
                      use_empirical_fisher=use_empirical_fisher, measurement=f"-{measurement}"
                      if measurement == "margin" else "CE loss", train_loss="CE summed over the batch",
                      checkpoints_used=[len(inp.ckpts) - 1], ensemble=False,
                      note="no checkpoint ensemble in kronfluence: last checkpoint only; scores not divided by N")
    return PeerResult(scores, seconds, info)


# ----------------------------------------------------------------------------------------------------- dattri
def _dattri_funcs(model: nn.Module):
    """The loss/target functions dattri's attributors take (torch.func style: f(params, data))."""

    def ce(params, data):  # one example (vmap'd by dattri) or a whole batch (the IF Hessian): mean CE
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x), y)

    def ce_single(params, data):  # TracIn: one example, unsqueezed as in dattri's benchmark scripts
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x[None]), y[None])

    def margin_single(params, data):  # TRAK output; dattri's scripts write log p - log(1 - p), unstable at p = 1
        x, y = data
        return _margin(torch.func.functional_call(model, params, x[None]), y[None])[0]

    def prob_single(params, data):  # TRAK's Q = 1 - p_y needs p_y
        x, y = data
        return F.softmax(torch.func.functional_call(model, params, x[None]), -1)[0, y]

    def ce_module(model_, batch, device):  # LoGra calls loss_func(model, batch, device): mean CE
        x, y = batch
        return F.cross_entropy(model_(x.to(device)), y.to(device))

    return ce, ce_single, margin_single, prob_single, ce_module


@contextlib.contextmanager
def _dattri_defaults_restored() -> Iterator[None]:
    """dattri's TRAK/TracIn attributors .update() a module-level DEFAULT_PROJECTOR_KWARGS; undo that after use."""
    import dattri.algorithm.tracin as tracin_mod
    import dattri.algorithm.trak as trak_mod

    saved = [(mod, dict(mod.DEFAULT_PROJECTOR_KWARGS)) for mod in (trak_mod, tracin_mod)]
    try:
        yield
    finally:
        for mod, kw in saved:
            mod.DEFAULT_PROJECTOR_KWARGS.clear()
            mod.DEFAULT_PROJECTOR_KWARGS.update(kw)


def dattri_scores(make_model, checkpoints, X_train, y_train, X_test, y_test, *, method: str = "trak",
                  proj_dim: int | None = None, regularization: float | None = None,
                  lrs: Sequence[float] | None = None, max_iter: int = 10, compile: bool = True,
                  seed: int = 0) -> PeerResult:
    """Scores from dattri 0.3.0's attributors through AttributionTask(model, loss_func, checkpoints).

    Args:
        make_model, checkpoints, X_train, y_train, X_test, y_test: the adapter contract (module docstring).
        method: one of DATTRI_METHODS. Checkpoints used: "trak" and "tracin" all (ensemble / trajectory);
            "grad_dot", "grad_cos", "if_explicit", "if_cg" and "logra" the last one.
        proj_dim: "trak": k (dattri's default 512; capped when regularization = 0, as for traker);
            "tracin" / "grad_*": None = exact gradients (identity projector), an int = dattri's normal projection
            (dattri's own default is 512); "logra": the Kronecker size per layer, a square (default 32 x 32).
        regularization: "trak" ridge lambda (default 0.0); "if_*" Hessian damping lambda I (default 1e-3, e.g.
            the L2 of an LR trained with it); "logra" damping relative to tr(H)/d (default 5e-3, dattri's MNIST
            example).
        lrs: learning rate per checkpoint, required for "tracin" (TracInCP's eta_k).
        max_iter: CG iterations for "if_cg" (dattri's default 10).
        compile: "logra" only. dattri wraps its Compressor.forward in torch.compile; the first call in a process
            pays the compilation (~5 s with a warm inductor disk cache, ~25 s cold, measured here). False runs it
            eagerly (torch.compiler.set_stance("force_eager")): same scores, no compile time.
        seed: projection seed and global torch seed.

    Returns:
        PeerResult with (N, M) scores; positive = helpful for every method (CE-loss IF/TracIn, margin TRAK).
    """
    if method not in DATTRI_METHODS:
        raise ValueError(f"method must be one of {DATTRI_METHODS}, got {method!r}")
    from dattri.task import AttributionTask

    inp = _prepare(make_model, checkpoints, X_train, y_train, X_test, y_test)
    n, m = inp.Xtr.shape[0], inp.Xte.shape[0]
    ce, ce_single, margin_single, prob_single, ce_module = _dattri_funcs(inp.model)

    def loader(X, y):  # one batch, unshuffled: dattri's IF sums its inverse-HVPs over the batches of this loader
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=X.shape[0],
                                           shuffle=False)

    last = [inp.ckpts[-1]]
    opts: dict = {"method": method}
    with _one_thread_seeded(seed), _dattri_defaults_restored(), \
            tempfile.TemporaryDirectory(prefix="dattri_") as cache_dir:
        t0 = time.perf_counter()
        if method == "trak":
            from dattri.algorithm.trak import TRAKAttributor

            lam = 0.0 if regularization is None else float(regularization)
            k, capped = _effective_proj_dim(512 if proj_dim is None else proj_dim, lam, n, inp.n_params)
            task = AttributionTask(loss_func=margin_single, model=inp.model, checkpoints=inp.ckpts)
            att = TRAKAttributor(task=task, correct_probability_func=prob_single, device="cpu",
                                 projector_kwargs={"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": seed,
                                                   "device": "cpu", "proj_type": "normal"}, regularization=lam)
            att.cache(loader(inp.Xtr, inp.ytr))
            with torch.no_grad():
                scores = att.attribute(loader(inp.Xte, inp.yte))
            opts.update(proj_dim_requested=proj_dim or 512, proj_dim=k, proj_dim_capped=capped,
                        regularization=lam, output="margin", checkpoints_used=list(range(len(inp.ckpts))))
        elif method in ("tracin", "grad_dot", "grad_cos"):
            from dattri.algorithm.tracin import TracInAttributor

            ckpts = inp.ckpts if method == "tracin" else last
            if method == "tracin":
                if lrs is None or len(lrs) != len(ckpts):
                    raise ValueError(f"lrs must give one learning rate per checkpoint ({len(ckpts)}) for "
                                     f"method='tracin', got {lrs!r}")
                weights = torch.tensor([float(v) for v in lrs])
            else:
                weights = torch.ones(1)
            proj = ({"proj_dim": 1, "proj_type": "identity"} if proj_dim is None
                    else {"proj_dim": int(proj_dim), "proj_type": "normal"})
            task = AttributionTask(loss_func=ce_single, model=inp.model, checkpoints=ckpts)
            att = TracInAttributor(task=task, weight_list=weights, normalized_grad=method == "grad_cos",
                                   projector_kwargs={**proj, "proj_max_batch_size": 32, "proj_seed": seed,
                                                     "device": "cpu"}, device="cpu")
            with torch.no_grad():
                scores = att.attribute(loader(inp.Xtr, inp.ytr), loader(inp.Xte, inp.yte))
            opts.update(projection="identity (exact)" if proj_dim is None else f"normal {proj_dim}",
                        weights=weights.tolist(), loss="CE per example",
                        checkpoints_used=list(range(len(inp.ckpts)))[-len(ckpts):])
        elif method in ("if_explicit", "if_cg"):
            from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit

            lam = 1e-3 if regularization is None else float(regularization)
            task = AttributionTask(loss_func=ce, model=inp.model, checkpoints=last)
            att = (IFAttributorExplicit(task=task, device="cpu", regularization=lam) if method == "if_explicit"
                   else IFAttributorCG(task=task, device="cpu", regularization=lam, max_iter=max_iter))
            att.cache(loader(inp.Xtr, inp.ytr))
            with torch.no_grad():
                scores = att.attribute(loader(inp.Xtr, inp.ytr), loader(inp.Xte, inp.yte))
            opts.update(regularization=lam, hessian="of the mean train CE (+ lambda I)", loss="CE",
                        max_iter=max_iter if method == "if_cg" else None, checkpoints_used=[len(inp.ckpts) - 1])
        else:  # logra
            from dattri.algorithm.logra import LoGraAttributor

            lam = 5e-3 if regularization is None else float(regularization)
            k = 1024 if proj_dim is None else int(proj_dim)
            # dattri 0.3.0 indexes the sample batch twice (block_projected_if._setup_compressors takes batch[0],
            # compressor.setup_model_compressors takes [0] again), so a (N, d) input reaches the layers as one
            # (d,) row and fails. Its MNIST example survives because images are (N, 1, 28, 28) and the model
            # flattens; do the same: feed (N, 1, d) and flatten first. Fixed upstream after 0.3.0.
            wrapped = nn.Sequential(nn.Flatten(), inp.model)
            task = AttributionTask(loss_func=ce_module, model=wrapped,
                                   checkpoints=[{f"1.{key}": v for key, v in last[0].items()}])
            att = LoGraAttributor(task=task, hessian="eFIM", damping=lam, device="cpu", proj_dim=k,
                                  offload="cpu", cache_dir=cache_dir)
            with contextlib.nullcontext() if compile else torch.compiler.set_stance("force_eager"):
                att.cache(loader(inp.Xtr[:, None], inp.ytr))  # (N, 1, d)
                scores = att.attribute(loader(inp.Xtr[:, None], inp.ytr), loader(inp.Xte[:, None], inp.yte))
            opts.update(proj_dim=k, per_layer=f"{int(k ** 0.5)} x {int(k ** 0.5)}", hessian="eFIM",
                        damping=lam, damping_meaning="relative: lambda * tr(H) / d per layer", compile=compile,
                        checkpoints_used=[len(inp.ckpts) - 1])
        scores = scores.detach().to(torch.float64).cpu().numpy().copy()  # (N, M)
        seconds = time.perf_counter() - t0
    if scores.shape != (n, m):
        raise RuntimeError(f"dattri {method} returned shape {scores.shape}, expected {(n, m)}")
    return PeerResult(scores, seconds, _base_info("dattri", inp, **opts))


PEERS = {"trak": trak_scores, "kronfluence": kronfluence_scores, "dattri": dattri_scores}
