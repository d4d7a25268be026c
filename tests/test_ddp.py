"""Two trainer processes on CPU (torchrun, gloo): dynamic sampling where each process holds
whole groups, and its refusal at start where a group would straddle two processes.

Run as a script (by torchrun, from the test below) this file is one trainer process of a tiny
dynamic-sampling run; it writes what reached its loss and what it generated to OUT/rank_R.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 2


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_straddling_groups_are_refused_at_start_in_one_line(tmp_path):
    # 4 x 2 = 8 completions over 2 processes is 4 each: half a group of 8 on each process.
    args = [str(ROOT / "train_trl_grpo.py"), "--smoke", "--num-generations", "8"]
    args += ["--dynamic-sampling", "--eval-samples", "0", "--output-dir", str(tmp_path / "o")]
    result = _torchrun(args, tmp_path)
    assert result.returncode != 0
    errors = {ln for ln in result.stderr.splitlines() if ln.startswith("error:")}
    assert len(errors) == 1, result.stderr[-3000:]  # the same line from both processes
    (line,) = errors
    assert "dynamic_sampling" in line and "--grad-accum-steps 4" in line, line
    assert "shape" not in result.stderr and not (tmp_path / "o" / "log.jsonl").exists()


def test_dynamic_sampling_over_two_processes_with_whole_groups_each(tmp_path):
    result = _torchrun([__file__, str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    n = 4
    for rank in ranks:
        assert len(rank["steps"]) == STEPS
        for rows, advantages in rank["steps"]:
            # This process's 2 groups of 4: whole groups, each with reward variance.
            assert len(rows) == 8 and all(rows.count(r) % n == 0 for r in rows), rows
            assert all(r % 2 == 1 for r in rows), rows
            assert advantages > 0
    logs = [h for h in ranks[0]["log"] if "loss" in h]
    assert len(logs) == STEPS
    for step, log in enumerate(logs):
        assert log["dynamic_sampling/cap_hit"] == 0 and log["dynamic_sampling/rounds"] >= 1
        # Throughput counts both processes' completion tokens.
        tokens = sum(rank["tokens"][step] for rank in ranks)
        assert min(rank["tokens"][step] for rank in ranks) > 0
        assert log["generation/tokens_per_s"] * log["time/generation"] == _approx(tokens)


def _approx(x: float):
    import pytest

    return pytest.approx(x, rel=1e-6)


def _worker(out: Path) -> None:
    """One process of a 2-step run: batch 8 x 2 micro-steps over 2 processes (2 groups of 4
    completions each), rewards with variance on odd training rows only."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    os.chdir(out)
    import torch
    from test_grpo_extensions import _odd_rows_vary, _prompts, _rows_of, _spy_loss_inputs
    from transformers import AutoTokenizer

    import train_trl_grpo as T

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "tests/fixtures/qwen2.5-tokenizer"))
    cfg = T.resolve_config(
        ["--smoke", "--output-dir", str(out / "run"), "--total-steps", str(STEPS)]
        + ["--save-steps", "0", "--eval-samples", "0", "--batch-size", "8"]
        + ["--grad-accum-steps", "2", "--num-generations", "4", "--max-completion-length", "6"]
        + ["--lr", "1e-2", "--dynamic-sampling", "--dynamic-sampling-max-rounds", "10"]
    )
    prompts = _prompts(tokenizer)
    trainer = T.build_trainer(
        cfg, T.build_smoke_model(tokenizer, 0), tokenizer, prompts, [_odd_rows_vary]
    )
    seen = _spy_loss_inputs(trainer)
    tokens = [0] * STEPS
    generate = trainer._generate

    def counting(batch):
        result = generate(batch)
        tokens[trainer.state.global_step] += sum(len(ids) for ids in result[1])
        return result

    trainer._generate = counting
    trainer.train()
    per_step = len(seen) // STEPS
    steps = []
    for s in range(STEPS):
        batches = seen[s * per_step : (s + 1) * per_step]
        rows = [r for b in batches for r in _rows_of(b, tokenizer, prompts)]
        steps.append((rows, min(float(b["advantages"].abs().sum()) for b in batches)))
    rank = trainer.accelerator.process_index
    record = {"steps": steps, "tokens": tokens, "log": trainer.state.log_history}
    (out / f"rank_{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
