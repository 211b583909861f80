"""`gradsight demo`: the built-in demo, a short tour of every analysis (default) or the full demo (--full).

Tour (`demo.run.run_tour`): layers, geometry, curvature and landscape runs on small samples (SmolLM2 and a
digits MLP) into OUT/<analysis>/..., a monitored fine-tuning of SmolLM2 into OUT/train (`demo.train.fine_tune`;
tour only, --no-train leaves it out), and OUT/index.html linking every report. --full: the full demo as before
(`run_demo` into OUT, `run_geometry_demo` into OUT/geometry, `run_curvature_demo` into OUT/curvature), plus
the same index page. The size options keep their meaning in both modes; their defaults are the full demo's,
and in the tour an option that is not given takes the tour's size (8 problems for layers, 4 for geometry).
"""

from __future__ import annotations

from pathlib import Path

import typer


def _given(ctx: typer.Context, name: str) -> bool:
    """The option was given (command line, environment), not left at its default. By the source's name: typer
    may bring its own copy of click, whose ParameterSource is another enum."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory"),
    n_problems: int = typer.Option(60, help="number of built-in word problems (x3 responses) of the layers run "
                                            "(the tour uses 8 unless given)"),
    model: str = typer.Option("smollm2-135m-instruct", help="model spec"),
    geometry: bool = typer.Option(True, help="also run the geometry demo (OUT/geometry)"),
    geometry_problems: int = typer.Option(30, help="problems of the geometry demo (x8 loss terms; the tour uses 4 "
                                                   "unless given)"),
    train: bool = typer.Option(True, help="also run the monitored fine-tuning of SmolLM2 (OUT/train; the tour "
                                          "only)"),
    attribution: bool = typer.Option(True, help="also run the attribution demo (OUT/attribution: SmolLM2's wrong "
                                                "answers attributed to the fast and slow ones; the tour only)"),
    importance: bool = typer.Option(True, help="also run the importance demo (OUT/importance: SmolLM2 pruned by "
                                               "magnitude, Wanda and GBLM, perplexity on held-out text; the tour "
                                               "only)"),
    privacy: bool = typer.Option(True, help="also run the privacy audits (OUT/privacy/digits: leakage and the cost of "
                                            "each defence on a digits MLP; OUT/privacy/smollm2: token recovery from "
                                            "SmolLM2's gradients; the tour only)"),
    curvature: bool = typer.Option(True, help="also run the curvature and landscape demos (digits MLP spectrum "
                                              "and landscapes, SmolLM2 per-block top eigenvalues; the tour: the "
                                              "first and last block only)"),
    curvature_problems: int = typer.Option(1, help="problems (x3 responses) for the SmolLM2 Hessian (the tour uses "
                                                   "the first response only unless given)"),
    full: bool = typer.Option(False, "--full", help="the full demo (60 + 30 problems, all 30 blocks' Hessian; "
                                                    "about 15 minutes on 2 cores) instead of the tour"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
):
    """Run the built-in demo and write the reports and OUT/index.html.

    Default: the tour, every analysis once on a small sample (a few minutes on a CPU).

    --full: the full demo (at least 60 problems x {fast, slow, wrong}).
    """
    from ..demo.run import (TOUR_CURVATURE_EXAMPLES, TOUR_GEOMETRY_PROBLEMS, TOUR_PROBLEMS, check_demo_out,
                            run_curvature_demo, run_demo, run_geometry_demo, run_tour)
    from ..report import print_summary
    from ..report.index import render_index

    check_demo_out(out, full=full)
    if not full:
        def after(step, path):
            if not quiet:
                print_summary(path)

        runs = run_tour(out, model=model, geometry=geometry, train=train, curvature=curvature, attribution=attribution,
                        importance=importance, privacy=privacy,
                        n_problems=n_problems if _given(ctx, "n_problems") else TOUR_PROBLEMS,
                        geometry_problems=geometry_problems if _given(ctx, "geometry_problems")
                        else TOUR_GEOMETRY_PROBLEMS, curvature_problems=curvature_problems,
                        curvature_examples=None if _given(ctx, "curvature_problems") else TOUR_CURVATURE_EXAMPLES,
                        progress=not quiet, after=after)
        index = runs.pop("index")
        for p in runs.values():
            typer.echo(f"report: {p / 'report.html'}")
        typer.echo(f"index: {index}")
        return

    result = run_demo(out, n_problems=n_problems, model=model, progress=not quiet)
    if not quiet:
        print_summary(result.path)
    paths = [result.path / "report.html"]
    if geometry:
        geo = run_geometry_demo(out / "geometry", n_problems=geometry_problems, model=model, progress=not quiet)
        if not quiet:
            print_summary(geo.path)
        paths.append(geo.path / "report.html")
    if curvature:
        runs = run_curvature_demo(out / "curvature", lm_problems=curvature_problems, model=model,
                                  progress=not quiet)
        for p in runs.values():
            if not quiet:
                print_summary(p)
            paths.append(p / "report.html")
    for p in paths:
        typer.echo(f"report: {p}")
    typer.echo(f"index: {render_index(out, title='gradsight demo (full)')}")
