"""`gradsight layers`: per-example, per-layer gradient spectra of a model on grouped data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import LayersConfig, SummaryOptions
from ..inputs.data import EncodeOptions
from ._common import split_csv

_H = {f: LayersConfig.__dataclass_fields__[f].metadata["help"] for f in LayersConfig.__dataclass_fields__}
_E = EncodeOptions.help()
_S = {f: SummaryOptions.__dataclass_fields__[f].metadata["help"] for f in SummaryOptions.__dataclass_fields__}


def layers(
    data: str = typer.Option(..., "--data", "-d", help=_H["data"]),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (resumed if it holds the same configuration)"),
    model: str = typer.Option("smollm2-135m-instruct", "--model", "-m", help=_H["model"]),
    split: str = typer.Option("train", help=_H["split"]),
    kinds: Optional[str] = typer.Option(None, help=_H["kinds"] + " (comma-separated)"),
    blocks: Optional[str] = typer.Option(None, help=_H["blocks"]),
    pattern: Optional[str] = typer.Option(None, help=_H["pattern"]),
    exclude: Optional[str] = typer.Option(None, help=_H["exclude"]),
    max_length: int = typer.Option(1024, help=_E["max_length"]),
    loss_on: str = typer.Option("response", help=_E["loss_on"]),
    truncation: str = typer.Option("right", help=_E["truncation"]),
    chat: str = typer.Option("auto", help=_E["chat"]),
    system_prompt: Optional[str] = typer.Option(None, help=_E["system_prompt"]),
    append_eos: bool = typer.Option(False, help=_E["append_eos"]),
    reduction: str = typer.Option("mean", help=_H["reduction"]),
    dtype: str = typer.Option("float32", help=_H["dtype"]),
    attn: str = typer.Option("sdpa", help=_H["attn_implementation"]),
    route: str = typer.Option("auto", help=_H["route"]),
    erank_weights: str = typer.Option("sv", help=_H["erank_weights"]),
    rel_tol: float = typer.Option(0.0, help=_H["rel_tol"]),
    on_bad: str = typer.Option("error", help=_H["on_bad"]),
    seed: int = typer.Option(0, help=_H["seed"]),
    token_budget: int = typer.Option(4096, help=_H["token_budget"]),
    max_batch: int = typer.Option(32, help=_H["max_batch"]),
    flush_every: int = typer.Option(4, help=_H["flush_every"]),
    device: str = typer.Option("auto", help=_H["device"]),
    reference: Optional[str] = typer.Option(None, help=_S["reference"]),
    n_boot: int = typer.Option(1000, help=_S["n_boot"]),
    n_perm: int = typer.Option(2000, help=_S["n_perm"]),
    no_report: bool = typer.Option(False, "--no-report", help="skip report.html"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
):
    """Per-example, per-layer gradient norms and spectra, compared across the data's groups."""
    kw = dict(locals())  # the options only: nothing else is bound yet
    from ..pipeline import run_layers

    out, quiet, no_report = kw.pop("out"), kw.pop("quiet"), kw.pop("no_report")
    cfg = LayersConfig(**config_kwargs(kw))
    result = run_layers(cfg, out, progress=not quiet, report=not no_report)
    _print_summary_on_main(result.path, quiet)


def config_kwargs(kw: dict) -> dict:
    """LayersConfig keyword arguments from the options every analysis shares (consumes them from `kw`)."""
    enc = {k: kw.pop(k) for k in ("max_length", "loss_on", "truncation", "chat", "system_prompt", "append_eos")}
    summary = {k: kw.pop(k) for k in ("reference", "n_boot", "n_perm") if k in kw}
    kw["kinds"] = split_csv(kw["kinds"])
    kw["attn_implementation"] = kw.pop("attn")
    return dict(kw, encode=EncodeOptions(**enc), summary=SummaryOptions(**summary))


def _print_summary_on_main(path: Path, quiet: bool) -> None:
    import os

    if quiet or os.environ.get("RANK", "0") != "0":
        return
    from ..report import print_summary

    print_summary(path)
