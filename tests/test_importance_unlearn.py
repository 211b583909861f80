"""SalUn (gradsight.importance.unlearn): saliency, exact-density mask, masked SGD, metrics, digits acceptance.

References are independent: per-batch autograd with .backward(), a hand-written SGD with momentum and coupled
weight decay, a brute-force rank count, and the retrain-from-scratch model for the digits acceptance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsight.importance.unlearn import (accuracy, digits_unlearning, make_batches, mia_efficacy, saliency,
                                          saliency_mask, unlearn, unlearning_metrics)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(seed: int = 0, d_in: int = 5, h: int = 7, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, c)).double()


def tiny_data(n: int = 24, d_in: int = 5, c: int = 3, seed: int = 1, bs: int = 8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return [(X[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


# ----------------------------------------------------------------------------------------------------- saliency

def test_saliency_equals_hand_per_batch_autograd_sum():
    model, batches = tiny_mlp(), tiny_data()
    model.train()  # saliency must switch to eval and restore the mode
    sal = saliency(model, batches)
    assert model.training
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad
    assert list(sal) == [n for n, _ in model.named_parameters()]
    for n in ref:
        torch.testing.assert_close(sal[n], ref[n].abs(), rtol=1e-12, atol=1e-14)


def test_sign_invariance_ce_vs_neg_ce():
    model, batches = tiny_mlp(2), tiny_data(seed=3)
    a, b = saliency(model, batches, "ce"), saliency(model, batches, "neg_ce")
    ma, mb = saliency_mask(a, 0.5), saliency_mask(b, 0.5)
    for n in a:
        assert torch.equal(a[n], b[n]) and torch.equal(ma[n], mb[n])


def test_saliency_single_pair_and_bad_loss():
    model, batches = tiny_mlp(), tiny_data()
    X = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    one = saliency(model, (X, y))  # one batch: the gradient of the full-data mean
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(one[n], p.grad.abs(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="loss"):
        saliency(model, batches, loss="mse")


# --------------------------------------------------------------------------------------------------------- mask

@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.73, 1.0])
def test_mask_density_exact_and_top_ranked(q):
    g = torch.Generator().manual_seed(0)
    sal = {"a": torch.rand(7, 5, generator=g, dtype=torch.float64), "b": torch.rand(11, generator=g).double()}
    m = saliency_mask(sal, q)
    P = 46
    assert sum(int(v.sum()) for v in m.values()) == math.floor(q * P)
    flat = torch.cat([sal["a"].flatten(), sal["b"]])
    keep = torch.cat([m["a"].flatten(), m["b"]])
    if 0 < keep.sum() < P:  # every kept value >= every dropped value
        assert flat[keep].min() >= flat[~keep].max()


def test_mask_density_exact_with_many_zero_gradients():
    # a hidden layer with dead units: their weights and the following columns get exactly zero gradient
    model, batches = tiny_mlp(4, h=10), tiny_data(seed=5)
    with torch.no_grad():
        model[0].weight[:6].zero_()
        model[0].bias[:6] = -1.0  # ReLU(-1) = 0: units 0..5 are dead, gradients of W1[:6], b1[:6], W2[:, :6] = 0
    sal = saliency(model, batches)
    flat = torch.cat([s.flatten() for s in sal.values()])
    P, n_zero = flat.numel(), int((flat == 0).sum())
    assert n_zero >= 6 * 5 + 6 + 3 * 6  # ties at the threshold
    for q in (0.3, 0.5, 0.9):
        m = saliency_mask(sal, q)
        keep = torch.cat([v.flatten() for v in m.values()])
        k = math.floor(q * P)
        assert int(keep.sum()) == k
        # independent rule: all nonzero entries above the cut are kept, ties broken by flat position
        order = sorted(range(P), key=lambda i: (-float(flat[i]), i))
        ref = torch.zeros(P, dtype=torch.bool)
        ref[order[:k]] = True
        assert torch.equal(keep, ref)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_mask_bad_fraction_raises(bad):
    with pytest.raises(ValueError, match="fraction"):
        saliency_mask({"a": torch.rand(3)}, bad)


def test_mask_nonfinite_saliency_raises():
    with pytest.raises(ValueError, match="non-finite"):
        saliency_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5)


# ----------------------------------------------------------------------------------------------- masked update

def _reference_masked_sgd(model, mask, batches, lr, mom, wd, k):
    """Hand SGD (PyTorch's rule) with masked grads, restore and momentum zeroing, on `finetune`'s batch order."""
    theta_o = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs, traj = {}, []
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(batches), generator=gen).tolist()
    for i in order[:k]:
        x, y = batches[i]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                d = p.grad * mask[n] + wd * p
                bufs[n] = d.clone() if n not in bufs else mom * bufs[n] + d
                p -= lr * bufs[n]
                p.copy_(torch.where(mask[n], p, theta_o[n]))
                bufs[n] = torch.where(mask[n], bufs[n], torch.zeros_like(bufs[n]))
        traj.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return traj


def test_masked_entries_bitwise_equal_and_update_formula_every_step():
    model, batches = tiny_mlp(6), tiny_data(n=40, seed=7)
    mask = saliency_mask(saliency(model, batches[:2]), 0.5)
    theta_o = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _reference_masked_sgd(copy.deepcopy(model), mask, batches, 0.1, 0.9, 5e-4, len(batches))
    seen = []
    unlearn(model, mask, batches[:2], batches, method="finetune", epochs=1, lr=0.1, momentum=0.9, weight_decay=5e-4,
            seed=0, callback=lambda s, m: seen.append({n: p.detach().clone() for n, p in m.named_parameters()}))
    assert len(seen) == len(batches) == 5
    moved = 0
    for got, want in zip(seen, ref):
        for n, m in mask.items():
            assert torch.equal(got[n][~m], theta_o[n][~m])  # bitwise theta_o on m = 0
            torch.testing.assert_close(got[n], m * want[n] + (~m) * theta_o[n], rtol=1e-12, atol=1e-13)
            moved += int((got[n][m] != theta_o[n][m]).sum())
    assert moved > 0


def test_momentum_buffers_masked_and_unmasked_run_moves_everything():
    model, batches = tiny_mlp(8), tiny_data(seed=9)
    free = copy.deepcopy(model)
    theta_o = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = saliency_mask(saliency(model, batches), 0.3)
    unlearn(model, mask, batches, batches, method="random_label", n_classes=3, epochs=3, lr=0.05, seed=1)
    unlearn(free, None, batches, batches, method="random_label", n_classes=3, epochs=3, lr=0.05, seed=1)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[n]], theta_o[n][~mask[n]])
    # without a mask weight decay moves every entry
    assert all(bool((p.detach() != theta_o[n]).all()) for n, p in free.named_parameters())
    # mask of all True (q = 1) is the unmasked run, bit for bit
    full, again = copy.deepcopy(free), tiny_mlp(8)
    unlearn(again, saliency_mask(saliency(again, batches), 1.0), batches, batches, method="random_label",
            n_classes=3, epochs=3, lr=0.05, seed=1)
    for (n, a), (_, b) in zip(again.named_parameters(), full.named_parameters()):
        assert torch.equal(a, b)


def test_random_labels_differ_from_true_labels(monkeypatch):
    # record each step's inputs (forward pre-hook) and labels (a spy on cross_entropy); lr tiny, so nothing matters
    model, batches = tiny_mlp(), tiny_data(n=300, bs=50, seed=11)
    xs, ys = [], []
    model.register_forward_pre_hook(lambda mod, args: xs.append(args[0]))
    orig = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, y, *a, **k: (ys.append(y.clone()), orig(logits, y))[1])
    unlearn(model, None, batches, batches[:1], method="random_label", n_classes=3, epochs=2, lr=1e-9, seed=0)
    assert len(xs) == len(ys) == 2 * (len(batches) + 1)
    drawn = []
    for x, y in zip(xs, ys):
        (i,) = [i for i, (bx, _) in enumerate(batches) if bx is x]
        true = batches[i][1]
        if y is not true and not torch.equal(y, true):  # a forget step: relabelled
            drawn.append(y)
            assert not bool((y == true).any())  # y' != y for every example
    assert len(drawn) == 2 * len(batches)  # both epochs' forget passes, labels redrawn each pass
    d = torch.cat(drawn)
    assert set(d.tolist()) == {0, 1, 2}
    assert not torch.equal(torch.cat(drawn[:len(batches)]).sort().values, torch.cat(drawn[len(batches):]).sort().values)


def test_unlearn_validates_arguments():
    model, batches = tiny_mlp(), tiny_data()
    with pytest.raises(ValueError, match="method"):
        unlearn(model, None, batches, batches, method="scrub", n_classes=3)
    with pytest.raises(ValueError, match="n_classes"):
        unlearn(model, None, batches, batches, method="random_label")
    with pytest.raises(ValueError, match="missing"):
        unlearn(model, {"0.weight": torch.ones(7, 5, dtype=torch.bool)}, batches, batches, method="finetune")


def test_grad_ascent_raises_forget_loss():
    model, batches = tiny_mlp(3), tiny_data(seed=4)
    loss = lambda: sum(float(F.cross_entropy(model(x), y).detach()) for x, y in batches)  # noqa: E731
    before = loss()
    unlearn(model, None, batches, None, method="grad_ascent", epochs=2, lr=0.05)
    assert loss() > before


# ------------------------------------------------------------------------------------------------------ metrics

def test_metrics_against_hand_counts():
    model, batches = tiny_mlp(), tiny_data(n=60, seed=12)
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert accuracy(model, batches) == pytest.approx(100.0 * float((pred == y).double().mean()))
    m = unlearning_metrics(model, batches[:1], batches[1:4], batches[4:])
    assert m["UA"] == pytest.approx(100.0 - m["FA"]) and 0.0 <= m["MIA"] <= 100.0


def test_mia_separable_confidences():
    # members: confidence ~1; non-members: ~1/3 -> an attack calls member-like forget rows members (efficacy 0)
    class Fixed(nn.Module):
        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=g)
    sure = 20.0 * F.one_hot(y, 3).double()  # p_y ~ 1
    flat = torch.zeros(60, 3, dtype=torch.float64) + 0.01 * torch.rand(60, 3, generator=g, dtype=torch.float64)
    assert mia_efficacy(Fixed(), (sure[:20], y[:20]), (sure, y), (flat, y)) == 0.0
    assert mia_efficacy(Fixed(), (flat[:20], y[:20]), (sure, y), (flat, y)) == 100.0


# --------------------------------------------------------------------------------------------- digits acceptance

@pytest.mark.parametrize("forget", ["random10", "class:3"])
def test_digits_salun_moves_forget_accuracy_toward_retrain(forget):
    df = digits_unlearning(forget, seed=0)
    fa, ra = df["FA"], df["RA"]
    assert abs(fa["salun"] - fa["retrain"]) < abs(fa["original"] - fa["retrain"])
    assert abs(ra["salun"] - ra["retrain"]) <= 2.0
    assert df.loc["retrain", "gap"] == 0.0 and df.attrs["n_forget"] + df.attrs["n_retain"] == 1257


def test_digits_bad_forget_and_batches():
    with pytest.raises(ValueError, match="forget"):
        digits_unlearning("class:12")
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(torch.zeros(3, 2), torch.zeros(3), 0)


def test_digits_settings_and_setup_validation():
    from gradsight.importance.unlearn import DigitsSetup

    with pytest.raises(ValueError, match="unknown settings"):
        digits_unlearning("random10", settings={"salun_lr": 0.1})
    other = DigitsSetup("random10", 1, 32, 20, 32, None, None, None, [], [], None, None)
    with pytest.raises(ValueError, match="setup was built for"):
        digits_unlearning("random10", seed=0, setup=other)
