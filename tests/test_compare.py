"""`train_trl_grpo.py --compare`: final metrics with intervals, paired differences on shared
problems and the comparison PNG, from run directories written the way the trainer writes them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import compare
import train_trl_grpo as T


def write_eval(run: Path, step: int, correct: dict[int, list[int]], subsample=False, split="test"):
    """An eval/step_*.json as evaluate() writes it (headline metrics from the rows)."""
    rows = [
        {"row": r, "n": len(c), "correct": c, "answers": [str(x) for x in c]}
        for r, c in correct.items()
    ]
    per = T.problem_scores(rows, [1, 2], majority=True)
    summary = {m: sum(v) / len(v) for m, v in per.items()} | {"format_rate": 1.0}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    data = {"step": step, "split": split, "problems": len(rows), "subsample": subsample}
    data |= {"summary": summary, "rows": rows}
    (run / "eval" / f"step_{step:05d}.json").write_text(json.dumps(data))


def fake_run(root: Path, name: str, final: dict[int, list[int]], finished=True, dataset="gsm8k"):
    run = root / name
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_text(json.dumps({"dataset": dataset, "run_name": name}))
    write_eval(run, 0, {r: [0, 1, 0, 0] for r in final})
    write_eval(run, 10, {r: final[r] for r in list(final)[:5]}, subsample=True)
    write_eval(run, 20, final)
    if finished:
        summary = {"steps": 20, "train_seconds": 3725.0, "first_reward": 0.1, "last_reward": 0.5}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def outcomes(rng: random.Random, p: float, rows) -> dict[int, list[int]]:
    return {r: [int(rng.random() < p) for _ in range(4)] for r in rows}


def test_paired_difference_uses_only_shared_problems(tmp_path, capsys):
    rng = random.Random(0)
    a_rows = outcomes(rng, 0.3, range(60))
    # B: the same problems 10..59 plus 20 that A never saw, and one more solve on 12 problems.
    b_rows = {r: list(a_rows[r]) for r in range(10, 60)} | outcomes(rng, 0.3, range(100, 120))
    for r in range(10, 22):
        b_rows[r][b_rows[r].index(0) if 0 in b_rows[r] else 0] = 1
    a = fake_run(tmp_path, "a", a_rows)
    b = fake_run(tmp_path, "b", b_rows)
    png = tmp_path / "cmp.png"
    assert T.main(["--compare", str(a), str(b), "--png", str(png)]) == 0
    out = capsys.readouterr().out

    shared = range(10, 60)
    expected = sum(sum(b_rows[r]) / 4 - sum(a_rows[r]) / 4 for r in shared) / len(shared)
    n, diffs = compare.paired(compare.load_run(a).final, compare.load_run(b).final)
    assert n == 50
    d, (lo, hi) = diffs["mean@4"]
    assert d == pytest.approx(expected)
    assert 0 < lo < d < hi  # a consistent gain on 12 problems: the interval excludes 0
    # The unpaired intervals overlap although the paired one excludes 0: pairing is the point.
    ci_a = compare.intervals(compare.load_run(a).final)["mean@4"]
    ci_b = compare.intervals(compare.load_run(b).final)["mean@4"]
    assert ci_a[1] > ci_b[0]
    line = next(ln for ln in out.splitlines() if ln.startswith("b ") and "50" in ln.split())
    assert f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]*" in line
    assert png.stat().st_size > 5000


def test_table_has_steps_time_reward_and_which_eval(tmp_path, capsys):
    rng = random.Random(1)
    rows = outcomes(rng, 0.5, range(30))
    runs = [fake_run(tmp_path, "ref", rows), fake_run(tmp_path, "b", outcomes(rng, 0.5, range(30)))]
    runs.append(fake_run(tmp_path, "unfinished", outcomes(rng, 0.5, range(30)), finished=False))
    assert T.main(["--compare", *map(str, runs), "--png", str(tmp_path / "p.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:3] == ["run", "steps", "time"]
    assert {"pass@1", "pass@2", "mean@4", "maj@4"} <= set(header)
    ref = lines[2].split()
    assert ref[:9] == ["ref", "20", "1h02m", "0.100", "->", "0.500", "step", "20,", "30"]
    mean = sum(sum(c) / 4 for c in rows.values()) / 30
    assert f"{mean:.3f}" in ref
    unfinished = next(ln.split() for ln in lines if ln.startswith("unfinished"))
    assert unfinished[1:4] == ["-", "-", "-"]
    # Both later runs are compared with the first one.
    diff_lines = [ln for ln in lines if ln.startswith(("b ", "unfinished"))]
    assert len(diff_lines) == 4
    assert any("bootstrap over problems" in ln for ln in lines)


def test_a_single_run_prints_its_table(tmp_path, capsys):
    run = fake_run(tmp_path, "only", outcomes(random.Random(2), 0.5, range(10)))
    assert T.main(["--compare", str(run), "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "only" in out and "paired" not in out


@pytest.mark.parametrize("case", ["missing", "no_evals", "other_set", "no_shared", "no_args"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    rng = random.Random(3)
    a = fake_run(tmp_path, "a", outcomes(rng, 0.5, range(10)))
    args = [str(a)]
    if case == "missing":
        args.append(str(tmp_path / "nope"))
    elif case == "no_evals":
        (tmp_path / "empty").mkdir()
        args.append(str(tmp_path / "empty"))
    elif case == "other_set":
        args.append(str(fake_run(tmp_path, "m", outcomes(rng, 0.5, range(10)), dataset="math")))
    elif case == "no_shared":
        args.append(str(fake_run(tmp_path, "b", outcomes(rng, 0.5, range(50, 60)))))
    else:
        args = []
    rc = T.main(["--compare", *args, "--png", str(tmp_path / "p.png")])
    assert rc == (2 if case == "no_args" else 1)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "p.png").exists()
