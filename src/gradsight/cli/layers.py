"""`gradsight layers`: per-example, per-layer gradient spectra of a model on grouped data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import LayersConfig, SummaryOptions
from ..data import EncodeOptions
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
    from ..distributed import DistInfo
    from ..pipeline import run_layers

    cfg = LayersConfig(
        model=model, data=data, split=split, kinds=split_csv(kinds), blocks=blocks, pattern=pattern,
        exclude=exclude,
        encode=EncodeOptions(max_length=max_length, loss_on=loss_on, truncation=truncation, chat=chat,
                             system_prompt=system_prompt, append_eos=append_eos),
        reduction=reduction, dtype=dtype, attn_implementation=attn, route=route, erank_weights=erank_weights,
        rel_tol=rel_tol, on_bad=on_bad, seed=seed, token_budget=token_budget, max_batch=max_batch,
        flush_every=flush_every, device=device,
        summary=SummaryOptions(reference=reference, n_boot=n_boot, n_perm=n_perm))
    result = run_layers(cfg, out, progress=not quiet, report=not no_report)
    _print_summary_on_main(result.path, quiet)


def _print_summary_on_main(path: Path, quiet: bool) -> None:
    import os

    if quiet or os.environ.get("RANK", "0") != "0":
        return
    from ..report import print_summary

    print_summary(path)
