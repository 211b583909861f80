"""Loss-landscape slices: direction normalisation, exact restoration, vmap vs sequential, known answers."""

import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from gradsight.curvature.criteria import spectral_criteria
from gradsight.landscape import (
    BatchLoss,
    gradient_direction,
    grid_2d,
    hessian_directions,
    interpolate,
    pca_directions,
    random_direction,
    recompute_bn_stats,
    slice_1d,
    target_direction,
)


# ------------------------------------------------------------------------------------------ test problems


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):  # (B, 3, 6, 6)
        h = F.relu(self.bn(self.conv(x)))  # (B, 4, 4, 4)
        return self.fc(h.flatten(1))  # (B, 3)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):  # (B, 5)
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class Quadratic(nn.Module):
    """A single parameter vector; the 'forward' returns it, the criterion is 0.5 theta^T A theta."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def quad_criterion(theta, A):
    return 0.5 * theta @ A @ theta


def cnn_problem(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN()
    g = torch.Generator().manual_seed(100 + seed)
    batches = [(torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    recompute_bn_stats(model, batches)  # non-trivial running statistics; leaves eval mode
    return model, BatchLoss(batches, F.cross_entropy)


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = TinyMLP()
    g = torch.Generator().manual_seed(200)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    model.eval()
    return model, batches


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_exact(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


def random_orthonormal(P, k, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=torch.float64))
    return Q  # (P, k)


# ------------------------------------------------------------------------------------------ directions


@pytest.mark.parametrize("states", [False, True], ids=["weights", "states"])
def test_filter_normalisation_matches_weight_filter_norms(states):
    model, _ = cnn_problem()
    model.double()
    d = random_direction(model, seed=3, norm="filter", ignore="biasbn", states=states)
    live = model.state_dict()
    assert len(d.names) == len(d)
    for name, t in zip(d.names, d):
        w = live[name]
        assert t.shape == w.shape
        if w.dim() <= 1:  # biases, BN gamma/beta (and running stats in "states" mode) are not perturbed
            assert torch.count_nonzero(t) == 0, name
        else:  # every filter (conv output channel / linear row) has the weight's filter norm
            dn = t.reshape(t.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-6, atol=0)
    if states:
        assert "bn.running_mean" in d.names and "bn.running_var" in d.names


def test_other_normalisations_and_ignore_none():
    model, _ = cnn_problem()
    model.double()
    params = dict(model.named_parameters())
    layer = random_direction(model, seed=1, norm="layer", ignore=None)
    for n, t in zip(layer.names, layer):
        if t.dim() > 1:
            assert math.isclose(float(t.norm()), float(params[n].detach().norm()), rel_tol=1e-10)
        else:  # reference code: 1-D direction = the parameter itself when not ignored
            assert torch.equal(t, params[n].detach())
    weight = random_direction(model, seed=1, norm="weight")
    raw = random_direction(model, seed=1, norm=None)
    w = params["conv.weight"].detach()
    i = weight.names.index("conv.weight")
    torch.testing.assert_close(weight[i], raw[i] * w)
    d1, d1b, d2 = (random_direction(model, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(d1, d1b))  # seeded
    assert not torch.equal(d1[0], d2[0])
    assert d1.meta == {"kind": "random", "seed": 0, "norm": "filter", "ignore": "biasbn", "states": False}


def test_hessian_directions_unflatten_and_unit_norm():
    model, _ = cnn_problem()
    named = list(model.named_parameters())
    P = sum(p.numel() for _, p in named)
    V = torch.randn(2, P)
    dirs = hessian_directions(named, V, eigenvalues=[3.0, 1.0])
    assert [d.meta["eigenvalue"] for d in dirs] == [3.0, 1.0]
    for d, v in zip(dirs, V):
        assert d.names == tuple(n for n, _ in named)
        assert [t.shape for t in d] == [p.shape for _, p in named]
        torch.testing.assert_close(d.flat(), v / v.norm())
    # unnamed (plain tensor list) directions apply to the trainable parameters by order and shape
    unnamed = hessian_directions([p for _, p in named], [V[0]])[0]
    assert unnamed.names is None
    res = slice_1d(model, lambda m: 0.0, unnamed, [0.0, 1.0])
    assert res.n_nonfinite == 0


def test_pca_recovers_known_plane():
    P = 30
    U = random_orthonormal(P, 2, seed=5)  # the plane
    g = torch.Generator().manual_seed(6)
    final = torch.randn(P, generator=g, dtype=torch.float64)
    ab = torch.randn(12, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)
    traj = [final + U @ c for c in ab] + [final]
    # as state_dicts with two tensors, 1-D bias included
    sds = [{"w": t[:24].reshape(4, 6).float(), "b": t[24:].float()} for t in traj]
    for trajectory in (traj, sds):
        for center in (True, False):
            dirs, info = pca_directions(trajectory, center=center)
            assert sum(info["explained_variance_ratio"]) == pytest.approx(1.0, abs=1e-9)
            assert info["explained_variance_ratio"][0] > info["explained_variance_ratio"][1]
            V = torch.stack([d.flat().double() for d in dirs], 1)  # (P, 2)
            tol = 1e-10 if trajectory is traj else 1e-5
            torch.testing.assert_close(V @ V.T, U @ U.T, atol=tol, rtol=0)  # same plane (projectors)
            assert len(info["coords"]) == len(trajectory)
            assert np.allclose(info["coords"].iloc[-1][["alpha", "beta"]].to_numpy(), 0.0)
    assert dirs[0].names == ("w", "b") and dirs[0][0].shape == (4, 6)


def test_gradient_direction_on_quadratic():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A @ A.T
    theta = torch.randn(6, dtype=torch.float64)
    model = Quadratic(theta)
    d = gradient_direction(model, lambda m: quad_criterion(m.theta, A))
    g = A @ theta
    torch.testing.assert_close(d[0], g / g.norm())
    assert d.meta["grad_norm"] == pytest.approx(float(g.norm()))


# ------------------------------------------------------------------------------------------ evaluation


def test_slice_and_grid_at_zero_reproduce_loss_and_restore_bit_exactly():
    model, loss = cnn_problem()
    snap = snapshot(model)
    L0 = loss(model)
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    alphas = np.linspace(-1, 1, 5)  # contains 0 exactly
    s = slice_1d(model, loss, d1, alphas)
    assert_bit_exact(model, snap)
    assert s.frame.loc[s.frame.alpha == 0, "loss"].item() == L0
    assert list(s.frame.columns) == ["alpha", "loss", "finite"]
    assert s.meta["bn"] == "stale" and s.meta["mode"] == "eval" and s.meta["directions"][0]["seed"] == 0
    g = grid_2d(model, loss, d1, d2, alphas, [-0.5, 0.0, 0.5])
    assert_bit_exact(model, snap)
    assert g.frame.query("alpha == 0 and beta == 0")["loss"].item() == L0
    assert g.to_array().shape == (5, 3)
    np.testing.assert_array_equal(g.to_array()[:, 1], s.frame["loss"].to_numpy())  # beta = 0 column
    assert g.frame["loss"].nunique() > 1


def test_vectorised_grid_equals_sequential():
    model, loss = cnn_problem()
    snap = snapshot(model)
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    alphas, betas = np.linspace(-1, 1, 4), np.linspace(-1, 1, 3)
    seq = grid_2d(model, loss, d1, d2, alphas, betas, batch_points=1)
    vec = grid_2d(model, loss, d1, d2, alphas, betas, batch_points=5)  # chunks of 5, 5, 2
    assert seq.meta["path"] == "sequential" and vec.meta["path"] == "vmap"
    assert_bit_exact(model, snap)
    np.testing.assert_allclose(vec.frame["loss"], seq.frame["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_dirs, model_dtype", [(1, torch.float64), (2, torch.float64), (2, torch.float32),
                                                  (3, torch.float64)])
def test_sequential_path_writes_the_points_of_the_vectorised_path(n_dirs, model_dtype):
    """The sequential path (one add per tensor per point, cached prefixes and last-direction products) sets
    exactly the parameters `_points` computes for the vectorised path, on a grid, on an unordered point list
    (prefixes change back and forth), with directions in float64 for a float32 model."""
    from gradsight.landscape.evaluate import _points, evaluate_points

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(model_dtype)
    dirs = [[torch.randn_like(p, dtype=torch.float64) for p in model.parameters()] for _ in range(n_dirs)]
    theta0 = [p.detach().clone() for p in model.parameters()]
    axes = [torch.linspace(-1, 1, 3, dtype=torch.float64)] * n_dirs
    grid = torch.cartesian_prod(*axes).reshape(-1, n_dirs)
    C = torch.cat([grid, grid[torch.randperm(len(grid), generator=torch.Generator().manual_seed(1))]])
    seen = []

    def record(m):
        seen.append([p.detach().clone() for p in m.parameters()])
        return 0.0

    evaluate_points(model, record, dirs, C, batch_points=1, recompute_bn=None)
    assert len(seen) == len(C)
    for i, params in enumerate(seen):
        for p, t0, ds in zip(params, theta0, zip(*dirs)):
            assert torch.equal(p, _points(t0, ds, C[i:i + 1])[0].to(model_dtype)), (i, n_dirs)
    assert all(torch.equal(p, t0) for p, t0 in zip(model.parameters(), theta0))


@pytest.mark.parametrize("faster", ["vmap", "sequential"])
def test_auto_batch_points_keeps_the_faster_path_and_the_values(monkeypatch, faster):
    import gradsight.landscape.evaluate as L

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    loss = BatchLoss([(torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g))],
                     F.cross_entropy)
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    axis = np.linspace(-2, 2, 7)
    seq = grid_2d(model, loss, d1, d2, axis, axis, batch_points=1)
    # a fake clock: 4 sequential points take 1 s; the vectorised chunk (32 points) 0.1 s or 100 s
    ticks = iter([0.0, 1.0, 1.0, 1.1 if faster == "vmap" else 101.0])
    monkeypatch.setattr(L.time, "perf_counter", lambda: next(ticks))
    auto = grid_2d(model, loss, d1, d2, axis, axis, batch_points="auto")
    assert auto.meta["path"] == faster and set(auto.meta["auto"]) == {"sequential_s_per_point", "vmap_s_per_point"}
    np.testing.assert_allclose(auto.frame["loss"], seq.frame["loss"], rtol=1e-12)
    with pytest.raises(ValueError, match="batch_points"):
        grid_2d(model, loss, d1, d2, axis, axis, batch_points=0)


def test_vmap_failure_falls_back_to_sequential():
    class ItemNet(TinyMLP):
        def forward(self, x):
            if self.fc1.weight.sum().item() > 1e9:  # data-dependent control flow: not vmappable
                return x
            return super().forward(x)

    _, batches = mlp_problem()
    torch.manual_seed(0)
    model = ItemNet().eval()
    loss = BatchLoss(batches, F.cross_entropy)
    d = random_direction(model, seed=0)
    with pytest.warns(UserWarning, match="sequential"):
        vec = slice_1d(model, loss, d, np.linspace(-1, 1, 5), batch_points=4)
    seq = slice_1d(model, loss, d, np.linspace(-1, 1, 5))
    assert vec.meta["path"] == "sequential" and "vmap failed" in vec.meta["fallback_reason"]
    np.testing.assert_array_equal(vec.frame["loss"], seq.frame["loss"])
    plain = slice_1d(model, lambda m: loss(m), d, [0.0, 1.0], batch_points=4)
    assert plain.meta["fallback_reason"] == "loss_fn is not a BatchLoss"


@pytest.mark.parametrize("batch_points", [1, 4], ids=["sequential", "vmap"])
def test_quadratic_slice_along_eigenvectors_is_exact(batch_points):
    P = 8
    Q = random_orthonormal(P, P, seed=1)
    lam = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    A = 0.5 * (A + A.T)
    c = 0.7
    model = Quadratic(c * Q[:, 2])  # theta* orthogonal to v1, v2: f = 0.5 lam_3 c^2 + 0.5 lam a^2 (+ ...)
    loss = BatchLoss([(torch.zeros(1), A)], quad_criterion)
    v1, v2 = hessian_directions(model, [Q[:, 0], Q[:, 1]], eigenvalues=lam[:2].tolist())
    alphas = np.linspace(-1, 1, 9)
    const = 0.5 * float(lam[2]) * c * c
    s = slice_1d(model, loss, v1, alphas, batch_points=batch_points)
    np.testing.assert_allclose(s.frame["loss"], const + 0.5 * 5.0 * alphas**2, rtol=0, atol=1e-12)
    g = grid_2d(model, loss, v1, v2, alphas, alphas[::2], batch_points=batch_points)
    a, b = g.frame["alpha"].to_numpy(), g.frame["beta"].to_numpy()
    np.testing.assert_allclose(g.frame["loss"], const + 0.5 * (5.0 * a**2 + 2.0 * b**2), rtol=0, atol=1e-12)
    assert torch.equal(model.theta.detach(), c * Q[:, 2])


def test_nonfinite_losses_are_recorded_not_raised():
    model, loss = cnn_problem()
    d = random_direction(model, seed=0)
    w0 = model.fc.weight.detach().clone()

    dfc = d[d.names.index("fc.weight")]

    def fragile(m):
        a = float(((m.fc.weight - w0) * dfc).sum() / (dfc * dfc).sum())  # recovers alpha
        if abs(a) > 1.5:
            return math.inf if a > 0 else math.nan
        return loss(m)

    res = slice_1d(model, fragile, d, np.linspace(-3, 3, 7))
    bad = ~res.frame["finite"]
    assert res.n_nonfinite == res.meta["n_nonfinite"] == int(bad.sum()) > 0
    assert res.frame.loc[bad, "loss"].isna().all() and res.frame.loc[~bad, "loss"].notna().all()
    assert res.frame["finite"].tolist() == [False, False, True, True, True, False, False]

    # vectorised path: log of a quantity that turns negative along the slice
    quad = Quadratic(torch.ones(3, dtype=torch.float64))
    logloss = BatchLoss([(torch.zeros(1), None)], lambda th, _: torch.log(th.sum()))
    (e,) = hessian_directions(quad, [torch.ones(3, dtype=torch.float64)])
    res = slice_1d(quad, logloss, e, [-3.0, -2.0, -1.0, 0.0, 1.0], batch_points=5)
    assert res.meta["path"] == "vmap"
    assert res.frame["finite"].tolist() == [False, False, True, True, True]
    assert res.n_nonfinite == 2


def test_train_mode_with_batchnorm_warns_and_evaluates_in_eval_mode():
    model, loss = cnn_problem()
    L_eval = loss(model)
    model.train()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="train mode"):
        res = slice_1d(model, loss, random_direction(model, seed=0), [0.0])
    assert res.meta["switched_from_train"] is True and res.meta["mode"] == "eval"
    assert res.frame["loss"].item() == L_eval
    assert model.training
    assert_bit_exact(model, snap)  # running stats untouched


def test_grid_with_bn_recomputation_restores_buffers():
    model, loss = cnn_problem()
    snap = snapshot(model)
    d = random_direction(model, seed=0)
    res = slice_1d(model, loss, d, [0.0, 0.5], recompute_bn=loss.batches)
    assert res.meta["bn"] == "recomputed"
    assert_bit_exact(model, snap)
    # the cnn's stats were recomputed on the same batches, so alpha = 0 reproduces the loss
    assert res.frame["loss"].iloc[0] == loss(model)


def test_scale_invariance_demo_filter_normalised_slice_is_unchanged():
    """Conv followed by BN: scaling the conv by 10 leaves the function unchanged (METHODS 10, test 3)."""
    model, loss = cnn_problem()
    model.bn.eps = 1e-12
    scaled, _ = cnn_problem()
    scaled.load_state_dict(model.state_dict())
    scaled.bn.eps = 1e-12
    with torch.no_grad():
        scaled.conv.weight.mul_(10)
        scaled.conv.bias.mul_(10)
        scaled.bn.running_mean.mul_(10)
        scaled.bn.running_var.mul_(100)
    assert loss(scaled) == pytest.approx(loss(model), rel=1e-5)
    alphas = np.linspace(-1, 1, 5)
    f = [slice_1d(m, loss, random_direction(m, seed=0), alphas).frame["loss"] for m in (model, scaled)]
    np.testing.assert_allclose(f[0], f[1], rtol=1e-4)
    u = [slice_1d(m, loss, random_direction(m, seed=0, norm=None), alphas).frame["loss"] for m in (model, scaled)]
    assert np.max(np.abs(u[0] - u[1])) > 1e-2


# ------------------------------------------------------------------------------------------ interpolation


def _checkpoints():
    _, batches = mlp_problem()
    torch.manual_seed(1)
    a = TinyMLP()
    torch.manual_seed(2)
    b = TinyMLP()
    for m in (a, b):  # training-like (EMA) statistics, different from a recomputation
        m.train()
        with torch.no_grad():
            for x, _ in batches[:2]:
                m(x * 2 + 1)
        m.eval()
    return a, b, batches


def _loss_of_state(state, loss):
    m = TinyMLP()
    m.load_state_dict(state)
    return loss(m.eval())


def test_interpolation_endpoints_reproduce_checkpoint_losses():
    a, b, batches = _checkpoints()
    loss = BatchLoss(batches, F.cross_entropy)
    sa, sb = snapshot(a), snapshot(b)
    model, _ = mlp_problem(seed=3)
    snap = snapshot(model)
    ts = np.linspace(0, 1, 5)
    La, Lb = _loss_of_state(sa, loss), _loss_of_state(sb, loss)

    plain = interpolate(model, sa, sb, loss, ts)
    assert_bit_exact(model, snap)
    assert plain.frame["loss"].iloc[0] == La and plain.frame["loss"].iloc[-1] == Lb
    assert plain.meta["bn"] == "interpolated" and plain.meta["barrier"] is not None

    kept = interpolate(model, sa, sb, loss, ts, recompute_bn=batches, recompute_endpoints=False)
    assert kept.frame["loss"].iloc[0] == La and kept.frame["loss"].iloc[-1] == Lb
    assert not np.allclose(kept.frame["loss"].iloc[1:-1], plain.frame["loss"].iloc[1:-1])
    assert_bit_exact(model, snap)

    # checkpoints whose statistics were recomputed on the same loader: the default (recompute everywhere)
    # reproduces their losses exactly too
    for m in (a, b):
        recompute_bn_stats(m, batches)
    ra, rb = snapshot(a), snapshot(b)
    full = interpolate(model, ra, rb, loss, ts, recompute_bn=batches)
    assert full.frame["loss"].iloc[0] == _loss_of_state(ra, loss)
    assert full.frame["loss"].iloc[-1] == _loss_of_state(rb, loss)
    assert_bit_exact(model, snap)


def test_bn_recomputation_changes_midpoint_running_stats():
    a, b, batches = _checkpoints()
    loss = BatchLoss(batches, F.cross_entropy)
    model, _ = mlp_problem(seed=3)
    seen = {}

    def recording(key):
        def fn(m):
            seen[key] = (m.bn.running_mean.clone(), m.bn.running_var.clone())
            return loss(m)
        return fn

    interpolate(model, snapshot(a), snapshot(b), recording("interp"), [0.5])
    interpolate(model, snapshot(a), snapshot(b), recording("recomp"), [0.5], recompute_bn=batches)
    mid = 0.5 * a.bn.running_mean + 0.5 * b.bn.running_mean
    torch.testing.assert_close(seen["interp"][0], mid)
    assert not torch.allclose(seen["recomp"][0], seen["interp"][0], atol=1e-3)
    assert not torch.allclose(seen["recomp"][1], seen["interp"][1], atol=1e-3)


def test_target_direction_spans_the_segment():
    a, b, batches = _checkpoints()
    loss = BatchLoss(batches, F.cross_entropy)
    d = target_direction(snapshot(a), snapshot(b))
    assert "bn.running_var" in d.names and d.meta["kind"] == "target"
    res = slice_1d(a, loss, d, [0.0, 1.0])
    assert res.frame["loss"].iloc[1] == pytest.approx(loss(b), rel=1e-5)


# ------------------------------------------------------------------------------------------ spectral criteria


def test_spectral_criteria_on_known_spectra():
    nodes = [-1.0, -0.5, 0.0, 1.0, 2.0, 4.0]
    out = spectral_criteria(density=(nodes, [1.0] * 6))
    assert out["lambda_max"] == 4.0 and out["lambda_min"] == -1.0
    assert out["abs_min_max_ratio"] == pytest.approx(0.25)
    assert out["neg_mass"] == pytest.approx(2 / 6) and out["pos_mass"] == pytest.approx(3 / 6)
    assert out["neg_pos_mass_ratio"] == pytest.approx(2 / 3)
    assert out["neg_pos_curvature_ratio"] == pytest.approx(1.5 / 7)

    # extreme eigenvalues from a solver override the Ritz values; PyHessian nested (probes x nodes) lists pool
    out = spectral_criteria([10.0, 3.0], [-2.0, -0.1], density=([[-1.0, 1.0], [-1.0, 3.0]], [[0.25, 0.75]] * 2))
    assert out["abs_min_max_ratio"] == pytest.approx(0.2)
    assert out["neg_pos_mass_ratio"] == pytest.approx(1 / 3)

    psd = spectral_criteria([5.0], [0.5], density={"nodes": [0.5, 1.0, 5.0], "weights": [1, 1, 1]})
    assert psd["neg_pos_mass_ratio"] == 0.0 and psd["abs_min_max_ratio"] == pytest.approx(0.1)
    from types import SimpleNamespace  # duck-typed curvature.SLQResult: (n_probes, m) tensors

    slq_like = SimpleNamespace(nodes=torch.tensor([[-1.0, 1.0], [-1.0, 3.0]]), weights=torch.tensor([[0.25, 0.75]] * 2))
    assert spectral_criteria(density=slq_like)["neg_pos_mass_ratio"] == pytest.approx(1 / 3)
    neg_only = spectral_criteria(density=([-1.0, -2.0], [0.5, 0.5]))
    assert neg_only["neg_pos_mass_ratio"] == math.inf
    assert math.isnan(spectral_criteria([1.0])["lambda_min"])
    # tolerance band: near-zero Ritz values count as neither side
    assert spectral_criteria(density=([-1e-9, 1.0], [0.5, 0.5]), tol=1e-6)["neg_mass"] == 0.0


def test_hf_model_through_batchloss_vmap_matches_sequential():
    from helpers import tiny_model

    model = tiny_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = BatchLoss([{"input_ids": ids, "labels": ids}])  # criterion None: the model's own .loss
    snap = snapshot(model)
    d = random_direction(model, seed=0)
    seq = slice_1d(model, loss, d, [-0.5, 0.0, 0.5])
    vec = slice_1d(model, loss, d, [-0.5, 0.0, 0.5], batch_points=3)
    assert vec.meta["path"] in ("vmap", "sequential")  # sequential only if a transformers version breaks vmap
    np.testing.assert_allclose(vec.frame["loss"], seq.frame["loss"], rtol=1e-5)
    assert seq.frame["loss"].iloc[1] == loss(model)
    assert_bit_exact(model, snap)
