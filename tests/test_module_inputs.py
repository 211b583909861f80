"""Per-example analyses on a plain nn.Module (one row = one example) against a per-row autograd reference:
`layers_of` spectra and `geometry_of` exact Grams, for 2-D rows and (B, T, d) sequence rows, independent of
how the rows are split into batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradsight.analyses.geometry import geometry_of
from gradsight.analyses.layers import layers_of
from gradsight.measures.spectra import spectral_stats
from gradsight.runs.store import read_layer_stats

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class MeanOverT(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _problem(seq: bool):
    torch.manual_seed(0)
    if seq:  # rows are (T, d) sequences: the first Linear sees T tokens per example
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), MeanOverT(), nn.Linear(6, 3))
        X = torch.randn(12, 5, 4, dtype=DT)
    else:
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X = torch.randn(12, 4, dtype=DT)
    Y = torch.randint(0, 3, (12,))
    return net.to(DT).eval(), X, Y


def _reference(net, X, Y) -> dict[str, torch.Tensor]:
    """{layer: (n, d_out, d_in)} weight gradients of each row's own loss, one backward per row."""
    linear = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    out = {n: [] for n in linear}
    for i in range(len(Y)):
        loss = nn.functional.cross_entropy(net(X[i:i + 1]), Y[i:i + 1])
        for n, g in zip(linear, torch.autograd.grad(loss, [m.weight for m in linear.values()])):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("seq", [False, True], ids=["rows", "sequences"])
def test_layers_of_equals_per_row_svd_and_ignores_batching(seq, tmp_path):
    net, X, Y = _problem(seq)
    groups = ["a", "b", "c"] * 4
    one = layers_of(net, "cross_entropy", [(X, Y)], tmp_path / "one", groups=groups, n_boot=50, n_perm=50)
    split = layers_of(net, "cross_entropy", [(X[:7], Y[:7]), (X[7:], Y[7:])], tmp_path / "split", groups=groups,
                      n_boot=50, n_perm=50)
    ref = _reference(net, X, Y)
    ls = read_layer_stats(one.path)
    assert set(ls["layer"]) == set(ref) and (one.examples["status"] == "ok").all()
    for name, M in ref.items():
        want = spectral_stats(torch.linalg.svdvals(M))
        got = ls[ls["layer"] == name].pivot(index="idx", columns="metric", values="value")
        for metric in ("frobenius", "nuclear", "spectral", "erank"):
            np.testing.assert_allclose(got[metric].to_numpy(), want[metric].numpy(), rtol=1e-6, atol=1e-12,
                                       err_msg=f"{name} {metric}")
    # the loss column is each row's own loss; another batch split gives the same tables
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(net(X[i:i + 1]), Y[i:i + 1])) for i in range(12)]
    np.testing.assert_allclose(one.examples["loss"], losses, rtol=1e-12)
    b = read_layer_stats(split.path)
    pd.testing.assert_frame_equal(ls.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(ls["value"], b["value"], rtol=1e-9, atol=1e-14)
    pd.testing.assert_frame_equal(one.summary, split.summary)
    assert set(one.summary["group"]) == {"a", "b", "c"}


@pytest.mark.parametrize("seq", [False, True], ids=["rows", "sequences"])
def test_geometry_of_exact_gram_equals_per_row_gradients(seq, tmp_path):
    net, X, Y = _problem(seq)
    res = geometry_of(net, "cross_entropy", [(X[:5], Y[:5]), (X[5:], Y[5:])], tmp_path / "geo",
                      groups=["a", "b"] * 6, exact=True, n_boot=50, r_model=16)
    g = load_file(str(res.path / "tensors" / "exact_gram.safetensors"))
    assert g["__idx__"].tolist() == list(range(12))
    for name, M in _reference(net, X, Y).items():
        F = M.reshape(12, -1)
        torch.testing.assert_close(g[name], F @ F.T, rtol=1e-9, atol=1e-12)
    cos = res.tables["group_cosines"]
    assert set(cos["group_a"]) == {"a", "b"} and cos["cosine"].between(-1, 1).all()
    ex = res.examples
    assert (ex["role"] == "loss").all() and np.isfinite(ex["sq_norm"]).all()
