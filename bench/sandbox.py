"""Throughput of the code sandbox vs. one plain `python -c` subprocess per program.

Both sides score the same MBPP-style programs (a reference solution plus its 3 asserts, from
tests/fixtures/mbpp/test.jsonl) in the same run, with the same number of concurrent workers
(default: one per CPU). The subprocess baseline has no isolation at all.

    uv run python bench/sandbox.py [--programs 512] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from code_sandbox import Program, Sandbox  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "mbpp" / "test.jsonl"


def load_programs(n: int) -> list[Program]:
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    base = [Program(r["code"], r["test_list"][:3], r["test_setup_code"]) for r in rows]
    return [base[i % len(base)] for i in range(n)]


def run_subprocess(prog: Program, timeout: float) -> bool:
    script = "\n".join([prog.code, prog.setup, *prog.tests])
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    workers = args.workers or len(os.sched_getaffinity(0))
    programs = load_programs(args.programs)

    t0 = time.perf_counter()
    sandbox = Sandbox(workers=workers, timeout=args.timeout)
    startup = time.perf_counter() - t0
    print(sandbox.describe())
    print(f"sandbox startup ({workers} workers): {startup * 1000:.0f} ms")
    try:
        sandbox.run(programs[:32])  # warm-up: page cache, plan cache
        t0 = time.perf_counter()
        results = sandbox.run(programs)
        sb_time = time.perf_counter() - t0
    finally:
        sandbox.close()
    sb_ok = sum(r.status == "passed" for r in results)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        plain = list(pool.map(lambda p: run_subprocess(p, args.timeout), programs))
    sp_time = time.perf_counter() - t0

    n = len(programs)
    sb_rate, sp_rate = n / sb_time, n / sp_time
    print(f"programs: {n} MBPP reference solutions x 3 asserts, {workers} concurrent workers")
    print(f"sandbox:    {sb_rate:7.1f} programs/s  ({sb_ok}/{n} passed)")
    print(f"subprocess: {sp_rate:7.1f} programs/s  ({sum(plain)}/{n} passed, no isolation)")
    print(f"one 512-completion batch through the sandbox: {512 / sb_rate:.2f} s")
    print(f"load average over the last minute: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ratio sandbox/subprocess: {sb_rate / sp_rate:.2f}x")


if __name__ == "__main__":
    main()
