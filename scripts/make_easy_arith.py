#!/usr/bin/env python
"""Writes tests/fixtures/gsm8k_easy/: one-step arithmetic word problems in GSM8K's schema.

    uv run python scripts/make_easy_arith.py     # deterministic: the same files every time

Real GSM8K is out of reach for a 135M model (1 right answer in 96): its attempts ramble past the
token budget. These problems take one operation on single digits, which SmolLM2-135M-Instruct
answers in a line and gets right about 1 time in 20; in 12 demo steps its answer format rises,
its arithmetic does not (README, "Does it learn?"). Each row is
{"question", "answer"} like GSM8K's, the answer ending in "#### N". The train and test files
share no question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gsm8k_easy"
NAMES = ["Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Grace", "Leo", "Nina", "Raj", "Eva"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]

# (question, operator, how a and b are drawn): the answer is `a op b`.
TEMPLATES = [
    ("{n} has {a} {i}. {n} buys {b} more {i}. How many {i} does {n} have now?", "+", "add"),
    ("{n} had {a} {i} and gave {b} to a friend. How many {i} does {n} have left?", "-", "sub"),
    ("There are {a} bags with {b} {i} in each bag. How many {i} are there in all?", "*", "mul"),
    ("{n} shares {a} {i} equally among {b} friends. How many {i} does each get?", "/", "div"),
    ("{n} has {a} red {i} and {b} blue {i}. How many {i} does {n} have in total?", "+", "add"),
    ("A box holds {a} {i}. {n} takes out {b} {i}. How many {i} are still in the box?", "-", "sub"),
]  # fmt: skip


def draw(rng: random.Random, kind: str) -> tuple[int, int]:
    """Single digits: beyond them the 135M model is almost never right."""
    if kind == "add":
        return rng.randint(2, 9), rng.randint(2, 9)
    if kind == "sub":
        b = rng.randint(2, 9)
        return b + rng.randint(1, 9), b
    if kind == "mul":
        return rng.randint(2, 5), rng.randint(2, 5)
    b = rng.randint(2, 5)
    return b * rng.randint(2, 5), b


def make_rows(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        text, op, kind = TEMPLATES[len(rows) % len(TEMPLATES)]
        a, b = draw(rng, kind)
        q = text.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b)
        if q in seen:
            continue
        seen.add(q)
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        rows.append({"question": q, "answer": f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}\n#### {c}"})
    return rows


def build() -> dict[str, list[dict]]:
    rng, seen = random.Random(0), set()
    return {split: make_rows(n, rng, seen) for split, n in (("train", 240), ("test", 48))}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in build().items():
        (OUT / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{OUT / split}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
