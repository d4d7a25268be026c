"""Evaluation statistics: unbiased pass@k, maj@n, per-problem scores and bootstrap intervals.

train_trl_grpo.evaluate and summarize, and compare.py's paired differences, all use these; anyone
can recompute a run's numbers from its eval/step_*.json rows with them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def group_pass_at_k(scores: list[float], rows: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """Training-batch pass@k over each prompt's group of completions (rows: each one's prompt)."""
    groups: dict[int, list[float]] = defaultdict(list)
    for s, r in zip(scores, rows, strict=True):
        groups[r].append(s)
    out = {}
    for k in ks:
        vals = [
            pass_at_k(len(g), sum(x == 1.0 for x in g), k) for g in groups.values() if len(g) >= k
        ]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@n: the most frequent extracted answer wins; ties go to the one seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return correct[answers.index(winner)]


def problem_scores(rows: list[dict], ks: list[int], majority: bool) -> dict[str, list[float]]:
    """Each headline metric (pass@k, mean@n, maj@n, greedy pass@1) as one value per problem;
    the metric is their mean, so intervals and paired differences resample these lists."""
    n = rows[0]["n"]
    out = {f"pass@{k}": [pass_at_k(r["n"], sum(r["correct"]), k) for r in rows] for k in ks}
    out[f"mean@{n}"] = [sum(r["correct"]) / r["n"] for r in rows]
    if majority:
        out[f"maj@{n}"] = [float(majority_correct(r["answers"], r["correct"])) for r in rows]
    if rows[0].get("greedy_correct") is not None:
        out["greedy_pass@1"] = [float(r["greedy_correct"]) for r in rows]
    return out


# 95 % intervals: percentile bootstrap over problems (the samples of a problem stay together),
# with a fixed seed, so one eval file always gives the same interval.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def bootstrap_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (per-problem scores or differences)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = np.concatenate(  # in chunks, so 5,000 problems never need a 1000 x 5000 index array
        [
            x[rng.integers(0, len(x), size=(min(100, BOOTSTRAP_RESAMPLES - i), len(x)))].mean(1)
            for i in range(0, BOOTSTRAP_RESAMPLES, 100)
        ]
    )
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def format_ci(value: float, ci: list[float] | None, sign: str = "") -> str:
    """0.412 [0.380, 0.445]: a metric and its 95 % interval."""
    text = f"{value:{sign}.3f}"
    return text if ci is None else f"{text} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"
