"""Per-step time of the harness vs. a bare TRL GRPOTrainer script with the same config.

Both sides train the `--smoke` model (a tiny random-init Qwen2 over the Qwen2.5 vocabulary, same
seed, same weights) on the same GSM8K fixture prompts with the same GRPO numbers, on CPU, in this
one process, interleaved (bare, harness, harness, bare, ...) so that machine drift hits both.

* harness: the real path of train_trl_grpo.py: resolve_config(["--smoke", ...]), load_tokenizer,
  load_rows/to_examples, build_smoke_model, make_reward_funcs (math-verify in the isolated
  grader pool), build_trainer(...), run_guards.attach(...) with the stall watchdog, trainer.train().
* bare: what a TRL user would write: GRPOConfig(...) with the same numbers, the prompts built
  with the tokenizer's chat template, and two reward functions that call math_verify.parse/verify
  in-process against the gold and check for a \\boxed{} answer.

A step is one optimizer step (generation, rewards, forward/backward over the accumulated
micro-batches, optimizer): wall time from on_step_begin to on_step_end. "cpu s" is the CPU time
that this process and its children (the grader workers) used in the same window: on a machine
shared with other jobs it moves much less than wall time (one torch thread by default, and idle
OpenMP threads sleep). The first `--warmup` steps of every run are discarded; medians are over
the rest.

    uv run python bench/overhead.py [--rounds 2] [--steps 8] [--warmup 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

for _name in [k for k in os.environ if k.startswith("GRPO_")]:
    del os.environ[_name]  # the benchmark is configured by its own flags only
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning, so CPU time means work even on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import config_cli  # noqa: E402
import train_trl_grpo as harness  # noqa: E402

# No .env file either: both sides must see exactly the numbers below.
config_cli.find_dotenv = lambda *a, **k: os.devnull

# Same words as the harness's defaults, written out as a user would.
SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BOXED = re.compile(r"\\boxed\s*\{")


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its children (the grader workers too)."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system  # + reaped children
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # exited in between: counted in children_* once reaped
            continue
        total += c.user + c.system
    return total


class StepTimer:
    """TrainerCallback recording wall time and the process tree's CPU time around every step."""

    def __init__(self) -> None:
        self.begin: list[float] = []
        self.end: list[float] = []
        self.cpu_begin: list[float] = []
        self.cpu_end: list[float] = []

    def make(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.cpu_begin.append(tree_cpu_seconds())
                timer.begin.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                timer.end.append(time.perf_counter())
                timer.cpu_end.append(tree_cpu_seconds())

        return _CB()

    @staticmethod
    def no_final_checkpoint():
        """save_strategy="steps" also checkpoints the last step; the bare side saves nothing."""
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                control.should_save = False

        return _CB()

    def steps(self, warmup: int) -> list[float]:
        return [e - b for b, e in zip(self.begin, self.end, strict=True)][warmup:]

    def cpu(self, warmup: int) -> list[float]:
        return [e - b for b, e in zip(self.cpu_begin, self.cpu_end, strict=True)][warmup:]


def harness_argv(args, out_dir: str) -> list[str]:
    return [
        "--smoke",
        "--dataset",
        "gsm8k",
        "--eval-samples",
        "0",
        "--total-steps",
        str(args.steps),
        "--max-completion-length",
        str(args.completion_length),
        "--save-steps",
        str(args.steps + 1000),  # no checkpoint inside the run, like save_strategy="no"
        "--output-dir",
        out_dir,
        "--report-to",
        "none",
    ]


def run_harness(args, out_dir: str, timer: StepTimer):
    cfg = harness.resolve_config(harness_argv(args, out_dir))
    task = harness.TASKS[cfg.dataset]
    tok = harness.load_tokenizer(cfg)
    rows = harness.load_rows(cfg, task, "train")
    examples = harness.to_examples(cfg, task, tok, rows, cfg.max_train_samples)
    model = harness.build_smoke_model(tok, cfg.seed)
    funcs = harness.make_reward_funcs(cfg, task)
    callbacks = [timer.make(), timer.no_final_checkpoint()]
    trainer = harness.build_trainer(
        cfg, model, tok, examples, funcs, harness.reward_weights(cfg), callbacks
    )
    # The run guards on, as train_trl_grpo.py runs them: health checks and the stall watchdog.
    max_reward = cfg.correctness_weight + cfg.format_weight
    harness.run_guards.attach(trainer, cfg.health, max_reward, [], cfg.eval_every)  # no vLLM here
    harness.run_guards.start_watchdog(cfg.stall_timeout, out_dir)
    try:
        trainer.train()
    finally:
        harness.run_guards.stop_watchdog()
        harness.close_graders()
    return cfg, trainer, examples


def bare_config(cfg, out_dir: str):
    """What a TRL user writes: the harness's numbers as plain GRPOConfig arguments."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,  # TRL's default would be linear decay
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        max_steps=cfg.total_steps,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is True
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        # The harness sets every sampling field, as its evaluation requests do; TRL's defaults
        # are min_p None (off) and repetition_penalty 1.0, so these two change nothing sampled.
        min_p=0.0,
        repetition_penalty=1.0,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        reward_weights=[cfg.correctness_weight, cfg.format_weight],
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        # Neither changes a step: kept equal so the config check compares what does.
        save_total_limit=cfg.save_total_limit or None,
        ddp_timeout=cfg.ddp_timeout,
        logging_steps=cfg.logging_steps,
    )


def run_bare(cfg, out_dir: str, timer: StepTimer):
    from datasets import Dataset
    from math_verify import parse, verify
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from models import build_smoke_model

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "qwen2.5-tokenizer"))
    with (FIXTURES / "gsm8k" / "train.jsonl").open() as fh:
        rows = [json.loads(line) for line in fh if line.strip()][: cfg.max_train_samples]

    def prompt(question: str) -> str:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{question}\n\n{INSTRUCTION}"},
        ]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    data = [
        {
            "prompt": prompt(r["question"]),
            "answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", ""),
        }
        for r in rows
    ]

    def correctness(completions, answer, **kwargs):
        pairs = zip(completions, answer, strict=True)
        return [float(verify(parse(f"${a}$"), parse(c))) for c, a in pairs]

    def boxed_format(completions, **kwargs):
        return [1.0 if BOXED.search(c) else 0.0 for c in completions]

    # The same tiny model --smoke builds (its architecture is not what is measured).
    model = build_smoke_model(tok, cfg.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[correctness, boxed_format],
        args=bare_config(cfg, out_dir),
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
        callbacks=[timer.make()],
    )
    trainer.train()
    return trainer, data, init


def check_same_setup(cfg, h_examples, b_data, b_init, tok, out_dir: str) -> list[str]:
    """The two sides must differ only in the code around TRL: same config, prompts, weights."""
    import torch

    notes = []
    if [e["prompt"] for e in h_examples] != [d["prompt"] for d in b_data]:
        raise SystemExit("prompts differ between the harness and the bare script")
    if [e["gold"] for e in h_examples] != [d["answer"] for d in b_data]:
        notes.append("golds differ (harness extraction vs split on ####)")
    h_init = harness.build_smoke_model(tok, cfg.seed).state_dict()
    if h_init.keys() != b_init.keys() or any(not torch.equal(h_init[k], b_init[k]) for k in h_init):
        raise SystemExit("initial weights differ between the harness and the bare script")
    h_args = harness.grpo_config(cfg, harness.reward_weights(cfg)).to_dict()
    b_args = bare_config(cfg, out_dir).to_dict()
    ignore = {"output_dir", "run_name", "logging_dir", "save_strategy", "save_steps"}
    # vllm_* settings are unused with use_vllm=False.
    diff = sorted(
        k
        for k in h_args.keys() | b_args.keys()
        if k not in ignore and not k.startswith("vllm_") and h_args.get(k) != b_args.get(k)
    )
    if diff:
        raise SystemExit(
            "GRPOConfig differs: "
            + ", ".join(f"{k}: harness {h_args.get(k)!r} bare {b_args.get(k)!r}" for k in diff)
        )
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="bare+harness pairs, interleaved")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of a run")
    ap.add_argument("--completion-length", type=int, default=48, help="max_completion_length")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust to other jobs' load)"
    )
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    results: list[tuple[str, int, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="grpo-overhead-") as tmp:
        cfg = harness.resolve_config(harness_argv(args, tmp))
        print(
            f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; per run {args.steps} steps ({args.warmup} warm-up), "
            f"{cfg.batch_size} x {cfg.grad_accum_steps} completions per step "
            f"({cfg.num_generations} per prompt), max_completion_length "
            f"{cfg.max_completion_length}; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        checked = False
        for rnd in range(1, args.rounds + 1):
            # ABBA order (bare, harness, harness, bare, ...) cancels a linear drift.
            for side in ("bare", "harness") if rnd % 2 else ("harness", "bare"):
                timer = StepTimer()
                out = str(Path(tmp) / f"{side}-{rnd}")
                t0 = time.perf_counter()
                if side == "bare":
                    _, b_data, b_init = run_bare(cfg, out, timer)
                else:
                    h_cfg, h_trainer, h_examples = run_harness(args, out, timer)
                print(
                    f"[{side} run {rnd}: {len(timer.end)} steps in "
                    f"{time.perf_counter() - t0:.1f} s]",
                    flush=True,
                )
                results.append((side, rnd, timer.steps(args.warmup), timer.cpu(args.warmup)))
            if not checked:
                notes = check_same_setup(
                    h_cfg, h_examples, b_data, b_init, h_trainer.processing_class, tmp
                )
                checked = True
                print("same prompts, initial weights and GRPOConfig on both sides", *notes)

    def row(label: str, wall: list[float], cpu: list[float]) -> str:
        return (
            f"{label:<12}{len(wall):>6}{statistics.median(wall):>10.3f}{min(wall):>9.3f}"
            f"{max(wall):>9.3f}{statistics.median(cpu):>11.3f}"
        )

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'side / run':<12}{'steps':>6}{'median s':>10}{'min s':>9}{'max s':>9}{'cpu s':>11}")
    for side, rnd, wall, cpu in results:
        print(row(f"{side} {rnd}", wall, cpu))
    med = {}
    for side in ("bare", "harness"):
        wall = [x for sd, _, w, _ in results if sd == side for x in w]
        cpu = [x for sd, _, _, c in results if sd == side for x in c]
        med[side] = (statistics.median(wall), statistics.median(cpu))
        print(row(f"{side} all", wall, cpu))
    print(f"cpu ratio harness/bare: {med['harness'][1] / med['bare'][1]:.2f}x")
    print(f"ratio harness/bare: {med['harness'][0] / med['bare'][0]:.2f}x")


if __name__ == "__main__":
    main()
