"""Tests of gradsight.stats.compare: known answers, references by enumeration, statistical checks."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from gradsight.stats import compare as C


# ----------------------------------------------------------------------------------------------------
# helpers


def make_stats(X_by_group: dict[str, np.ndarray], kind: str = "q", metric: str = "nuclear",
               blocks: list[int] | None = None) -> pd.DataFrame:
    """layer_stats rows from per-group (n_examples, n_blocks) matrices; idx unique across groups."""
    rows = []
    next_idx = 0
    for group, X in X_by_group.items():
        X = np.asarray(X, dtype=float)
        bl = list(range(X.shape[1])) if blocks is None else blocks
        for e in range(X.shape[0]):
            for j, b in enumerate(bl):
                rows.append((next_idx, group, f"model.layers.{b}.{kind}", b, kind, metric, X[e, j]))
            next_idx += 1
    return pd.DataFrame(rows, columns=list(C.LAYER_STATS_COLUMNS))


def mad_ref(c):
    c = np.asarray(c, float)
    return sum(abs(c[i + 1] - c[i]) for i in range(len(c) - 1)) / (len(c) - 1)


def exact_perm_p(X: np.ndarray, n_a: int, stat) -> float:
    """Exact two-sided permutation p-value over all C(n, n_a) relabellings (observed = first n_a rows)."""
    n = X.shape[0]
    t_obs = abs(stat(X[:n_a], X[n_a:]))
    hits = 0
    total = 0
    for a in itertools.combinations(range(n), n_a):
        b = [i for i in range(n) if i not in a]
        t = abs(stat(X[list(a)], X[b]))
        hits += t >= t_obs - 1e-12
        total += 1
    return hits / total


def get_test(df, test, block=-1):
    sel = df[(df["test"] == test) & (df["block"] == block)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


# ----------------------------------------------------------------------------------------------------
# MAD, RD, segments


def test_mad_known_answers():
    assert C.mad([1, 3, 2]) == pytest.approx(1.5)
    assert C.mad(np.array([[0.0, 1.0, 0.0, 1.0]])) == pytest.approx(1.0)
    assert np.isnan(C.mad([4.0]))
    assert np.isnan(C.mad([]))


def test_rd_known_answer_and_top_order():
    rd, ratios, top = C.relative_difference([1, 2], [2, 1])
    assert rd == pytest.approx(0.75)
    np.testing.assert_allclose(ratios, [1.0, 0.5])
    assert top == [0, 1]
    # ratios [0, 2, 0.5, 1] -> largest first
    rd, ratios, top = C.relative_difference([1, 1, 2, 1], [1, 3, 1, 0], top=3)
    np.testing.assert_allclose(ratios, [0.0, 2.0, 0.5, 1.0])
    assert rd == pytest.approx(3.5 / 4)
    assert top == [1, 3, 2]


def test_rd_zero_reference_uses_eps():
    rd, ratios, top = C.relative_difference([0.0, 2.0], [1e-12, 3.0], eps=1e-10)
    np.testing.assert_allclose(ratios, [1e-12 / 1e-10, 0.5])
    assert rd == pytest.approx((0.01 + 0.5) / 2)
    assert top[0] == 1
    rd, ratios, _ = C.relative_difference([0.0], [1.0], eps=1e-3)
    assert ratios[0] == pytest.approx(1e3)
    with pytest.raises(ValueError):
        C.relative_difference([1, 2], [1, 2, 3])


def test_depth_segments_defaults_and_paper():
    assert C.depth_segments(30) == [("early", 0, 10), ("middle", 10, 20), ("late", 20, 30)]
    assert C.depth_segments(32) == [("early", 0, 10), ("middle", 10, 20), ("late", 20, 32)]
    assert C.depth_segments(28) == [("early", 0, 7), ("middle", 7, 21), ("late", 21, 28)]
    assert C.depth_segments(26) == [("early", 0, 7), ("middle", 7, 20), ("late", 20, 26)]
    assert C.depth_segments(42) == [("early", 0, 12), ("middle", 12, 30), ("late", 30, 42)]
    assert C.depth_segments(24) == [("early", 0, 8), ("middle", 8, 16), ("late", 16, 24)]
    assert C.depth_segments(3) == [("early", 0, 1), ("middle", 1, 2), ("late", 2, 3)]
    for L in (0, 1, 2):
        assert C.depth_segments(L) == []
    # segments tile 0..L-1 for every depth
    for L in range(3, 80):
        seg = C.depth_segments(L)
        assert seg[0][1] == 0 and seg[-1][2] == L
        assert all(s[2] == t[1] and s[1] < s[2] for s, t in zip(seg, seg[1:] + [("", L, L)]))


def test_depth_segments_explicit_and_invalid_bounds():
    assert C.depth_segments(32, (5, 25)) == [("early", 0, 5), ("middle", 5, 25), ("late", 25, 32)]
    for bad in [(0, 10), (10, 10), (12, 10), (10, 32), (10, 40), (-1, 5)]:
        with pytest.raises(ValueError):
            C.depth_segments(32, bad)
    with pytest.raises(ValueError):
        C.depth_segments(2, (1, 2))
    with pytest.raises(ValueError):
        C.depth_segments(-1)


# ----------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=50)
    lo, hi = C.bootstrap_ci(x, rng=np.random.default_rng(7))
    assert lo < x.mean() < hi
    assert (lo, hi) == C.bootstrap_ci(x, rng=np.random.default_rng(7))
    assert (lo, hi) == C.bootstrap_ci(x, rng=7)
    assert (lo, hi) != C.bootstrap_ci(x, rng=8)
    # wider level, wider interval (same draws)
    lo99, hi99 = C.bootstrap_ci(x, ci=0.99, rng=7)
    assert lo99 <= lo and hi <= hi99


def test_bootstrap_ci_degenerate_inputs():
    assert all(np.isnan(C.bootstrap_ci([1.0], rng=0)))
    assert all(np.isnan(C.bootstrap_ci([], rng=0)))
    assert all(np.isnan(C.bootstrap_ci([1.0, np.nan, np.inf], rng=0)))
    lo, hi = C.bootstrap_ci([2.0, 2.0, 2.0], rng=0)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    with pytest.raises(ValueError):
        C.bootstrap_ci([1.0, 2.0], ci=1.5)


def test_bootstrap_ci_width_matches_normal_theory():
    # for a large normal sample the percentile interval is close to mean +- z * s / sqrt(n)
    x = np.random.default_rng(11).normal(size=400)
    se = x.std(ddof=1) / np.sqrt(x.size)
    for ci, z in ((0.95, 1.959964), (0.80, 1.281552)):
        lo, hi = C.bootstrap_ci(x, n_boot=20000, ci=ci, rng=0)
        assert (hi - lo) / (2 * z * se) == pytest.approx(1.0, abs=0.05)
        assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * se)


def test_bootstrap_ci_coverage_normal():
    rng = np.random.default_rng(123)
    mu, reps = 1.0, 300
    covered = 0
    for _ in range(reps):
        x = rng.normal(mu, 1.0, size=40)
        lo, hi = C.bootstrap_ci(x, n_boot=1000, ci=0.95, rng=rng)
        covered += lo <= mu <= hi
    assert 0.90 <= covered / reps <= 0.99


# ----------------------------------------------------------------------------------------------------
# group curves


def test_group_curves_matches_numpy():
    rng = np.random.default_rng(0)
    Xa = rng.normal(size=(5, 3))
    Xb = rng.normal(size=(4, 3)) + 2
    Xb[1, 2] = np.nan  # non-finite values are left out of the cell
    df = make_stats({"b": Xb, "a": Xa})
    out = C.group_curves(df, n_boot=200, seed=3)
    assert list(out.columns) == C.SUMMARY_COLUMNS
    assert list(out["group"]) == ["a"] * 3 + ["b"] * 3
    assert list(out["block"]) == [0, 1, 2, 0, 1, 2]
    for g, X in (("a", Xa), ("b", Xb)):
        sub = out[out["group"] == g].sort_values("block")
        for j in range(3):
            col = X[:, j][np.isfinite(X[:, j])]
            row = sub.iloc[j]
            assert row["n"] == col.size
            assert row["mean"] == pytest.approx(col.mean())
            assert row["sd"] == pytest.approx(col.std(ddof=1))
            assert row["ci_lo"] < row["mean"] < row["ci_hi"]


def test_group_curves_ci_agrees_with_bootstrap_ci():
    X = np.random.default_rng(12).gamma(2.0, size=(300, 2))
    out = C.group_curves(make_stats({"a": X}), n_boot=20000, ci=0.9, seed=0)
    for j in range(2):
        lo, hi = C.bootstrap_ci(X[:, j], n_boot=20000, ci=0.9, rng=99)
        width = hi - lo
        assert out.loc[j, "ci_lo"] == pytest.approx(lo, abs=0.05 * width)
        assert out.loc[j, "ci_hi"] == pytest.approx(hi, abs=0.05 * width)


def test_group_curves_deterministic_and_row_order_free():
    rng = np.random.default_rng(1)
    df = make_stats({"a": rng.normal(size=(20, 4)), "b": rng.normal(size=(15, 4)), "c": rng.normal(size=(1, 4))})
    df = pd.concat([df, make_stats({"a": rng.normal(size=(20, 2))}, kind="v", metric="erank")])
    out1 = C.group_curves(df, n_boot=300, seed=5)
    out2 = C.group_curves(df.sample(frac=1.0, random_state=0), n_boot=300, seed=5)
    pd.testing.assert_frame_equal(out1, out2)
    out3 = C.group_curves(df, n_boot=300, seed=6)
    assert not np.allclose(out1["ci_lo"].dropna(), out3["ci_lo"].dropna())
    # a group's curves do not depend on the other groups present
    only_b = C.group_curves(df[df["group"] == "b"], n_boot=300, seed=5)
    pd.testing.assert_frame_equal(only_b, out1[out1["group"] == "b"].reset_index(drop=True))
    one = out1[out1["group"] == "c"]
    assert (one["n"] == 1).all() and one["sd"].isna().all() and one["ci_lo"].isna().all()
    assert one["mean"].notna().all()


def test_group_curves_empty_and_missing_columns():
    empty = pd.DataFrame(columns=list(C.LAYER_STATS_COLUMNS))
    out = C.group_curves(empty)
    assert list(out.columns) == C.SUMMARY_COLUMNS and len(out) == 0
    with pytest.raises(ValueError, match="value"):
        C.group_curves(empty.drop(columns=["value"]))


# ----------------------------------------------------------------------------------------------------
# MAD and RD tables


def summary_from_curves(curves: dict[tuple[str, str, str], list[float]]) -> pd.DataFrame:
    rows = [(g, k, b, m, v, 0.0, 10, v, v) for (g, k, m), c in curves.items() for b, v in enumerate(c)]
    return pd.DataFrame(rows, columns=C.SUMMARY_COLUMNS)


def test_mad_table_segments():
    rng = np.random.default_rng(2)
    curve = rng.normal(size=30)
    summ = summary_from_curves({("a", "q", "nuclear"): list(curve), ("b", "q", "nuclear"): list(curve * 2)})
    out = C.mad_table(summ)
    assert list(out.columns) == C.MAD_COLUMNS
    a = out[out["group"] == "a"].set_index("segment")
    assert list(a.index) == ["all", "early", "middle", "late"]
    assert a.loc["all", "value"] == pytest.approx(mad_ref(curve))
    assert (a.loc["all", "start"], a.loc["all", "stop"]) == (0, 30)
    for seg, (s, e) in {"early": (0, 10), "middle": (10, 20), "late": (20, 30)}.items():
        assert (a.loc[seg, "start"], a.loc[seg, "stop"]) == (s, e)
        assert a.loc[seg, "value"] == pytest.approx(mad_ref(curve[s:e]))
    b = out[out["group"] == "b"].set_index("segment")
    assert b.loc["all", "value"] == pytest.approx(2 * a.loc["all", "value"])
    custom = C.mad_table(summ, bounds=(3, 27)).set_index(["group", "segment"])
    assert custom.loc[("a", "late"), "value"] == pytest.approx(mad_ref(curve[27:]))
    with pytest.raises(ValueError):
        C.mad_table(summ, bounds=(3, 30))


def test_mad_table_ignores_outside_blocks_and_unsorted_input():
    summ = summary_from_curves({("a", "q", "nuclear"): [1.0, 3.0, 2.0]})
    extra = summ.iloc[[0]].assign(block=-1, mean=100.0)
    summ = pd.concat([summ.iloc[::-1], extra])
    out = C.mad_table(summ).set_index("segment")
    assert out.loc["all", "value"] == pytest.approx(1.5)
    assert np.isnan(out.loc["early", "value"])  # one block per third: no difference to average


def test_rd_table_known_answer():
    summ = summary_from_curves({
        ("ref", "q", "nuclear"): [1.0, 2.0, 4.0],
        ("alt", "q", "nuclear"): [1.0, 3.0, 2.0],
        ("ref", "q", "erank"): [1.0, 1.0, 1.0],
        ("alt", "q", "erank"): [1.0, 1.0, 1.0],
    })
    out = C.rd_table(summ, reference="ref")
    assert list(out.columns) == C.RD_COLUMNS
    row = out[out["metric"] == "nuclear"].iloc[0]
    assert (row["reference"], row["group"]) == ("ref", "alt")
    assert row["rd"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert row["top_blocks"] == "1,2,0"
    assert out[out["metric"] == "erank"].iloc[0]["rd"] == 0.0
    # default reference: first in sorted order ('alt'); metric filter
    dflt = C.rd_table(summ, top=1, metrics=["nuclear"])
    assert list(dflt["reference"]) == ["alt"] and list(dflt["group"]) == ["ref"]
    assert dflt.iloc[0]["rd"] == pytest.approx((0 + 1 / 3 + 1) / 3)
    assert dflt.iloc[0]["top_blocks"] == "2"
    with pytest.raises(ValueError):
        C.rd_table(summ, reference="nope")


# ----------------------------------------------------------------------------------------------------
# Benjamini-Hochberg


def test_benjamini_hochberg_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.20, np.nan])
    # m = 4, sorted 0.01 0.03 0.04 0.20 -> 4p/rank = 0.04 0.06 0.0533 0.20 -> running min from the right
    expected = [0.04, 0.16 / 3, 0.16 / 3, 0.20, np.nan]
    np.testing.assert_allclose(C.benjamini_hochberg(p), expected)
    np.testing.assert_allclose(C.benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])
    np.testing.assert_allclose(C.benjamini_hochberg([0.6, 0.7, 0.9]), [0.9, 0.9, 0.9])
    assert np.isnan(C.benjamini_hochberg([np.nan])).all()


# ----------------------------------------------------------------------------------------------------
# permutation tests


def mean_stat(A, B):
    return A.mean(axis=1).mean() - B.mean(axis=1).mean()


def mad_stat(A, B):
    return mad_ref(A.mean(axis=0)) - mad_ref(B.mean(axis=0))


def rel_mad_stat(A, B):
    ma, mb = A.mean(axis=0), B.mean(axis=0)
    return mad_ref(ma) / np.abs(ma).mean() - mad_ref(mb) / np.abs(mb).mean()


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_permutation_p_matches_exact_enumeration(data_seed):
    rng = np.random.default_rng(data_seed)
    X = rng.normal(size=(6, 4)) + np.array([[0.8], [0.5], [0.9], [0], [0], [0]]) * np.array([1, -1, 1, -1])
    df = make_stats({"a": X[:3], "b": X[3:]})
    n_perm = 20000
    out = C.permutation_tests(df, metrics=["nuclear"], n_perm=n_perm, seed=data_seed)
    for test, stat in (("mean_diff", mean_stat), ("mad_diff", mad_stat), ("rel_mad_diff", rel_mad_stat)):
        row = get_test(out, test)
        assert row["statistic"] == pytest.approx(stat(X[:3], X[3:]))
        exact = exact_perm_p(X, 3, stat)
        assert row["p_value"] == pytest.approx(exact, abs=0.02), (test, exact)
        assert row["n_perm"] == n_perm and row["n_a"] == 3 and row["n_b"] == 3
    for blk in range(4):
        row = get_test(out, "layer_mean_diff", blk)
        stat = lambda A, B, j=blk: A[:, j].mean() - B[:, j].mean()  # noqa: E731
        assert row["p_value"] == pytest.approx(exact_perm_p(X, 3, stat), abs=0.02)


def test_permutation_strong_shift_and_flatness():
    rng = np.random.default_rng(3)
    depth = np.arange(8)
    flat = rng.normal(size=(20, 8)) * 0.3
    zigzag = rng.normal(size=(20, 8)) * 0.3 + 3.0 + 2.0 * (depth % 2)
    out = C.permutation_tests(make_stats({"flat": flat, "zig": zigzag}), metrics=["nuclear"], n_perm=2000)
    mean_row = get_test(out, "mean_diff")
    mad_row = get_test(out, "mad_diff")
    assert mean_row["p_value"] < 0.01 and mean_row["statistic"] < 0
    assert mad_row["p_value"] < 0.01 and mad_row["statistic"] < 0
    assert mad_row["statistic"] == pytest.approx(mad_ref(flat.mean(0)) - mad_ref(zigzag.mean(0)))
    layer = out[out["test"] == "layer_mean_diff"]
    assert len(layer) == 8 and (layer["q_value"] < 0.01).all()
    assert mean_row["p_value"] >= 1 / 2001  # never zero


def test_permutation_null_p_values_roughly_uniform():
    rng = np.random.default_rng(4)
    frames = [make_stats({"a": rng.normal(size=(10, 5)), "b": rng.normal(size=(10, 5))}, kind=f"k{i}")
              for i in range(150)]
    out = C.permutation_tests(pd.concat(frames), metrics=["nuclear"], n_perm=400, seed=1)
    for test in ("mean_diff", "mad_diff"):
        p = out.loc[out["test"] == test, "p_value"].to_numpy()
        assert p.size == 150
        assert 0.4 <= p.mean() <= 0.6
        assert 0.01 <= (p < 0.1).mean() <= 0.2
        assert 0.3 <= (p < 0.5).mean() <= 0.7


def test_permutation_q_values_and_determinism():
    rng = np.random.default_rng(5)
    df = make_stats({"a": rng.normal(size=(8, 6)), "b": rng.normal(size=(9, 6)) + 0.5, "c": rng.normal(size=(7, 6))})
    out = C.permutation_tests(df, metrics=["nuclear", "absent_metric"], n_perm=300, seed=9)
    assert list(out.columns) == C.TESTS_COLUMNS
    assert sorted(set(zip(out["group_a"], out["group_b"]))) == [("a", "b"), ("a", "c"), ("b", "c")]
    for _, sub in out[out["test"] == "layer_mean_diff"].groupby(["group_a", "group_b"]):
        np.testing.assert_allclose(sub["q_value"], C.benjamini_hochberg(sub["p_value"].to_numpy()))
    assert out.loc[out["test"] != "layer_mean_diff", "q_value"].isna().all()
    pd.testing.assert_frame_equal(out, C.permutation_tests(df, metrics=["nuclear"], n_perm=300, seed=9))
    other = C.permutation_tests(df, metrics=["nuclear"], n_perm=300, seed=10)
    assert not np.array_equal(out["p_value"], other["p_value"])
    only = C.permutation_tests(df, pairs=[("b", "a")], metrics=["nuclear"], n_perm=300)
    assert set(only["group_a"]) == {"b"}
    assert get_test(only, "mean_diff")["statistic"] > 0
    with pytest.raises(ValueError):
        C.permutation_tests(df, pairs=[("a", "zzz")])


def test_permutation_small_groups_and_dropped_examples():
    rng = np.random.default_rng(6)
    Xb = rng.normal(size=(5, 3))
    Xb[2, 1] = np.nan  # example dropped for this kind/metric
    df = make_stats({"a": rng.normal(size=(1, 3)), "b": Xb})
    df = df[~((df["idx"] == 4) & (df["block"] == 2))]  # example missing a block: dropped too
    out = C.permutation_tests(df, metrics=["nuclear"], n_perm=100)
    assert len(out) == 3 + 3  # mean_diff, mad_diff, rel_mad_diff + one row per block
    assert out["p_value"].isna().all()
    assert out["note"].str.contains("need at least 2").all()
    assert (out["n_a"] == 1).all() and (out["n_b"] == 3).all() and (out["n_dropped"] == 2).all()
    assert (out["n_perm"] == 0).all()
    # one block only: mean_diff tested, mad_diff NaN with a note
    one_block = make_stats({"a": rng.normal(size=(4, 1)), "b": rng.normal(size=(4, 1))})
    out = C.permutation_tests(one_block, metrics=["nuclear"], n_perm=100)
    assert np.isfinite(get_test(out, "mean_diff")["p_value"])
    for test in ("mad_diff", "rel_mad_diff"):
        row = get_test(out, test)
        assert np.isnan(row["p_value"]) and "MAD" in row["note"]


# ----------------------------------------------------------------------------------------------------
# summarize


def test_summarize_returns_documented_tables():
    rng = np.random.default_rng(7)
    frames = []
    for kind in ("q", "down"):
        for metric in ("nuclear", "erank", "frobenius"):
            frames.append(make_stats({"correct": rng.normal(size=(6, 9)) + 5, "shuffled": rng.normal(size=(5, 9)) + 5},
                                     kind=kind, metric=metric))
    out = C.summarize(pd.concat(frames), n_boot=100, n_perm=100, seed=0)
    assert set(out) == {"summary", "mad", "rd", "tests"}
    assert list(out["summary"].columns) == C.SUMMARY_COLUMNS
    assert list(out["mad"].columns) == C.MAD_COLUMNS
    assert list(out["rd"].columns) == C.RD_COLUMNS
    assert list(out["tests"].columns) == C.TESTS_COLUMNS
    assert len(out["summary"]) == 2 * 2 * 3 * 9
    assert len(out["mad"]) == 2 * 2 * 3 * 4
    assert len(out["rd"]) == 2 * 3 and set(out["rd"]["reference"]) == {"correct"}
    assert set(out["tests"]["metric"]) == {"nuclear", "erank"}  # default tested metrics that are present
    only = C.summarize(pd.concat(frames), reference="shuffled", n_boot=50, n_perm=50, metrics=["frobenius"])
    assert set(only["rd"]["metric"]) == {"frobenius"} and set(only["tests"]["metric"]) == {"frobenius"}
    assert set(only["rd"]["reference"]) == {"shuffled"}


def test_block_without_any_finite_value_is_left_out():
    rng = np.random.default_rng(8)
    Xa, Xb = rng.normal(size=(4, 4)), rng.normal(size=(4, 4)) + 1
    Xa[:, 3] = np.nan
    Xb[:, 3] = np.nan
    df = make_stats({"a": Xa, "b": Xb})
    tests = C.permutation_tests(df, metrics=["nuclear"], n_perm=200)
    assert (tests["n_dropped"] == 0).all() and (tests["n_a"] == 4).all()
    assert sorted(tests.loc[tests["test"] == "layer_mean_diff", "block"]) == [0, 1, 2]
    assert get_test(tests, "mean_diff")["statistic"] == pytest.approx(mean_stat(Xa[:, :3], Xb[:, :3]))
    summ = C.group_curves(df, n_boot=50)
    assert summ.loc[summ["block"] == 3, "n"].eq(0).all() and summ.loc[summ["block"] == 3, "mean"].isna().all()
    mads = C.mad_table(summ).set_index(["group", "segment"])
    assert mads.loc[("a", "all"), "value"] == pytest.approx(mad_ref(Xa[:, :3].mean(0)))
    assert np.isfinite(C.rd_table(summ)["rd"]).all()


def test_relative_mad_separates_level_from_shape():
    """A group whose curve is the other's times 3 has a larger MAD but the same MAD/mean."""
    rng = np.random.default_rng(7)
    shape = 1.0 + 0.5 * np.sin(np.arange(10))
    a = shape * (1 + 0.05 * rng.normal(size=(25, 10)))
    b = 3 * shape * (1 + 0.05 * rng.normal(size=(25, 10)))
    df = make_stats({"a": a, "b": b})
    out = C.permutation_tests(df, metrics=["nuclear"], n_perm=2000)
    assert get_test(out, "mad_diff")["p_value"] < 0.01
    rel = get_test(out, "rel_mad_diff")
    assert rel["statistic"] == pytest.approx(rel_mad_stat(a, b))
    assert rel["p_value"] > 0.05
    mt = C.mad_table(C.group_curves(df, n_boot=50))
    alls = mt[mt["segment"] == "all"].set_index("group")
    assert alls.loc["b", "value"] == pytest.approx(3 * alls.loc["a", "value"], rel=0.1)
    assert alls.loc["b", "rel_value"] == pytest.approx(alls.loc["a", "rel_value"], rel=0.1)
    ma = a.mean(0)
    assert alls.loc["a", "rel_value"] == pytest.approx(mad_ref(ma) / ma.mean())
