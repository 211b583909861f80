"""`gradsight importance` end to end: masks from the run's statistics against hand references, evaluation,
saving, and the clear errors the issue asks for (bad sparsity, N > M, no supervised token, a pattern matching
nothing, a pruned model that produces NaNs)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradsight.analyses.importance import importance_of
from gradsight.cli import main as cli_main
from gradsight.importance.masks import layer_mask, row_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double().eval()
    X = torch.randn(40, 8, dtype=torch.float64) * torch.linspace(0.1, 3.0, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (40,))
    return net, [(X[:16], Y[:16]), (X[16:], Y[16:])]


def _sq_in(net, batches):
    """sum over rows of x_j^2 at each Linear's input, by forward hooks (independent of the capture path)."""
    out = {"0": 0, "2": 0}
    hs = [net[int(n)].register_forward_pre_hook(lambda m, a, n=n: out.__setitem__(n, out[n] + a[0].pow(2).sum(0)))
          for n in out]
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    for h in hs:
        h.remove()
    return out


def test_module_run_masks_equal_hand_references_and_the_saved_model_is_the_pruned_one(tmp_path):
    from safetensors.torch import load_file

    net, batches = _mlp()
    run = importance_of(net, "cross_entropy", batches, tmp_path / "run", eval_batches=batches[1:],
                        methods=("magnitude", "wanda", "gblm"), structures=("unstructured", "2:4"),
                        sparsities=(0.25, 0.5), save_model="wanda:unstructured:0.5")
    ev = run.evaluation.set_index(["method", "structure", "sparsity_target"])
    assert ev.loc[("dense", "dense", 0.0), "in_sample"] == False  # noqa: E712 (evaluated on other batches)
    assert {"accuracy", "nll", "finite"} <= set(run.evaluation.columns)
    for s in (0.25, 0.5):
        assert ev.loc[("wanda", "unstructured", s), "sparsity"] == pytest.approx(s)
    sq = _sq_in(net, batches)
    layers = run.layers.set_index(["method", "structure", "sparsity_target", "layer"])
    for name in ("0", "2"):
        W = net[int(name)].weight.detach()
        wanda = W.abs() * (sq[name] / 40).sqrt()  # Wanda: |W_ij| * ||X_j|| / sqrt(N), per row
        keep = row_mask(wanda, 0.5)
        saved = load_file(str(tmp_path / "run" / "pruned" / "model.safetensors"))[f"{name}.weight"]
        assert torch.equal(saved != 0, keep) and torch.equal(saved[keep], W[keep])
        mag = layer_mask(W.abs(), 0.5)  # magnitude: one threshold per matrix
        overlap = ((~keep) & (~mag)).sum() / (~keep).sum()
        assert layers.loc[("wanda", "unstructured", 0.5, name), "overlap_magnitude"] == pytest.approx(float(overlap))
    # 2:4 on a layer with 12 inputs and one with 8: both covered, exactly half of every group of 4 pruned
    assert ev.loc[("gblm", "2:4", 0.5), "sparsity"] == pytest.approx(0.5)
    assert set(run.scores("gblm")) == {"0", "2"}


def test_layers_an_nm_structure_cannot_cover_stay_dense_and_are_noted(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    X, Y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    run = importance_of(net, "cross_entropy", [(X, Y)], tmp_path / "run", methods=("magnitude",),
                        structures=("2:4",))
    lay = run.layers.set_index("layer")
    assert lay.loc["0", "sparsity"] == 0 and lay.loc["2", "sparsity"] == pytest.approx(0.5)
    notes = run.manifest["importance"]["notes"]
    assert any("left dense" in n and "0" in n for n in notes)


class _Fragile(nn.Module):
    """Divides by its smallest |weight|: any pruned (zeroed) weight makes the output non-finite."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x) / self.lin.weight.abs().min()


def test_a_pruned_model_that_produces_nans_is_reported_and_not_saved(tmp_path):
    torch.manual_seed(0)
    net = _Fragile().eval()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    run = importance_of(net, "cross_entropy", [(X, Y)], tmp_path / "run", methods=("magnitude",),
                        structures=("unstructured",), save_model="magnitude:unstructured:0.5")
    ev = run.evaluation.set_index("method")
    assert bool(ev.loc["dense", "finite"]) and not bool(ev.loc["magnitude", "finite"])
    assert not (tmp_path / "run" / "pruned").exists()
    assert run.manifest["importance"]["saved_model"] is None
    assert "not finite" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["--sparsities", "1.5"], "open interval (0, 1)"),
    (["--sparsities", "0"], "open interval (0, 1)"),
    (["--structures", "5:4"], "N must be smaller than M"),
    (["--pattern", "no_such_layer"], "no_such_layer"),
])
def test_bad_options_exit_2_with_one_clear_line(args, message, model_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["importance", "--model", str(model_dir), "--data", str(data_file), "--out",
                  str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and message in err, err
    assert len(err.splitlines()) == 1


def test_calibration_without_supervised_tokens_is_refused(model_dir, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    # every response is cut away: the prompt alone fills max_length
    data.write_text("".join(json.dumps({"group": "g", "prompt": "a long prompt " * 20, "response": "x"}) + "\n"
                            for _ in range(3)))
    with pytest.raises(SystemExit) as e:
        cli_main(["importance", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                  "--quiet", "--max-length", "16", "--chat", "never"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no example has a supervised token" in err, err
