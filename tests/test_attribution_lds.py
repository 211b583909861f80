"""LDS metric, digits retraining ground truth and leave-one-out (gradsight.attribution.lds / .digits).

Known answers (act.md §A.4 item 5): an additive f(S) is graded ~1, random scores ~0, and the metric equals
dattri's ``metric.lds`` (peer test; skipped only when dattri is missing and GRADSIGHT_REQUIRE_PEERS is unset).
The numpy training loops are checked against autograd and torch.optim.SGD (their slow references).
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from gradsight.attribution import digits as D
from gradsight.attribution import lds as L

pytestmark = pytest.mark.usefixtures("one_thread")


def _dattri_metric():
    try:
        import dattri.metric  # noqa: F401
    except ImportError:
        if os.environ.get("GRADSIGHT_REQUIRE_PEERS"):
            raise
        pytest.skip("dattri not installed (pip install --no-deps dattri==0.3.0)")
    return dattri.metric


@pytest.fixture(scope="module")
def small_task():
    return D.load_task(n_train=100, n_test=40)


# -- lds.py -----------------------------------------------------------------------------------------------------

def test_subsets_are_dattris_draw():
    S = L.subsets(37, m=6, alpha=0.3, seed=5)
    assert S.shape == (6, 11) and S.dtype == np.int64
    for j, row in enumerate(S):
        np.testing.assert_array_equal(row, np.random.default_rng(5 + j).choice(37, 11, replace=False))
        assert len(set(row.tolist())) == 11
    np.testing.assert_array_equal(S, L.subsets(37, m=6, alpha=0.3, seed=5))
    assert not np.array_equal(S, L.subsets(37, m=6, alpha=0.3, seed=6))
    with pytest.raises(ValueError, match="alpha"):
        L.subsets(10, alpha=0.0)


def test_lds_additive_model_is_one_and_random_is_zero():
    rng = np.random.default_rng(0)
    n, m, T = 200, 100, 30
    theta = rng.normal(size=(n, T))
    S = L.subsets(n, m, 0.5, seed=1)
    f = np.stack([theta[row].sum(0) for row in S]) + 0.1 * rng.normal(size=(m, T))  # f(S) = sum theta + eps
    good = L.lds(theta, S, f)
    assert good.mean > 0.95 and good.n_valid == T
    bad = L.lds(rng.normal(size=(n, T)), S, f)
    assert abs(bad.mean) < 3 / np.sqrt(m)
    assert L.lds(-theta, S, f).mean < -0.95  # the sign convention matters


def test_lds_nan_se_and_ci():
    rng = np.random.default_rng(1)
    S = L.subsets(50, 20, 0.5, 0)
    y = rng.normal(size=(20, 8))
    y[:, 2] = 3.0  # constant target: no ranking, NaN
    res = L.lds(rng.normal(size=(50, 8)), S, y)
    assert np.isnan(res.per_test[2]) and res.n_valid == 7
    ok = res.per_test[~np.isnan(res.per_test)]
    assert res.mean == pytest.approx(ok.mean()) and res.se == pytest.approx(ok.std(ddof=1) / np.sqrt(7))
    lo, hi = res.ci(0.95)
    assert lo == pytest.approx(res.mean - 1.959964 * res.se, rel=1e-5) and hi - res.mean == pytest.approx(
        res.mean - lo)
    with pytest.raises(ValueError, match="targets"):
        L.lds(rng.normal(size=(50, 8)), S, y[:, :3])
    with pytest.raises(ValueError, match="subsets"):
        L.lds(rng.normal(size=(10, 8)), S, y)


def test_spearman_columns_equals_scipy_with_ties():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, size=(30, 6)).astype(float)  # many ties
    b = rng.normal(size=(30, 6))
    got = L.spearman_columns(a, b)
    want = [stats.spearmanr(a[:, x], b[:, x]).correlation for x in range(6)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # dattri's own NaN column warning
def test_lds_equals_dattri():
    metric = _dattri_metric()
    rng = np.random.default_rng(3)
    n, m, T = 120, 40, 25
    S = L.subsets(n, m, 0.5, seed=7)
    scores = rng.normal(size=(n, T))
    y = rng.normal(size=(m, T))
    y[:, 4] = 1.0  # NaN column
    y[:, 5] = np.round(y[:, 5])  # ties in the targets
    want = metric.lds(torch.tensor(scores), (torch.tensor(y), torch.tensor(S)))[0].numpy()
    got = L.lds(scores, S, y).per_test
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-12)


def test_subsets_and_seeds_equal_dattri_retrain(tmp_path):
    _dattri_metric()
    from dattri.model_util.retrain import retrain_lds

    seen = []

    def train_func(dataloader, seed=None):
        seen.append(seed)
        return torch.nn.Linear(1, 1)

    ds = torch.utils.data.TensorDataset(torch.zeros(30, 1))
    retrain_lds(train_func, torch.utils.data.DataLoader(ds, batch_size=4), str(tmp_path), num_subsets=4,
                subset_ratio=0.5, num_runs_per_subset=2, seed=11)
    S = L.subsets(30, 4, 0.5, seed=11)
    for j in range(4):
        idx = np.loadtxt(tmp_path / str(j) / "indices.txt", dtype=np.int64)
        np.testing.assert_array_equal(idx, S[j])
    assert seen == [11 + j * 2 + r for j in range(4) for r in range(2)]


def test_noise_ceiling_pairs():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(30, 10))
    runs = base + 0.5 * rng.normal(size=(3, 30, 10))
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([np.nanmean(L.spearman_columns(runs[a], runs[b])) for a, b in pairs])
    assert L.noise_ceiling(runs) == pytest.approx(want, abs=1e-14)
    assert L.noise_ceiling(np.stack([base, base])) == pytest.approx(1.0)
    assert 0.3 < L.noise_ceiling(runs) < 0.99
    with pytest.raises(ValueError, match="targets_runs"):
        L.noise_ceiling(base[None])


def test_loo_correlation_matches_scipy():
    rng = np.random.default_rng(5)
    p, d = rng.normal(size=(25, 4)), rng.normal(size=(25, 4))
    res = L.loo_correlation(p, d)
    np.testing.assert_allclose(res.per_test_pearson, [stats.pearsonr(p[:, x], d[:, x])[0] for x in range(4)],
                               atol=1e-12)
    np.testing.assert_allclose(res.per_test_spearman, [stats.spearmanr(p[:, x], d[:, x])[0] for x in range(4)],
                               atol=1e-12)
    assert L.loo_correlation(p[:, 0], 2 * p[:, 0] + 1).pearson == pytest.approx(1.0)


# -- digits.py --------------------------------------------------------------------------------------------------

def test_task_split_is_stratified_and_standardised():
    task = D.load_task()
    assert task.X_train.shape == (1000, 64) and task.X_test.shape == (500, 64)
    assert task.X_train.dtype == torch.float64
    counts = np.bincount(task.y_train.numpy(), minlength=10)
    assert counts.min() >= 97 and counts.max() <= 102  # stratified: ~100 of each digit
    assert task.X_train.mean(0).abs().max() < 1e-12
    assert D.load_task().fingerprint == task.fingerprint != D.load_task(dtype=torch.float32).fingerprint
    assert D.load_task(dtype=torch.float32).X_test.dtype == torch.float32


def test_lr_objective_matches_autograd(small_task):
    rng = np.random.default_rng(6)
    w = rng.normal(size=650)
    X, y = small_task.X_train.numpy(), small_task.y_train.numpy()
    Xa = np.hstack([X, np.ones((len(X), 1))])
    loss, grad = D._lr_objective(w, Xa, np.eye(10)[y], 1e-3)
    wt = torch.tensor(w, requires_grad=True)
    Wb = wt.reshape(10, 65)
    ref = F.cross_entropy(torch.tensor(X) @ Wb[:, :64].T + Wb[:, 64], torch.tensor(y)) + 0.5e-3 * (
        Wb[:, :64] ** 2).sum()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(grad, wt.grad.numpy(), rtol=0, atol=1e-13)


def test_mlp_loop_equals_torch_sgd(small_task):
    recipe = D.Recipe(epochs=3)
    idx = np.arange(0, 100, 2)  # 50 rows: two batches of 32 and 18 per epoch
    got = D.train(small_task, "mlp", idx, seed=3, recipe=recipe, checkpoints=3)
    ref = D.make_model("mlp", 3)
    opt = torch.optim.SGD(ref.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    X, y = small_task.X_train[idx], small_task.y_train[idx]
    for order in D.epoch_orders(len(idx), recipe.epochs, 3):
        for s in range(0, len(idx), recipe.batch_size):
            b = torch.as_tensor(order[s:s + recipe.batch_size])
            opt.zero_grad()
            F.cross_entropy(ref(X[b]), y[b]).backward()
            opt.step()
    for (name, p), q in zip(ref.named_parameters(), got.model.parameters()):
        torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-12, msg=name)
    assert [lr for _, lr in got.checkpoints] == [recipe.lr] * 3
    assert all(torch.equal(got.checkpoints[-1][0][k], v) for k, v in got.model.state_dict().items())
    assert not torch.equal(got.checkpoints[0][0]["0.weight"], got.model.state_dict()["0.weight"])


def test_lr_converged_and_deterministic(small_task):
    a = D.train(small_task, "lr", seed=0)
    w, b = a.model.weight.detach().clone().requires_grad_(), a.model.bias.detach().clone().requires_grad_()
    obj = F.cross_entropy(small_task.X_train @ w.T + b, small_task.y_train) + 0.5e-3 * (w ** 2).sum()
    obj.backward()  # autograd gradient of the objective at the returned optimum
    assert max(w.grad.abs().max().item(), b.grad.abs().max().item()) < 1e-9
    assert abs(b.detach().sum().item()) < 1e-12  # centred bias
    again = D.train(small_task, "lr", seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), again.model.parameters()))
    other = D.train(small_task, "lr", seed=1)
    for p, q in zip(a.model.parameters(), other.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_targets_definitions(small_task):
    model = D.train(small_task, "mlp", seed=0, recipe=D.Recipe(epochs=2)).model
    X, y = small_task.X_test, small_task.y_test
    out = D.targets(model, X, y)
    z = model(X).detach()
    want_margin = [z[i, y[i]].item() - torch.logsumexp(z[i, torch.arange(10) != y[i]], 0).item()
                   for i in range(len(y))]
    np.testing.assert_allclose(out["margin"], want_margin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["neg_loss"], -F.cross_entropy(z, y, reduction="none").numpy(), atol=1e-12)
    p = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1).numpy()  # margin = log(p / (1 - p))
    np.testing.assert_allclose(out["margin"], np.log(p / (1 - p)), rtol=1e-8)


class _Stop(Exception):
    pass


def test_ground_truth_determinism_cache_and_resume(small_task, tmp_path):
    kw = dict(m=10, alpha=0.5, runs=2, seed=4)
    ref = D.ground_truth(small_task, "mlp", **kw)
    assert ref.margin.shape == ref.neg_loss.shape == (2, 10, 40) and ref.n_trained == 20
    np.testing.assert_array_equal(ref.subsets, L.subsets(100, 10, 0.5, 4))
    np.testing.assert_array_equal(ref.seeds, 4 + np.arange(10)[:, None] * 2 + np.arange(2))
    again = D.ground_truth(small_task, "mlp", **kw)
    np.testing.assert_array_equal(again.margin, ref.margin)
    assert not np.array_equal(ref.margin[0], ref.margin[1])  # runs differ in seed
    one = D.targets(D.train(small_task, "mlp", ref.subsets[3], int(ref.seeds[3, 1])).model, small_task.X_test,
                    small_task.y_test)
    np.testing.assert_array_equal(ref.neg_loss[1, 3], one["neg_loss"])

    calls = []

    def die_after_three(done, total):
        calls.append((done, total))
        if done == 6:
            raise _Stop  # a kill after three finished subsets

    with pytest.raises(_Stop):
        D.ground_truth(small_task, "mlp", cache=tmp_path, progress=die_after_three, **kw)
    assert not list(tmp_path.glob("*.safetensors")) and len(list(tmp_path.glob("*.parts/*"))) == 3
    resumed = D.ground_truth(small_task, "mlp", cache=tmp_path, **kw)
    assert resumed.n_trained == 14  # only the seven missing subsets were retrained
    for name in ("margin", "neg_loss", "subsets", "seeds"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(ref, name))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob("*.parts"))
    loaded = D.ground_truth(small_task, "mlp", cache=tmp_path, **kw)
    assert loaded.n_trained == 0
    np.testing.assert_array_equal(loaded.margin, ref.margin)
    assert D.ground_truth(small_task, "mlp", cache=tmp_path, **{**kw, "seed": 5}).n_trained == 20  # new key
    assert calls[:3] == [(2, 20), (4, 20), (6, 20)]


def test_ground_truth_ceiling_and_lds_of_lr(small_task):
    gt = D.ground_truth(small_task, "lr", m=10, runs=2)
    assert gt.ceiling("margin") > 0.999  # convex: runs differ only by the optimiser's tolerance
    assert gt.lds(np.zeros((100, 40))).n_valid == 0  # constant predictions: nothing to rank


def test_loo_ground_truth_agrees_with_influence(small_task):
    """Exact LOO on the convex LR vs the first-order influence prediction g_q^T H^-1 g_i (Koh & Liang)."""
    test_idx, drop = np.arange(8), np.arange(0, 100, 6)
    delta = D.loo_ground_truth(small_task, test_idx, drop)
    assert delta.shape == (len(drop), len(test_idx)) and np.abs(delta).max() > 1e-4
    full = D.train(small_task, "lr").model
    w0 = torch.cat([full.weight, full.bias[:, None]], 1).detach().ravel()  # (650,)
    X, y = small_task.X_train, small_task.y_train

    def obj(w):
        Wb = w.reshape(10, 65)
        return F.cross_entropy(X @ Wb[:, :64].T + Wb[:, 64], y) + 0.5e-3 * (Wb[:, :64] ** 2).sum()

    def per_ex(w, Xr, yr):
        Wb = w.reshape(10, 65)
        return F.cross_entropy(Xr @ Wb[:, :64].T + Wb[:, 64], yr, reduction="none")

    H = torch.autograd.functional.hessian(obj, w0) + 1e-9 * torch.eye(650)  # bias-shift direction is flat
    Gi = torch.autograd.functional.jacobian(lambda w: per_ex(w, X[drop], y[drop]), w0)  # (n_drop, 650)
    Gq = torch.autograd.functional.jacobian(lambda w: per_ex(w, small_task.X_test[test_idx],
                                                            small_task.y_test[test_idx]), w0)
    pred = (Gi @ torch.linalg.solve(H, Gq.T)).numpy() / (len(y) - 1)  # (n_drop, T)
    res = L.loo_correlation(pred, delta)
    assert res.pearson > 0.9 and res.spearman > 0.8
