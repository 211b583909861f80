"""Known-answer tests of the image gradient-inversion attacks and metrics (act.md C.5 items 1-2, C.4 grid)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsight.privacy.attacks import (analytic_linear, analytic_linear_single, batch_labels, dlg, idlg_label,
                                       inverting_gradients, model_gradient, total_variation)
from gradsight.privacy.digits import (clipped_noisy_mean, digits_attack_grid, digits_net, load_digits01,
                                      per_example_grads)
from gradsight.privacy.metrics import match, matched_psnr, psnr, rouge_n, token_scores


def _lin(dtype, seed=0, d_in=64, d_out=10):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).to(dtype)


# ------------------------------------------------------------------------------------------- analytic (C.5 #1)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_analytic_linear_batch1_exact(dtype, tol):
    lin = _lin(dtype)
    x = torch.rand(1, 64, dtype=dtype)
    g = model_gradient(lin, x, torch.tensor([3]))
    cand, rows = analytic_linear(g["weight"], g["bias"])
    assert len(rows) == 10  # softmax-CE: every output row has a non-zero delta
    assert (cand - x).abs().max() < tol
    assert (analytic_linear_single(g["weight"], g["bias"]) - x[0]).abs().max() < tol


def test_analytic_batch_row_driven_by_one_example_is_exact():
    """First layer of a ReLU MLP: unit 0 is active for example 0 only, unit 1 for both -> row 0 is x_0 exactly."""
    torch.manual_seed(1)
    x = torch.rand(2, 64, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(64, 3), nn.ReLU(), nn.Linear(3, 4)).double()
    with torch.no_grad():  # pre-activation of unit 0: (x_0 - x_1) . (x - m) with m the midpoint: > 0 only at x_0
        d, m = x[0] - x[1], 0.5 * (x[0] + x[1])
        net[0].weight[0] = d
        net[0].bias[0] = -(d @ m)
        net[0].weight[1] = 0.1
        net[0].bias[1] = 1.0  # active for both
        net[0].weight[2] = -1.0
        net[0].bias[2] = -1.0  # dead for both
    g = model_gradient(net, x, torch.tensor([0, 1]))
    cand, rows = analytic_linear(g["0.weight"], g["0.bias"])
    assert rows.tolist() == [0, 1]  # the dead unit has db = 0 and is dropped
    assert (cand[0] - x[0]).abs().max() < 1e-12
    assert min((cand[1] - x[0]).abs().max(), (cand[1] - x[1]).abs().max()) > 1e-3  # a mixture, not an example
    assert matched_psnr(cand, x)[0] > 190  # the Hungarian pairing finds the exact candidate


def test_analytic_last_layer_unique_label():
    """Softmax regression with the label-logit loss -z_y (delta_e = -onehot(y_e)): the row of a label unique in
    the batch is that example exactly, the row of a repeated label is the mean of its examples."""
    lin = _lin(torch.float64, seed=2)
    x = torch.rand(4, 64, dtype=torch.float64)
    y = torch.tensor([2, 5, 5, 7])
    g = model_gradient(lin, x, y, loss_fn=lambda z, t: -z.gather(1, t[:, None]).mean())
    cand, rows = analytic_linear(g["weight"], g["bias"])
    assert rows.tolist() == [2, 5, 7]
    assert (cand[0] - x[0]).abs().max() < 1e-12 and (cand[2] - x[3]).abs().max() < 1e-12
    assert (cand[1] - 0.5 * (x[1] + x[2])).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------- labels (C.5 #2)
def test_idlg_100_random_relu_examples():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    X, Y = torch.randn(100, 20, dtype=torch.float64), torch.randint(0, 10, (100,))
    hits = [idlg_label(model_gradient(net, X[i:i + 1], Y[i:i + 1])["2.weight"]) == int(Y[i]) for i in range(100)]
    assert sum(hits) == 100


def test_batch_labels_hand_counts_and_batch1():
    # db_c = pbar - n_c / B with the same pbar = 0.1 for every class: counts {1: 3, 4: 1, 9: 2}, B = 6
    n = torch.zeros(10, dtype=torch.float64)
    n[1], n[4], n[9] = 3, 1, 2
    db = 0.1 - n / 6
    assert batch_labels(torch.zeros(10, 4), db, 6).tolist() == [1, 1, 1, 4, 9, 9]
    net = digits_net("relu", seed=0)
    X, y = load_digits01()
    for i in range(5):
        g = model_gradient(net, X[i:i + 1], y[i:i + 1])
        assert batch_labels(g["2.weight"], g["2.bias"], 1).tolist() == [int(y[i])]


# ------------------------------------------------------------------------------------------- metrics by hand
def test_psnr_and_match_by_hand():
    x = torch.zeros(2, 4, dtype=torch.float64)
    x[1] = 1.0
    xh = torch.stack([torch.full((4,), 0.9), torch.full((4,), 0.1), torch.full((4,), 0.5)]).double()
    # MSE(0.1 vs 0) = 0.01 -> 20 dB; MSE(0.9 vs 1) = 0.01 -> 20 dB; exact -> max_db
    assert torch.allclose(psnr(xh[[1, 0]], x), torch.tensor([20.0, 20.0], dtype=torch.float64))
    assert psnr(x, x).tolist() == [200.0, 200.0]
    assert torch.allclose(psnr(xh[1:2], x[:1], data_range=2.0), torch.tensor([10 * math.log10(4 / 0.01)]).double())
    rh, rt = match(xh, x)  # K = 3 > B = 2: row 2 (0.5, MSE 0.25 to both) is left out
    assert rh.tolist() == [1, 0] and rt.tolist() == [0, 1]
    rh, rt = match(xh[2:], x)  # K = 1 < B: one pair, the cheaper (tie -> either) true row
    assert rh.tolist() == [0] and len(rt) == 1


def test_token_scores_and_rouge_by_hand():
    s = token_scores([1, 2, 3, 3], [2, 3, 4, 5])
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)) and s["exact"] is False
    assert token_scores([5, 4], [4, 5, 5])["exact"] is True
    r1 = rouge_n("a a b c".split(), "a b b d".split(), 1)  # clipped overlap: a 1, b 1 -> 2 of 4 each
    assert (r1["precision"], r1["recall"], r1["f1"]) == (0.5, 0.5, 0.5)
    r2 = rouge_n("a b c".split(), "a b d a b".split(), 2)  # pred {ab, bc}, true {ab x2, bd, da} -> 1
    assert r2["precision"] == 0.5 and r2["recall"] == 0.25 and r2["f1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="n >= 1"):
        rouge_n([1], [1], 0)


def test_total_variation_by_hand():
    x = torch.tensor([[0.0, 1.0], [1.0, 3.0]]).reshape(1, 4)
    # horizontal |1-0|, |3-1| -> mean 1.5; vertical |1-0|, |3-1| -> mean 1.5
    assert float(total_variation(x, (2, 2))) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="image_hw"):
        total_variation(torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------- optimisation attacks
def test_dlg_recovers_one_image():
    net = digits_net("sigmoid", seed=0)  # DLG's setting: Sigmoid, U(-0.5, 0.5) weights
    X, y = load_digits01()
    x = X[20:21]
    before = [p.detach().clone() for p in net.parameters()]
    xh, ys = dlg(net, model_gradient(net, x, y[20:21]), (1, 64), 10, iters=20)
    assert float(psnr(xh.clamp(0, 1), x)[0]) > 30
    assert int(ys.argmax()) == int(y[20])
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # the model is left untouched
    assert all(p.grad is None for p in net.parameters())


def test_inverting_gradients_beats_start_and_random():
    net = digits_net("relu", seed=0)
    X, y = load_digits01()
    xb, yb = X[10:11], y[10:11]
    target = model_gradient(net, xb, yb)
    xh = inverting_gradients(net, target, yb, (1, 64), iters=150, seed=0)
    start = torch.randn((1, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(0, 1)
    p_hat, p_start, p_rand = (float(psnr(v, xb)[0]) for v in (xh, start, X[11:12]))
    assert p_hat > p_start + 5 and p_hat > p_rand + 5
    assert xh.min() >= 0 and xh.max() <= 1  # the box


# ------------------------------------------------------------------------------------------- grid plumbing
def test_clipped_noisy_mean_matches_loop():
    net = digits_net("sigmoid", seed=1)
    X, y = load_digits01()
    xb, yb = X[:5], y[:5]
    pe = per_example_grads(net, xb, yb)
    loop = [model_gradient(net, xb[i:i + 1], yb[i:i + 1]) for i in range(5)]
    for n in pe:
        assert torch.allclose(pe[n], torch.stack([g[n] for g in loop]), atol=1e-12)
    # C = infinity, sigma = 0: the plain mean gradient (C.5 #3)
    plain = clipped_noisy_mean(pe, float("inf"), 0.0, torch.Generator())
    full = model_gradient(net, xb, yb)
    assert all(torch.allclose(plain[n], full[n], atol=1e-12) for n in full)
    # C finite: hand clip factors min(1, C / (||g_e|| + 1e-6)) on the loop's per-example gradients
    norms = torch.stack([torch.sqrt(sum(v.pow(2).sum() for v in g.values())) for g in loop])
    C = float(norms.median())
    got = clipped_noisy_mean(pe, C, 0.0, torch.Generator())
    for n in full:
        ref = sum(min(1.0, C / (float(norms[i]) + 1e-6)) * loop[i][n] for i in range(5)) / 5
        assert torch.allclose(got[n], ref, atol=1e-12)


def test_grid_columns_and_analytic_falls_with_noise():
    df, extra = digits_attack_grid(batch_sizes=(1, 2), sigmas=(0.0, 1.0), n_images=1, dlg_iters=3, ig_iters=5)
    assert list(df.columns) == ["attack", "batch_size", "sigma", "draw", "psnr", "label_acc", "random_psnr"]
    assert len(df) == 2 * 2 * 3 and set(df.attack) == {"analytic", "dlg", "ig"}
    a = df[df.attack == "analytic"].set_index(["batch_size", "sigma"]).psnr
    assert a[(1, 0.0)] > 80 and a[(1, 1.0)] < 30
    assert list(extra["seconds"].columns) == ["attack", "batch_size", "sigma", "draw", "seconds"]
    xt, xh = extra["examples"]["analytic/1/0.0"]
    assert xt.shape == (1, 64) and xh.shape == (1, 64)
    df2, _ = digits_attack_grid(batch_sizes=(1, 2), sigmas=(0.0, 1.0), attacks=("analytic",), n_images=1)
    assert df2.psnr.tolist() == a.tolist()  # deterministic given the seed
    with pytest.raises(ValueError, match="subset"):
        digits_attack_grid(attacks=("rgap",))
