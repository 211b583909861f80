"""`gradsight privacy` end to end: known answers of the probes on a plain module and a tiny LM, the epsilon column
against the accountant, the defended views by hand, and clear errors for bad settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradsight.analyses.privacy import privacy_of, run_privacy
from gradsight.analyses.privacy.config import PrivacyConfig, parse_defence
from gradsight.analyses.privacy.probes import defended_views, lookup_gradient_sum
from gradsight.cli import main as cli_main
from gradsight.demo.problems import demo_records
from gradsight.privacy.accountant import epsilon
from gradsight.runs.api import config_for

from helpers import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits_like(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 16, generator=g, dtype=torch.float64)  # images in [0, 1]
    y = torch.randint(0, 5, (n,), generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).double().eval()
    return net, [(X[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


@pytest.fixture(scope="module")
def module_run(tmp_path_factory):
    net, batches = _digits_like()
    out = tmp_path_factory.mktemp("priv") / "run"
    res = privacy_of(net, "cross_entropy", batches, out, batch_sizes=(1, 4), batches_per_size=2,
                     defences=("none", "clip", "dp:0.1", "dp:1", "prune:0.9"), projection_sizes=(4, 16),
                     delta=1e-3, report=True)
    return res, out


def _cell(curves, probe, defence, B, projection=0):
    row = curves[(curves.probe == probe) & (curves.defence == defence) & (curves.batch_size == B)
                 & (curves.projection == projection)]
    assert len(row) == 1, (probe, defence, B)
    return row.iloc[0]


def test_analytic_recovery_is_exact_at_batch_one_and_noise_destroys_it(module_run):
    res, _ = module_run
    c = res.curves
    assert _cell(c, "analytic", "none", 1)["exact_mean"] == 1.0
    assert _cell(c, "analytic", "none", 1)["psnr_mean"] >= 150  # float64 round-off only (cap 200 dB)
    assert _cell(c, "analytic", "clip", 1)["exact_mean"] == 1.0  # clipping rescales: x = dW_i / db_i survives
    assert _cell(c, "analytic", "dp:1", 1)["psnr_mean"] < 20
    assert _cell(c, "analytic", "dp:1", 1)["psnr_mean"] < _cell(c, "analytic", "dp:0.1", 1)["psnr_mean"] + 5
    assert _cell(c, "analytic", "none", 4)["psnr_mean"] < _cell(c, "analytic", "none", 1)["psnr_mean"]
    assert _cell(c, "labels", "none", 1)["label_acc_mean"] == 1.0  # iDLG


def test_projected_store_recovers_the_input_when_r_in_covers_it(module_run):
    res, _ = module_run
    c = res.curves
    assert _cell(c, "factors", "stored", 1)["exact_mean"] == 1.0
    full = _cell(c, "projected", "stored", 1, projection=16)  # r_in = d_in = 16
    assert full["cosine_mean"] > 1 - 1e-9 and full["exact_mean"] == 1.0
    assert _cell(c, "projected", "stored", 1, projection=4)["cosine_mean"] < 0.99


def test_epsilon_column_is_the_accountants(module_run):
    res, out = module_run
    d = res.defences.set_index("defence")
    n = json.loads((out / "manifest.json").read_text())["privacy"]["n_examples"]
    q = 4 / n
    assert d.loc["dp:1", "sample_rate"] == pytest.approx(q)
    assert d.loc["dp:1", "epsilon"] == pytest.approx(epsilon(1.0, q, math.ceil(1 / q), 1e-3), rel=1e-12)
    assert d.loc["dp:1", "epsilon"] < d.loc["dp:0.1", "epsilon"]
    assert math.isinf(d.loc["none", "epsilon"]) and math.isinf(d.loc["prune:0.9", "epsilon"])
    assert (out / "report.html").exists()
    s = res.samples()
    assert any(k.endswith("/analytic/hat") for k in s)
    k = next(k for k in s if k.startswith("0/none/analytic/"))
    assert s[k].shape == (1, 16)


def test_defended_views_by_hand():
    plain = {"w": torch.tensor([[3.0, -1.0]], dtype=torch.float64), "b": torch.tensor([2.0], dtype=torch.float64)}
    clipped = {"w": torch.tensor([[0.3, -0.1]], dtype=torch.float64), "b": torch.tensor([0.2], dtype=torch.float64)}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    v = defended_views("dp", 0.5, plain, clipped, 2.0, 4, g1)
    zb = torch.randn(1, generator=g2, dtype=torch.float64)  # sorted names: b first, then w
    zw = torch.randn(1, 2, generator=g2, dtype=torch.float64)
    torch.testing.assert_close(v["b"], (clipped["b"] + 1.0 * zb) / 4)
    torch.testing.assert_close(v["w"], (clipped["w"] + 1.0 * zw) / 4)
    torch.testing.assert_close(defended_views("none", None, plain, clipped, 2.0, 4, g1)["w"], plain["w"] / 4)
    torch.testing.assert_close(defended_views("clip", None, plain, clipped, 2.0, 4, g1)["b"], clipped["b"] / 4)
    pr = defended_views("prune", 0.5, plain, clipped, 2.0, 1, g1)
    assert pr["w"].tolist() == [[3.0, 0.0]]


def test_lookup_gradient_sum_is_the_untied_embedding_gradient():
    torch.manual_seed(0)
    model = tiny_model(seed=1, dtype=torch.float64)
    ids = torch.randint(3, 60, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    emb = model.get_input_embeddings()
    kept = {}
    h = emb.register_forward_hook(lambda m, a, o: kept.__setitem__("e", o))
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    h.remove()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    loss = -(lp.sum(1) / mask[:, 1:].sum(1)).sum()
    G, = torch.autograd.grad(loss, kept["e"], retain_graph=True)
    ref, = torch.autograd.grad(loss, emb.weight)
    coefs = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    got = lookup_gradient_sum(G, ids, mask, None, emb.weight.shape[0])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    ref_c = sum(c * lookup_gradient_sum(G[i:i + 1], ids[i:i + 1], mask[i:i + 1], None, emb.weight.shape[0])
                for i, c in enumerate(coefs))
    torch.testing.assert_close(lookup_gradient_sum(G, ids, mask, coefs, emb.weight.shape[0]), ref_c)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("privlm") / "run"
    cfg = config_for("privacy", model="tiny", dtype="float64", attn_implementation="eager", max_length=64,
                     truncation="left", batch_sizes=(1, 4), batches_per_size=1, defences=("none", "dp:0.1", "topk:0.01"),
                     projection_sizes=(4, 64), delta=1e-3, loss_on="all")
    return run_privacy(cfg, out, model=tiny_model(0, torch.float64), tokenizer=tiny_tokenizer(),
                       records=demo_records(n_problems=3), progress=False, report=False)


def test_lm_token_set_and_stored_factors_leak(lm_run):
    c = lm_run.curves
    for B in (1, 4):
        row = _cell(c, "tokens", "none", B)
        assert row["precision_mean"] == 1.0  # only tokens present have a gradient row
        assert row["recall_mean"] >= 0.9  # a token seen only at the last position feeds no loss
    assert _cell(c, "tokens", "dp:0.1", 1)["recall_mean"] < _cell(c, "tokens", "none", 1)["recall_mean"]
    assert _cell(c, "factors", "stored", 1)["exact_mean"] == 1.0  # A_e of a block-0 projection gives the tokens
    big = _cell(c, "projected", "stored", 1, projection=64)  # r_in >= T: the row space pins the tokens
    small = _cell(c, "projected", "stored", 1, projection=4)  # r_in < T: nothing learnt
    assert big["recall_mean"] >= 0.9 and big["precision_mean"] > small["precision_mean"]  # the last token: no G


@pytest.mark.parametrize("spec, msg", [("dp:0", "noise multiplier must be > 0 (got 0)"), ("dp:-1", "must be > 0"),
                                       ("prune:1.5", "fraction must be in [0, 1)"), ("blur", "unknown defence"),
                                       ("quantize:2.5", "integer")])
def test_bad_defences_are_named(spec, msg):
    with pytest.raises(ValueError) as e:
        parse_defence(spec)
    assert str(e.value).startswith(f"--defences: ") and msg in str(e.value) and spec in str(e.value)


def test_delta_at_least_one_over_n_is_refused(tmp_path):
    net, batches = _digits_like(n=32)
    with pytest.raises(ValueError, match=r"--delta 0.05 must be < 1/N = 0.0312 \(N = 32 examples\)"):
        privacy_of(net, "cross_entropy", batches, tmp_path / "run", delta=0.05)
    assert not (tmp_path / "run" / "recovery").exists()


def test_cli_bad_settings_exit_2_with_one_line(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records(n_problems=1)))
    for extra, msg in ((["--defences", "none,dp:0"], "must be > 0"), (["--delta", "0.5"], "must be < 1/N")):
        with pytest.raises(SystemExit) as e:
            cli_main(["privacy", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                      "--quiet", "--dtype", "float64", "--attn", "eager", *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and msg in err, err


class _Scale(nn.Module):
    """A layer with a parameter and no factored route (per-example gradients go through torch.func)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


def test_a_layer_without_ghost_route_falls_back_and_is_said_once(tmp_path):
    net, batches = _digits_like()
    net = nn.Sequential(net[0], _Scale(12), net[1], net[2]).eval()
    res = privacy_of(net, "cross_entropy", batches, tmp_path / "run", batch_sizes=(1, 2), batches_per_size=2,
                     defences=("none", "clip"), delta=1e-3)
    notes = res.manifest["privacy"]["notes"]
    said = [n for n in notes if "_Scale" in n and "torch.func" in n]
    assert len(said) == 1, notes
    assert _cell(res.curves, "analytic", "clip", 1)["exact_mean"] == 1.0


def test_config_round_trip_and_quick_defaults():
    cfg = PrivacyConfig(data="x", defences="none,dp:1", batch_sizes="1,8")
    assert cfg.defences == ("none", "dp:1") and cfg.batch_sizes == (1, 8)
    assert PrivacyConfig.from_dict(cfg.to_dict()) == cfg
    assert np.isclose(cfg.delta, 1e-5)
