"""Projected gradient features: exact for small layers, unbiased inner products, 1/sqrt(r) error."""

import numpy as np
import pytest
import torch

from gradsight.capture import capture
from gradsight.capture.grads import DenseGrad, FactoredGrad
from gradsight.inputs.models import select_layers
from gradsight.measures.projection import ExactGramAccumulator, ProjectionSpec, Projector

from zoo import PROBLEMS, make_batch, mixed_examples


def _factors(seed=0, B=4, T=6, d_in=24, d_out=20):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    G = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    tokens = torch.ones(B, T, dtype=torch.bool)
    tokens[1, 4:] = False
    return FactoredGrad(A, G, tokens)


def test_small_layers_are_exact_and_gram_matches():
    fg = _factors(d_in=3, d_out=4)
    proj = Projector(ProjectionSpec(r_in=4, r_out=4), dtype=torch.float64)
    phi = proj.layer_features("x", fg)
    M = fg.materialize()
    torch.testing.assert_close(phi, M.reshape(4, -1))
    torch.testing.assert_close(phi @ phi.T, fg.inner(fg))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projected_inner_products_are_unbiased(kind):
    fg = _factors(seed=1)
    M = fg.materialize().reshape(4, -1)
    truth = (M @ M.T).numpy()
    ests = []
    for s in range(400):
        proj = Projector(ProjectionSpec(r_in=4, r_out=4, kind=kind, seed=s), dtype=torch.float64)
        phi = proj.layer_features("layer", fg)
        ests.append((phi @ phi.T).numpy())
    ests = np.stack(ests)  # (S, 4, 4)
    mean, se = ests.mean(0), ests.std(0, ddof=1) / np.sqrt(len(ests))
    z = np.abs(mean - truth) / se
    assert z.max() < 4.5, z  # 16 entries: max |z| beyond 4.5 would be a bias, not chance


def test_projection_error_shrinks_like_one_over_sqrt_r():
    fg = _factors(seed=2, d_in=64, d_out=64, T=8)
    M = fg.materialize().reshape(4, -1)
    truth = M @ M.T

    def rms(r):
        errs = []
        for s in range(60):
            phi = Projector(ProjectionSpec(r_in=r, r_out=r, seed=s), dtype=torch.float64).layer_features("l", fg)
            errs.append(((phi @ phi.T - truth) / truth.diagonal().mean()).pow(2).mean().item())
        return float(np.sqrt(np.mean(errs)))

    e4, e16 = rms(4), rms(16)
    # total dimension r_in * r_out grows 16x: the error should shrink about 4x (sqrt)
    assert 2.5 < e4 / e16 < 6.5, (e4, e16)


def test_features_reproducible_and_layer_specific():
    fg = _factors(seed=3)
    a = Projector(ProjectionSpec(seed=5)).layer_features("model.layers.0.mlp.up_proj", fg)
    b = Projector(ProjectionSpec(seed=5)).layer_features("model.layers.0.mlp.up_proj", fg)
    c = Projector(ProjectionSpec(seed=5)).layer_features("model.layers.1.mlp.up_proj", fg)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_dense_grads_projected_unbiasedly():
    g = torch.Generator().manual_seed(4)
    dg = DenseGrad(torch.randn(3, 50, generator=g, dtype=torch.float64))
    truth = dg.inner(dg)
    ests = torch.stack([
        (lambda f: f @ f.T)(Projector(ProjectionSpec(r_dense=8, seed=s), torch.float64).layer_features("n", dg))
        for s in range(300)])
    se = ests.std(0) / 300**0.5
    assert ((ests.mean(0) - truth).abs() / se).max() < 4.5


def test_exact_gram_accumulator_across_batches_on_tiny_llama():
    factory, loss_fn = PROBLEMS["llama"]
    model = factory()
    layers = select_layers(model, kinds=["q", "down"])
    mods = {li.name: dict(model.named_modules())[li.name] for li in layers}
    acc = ExactGramAccumulator()
    dense = {n: [] for n in mods}
    for bseed in (1, 2):
        batch = make_batch(mixed_examples(n=3, seed=bseed))
        with capture(model, mods) as tape:
            tape.set_tokens(batch["attention_mask"].bool())
            loss_fn(model, batch).sum().backward()
            grads = tape.grads()
        acc.add(grads, [bseed * 10 + i for i in range(3)])
        for n, gr in grads.items():
            dense[n].append(gr.materialize().reshape(3, -1))
    grams = acc.grams()
    assert acc.idx == [10, 11, 12, 20, 21, 22]
    for n in mods:
        F = torch.cat(dense[n])
        torch.testing.assert_close(grams[n], F @ F.T, rtol=1e-8, atol=1e-12)


def test_feature_shards_roundtrip_and_orphans_removed(tmp_path):
    import pandas as pd

    from gradsight.runs.store import EXAMPLE_COLUMNS, Layout, RunStore, Tensors, read_features

    st = RunStore(tmp_path / "run", layout=Layout(tables=("features", "layer_stats", "examples")))
    st.open({"x": 1}, {})
    rows = lambda ids: pd.DataFrame([{c: (i if c == "idx" else "") for c in EXAMPLE_COLUMNS} for i in ids])  # noqa: E731
    f1 = {"a": torch.randn(2, 5), "b": torch.randn(2, 3)}
    st.commit({"features": Tensors(f1, ids=[3, 1]), "examples": rows([3, 1])})
    # killed before its examples rows: only the features shard of the next commit exists
    st.write("features", st.next_key(), Tensors({"a": torch.randn(1, 5), "b": torch.randn(1, 3)}, ids=[7]))
    assert st.cleanup() == 1
    idx, feats = read_features(tmp_path / "run")
    assert idx.tolist() == [1, 3]
    torch.testing.assert_close(feats["a"], f1["a"][[1, 0]])
