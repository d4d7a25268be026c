"""Tests for --score (grade given completions with the training rewards) and --verify-gold (grade
every gold solution), run as the command line runs them, on the bundled real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
FIXTURE_ROWS = {"gsm8k": 264, "math": 900, "mbpp": 100}

sys.path.insert(0, str(ROOT))
from conftest import run_script  # noqa: E402

import train_trl_grpo as ttg  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return run_script(list(args), env=ENV)


def data_args(dataset: str, data_dir: Path | None = None) -> list[str]:
    return [
        "--dataset",
        dataset,
        "--data-dir",
        str(data_dir or FIXTURES / dataset),
        "--split",
        "test",
    ]


def rows(dataset: str) -> list[dict]:
    with (FIXTURES / dataset / "test.jsonl").open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summary_line(proc: subprocess.CompletedProcess) -> dict:
    """The JSON summary, which must be the last line on stdout."""
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert set(out) - {"skipped"} == {"n", "correct", "mean_reward"}, last  # skipped: --score
    return out


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def score(tmp_path: Path, dataset: str, items: list, *extra: str) -> tuple[dict, list[dict]]:
    path = write_jsonl(tmp_path / "completions.jsonl", items)
    proc = run(*data_args(dataset), "--score", str(path), *extra)
    assert proc.returncode == 0, proc.stderr
    scored_path = Path(str(path) + ".scored.jsonl")
    scored = [json.loads(line) for line in scored_path.read_text().splitlines()]
    return summary_line(proc), scored


# ------------------------------------------------------------------------------------------------
# --verify-gold
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["gsm8k", "math", "mbpp"])
def test_verify_gold_passes_on_fixtures(dataset):
    proc = run(*data_args(dataset), "--verify-gold")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    s = summary_line(proc)
    assert s["n"] == s["correct"] == FIXTURE_ROWS[dataset]
    # Every gold is right and boxed / in one code block: 1.0 * correctness + 0.1 * format, except
    # 5 MATH solutions that box several different answers (e.g. "b = \\boxed{-10879} ... b =
    # \\boxed{10879}"): the format reward pays for one final answer, so not for those.
    unformatted = {"gsm8k": 0, "math": 5, "mbpp": 0}[dataset]
    n = FIXTURE_ROWS[dataset]
    assert s["mean_reward"] == pytest.approx(1.0 + 0.1 * (n - unformatted) / n)


def test_verify_gold_reports_a_broken_gold(tmp_path):
    data = rows("mbpp")[:4]
    assert data[2]["code"].lstrip().startswith("def find_Product")
    data[2]["code"] = "def find_Product(arr, n):\n    return 0"
    write_jsonl(tmp_path / "test.jsonl", data)
    proc = run(*data_args("mbpp", tmp_path), "--verify-gold")
    assert proc.returncode != 0
    s = summary_line(proc)
    assert s == {"n": 4, "correct": 3, "mean_reward": pytest.approx((3 * 1.1 + 0.1) / 4)}
    failed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"row"')]
    assert [f["row"] for f in failed] == [2]
    assert failed[0]["rewards"] == {"correctness": 0.0, "format": 1.0}


# ------------------------------------------------------------------------------------------------
# --score
# ------------------------------------------------------------------------------------------------
def test_score_gsm8k(tmp_path):
    task = ttg.TASKS["gsm8k"]
    g = [task.gold(r) for r in rows("gsm8k")[:3]]
    items = [
        {"row": 0, "completion": f"She sells 9 eggs.\nThe final answer is \\boxed{{{g[0]}}}."},
        {"row": 1, "completion": f"\\boxed{{{int(g[1]) + 1}}}"},
        "",  # blank lines are skipped
        {"row": 2, "completion": "I do not know."},
        {"row": 263, "completion": f"\\boxed{{{task.gold(rows('gsm8k')[263])}}}"},
    ]
    s, scored = score(tmp_path, "gsm8k", items)
    assert [x["row"] for x in scored] == [0, 1, 2, 263]
    assert [x["correct"] for x in scored] == [True, False, False, True]
    assert [x["rewards"] for x in scored] == [
        {"correctness": 1.0, "format": 1.0},
        {"correctness": 0.0, "format": 1.0},
        {"correctness": 0.0, "format": 0.0},
        {"correctness": 1.0, "format": 1.0},
    ]
    assert [x["reward"] for x in scored] == pytest.approx([1.1, 0.1, 0.0, 1.1])
    assert s == {"n": 4, "correct": 2, "mean_reward": pytest.approx(2.3 / 4), "skipped": []}


def test_score_math_and_reward_weights(tmp_path):
    task = ttg.TASKS["math"]
    data = rows("math")
    items = [
        {"row": 0, "completion": data[0]["solution"]},
        {"row": 1, "completion": f"So the answer is $\\boxed{{{task.gold(data[1])}}}$."},
        {"row": 1, "completion": "So the answer is $\\boxed{-98765}$."},
    ]
    s, scored = score(tmp_path, "math", items)
    assert [x["correct"] for x in scored] == [True, True, False]
    assert [x["rewards"]["correctness"] for x in scored] == [1.0, 1.0, 0.0]
    assert [x["rewards"]["format"] for x in scored] == [1.0, 1.0, 1.0]
    assert [x["reward"] for x in scored] == pytest.approx([1.1, 1.1, 0.1])
    assert s == {"n": 3, "correct": 2, "mean_reward": pytest.approx(2.3 / 3), "skipped": []}
    # The weights are the training weights: --format-weight 0.5 changes the reward, not `correct`.
    s, scored = score(tmp_path, "math", items, "--format-weight", "0.5")
    assert [x["reward"] for x in scored] == pytest.approx([1.5, 1.5, 0.5])
    assert s["correct"] == 2


def test_score_mbpp_fraction_and_all(tmp_path):
    task = ttg.TASKS["mbpp"]
    woodall = rows("mbpp")[1]  # 3 tests + 3 challenge tests, half of them expect False
    assert woodall["code"].startswith("def is_woodall")
    partial = "```python\ndef is_woodall(x):\n    return False\n```"
    items = [
        {"row": 1, "completion": "Here it is.\n" + task.gold_completion(woodall)},
        {"row": 1, "completion": partial},
        {"row": 1, "completion": "```python\ndef is_woodall(x):\n    return None\n```"},
        {"row": 1, "completion": "def is_woodall(x):\n    return False"},  # no code block
    ]
    s, scored = score(tmp_path, "mbpp", items)
    assert [x["rewards"]["correctness"] for x in scored] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [x["rewards"]["format"] for x in scored] == [1.0, 1.0, 1.0, 0.0]
    assert [x["reward"] for x in scored] == pytest.approx([1.1, 0.6, 0.1, 0.0])
    assert [x["correct"] for x in scored] == [True, False, False, False]
    assert s == {"n": 4, "correct": 1, "mean_reward": pytest.approx(1.8 / 4), "skipped": []}
    s, scored = score(tmp_path, "mbpp", items, "--mbpp-reward", "all")
    assert [x["rewards"]["correctness"] for x in scored] == [1.0, 0.0, 0.0, 0.0]
    assert s["correct"] == 1


# ------------------------------------------------------------------------------------------------
# Errors: one line naming the place, non-zero exit
# ------------------------------------------------------------------------------------------------
GOOD = {"row": 0, "completion": "\\boxed{18}"}


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '{"row": 0}',
        '{"completion": "x"}',
        '{"row": "0", "completion": "x"}',
        '{"row": 1.0, "completion": "x"}',
        '{"row": true, "completion": "x"}',
        '{"row": 0, "completion": 5}',
        '[0, "x"]',
        '"text"',
    ],
)
def test_score_malformed_line_is_skipped_and_the_rest_scored(tmp_path, bad):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, bad, GOOD])
    proc = run(*data_args("gsm8k"), "--score", str(path))
    assert proc.returncode == 0, proc.stderr
    line = one_error_line(proc)
    assert "line 2" in line and str(path) in line and "skipped" in line
    summary = summary_line(proc)
    assert summary["n"] == 2 and summary["skipped"] == [2]
    assert len(Path(str(path) + ".scored.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("row", [264, -1, 10**9])
def test_score_row_out_of_range_is_skipped_and_named(tmp_path, row):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, {"row": row, "completion": "x"}])
    proc = run(*data_args("gsm8k"), "--score", str(path))
    assert proc.returncode == 0, proc.stderr
    line = one_error_line(proc)
    assert "line 3" in line and f"row {row}" in line and "264 rows" in line
    assert summary_line(proc)["skipped"] == [3]


def test_score_with_no_line_that_parses_fails_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["not json", '{"row": 0}'])
    proc = run(*data_args("gsm8k"), "--score", str(path))
    assert proc.returncode == 1
    assert "none of its 2 lines could be scored" in proc.stderr.strip().splitlines()[-1]


def test_score_missing_file(tmp_path):
    proc = run(*data_args("gsm8k"), "--score", str(tmp_path / "absent.jsonl"))
    assert proc.returncode != 0
    assert "absent.jsonl" in one_error_line(proc)


@pytest.mark.parametrize("mode", [["--verify-gold"], ["--score", "completions.jsonl"]])
def test_missing_data_file_is_named(tmp_path, mode):
    write_jsonl(tmp_path / "train.jsonl", rows("gsm8k")[:2])
    write_jsonl(tmp_path / "completions.jsonl", [GOOD])
    mode = [str(tmp_path / m) if m.endswith(".jsonl") else m for m in mode]
    proc = run(*data_args("gsm8k", tmp_path), *mode)
    assert proc.returncode != 0
    line = one_error_line(proc)
    assert str(tmp_path / "test.jsonl") in line and "not found" in line


@pytest.mark.parametrize(
    ("dataset", "field"), [("gsm8k", "answer"), ("math", "solution"), ("mbpp", "test_list")]
)
def test_row_missing_field_is_named(tmp_path, dataset, field):
    data = rows(dataset)[:3]
    del data[1][field]
    write_jsonl(tmp_path / "test.jsonl", data)
    proc = run(*data_args(dataset, tmp_path), "--verify-gold")
    assert proc.returncode != 0
    line = one_error_line(proc)
    assert str(tmp_path / "test.jsonl") in line and "row 1" in line and repr(field) in line


def test_row_without_a_gold_answer_is_one_line(tmp_path):
    broken = rows("gsm8k")[:3]
    broken[1]["answer"] = "no final number marker here"
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    res = run(*data_args("gsm8k", tmp_path), "--verify-gold")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "row 1" in res.stderr


def test_math500_schema_file_verifies_and_scores(tmp_path):
    """A file in MATH-500's own schema (bundled MATH rows reshaped; not MATH-500 itself)."""
    args = [
        "--dataset",
        "math",
        "--data-dir",
        str(FIXTURES / "math500_schema"),
        "--split",
        "math500",
    ]
    proc = run(*args, "--verify-gold")
    assert proc.returncode == 0, proc.stderr
    assert summary_line(proc)["correct"] == summary_line(proc)["n"] == 500
    rows500 = [json.loads(x) for x in (FIXTURES / "math500_schema" / "math500.jsonl").open()]
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"row": 7, "completion": f"Thus \\boxed{{{rows500[7]['answer']}}}."},
            {"row": 8, "completion": f"Thus \\boxed{{{rows500[7]['answer']}}}."},
        ],
    )
    proc = run(*args, "--score", str(path))
    assert proc.returncode == 0, proc.stderr
    assert summary_line(proc)["correct"] == 1
    scored = [json.loads(x) for x in Path(str(path) + ".scored.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in scored] == [True, False]
