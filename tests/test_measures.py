"""Measures (per-batch kernels with no I/O) against slow references: a per-example backward loop, dense
materialised gradients, one pass over the concatenated rows. Tiny random Llama, float64, padded batches."""

from __future__ import annotations

import pytest
import torch

from gradsight.capture import loop_grads
from gradsight.demo.problems import demo_records
from gradsight.inputs.data import EncodeOptions, collate, encode, load_records
from gradsight.inputs.losses import causal_lm_losses
from gradsight.inputs.models import select_layers
from gradsight.measures.base import Measure, combine, stateless
from gradsight.measures.moments import MomentAccumulator, moments
from gradsight.measures.projection import ProjectionSpec, Projector, exact_grams, projection
from gradsight.measures.spectra import spectra, sq_norms
from gradsight.measures.step import backward_step
from gradsight.stats.noise import per_layer_noise

from helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    model = tiny_model(seed=3, dtype=torch.float64)
    recs, _ = load_records(demo_records(n_problems=2))
    encs = [encode(r, tiny_tokenizer(), EncodeOptions(max_length=64, truncation="left")) for r in recs]
    layers = select_layers(model, kinds=("q", "down"))
    mods = dict(model.named_modules())
    return model, encs, {li.name: mods[li.name] for li in layers}


def _batch(encs):
    return collate(encs, tiny_tokenizer().pad_token_id)


def test_step_norms_equal_a_per_example_backward_and_ignore_companions(problem):
    model, encs, layers = problem
    batch = _batch(encs)  # 6 sequences of different lengths: padding inside the batch
    step = backward_step(model, layers, batch, causal_lm_losses, tokens=batch["attention_mask"])
    ref, ref_losses = loop_grads(model, layers, batch, causal_lm_losses)
    torch.testing.assert_close(step.losses, ref_losses, rtol=1e-10, atol=1e-12)
    got = sq_norms()(step)
    for name in layers:
        want = ref[name].g.reshape(len(encs), -1).pow(2).sum(1)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-9, atol=1e-14)
    # the same example alone (no padding, no companions) gives the same numbers
    alone = backward_step(model, layers, _batch(encs[2:3]), causal_lm_losses, tokens=_batch(encs[2:3])["attention_mask"])
    one = sq_norms()(alone)
    for name in layers:
        torch.testing.assert_close(one[name][0], got[name][2], rtol=1e-9, atol=1e-14)


def test_non_finite_example_is_flagged_and_its_companions_are_untouched(problem):
    model, encs, layers = problem
    batch = _batch(encs)
    clean = sq_norms()(backward_step(model, layers, batch, causal_lm_losses, tokens=batch["attention_mask"]))

    def poisoned(m, b):
        out = causal_lm_losses(m, b)
        return out + torch.where(torch.arange(len(out)) == 1, float("inf"), 0.0)  # a constant: no NaN gradient

    step = backward_step(model, layers, batch, poisoned, tokens=batch["attention_mask"])
    assert step.bad == {1: "non-finite loss"} and step.keep == [0, 2, 3, 4, 5]
    got = sq_norms()(step)
    for name in layers:
        assert float(got[name][1]) == 0.0
        torch.testing.assert_close(got[name][step.keep], clean[name][step.keep], rtol=1e-12, atol=0)


def test_combine_runs_every_measure_on_one_step(problem):
    model, encs, layers = problem
    batch = _batch(encs)
    step = backward_step(model, layers, batch, causal_lm_losses, tokens=batch["attention_mask"])
    m = combine(sq_norms(), spectra())
    state, out = m.update(m.init(), step)
    assert set(out) == {"sq_norms", "spectra"} and m.name == "sq_norms+spectra"
    for name in layers:  # the spectra's Frobenius norm is the norm measure's square root
        torch.testing.assert_close(out["spectra"][name]["frobenius"].double() ** 2, out["sq_norms"][name].double(),
                                   rtol=1e-9, atol=1e-14)
    assert m.finalize(state) == {"sq_norms": None, "spectra": None}
    with pytest.raises(ValueError, match="unique"):
        combine(sq_norms(), sq_norms())


def test_streamed_moments_equal_one_pass_over_all_rows(problem):
    model, encs, layers = problem
    proj = projection(Projector(ProjectionSpec(r_in=4, r_out=4), dtype=torch.float64), r_model=8)
    m = moments(proj)
    state = m.init()
    rows: dict[str, list] = {}
    for chunk in (encs[:2], encs[2:3], encs[3:]):  # three batches of different sizes
        b = _batch(chunk)
        state, out = m.update(state, backward_step(model, layers, b, causal_lm_losses, tokens=b["attention_mask"]))
        for k, v in out.items():
            rows.setdefault(k, []).append(v)
    accs = m.finalize(state)
    assert set(accs) == set(layers) | {"__model__"}
    for k, parts in rows.items():
        F = torch.cat(parts).double()  # (6, D)
        ref = MomentAccumulator().update(F)
        assert accs[k].n == 6
        torch.testing.assert_close(accs[k].mean, F.mean(0), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(accs[k].m2, ref.m2, rtol=1e-9, atol=1e-15)
    names = list(layers)
    table = per_layer_noise({n: torch.cat(rows[n]) for n in names}).set_index("layer")
    for n in names:
        assert accs[n].noise_scale()["b_simple"] == pytest.approx(table.loc[n, "b_simple"], rel=1e-9)


def test_exact_grams_equal_the_materialised_gradients(problem):
    model, encs, layers = problem
    m = exact_grams()
    state = m.init()
    for lo, hi in ((0, 4), (4, 6)):
        b = _batch(encs[lo:hi])
        step = backward_step(model, layers, b, causal_lm_losses, tokens=b["attention_mask"], ids=list(range(lo, hi)))
        state, _ = m.update(state, step)
    ids, grams = m.finalize(state)
    assert ids == list(range(6))
    ref, _ = loop_grads(model, layers, _batch(encs), causal_lm_losses)
    for name in layers:
        F = ref[name].g.reshape(6, -1)
        torch.testing.assert_close(grams[name], F @ F.T, rtol=1e-9, atol=1e-12)


def test_a_measure_is_three_functions():
    count = Measure("count", init=lambda: 0, update=lambda s, step: (s + len(step), len(step)))
    s = count.init()
    for step in ([1, 2], [3]):
        s, out = count.update(s, step)
    assert count.finalize(s) == 3 and out == 1 and count([7, 8]) == 2
    assert stateless("id", lambda step: step)(5) == 5
