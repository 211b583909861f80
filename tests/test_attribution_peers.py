"""Smoke tests of the attribution-benchmark peer adapters (benchmarks/attribution_peers.py).

One tiny problem shared by every peer: multinomial LR on 200 sklearn digits (standardised), trained full batch
with Adam (L2 1e-3), four checkpoints along the way; 20 test points. Each adapter must return a finite
(200, 20) float64 matrix and the "positive = helpful" sign: for >= 80% of test points the mean score of
same-class train points exceeds the mean score of other-class train points (a flipped sign gives ~0%).

A peer's test is skipped only when its package cannot be imported AND GRADSIGHT_REQUIRE_PEERS is unset.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "attribution_peers.py"
_spec = importlib.util.spec_from_file_location("attribution_peers", _PATH)
ap = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("attribution_peers", ap)  # dataclasses look their module up in sys.modules
_spec.loader.exec_module(ap)

N_TRAIN, N_TEST, LR, STEPS = 200, 20, 0.05, 300


def _require(peer: str) -> None:
    if ap.peer_available(peer):
        return
    if os.environ.get("GRADSIGHT_REQUIRE_PEERS"):
        pytest.fail(f"{peer} cannot be imported and GRADSIGHT_REQUIRE_PEERS is set")
    pytest.skip(f"{peer} is not installed (see benchmarks/attribution_peers.PEER_PIP_LINES)")


def make_model() -> nn.Module:
    return nn.Linear(64, 10)


@pytest.fixture(scope="module")
def problem():
    """(checkpoints, X_train, y_train, X_test, y_test); checkpoints after 75, 150, 225 and 300 Adam steps."""
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))
    tr, te = idx[:N_TRAIN], idx[N_TRAIN:N_TRAIN + N_TEST]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    Xtr = torch.tensor((X[tr] - mu) / sd, dtype=torch.float32)  # (200, 64)
    Xte = torch.tensor((X[te] - mu) / sd, dtype=torch.float32)  # (20, 64)
    ytr, yte = torch.tensor(y[tr]), torch.tensor(y[te])
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ckpts = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(Xtr), ytr) + 1e-3 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
        if step % (STEPS // 4) == 0:
            ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.set_num_threads(threads)
    with torch.no_grad():
        assert (model(Xte).argmax(1) == yte).float().mean() >= 0.8  # a model worth attributing
    return ckpts, Xtr, ytr, Xte, yte


def _check(res, problem, min_fraction: float = 0.8) -> None:
    """Shape, dtype, finiteness, timing, and the sign convention (same-class mean > other-class mean)."""
    _, _, ytr, _, yte = problem
    S = res.scores
    assert isinstance(S, np.ndarray) and S.dtype == np.float64 and S.shape == (N_TRAIN, N_TEST)
    assert np.isfinite(S).all() and np.abs(S).max() > 0
    assert res.seconds > 0 and res.info["version"] and res.info["checkpoints_used"]
    same = ytr.numpy()[:, None] == yte.numpy()[None, :]  # (200, 20)
    wins = [S[same[:, x], x].mean() > S[~same[:, x], x].mean() for x in range(N_TEST)]
    assert np.mean(wins) >= min_fraction, f"sign check passed for only {np.mean(wins):.0%} of test points"


def test_trak_ensemble_and_proj_dim_cap(problem):
    _require("trak")
    ckpts, *data = problem
    res = ap.trak_scores(make_model, ckpts[-2:], *data)  # proj_dim 2048 requested, lambda 0
    _check(res, problem)
    # lambda = 0 caps k at half of min(N, |theta|) = 100, which is a single projection block (the traker
    # free_memory bug path) and keeps the projected features full rank.
    assert res.info["proj_dim"] == 100 and res.info["proj_dim_capped"] and not res.info["singular"]
    assert res.info["checkpoints_used"] == [0, 1]
    again = ap.trak_scores(make_model, ckpts[-2:], *data)
    np.testing.assert_array_equal(res.scores, again.scores)  # deterministic given the projector seed


def test_kronfluence_ekfac(problem):
    _require("kronfluence")
    ckpts, *data = problem
    res = ap.kronfluence_scores(make_model, ckpts, *data)
    _check(res, problem)
    assert res.info["checkpoints_used"] == [len(ckpts) - 1] and res.info["strategy"] == "ekfac"
    again = ap.kronfluence_scores(make_model, ckpts, *data)
    np.testing.assert_array_equal(res.scores, again.scores)  # the sampled Fisher labels are seeded


def test_kronfluence_identity_is_gradient_dot(problem):
    """Plumbing check (transpose, example order): identity curvature with the CE measurement is <g_i, g_x>."""
    _require("kronfluence")
    ckpts, Xtr, ytr, Xte, yte = problem
    res = ap.kronfluence_scores(make_model, ckpts, Xtr, ytr, Xte, yte, strategy="identity", damping=0.0,
                                measurement="loss")
    model = make_model()
    model.load_state_dict(ckpts[-1])
    params = dict(model.named_parameters())

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, x[None]), y[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))

    def flat(X, y):
        return torch.cat([g.flatten(1) for g in grads(params, X, y).values()], 1)  # (n, |theta|)

    expected = (flat(Xtr, ytr) @ flat(Xte, yte).T).detach().double().numpy()  # (200, 20)
    np.testing.assert_allclose(res.scores, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("method, opts", [
    ("trak", {}),
    ("tracin", {"lrs": [LR] * 4}),
    ("grad_dot", {}),
    ("grad_cos", {}),
    ("if_explicit", {}),
    ("if_cg", {}),
    ("logra", {"compile": False}),  # torch.compile of dattri's compressor alone takes ~25 s on a cold cache
])
def test_dattri(problem, method, opts):
    _require("dattri")
    ckpts, *data = problem
    res = ap.dattri_scores(make_model, ckpts, *data, method=method, **opts)
    _check(res, problem)
    assert res.info["method"] == method
    expected_ckpts = list(range(4)) if method in ("trak", "tracin") else [3]
    assert res.info["checkpoints_used"] == expected_ckpts


def test_contract_errors_and_float64_inputs(problem):
    _require("dattri")
    ckpts, Xtr, ytr, Xte, yte = problem
    with pytest.raises(ValueError, match="method"):
        ap.dattri_scores(make_model, ckpts, Xtr, ytr, Xte, yte, method="lissa")
    with pytest.raises(ValueError, match="lrs"):
        ap.dattri_scores(make_model, ckpts, Xtr, ytr, Xte, yte, method="tracin")
    with pytest.raises(ValueError, match="checkpoints"):
        ap.dattri_scores(make_model, [], Xtr, ytr, Xte, yte, method="grad_dot")
    with pytest.raises(ValueError, match="y_train"):
        ap.dattri_scores(make_model, ckpts, Xtr, ytr[:-1], Xte, yte, method="grad_dot")
    # float64 model, checkpoints and data are cast on a copy: same scores as the float32 call.
    ref = ap.dattri_scores(make_model, ckpts, Xtr, ytr, Xte, yte, method="grad_dot")
    ck64 = [{k: v.double() for k, v in ck.items()} for ck in ckpts]
    res = ap.dattri_scores(lambda: make_model().double(), ck64, Xtr.double(), ytr, Xte.double(), yte,
                           method="grad_dot")
    np.testing.assert_array_equal(res.scores, ref.scores)
    assert ck64[-1]["weight"].dtype == torch.float64  # the caller's checkpoint is untouched
