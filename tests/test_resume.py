"""--resume picks up where the checkpoint left off: dynamic sampling's refill stream and the
evaluation history (summary.json's eval list) are the same as in a run that never stopped:
2 steps in one go, and 1 + resume + 1."""

from __future__ import annotations

import json
from pathlib import Path

import grpo_extensions
import train_trl_grpo as T

ARGS = ["--smoke", "--dynamic-sampling", "--dynamic-sampling-max-rounds", "2", "--save-steps", "1"]
ARGS += ["--eval-every", "1", "--max-completion-length", "4", "--max-eval-samples", "1"]
ARGS += ["--eval-samples", "2", "--max-train-samples", "8"]


def _spy_refills(monkeypatch) -> list[tuple[int, list[int]]]:
    """(step, training rows) of every refill draw, as dynamic sampling asks for them."""
    draws: list[tuple[int, list[int]]] = []
    cls = next(
        c
        for c in vars(grpo_extensions).values()
        if isinstance(c, type) and "_draw_prompts" in vars(c)
    )
    draw = cls._draw_prompts

    def spy(self, groups):
        rows = draw(self, groups)
        draws.append((self.state.global_step, [r["row"] for r in rows]))
        return rows

    monkeypatch.setattr(cls, "_draw_prompts", spy)
    return draws


def _evals(out: Path) -> list[dict]:
    evals = json.loads((out / "summary.json").read_text())["eval"]
    # The wall time an evaluation took is the one thing two identical evaluations differ in.
    return [{k: v for k, v in e.items() if k != "eval_seconds"} for e in evals]


def test_resume_continues_the_refill_stream_and_the_eval_history(clean_env, monkeypatch):
    draws = _spy_refills(monkeypatch)
    whole, split = clean_env / "whole", clean_env / "split"
    assert T.main([*ARGS, "--total-steps", "2", "--output-dir", str(whole)]) == 0
    in_one_go = list(draws)
    draws.clear()
    assert T.main([*ARGS, "--total-steps", "1", "--output-dir", str(split)]) == 0
    assert T.main([*ARGS, "--total-steps", "2", "--output-dir", str(split), "--resume"]) == 0
    # The random smoke model earns no reward: every step draws refills until the round cap.
    assert {step for step, _ in in_one_go} == {0, 1}
    assert draws == in_one_go
    assert [e["step"] for e in _evals(whole)] == [0, 1, 2]
    assert _evals(split) == _evals(whole)
