"""A realistic benchmark data set: direct answers, short step-by-step solutions and long chains of thought.

Real post-training data mixes, in one file, direct answers (a few response tokens), human step-by-step
solutions (tens of tokens) and long model chains of thought (several hundred tokens). This module composes
such a set from the problems gradsight ships (`gradsight.demo.problems.demo_records`), deterministically and
with no download. Per problem, four records share the same prompt (the question):

* ``direct``: the demo's ``fast`` answer, ``"The answer is 36."``
* ``step``: a short human-style solution: a one-line restatement, the demo's ``slow`` steps numbered, and
  the answer.
* ``cot``: a long chain of thought composed from the same steps: restate the problem and its numbers, plan,
  work every step with an explanation and the arithmetic written out (partial products, column addition with
  carries, subtraction with borrows, division by repeated multiples), check every step with the inverse
  operation and a sanity check, conclude. How much of the optional material (listing multiples, a second
  method, re-reading the question) a problem gets is drawn from ``random.Random(seed)``, so the lengths
  spread over a few hundred tokens.
* ``wrong_cot``: the same kind of chain of thought built on the demo's ``wrong`` response (one plausible
  slip in a middle step, carried through), with the plan and the checks in a shuffled order and a check that
  confirms the slip instead of catching it.

The steps are read back from the demo's public ``slow`` / ``wrong`` responses (each step line writes its
arithmetic as ``a op b = c``), so nothing here depends on the generator's internals.

    from benchmarks.realistic import realistic_records, length_summary
    recs = realistic_records()            # 40 records: 10 problems x (direct, step, cot, wrong_cot)
    recs = realistic_records(n_problems=25, seed=0)

``length_summary(lengths)`` gives min / quartiles / median / max and a histogram of encoded lengths
(``benchmarks/run.py --only realistic`` reports it for SmolLM2 with its chat template).
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass

__all__ = ["GROUPS", "realistic_records", "length_summary", "parse_steps", "ParsedStep"]

GROUPS = ("direct", "step", "cot", "wrong_cot")

_EXPR = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


@dataclass(frozen=True)
class ParsedStep:
    """One step of a demo solution: its sentence (``text`` with ``{expr}`` where ``a op b = c`` stood)."""

    text: str
    a: int
    op: str
    b: int
    c: int

    @property
    def line(self) -> str:
        return self.text.format(expr=f"{self.a} {self.op} {self.b} = {self.c}")

    @property
    def question(self) -> str:
        """The step as a question: its sentence with "how many" where the arithmetic stood."""
        q = self.text.format(expr="how many").strip().rstrip(".")
        return q[0].lower() + q[1:] + "?"


def parse_steps(response: str) -> list[ParsedStep]:
    """The steps of a demo ``slow`` / ``wrong`` response (its last line, "The answer is N.", is not a step)."""
    steps = []
    for line in response.splitlines():
        m = _EXPR.search(line)
        if m is None:
            continue
        text = line[: m.start()].replace("{", "{{").replace("}", "}}") + "{expr}" + \
            line[m.end():].replace("{", "{{").replace("}", "}}")
        steps.append(ParsedStep(text, int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    if not steps:
        raise ValueError(f"no 'a op b = c' step in {response!r}")
    return steps


# ----------------------------------------------------------------------------------------------------------
# arithmetic written out


def _digits(n: int) -> list[int]:
    return [int(d) for d in str(n)][::-1]  # ones first


_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")


def _column_add(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    parts, carry = [], 0
    for k in range(max(len(da), len(db))):
        x, y = (da[k] if k < len(da) else 0), (db[k] if k < len(db) else 0)
        s = x + y + carry
        extra = f" plus the carried {carry}" if carry else ""
        parts.append(f"in the {_PLACES[k]} place, {x} + {y}{extra} makes {s}, so I write {s % 10}"
                     + (" and carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        parts.append("and the last carry gives a new leading 1")
    return "Adding column by column: " + "; ".join(parts) + f". That gives {a + b}."


def _column_sub(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    parts, borrow = [], 0
    for k in range(len(da)):
        y = db[k] if k < len(db) else 0
        x = da[k] - borrow
        lent = " minus the 1 it lent" if borrow else ""
        if k >= len(db) and x >= 0:
            parts.append(f"in the {_PLACES[k]} place {da[k]}{lent} leaves {x}")
            borrow = 0
        elif x < y:
            parts.append(f"in the {_PLACES[k]} place {da[k]}{lent} is less than {y}, so I borrow ten: "
                         f"{x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            parts.append(f"in the {_PLACES[k]} place {da[k]}{lent} - {y} = {x - y}")
            borrow = 0
    return "Subtracting column by column: " + "; ".join(parts) + f". So the difference is {a - b}."


def _multiply(a: int, b: int, shown: int, rng: random.Random, verbose: bool) -> str:
    big, small = (a, b) if a >= b else (b, a)
    out = []
    if big >= 10:
        tens, ones = big - big % 10, big % 10
        if ones:
            out.append(f"I can split {big} into {tens} + {ones}. Then {small} * {tens} = {small * tens} and "
                       f"{small} * {ones} = {small * ones}, and adding the two parts, {small * tens} + "
                       f"{small * ones} = {shown}.")
        else:
            out.append(f"Since {big} is {big // 10} tens, {small} * {big} is {small} * {big // 10} = "
                       f"{small * (big // 10)} tens, which is {shown}.")
    else:
        out.append(f"{small} * {big} is a times-table fact: {small} * {big} = {shown}.")
    if verbose and small <= 12:
        multiples = ", ".join(str(big * k) for k in range(1, small + 1))
        out.append(f"To be safe I can also count up in steps of {big}: {multiples}. "
                   f"That is {small} steps, ending at {big * small}.")
    if verbose and rng.random() < 0.5:
        out.append(f"Another way to see it: {small} * {big} is the same as {big} * {small}, "
                   f"and {big} added {small} times is {big * small}.")
    return " ".join(out)


def _divide(a: int, b: int, shown: int, verbose: bool) -> str:
    out = [f"I need to know how many groups of {b} fit into {a}."]
    if verbose and a // b <= 15:
        multiples = ", ".join(f"{b} * {k} = {b * k}" for k in range(1, a // b + 1))
        out.append(f"Going through the multiples of {b}: {multiples}.")
    out.append(f"Since {b} * {a // b} = {a}, the result is {shown}, with nothing left over.")
    return " ".join(out)


def _work(step: ParsedStep, rng: random.Random, verbose: bool, slipped: bool) -> str:
    a, b, c = step.a, step.b, step.c
    if step.op == "*":
        return _multiply(a, b, c, rng, verbose and not slipped)
    if step.op == "/":
        if slipped:
            return f"Dividing {a} by {b} gives {c}."
        return _divide(a, b, c, verbose)
    if slipped:  # a slip: the quick mental version, no columns (the columns would show the mistake)
        return f"Doing this in my head, {a} {step.op} {b} comes to {c}."
    return _column_add(a, b) if step.op == "+" else _column_sub(a, b)


def _check(step: ParsedStep, k: int, believe: bool) -> str:
    a, b, c = step.a, step.b, step.c
    inverse = {"+": f"{c} - {b} = {a}", "-": f"{c} + {b} = {a}", "*": f"{c} / {b} = {a}",
               "/": f"{c} * {b} = {a}"}[step.op]
    if believe:  # the wrong chain of thought "confirms" its own slip
        return f"For step {k + 1}, I check it backwards: {inverse}, which matches, so {c} is right."
    return f"For step {k + 1}, I check it backwards: {inverse}. That matches what I started with, so {c} is right."


# ----------------------------------------------------------------------------------------------------------
# the four responses


def _numbers(question: str) -> list[str]:
    return re.findall(r"\$?\d+%?", question)


def _step_solution(question: str, steps: list[ParsedStep], answer: int) -> str:
    ask = question.rstrip("?").split(". ")[-1]
    lines = [f"We need to find this: {ask[0].lower() + ask[1:]}."]
    lines += [f"Step {k + 1}: {s.line}" for k, s in enumerate(steps)]
    lines.append(f"So the answer is {answer}.")
    return "\n".join(lines)


def _long_cot(question: str, steps: list[ParsedStep], answer: int, rng: random.Random, level: int, wrong: bool,
              slip: int | None) -> str:
    """A chain of thought; `level` 0 (terse), 1 (arithmetic written out) or 2 (plus multiples, a second
    method, re-reading the question and a sanity check)."""
    ask = question.rstrip("?").split(". ")[-1]
    ask = ask[0].lower() + ask[1:] + "?"
    paras = ["Okay, let me read the problem carefully before I start.", f"The problem says: {question}",
             f"So what I am asked is: {ask}"]
    if level >= 1:
        paras.append("The numbers given in the problem are " + ", ".join(_numbers(question)) + ". I should use "
                     "each of them exactly where it belongs and not mix up which quantity is which.")
    plan = [f"first, {s.question}" if k == 0 else f"then, {s.question}" for k, s in enumerate(steps)]
    if wrong and len(plan) > 2:
        rng.shuffle(plan)
    paras.append(f"My plan has {len(steps)} parts: " + " ".join(plan) + " Let me go through them one at a time.")
    for k, s in enumerate(steps):
        head = f"Step {k + 1}: {s.question} That means {s.a} {_OPS[s.op]} {s.b}."
        if level == 0:
            work = f"{s.a} {s.op} {s.b} = {s.c}."
        else:
            work = _work(s, rng, verbose=level >= 2 and len(steps) < 4, slipped=(k == slip))
        paras.append(f"{head} {work} So: {s.line}")
        if k < len(steps) - 1 and level >= 1:
            paras.append(f"Good, I have {s.c}. I will carry this number into the next step.")
    if level >= 2:
        paras.append("Wait, let me re-read the question to make sure I answered what was asked and not "
                     f"something else. It asks: {ask} Yes, the last step gives exactly that quantity.")
    if level == 0:
        paras.append("Quick check: " + " ".join(f"{s.a} {s.op} {s.b} is {s.c}." for s in steps) + " Fine.")
    else:
        checks = [_check(s, k, believe=wrong) for k, s in enumerate(steps)]
        if wrong:
            rng.shuffle(checks)
        paras.append("Let me double-check every step. " + " ".join(checks))
    if level >= 2:
        paras.append(f"Does {answer} make sense? It is a whole number, as it must be for this kind of quantity, "
                     "and its size fits the numbers in the problem.")
    paras.append(f"So the final answer is {answer}.\nThe answer is {answer}.")
    return "\n\n".join(paras)


def realistic_records(n_problems: int = 10, seed: int = 0) -> list[dict]:
    """``4 * n_problems`` records, groups direct / step / cot / wrong_cot per problem; deterministic in seed.

    Each record: ``{"id": "r003-cot", "group", "prompt", "response", "problem", "answer"}``; the four records
    of a problem share the prompt (the demo problem's question). ``answer`` is the correct answer (also for
    ``wrong_cot``).
    """
    from gradsight.demo.problems import demo_records

    if n_problems < 1:
        raise ValueError(f"n_problems must be >= 1, got {n_problems}")
    demo: dict[int, dict[str, dict]] = {}
    for r in demo_records(n_problems, seed):
        demo.setdefault(r["problem"], {})[r["group"]] = r
    out = []
    for p in sorted(demo):
        d = demo[p]
        q, answer = d["slow"]["prompt"], d["slow"]["answer"]
        good, bad = parse_steps(d["slow"]["response"]), parse_steps(d["wrong"]["response"])
        wrong_answer = bad[-1].c
        slip = next((k for k, (g, w) in enumerate(zip(good, bad)) if g.c != w.c), None)
        rng = random.Random(f"{seed}-{p}")
        responses = {
            "direct": d["fast"]["response"],
            "step": _step_solution(q, good, answer),
            "cot": _long_cot(q, good, answer, rng, level=(p + seed) % 3, wrong=False, slip=None),
            "wrong_cot": _long_cot(q, bad, wrong_answer, rng, level=(p + seed + 1) % 3, wrong=True, slip=slip),
        }
        for g in GROUPS:
            out.append({"id": f"r{p:03d}-{g}", "group": g, "prompt": q, "response": responses[g], "problem": p,
                        "answer": answer})
    return out


def length_summary(lengths: list[int], bins: tuple[int, ...] = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800,
                                                                900, 1024)) -> dict:
    """min, quartiles, median, max, mean and a histogram {"lo-hi": count} of a list of token counts."""
    xs = sorted(lengths)
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    hist = {}
    for lo, hi in zip(bins[:-1], bins[1:]):
        hist[f"{lo}-{hi}"] = sum(lo <= x < hi for x in xs)
    hist[f">={bins[-1]}"] = sum(x >= bins[-1] for x in xs)
    return {"n": len(xs), "min": xs[0], "q1": q1, "median": q2, "q3": q3, "max": xs[-1],
            "mean": statistics.mean(xs), "total": sum(xs), "histogram": {k: v for k, v in hist.items() if v}}
