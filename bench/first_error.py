"""Seconds to the first error of the README's run command on a box with no server and no network.

The Hub is unreachable the way a machine without network sees it: HF_HUB_OFFLINE unset, the Hub
endpoint (HF_ENDPOINT) a closed local port, an empty Hugging Face cache. Each command runs in a
fresh process from a directory without .env:

    default   train_trl_grpo.py --dataset gsm8k                     first error: the vLLM server
    no-vllm   train_trl_grpo.py --dataset gsm8k --vllm-mode none    first error: the Hub
    baseline  python -c "import torch, transformers, datasets"      what loading anything costs

It prints the median seconds of each and its error line, then the default command's time against
the 15 s target and as a ratio of the baseline (below 1: it fails before the heavy imports).

    uv run python bench/first_error.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, int, str]:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    lines = res.stderr.strip().splitlines()
    return seconds, res.returncode, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_", "HF_"))}
        env.pop("TRANSFORMERS_OFFLINE", None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        env["HF_HOME"] = str(Path(tmp) / "hf_home")
        env["GRPO_OUTPUT_DIR"] = str(Path(tmp) / "out")
        if port_taken(8000):  # the default port is busy on this box: keep "no server" true
            env["GRPO_VLLM_PORT"] = str(free_port())
            print(f"port 8000 is taken here; the trainer looks at {env['GRPO_VLLM_PORT']} instead")
        script = [sys.executable, str(ROOT / "train_trl_grpo.py"), "--dataset", "gsm8k"]
        commands = {
            "default": script,
            "no-vllm": [*script, "--vllm-mode", "none"],
            "baseline": [sys.executable, "-c", "import torch, transformers, datasets"],
        }
        medians = {}
        for name, cmd in commands.items():
            runs = [timed(cmd, env, tmp) for _ in range(args.repeat)]
            medians[name] = statistics.median(s for s, _, _ in runs)
            _, rc, line = runs[-1]
            print(f"{name:9s} {medians[name]:6.2f} s  exit {rc}  {line[:160]}")
    verdict = "met" if medians["default"] <= TARGET_S else "MISSED"
    print(f"default command: {medians['default']:.2f} s to its first error", end=" ")
    print(f"(target <= {TARGET_S} s: {verdict})")
    print(f"ratio default / heavy-import baseline: {medians['default'] / medians['baseline']:.2f}x")


if __name__ == "__main__":
    main()
