"""The monitor inside the trainers people use (HF Trainer, TRL, Lightning), its sinks (run directory,
TensorBoard) and `gradsight report` on a training run."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradsight.train import Monitor
from gradsight.train import schema as S

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: batch splits comparable
    return GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=5, logging_steps=1, max_grad_norm=0.5, report_to=[], save_strategy="no", use_cpu=True,
                learning_rate=1e-3, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _model_rows(df, metric):
    return df[(df.layer == S.MODEL) & (df.metric == metric)].set_index("step")["value"].sort_index()


def test_hf_trainer_logged_grad_norm_equals_the_monitors_pre_clip_total(tmp_path):
    from transformers import Trainer

    from gradsight.train import GradsightCallback

    cb = GradsightCallback(out=None, every={"per_example": 2, "hist": None})
    Trainer(model=_gpt2(), args=_hf_args(tmp_path), train_dataset=_Tokens(), callbacks=[cb]).train()
    df = cb.monitor.table()
    ours, theirs = _model_rows(df, S.GRAD_NORM), _model_rows(df, "hf:grad_norm")
    assert len(ours) == 5 and ours.index.equals(theirs.index)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-6)
    # per-layer norms add up in quadrature to the global norm; the clipped norm is max_grad_norm when clipped
    per_layer = df[(df.layer != S.MODEL) & (df.metric == S.GRAD_NORM)].groupby("step")["value"].apply(
        lambda v: float(np.sqrt((v ** 2).sum())))
    np.testing.assert_allclose(per_layer.to_numpy(), ours.to_numpy(), rtol=1e-6)
    clipped = _model_rows(df, S.GRAD_NORM_CLIPPED)
    assert np.allclose(clipped[ours > 0.5], 0.5, rtol=1e-5) and (ours > 0.5).any()
    np.testing.assert_allclose(_model_rows(df, S.LOSS).to_numpy(), _model_rows(df, "hf:loss").to_numpy())
    assert len(_model_rows(df, S.NOISE_SCALE)) == 3  # per_example on steps 0, 2, 4


def test_hf_trainer_with_and_without_accumulation_gives_the_same_norms(tmp_path):
    from transformers import Trainer

    from gradsight.train import GradsightCallback

    out = []
    for bs, ga in ((8, 1), (4, 2)):
        cb = GradsightCallback(every={"per_example": None, "hist": None})
        args = _hf_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=3)
        Trainer(model=_gpt2(), args=args, train_dataset=_Tokens(), callbacks=[cb]).train()
        out.append(cb.monitor.table())
    for metric in (S.GRAD_NORM, S.UPDATE_RATIO):
        np.testing.assert_allclose(_model_rows(out[0], metric).to_numpy(), _model_rows(out[1], metric).to_numpy(),
                                   rtol=1e-5)


def test_trl_sft_trainer_runs_with_the_callback(tmp_path):
    import trl
    from datasets import Dataset

    from gradsight.train import GradsightCallback
    from helpers import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    ds = Dataset.from_list([{"text": f"problem {i}: the answer is {i * 7 % 13}."} for i in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                         max_length=32, dataset_num_proc=None)
    cb = GradsightCallback(out=tmp_path / "run", every={"per_example": 1, "hist": None})
    trl.SFTTrainer(model=tiny_model(), args=args, train_dataset=ds, processing_class=tok, callbacks=[cb]).train()
    series = pd.read_parquet(tmp_path / "run" / "series.parquet")
    ours, theirs = _model_rows(series, S.GRAD_NORM), _model_rows(series, "hf:grad_norm")
    assert len(ours) == 3
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-6)
    assert (tmp_path / "run" / "report.html").exists()


def test_lightning_callback_reads_clipped_and_unclipped_norms(tmp_path):
    import pytorch_lightning as pl

    from gradsight.train import GradsightLightningCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 5, generator=g) * 5, torch.randint(0, 3, (64,), generator=g))
    cb = GradsightLightningCallback(every={"per_example": 2, "hist": None})
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.05,
                         gradient_clip_algorithm="norm", callbacks=[cb])
    trainer.fit(Module(), torch.utils.data.DataLoader(ds, batch_size=16))
    df = cb.monitor.table()
    pre, post = _model_rows(df, S.GRAD_NORM), _model_rows(df, S.GRAD_NORM_CLIPPED)
    assert len(pre) == 6 and (pre > 0.05).all()
    np.testing.assert_allclose(post.to_numpy(), 0.05, rtol=1e-4)  # read after Lightning clipped, before the update
    assert (_model_rows(df, S.UPDATE_RATIO) > 0).all()
    assert len(_model_rows(df, S.LOSS)) == 6 and len(_model_rows(df, S.PE_Q50)) == 3


def _loop(model, mon, steps, seed=0):
    opt = mon.optimizer
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        mon.log_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_run_directory_resumes_and_refuses_another_configuration(tmp_path):
    from gradsight.runs.store import RunMismatchError

    def make(start=0, every=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, Monitor(model, opt, out=tmp_path / "run", flush_every=4, start_step=start,
                              every=every or {"per_example": None, "hist": None}, report=False)

    model, mon = make()
    _loop(model, mon, 10)
    mon.flush()  # a run killed after step 9: steps 0..9 written, no close()
    mon.remove()
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not man.get("finished")
    # resumed from a checkpoint taken at step 6: steps 6.. are written again and replace the old rows
    model, mon = make(start=6)
    _loop(model, mon, 6, seed=1)
    mon.close()
    series = pd.read_parquet(tmp_path / "run" / "series.parquet")
    loss = _model_rows(series, S.LOSS)
    assert list(loss.index) == list(range(12))
    assert not series.duplicated(["step", "layer", "metric"]).any()
    with pytest.raises(RunMismatchError, match="every"):
        make(every={"per_example": 5, "hist": None})


def test_tensorboard_event_files_hold_per_layer_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = Monitor(model, opt, out=tmp_path / "run", tensorboard=True, every={"per_example": None, "hist": 2},
                  flush_every=2, report=False)
    _loop(model, mon, 4)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "grad_norm/0.weight" in tags["scalars"] and "grad_norm" in tags["scalars"]
    vals = [e.value for e in acc.Scalars("grad_norm/0.weight")]
    series = pd.read_parquet(tmp_path / "run" / "series.parquet")
    ours = series[(series.metric == S.GRAD_NORM) & (series.layer == "0.weight")].sort_values("step")["value"]
    np.testing.assert_allclose(vals, ours.to_numpy(), rtol=1e-6)
    hist = acc.Histograms("grad/0.weight")
    assert [h.step for h in hist] == [0, 2]
    assert sum(hist[0].histogram_value.bucket) == 40  # every entry of the 8x5 weight gradient in 64 bins


def test_gradsight_report_renders_a_training_run(tmp_path, capsys):
    from gradsight.cli import main as cli_main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = Monitor(model, opt, out=tmp_path / "run", every={"per_example": 3, "hist": None}, flush_every=10)
    _loop(model, mon, 30)
    assert mon.close() == tmp_path / "run" / "report.html"
    (tmp_path / "run" / "report.html").unlink()
    with pytest.raises(SystemExit) as e:
        cli_main(["report", str(tmp_path / "run"), "--quiet"])
    assert e.value.code in (0, None)
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "grad" in page
    import gradsight

    run = gradsight.open_run(tmp_path / "run")
    assert list(run.metric(S.LOSS).index) == list(range(30)) and run.manifest["finished"]
    assert len(run.metric(S.GRAD_NORM, "0.weight")) == 30 and list(run.diagnoses.columns) == S.DIAGNOSIS_COLUMNS


def test_callbacks_refuse_a_trainer_without_their_requirements(tmp_path):
    from gradsight.train import GradsightCallback

    cb = GradsightCallback()
    args = _hf_args(tmp_path)
    with pytest.raises(ValueError, match="no optimizer"):
        cb.on_train_begin(args, None, None, model=_gpt2(), optimizer=None)
    with pytest.raises(ValueError, match="no model"):
        cb.on_train_begin(args, None, None, model=None, optimizer=None)
    args.deepspeed = "ds_config.json"
    model = _gpt2()
    with pytest.raises(ValueError, match="DeepSpeed"):
        cb.on_train_begin(args, None, None, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
