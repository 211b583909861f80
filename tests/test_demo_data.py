"""gradsight.demo.problems: the built-in fast / slow / wrong arithmetic word problems."""

from __future__ import annotations

import os
import re
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from helpers import tiny_tokenizer

from gradsight.inputs.data import EncodeOptions, encode, load_records
from gradsight.demo.problems import GROUPS, demo_records, write_demo_jsonl

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
FINAL = re.compile(r"The answer is (\d+)\.$")


def evaluate(a: int, op: str, b: int) -> float:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def steps_of(response: str) -> list[tuple[int, str, int, int]]:
    lines = response.split("\n")
    out = []
    for line in lines[:-1]:
        found = STEP.findall(line)
        assert len(found) == 1, line  # one "a op b = c" per step line
        a, op, b, c = found[0]
        out.append((int(a), op, int(b), int(c)))
    return out


def final_answer(response: str) -> int:
    m = FINAL.search(response.split("\n")[-1])
    assert m, response
    return int(m.group(1))


@pytest.fixture(scope="module")
def records():
    return demo_records()


@pytest.fixture(scope="module")
def problems(records):
    by = defaultdict(dict)
    for r in records:
        by[r["problem"]][r["group"]] = r
    return by


def test_size_groups_and_fields(records, problems):
    assert len(problems) >= 60 and len(problems) == 72
    assert len(records) == 3 * len(problems)
    for p, groups in problems.items():
        assert set(groups) == set(GROUPS)
        assert len({g["prompt"] for g in groups.values()}) == 1  # same prompt for all three
        assert len({g["answer"] for g in groups.values()}) == 1
        for g, r in groups.items():
            assert set(r) == {"id", "group", "prompt", "response", "problem", "answer"}
            assert r["id"] == f"p{p:03d}-{g}"
            assert isinstance(r["answer"], int) and r["answer"] >= 0
            assert r["prompt"].endswith("?") and "answer" not in r["prompt"].lower()


def test_ids_and_questions_unique(records, problems):
    assert len({r["id"] for r in records}) == len(records)
    assert len({g["fast"]["prompt"] for g in problems.values()}) == len(problems)


def test_deterministic_and_seeded():
    assert demo_records() == demo_records()
    assert demo_records(60) == demo_records()[: 3 * 60]  # a prefix
    assert demo_records(seed=1) != demo_records(seed=0)


def test_variety_of_templates(problems):
    words = ("change", "equally", "old", "km", "square meter", "%", "left", "legs", "hours", "fence", "buses")
    prompts = [g["fast"]["prompt"] for g in problems.values()]
    for w in words:
        assert any(w in p for p in prompts), w


def test_fast_is_the_answer_only(problems):
    for g in problems.values():
        assert g["fast"]["response"] == f"The answer is {g['fast']['answer']}."


def test_slow_steps_are_correct(problems):
    for g in problems.values():
        slow = g["slow"]["response"]
        steps = steps_of(slow)
        assert 2 <= len(steps) <= 4, slow
        for a, op, b, c in steps:
            assert evaluate(a, op, b) == c, slow
        assert final_answer(slow) == steps[-1][3] == g["slow"]["answer"]


def test_wrong_has_one_middle_slip_carried_through(problems):
    for g in problems.values():
        slow, wrong = steps_of(g["slow"]["response"]), steps_of(g["wrong"]["response"])
        assert len(wrong) == len(slow)
        bad = [k for k, (a, op, b, c) in enumerate(wrong) if evaluate(a, op, b) != c]
        assert len(bad) == 1 and bad[0] < len(wrong) - 1, g["wrong"]["response"]  # not the final step
        a, op, b, c = wrong[bad[0]]
        assert abs(c - evaluate(a, op, b)) <= max(100, 0.5 * evaluate(a, op, b))  # a plausible slip
        assert wrong[:bad[0]] == slow[:bad[0]]
        stated = final_answer(g["wrong"]["response"])
        assert stated == wrong[-1][3] != g["wrong"]["answer"]


def test_write_and_load_and_encode(tmp_path):
    path = write_demo_jsonl(tmp_path / "sub" / "demo.jsonl")
    assert path.exists()
    records, skipped = load_records(path)
    assert not skipped and len(records) == 3 * 72
    assert {r.group for r in records} == set(GROUPS)
    assert records[0].id == "p000-fast" and records[0].source == f"{path}:1"
    tok = tiny_tokenizer()
    enc = [encode(r, tok, EncodeOptions()) for r in records]
    assert all(e.status == "ok" for e in enc)
    n = defaultdict(list)
    for r, e in zip(records, enc):
        n[r.group].append(e.n_target)
    assert max(n["fast"]) < min(n["slow"])  # fast responses are shorter than any slow one
