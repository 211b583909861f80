"""Digits curvature demo: a real trained MLP, its Lanczos spectrum against the dense Hessian, float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sklearn  # noqa: F401  (a dependency: the digits data ship with it)

from gradsight.curvature import HessianOperator  # noqa: E402
from gradsight.curvature.criteria import outlier_split  # noqa: E402
from gradsight.demo.digits import digits_spectrum, train_digits_mlp  # noqa: E402

HIDDEN = 16  # 1,482 parameters: the dense Hessian (1,482 products) takes a few seconds
K = 20


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def trained():
    model, (X, y), (Xte, yte), acc = train_digits_mlp(hidden=HIDDEN, epochs=15, seed=0)
    return model, X, y, acc


@pytest.fixture(scope="module")
def spectrum(trained):
    model, X, y, _ = trained
    return digits_spectrum(model, X, y, k=K, seed=0)


def test_trains_to_high_accuracy(trained):
    model, X, y, acc = trained
    assert acc > 0.9
    assert next(model.parameters()).dtype == torch.float64
    assert not model.training


def test_lanczos_top_k_matches_dense_hessian(trained, spectrum):
    model, X, y, _ = trained
    H = HessianOperator(model, "cross_entropy", [(X, y)])
    assert H.dim <= 5000
    D = H.dense()  # (dim, dim)
    assert torch.allclose(D, D.T, atol=1e-12)
    exact = torch.linalg.eigvalsh(D).flip(0)[:K].numpy()
    np.testing.assert_allclose(spectrum["eigenvalues"], exact, rtol=1e-6)
    # the Hutch++ trace is an estimate: within a few standard errors of the exact trace
    tr = float(torch.diagonal(D).sum())
    assert abs(spectrum["trace"] - tr) < 5 * spectrum["trace_stderr"] + 1e-3 * abs(tr)


def test_outlier_count_is_separated_from_bulk(spectrum):
    n = spectrum["n_outliers"]
    assert isinstance(n, int) and 1 <= n <= K
    assert spectrum["bulk_edge"] < spectrum["eigenvalues"][n - 1]
    assert np.all(spectrum["outliers"] > spectrum["bulk_edge"])
    assert len(spectrum["log_gaps"]) == K - 1
    grid, phi = spectrum["density"]
    assert grid.shape == phi.shape and torch.isfinite(phi).all()
    assert float(phi.sum() * (grid[1] - grid[0])) == pytest.approx(1.0)


def test_outlier_split_rule():
    # a clear gap after 3 values, scale-free
    lam = np.array([10.0, 9.0, 8.0, 1.0, 0.9, 0.8])
    for c in (1.0, 1e-3):
        s = outlier_split(c * lam, 0.0)
        assert s["n_outliers"] == 3 and s["bulk_edge"] == pytest.approx(c * 1.0)
        assert s["gap_margin"] > 1.0


def test_curvature_demo_digits_part(tmp_path):
    # the demo's digits runs (the SmolLM2 part is covered by the pipeline tests on tiny Llamas)
    import json

    import pandas as pd

    from gradsight.demo.run import run_curvature_demo

    runs = run_curvature_demo(tmp_path, lm=False, progress=False)
    assert set(runs) == {"digits", "digits-hessian-plane", "digits-random-plane", "digits-interpolation"}
    for p in runs.values():
        assert (p / "report.html").stat().st_size > 100_000  # plotly inlined
    ev = pd.read_parquet(runs["digits"] / "eigenvalues.parquet")
    top = ev[ev["scope"] == "model"]["eigenvalue"].to_numpy()
    assert len(top) == 20 and np.all(np.diff(top) <= 0) and ev["converged"].all()
    crit = pd.read_parquet(runs["digits"] / "spectral_criteria.parquet").set_index("scope").loc["model"]
    assert 1 <= crit["n_outliers"] <= 19 and crit["bulk_ref"] < crit["bulk_edge"] <= top[0]
    # Hessian plane: the trained weights are the lowest grid point; the axes carry the stored eigenvalues
    man = json.loads((runs["digits-hessian-plane"] / "manifest.json").read_text())["landscape"]
    land = pd.read_parquet(runs["digits-hessian-plane"] / "landscape.parquet")
    assert land["loss"].min() == pytest.approx(man["center_loss"])
    assert [d["eigenvalue"] for d in man["directions"]] == pytest.approx(top[:2].tolist())
    # two independently trained MLPs are not linearly connected: a barrier well above both endpoints' losses
    inter = json.loads((runs["digits-interpolation"] / "manifest.json").read_text())["landscape"]
    assert inter["barrier"] > 0.1
