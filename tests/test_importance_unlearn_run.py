"""`gradsight unlearn`: the run directory (tables, report), resuming by seed, refusing another configuration."""

from __future__ import annotations

import pandas as pd
import pytest

from gradsight.cli import main as cli_main
from gradsight.runs.store import RunMismatchError

from helpers import external_refs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unlearn_command_writes_tables_and_report_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "unl"
    with pytest.raises(SystemExit) as e:
        cli_main(["unlearn", "--out", str(out), "--seeds", "0", "--forget", "class:3"])
    assert e.value.code in (0, None)
    table = pd.read_parquet(out / "unlearning.parquet")
    assert list(table["method"]) == ["original", "retrain", "finetune", "random_label", "salun"]
    s = table.set_index("method")
    assert s.loc["retrain", "FA"] == 0.0  # retrained without class 3: it never predicts 3
    assert s.loc["original", "FA"] > 90.0
    assert s.loc["salun", "FA"] < s.loc["original", "FA"]
    assert s.loc["retrain", "gap"] == 0.0
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and not external_refs(page)
    assert "salun" in capsys.readouterr().out
    # a rerun computes nothing (the seed is done)
    import gradsight.importance.unlearn as U

    monkeypatch.setattr(U, "digits_unlearning", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    from gradsight.importance.unlearning_run import run_unlearning

    again = run_unlearning(out, "class:3", (0,), progress=None)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), table)
    with pytest.raises(RunMismatchError, match="forget"):
        run_unlearning(out, "random10", (0,), progress=None)
    with pytest.raises(ValueError, match="fraction"):
        run_unlearning(tmp_path / "other", "random10", (0,), fraction=1.5, progress=None)
