"""bench/learning.py's verdict: the windows it compares and the thresholds it applies."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import learning  # noqa: E402


def arm(formats: list[float], correct: list[float]) -> list[dict]:
    return [
        {"step": i + 1, "reward": c + 0.1 * f, "rewards": {"correctness": c, "format": f}}
        for i, (f, c) in enumerate(zip(formats, correct, strict=True))
    ]


FLAT0 = [0.0] * 6


def test_windows_are_the_first_two_and_the_last_three_steps():
    means = learning.window_means(arm([0.1, 0.3, 9.0, 0.5, 0.6, 0.7], FLAT0))
    assert means["format"][0] == 0.2
    assert abs(means["format"][1] - 0.6) < 1e-9  # step 3's 9.0 is in neither window
    assert means["correctness"] == (0.0, 0.0)


def test_a_rise_over_a_flat_control_is_learning():
    data = {
        "treatment": arm([0.0, 0.1, 0.4, 0.7, 0.8, 0.9], FLAT0),
        "control": arm([0.0, 0.1, 0.0, 0.1, 0.0, 0.1], FLAT0),
    }
    line, ok = learning.verdict_line(data)
    assert ok and "verdict: LEARNS (format +0.75" in line
    assert "control: correctness 0.00 -> 0.00 (+0.00), format 0.05 -> 0.07 (+0.02)" in line


def test_a_small_rise_or_a_drifting_control_is_not():
    small = {"treatment": arm([0.0, 0.1, 0.2, 0.3, 0.3, 0.3], FLAT0), "control": arm(FLAT0, FLAT0)}
    assert learning.verdict_line(small)[1] is False  # +0.25 < 0.3
    drift = {
        "treatment": arm([0.0, 0.0, 0.5, 0.9, 0.9, 0.9], FLAT0),
        "control": arm(FLAT0, [0.0, 0.0, 0.2, 0.2, 0.2, 0.2]),  # its correctness moved 0.2
    }
    line, ok = learning.verdict_line(drift)
    assert not ok and "NO LEARNING SHOWN" in line and "control drift 0.20" in line
