"""Registers the training monitor's run directories as the run kind "train" (see runs.registry.RunKind), so
that `gradsight report RUN`, the index page of a run tree and `gradsight.report` show them."""

from __future__ import annotations

from ..runs.registry import ReportSpec, RunKind, lazy, register_kind

KIND = register_kind(RunKind(
    name="train",
    summarize=lazy("gradsight.train.summarize:summarize"),
    report=ReportSpec(render=lazy("gradsight.train.report:render"),
                      summary=lazy("gradsight.train.report:print_summary"),
                      findings=lazy("gradsight.train.report:run_findings")),
))
