"""The GPU path checked on CPU: fp32 master weights, precision flags, the global batch over several
trainer processes (stand-ins), per-rank resources, the learning-rate schedule and the start-up
summary."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import FIXTURES, run_script

import train_trl_grpo as T
from grader_pools import sandbox_worker_count
from grpo_extensions import print_run_summary


def _even_token_share(completion_ids, **_) -> list[float]:
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def _one_line_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


# ---------------------------------------------------------------- fp32 master weights
@pytest.mark.parametrize("masters", [True, False])
def test_bf16_checkpoint_trains_every_parameter_at_lr_3e6(
    clean_env, tokenizer, monkeypatch, masters
):
    """A bf16 checkpoint (as on the Hub), --dtype bf16, two GRPO steps at the default lr 3e-6.

    With fp32 master weights every parameter, RMSNorm weights included, moves. Without them
    (weights kept in bf16, the bug) almost none do: an Adam step of ~3e-6 is below half a bf16
    ulp of a weight of 0.02 or 1.0. The second case proves the test can see the difference.
    """
    import torch

    ckpt = clean_env / "bf16-ckpt"
    T.build_smoke_model(tokenizer, seed=0).to(torch.bfloat16).save_pretrained(str(ckpt))
    tokenizer.save_pretrained(str(ckpt))
    if not masters:
        monkeypatch.setattr(T, "weights_dtype", T.torch_dtype)
    cfg = T.resolve_config(
        ["--model-id", str(ckpt), "--dtype", "bf16", "--vllm-mode", "none", "--lr", "3e-6"]
        + ["--data-dir", str(FIXTURES / "gsm8k"), "--output-dir", "o", "--total-steps", "2"]
        + ["--batch-size", "4", "--grad-accum-steps", "2", "--num-generations", "4"]
        + ["--max-completion-length", "8", "--no-gradient-checkpointing", "--report-to", "none"]
        + ["--save-steps", "1000", "--eval-samples", "0"]
    )
    model = T.load_model(cfg, tokenizer)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    prompts = [
        {"prompt": tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Say something, #{i}."}],
            tokenize=False, add_generation_prompt=True), "gold": "", "row": i}
        for i in range(8)
    ]  # fmt: skip
    trainer = T.build_trainer(cfg, model, tokenizer, prompts, [_even_token_share])
    assert trainer.args.bf16 and trainer.args.learning_rate == 3e-6
    trainer.train()
    rewards = [h["reward_std"] for h in trainer.state.log_history if "reward_std" in h]
    assert len(rewards) == 2 and all(r > 0 for r in rewards), "the reward must vary"
    moved = total = 0
    norm_moved = norm_total = 0
    for name, p in model.named_parameters():
        diff = int((p.detach().float() != start[name]).sum())
        moved, total = moved + diff, total + p.numel()
        if "norm" in name:
            norm_moved, norm_total = norm_moved + diff, norm_total + p.numel()
    assert norm_total > 0
    if masters:
        assert next(model.parameters()).dtype == torch.float32
        assert moved / total >= 0.95, f"{moved / total:.3f} of the parameters moved"
        assert norm_moved / norm_total >= 0.95, f"{norm_moved / norm_total:.3f} of norm weights"
    else:
        assert moved / total < 0.95 and norm_moved == 0


def test_lora_trains_fp32_adapters_over_a_base_in_compute_dtype(clean_env, tokenizer):
    import torch

    cfg = T.resolve_config(["--smoke", "--dtype", "bf16", "--lora-r", "4", "--output-dir", "o"])
    assert T.weights_dtype(cfg) == torch.bfloat16
    full = T.resolve_config(["--smoke", "--dtype", "bf16", "--output-dir", "o"])
    assert T.weights_dtype(full) == torch.float32
    base = T.build_smoke_model(tokenizer, 0).to(T.weights_dtype(cfg))
    trainer = T.build_trainer(cfg, base, tokenizer, [{"prompt": "x"}], [lambda **k: [0.0]])
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


# ---------------------------------------------------------------- one-line refusals at start
def test_fp16_is_refused_at_start_in_one_line(tmp_path):
    res = run_script(["--smoke", "--dtype", "fp16", "--output-dir", str(tmp_path / "o")])
    assert res.returncode == 2
    assert "fp16" in _one_line_error(res) and "bf16" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("mode", "extra"), [("server", []), ("colocate", []), ("colocate", ["--eval-only"])]
)
def test_vllm_modes_without_vllm_are_refused_before_loading_anything(
    clean_env, monkeypatch, capsys, mode, extra
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )

    def too_late(*a, **k):
        raise AssertionError("loaded the tokenizer before checking for vllm")

    monkeypatch.setattr(T, "load_tokenizer", too_late)
    monkeypatch.setattr(T, "check_vllm_server", lambda cfg: None)  # a server is up
    # A model directory: --smoke's in-memory model is refused with colocate before anything else.
    model = str(FIXTURES / "qwen2.5-tokenizer")
    argv = ["--smoke", "--model-id", model, "--vllm-mode", mode, "--output-dir", "o", *extra]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vllm" in err[0] and "uv sync --extra vllm" in err[0], err


def test_eval_only_against_a_server_needs_no_vllm_package(clean_env, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    cfg = T.resolve_config(["--vllm-mode", "server", "--eval-only", "--output-dir", "o"])
    T.check_vllm_package(cfg, T.is_training(cfg))  # HTTP only: no error


# ---------------------------------------------------------------- several trainer processes
@pytest.fixture
def stand_in_world(monkeypatch):
    """N trainer processes as accelerate launch would report them, without launching any."""
    from trl import GRPOConfig

    def set_world(n: int) -> None:
        monkeypatch.setattr(T, "world_size", lambda: n)
        monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: n), raising=False)

    return set_world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batch_does_not_grow_with_trainer_gpus(clean_env, stand_in_world, capsys, world):
    stand_in_world(world)
    cfg = T.resolve_config(
        ["--batch-size", "4", "--grad-accum-steps", "6", "--num-generations", "4"]
        + ["--vllm-mode", "none", "--output-dir", "o", "--report-to", "none"]
    )
    T.split_batch(cfg, T.world_size())
    args = T.grpo_config(cfg)
    assert args.world_size == world
    # completions per optimizer step, over all processes, and per generation round (TRL)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * world == 24
    assert args.generation_batch_size == 24
    assert args.per_device_train_batch_size <= cfg.batch_size  # micro-batch memory never grows
    print_run_summary(args, "float32")
    out = capsys.readouterr().out
    assert "batch: 24 completions per optimizer step (global) = 6 prompts per step x 4 " in out
    assert f"{world} trainer process(es)" in out


def test_global_batch_that_cannot_split_is_refused_in_one_line(clean_env, stand_in_world):
    stand_in_world(3)
    cfg = T.resolve_config(["--vllm-mode", "none", "--output-dir", "o"])  # 512 over 3 processes
    with pytest.raises(T.ConfigError, match=r"512 completions .* 3 trainer processes") as e:
        T.split_batch(cfg, T.world_size())
    assert "\n" not in str(e.value) and "--grad-accum-steps 120" in str(e.value)
    hint = T.resolve_config(
        ["--vllm-mode", "none", "--output-dir", "o", "--grad-accum-steps", "120"]
    )
    # the hint is a valid setting: 480 = 30 prompts x 16, 160 per process
    T.split_batch(hint, T.world_size())


def test_sandbox_workers_share_the_usable_cpus_among_local_ranks(clean_env, monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(T.os, "cpu_count", lambda: 128)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    cfg = T.resolve_config(["--dataset", "mbpp", "--output-dir", "o"])
    assert sandbox_worker_count(cfg.sandbox_workers) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert sandbox_worker_count(cfg.sandbox_workers) == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert sandbox_worker_count(cfg.sandbox_workers) == 1
    explicit = T.resolve_config(
        ["--dataset", "mbpp", "--output-dir", "o", "--sandbox-workers", "5"]
    )
    assert sandbox_worker_count(explicit.sandbox_workers) == 5


@pytest.mark.parametrize(("rank", "written"), [("0", True), ("1", False)])
def test_resolved_config_is_written_by_the_main_process_only(clean_env, monkeypatch, rank, written):
    monkeypatch.setenv("RANK", rank)
    out = clean_env / "o"
    assert T.main(["--smoke", "--dry-run", "--output-dir", str(out)]) == 0
    assert (out / "resolved_config.json").exists() is written


# ---------------------------------------------------------------- schedule and summary
def _lrs(cfg, tokenizer, steps: int) -> list[float]:
    trainer = T.build_trainer(
        cfg, T.build_smoke_model(tokenizer, 0), tokenizer, [{"prompt": "x"}], [lambda **k: [0.0]]
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return lrs


def test_lr_schedule_is_constant_after_warmup_by_default_and_selectable(clean_env, tokenizer):
    base = ["--smoke", "--output-dir", "o", "--lr", "1e-4", "--total-steps", "10"]
    lrs = _lrs(T.resolve_config([*base, "--warmup-steps", "2"]), tokenizer, 10)
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2:] == pytest.approx([1e-4] * 8)
    lrs = _lrs(T.resolve_config([*base, "--lr-scheduler", "linear"]), tokenizer, 10)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] < 0.2e-4
    with pytest.raises(T.ConfigError, match="lr_scheduler"):
        T.resolve_config([*base, "--lr-scheduler", "constant"])  # would ignore warmup_steps


@pytest.mark.parametrize(("mode", "on"), [("server", True), ("colocate", True), ("none", False)])
def test_summary_says_whether_vllm_importance_sampling_is_on(clean_env, capsys, mode, on):
    cfg = T.resolve_config(["--vllm-mode", mode, "--output-dir", "o", "--report-to", "none"])
    args = T.grpo_config(cfg)
    assert (args.use_vllm and args.vllm_importance_sampling_correction) is on
    print_run_summary(args, "float32")
    out = capsys.readouterr().out
    assert ("importance-sampling correction: on" in out) is on
    assert ("importance-sampling correction: off" in out) is not on
    assert "schedule constant_with_warmup" in out


@pytest.mark.parametrize(
    ("flags", "said"),
    [((), False), (("--top-k", "20"), True), (("--top-p", "0.9"), True)],
)
def test_summary_says_truncated_sampling_log_probs_are_made_comparable(
    clean_env, capsys, flags, said
):
    cfg = T.resolve_config(["--vllm-mode", "colocate", "--output-dir", "o", *flags])
    print_run_summary(T.grpo_config(cfg), "float32")
    out = capsys.readouterr().out
    assert ("the mass vLLM's top-k / top-p truncation kept" in out) is said


def test_training_prints_the_summary_and_one_tokenizer(clean_env, capsys):
    out = clean_env / "o"
    args = ["--smoke", "--output-dir", str(out), "--total-steps", "1", "--eval-samples", "0"]
    assert T.main([*args, "--max-completion-length", "4"]) == 0
    printed = capsys.readouterr().out
    assert "batch: 8 completions per optimizer step (global) = 2 prompts" in printed
    assert "precision: float32 weights, fp32 compute" in printed
    assert "importance-sampling correction: off" in printed
    assert (out / "final" / "tokenizer.json").exists()
