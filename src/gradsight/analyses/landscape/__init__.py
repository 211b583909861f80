"""`landscape`: the loss on 1-D slices and 2-D grids around the weights, or along a segment to another model.

Directions: filter-normalised random, the top-2 Hessian eigenvectors of a curvature run, the principal
components of a checkpoint trajectory, the gradient; or linear interpolation towards a second model (the
barrier of mode connectivity).

Python:
    run_landscape(cfg, out, model=None, tokenizer=None, records=None)     a causal LM
    landscape_of(model, loss_fn, batches, out, kind="random", ...)          any nn.Module
"""

from __future__ import annotations

from ...runs.registry import Analysis, folder, lazy, register
from .config import LandscapeConfig

__all__ = ["LandscapeConfig", "run_landscape", "landscape_of", "SPEC"]

SPEC = register(Analysis(
    name="landscape",
    Config=LandscapeConfig,
    help="Loss landscape: filter-normalised random directions, top Hessian eigenvectors of a curvature run "
         "(--kind hessian --from-curvature RUN), principal components of a checkpoint trajectory (--kind pca "
         "--trajectory A,B,...), the gradient direction (--kind gradient), or linear interpolation towards "
         "another model (--kind interpolate --to MODEL).",
    **folder(__name__),
    tables=("points",),
    unit_column="point",
    layout={"*": "points/{key}"},
    collective=True,
    noun="chunks",
    meta=lazy("gradsight.analyses.landscape.compute:meta"),
    identity=lazy("gradsight.analyses.landscape.compute:identity"),
    quick={"steps": 3},
))


def run_landscape(cfg: LandscapeConfig, out, *, model=None, tokenizer=None, records=None, progress: bool = True,
                  report: bool = True, log=print):
    """Loss landscape of a causal LM around its weights (or towards `cfg.to`) into `out`.

    Directions act on the weights of the selected layers. kind "random": filter-normalised Gaussian
    directions seeded by (seed, seed + 1); "hessian": the top-2 eigenvectors stored by a curvature run
    (`from_curvature`, same model); "pca", "gradient"; "interpolate": (1 - t) theta + t theta_to for every
    parameter. Returns a LandscapeRunResult (.path, .frame, .meta, .report()).
    """
    from ...runs.api import run_lm

    return run_lm("landscape", cfg, out, model=model, tokenizer=tokenizer, records=records, progress=progress,
                  report=report, log=log)


def landscape_of(model, loss_fn, batches, out, *, kind: str = "random", norm: str | None = "filter",
                 ignore: str | None = "biasbn", from_curvature=None, to=None, trajectory=None,
                 recompute_bn: bool = False, batch_points: int | str = "auto", report: bool = False,
                 name: str | None = None, log=print, **options):
    """Loss landscape of any PyTorch module into the run directory `out` (the table and report of
    `run_landscape`; config-guarded: a finished run with the same identity is returned as it is).

    Args:
        model: the module at theta* (restored bit-exactly afterwards; evaluated in eval mode).
        loss_fn: "cross_entropy", "mse" (the operators' conventions) or `criterion(outputs, targets)`, a mean
            over the batch; batches are combined sample-weighted.
        batches: list of `(inputs, targets)` batches (or a DataLoader, materialised once).
        out: run directory.
        kind: "random" (seeded Gaussian, `norm`-normalised, 1-D tensors zeroed with ignore="biasbn"),
            "hessian" (the top eigenvectors stored by `curvature_of` in `from_curvature`), "interpolate"
            (the segment from this model to `to`, a module or state_dict of the same architecture; t in
            [0, 1] widened by span - 1 on each side when span > 1), "pca" (the top principal components of
            `trajectory` - earlier checkpoints in training order - around this model, the final point;
            the checkpoints' coordinates go to the manifest), or "gradient" (the unit gradient of the loss;
            with dims=2 the second axis is a random direction).
        recompute_bn: recompute BatchNorm running statistics on `batches` at every point (sequential path).
        batch_points: grid points per vectorised (torch.func.vmap) evaluation, 1 = sequential, or "auto" (time
            both on the first points, keep the faster; see `landscape.grid_2d`).
        name: the model's name in the manifest and report (default: its class name).
        **options: LandscapeConfig options: dims, steps, span, seed.
    """
    from torch import nn

    from ... import landscape as ls
    from ...inputs.module import state_fingerprint
    from ...runs.api import run_module

    ls.check_batch_points(batch_points)  # before the run directory is created
    to_state, traj = None, None
    if kind == "interpolate":
        if to is None:
            raise ValueError("kind interpolate needs `to` (a module or state_dict of the same architecture)")
        to_state = to.state_dict() if isinstance(to, nn.Module) else dict(to)
    if kind == "pca":
        if not trajectory:
            raise ValueError("kind pca needs `trajectory` (earlier checkpoints: modules or state_dicts, in "
                             "training order; the model is the final point)")
        traj = [t.state_dict() if isinstance(t, nn.Module) else dict(t) for t in trajectory]
    extras = {"to": to_state, "trajectory": traj, "ignore": ignore, "recompute_bn": bool(recompute_bn),
              "batch_points": batch_points}
    return run_module("landscape", model, loss_fn, batches, out, name_in_report=name, progress=False, report=report,
                      log=log, extras=extras, kind=kind, norm="none" if norm is None else norm,
                      from_curvature=None if from_curvature is None else str(from_curvature),
                      to=None if to_state is None else state_fingerprint([to_state]),
                      trajectory=() if traj is None else (state_fingerprint(traj),), **options)
