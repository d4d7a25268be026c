"""CPU runs take torch threads from the usable cores, say so, and let the user override it."""

from __future__ import annotations

import os

import pytest
from conftest import run_script

import train_trl_grpo as T


@pytest.fixture
def no_omp(clean_env, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return clean_env


def test_threads_follow_the_usable_cores_not_the_machine(no_omp, monkeypatch):
    # A process pinned to 3 of the machine's cores (taskset, a cgroup cpuset) gets 3 threads.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert T.torch_threads(T.resolve_config([]).cpu_threads) == (3, "usable cores")


def test_omp_num_threads_and_the_config_field_override(no_omp, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert T.torch_threads(T.resolve_config([]).cpu_threads) == (1, "OMP_NUM_THREADS")
    assert T.torch_threads(T.resolve_config(["--cpu-threads", "2"]).cpu_threads) == (
        2,
        "cpu_threads",
    )
    monkeypatch.setenv("GRPO_CPU_THREADS", "3")
    assert T.torch_threads(T.resolve_config([]).cpu_threads) == (3, "cpu_threads")


@pytest.mark.parametrize(
    ("args", "env"), [(["--cpu-threads", "-1"], {}), ([], {"OMP_NUM_THREADS": "x"})]
)
def test_bad_thread_count_is_one_line(tmp_path, args, env):
    res = run_script([*args, "--dry-run"], tmp_path, env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "thread" in lines[0].lower(), res.stderr


def test_startup_summary_names_the_thread_count_and_its_source(tmp_path):
    args = ["--smoke", "--dry-run", "--output-dir", str(tmp_path / "o")]
    res = run_script(args, tmp_path, {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "torch threads on CPU: 1 (OMP_NUM_THREADS)" in res.stdout
    res = run_script([*args, "--cpu-threads", "2"], tmp_path, {"OMP_NUM_THREADS": "1"})
    assert "torch threads on CPU: 2 (cpu_threads)" in res.stdout


def test_a_cpu_run_really_sets_torch_threads(no_omp, tmp_path):
    """--eval-only on the tiny model: torch runs with the count the summary printed."""
    import torch

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        argv = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--max-eval-samples", "1"]
        argv += ["--eval-samples", "2", "--eval-ks", "1", "--max-completion-length", "4"]
        argv += ["--output-dir", str(tmp_path / "o"), "--cpu-threads", str(want)]
        assert T.main(argv) == 0
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
