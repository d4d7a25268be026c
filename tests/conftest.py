"""Shared test setup: fully offline, no experiment trackers, the repo root importable."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Tests never reach the Hub: every model, tokenizer and data set comes from tests/fixtures.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GRPO_* variables from the caller's shell, and a cwd without a .env file."""
    for key in list(os.environ):
        if key.startswith("GRPO_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen2.5 tokenizer, bundled in the repo."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "qwen2.5-tokenizer"))


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny random-init Qwen2 (hidden 128, 4 heads of 32, 2 layers) over the real vocabulary."""
    import train_trl_grpo as T

    return T.build_smoke_model(tokenizer, seed=0)


def run_script(
    args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """train_trl_grpo.py as a user runs it: a fresh process, no GRPO_* from the caller's shell,
    and (unless `cwd` says otherwise) a working directory with no .env file."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    full.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run(
            [sys.executable, str(ROOT / "train_trl_grpo.py"), *args],
            cwd=cwd or tmp,
            env=full,
            capture_output=True,
            text=True,
            timeout=300,
        )


def terminal_job() -> None:
    """preexec_fn for a launcher that a test stops with Ctrl-C: a shell resets SIGINT and SIGQUIT
    for the job it runs in the foreground, whatever its own parent ignored (a test run started in
    the background starts with both ignored, and bash cannot trap a signal ignored on entry)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_time(monkeypatch: pytest.MonkeyPatch, module) -> list[float]:
    """Replace `module.time` so that retry back-off and polling cost no wall time; returns the
    sleeps asked for."""
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(0.01)

    fake = types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic, time=time.time)
    monkeypatch.setattr(module, "time", fake)
    return sleeps


def run_unprivileged(script: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -c script` as uid/gid 65534 (nobody), from /, with PATH (and `env`) alone. The
    interpreter may live under a 0700 home (e.g. pyenv in /root): the ambient
    CAP_DAC_READ_SEARCH lets that user start it, and the sandbox's workers drop it."""
    cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    cmd += ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]
    return subprocess.run(
        [*cmd, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd="/",
    )
