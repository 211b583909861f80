"""Batch composition by a cost model: the dynamic program against brute force over every partition, the
limits it keeps, the extremes it reaches, and the fit of the cost model from timings."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsight.inputs.batching import BatchCost, fit_batch_cost, make_batches
from gradsight.inputs.data import Encoded


def _enc(lengths):
    return [Encoded(i, [1] * n, [False] + [True] * (n - 1), 1) for i, n in enumerate(lengths)]


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def _total(batches, lengths, cost):
    return sum(cost(len(b), max(lengths[i] for i in b)) for b in batches)


def _valid(batches, lengths, budget, max_batch):
    return all(len(b) <= max_batch and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget) for b in batches)


@settings(deadline=None, max_examples=60)
@given(lengths=st.lists(st.integers(2, 300), min_size=1, max_size=6),
       overhead=st.floats(0, 1), per_token=st.floats(0, 1e-2), per_pair=st.floats(0, 1e-4),
       budget=st.integers(50, 1200), max_batch=st.integers(1, 6))
def test_dynamic_program_is_the_cheapest_of_all_partitions(lengths, overhead, per_token, per_pair, budget, max_batch):
    cost = BatchCost(overhead, per_token, per_pair)
    got = make_batches(_enc(lengths), token_budget=budget, max_batch=max_batch, cost=cost)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))
    assert _valid(got, lengths, budget, max_batch)
    best = min(_total(p, lengths, cost) for p in _partitions(list(range(len(lengths))))
               if _valid(p, lengths, budget, max_batch))
    assert _total(got, lengths, cost) <= best * (1 + 1e-12) + 1e-15


def test_extremes_and_the_greedy_default():
    lengths = [800, 600, 300, 120, 90, 60, 40, 12, 8, 3]
    enc = _enc(lengths)
    greedy = make_batches(enc, token_budget=4096, max_batch=32)
    assert greedy == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # the length-sorted greedy fill, unchanged
    # only per-call overhead: as few calls as the budget allows
    assert len(make_batches(enc, token_budget=4096, max_batch=32, cost=BatchCost(1.0, 0.0, 0.0))) == len(greedy)
    # no overhead: padding is pure loss, so every sequence runs alone
    assert make_batches(enc, token_budget=4096, max_batch=32, cost=BatchCost(0.0, 1e-3, 1e-6)) == [[i] for i in range(10)]
    # in between: the long ones alone, the short ones together
    mixed = make_batches(enc, token_budget=4096, max_batch=32, cost=BatchCost(0.02, 1e-4, 1e-7))
    assert mixed[0] == [0] and len(mixed[-1]) > 1


def test_fit_recovers_a_known_cost():
    true = BatchCost(0.02, 3e-5, 4e-8)
    shapes = []

    def time_batch(B, T):
        shapes.append((B, T))
        return true(B, T)

    got = fit_batch_cost(time_batch, [3, 40, 90, 200, 800], max_batch=32, token_budget=4096)
    for a, b in ((got.overhead, true.overhead), (got.per_token, true.per_token), (got.per_pair, true.per_pair)):
        assert a == pytest.approx(b, rel=1e-6)
    assert len(shapes) == 1 + 2 * 5 and max(T for _, T in shapes) == 800
    assert math.isclose(got(4, 100), true(4, 100), rel_tol=1e-6)


def test_model_cost_counts_the_transformer_and_is_device_aware():
    from helpers import tiny_model

    from gradsight.inputs.batching import LAYER_OVERHEAD, model_cost

    model = tiny_model()  # Llama: 3 blocks, width 32, 4 heads, untied LM head
    cfg = model.config
    P = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    cpu = model_cost(model, "cpu")
    assert cpu.per_token == 6 * P and cpu.per_pair == 12 * 32 * 3
    assert cpu.overhead == cfg.num_hidden_layers * LAYER_OVERHEAD["cpu"]
    gpu = model_cost(model, "cuda")
    assert gpu.overhead > cpu.overhead and (gpu.per_token, gpu.per_pair) == (cpu.per_token, cpu.per_pair)
    assert model_cost(torch.nn.Linear(3, 3), "cpu") is None  # no transformer configuration
    # the GPU's launch latency buys larger batches of the same mixed lengths
    enc = _enc([900, 700, 500, 300, 200, 150, 100, 80, 60, 40, 20, 10])
    big = BatchCost(cpu.overhead * 1e3, cpu.per_token, cpu.per_pair)
    n_cpu = len(make_batches(enc, token_budget=4096, max_batch=32, cost=BatchCost(0.0, cpu.per_token, cpu.per_pair)))
    n_gpu = len(make_batches(enc, token_budget=4096, max_batch=32, cost=big))
    assert n_gpu < n_cpu == len(enc)


def test_smollm2_shape_on_this_cpu_batches_short_sequences_and_runs_long_ones_alone():
    """The cost of SmolLM2-135M (30 blocks, width 576, 106 M weights outside the embedding) by `model_cost`'s
    formula: on mixed lengths (the long ones 60+ tokens apart) the sequences of 500+ tokens run alone and the short ones share batches, and the
    predicted cost is below both one batch per sequence and the budget-filled batches."""
    P, d, L = 106_000_000, 576, 30
    from gradsight.inputs.batching import LAYER_OVERHEAD

    cost = BatchCost(L * LAYER_OVERHEAD["cpu"], 6.0 * P, 12.0 * d * L)
    lengths = [850, 780, 705, 640, 560, 500, 430, 343, 313, 186, 163, 135, 124, 90, 77, 70, 66, 63]
    enc = _enc(lengths)
    got = make_batches(enc, token_budget=4096, max_batch=32, cost=cost)
    assert all(len(b) == 1 for b in got if lengths[b[0]] >= 500)
    assert any(len(b) > 1 for b in got if lengths[b[0]] < 200)
    greedy = make_batches(enc, token_budget=4096, max_batch=32)
    singles = [[i] for i in range(len(lengths))]
    assert _total(got, lengths, cost) < min(_total(greedy, lengths, cost), _total(singles, lengths, cost))


def test_runs_batch_by_the_cost_model_and_budget_alike(tmp_path, model_dir, data_file):
    """--batch-by cost (default) and budget make different batches of the same units and equal tables."""
    import pandas as pd

    from gradsight.analyses.layers import LayersConfig, run_layers
    from gradsight.inputs import examples as example_inputs
    from gradsight.inputs.data import EncodeOptions
    from gradsight.runs.store import read_layer_stats

    seen = {}
    real = example_inputs.batches_of

    def spy(units, encoded_of, token_budget, max_batch, cost=None):
        out = list(real(units, encoded_of, token_budget, max_batch, cost))
        seen.setdefault("cost" if cost is not None else "budget", [len(b) for b in out])
        return iter(out)

    tables = {}
    for by in ("cost", "budget"):
        cfg = LayersConfig(model=str(model_dir), data=str(data_file), encode=EncodeOptions(max_length=256),
                           token_budget=600, max_batch=4, attn_implementation="eager", kinds=("q", "down"),
                           batch_by=by)
        example_inputs.batches_of = spy
        try:
            run_layers(cfg, tmp_path / by, progress=False, report=False)
        finally:
            example_inputs.batches_of = real
        tables[by] = read_layer_stats(tmp_path / by)
    assert set(seen) == {"cost", "budget"} and sum(seen["cost"]) == sum(seen["budget"])
    pd.testing.assert_frame_equal(tables["cost"].drop(columns="value"), tables["budget"].drop(columns="value"))
    pd.testing.assert_series_equal(tables["cost"]["value"], tables["budget"]["value"], rtol=2e-4)
