"""Built-in grade-school arithmetic word problems, each answered three ways: fast, slow, and slow-but-wrong.

Design. Li, Li and Zhou ("What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking: A Gradient
Perspective", ACL 2025) compare the layer-wise gradients a model receives when it is trained on *fast
thinking* (the answer alone, no chain of thought) versus *slow thinking* (a detailed step-by-step solution),
and on correct versus wrong responses. They report that fast thinking produces larger gradients and larger
differences across layers, while slow thinking gives smaller, more stable gradients, and that with slow
thinking the gradient patterns separate correct from wrong reasoning paths.

This module builds a small, deterministic data set for that comparison with no download. Every problem
appears in three records that share the same prompt (the question only), so any difference between groups
comes from the response:

* ``fast``: the direct answer, ``"The answer is 42."``
* ``slow``: 2-4 short steps, each writing out its arithmetic as ``a op b = c``, then ``"The answer is 42."``
* ``wrong``: the same steps with one plausible slip (off by one or two, a carry error of ten, one group too
  many or too few) in a middle step, carried correctly through the later steps to a wrong final answer.

Numbers come from ``random.Random(seed)`` and are chosen so that every intermediate value is a positive
integer. The problems cycle through the templates, so ``demo_records(n)`` is a prefix of
``demo_records(m)`` for n < m with the same seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GROUPS", "demo_records", "geometry_records", "write_demo_jsonl"]

GROUPS = ("fast", "slow", "wrong")


@dataclass(frozen=True)
class Ref:
    """The result of an earlier step (0-based)."""

    step: int


@dataclass(frozen=True)
class Step:
    """One solution step: ``text`` contains ``{expr}``, rendered as ``"a op b = c"``."""

    text: str
    a: int | Ref
    op: str  # one of + - * /
    b: int | Ref


def _apply(op: str, a: int, b: int) -> int | None:
    """a op b, or None when the result is not a non-negative integer."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            return None
        c = a // b
    else:
        raise ValueError(f"unknown op {op!r}")
    return c if c >= 0 else None


def _run(steps: list[Step], slip: tuple[int, int] | None = None) -> list[tuple[int, int, int]] | None:
    """(a, b, c) per step, with ``slip = (step, delta)`` added to that step's result; None if invalid."""
    out: list[tuple[int, int, int]] = []
    for k, s in enumerate(steps):
        a = out[s.a.step][2] if isinstance(s.a, Ref) else s.a
        b = out[s.b.step][2] if isinstance(s.b, Ref) else s.b
        c = _apply(s.op, a, b)
        if c is None:
            return None
        if slip is not None and slip[0] == k:
            c += slip[1]
            if c <= 0:
                return None
        out.append((a, b, c))
    return out


def _render(steps: list[Step], values: list[tuple[int, int, int]]) -> str:
    lines = [s.text.format(expr=f"{a} {s.op} {b} = {c}") for s, (a, b, c) in zip(steps, values)]
    lines.append(f"The answer is {values[-1][2]}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Templates: each takes an rng and returns (question, steps). Numbers are drawn so every step is exact.

NAMES = ("Maya", "Leo", "Ana", "Sam", "Priya", "Omar", "Lena", "Tom", "Zoe", "Ravi", "Nina", "Ben", "Aisha", "Jon")


def _shopping(rng: random.Random):
    name, n, price = rng.choice(NAMES), rng.randint(2, 9), rng.randint(2, 12)
    item = rng.choice(("notebooks", "pens", "sandwiches", "comic books", "mugs", "toy cars"))
    bill = next(b for b in (20, 50, 100, 200) if b > n * price)
    q = (f"{name} buys {n} {item} that cost ${price} each and pays with a ${bill} bill. "
         f"How many dollars of change does {name} get?")
    return q, [
        Step(f"The {item} cost {{expr}} dollars.", n, "*", price),
        Step("The change is {expr} dollars.", bill, "-", Ref(0)),
    ]


def _sharing(rng: random.Random):
    name, bags, per_bag = rng.choice(NAMES), rng.randint(2, 6), rng.randint(4, 12)
    total = bags * per_bag
    friends = rng.choice([k for k in range(2, 10) if total % k == 0 and k != bags] or [2])
    thing = rng.choice(("marbles", "stickers", "candies", "cookies", "cards"))
    q = (f"{name} has {bags} bags with {per_bag} {thing} in each bag and shares all of them equally among "
         f"{friends} friends. How many {thing} does each friend get?")
    return q, [
        Step(f"There are {{expr}} {thing} in total.", bags, "*", per_bag),
        Step("Each friend gets {expr}.", Ref(0), "/", friends),
    ]


def _ages(rng: random.Random):
    name, age, diff, times, years = (rng.choice(NAMES), rng.randint(6, 14), rng.randint(2, 6),
                                     rng.randint(2, 3), rng.randint(2, 9))
    q = (f"{name} is {age} years old. {name}'s sister is {diff} years older. Their aunt is {times} times as old "
         f"as the sister. How old will the aunt be in {years} years?")
    return q, [
        Step("The sister is {expr} years old.", age, "+", diff),
        Step("The aunt is {expr} years old now.", Ref(0), "*", times),
        Step(f"In {years} years the aunt will be {{expr}}.", Ref(1), "+", years),
    ]


def _distance(rng: random.Random):
    speed, hours, extra = rng.randrange(40, 95, 5), rng.randint(2, 5), rng.randrange(10, 65, 5)
    vehicle = rng.choice(("train", "bus", "car", "truck"))
    q = (f"A {vehicle} travels at {speed} km per hour for {hours} hours, then goes {extra} km more. "
         f"How many km does it travel in total?")
    return q, [
        Step(f"In {hours} hours it goes {{expr}} km.", speed, "*", hours),
        Step("In total it travels {expr} km.", Ref(0), "+", extra),
    ]


def _travel_time(rng: random.Random):
    name, speed, hours, stop = rng.choice(NAMES), rng.randrange(40, 95, 10), rng.randint(2, 6), rng.randint(1, 3)
    dist = speed * hours
    q = (f"{name} drives {dist} km at {speed} km per hour and also takes breaks that add up to {stop} "
         f"hour{'s' if stop > 1 else ''}. "
         f"How many hours does the whole trip take?")
    return q, [
        Step("Driving takes {expr} hours.", dist, "/", speed),
        Step("With the breaks the trip takes {expr} hours.", Ref(0), "+", stop),
    ]


def _carpet(rng: random.Random):
    length, width, cost = rng.randint(4, 15), rng.randint(3, 12), rng.randint(2, 9)
    q = (f"A rectangular room is {length} meters long and {width} meters wide. Carpet costs ${cost} per square "
         f"meter. How many dollars does it cost to carpet the whole floor?")
    return q, [
        Step("The area is {expr} square meters.", length, "*", width),
        Step("The carpet costs {expr} dollars.", Ref(0), "*", cost),
    ]


def _fence(rng: random.Random):
    length, width, cost = rng.randint(5, 30), rng.randint(3, 20), rng.randint(2, 8)
    q = (f"A rectangular garden is {length} meters long and {width} meters wide. Fencing costs ${cost} per "
         f"meter. How many dollars does it cost to fence all the way around the garden?")
    return q, [
        Step("Half the perimeter is {expr} meters.", length, "+", width),
        Step("The perimeter is {expr} meters.", Ref(0), "*", 2),
        Step("The fence costs {expr} dollars.", Ref(1), "*", cost),
    ]


def _discount(rng: random.Random):
    name, price, pct = rng.choice(NAMES), rng.randrange(40, 220, 20), rng.choice((10, 20, 25, 30, 40, 50))
    item = rng.choice(("jacket", "bicycle", "lamp", "backpack", "pair of boots"))
    q = (f"A {item} costs ${price}. {name} gets a {pct}% discount. How many dollars does {name} pay?")
    return q, [
        Step("The price times the percentage is {expr}.", price, "*", pct),
        Step("Dividing by 100, the discount is {expr} dollars.", Ref(0), "/", 100),
        Step(f"{name} pays {{expr}} dollars.", price, "-", Ref(1)),
    ]


def _muffins(rng: random.Random):
    trays, per_tray = rng.randint(3, 9), rng.choice((6, 8, 10, 12, 15))
    sold = rng.randint(per_tray, trays * per_tray - 1)
    food = rng.choice(("muffins", "bread rolls", "cupcakes", "cookies"))
    q = (f"A baker makes {trays} trays of {food} with {per_tray} on each tray and sells {sold} of them. "
         f"How many {food} are left?")
    return q, [
        Step(f"The baker makes {{expr}} {food}.", trays, "*", per_tray),
        Step("The number left is {expr}.", Ref(0), "-", sold),
    ]


def _packs(rng: random.Random):
    packs, per_pack, students = rng.randint(3, 9), rng.choice((6, 8, 10, 12, 20)), rng.randint(5, 30)
    each = max(1, min(5, packs * per_pack // students))
    if students * each >= packs * per_pack:
        students = (packs * per_pack - 1) // each
    q = (f"A teacher buys {packs} packs of {per_pack} pencils and gives {each} pencils to each of {students} "
         f"students. How many pencils are left over?")
    return q, [
        Step("The teacher buys {expr} pencils.", packs, "*", per_pack),
        Step("The students get {expr} pencils.", students, "*", each),
        Step("The pencils left over are {expr}.", Ref(0), "-", Ref(1)),
    ]


def _savings(rng: random.Random):
    name, per_week, weeks = rng.choice(NAMES), rng.randint(4, 25), rng.randint(3, 12)
    price = rng.randint(per_week, per_week * weeks - 1)
    q = (f"{name} saves ${per_week} every week for {weeks} weeks and then buys a game for ${price}. "
         f"How many dollars does {name} have left?")
    return q, [
        Step(f"{name} saves {{expr}} dollars.", per_week, "*", weeks),
        Step("After the game, {expr} dollars are left.", Ref(0), "-", price),
    ]


def _reading(rng: random.Random):
    name, per_day, days = rng.choice(NAMES), rng.randint(8, 30), rng.randint(3, 9)
    pages = per_day * days + rng.randint(10, 150)
    q = (f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. How many pages are "
         f"still left to read?")
    return q, [
        Step(f"{name} reads {{expr}} pages.", per_day, "*", days),
        Step("The pages left are {expr}.", pages, "-", Ref(0)),
    ]


def _legs(rng: random.Random):
    chickens, cows = rng.randint(3, 25), rng.randint(2, 15)
    q = (f"A farm has {chickens} chickens and {cows} cows. How many legs do the animals have altogether?")
    return q, [
        Step("The chickens have {expr} legs.", chickens, "*", 2),
        Step("The cows have {expr} legs.", cows, "*", 4),
        Step("Altogether there are {expr} legs.", Ref(0), "+", Ref(1)),
    ]


def _wages(rng: random.Random):
    name, sat_rate, sat_h, sun_rate, sun_h = (rng.choice(NAMES), rng.randint(8, 15), rng.randint(2, 6),
                                              rng.randint(8, 15), rng.randint(2, 6))
    spent = rng.randint(5, 40)
    q = (f"{name} earns ${sat_rate} an hour for {sat_h} hours on Saturday and ${sun_rate} an hour for {sun_h} "
         f"hours on Sunday, then spends ${spent} on lunch. How many dollars does {name} have left?")
    return q, [
        Step("On Saturday {expr} dollars are earned.", sat_rate, "*", sat_h),
        Step("On Sunday {expr} dollars are earned.", sun_rate, "*", sun_h),
        Step("Together that is {expr} dollars.", Ref(0), "+", Ref(1)),
        Step("After lunch, {expr} dollars are left.", Ref(2), "-", spent),
    ]


def _buses(rng: random.Random):
    seats, buses, teachers = rng.choice((20, 25, 30, 40, 45, 50)), rng.randint(2, 7), rng.randint(2, 8)
    students = rng.randint(seats * (buses - 1), seats * buses - teachers - 1)
    q = (f"{students} students and {teachers} teachers go on a trip in {buses} buses with {seats} seats each. "
         f"How many seats are empty?")
    return q, [
        Step("The buses have {expr} seats.", buses, "*", seats),
        Step("There are {expr} people.", students, "+", teachers),
        Step("The empty seats are {expr}.", Ref(0), "-", Ref(1)),
    ]


def _apples(rng: random.Random):
    baskets, per_basket, per_bag = rng.randint(3, 8), rng.randint(10, 30), rng.choice((4, 5, 6, 8))
    total = baskets * per_basket
    bad = rng.choice([x for x in range(1, 20) if (total - x) % per_bag == 0])
    q = (f"There are {baskets} baskets with {per_basket} apples each. {bad} apples are bruised and thrown away, "
         f"and the rest are packed into bags of {per_bag}. How many bags are filled?")
    return q, [
        Step("There are {expr} apples.", baskets, "*", per_basket),
        Step("After throwing some away, {expr} apples remain.", Ref(0), "-", bad),
        Step("They fill {expr} bags.", Ref(1), "/", per_bag),
    ]


TEMPLATES: tuple[Callable[[random.Random], tuple[str, list[Step]]], ...] = (
    _shopping, _sharing, _ages, _distance, _carpet, _discount, _muffins, _legs,
    _travel_time, _fence, _packs, _savings, _reading, _wages, _buses, _apples,
)


# ----------------------------------------------------------------------------------------------------------


def _slip(steps: list[Step], values: list[tuple[int, int, int]], rng: random.Random):
    """A plausible wrong result in a middle step: (step, delta, wrong values)."""
    n = len(steps)
    middle = {2: [0], 3: [1], 4: [1, 2]}[n]
    for k in rng.sample(middle, len(middle)) + [j for j in range(n - 1) if j not in middle]:
        a, b, c = values[k]
        deltas = rng.sample((1, -1, 2, -2, 10, -10), 6)
        if steps[k].op == "*":  # one group too many or too few
            deltas += [d for d in (a, -a, b, -b) if d not in deltas]
        deltas += [d * s for d in range(3, 101) for s in (1, -1)]  # fallback: keep later divisions exact
        for d in deltas:
            wrong = _run(steps, (k, d))
            if wrong is not None and wrong[-1][2] != values[-1][2]:
                return k, d, wrong
    raise AssertionError("no valid slip")  # unreachable with the templates above


def demo_records(n_problems: int = 72, seed: int = 0) -> list[dict]:
    """The demo data set: ``3 * n_problems`` records (fast, slow, wrong per problem), deterministic in seed.

    Each record: ``{"id": "p017-fast", "group", "prompt", "response", "problem": 17, "answer"}`` where
    ``answer`` is the correct answer of the problem (also for the "wrong" record).
    """
    if n_problems < 1:
        raise ValueError(f"n_problems must be >= 1, got {n_problems}")
    rng = random.Random(seed)
    records: list[dict] = []
    seen: set[str] = set()
    for p in range(n_problems):
        template = TEMPLATES[p % len(TEMPLATES)]
        for _ in range(1000):
            question, steps = template(rng)
            if question not in seen:
                break
        seen.add(question)
        values = _run(steps)
        assert values is not None, question
        answer = values[-1][2]
        _, _, wrong = _slip(steps, values, rng)
        responses = {"fast": f"The answer is {answer}.", "slow": _render(steps, values), "wrong": _render(steps, wrong)}
        for group in GROUPS:
            records.append({
                "id": f"p{p:03d}-{group}", "group": group, "prompt": question,
                "response": responses[group], "problem": p, "answer": answer,
            })
    return records


def geometry_records(n_problems: int = 30, seed: int = 0) -> list[dict]:
    """The geometry demo: per problem, the three plain answers (groups fast / slow / wrong), a preference pair
    (group "pairs": chosen = the correct step-by-step answer, rejected = the wrong step-by-step answer) and
    two rewarded rollouts in GSM8K's final-answer format (group "rollouts": "#### <answer>" with reward 1 and
    "#### <the wrong result>" with reward 0; a format no other unit uses, so no rollout repeats another
    unit's sequence).

    ``7 * n_problems`` loss terms from ``5 * n_problems`` records; deterministic in seed.
    """
    recs = demo_records(n_problems, seed)
    by: dict[int, dict] = {}
    for r in recs:
        by.setdefault(r["problem"], {})[r["group"]] = r
    out = [{k: r[k] for k in ("id", "group", "prompt", "response")} for r in recs]
    for p, d in by.items():
        q = d["slow"]["prompt"]
        out.append({"id": f"p{p:03d}-pair", "group": "pairs", "prompt": q, "chosen": d["slow"]["response"],
                    "rejected": d["wrong"]["response"]})
        wrong_result = d["wrong"]["response"].splitlines()[-1].removeprefix("The answer is ").rstrip(".")
        for name, resp, reward in (("correct", f"#### {d['slow']['answer']}", 1), ("wrong", f"#### {wrong_result}", 0)):
            out.append({"id": f"p{p:03d}-rollout-{name}", "group": "rollouts", "prompt": q, "response": resp,
                        "reward": reward})
    return out


def write_demo_jsonl(path: str | Path, n_problems: int = 72, seed: int = 0) -> Path:
    """Write ``demo_records(n_problems, seed)`` as JSON Lines to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_records(n_problems, seed))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
