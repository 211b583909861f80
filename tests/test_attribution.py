"""Attribution math against slow references: features vs per-example autograd, K-FAC / EK-FAC vs explicit
matrices, influence vs exact leave-one-out on linear regression and vs a dense GGN solve, TracIn, TRAK."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsight.attribution import (Block, Checkpoint, CurvatureFit, FeatureSpec, Featurizer, KroneckerOperator,
                                   attribute, featurize, score_matrix)
from gradsight.curvature.operators import GGNOperator
from gradsight.measures.step import backward_step



@pytest.fixture(autouse=True)
def float64():
    """These references compare to 1e-8: float64 throughout (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def per_example_grads(model, layers, losses_fn, batch):
    """{layer: (B, d_out, d_in + 1)} [W | b] gradients of each row's own loss, by a per-row backward loop."""
    mods = dict(model.named_modules())
    out = {n: [] for n in layers}
    B = losses_fn(model, batch).shape[0]
    for b in range(B):
        model.zero_grad()
        losses_fn(model, batch)[b].backward()
        for n in layers:
            m = mods[n]
            out[n].append(torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], 1).clone())
    return {n: torch.stack(v) for n, v in out.items()}


class SeqMLP(nn.Module):
    """(B, T, d) -> per-example loss summed over T tokens (padding masked): tests T > 1 and padding."""

    def __init__(self, d=5, h=4, c=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("T", [1, 7])
def test_features_equal_per_example_gradients(T):
    torch.manual_seed(0)
    model = SeqMLP()
    B = 4
    x = torch.randn(B, T, 5)
    y = torch.randint(0, 3, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, T // 2 + 1:] = False  # padding at the end of row 1 (no effect when T = 1)

    def losses(m, batch):
        x, y, mask = batch
        ce = F.cross_entropy(m(x).transpose(1, 2), y, reduction="none")  # (B, T)
        return (ce * mask).sum(1)

    batch = (x, y, mask)
    ref = per_example_grads(model, ["fc1", "fc2"], losses, batch)
    step = backward_step(model, ["fc1", "fc2"], batch, losses, tokens=mask)
    full = Featurizer(FeatureSpec(r_in=None, r_out=None), {"fc1": True, "fc2": True}, torch.float64)
    feats, covs = full(step.grads, covariance=True)
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(feats[n], ref[n], rtol=1e-10, atol=1e-12)
    # the input covariance is the sum over real tokens of [a; 1][a; 1]^T
    a = torch.cat([x, torch.ones(B, T, 1)], -1)[mask]  # (n_tok, 6)
    torch.testing.assert_close(covs["fc1"].A, a.T @ a)
    assert covs["fc1"].n_tokens == int(mask.sum())
    # projected features are P_out M P_in^T of the materialised gradient
    proj = Featurizer(FeatureSpec(r_in=3, r_out=2, seed=4), {"fc1": True, "fc2": True}, torch.float64)
    pf, _ = proj(step.grads)
    P_in, P_out = proj.matrix("fc1", "in", 6), proj.matrix("fc1", "out", 4)
    torch.testing.assert_close(pf["fc1"], P_out @ ref["fc1"] @ P_in.T)
    # per-token features sum to the example's
    tf = full.token_features("fc2", step.grads["fc2"])
    torch.testing.assert_close(tf.sum(1), feats["fc2"])


def test_ekfac_matches_explicit_eigenbasis_and_trace():
    torch.manual_seed(1)
    N, ko, ki = 50, 8, 6
    X = torch.randn(N, ko, ki)
    a, g = torch.randn(200, ki), torch.randn(200, ko)
    from gradsight.attribution import LayerCovariance

    cov = LayerCovariance(a.T @ a, g.T @ g, 200, N)
    fit = CurvatureFit("ekfac", {"L": cov}, {"L": (ko, ki)})
    fit.update({"L": X})
    lc = fit.finalize(damping=0.3, mode="absolute")["L"]
    # explicit: C = (Q_S x Q_A) diag(Lambda) (Q_S x Q_A)^T with vec row-major (out, in)
    K = torch.kron(lc.Q_S, lc.Q_A)
    C = K @ torch.diag(lc.Lam.reshape(-1)) @ K.T
    v = torch.randn(3, ko, ki)
    torch.testing.assert_close(lc.matvec(v).reshape(3, -1), v.reshape(3, -1) @ C)
    torch.testing.assert_close(lc.solve(v).reshape(3, -1),
                               torch.linalg.solve(C + 0.3 * torch.eye(ko * ki), v.reshape(3, -1).T).T)
    # free invariant: sum(Lambda) = E ||phi||^2
    torch.testing.assert_close(lc.Lam.sum(), X.pow(2).sum((1, 2)).mean())
    # EK-FAC's diagonal in the eigenbasis equals the empirical Fisher's there
    Fe = X.reshape(N, -1).T @ X.reshape(N, -1) / N
    torch.testing.assert_close(torch.diagonal(K.T @ Fe @ K), lc.Lam.reshape(-1))
    # relative damping is a multiple of the mean eigenvalue
    lc2 = fit.finalize(damping=0.1)["L"]
    assert lc2.damping == pytest.approx(0.1 * float(lc.Lam.mean()))


def _linreg(N=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g)
    t = X @ torch.randn(d, 1, generator=g) + 0.3 * torch.randn(N, 1, generator=g)
    Xa = torch.cat([X, torch.ones(N, 1)], 1)
    theta = torch.linalg.lstsq(Xa, t).solution  # (d + 1, 1)
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.copy_(theta[:d].T)
        model.bias.copy_(theta[d])
    return model, X, t, Xa, theta


@pytest.mark.parametrize("method", ["kfac", "ekfac", "raw"])
def test_influence_equals_exact_leave_one_out_on_linear_regression(method):
    """Known answer: with the GGN (= Hessian here) and lambda -> 0, influence / N is the first-order change
    of the query's loss; divided by (1 - h_ii) it is the EXACT leave-one-out change of the prediction."""
    model, X, t, Xa, theta = _linreg()
    N = X.shape[0]
    Xq, tq = torch.randn(5, 3), torch.randn(5, 1)
    S, info = attribute(model, "mse", (X, t), (Xq, tq), method=method, fisher="ggn", damping=0.0,
                        damping_mode="absolute", spec=FeatureSpec(r_in=None, r_out=None), dtype=torch.float64)
    XtX_inv = torch.linalg.inv(Xa.T @ Xa)
    h = ((Xa @ XtX_inv) * Xa).sum(1)  # leverages
    r_q = (model(Xq) - tq).detach()  # (5, 1): d loss_q / d f_q
    Xqa = torch.cat([Xq, torch.ones(5, 1)], 1)
    for i in range(N):
        keep = torch.arange(N) != i
        th_i = torch.linalg.lstsq(Xa[keep], t[keep]).solution
        df_exact = (Xqa @ (th_i - theta)).squeeze(1)  # exact change of the predictions when i is removed
        df_pred = torch.as_tensor(S[i]) / N / r_q.squeeze(1) / (1 - h[i])
        torch.testing.assert_close(df_pred, df_exact, rtol=1e-8, atol=1e-10)


def test_damped_inverse_equals_dense_ggn_solve_on_mlp():
    """raw / K-FAC / EK-FAC with the exact GGN pseudo-gradients in the full space: the damped inverse equals a
    dense solve against its own matrix; the raw curvature IS the exact GGN diagonal block of each layer."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    layers = {"0": model[0], "2": model[2]}
    block, covs, shapes, fb = featurize(model, "cross_entropy", [(X[:13], y[:13]), (X[13:], y[13:])],
                                        layers=layers, spec=FeatureSpec(r_in=None, r_out=None),
                                        dtype=torch.float64, fisher="ggn")
    G = GGNOperator(model, [(X, y)], loss="cross_entropy").dense()  # exact GGN of the mean loss
    order = [n for n, _ in model.named_parameters()]  # 0.weight 0.bias 2.weight 2.bias
    for kind in ("raw", "kfac", "ekfac"):
        fit = CurvatureFit(kind, covs, shapes)
        for item in fb:  # KronStats here (one-token rows), (features, n) pairs for sequences
            fit.update(*(item if isinstance(item, tuple) else (item,)))
        op = KroneckerOperator(model, fit.finalize(0.05), bias=True)
        assert op.names == order
        D = op.dense()
        v = torch.randn(op.dim)
        lam = torch.cat([torch.full((p.numel(),), op.layers[n.split(".")[0]].damping)
                         for n, p in model.named_parameters()])
        torch.testing.assert_close(op.solve(v), torch.linalg.solve(D + torch.diag(lam), v), rtol=1e-8, atol=1e-10)
        if kind == "raw":  # the exact GGN's diagonal blocks (weight+bias of each layer)
            for lo, hi in ((0, 25), (25, 43)):
                torch.testing.assert_close(D[lo:hi, lo:hi], G[lo:hi, lo:hi], rtol=1e-8, atol=1e-10)


def test_tracin_one_checkpoint_is_lr_weighted_gradient_dot():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    Xq, yq = torch.randn(4, 4), torch.randint(0, 3, (4,))

    def flat_grads(Xs, ys):
        rows = []
        for i in range(Xs.shape[0]):
            model.zero_grad()
            F.cross_entropy(model(Xs[i:i + 1]), ys[i:i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return torch.stack(rows)

    ref = flat_grads(X, y) @ flat_grads(Xq, yq).T
    state = {k: v.clone() for k, v in model.state_dict().items()}
    S, _ = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="tracin", checkpoints=[(state, 0.37)],
                     spec=FeatureSpec(r_in=None, r_out=None), dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(S), 0.37 * ref)
    S2, _ = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="grad_dot",
                      spec=FeatureSpec(r_in=None, r_out=None), dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(S2), ref)
    # a projection keeps the inner products in expectation: large r -> close
    S3, _ = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="grad_dot",
                      spec=FeatureSpec(r_in=2, r_out=2, seed=1), dtype=torch.float64)
    assert np.corrcoef(S3.ravel(), ref.numpy().ravel())[0, 1] > 0.3


def test_trak_full_rank_equals_closed_form():
    """TRAK with P = I (trak_dim >= #params) and one model: tau = phi_q (Phi'Phi + lambda)^-1 phi_i (1 - p_i),
    phi the gradient of the margin log(p / (1 - p)), by a per-example autograd loop."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    Xq, yq = torch.randn(6, 3), torch.randint(0, 3, (6,))

    def margins(Xs, ys):
        rows, ps = [], []
        for i in range(Xs.shape[0]):
            model.zero_grad()
            z = model(Xs[i:i + 1])[0]
            p = torch.softmax(z, -1)[ys[i]]
            (torch.log(p) - torch.log1p(-p)).backward()
            rows.append(torch.cat([p_.grad.reshape(-1) for p_ in model.parameters()]))
            ps.append(float(p.detach()))
        return torch.stack(rows), torch.tensor(ps)

    Phi, p = margins(X, y)
    phq, _ = margins(Xq, yq)
    lam = 1e-3
    ref = (Phi @ torch.linalg.solve(Phi.T @ Phi + lam * torch.eye(Phi.shape[1]), phq.T)) * (1 - p).unsqueeze(1)
    S, info = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="trak", damping=lam,
                        damping_mode="absolute", trak_dim=1000, spec=FeatureSpec(r_in=None, r_out=None),
                        dtype=torch.float64)
    assert info["projection"] == "exact"
    torch.testing.assert_close(torch.as_tensor(S), ref, rtol=1e-6, atol=1e-9)


def test_scores_do_not_depend_on_batch_composition_or_padding():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    Xq, yq = torch.randn(3, 4), torch.randint(0, 3, (3,))
    a, _ = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="ekfac", batch_size=20, dtype=torch.float64)
    b, _ = attribute(model, "cross_entropy", (X, y), (Xq, yq), method="ekfac", batch_size=3, dtype=torch.float64)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_score_matrix_streams_blocks_like_one_block():
    torch.manual_seed(6)
    shapes = {"L": (3, 4)}
    X = torch.randn(30, 3, 4)
    ids = torch.arange(30)
    losses = torch.rand(30)
    from gradsight.attribution import LayerCovariance

    cov = LayerCovariance(torch.eye(4) * 30, torch.eye(3) * 30, 30, 30)
    q = Block({"L": torch.randn(5, 3, 4)}, torch.rand(5), torch.arange(5))
    one = Checkpoint(lambda: [Block({"L": X}, losses, ids)], {"L": cov}, shapes)
    many = Checkpoint(lambda: [Block({"L": X[i:i + 7]}, losses[i:i + 7], ids[i:i + 7]) for i in range(0, 30, 7)],
                      {"L": cov}, shapes)
    for m in ("ekfac", "raw", "trak", "grad_cos"):
        S1, _ = score_matrix(m, [one], [q], out="loss")
        S2, _ = score_matrix(m, [many], [q], out="loss")
        np.testing.assert_allclose(S1, S2, rtol=1e-9, atol=1e-12)


def test_adam_preconditioned_features_equal_less_formula():
    """LESS's training feature beta1 m D + (1 - beta1) g D (D = 1/sqrt(beta2 v + eps)) from the factors, exact
    when D is rank-1 (as constructed here), with the momentum offset projected like the gradients."""
    from gradsight.attribution import AdamPreconditioner

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    layers = {"0": model[0], "2": model[2]}
    b1, b2, eps = 0.9, 0.999, 1e-8
    state, D = {}, {}
    for n, m in layers.items():
        r, c = torch.rand(m.out_features) + 0.5, torch.rand(m.in_features + 1) + 0.5
        Dn = torch.outer(r, c)  # rank-1
        v = (1 / Dn**2 - eps) / b2
        mom = torch.randn_like(Dn)
        state[f"{n}.weight"] = {"exp_avg": mom[:, :-1], "exp_avg_sq": v[:, :-1]}
        state[f"{n}.bias"] = {"exp_avg": mom[:, -1], "exp_avg_sq": v[:, -1]}
        D[n] = (Dn, mom)
    pre = AdamPreconditioner.from_state(layers, state, beta1=b1, beta2=b2, eps=eps)
    ref = per_example_grads(model, list(layers), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                            (X, y))
    for spec in (FeatureSpec(r_in=None, r_out=None), FeatureSpec(r_in=2, r_out=3, seed=2)):
        block = featurize(model, "cross_entropy", [(X, y)], layers=layers, spec=spec, dtype=torch.float64,
                          pre=pre, covariance=False)[0]
        fz = Featurizer(spec, {"0": True, "2": True}, torch.float64)
        for n in layers:
            Dn, mom = D[n]
            u = b1 * mom * Dn + (1 - b1) * ref[n] * Dn  # (B, d_out, d_in + 1)
            P_in, P_out = fz.matrix(n, "in", u.shape[2]), fz.matrix(n, "out", u.shape[1])
            u = u if P_out is None else P_out @ u
            u = u if P_in is None else u @ P_in.T
            torch.testing.assert_close(block.feats[n], u, rtol=1e-10, atol=1e-12)
