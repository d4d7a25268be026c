"""The modes that do not train, past their start: --score and --verify-gold (grade text with the
training rewards), --eval-only's outputs, --plot. train_trl_grpo.py hands them its task-bound
pieces (the rows, the scorer), so nothing here knows a task."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from errors import DataError
from run_log import append_log, history_entry, plot_metrics, print_table, read_log


def score_file(
    path: str, n_rows: int, split: str, score: Callable[[list[int], list[str]], dict]
) -> int:
    """--score: `path` holds one {"row", "completion"} per line; `score(rows, completions)` is
    train_trl_grpo.score_completions for those rows' golds. A line that does not parse, or names
    a row the split lacks, is skipped with one line on stderr naming it: the others are scored.
    Writes PATH.scored.jsonl and prints one JSON summary line last (skipped: their line numbers);
    exit 1 only when no line could be scored."""
    items, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            problem = ""
            try:
                obj = json.loads(line)
                r, comp = obj["row"], obj["completion"]
                if type(r) is not int or not isinstance(comp, str):  # a bool is not a row
                    raise TypeError
                if not 0 <= r < n_rows:
                    problem = f"row {r} is out of range (split {split} has {n_rows} rows)"
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                problem = 'expected {"row": <int>, "completion": "<text>"}'
            if problem:
                print(f"skipped: {path}: line {ln}: {problem}", file=sys.stderr, flush=True)
                skipped.append(ln)
            else:
                items.append((r, comp))
    if skipped and not items:
        raise DataError(f"{path}: none of its {len(skipped)} lines could be scored (see above)")
    scored = score([r for r, _ in items], [c for _, c in items])
    n_correct = 0
    with open(path + ".scored.jsonl", "w") as out:
        for i, (r, _) in enumerate(items):
            comps = {k: v[i] for k, v in scored["components"].items()}
            correct = comps["correctness"] == 1.0
            n_correct += correct
            rec = {"row": r, "reward": scored["reward"][i], "rewards": comps, "correct": correct}
            out.write(json.dumps(rec) + "\n")
    mean = sum(scored["reward"]) / len(items) if items else 0.0
    summary = {"n": len(items), "correct": n_correct, "mean_reward": mean, "skipped": skipped}
    print(json.dumps(summary))
    return 0


def report_gold(golds: list[str], scored: dict) -> int:
    """--verify-gold: one JSON line per gold solution that failed, then the summary; exit 1 if any
    failed (graders and prompt format disagree on this data) or there was nothing to check."""
    corr = scored["components"]["correctness"]
    failed = [i for i, c in enumerate(corr) if c != 1.0]
    for i in failed:
        print(
            json.dumps(
                {
                    "row": i,
                    "gold": golds[i][:200],
                    "rewards": {k: v[i] for k, v in scored["components"].items()},
                }
            )
        )
    mean = sum(scored["reward"]) / len(golds) if golds else 0.0
    print(json.dumps({"n": len(golds), "correct": len(golds) - len(failed), "mean_reward": mean}))
    return 1 if failed or not golds else 0


def write_eval_only(output_dir: str, record: dict) -> None:
    """--eval-only's outputs, as a training run leaves them for its baseline: log.jsonl, the
    table, metrics.png and summary.json."""
    logs = {f"eval_{k}": v for k, v in record["summary"].items()}
    append_log(output_dir, {"step": 0, **logs, "eval_problems": record["problems"]})
    history = [history_entry(record)]
    print_table(history)
    plot_metrics(output_dir, [], history)
    (Path(output_dir) / "summary.json").write_text(json.dumps({"eval": history}, indent=1))


def replot(output_dir: str) -> int:
    """--plot: redraw output_dir/metrics.png from its log.jsonl."""
    if not (Path(output_dir) / "log.jsonl").is_file():
        raise DataError(f"plot: no log.jsonl in {output_dir}")
    print(f"wrote {plot_metrics(output_dir, *read_log(output_dir))}")
    return 0
