"""Tests of gradsight.stats.cosines: every number against a dense reference built from explicit vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from gradsight.stats import cosines as G
from gradsight.stats.resample import rng as _rng


# ----------------------------------------------------------------------------------------------------
# helpers


def random_features(seed=0, sizes=(("a", 6), ("b", 5), ("c", 4)), D=7, shift=0.4):
    """F (n, D) with a group-dependent mean (so cosines are neither all positive nor all ~0), labels."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for k, (name, m) in enumerate(sizes):
        mu = shift * rng.normal(size=D)
        rows.append(mu + rng.normal(size=(m, D)))
        labels += [name] * m
    return np.concatenate(rows), labels


def unit_cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


# ----------------------------------------------------------------------------------------------------
# cosines


def test_pairwise_and_group_mean_cosines_match_dense_reference():
    F, labels = random_features(1)
    K = F @ F.T
    C, valid, n_bad = G.pairwise_cosines(K)
    assert valid.all() and n_bad == 0
    for i, j in itertools.product(range(len(F)), repeat=2):
        assert C[i, j] == pytest.approx(unit_cos(F[i], F[j]), abs=1e-12)

    names, M = G.group_mean_cosines(K, labels)
    assert names == ["a", "b", "c"]
    lab = np.asarray(labels)
    means = {g: F[lab == g].mean(axis=0) for g in names}
    for (ia, a), (ib, b) in itertools.product(enumerate(names), repeat=2):
        assert M[ia, ib] == pytest.approx(unit_cos(means[a], means[b]), abs=1e-12)


def test_cosine_distributions_match_pair_enumeration():
    F, labels = random_features(2)
    K = F @ F.T
    df = G.cosine_distributions(K, labels, n_boot=200, seed=3)
    assert len(df) == 6  # aa, ab, ac, bb, bc, cc
    lab = np.asarray(labels)
    for row in df.itertuples():
        ia, ib = np.flatnonzero(lab == row.group_a), np.flatnonzero(lab == row.group_b)
        if row.group_a == row.group_b:
            pairs = [(i, j) for i in ia for j in ia if i < j]
        else:
            pairs = [(i, j) for i in ia for j in ib]
        vals = np.array([unit_cos(F[i], F[j]) for i, j in pairs])
        assert row.n_pairs == len(pairs)
        assert row.mean == pytest.approx(vals.mean(), abs=1e-12)
        assert row.median == pytest.approx(np.median(vals), abs=1e-12)
        assert row.q05 == pytest.approx(np.quantile(vals, 0.05), abs=1e-12)
        assert row.q95 == pytest.approx(np.quantile(vals, 0.95), abs=1e-12)
        assert row.conflict_rate == pytest.approx((vals < 0).mean())
        assert 0 < row.conflict_rate < 1  # the data make the conflict rate non-trivial
        assert row.mean_ci_lo <= row.mean <= row.mean_ci_hi
        assert row.conflict_ci_lo <= row.conflict_rate <= row.conflict_ci_hi
        assert row.n_excluded_zero == 0 and row.note == ""


def test_cosine_bootstrap_equals_explicit_resampling_of_examples():
    """The weighted-Gram bootstrap equals recomputing over resampled examples' pairs (self-pairs dropped)."""
    F, labels = random_features(3, sizes=(("a", 5), ("b", 4)))
    K = F @ F.T
    n_boot, ci = 60, 0.9
    df = G.cosine_distributions(K, labels, n_boot=n_boot, ci=ci, seed=11).set_index(["group_a", "group_b"])
    lab = np.asarray(labels)
    alpha = (1 - ci) / 2

    def draws(rng, n):  # same draws as _boot_weights
        return rng.integers(0, n, size=(n_boot, n))

    for a, b in [("a", "a"), ("a", "b")]:
        ia, ib = np.flatnonzero(lab == a), np.flatnonzero(lab == b)
        rng = _rng(11, "cosines", a, b)
        Da = draws(rng, ia.size)
        Db = Da if a == b else draws(rng, ib.size)
        means, confl = [], []
        for r in range(n_boot):
            ex_a, ex_b = ia[Da[r]], ib[Db[r]]
            vals = [unit_cos(F[i], F[j]) for p, i in enumerate(ex_a) for q, j in enumerate(ex_b)
                    if (a != b or p != q) and i != j]
            if vals:
                means.append(np.mean(vals))
                confl.append(np.mean(np.array(vals) < 0))
        row = df.loc[(a, b)]
        assert row.mean_ci_lo == pytest.approx(np.quantile(means, alpha), abs=1e-12)
        assert row.mean_ci_hi == pytest.approx(np.quantile(means, 1 - alpha), abs=1e-12)
        assert row.conflict_ci_lo == pytest.approx(np.quantile(confl, alpha), abs=1e-12)
        assert row.conflict_ci_hi == pytest.approx(np.quantile(confl, 1 - alpha), abs=1e-12)


def test_conflict_rate_hand_case():
    # g0 = (1, 0), g1 = (-1, 1), g2 = (1, 1): cos01 < 0, cos02 > 0, cos12 = 0 (not a conflict)
    F = np.array([[1.0, 0.0], [-1.0, 1.0], [1.0, 1.0]])
    df = G.cosine_distributions(F @ F.T, ["x"] * 3, n_boot=50)
    row = df.iloc[0]
    assert row.n_pairs == 3
    assert row.conflict_rate == pytest.approx(1 / 3)
    assert row["mean"] == pytest.approx((-1 / np.sqrt(2) + 1 / np.sqrt(2) + 0.0) / 3)
    assert row["median"] == pytest.approx(0.0, abs=1e-15)


def test_zero_and_nonfinite_examples_are_excluded_and_counted():
    F, labels = random_features(4, sizes=(("a", 5), ("b", 4)))
    F[1] = 0.0  # zero gradient in group a
    K = F @ F.T
    K[6, :] = K[:, 6] = np.nan  # non-finite example in group b
    C, valid, n_bad = G.pairwise_cosines(K)
    assert n_bad == 2 and not valid[1] and not valid[6]
    assert np.isnan(C[1]).all() and np.isnan(C[:, 6]).all() and np.isfinite(C[np.ix_(valid, valid)]).all()

    keep = np.flatnonzero(valid)
    ref = G.cosine_distributions(F[keep] @ F[keep].T, [labels[i] for i in keep], n_boot=20)
    df = G.cosine_distributions(K, labels, n_boot=20)
    cols = ["n_a", "n_b", "n_pairs", "mean", "median", "q05", "q95", "conflict_rate"]
    pd.testing.assert_frame_equal(df[cols], ref[cols])
    assert df.set_index(["group_a", "group_b"])["n_excluded_zero"].to_dict() == {
        ("a", "a"): 1, ("a", "b"): 2, ("b", "b"): 1}

    coh = G.coherence_by_group(K, labels, n_boot=20).set_index("group")
    assert coh.loc["a", "n"] == 4 and coh.loc["a", "n_excluded"] == 1
    lab = np.asarray(labels)
    Fa = F[(lab == "a") & valid]
    assert coh.loc["a", "coherence"] == pytest.approx(
        np.sum(Fa.mean(0) ** 2) / np.mean(np.sum(Fa ** 2, axis=1)), rel=1e-12)

    names, M = G.group_mean_cosines(K, labels)
    Fb = F[(lab == "b") & valid]
    assert M[0, 1] == pytest.approx(unit_cos(Fa.mean(0), Fb.mean(0)), abs=1e-12)


def test_one_example_group_gives_nan_ci_and_note():
    F, labels = random_features(5, sizes=(("a", 4), ("solo", 1)))
    K = F @ F.T
    coh = G.coherence_by_group(K, labels, n_boot=50).set_index("group")
    solo = coh.loc["solo"]
    assert solo["n"] == 1 and solo["coherence"] == pytest.approx(1.0) and solo["alignment"] == pytest.approx(1.0)
    assert np.isnan(solo["ci_lo"]) and np.isnan(solo["ci_hi"])
    assert "1 valid example" in solo["note"]
    assert np.isfinite(coh.loc["a", "ci_lo"]) and coh.loc["a", "note"] == ""

    pairs = G.cosine_distributions(K, labels, n_boot=50).set_index(["group_a", "group_b"])
    within = pairs.loc[("solo", "solo")]
    assert within["n_pairs"] == 0 and np.isnan(within["mean"]) and "no within-group pairs" in within["note"]
    between = pairs.loc[("a", "solo")]
    assert between["n_pairs"] == 4 and np.isfinite(between["mean"])
    assert np.isnan(between["mean_ci_lo"]) and "need at least 2" in between["note"]


# ----------------------------------------------------------------------------------------------------
# coherence


def test_coherence_identical_and_orthogonal():
    n = 5
    v = np.array([0.3, -1.2, 2.0])
    same = G.coherence(np.outer(np.ones(n), np.ones(n)) * (v @ v))
    assert same["coherence"] == pytest.approx(1.0) and same["alignment"] == pytest.approx(n)
    assert same["expected"] == pytest.approx(1 / n)

    orth = G.coherence(np.eye(n) * 2.5)
    assert orth["coherence"] == pytest.approx(1 / n) and orth["alignment"] == pytest.approx(1.0)

    # group CIs collapse onto the exact values (no duplicate-example inflation)
    K = np.zeros((2 * n, 2 * n))
    K[:n, :n] = v @ v
    K[n:, n:] = np.eye(n) * 2.5
    coh = G.coherence_by_group(K, ["same"] * n + ["orth"] * n, n_boot=100).set_index("group")
    assert coh.loc["same", ["ci_lo", "ci_hi"]].tolist() == pytest.approx([1.0, 1.0])
    assert coh.loc["orth", ["ci_lo", "ci_hi"]].tolist() == pytest.approx([1 / n, 1 / n])


def test_coherence_matches_dense_reference_and_subset():
    F, labels = random_features(6)
    K = F @ F.T
    idx = [0, 2, 3, 7, 9]
    c = G.coherence(K, idx)
    sub = F[idx]
    ref = np.sum(sub.mean(0) ** 2) / np.mean(np.sum(sub ** 2, axis=1))
    assert c["coherence"] == pytest.approx(ref, rel=1e-12)
    assert c["alignment"] == pytest.approx(ref * len(idx), rel=1e-12)
    assert c["sq_norm_mean"] == pytest.approx(np.sum(sub.mean(0) ** 2), rel=1e-12)


def test_geometry_table_scopes_and_whole_model_sum():
    F1, labels = random_features(7, D=4)
    F2, _ = random_features(8, D=3)
    grams = {"layer1": F1 @ F1.T, "layer2": F2 @ F2.T}
    grams["all"] = grams["layer1"] + grams["layer2"]
    out = G.geometry_table(grams, labels, n_boot=30, seed=1)
    assert set(out) == {"group_cosines", "pairs", "coherence"}
    assert list(out["group_cosines"].columns) == ["scope", "group_a", "group_b", "cosine"]
    assert out["group_cosines"]["scope"].unique().tolist() == ["layer1", "layer2", "all"]
    assert len(out["group_cosines"]) == 3 * 9 and len(out["pairs"]) == 3 * 6 and len(out["coherence"]) == 3 * 3

    Fall = np.concatenate([F1, F2], axis=1)  # whole-model gradient = concatenation of the layers
    lab = np.asarray(labels)
    gc = out["group_cosines"].set_index(["scope", "group_a", "group_b"])["cosine"]
    assert gc[("all", "a", "c")] == pytest.approx(
        unit_cos(Fall[lab == "a"].mean(0), Fall[lab == "c"].mean(0)), abs=1e-12)
    coh = out["coherence"].set_index(["scope", "group"])
    Fb = F2[lab == "b"]
    assert coh.loc[("layer2", "b"), "coherence"] == pytest.approx(
        np.sum(Fb.mean(0) ** 2) / np.mean(np.sum(Fb ** 2, axis=1)), rel=1e-12)
    # deterministic
    again = G.geometry_table(grams, labels, n_boot=30, seed=1)
    pd.testing.assert_frame_equal(out["pairs"], again["pairs"])


# ----------------------------------------------------------------------------------------------------
# loss terms


def test_term_alignment_matches_dense_reference():
    rng = np.random.default_rng(9)
    n_ex, D = 8, 5
    g_sft = rng.normal(size=(n_ex, D))
    g_kl = -0.5 * g_sft + rng.normal(size=(n_ex, D))  # partly conflicting with sft
    g_aux = rng.normal(size=(n_ex - 2, D))  # only the first 6 examples carry "aux"
    rows, terms, ids = [], [], []
    for e in range(n_ex):
        for name, gmat in (("sft", g_sft), ("kl", g_kl), ("aux", g_aux)):
            if e < len(gmat):
                rows.append(gmat[e])
                terms.append(name)
                ids.append(f"ex{e}")
    F = np.array(rows)
    df = G.term_alignment(F @ F.T, terms, ids, n_boot=100).set_index(["term_a", "term_b"])
    assert list(df.index) == [("aux", "kl"), ("aux", "sft"), ("kl", "sft")]

    c = np.array([unit_cos(g_kl[e], g_sft[e]) for e in range(n_ex)])
    row = df.loc[("kl", "sft")]
    assert row["n_examples"] == n_ex
    assert row["mean"] == pytest.approx(c.mean(), abs=1e-12)
    assert row["median"] == pytest.approx(np.median(c), abs=1e-12)
    assert row["conflict_rate"] == pytest.approx((c < 0).mean())
    assert row["ci_lo"] <= row["mean"] <= row["ci_hi"]
    assert row["mean_gradient_cosine"] == pytest.approx(unit_cos(g_kl.mean(0), g_sft.mean(0)), abs=1e-12)
    assert df.loc[("aux", "sft"), "n_examples"] == n_ex - 2
    assert df.loc[("aux", "sft"), "mean_gradient_cosine"] == pytest.approx(
        unit_cos(g_aux.mean(0), g_sft.mean(0)), abs=1e-12)

    with pytest.raises(ValueError, match="occurs in rows"):
        G.term_alignment(F[:2] @ F[:2].T, ["sft", "sft"], ["ex0", "ex0"])


# ----------------------------------------------------------------------------------------------------
# entanglement


def test_entanglement_methods_cases():
    a = np.array([1.0, 0.0])
    bs = [np.array([0.8, 0.6]), np.array([0.5, 0.0])]
    df = G.entanglement([a @ a] * 2, [b @ b for b in bs], [a @ b for b in bs])
    assert df["regime"].tolist() == ["ideal", "both_up"]
    assert df["sign_chosen"].tolist() == [1, 1] and df["sign_rejected"].tolist() == [-1, 1]
    assert df["ratio"].tolist() == pytest.approx([0.8, 0.5 / 0.25])
    assert df["cos"].tolist() == pytest.approx([0.8, 1.0])
    assert df["delta_chosen"].tolist() == pytest.approx([1 - 0.8, 1 - 0.5])
    assert df["delta_rejected"].tolist() == pytest.approx([0.8 - 1.0, 0.5 - 0.25])
    # swapping chosen and rejected of the second case: both go down
    sw = G.entanglement([0.25], [1.0], [0.5])
    assert sw["regime"].tolist() == ["both_down"]

    s = G.entanglement_summary(pd.concat([df, sw], ignore_index=True), n_boot=200)
    assert s["n_pairs"] == 3 and s["n_invalid"] == 0
    assert (s["share_ideal"], s["share_both_up"], s["share_both_down"]) == pytest.approx((1 / 3,) * 3)
    assert s["mean_ratio"] == pytest.approx((0.8 + 2.0 + 2.0) / 3)
    assert s["ratio_ci_lo"] <= s["mean_ratio"] <= s["ratio_ci_hi"]

    bad = G.entanglement([np.nan], [1.0], [0.5])
    assert bad["regime"].tolist() == ["invalid"]


def _softmax_policy(Phi):
    """log pi(y | theta) for a softmax policy with logits Phi @ theta."""
    def logp(theta, y):
        return torch.log_softmax(Phi @ theta, dim=0)[y]
    return logp


def _grad(logp, theta, y):
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(logp(t, y), t)
    return g


@pytest.mark.parametrize("b_row, expected", [((0.8, 0.6), "ideal"), ((0.5, 0.0), "both_up")])
def test_entanglement_signs_on_tiny_softmax_policy(b_row, expected):
    # 4 actions, 2 parameters, theta = 0 (uniform policy): grad log pi(y) = Phi_y - mean(Phi) = Phi_y,
    # so chosen y=0 and rejected y=1 have a = (1, 0) and b = b_row exactly (the METHODS §7d cases)
    bx, by = b_row
    rest = -(np.array([1.0, 0.0]) + np.array(b_row)) / 2
    Phi = torch.tensor([[1.0, 0.0], [bx, by], [rest[0], rest[1] + 0.3], [rest[0], rest[1] - 0.3]],
                       dtype=torch.float64)
    logp = _softmax_policy(Phi)
    theta = torch.zeros(2, dtype=torch.float64)
    a, b = _grad(logp, theta, 0), _grad(logp, theta, 1)
    assert a.tolist() == pytest.approx([1.0, 0.0]) and b.tolist() == pytest.approx(list(b_row))

    df = G.entanglement([float(a @ a)], [float(b @ b)], [float(a @ b)])
    assert df["regime"].iloc[0] == expected
    d_w, d_l = -1.0, 1.0  # DPO-style, |d_w| = d_l
    for eta in (1e-3, 1e-4):
        theta2 = theta - eta * (d_w * a + d_l * b)
        dw_actual = float(logp(theta2, 0) - logp(theta, 0))
        dl_actual = float(logp(theta2, 1) - logp(theta, 1))
        assert np.sign(dw_actual) == df["sign_chosen"].iloc[0]
        assert np.sign(dl_actual) == df["sign_rejected"].iloc[0]
        assert dw_actual == pytest.approx(eta * df["delta_chosen"].iloc[0], abs=10 * eta ** 2)
        assert dl_actual == pytest.approx(eta * df["delta_rejected"].iloc[0], abs=10 * eta ** 2)


def test_entanglement_general_first_order_on_random_policy():
    gen = torch.Generator().manual_seed(0)
    Phi = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    theta = torch.randn(3, generator=gen, dtype=torch.float64)
    logp = _softmax_policy(Phi)
    a, b = _grad(logp, theta, 2), _grad(logp, theta, 4)
    d_w, d_l = -0.7, 0.4
    df = G.entanglement_general([float(a @ a)], [float(b @ b)], [float(a @ b)], d_w, d_l)
    eta = 1e-4
    theta2 = theta - eta * (d_w * a + d_l * b)
    assert float(logp(theta2, 2) - logp(theta, 2)) == pytest.approx(eta * df["delta_chosen"].iloc[0],
                                                                     abs=10 * eta ** 2)
    assert float(logp(theta2, 4) - logp(theta, 4)) == pytest.approx(eta * df["delta_rejected"].iloc[0],
                                                                     abs=10 * eta ** 2)


# ----------------------------------------------------------------------------------------------------
# PSR / NSR


def test_psr_nsr_decomposition_and_w_reinforce():
    rng = np.random.default_rng(10)
    H = rng.normal(size=(9, 6))  # per-rollout grad log pi
    r = np.array([1, -1, -1, 1, 1, -1, 1, -1, -1])
    out = G.psr_nsr(H @ H.T, r, threshold=0.5, lam=0.1)
    pos = r > 0
    g_pos = -H[pos].sum(0)  # gradient of L_PSR
    g_neg = H[~pos].sum(0)  # gradient of L_NSR
    g_rlvr = -(r[:, None] * H).sum(0)  # gradient of L_RLVR = -sum r log pi
    np.testing.assert_allclose(g_rlvr, g_pos + g_neg, atol=1e-12)
    assert out["n_positive"] == 4 and out["n_negative"] == 5 and out["n_excluded"] == 0
    assert out["sq_norm_psr"] == pytest.approx(g_pos @ g_pos, rel=1e-12)
    assert out["sq_norm_nsr"] == pytest.approx(g_neg @ g_neg, rel=1e-12)
    assert out["inner"] == pytest.approx(g_pos @ g_neg, rel=1e-12)
    assert out["cos"] == pytest.approx(unit_cos(g_pos, g_neg), abs=1e-12)
    assert out["rlvr_norm"] == pytest.approx(np.linalg.norm(g_rlvr), rel=1e-12)
    assert out["w_reinforce_norm"] == pytest.approx(np.linalg.norm(0.1 * g_pos + g_neg), rel=1e-12)
    # the same with 0/1 rewards
    assert G.psr_nsr(H @ H.T, (r > 0).astype(int))["w_reinforce_norm"] == pytest.approx(out["w_reinforce_norm"])


def test_psr_nsr_by_hand_and_validation():
    # h0 = (1, 0) correct, h1 = (0, 2) incorrect: g+ = (-1, 0), g- = (0, 2); ||0.5 g+ + g-|| = sqrt(0.25 + 4)
    H = np.array([[1.0, 0.0], [0.0, 2.0]])
    out = G.psr_nsr(H @ H.T, [1.0, 0.0], lam=0.5)
    assert out["w_reinforce_norm"] == pytest.approx(np.sqrt(4.25))
    assert out["cos"] == pytest.approx(0.0) and out["sq_norm_nsr"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="finite"):
        G.psr_nsr(H @ H.T, [1.0, np.nan])
    with pytest.raises(ValueError, match="length 2"):
        G.psr_nsr(H @ H.T, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="numbers"):
        G.psr_nsr(H @ H.T, ["yes", "no"])
