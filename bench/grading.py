"""Grading throughput: the sandboxed MathGrader pool vs math-verify called in-process.

Both sides grade the same realistic completion/gold pairs built from the GSM8K and MATH test
fixtures (right answers in several formats, wrong answers, and a few answer-less completions).
The in-process side is the usual unprotected call, ``verify(parse(gold), parse(completion))``
with math-verify's own timeouts off, which is fast but can hang forever on a hostile answer.

    uv run python bench/grading.py [--workers 2] [--batch 256] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from math_grader import MathGrader, gold_from_solution  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _wrong_number(gold: str) -> str:
    try:
        return str(int(gold) + 1)
    except ValueError:
        return gold + "1"


def build_pairs(seed: int = 0) -> list[tuple[str, str, str]]:
    """``(dataset, completion, gold)`` triples, a mix of right/wrong answers and formats."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str, str]] = []
    for row in _read_jsonl(FIXTURES / "gsm8k" / "test.jsonl"):
        gold = gold_from_solution(row["answer"], "gsm8k")
        # The reference reasoning without calculator annotations reads like a model completion.
        body = re.sub(r"<<[^>]*>>", "", row["answer"].rsplit("####", 1)[0]).strip()
        n = int(gold) if re.fullmatch(r"-?\d+", gold) else None
        right = [f"\\boxed{{{gold}}}", f"\\boxed{{{gold}.00}}", f"\\boxed{{\\${gold}}}"]
        if n is not None and abs(n) >= 1000:
            right.append(f"\\boxed{{{n:,}}}")
        pairs.append(("gsm8k", f"{body}\nThe final answer is {rng.choice(right)}.", gold))
        pairs.append(("gsm8k", f"{body}\n#### {gold}", gold))
        pairs.append(("gsm8k", f"{body}\nThe answer is \\boxed{{{_wrong_number(gold)}}}.", gold))
        pairs.append(("gsm8k", f"{body}\nSo the answer is {gold} dollars.", gold))
    math_rows = _read_jsonl(FIXTURES / "math" / "test.jsonl")
    golds = [gold_from_solution(r["solution"], "math") for r in math_rows]
    for row, gold in zip(math_rows, golds, strict=True):
        sol = row["solution"]
        pairs.append(("math", sol, gold))
        other = rng.choice(golds)
        # Wrong answer: the same reasoning ending in another problem's answer.
        idx = sol.rfind("\\boxed")
        pairs.append(("math", f"{sol[:idx]}\\boxed{{{other}}}.", gold))
        pairs.append(
            ("math", f"{sol}\n\nTherefore, the final answer is $\\boxed{{{gold}}}$.", gold)
        )
    pairs.append(("math", "I am not sure how to solve this.", "5"))
    rng.shuffle(pairs)
    return pairs


def bench_in_process(pairs: list[tuple[str, str, str]]) -> tuple[float, int]:
    from math_verify import parse, verify

    correct = 0
    t0 = time.perf_counter()
    for _, completion, gold in pairs:
        g = parse(f"${gold}$", parsing_timeout=None)
        p = parse(completion, parsing_timeout=None)
        correct += bool(verify(g, p, timeout_seconds=None))
    return time.perf_counter() - t0, correct


def bench_pool(
    pairs: list[tuple[str, str, str]], workers: int, batch: int
) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    with MathGrader(workers=workers, timeout=2.0) as grader:
        grader.grade(["\\boxed{1}"] * workers, ["1"] * workers, "math")  # wait for workers
        startup = time.perf_counter() - t0
        correct = 0
        t0 = time.perf_counter()
        # Same-dataset batches, as the trainer sends them.
        for ds in ("gsm8k", "math"):
            sub = [(c, g) for d, c, g in pairs if d == ds]
            for i in range(0, len(sub), batch):
                chunk = sub[i : i + batch]
                grades = grader.grade([c for c, _ in chunk], [g for _, g in chunk], ds)
                correct += sum(gr.correct for gr in grades)
        return time.perf_counter() - t0, correct, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off

    pairs = build_pairs()
    if args.limit:
        pairs = pairs[: args.limit]
    n = len(pairs)
    print(f"{n} completion/gold pairs, {os.cpu_count()} CPUs, {args.workers} workers")

    pool_s, pool_ok, startup = bench_pool(pairs, args.workers, args.batch)
    print(f"pool startup (spawn + import + warm-up): {startup:.2f}s")
    print(f"pool:       {n / pool_s:8.1f} verifications/s  ({pool_ok} correct)")
    inproc_s, inproc_ok = bench_in_process(pairs)
    print(f"in-process: {n / inproc_s:8.1f} verifications/s  ({inproc_ok} correct)")
    print(f"ratio pool/in-process: {inproc_s / pool_s:.2f}x")


if __name__ == "__main__":
    main()
