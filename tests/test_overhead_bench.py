"""bench/overhead.py, shortened to one round of one step, so that a change on either side (the
harness's GRPOConfig, TRL's defaults) cannot silently stop the benchmark from running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_runs_one_short_round(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py")]
        + ["--rounds", "1", "--steps", "1", "--warmup", "0", "--completion-length", "4"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("GRPO_")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The comparison only means something once both sides are checked to train the same thing.
    assert "same prompts, initial weights and GRPOConfig on both sides" in proc.stdout
    for side in ("bare", "harness"):
        assert re.search(rf"^\[{side} run 1: 1 steps in [\d.]+ s\]$", proc.stdout, re.M)
    ratio = re.search(r"^ratio harness/bare: ([\d.]+)x$", proc.stdout, re.M)
    assert ratio and float(ratio.group(1)) > 0
