"""--score on hostile completions files: a completion that cannot be parsed scores 0, and a line
that is not a completion is named and skipped; neither aborts the scoring of the rest."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))
from conftest import run_script  # noqa: E402

import train_trl_grpo as T  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HUGE = "\\boxed{" + "1" * 1_000_001 + "}"  # Decimal.normalize() raised Overflow on this


def gsm8k_golds(n: int) -> list[str]:
    with (FIXTURES / "gsm8k" / "test.jsonl").open() as fh:
        rows = [json.loads(line) for line, _ in zip(fh, range(n), strict=False)]
    return [T.TASKS["gsm8k"].gold(r) for r in rows]


def score(tmp_path: Path, lines: list[str]):
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    args = ["--dataset", "gsm8k", "--data-dir", str(FIXTURES / "gsm8k"), "--split", "test"]
    proc = run_script([*args, "--score", str(path)], env={**os.environ, **ENV})
    out = Path(str(path) + ".scored.jsonl")
    scored = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return proc, scored


def test_score_survives_a_million_digit_answer(tmp_path: Path) -> None:
    gold = gsm8k_golds(1)[0]
    lines = [
        json.dumps({"row": 0, "completion": f"So \\boxed{{{gold}}}."}),
        json.dumps({"row": 1, "completion": HUGE}),
    ]
    proc, scored = score(tmp_path, lines)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(x["row"], x["correct"]) for x in scored] == [(0, True), (1, False)]


def test_score_skips_and_names_a_bad_line(tmp_path: Path) -> None:
    gold = gsm8k_golds(1)[0]
    lines = [
        json.dumps({"row": 0, "completion": f"So \\boxed{{{gold}}}."}),
        json.dumps({"row": 1, "completion": HUGE}),
        '{"row": 2, "completion": "unterminated',  # not JSON
        json.dumps({"row": 3, "completion": "I do not know."}),
    ]
    proc, scored = score(tmp_path, lines)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(x["row"], x["correct"]) for x in scored] == [(0, True), (1, False), (3, False)]
    assert re.search(r"\bline 3\b", proc.stdout + proc.stderr)
