"""The built-in demo: fast vs slow (vs wrong slow) thinking on SmolLM2-135M-Instruct, and curvature.

Two sizes of the same demo. `run_tour` (``gradsight demo``, ``make demo``) runs every registered analysis
once on a small sample and writes OUT/index.html, a page linking every report with its key findings
(`gradsight.report.index.render_index`). Its plan (`tour_plan`, one `TourRun` per run directory):

    OUT/layers                          layers: 8 built-in problems x {fast, slow, wrong} on SmolLM2, every
                                        linear layer of all 30 blocks, response-only token-mean loss
    OUT/geometry                        geometry: 4 problems as groups, preference pairs and rollouts (8 loss
                                        terms each): alignment, conflict, entanglement, PSR/NSR, G-Vendi, noise
    OUT/train                           train (a run kind): SmolLM2's last 4 blocks fine-tuned for 30 AdamW
                                        steps of 4 on 24 problems' correct answers under `train.Monitor`
                                        (`demo.train.fine_tune`): norms, spikes, per-example norms, diagnoses
    OUT/curvature/digits                curvature: Hessian of an MLP trained on scikit-learn's digits (top-20
                                        eigenvalues, outliers against the SLQ bulk, trace, density, per layer)
    OUT/curvature/smollm2               curvature: SmolLM2's top Hessian eigenvalue of its first and last block
                                        (each and together) on 1 problem x 3 responses (OUT/curvature/lm for
                                        another --model)
    OUT/landscape/digits-hessian-plane  landscape: the digits MLP's loss on the plane of its top-2 Hessian
    OUT/landscape/digits-random-plane     eigenvectors, on a filter-normalised random plane (21 x 21 grids)
    OUT/landscape/digits-interpolation    and along the segment to a second MLP trained from another seed

`run_demo`, `run_geometry_demo` and `run_curvature_demo` (``gradsight demo --full``) are the full demo:

1. layers (into OUT itself): the layer-wise gradient analysis of Li, Li, Zhou (ACL 2025) on the packaged
   arithmetic word problems (60 by default): every linear layer of all 30 blocks, response-only token-mean
   loss, group comparison, report.
2. geometry (into OUT/geometry): 30 problems as plain groups, as preference pairs (chosen = correct
   step-by-step, rejected = wrong step-by-step) and as rewarded rollouts, with its own report.
3. curvature (into OUT/curvature): the digits MLP's Hessian and its three landscapes as in the tour, and the
   per-block top Hessian eigenvalue of SmolLM2-135M-Instruct (all 30 blocks) on a few of the built-in problems.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..analyses.curvature import CurvatureConfig, curvature_of, run_curvature
from ..analyses.geometry import GeometryConfig, run_geometry
from ..analyses.landscape import landscape_of
from ..analyses.layers import LayersConfig, run_layers
from ..config import EncodeOptions, SummaryOptions
from .problems import demo_records, geometry_records

__all__ = ["demo_config", "run_demo", "run_geometry_demo", "run_curvature_demo", "TourRun", "tour_plan",
           "run_tour", "check_demo_out", "TOUR_PROBLEMS", "TOUR_GEOMETRY_PROBLEMS", "TOUR_CURVATURE_PROBLEMS", "TOUR_BLOCKS",
           "TOUR_CURVATURE_EXAMPLES", "TOUR_GEOMETRY_KINDS", "TOUR_ATTRIBUTION_PROBLEMS", "attribution_records",
           "run_attribution_demo", "run_importance_demo", "TOUR_IMPORTANCE_RECORDS"]

NET = "digits MLP 64-32-32-10 (seed 0)"
LM = "smollm2-135m-instruct"
TOUR_PROBLEMS = 8  # layers: problems x {fast, slow, wrong}
TOUR_GEOMETRY_PROBLEMS = 4  # geometry: problems x 8 loss terms
TOUR_CURVATURE_PROBLEMS = 1  # SmolLM2 curvature: problems x {fast, slow, wrong}, pooled
TOUR_CURVATURE_EXAMPLES = 1  # ... of which the first response only (each Hessian product is ~3 fwd/bwd passes)
TOUR_GEOMETRY_KINDS = ("q", "v", "down")  # geometry: the layer kinds of the tour (every block)
TOUR_BLOCKS = "0,-1"  # SmolLM2 curvature: the first and the last transformer block
TOUR_IMPORTANCE_RECORDS = 12  # importance: ~1000-character chunks of the shipped calibration text
TOUR_ATTRIBUTION_PROBLEMS = 6  # attribution: problems x {fast, slow} training records, their "wrong" as queries
LANDSCAPES = ("digits-hessian-plane", "digits-random-plane", "digits-interpolation")
TOUR_INTRO = ("The gradsight demo tour: every analysis once, on a small sample (the Data column gives each run's "
              "size). `gradsight demo --full` runs the larger demo.")


def demo_config(model: str = LM, **overrides) -> LayersConfig:
    base = dict(model=model, data="builtin:demo-arithmetic", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, summary=SummaryOptions(reference="slow"))
    base.update(overrides)
    return LayersConfig(**base)


def run_demo(out: str | Path = "runs/demo", n_problems: int = 60, model: str = LM, progress: bool = True,
             **overrides):
    """Run the demo's layers analysis into `out` and write the report. Returns the LayersResult."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = demo_config(model, data=f"builtin:demo-arithmetic-{n_problems}", **overrides)
    return run_layers(cfg, out, progress=progress, records=demo_records(n_problems=n_problems))


def run_geometry_demo(out: str | Path = "runs/demo/geometry", n_problems: int = 30, model: str = LM,
                      progress: bool = True, **overrides):
    """The geometry part of the demo (8 loss terms per problem). Returns the GeometryResult."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = dict(model=model, data=f"builtin:demo-geometry-{n_problems}", encode=EncodeOptions(max_length=512),
                token_budget=2048, max_batch=32, target="slow")
    base.update(overrides)
    return run_geometry(GeometryConfig(**base), out, progress=progress, records=geometry_records(n_problems))


def attribution_records(n_problems: int = TOUR_ATTRIBUTION_PROBLEMS, seed: int = 0) -> tuple[list, list]:
    """(training records, queries) of the attribution demo: each problem's fast and slow answers are training
    records and its wrong answer is a query, all with the problem as their group ("p003"), so the same-group
    precision of a query's top proponents says whether attribution finds the records of the same problem."""
    recs = [dict(r, group=f"p{r['problem']:03d}", answer_kind=r["group"]) for r in demo_records(n_problems, seed)]
    return [r for r in recs if r["answer_kind"] != "wrong"], [r for r in recs if r["answer_kind"] == "wrong"]


def run_attribution_demo(out: str | Path = "runs/demo/attribution", n_problems: int = TOUR_ATTRIBUTION_PROBLEMS,
                         model: str = LM, progress: bool = True, **overrides):
    """The attribution part of the demo: the wrong answers as queries, attributed to the fast and slow answers
    of every problem (EK-FAC, TRAK, gradient cosine). The queries are written next to the run directory
    (OUT.queries.jsonl, deterministic). Returns the AttributionResult."""
    import json

    from ..analyses.attribution import AttributionConfig, run_attribution
    from ..runs.store import atomic_write_text

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out)
    train, queries = attribution_records(n_problems)
    qfile = out.with_name(out.name + ".queries.jsonl")
    qfile.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(qfile, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in queries))
    base = dict(model=model, data=f"builtin:demo-attribution-{n_problems}", queries=str(qfile),
                encode=EncodeOptions(max_length=512), token_budget=2048, methods=("ekfac", "trak", "grad_cos"))
    base.update(overrides)
    return run_attribution(AttributionConfig(**base), out, progress=progress, records=train)


def run_importance_demo(out: str | Path = "runs/demo/importance", model: str = LM, progress: bool = True,
                        n_records: int = TOUR_IMPORTANCE_RECORDS, **overrides):
    """The importance part of the demo: the linear layers of SmolLM2's last 3 blocks pruned to 50% (unstructured
    and 2:4) by magnitude, Wanda and GBLM, calibrated on chunks of the shipped calibration text (128 tokens each)
    and evaluated by perplexity on the shipped held-out text (every token supervised). Returns the
    ImportanceResult. (The whole model: benchmarks/importance.py.)"""
    from ..analyses.importance import ImportanceConfig, run_importance
    from ..importance.text import sample_text, text_records

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = text_records(sample_text("calibration"), chars=1000, group="calibration")[:n_records]
    base = dict(model=model, data=f"builtin:importance-calibration-{n_records}", eval_data="builtin:heldout",
                encode=EncodeOptions(max_length=128, loss_on="all", chat="never"), attn_implementation="eager",
                blocks="-3:",  # the last 3 blocks' 21 linear layers: the tour stays a few minutes on 2 cores
                methods=("magnitude", "wanda", "gblm"), structures=("unstructured", "2:4"), sparsities=(0.5,),
                save_scores=False, token_budget=2048, max_batch=4)
    base.update(overrides)
    return run_importance(ImportanceConfig(**base), out, progress=progress, records=records)


# ---------------------------------------------------------------------------------------------------------
# the digits MLP and the SmolLM2 curvature run (shared by the full demo and the tour)
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits_nets():
    """(MLP trained from seed 0, MLP trained from seed 1, [(X_train, y_train)]): trained once per process."""
    from .digits import load_digits_tensors, train_digits_mlp

    data = load_digits_tensors()
    net, (X, y), _, _ = train_digits_mlp(data=data, seed=0)
    other, *_ = train_digits_mlp(data=data, seed=1)
    return net, other, [(X, y)]


def digits_curvature(out: str | Path, progress: bool = True) -> Path:
    """`curvature_of` on the digits MLP into `out` (model scope: top-20 eigenvalues, Hutch++ trace, SLQ
    density with 3 probes x 100 steps; each layer: top-20 and trace) with its report; returns the run path."""
    net, _, batches = digits_nets()
    return curvature_of(net, "cross_entropy", batches, out, per=("model", "block"), top_k=20, tol=1e-6,
                        n_products=99, n_probes=3, n_steps=100, progress=progress, report=True, name=NET).path


def digits_landscape(out: str | Path, kind: str, curvature_run: str | Path | None = None) -> Path:
    """`landscape_of` the digits MLP into `out` with its report: kind "hessian" (the plane of the top-2
    eigenvectors stored by `curvature_run`), "random" (two filter-normalised directions), both 21 x 21, or
    "interpolate" (21 points on the segment to the seed-1 MLP). Returns the run path."""
    net, other, batches = digits_nets()
    kw = {"hessian": dict(kind="hessian", from_curvature=curvature_run), "random": dict(kind="random"),
          "interpolate": dict(kind="interpolate", to=other, dims=1)}[kind]
    return landscape_of(net, "cross_entropy", batches, out, steps=21, report=True, name=NET, **kw).path


def lm_curvature(out: str | Path, n_problems: int = 1, model: str = LM, blocks: str | None = None,
                 progress: bool = True, n_examples: int | None = None) -> Path:
    """`run_curvature` on `n_problems` built-in problems x {fast, slow, wrong}: the Hessian of the token-mean
    loss restricted to each selected transformer block's linear weights (and to all of them together), its top
    eigenvalue by Lanczos (residual tolerance 1e-2, so the eigenvalue is good to about 1e-4 relative), without
    trace or density (each product costs about 3 plain forward+backward passes). `blocks`: a block selection
    such as "0,-1" (default: every block); `n_examples`: only the first n responses. Returns the run path (report
    written)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = CurvatureConfig(model=model, data=f"builtin:demo-arithmetic-{n_problems}",
                          encode=EncodeOptions(max_length=512), token_budget=4096, max_batch=64, blocks=blocks,
                          n_examples=n_examples,
                          per=("model", "block"), top_k=1, tol=1e-2, max_iter=40, trace_scopes=(),
                          density_scopes=())
    return run_curvature(cfg, out, records=demo_records(n_problems=n_problems), progress=progress).path


def run_curvature_demo(out: str | Path = "runs/demo/curvature", lm_problems: int = 1, model: str = LM,
                       progress: bool = True, lm: bool = True) -> dict:
    """The curvature part of the full demo; returns {name: run directory} of the runs it wrote (each with a
    report): OUT/digits (`digits_curvature`), OUT/digits-hessian-plane, OUT/digits-random-plane and
    OUT/digits-interpolation (`digits_landscape`), and with lm=True OUT/smollm2 (`lm_curvature` on
    `lm_problems` problems, every block)."""
    out = Path(out)
    runs = {"digits": digits_curvature(out / "digits", progress)}
    for name, kind in zip(LANDSCAPES, ("hessian", "random", "interpolate")):
        runs[name] = digits_landscape(out / name, kind, runs["digits"])
    if lm:
        runs["smollm2"] = lm_curvature(out / "smollm2", lm_problems, model, progress=progress)
    return runs


# ---------------------------------------------------------------------------------------------------------
# the tour
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourRun:
    """One run of the tour.

    Attributes:
        name: its run directory relative to the tour's OUT (e.g. "curvature/digits").
        analysis: the registered analysis it runs.
        model: what it runs on (a model spec, or the digits MLP).
        what: one line: the data and the size.
        run: ``run(out_root, progress) -> Path``: make the run (and its report) in ``out_root / name``.
    """

    name: str
    analysis: str
    model: str
    what: str
    run: Callable[[Path, bool], Path]


def tour_plan(model: str = LM, n_problems: int = TOUR_PROBLEMS, geometry: bool = True,
              geometry_problems: int = TOUR_GEOMETRY_PROBLEMS, curvature: bool = True,
              curvature_problems: int = TOUR_CURVATURE_PROBLEMS, blocks: str = TOUR_BLOCKS,
              curvature_examples: int | None = TOUR_CURVATURE_EXAMPLES, train: bool = True,
              attribution: bool = True, attribution_problems: int = TOUR_ATTRIBUTION_PROBLEMS,
              importance: bool = True, privacy: bool = True) -> list[TourRun]:
    """The runs of the tour in order (nothing is loaded or run here; see the module docstring).

    geometry=False leaves out the geometry run; curvature=False the curvature and landscape runs (as
    ``--no-geometry`` and ``--no-curvature`` do in the full demo); train=False the fine-tuning run;
    attribution=False the attribution run; importance=False the pruning run; privacy=False the two privacy audits.
    `model` is
    used by every language-model run (layers, geometry, fine-tuning, SmolLM2 curvature); `blocks` selects the
    blocks of the SmolLM2 curvature run and `curvature_examples` caps its responses (None: all of its problems'
    three).
    """
    lm_name = "smollm2" if model == LM else "lm"
    plan = [TourRun("layers", "layers", model, f"{n_problems} built-in problems x {{fast, slow, wrong}}, every "
                    "linear layer", lambda root, p: run_demo(root / "layers", n_problems, model, p).path)]
    if geometry:
        plan.append(TourRun("geometry", "geometry", model, f"{geometry_problems} problems x 8 loss terms (groups, "
                            f"preference pairs, rollouts), layers {','.join(TOUR_GEOMETRY_KINDS)} of every block",
                            lambda root, p: run_geometry_demo(root / "geometry", geometry_problems, model, p,
                                                              kinds=TOUR_GEOMETRY_KINDS).path))
    if attribution:
        plan.append(TourRun("attribution", "attribute", model, f"{attribution_problems} problems: the wrong answers "
                            "attributed to the fast and slow answers (EK-FAC, TRAK, cosine), every linear layer",
                            lambda root, p: run_attribution_demo(root / "attribution", attribution_problems, model,
                                                                 p).path))
    if importance:
        plan.append(TourRun("importance", "importance", model, f"{TOUR_IMPORTANCE_RECORDS} chunks of the shipped "
                            "calibration text: the last 3 blocks pruned to 50% (unstructured, 2:4) by magnitude, "
                            "Wanda and GBLM; perplexity on the held-out text",
                            lambda root, p: run_importance_demo(root / "importance", model, p).path))
    if privacy:
        from .privacy import DIGITS_DEFENCES, digits_privacy, lm_privacy

        plan += [
            TourRun("privacy/digits", "privacy", "digits MLP 64-32-10 (seed 0)", f"batches of 1, 4, 16 digits under {len(DIGITS_DEFENCES)} "
                    "defences: analytic recovery, iDLG labels, Inverting Gradients, the projected-feature leak; "
                    "accuracy of the MLP trained under each defence beside epsilon",
                    lambda root, p: digits_privacy(root / "privacy" / "digits", p).path),
            TourRun(f"privacy/{lm_name}", "privacy", model, "the token set of 2 problems' responses from the embedding "
                    "gradient at batch 1 and 4, plain and under DP noise; what stored factors and projections reveal",
                    lambda root, p: lm_privacy(root / "privacy" / lm_name, model, p).path),
        ]
    if train:
        from .train import TRAIN_BATCH, TRAIN_BLOCKS, TRAIN_PROBLEMS, TRAIN_STEPS, fine_tune

        plan.append(TourRun("train", "train", model, f"monitored fine-tuning of the last {TRAIN_BLOCKS} blocks: "
                            f"{TRAIN_STEPS} AdamW steps of {TRAIN_BATCH} on {TRAIN_PROBLEMS} problems x "
                            "{fast, slow}",
                            lambda root, p: fine_tune(root / "train", model, progress=p)))
    if curvature:
        plan += [
            TourRun("curvature/digits", "curvature", NET, "Hessian: top-20 eigenvalues, trace, density; per layer",
                    lambda root, p: digits_curvature(root / "curvature" / "digits", p)),
            TourRun(f"curvature/{lm_name}", "curvature", model, f"top Hessian eigenvalue of blocks {blocks} (each "
                    "and together), " + (f"{curvature_problems} problem(s) x 3 responses" if curvature_examples is None
                                         else f"the first {curvature_examples} response(s)"),
                    lambda root, p: lm_curvature(root / "curvature" / lm_name, curvature_problems, model,
                                                 blocks, p, n_examples=curvature_examples)),
        ]
        for name, kind, what in zip(LANDSCAPES, ("hessian", "random", "interpolate"),
                                    ("plane of the top-2 Hessian eigenvectors, 21 x 21",
                                     "filter-normalised random plane, 21 x 21",
                                     "segment to the MLP trained from seed 1, 21 points")):
            plan.append(TourRun(f"landscape/{name}", "landscape", NET, what,
                                lambda root, p, name=name, kind=kind: digits_landscape(
                                    root / "landscape" / name, kind, root / "curvature" / "digits")))
    return plan


def run_tour(out: str | Path = "runs/demo", *, model: str = LM, n_problems: int = TOUR_PROBLEMS,
             geometry: bool = True, geometry_problems: int = TOUR_GEOMETRY_PROBLEMS, train: bool = True,
             curvature: bool = True, curvature_problems: int = TOUR_CURVATURE_PROBLEMS, blocks: str = TOUR_BLOCKS,
             curvature_examples: int | None = TOUR_CURVATURE_EXAMPLES, progress: bool = True,
             after: Callable[[TourRun, Path], None] | None = None, attribution: bool = True,
             importance: bool = True, privacy: bool = True) -> dict:
    """Make every run of `tour_plan` under `out`, then OUT/index.html.

    A run directory that already holds the same run is reused (the engine resumes it; a finished run costs
    only its report); `after(step, path)` is called after each run (e.g. to print its summary).

    Returns:
        {run name: run directory} plus "index": the index page.
    """
    from ..report.index import render_index

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out)
    check_demo_out(out, full=False)
    t0 = time.perf_counter()
    runs: dict = {}
    for step in tour_plan(model, n_problems, geometry, geometry_problems, curvature, curvature_problems, blocks,
                          curvature_examples, train=train, attribution=attribution, importance=importance,
                          privacy=privacy):
        runs[step.name] = step.run(out, progress)
        if after is not None:
            after(step, runs[step.name])
    runs["index"] = render_index(out, title="gradsight demo tour", wall_s=time.perf_counter() - t0,
                                 intro=TOUR_INTRO)
    return runs



def check_demo_out(out: str | Path, full: bool) -> None:
    """Refuse, before anything loads, an OUT that holds the other size of the demo: the full demo's layers run
    is OUT itself, the tour's runs are OUT/<analysis>/..., and both use OUT/geometry (raises
    RunMismatchError, which the command line prints as one line)."""
    from ..runs.store import RunMismatchError

    out = Path(out)
    if full and not (out / "manifest.json").exists() and (out / "layers" / "manifest.json").exists():
        raise RunMismatchError(f"{out} holds the demo tour; run the full demo into another directory, e.g. "
                               f"`gradsight demo --full --out {out.parent / (out.name + '-full')}`")
    if not full and (out / "manifest.json").exists():
        raise RunMismatchError(f"{out} holds the full demo (its layers run); run the tour into another "
                               f"directory, e.g. `gradsight demo --out {out.parent / (out.name + '-tour')}`")
