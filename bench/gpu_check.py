"""One-GPU check of the training path at the real Qwen2.5-1.5B size, through the harness's code.

The model is the Qwen2.5-1.5B architecture (its published config, hard-coded below) with random
weights, saved with save_pretrained next to the bundled Qwen2.5 tokenizer so that the harness's
own load_model/load_tokenizer read it back: nothing is downloaded. Training then goes through
resolve_config, load_rows/to_examples (the bundled GSM8K rows), make_reward_funcs (math-verify
in the grader pool), build_trainer and trainer.train(), with vllm_mode=none (transformers
generation), --dtype bf16 (fp32 master weights under bf16 autocast), lr 3e-6, the default
micro-batch (batch_size from Config) at a realistic shape (4 x 16 micro-steps = 64 completions of
up to 512 tokens per step, 8 per prompt) and a short run: `--warmup` steps, then `--steps`
measured steps. A random-init model never solves GSM8K, so its correctness and format rewards are
all 0 and would give no gradient: one more reward, the share of even token ids in a completion,
varies within every group.

Figures (medians and sums over the measured steps only):
  step s           wall time of one optimizer step, on_step_begin -> on_step_end: generation of
                   batch_size * grad_accum completions, rewards, forward/backward over the
                   micro-batches, optimizer step
  completion tok/s completion tokens generated (up to and including EOS, no padding) / step time
  total tok/s      prompt + completion tokens processed (no padding) / step time
  generate tok/s   completion tokens / time spent inside model.generate
  peak GiB         torch.cuda.max_memory_allocated over the whole run (and max reserved)
  moved            share of all parameter entries (and of RMSNorm weights alone) that differ
                   from the start after the run: must be >= 0.95, else the check fails (exit 1).
                   An Adam step at lr 3e-6 is below half a bf16 ulp of most weights, so this
                   is what shows that the fp32 master weights work.

The last line is a one-line summary; the same figures go to $OUT/gpu_check.json when OUT is set,
else to <out-dir>/gpu_check.json. Run it through bench/gpu_check.sh. `--cpu-test` shrinks the
model to 2 small layers and the run to a few short steps so the whole path runs on a CPU (bf16
autocast on CPU too, so the parameter check runs there as well).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

for _name in [k for k in os.environ if k.startswith("GRPO_")]:
    del os.environ[_name]  # configured by this script's flags only
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import config_cli  # noqa: E402
import train_trl_grpo as harness  # noqa: E402
from grpo_extensions import TIME_KEYS  # noqa: E402

# No .env lookup (it walks up parent directories): this check reads only the repository.
config_cli.find_dotenv = lambda *a, **k: os.devnull

# Qwen/Qwen2.5-1.5B-Instruct config.json, as published.
QWEN25_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151645,
)
# --cpu-test: the same vocabulary and layout, two small layers.
CPU_TEST = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


def save_random_model(model_dir: Path, cpu_test: bool, dtype) -> dict:
    """Random-init Qwen2.5-1.5B (or the tiny variant) and the bundled tokenizer, in model_dir."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "qwen2.5-tokenizer"))
    arch = {**QWEN25_1_5B, **(CPU_TEST if cpu_test else {})}
    config = Qwen2Config(**arch, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cpu" if cpu_test else "cuda"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the training dtype, on the device
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.dtype = dtype
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    if not cpu_test:
        torch.cuda.empty_cache()
    return {"params": n_params, **arch}


def even_token_share(completion_ids, **_) -> list[float]:
    """A reward a random-init model gets partly right: it varies within every group."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def moved_share(model, start: dict) -> tuple[float, float]:
    """Shares of parameter entries, all and RMSNorm weights only, that differ from `start`."""
    moved = total = norm_moved = norm_total = 0
    for name, p in model.named_parameters():
        diff = int((p.detach().cpu() != start[name]).sum())
        moved, total = moved + diff, total + p.numel()
        if "norm" in name:
            norm_moved, norm_total = norm_moved + diff, norm_total + p.numel()
    return moved / total, norm_moved / max(1, norm_total)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-test", action="store_true", help="tiny model, short run, on CPU")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 3; cpu 2)")
    ap.add_argument("--warmup", type=int, default=1, help="steps before the measured ones")
    ap.add_argument("--grad-accum", type=int, default=None, help="default 16; cpu 2")
    ap.add_argument("--num-generations", type=int, default=None, help="default 8; cpu 4")
    ap.add_argument("--completion-length", type=int, default=None, help="default 512; cpu 16")
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "gpu_check"))
    args = ap.parse_args()
    cpu = args.cpu_test
    steps = args.steps if args.steps is not None else (2 if cpu else 3)
    grad_accum = args.grad_accum if args.grad_accum is not None else (2 if cpu else 16)
    length = args.completion_length or (16 if cpu else 512)
    num_generations = args.num_generations or (4 if cpu else 8)

    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    if not cpu and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch (use --cpu-test for the CPU path)")
        return 2
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    print(
        f"device {device}; python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}",
        flush=True,
    )
    out_dir = Path(args.out_dir)
    model_dir = out_dir / "model"
    t0 = time.perf_counter()
    arch = save_random_model(model_dir, cpu, torch.bfloat16)  # as Hub checkpoints are
    print(
        f"random-init model ({arch['params'] / 1e9:.3f} B parameters, "
        f"{arch['num_hidden_layers']} layers) saved to {model_dir} in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    cfg = harness.resolve_config(
        [
            "--model-id",
            str(model_dir),
            "--dataset",
            "gsm8k",
            "--data-dir",
            str(FIXTURES / "gsm8k"),
            "--vllm-mode",
            "none",
            "--dtype",
            "bf16",
            "--lr",
            str(args.lr),
            "--grad-accum-steps",
            str(grad_accum),
            "--num-generations",
            str(num_generations),
            "--max-completion-length",
            str(length),
            "--total-steps",
            str(args.warmup + steps),
            "--save-steps",
            str(args.warmup + steps + 1000),  # no checkpoint inside the run
            "--eval-samples",
            "0",
            "--report-to",
            "none",
            "--output-dir",
            str(out_dir / "run"),
        ]
    )
    task = harness.TASKS[cfg.dataset]
    tok = harness.load_tokenizer(cfg)
    rows = harness.load_rows(cfg, task, "train")
    examples = harness.to_examples(cfg, task, tok, rows, cfg.max_train_samples)
    t0 = time.perf_counter()
    model = harness.load_model(cfg, tok)
    load_s = time.perf_counter() - t0
    if not cpu:
        model = model.cuda()
    print(
        f"load_model: {load_s:.1f} s, dtype {next(model.parameters()).dtype}, attention "
        f"{model.config._attn_implementation}; {len(examples)} prompts; batch_size "
        f"{cfg.batch_size} x grad_accum {cfg.grad_accum_steps} = "
        f"{cfg.batch_size * cfg.grad_accum_steps} completions per step "
        f"({cfg.num_generations} per prompt), max_completion_length {cfg.max_completion_length}, "
        f"gradient_checkpointing {cfg.gradient_checkpointing}, lr {cfg.lr:g}",
        flush=True,
    )
    start_params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}

    def sync() -> None:
        if not cpu:
            torch.cuda.synchronize()

    # Count what generation does: time inside model.generate, prompt tokens (attention mask) and
    # completion tokens up to and including the first EOS, as TRL counts them.
    gen = {"s": 0.0, "prompt": 0, "completion": 0}
    eos_ids = []  # the trainer's own list, filled in once it exists
    original_generate = model.generate

    def timed_generate(*a, **kw):
        sync()
        start = time.perf_counter()
        out = original_generate(*a, **kw)
        sync()
        gen["s"] += time.perf_counter() - start
        mask = kw["attention_mask"]
        completion = out[:, kw["input_ids"].shape[1] :].cpu()
        is_eos = torch.isin(completion, torch.tensor(eos_ids))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion.shape[1])
        gen["prompt"] += int(mask.sum())
        gen["completion"] += int(first.sum())
        return out

    model.generate = timed_generate

    records: list[dict] = []

    class Meter(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t = time.perf_counter()
            self.g = dict(gen)

        def on_step_end(self, a, state, control, **kw):
            sync()
            # save_strategy="steps" also checkpoints the last step (model and optimizer, ~9 GB
            # at this size): not what this check measures, so skip it.
            control.should_save = False
            records.append(
                {
                    "step": state.global_step,
                    "s": time.perf_counter() - self.t,
                    "generate_s": gen["s"] - self.g["s"],
                    "prompt_tokens": gen["prompt"] - self.g["prompt"],
                    "completion_tokens": gen["completion"] - self.g["completion"],
                }
            )
            r = records[-1]
            print(
                f"step {r['step']}: {r['s']:.2f} s (generate {r['generate_s']:.2f} s), "
                f"{r['completion_tokens']} completion + {r['prompt_tokens']} prompt tokens",
                flush=True,
            )

    funcs = [*harness.make_reward_funcs(cfg, task), even_token_share]
    weights = [*harness.reward_weights(cfg), 1.0]
    trainer = harness.build_trainer(cfg, model, tok, examples, funcs, weights, [Meter()])
    eos_ids.extend(trainer.eos_token_ids)
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        harness.close_graders()
    train_s = time.perf_counter() - t0
    moved, norm_moved = moved_share(model, start_params)

    measured = records[args.warmup :]
    if not measured:
        print("error: no measured steps")
        return 1
    total_s = sum(r["s"] for r in measured)
    comp = sum(r["completion_tokens"] for r in measured)
    prompt = sum(r["prompt_tokens"] for r in measured)
    gen_s = sum(r["generate_s"] for r in measured)
    logged = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    trl_comp = [
        h["completions/mean_length"] * cfg.batch_size * cfg.grad_accum_steps for h in logged
    ]
    # The trainer's own time breakdown (grpo_extensions.StepClock) against this script's
    # synchronized measurements: on a GPU its sections synchronize too, so the logged generation
    # time should match the one measured around model.generate, and the parts should add up to
    # the step.
    logged_time = {h["step"]: h for h in trainer.state.log_history if "time/step" in h}
    breakdown = []
    for r in measured:
        h = logged_time.get(r["step"], {})
        parts = sum(h.get(f"time/{k}", 0.0) for k in TIME_KEYS)
        breakdown.append(
            {
                "step": r["step"],
                **{k: v for k, v in h.items() if k.startswith("time/")},
                "parts_over_step": parts / h["time/step"] if h.get("time/step") else None,
                "logged_over_measured_generation": h["time/generation"] / r["generate_s"]
                if h.get("time/generation") and r["generate_s"]
                else None,
            }
        )
    result = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "model": "Qwen2.5-1.5B architecture, random init"
        + (" (--cpu-test: 2 small layers)" if cpu else ""),
        "params": arch["params"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compute_dtype": "bfloat16 autocast" if trainer.args.bf16 else "float32",
        "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "batch_size": cfg.batch_size,
        "grad_accum_steps": cfg.grad_accum_steps,
        "num_generations": cfg.num_generations,
        "completions_per_step": cfg.batch_size * cfg.grad_accum_steps,
        "max_completion_length": cfg.max_completion_length,
        "warmup_steps": args.warmup,
        "measured_steps": len(measured),
        "step_s_median": statistics.median(r["s"] for r in measured),
        "step_s_mean": total_s / len(measured),
        "generate_s_per_step": gen_s / len(measured),
        "completion_tokens_per_step": comp / len(measured),
        "prompt_tokens_per_step": prompt / len(measured),
        "completion_tok_per_s": comp / total_s,
        "total_tok_per_s": (comp + prompt) / total_s,
        "generate_tok_per_s": comp / gen_s if gen_s else None,
        "trl_completion_tokens_per_step": trl_comp,
        "train_s": train_s,
        "lr": cfg.lr,
        "params_moved_share": moved,
        "norm_weights_moved_share": norm_moved,
        "peak_mem_allocated_gib": None if cpu else torch.cuda.max_memory_allocated() / 2**30,
        "peak_mem_reserved_gib": None if cpu else torch.cuda.max_memory_reserved() / 2**30,
        "steps": records,
        "time_breakdown": breakdown,
    }
    out_json = Path(os.environ["OUT"]) if os.environ.get("OUT") else out_dir
    out_json.mkdir(parents=True, exist_ok=True)
    (out_json / "gpu_check.json").write_text(json.dumps(result, indent=1))
    mem = (
        "n/a (cpu)"
        if cpu
        else f"{result['peak_mem_allocated_gib']:.1f} GiB (reserved "
        f"{result['peak_mem_reserved_gib']:.1f})"
    )
    print(f"figures in {out_json / 'gpu_check.json'}")
    print(
        f"gpu_check: {device} | step {result['step_s_median']:.2f} s median of {len(measured)} | "
        f"{result['completion_tok_per_s']:.0f} completion tok/s, "
        f"{result['total_tok_per_s']:.0f} total tok/s (prompt+completion), "
        f"generate {result['generate_tok_per_s']:.0f} tok/s | peak mem {mem} | "
        f"params moved {moved:.2%} (norm weights {norm_moved:.2%}) at lr {cfg.lr:g}",
        flush=True,
    )
    ratios = [b["parts_over_step"] for b in breakdown if b["parts_over_step"]]
    gen_ratios = [
        b["logged_over_measured_generation"]
        for b in breakdown
        if b["logged_over_measured_generation"]
    ]
    if ratios and gen_ratios:
        print(
            f"time breakdown: parts / time/step {min(ratios):.3f}-{max(ratios):.3f}; logged "
            f"time/generation / synchronized generate time {min(gen_ratios):.3f}-"
            f"{max(gen_ratios):.3f} (generation includes tokenizing and decoding: >= 1)",
            flush=True,
        )
    if moved < 0.95 or norm_moved < 0.95:
        print(f"FAIL: under 95 % of the parameters moved in bf16 mixed precision at lr {cfg.lr:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
