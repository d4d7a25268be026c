"""The training path: --smoke through main(), resume, seeds, and a learning sanity check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval_stats
import train_trl_grpo as T
from grpo_extensions import TIME_KEYS

ROWS8 = [{"row": i} for i in range(8)]  # the smoke run's 8 eval problems, as eval_subset sees them


@pytest.fixture(scope="module")
def gsm8k_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "gsm8k"
    args = ["--dataset", "gsm8k", "--smoke", "--output-dir", str(out), "--eval-subsample", "3"]
    assert T.main(args) == 0
    return out


def test_smoke_gsm8k_leaves_config_checkpoints_evals_and_summary(gsm8k_run):
    cfg = json.loads((gsm8k_run / "resolved_config.json").read_text())
    assert cfg["model_id"] == T.SMOKE_MODEL and cfg["total_steps"] == 4
    # save_total_limit 1 (the default): checkpoint-2 was deleted once checkpoint-4 was saved.
    assert {p.name for p in gsm8k_run.glob("checkpoint-*")} == {"checkpoint-4"}
    assert (gsm8k_run / "final" / "model.safetensors").exists()
    summary = json.loads((gsm8k_run / "summary.json").read_text())
    assert summary["steps"] == 4
    # Baseline, one mid-run evaluation and the final weights; the mid-run one on the
    # eval_subsample (3 of the 8 problems), baseline and final on all of them.
    assert [e["step"] for e in summary["eval"]] == [0, 2, 4]
    assert [(e["problems"], e["subsample"]) for e in summary["eval"]] == [
        (8, False),
        (3, True),
        (8, False),
    ]
    cfg = T.resolve_config(["--smoke", "--eval-subsample", "3", "--output-dir", "o"])
    for step in (0, 2, 4):
        ev = json.loads((gsm8k_run / "eval" / f"step_{step:05d}.json").read_text())
        n = 3 if step == 2 else 8
        assert len(ev["rows"]) == n and all(r["n"] == 4 for r in ev["rows"])
        if step == 2:
            assert [r["row"] for r in ev["rows"]] == [e["row"] for e in T.eval_subset(cfg, ROWS8)]
        assert ev["summary"]["pass@4"] == pytest.approx(
            sum(eval_stats.pass_at_k(4, sum(r["correct"]), 4) for r in ev["rows"]) / n
        )
        for metric, (lo, hi) in ev["ci95"].items():  # intervals contain the point estimates
            assert lo <= ev["summary"][metric] <= hi, (step, metric)
        assert ev["ci95"].keys() == {"pass@1", "pass@2", "pass@4", "mean@4", "maj@4"}
    assert (gsm8k_run / "metrics.png").stat().st_size > 1000
    state = json.loads((gsm8k_run / "checkpoint-4" / "trainer_state.json").read_text())
    logged = {k for h in state["log_history"] for k in h}
    # One TRL reward function per component, plus training-batch pass@k.
    assert {"rewards/correctness/mean", "rewards/format/mean", "pass@1", "pass@4"} <= logged


def test_compare_the_smoke_run_with_its_base_model(gsm8k_run, tmp_path, capsys):
    base = tmp_path / "base"
    args = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--output-dir", str(base)]
    assert T.main(args) == 0
    capsys.readouterr()
    png = tmp_path / "compare.png"
    assert T.main(["--compare", str(base), str(gsm8k_run), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"paired differences from ref = {base.name}" in out
    lines = out.splitlines()
    title = next(i for i, ln in enumerate(lines) if ln.startswith("paired differences"))
    assert lines[title + 2].split()[:2] == [gsm8k_run.name, "8"]  # both final evals' problems
    assert png.stat().st_size > 5000


def test_smoke_steps_log_where_the_time_went(gsm8k_run):
    state = json.loads((gsm8k_run / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    for h in steps:
        parts = [h[f"time/{k}"] for k in TIME_KEYS]
        assert min(parts) >= 0 and h["time/generation"] > 0 and h["time/train"] > 0
        assert h["time/weight_sync"] == 0  # no vLLM in --smoke
        assert sum(parts) == pytest.approx(h["time/step"], rel=0.05)
        # 4 prompts x 2 completions per step (batch 4 x 2 micro-steps).
        generated = h["completions/mean_length"] * 8
        assert h["generation/tokens_per_s"] * h["time/generation"] == pytest.approx(generated)
    # eval_every=2: the evaluations after steps 2 and 4 are inside those steps' time.
    assert [h["time/eval"] > 0 for h in steps] == [False, True, False, True]


def test_resume_continues_from_the_newest_checkpoint(gsm8k_run, capsys):
    args = ["--dataset", "gsm8k", "--smoke", "--output-dir", str(gsm8k_run)]
    assert T.main([*args, "--resume", "--total-steps", "6", "--eval-samples", "0"]) == 0
    assert f"resuming from {gsm8k_run / 'checkpoint-4'}" in capsys.readouterr().out
    state = json.loads((gsm8k_run / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-4 carried over from the checkpoint, then 5 and 6


def test_resume_without_checkpoint_is_an_error(tmp_path):
    args = ["--smoke", "--output-dir", str(tmp_path / "empty"), "--resume"]
    assert T.main(args) == 2


def test_save_steps_0_keeps_no_checkpoint_only_the_final_model(tmp_path):
    """A CPU demo's checkpoint (weights plus Adam state) is 1.6 GB that nobody resumes from."""
    out = tmp_path / "o"
    args = ["--smoke", "--output-dir", str(out), "--total-steps", "2", "--save-steps", "0"]
    assert T.main([*args, "--eval-every", "0", "--max-eval-samples", "2"]) == 0
    assert not list(out.glob("checkpoint-*"))
    assert (out / "final" / "config.json").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert T.resolve_config(["--demo"]).save_steps == 0


@pytest.mark.parametrize("dataset", ["math", "mbpp"])
def test_smoke_runs_for_every_dataset(tmp_path, dataset):
    out = tmp_path / dataset
    args = ["--dataset", dataset, "--smoke", "--output-dir", str(out), "--total-steps", "2"]
    assert T.main([*args, "--eval-every", "0", "--max-eval-samples", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and [e["step"] for e in summary["eval"]] == [0, 2]


def test_seed_changes_data_order(clean_env, tokenizer, tiny_model):
    def first_batch(seed: int) -> list[int]:
        cfg = T.resolve_config(["--smoke", "--seed", str(seed), "--output-dir", "o"])
        task = T.TASKS["gsm8k"]
        rows = T.to_examples(cfg, task, tokenizer, T.load_rows(cfg, task, "train"), 32)
        trainer = T.build_trainer(cfg, tiny_model, tokenizer, rows, [lambda **kw: [0.0]])
        assert trainer.args.seed == seed and trainer.args.data_seed == seed
        batch = next(iter(trainer.get_train_dataloader()))
        return [ex["row"] for ex in batch]

    assert first_batch(1) == first_batch(1)
    assert first_batch(1) != first_batch(2)


def _even_token_share(completion_ids, **_) -> list[float]:
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def _odd_token_share(completion_ids, **_) -> list[float]:
    return [1.0 - x for x in _even_token_share(completion_ids)]


@pytest.mark.parametrize("reward", [_even_token_share, _odd_token_share])
def test_learning_sanity_reward_rises(clean_env, tokenizer, tiny_model, reward):
    """A toy reward the tiny model can learn: the share of even (or odd) token ids.

    A low sampling temperature concentrates the random model on few tokens, so GRPO has a small
    bandit to solve. Both directions must be learned: a wiring that only collapses onto some token
    would pass one of them by luck, never both.
    """
    cfg = T.resolve_config(
        ["--smoke", "--output-dir", "o", "--total-steps", "12", "--lr", "1e-3"]
        + ["--temperature", "0.1", "--max-completion-length", "4", "--batch-size", "8"]
        + ["--num-generations", "8", "--grad-accum-steps", "2", "--save-steps", "1000"]
    )
    prompts = [
        {"prompt": tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Say something, #{i}."}],
            tokenize=False, add_generation_prompt=True), "gold": "", "row": i}
        for i in range(16)
    ]  # fmt: skip
    trainer = T.build_trainer(cfg, tiny_model, tokenizer, prompts, [reward])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 12
    first, last = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert last > first + 0.2 and last > 0.8, rewards


def test_lora_trains_an_adapter(tmp_path):
    out = tmp_path / "lora"
    args = ["--smoke", "--output-dir", str(out), "--total-steps", "1", "--lora-r", "4"]
    assert T.main([*args, "--eval-samples", "0", "--lr", "1e-2"]) == 0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert not (out / "final" / "model.safetensors").exists()  # no full copy of the base model


def test_eval_metrics_reach_tensorboard_under_eval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    args = ["--smoke", "--output-dir", str(out), "--total-steps", "1", "--report-to", "tensorboard"]
    assert T.main([*args, "--max-eval-samples", "2"]) == 0
    (run_dir,) = {p.parent for p in out.glob("runs/**/events.out.tfevents.*")}
    tags = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert {"eval/pass@1", "eval/mean@4", "eval/maj@4", "train/reward"} <= set(tags), tags
    steps = [e.step for e in EventAccumulator(str(run_dir)).Reload().Scalars("eval/pass@1")]
    assert steps == [0, 1]  # baseline and final weights
