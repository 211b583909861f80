"""G-Vendi (stats/diversity.py): closed-form cases, duality, streaming/merge, leave-one-out, greedy selection."""

import math

import numpy as np
import pytest
import torch

from gradsight.stats.diversity import (
    GVendiAccumulator,
    g_vendi,
    g_vendi_by_group,
    g_vendi_primal,
    greedy_select,
    marginal_contributions,
    vendi_from_eigenvalues,
)


def _rand(n, d, seed=0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_identical_rows_score_one():
    F = torch.tensor([[3.0, -1.0, 2.0]]).repeat(7, 1)
    assert g_vendi(F) == pytest.approx(1.0, abs=1e-12)
    assert g_vendi_primal(F) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_orthonormal_rows_score_k(k):
    Q, _ = torch.linalg.qr(_rand(8, 8))
    F = Q[:k] * torch.arange(1, k + 1, dtype=torch.float64).unsqueeze(1)  # scaled: still k directions
    assert g_vendi(F) == pytest.approx(k, rel=1e-12)
    assert g_vendi(F, q=2.0) == pytest.approx(k, rel=1e-12)


def test_two_orthogonal_groups_score_two():
    F = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert g_vendi(F) == pytest.approx(2.0, rel=1e-12)
    # unequal group sizes: entropy of (1/4, 3/4)
    F3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert g_vendi(F3) == pytest.approx(math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))), rel=1e-12)


@pytest.mark.parametrize("n,d", [(30, 10), (10, 30)])
@pytest.mark.parametrize("q", [1.0, 0.5, 2.0, math.inf])
def test_primal_equals_dual(n, d, q):
    F = _rand(n, d, seed=n)
    assert abs(g_vendi(F, q) - g_vendi_primal(F, q)) < 1e-10


def test_row_scaling_invariance():
    F = _rand(20, 6)
    c = torch.rand(20, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 100 + 1e-3
    assert g_vendi(F * c) == pytest.approx(g_vendi(F), rel=1e-12)
    assert g_vendi(F) != pytest.approx(g_vendi(F[:10]), rel=1e-3)  # sanity: the score does depend on rows


def test_streaming_chunks_equal_one_shot():
    F = _rand(53, 7)
    acc = GVendiAccumulator()
    for s in range(0, 53, 10):
        acc.update(F[s:s + 10])
    assert acc.n == 53
    assert acc.score() == pytest.approx(g_vendi(F), rel=1e-12)
    assert acc.score(3.0) == pytest.approx(g_vendi(F, 3.0), rel=1e-12)


def test_merge_and_state_roundtrip():
    F = _rand(40, 5)
    a, b = GVendiAccumulator().update(F[:15]), GVendiAccumulator().update(F[15:])
    # as an all_reduce would: sum the plain-tensor states
    sa, sb = a.state_dict(), b.state_dict()
    summed = GVendiAccumulator.from_state({k: sa[k] + sb[k] for k in sa})
    assert summed.n == 40
    assert summed.score() == pytest.approx(g_vendi(F), rel=1e-12)
    assert a.merge(b).score() == pytest.approx(g_vendi(F), rel=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        a.merge(GVendiAccumulator().update(_rand(3, 4)))


def test_zero_and_nonfinite_rows_skipped_and_counted():
    F = _rand(10, 4)
    bad = F.clone()
    bad[2] = 0
    bad[5, 1] = float("nan")
    bad[7, 0] = float("inf")
    acc = GVendiAccumulator().update(bad)
    assert acc.n_skipped == 3 and acc.n == 7
    keep = [i for i in range(10) if i not in (2, 5, 7)]
    assert acc.score() == pytest.approx(g_vendi(F[keep]), rel=1e-12)
    assert math.isnan(GVendiAccumulator().update(torch.zeros(3, 4)).score())


def test_renyi_order_by_hand():
    lam = np.array([0.5, 0.3, 0.2, 0.0, -1e-18])
    p = np.array([0.5, 0.3, 0.2])
    for q in (0.5, 2.0, 3.0):
        assert vendi_from_eigenvalues(lam, q) == pytest.approx((p ** q).sum() ** (1 / (1 - q)), rel=1e-12)
    assert vendi_from_eigenvalues(lam, 1.0) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert vendi_from_eigenvalues(lam * 7, 2.0) == pytest.approx(1 / (p ** 2).sum(), rel=1e-12)  # scale-free
    assert vendi_from_eigenvalues(lam, math.inf) == pytest.approx(2.0)
    assert vendi_from_eigenvalues(lam, 0.0) == 3
    # the q -> 1 limit is continuous
    assert vendi_from_eigenvalues(lam, 1 + 1e-7) == pytest.approx(vendi_from_eigenvalues(lam, 1.0), rel=1e-6)
    # on features, q = 2 has the closed form n^2 / ||K||_F^2
    F = _rand(12, 5)
    X = F / F.norm(dim=1, keepdim=True)
    assert g_vendi(F, 2.0) == pytest.approx(144 / float((X @ X.T).pow(2).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="q must be"):
        vendi_from_eigenvalues(lam, -1.0)


def test_by_group():
    F = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    groups = ["a", "a", "b", "b", "c", "c"]
    out = g_vendi_by_group(F, groups)
    assert list(out) == ["a", "b", "c", "__all__"]
    assert out["a"] == pytest.approx(2.0) and out["b"] == pytest.approx(1.0) and out["c"] == pytest.approx(2.0)
    assert out["__all__"] == pytest.approx(g_vendi(F))
    with pytest.raises(ValueError, match="group labels"):
        g_vendi_by_group(F, groups[:-1])


@pytest.mark.parametrize("n,d", [(12, 30), (25, 6)])  # kernel route and D x D downdate route
def test_marginal_contributions_equal_brute_force(n, d):
    F = _rand(n, d, seed=3)
    F[4] = F[1] * 2  # a duplicate direction
    F[7] = 0  # skipped row: contributes exactly 0
    mc = marginal_contributions(F)
    full = g_vendi(F)
    brute = np.array([full - g_vendi(torch.cat([F[:i], F[i + 1:]])) for i in range(n)])
    assert mc.shape == (n,)
    np.testing.assert_allclose(mc, brute, atol=1e-10)
    assert mc[7] == 0.0
    # for q != 1 as well
    np.testing.assert_allclose(
        marginal_contributions(F, q=2.0),
        [g_vendi(F, 2.0) - g_vendi(torch.cat([F[:i], F[i + 1:]]), 2.0) for i in range(n)], atol=1e-10)


def test_marginal_contributions_flag_redundancy():
    # three orthogonal directions, the first one over-represented: its copies have the lowest contribution
    e = torch.eye(3, dtype=torch.float64)
    F = torch.stack([e[0], e[0], e[0], e[0], e[1], e[2]])
    mc = marginal_contributions(F)
    assert mc[:4].max() < mc[4:].min()


def _clusters(n_per=5, n_clusters=4, d=16, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    centres = Q[:n_clusters]
    F = centres.repeat_interleave(n_per, 0) + noise * torch.randn(n_per * n_clusters, d, dtype=torch.float64,
                                                                   generator=g)
    return F, torch.arange(n_clusters).repeat_interleave(n_per)


def test_greedy_picks_one_per_cluster_first():
    F, lab = _clusters()
    perm = torch.randperm(F.shape[0], generator=torch.Generator().manual_seed(5))
    F, lab = F[perm], lab[perm]
    picks = greedy_select(F, 6)
    assert picks[0] == 0  # rule: every singleton scores 1, ties go to the lowest index
    assert len(set(picks)) == 6
    assert sorted(lab[picks[:4]].tolist()) == [0, 1, 2, 3]  # one per cluster before any duplicate
    # the greedy result is the greedy rule, checked by brute force on each step
    chosen = []
    for _ in range(6):
        scores = {c: g_vendi(F[chosen + [c]]) for c in range(F.shape[0]) if c not in chosen}
        best = max(scores.values())
        chosen.append(min(c for c, s in scores.items() if s >= best - 1e-10 * best))
    assert picks == chosen


def test_greedy_candidates_and_dual_route():
    F, lab = _clusters(n_per=3, n_clusters=3, d=3)  # k > D exercises the D x D route
    picks = greedy_select(F, 5, candidates=[8, 1, 2, 3, 4, 5, 6, 7])
    assert picks[0] == 1 and 0 not in picks
    assert sorted(lab[picks[:3]].tolist()) == [0, 1, 2]
    F[1] = 0
    assert 1 not in greedy_select(F, 8)
    with pytest.raises(ValueError, match="number of valid candidates"):
        greedy_select(F, 9)
    with pytest.raises(ValueError, match="candidate indices"):
        greedy_select(F, 1, candidates=[100])
