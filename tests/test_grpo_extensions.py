"""Beyond TRL: dynamic sampling, overlong shaping (truncation mask, soft penalty) and the step
clock, on CPU with the tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import train_trl_grpo as T
from grpo_extensions import StepClock, kept_log_mass

N = 4  # completions per prompt in these runs


def _cfg(*extra: str) -> T.Config:
    return T.resolve_config(
        ["--smoke", "--output-dir", "o", "--total-steps", "2", "--save-steps", "1000"]
        + ["--batch-size", "4", "--grad-accum-steps", "2", "--num-generations", str(N)]
        + ["--max-completion-length", "6", "--lr", "1e-2", *extra]
    )


def _prompts(tokenizer, count: int = 16) -> list[dict]:
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Say something, #{i}."}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            "gold": "",
            "row": i,
        }
        for i in range(count)
    ]


def _odd_rows_vary(completion_ids, row, **_) -> list[float]:
    """Constant 0 for even rows (no GRPO signal), the share of even token ids for odd rows."""
    return [
        0.0 if r % 2 == 0 else sum(t % 2 == 0 for t in ids) / max(1, len(ids))
        for ids, r in zip(completion_ids, row, strict=True)
    ]


def _spy_loss_inputs(trainer) -> list[dict]:
    """Record every micro-batch that reaches the loss."""
    seen: list[dict] = []
    compute = trainer._compute_loss

    def spy(model, inputs):
        seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute(model, inputs)

    trainer._compute_loss = spy
    return seen


def _rows_of(batch: dict, tokenizer, prompts: list[dict]) -> list[int]:
    by_text = {p["prompt"]: p["row"] for p in prompts}
    texts = tokenizer.batch_decode(
        [
            ids[mask.bool()]
            for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)
        ]
    )
    return [by_text[t] for t in texts]


def test_dynamic_sampling_only_groups_with_variance_reach_the_loss(clean_env, tokenizer):
    cfg = _cfg("--dynamic-sampling", "--dynamic-sampling-max-rounds", "10")
    prompts = _prompts(tokenizer)
    model = T.build_smoke_model(tokenizer, 0)
    trainer = T.build_trainer(cfg, model, tokenizer, prompts, [_odd_rows_vary])
    seen = _spy_loss_inputs(trainer)
    trainer.train()
    per_step = cfg.grad_accum_steps  # micro-batches per optimizer step
    assert len(seen) == cfg.total_steps * per_step
    for step in range(cfg.total_steps):
        batches = seen[step * per_step : (step + 1) * per_step]
        rows = [r for b in batches for r in _rows_of(b, tokenizer, prompts)]
        # The configured number of groups: batch_size * grad_accum_steps completions, whole groups.
        assert len(rows) == cfg.batch_size * cfg.grad_accum_steps
        assert all(rows.count(r) % N == 0 for r in rows), rows
        assert all(r % 2 == 1 for r in rows), rows  # no constant-reward (even) row got through
        assert all(b["advantages"].abs().sum() > 0 for b in batches)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0 < h["dynamic_sampling/dropped_frac"] < 1 for h in logs), logs
    assert all(
        h["dynamic_sampling/rounds"] >= 1 and h["dynamic_sampling/cap_hit"] == 0 for h in logs
    )


def test_dynamic_sampling_cap_is_one_line_and_keeps_the_batch_full(clean_env, tokenizer, capsys):
    cfg = _cfg("--dynamic-sampling", "--dynamic-sampling-max-rounds", "2", "--total-steps", "1")
    prompts = _prompts(tokenizer)
    trainer = T.build_trainer(
        cfg,
        T.build_smoke_model(tokenizer, 0),
        tokenizer,
        prompts,
        [lambda prompts, **_: [1.0] * len(prompts)],
    )
    seen = _spy_loss_inputs(trainer)
    trainer.train()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("dynamic sampling:")]
    assert len(lines) == 1 and "0/2 groups" in lines[0] and "after 2 generation rounds" in lines[0]
    assert sum(b["advantages"].numel() for b in seen) == cfg.batch_size * cfg.grad_accum_steps
    assert all(b["advantages"].abs().sum() == 0 for b in seen)  # zero-variance fill only
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["dynamic_sampling/cap_hit"] == 1 and log["dynamic_sampling/rounds"] == 2
    assert log["dynamic_sampling/dropped_frac"] == 1.0


def test_dynamic_sampling_off_is_bare_trl_bit_for_bit(clean_env, tokenizer):
    """With dynamic sampling off the harness's trainer subclass changes nothing TRL computes."""
    from trl import GRPOTrainer

    cfg = _cfg()
    prompts = _prompts(tokenizer)

    def run(make):
        trainer = make(T.build_smoke_model(tokenizer, 0))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        return [(h["loss"], h["reward"], h["completions/mean_length"]) for h in logs], params

    ours = run(lambda m: T.build_trainer(cfg, m, tokenizer, prompts, [_odd_rows_vary]))
    bare_args = T.grpo_config(cfg)
    from datasets import Dataset

    bare = run(
        lambda m: GRPOTrainer(
            model=m,
            reward_funcs=[_odd_rows_vary],
            args=bare_args,
            train_dataset=Dataset.from_list(prompts),
            processing_class=tokenizer,
        )
    )
    assert ours[0] == bare[0]
    start = dict(T.build_smoke_model(tokenizer, 0).named_parameters())
    assert any(not torch.equal(start[k], v) for k, v in ours[1].items())  # training moved them
    assert all(torch.equal(v, bare[1][k]) for k, v in ours[1].items())


def _one_generation_batch(cfg: T.Config, tokenizer) -> dict:
    prompts = _prompts(tokenizer, 2)
    trainer = T.build_trainer(
        cfg,
        T.build_smoke_model(tokenizer, 0),
        tokenizer,
        prompts,
        [lambda prompts, **_: [0.0] * len(prompts)],
    )
    trainer.model.train()
    batch = [p for p in prompts for _ in range(N)]
    return trainer._generate_and_score_completions(batch)


def test_mask_truncated_removes_truncated_completions_from_the_loss(clean_env, tokenizer):
    # The random tiny model never says <|im_end|> within 6 tokens: every completion is truncated.
    plain = _one_generation_batch(_cfg(), tokenizer)
    masked = _one_generation_batch(_cfg("--mask-truncated"), tokenizer)
    assert torch.equal(plain["completion_ids"], masked["completion_ids"])  # same samples
    assert plain["completion_mask"].sum() == 2 * N * 6 and plain["num_items_in_batch"] == 2 * N * 6
    assert masked["completion_mask"].sum() == 0 and masked["num_items_in_batch"] == 0


def test_overlong_penalty_is_dapo_soft_punishment(clean_env):
    task = T.TASKS["gsm8k"]
    funcs, weights = T.training_rewards(_cfg(), task)
    assert [f.__name__ for f in funcs] == ["correctness", "format"]  # off by default
    cfg = T.resolve_config(
        ["--smoke", "--output-dir", "o", "--max-completion-length", "32", "--overlong-buffer", "8"]
        + ["--overlong-penalty", "0.5"]
    )
    funcs, weights = T.training_rewards(cfg, task)
    assert [f.__name__ for f in funcs] == ["correctness", "format", "overlong"]
    assert weights == [1.0, 0.1, 0.5]
    # 0 up to 32 - 8 = 24 tokens, then linear down to -1 at 32 (DAPO eq. 13).
    lengths = [10, 24, 26, 28, 32]
    assert funcs[2](completion_ids=[[7] * n for n in lengths]) == [0.0, 0.0, -0.25, -0.5, -1.0]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (["--overlong-buffer", "64", "--max-completion-length", "32"], "overlong_buffer"),
        (["--overlong-buffer", "-1"], "overlong_buffer"),
        (["--overlong-penalty", "-1"], "overlong_penalty"),
        (["--dynamic-sampling-max-rounds", "0"], "dynamic_sampling_max_rounds"),
    ],
)
def test_bad_dapo_settings_are_config_errors(clean_env, bad, field):
    with pytest.raises(T.ConfigError, match=f"^{field}: must"):
        T.resolve_config(["--smoke", "--output-dir", "o", *bad])


def test_step_clock_counts_nested_time_once(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 4.0, 10.0, 12.0])  # train 0-4 with generation 1-3 inside, then eval
    monkeypatch.setattr("grpo_extensions.time.perf_counter", lambda: next(now))
    clock = StepClock()
    with clock.section("train"):
        with clock.section("generation"):
            pass
    with clock.section("eval"):
        pass
    assert dict(clock.totals) == {"generation": 2.0, "train": 2.0, "eval": 2.0}


def test_dynamic_sampling_metrics_weigh_each_round_by_its_groups(clean_env, tokenizer):
    """A refill round of one group must not weigh as much as the first round of the batch."""
    cfg = _cfg("--dynamic-sampling", "--dynamic-sampling-max-rounds", "10", "--batch-size", "8")
    trainer = T.build_trainer(
        cfg, T.build_smoke_model(tokenizer, 0), tokenizer, _prompts(tokenizer), [_odd_rows_vary]
    )
    rounds: list[tuple[int, list[float], list[int]]] = []  # (step, rewards, completion lengths)
    calculate = trainer._calculate_rewards

    def spy(inputs, prompts, completions, completion_ids_list):
        rewards = calculate(inputs, prompts, completions, completion_ids_list)
        lengths = [len(ids) for ids in completion_ids_list]
        rounds.append((trainer.state.global_step, rewards[:, 0].tolist(), lengths))
        return rewards

    trainer._calculate_rewards = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == cfg.total_steps
    differs = False
    for step, log in enumerate(logs):
        mine = [(r, n) for s, r, n in rounds if s == step]
        assert log["dynamic_sampling/rounds"] == len(mine)
        rows = [x for r, _ in mine for x in r]
        assert log["reward"] == pytest.approx(sum(rows) / len(rows))
        assert log["completions/max_length"] == max(x for _, n in mine for x in n)
        assert log["completions/min_length"] == min(x for _, n in mine for x in n)
        unweighted = sum(sum(r) / len(r) for r, _ in mine) / len(mine)
        differs |= abs(unweighted - sum(rows) / len(rows)) > 1e-6
    assert differs, "no step had rounds of different sizes and means: the test shows nothing"


def test_step_clock_waits_for_the_accelerator_at_every_boundary(monkeypatch):
    events: list[str] = []
    ticks = iter(range(100))
    monkeypatch.setattr(
        "grpo_extensions.time.perf_counter", lambda: events.append("read") or float(next(ticks))
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    clock = StepClock()
    with clock.section("train"):
        with clock.section("generation"):
            pass
    # Queued kernels finish before each reading, so they count for the section that queued them.
    assert events == ["sync", "read"] * 4
    assert dict(clock.totals) == {"generation": 1.0, "train": 2.0}


def test_train_time_covers_gradient_clipping_and_the_optimizer_step(
    clean_env, tokenizer, monkeypatch
):
    cfg = _cfg()
    trainer = T.build_trainer(
        cfg, T.build_smoke_model(tokenizer, 0), tokenizer, _prompts(tokenizer), [_odd_rows_vary]
    )
    now = [0.0]  # wall time stands still except where a step below advances it
    monkeypatch.setattr("grpo_extensions.time.perf_counter", lambda: now[0])
    clip = trainer._clip_grad_norm

    def slow_clip(model):
        now[0] += 100.0
        return clip(model)

    class SlowOptimizer(TrainerCallback):  # in the optimizer step: between these two hooks
        def on_pre_optimizer_step(self, args, state, control, **kw):
            now[0] += 10.0

    trainer._clip_grad_norm = slow_clip
    trainer.add_callback(SlowOptimizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == cfg.total_steps
    assert all(h["time/train"] == 110.0 and h["time/step"] == 110.0 for h in logs), logs


@pytest.mark.parametrize(
    ("top_k", "top_p", "kept"),
    [
        (0, 1.0, 1.0),  # no truncation
        (0, 0.9, 0.95),  # drops 0.05: the cumulative mass from below stays <= 0.1 only there
        (0, 0.75, 0.8),  # drops 0.05 and 0.15 (cumulative 0.2 <= 0.25)
        (2, 1.0, 0.8),
        (3, 0.9, 0.95),  # after top-k the smallest left is 0.15 / 0.95 > 0.1: nothing more goes
        (1, 0.5, 0.5),
        (10, 1.0, 1.0),  # k beyond the vocabulary keeps everything
    ],
)
def test_kept_log_mass_follows_the_samplers_rule(top_k, top_p, kept):
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().repeat(3, 1) + torch.tensor(
        [[0], [2], [-7]]
    )
    got = kept_log_mass(logits / 1.0, top_k, top_p, chunk=2)
    assert got.shape == (3,)
    assert torch.allclose(got, torch.full((3,), kept).log(), atol=1e-6)


def test_kept_log_mass_keeps_ties_at_the_kth_logit():
    got = kept_log_mass(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2, 1.0)
    e = torch.tensor(1.0).exp()
    assert torch.allclose(got, (3 * e / (3 * e + 1)).log())
