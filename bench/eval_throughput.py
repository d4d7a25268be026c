"""Eval completions/s on a real vLLM server: the harness's request pattern vs one request at a time.

Starts `trl vllm-serve` through `run_algo.sh SERVE_ONLY=1 VLLM_DEVICE=cpu` on a tiny random Qwen2
(the `--smoke` model, saved to a temporary directory with the real Qwen2.5 tokenizer), then
generates the same evaluation (GSM8K fixture prompts, n completions each, the harness's sampling
fields) two ways, interleaved over rounds so that machine drift hits both:

* harness: `vllm_server_generate` as evaluation uses it (requests of 16 prompts, up to 8 in
  flight, so the server always has the next batch queued);
* sequential: the same requests, one at a time (the harness before it sent them concurrently).

Prints completions/s per round and the medians, then the ratio harness / sequential, last.
Needs vLLM's CPU build: run it in the tier's environment.

    scripts/vllm_cpu_env.sh && .venv-vllm-cpu/bin/python bench/eval_throughput.py \
        [--prompts 128] [--n 4] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import train_trl_grpo as ttg  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--start-timeout", type=int, default=1200)
    args = ap.parse_args()

    cfg = ttg.resolve_config(["--smoke", "--max-completion-length", str(args.max_tokens)])
    task = ttg.TASKS["gsm8k"]
    tok = ttg.load_tokenizer(cfg)
    rows = ttg.load_rows(cfg, task, "test")
    examples = ttg.to_examples(cfg, task, tok, rows, 0)
    prompts = [examples[i % len(examples)]["prompt"] for i in range(args.prompts)]
    sp = ttg.sampling_params(cfg)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "tiny-qwen2")
        ttg.build_smoke_model(tok, cfg.seed).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        bindir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
            "SERVE_ONLY": "1",
            "VLLM_DEVICE": "cpu",
            "VLLM_HOST": "127.0.0.1",
            "VLLM_BIND_HOST": "127.0.0.1",
            "VLLM_PORT": str(port),
            "MODEL_ID": model_dir,
            "VLLM_SERVE_ARGS": "--max-model-len 512",
            "HEALTH_TIMEOUT": str(args.start_timeout),
            "LOG_DIR": str(Path(tmp) / "logs"),
        }
        log = (Path(tmp) / "launcher.log").open("w")
        proc = subprocess.Popen(
            [str(ROOT / "run_algo.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            t0 = time.monotonic()
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() - t0 > args.start_timeout:
                    print(Path(log.name).read_text()[-3000:], file=sys.stderr)
                    print("error: the CPU server did not come up", file=sys.stderr)
                    return 1
                time.sleep(1)
            print(f"server healthy after {time.monotonic() - t0:.0f} s", flush=True)
            ways = {
                "sequential": ttg.vllm_server_generate(url, model_dir, in_flight=1),
                "harness": ttg.vllm_server_generate(url, model_dir),
            }
            ways["harness"](prompts[:16], args.n, sp)  # warm-up
            rates: dict[str, list[float]] = {k: [] for k in ways}
            total = len(prompts) * args.n
            for r in range(args.rounds):
                order = list(ways) if r % 2 == 0 else list(reversed(ways))
                for name in order:
                    t = time.monotonic()
                    ways[name](prompts, args.n, sp)
                    rate = total / (time.monotonic() - t)
                    rates[name].append(rate)
                    print(f"round {r + 1} {name:10s} {rate:7.1f} completions/s", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"{len(prompts)} prompts x {args.n} completions, max {args.max_tokens} tokens: "
        f"median sequential {med['sequential']:.1f}/s, harness {med['harness']:.1f}/s"
    )
    print(f"ratio harness / sequential: {med['harness'] / med['sequential']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
