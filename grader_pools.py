"""The graders' worker pools, started on first use and closed once at exit (train_trl_grpo.main).
Model output is only ever run or parsed for grading inside these workers: math-verify in
math_grader.py's killable processes, code in code_sandbox.py's sandbox. No torch here."""

from __future__ import annotations

import os

import math_grader
from errors import ConfigError

_POOLS: dict[str, object] = {}


def math_pool(workers: int, timeout: float) -> math_grader.MathGrader:
    if "math" not in _POOLS:
        _POOLS["math"] = math_grader.MathGrader(workers=workers, timeout=timeout)
    return _POOLS["math"]


def sandbox_worker_count(requested: int) -> int:
    """`requested`, or (0) the CPUs this process may use (affinity, not the machine's count) shared
    among the trainer processes on this machine: every rank starts its own sandbox."""
    if requested:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def sandbox(workers: int, timeout: float, unsafe: bool):
    """The code sandbox; it says once which isolation layers it got, or refuses to start."""
    if "code" not in _POOLS:
        import code_sandbox

        try:
            box = code_sandbox.Sandbox(
                workers=sandbox_worker_count(workers), timeout=timeout, unsafe=unsafe
            )
        except code_sandbox.SandboxUnavailable as e:
            raise ConfigError(str(e)) from None
        print(box.describe(), flush=True)
        _POOLS["code"] = box
    return _POOLS["code"]


def close_graders() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
