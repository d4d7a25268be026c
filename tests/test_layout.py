"""The layout a reader relies on: one script that imports its plumbing, never the reverse; tasks
that own their grading; launchers whose examples the real trainer parser accepts; no secret in
what a run prints or saves."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_trl_grpo as T

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
WORKER_MODULES = ("code_sandbox", "math_grader", "grader_pools")


def project_imports(module: str) -> set[str]:
    """The project's own modules that `module` imports, at top level or inside functions."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_no_module_imports_the_script_and_there_is_no_import_cycle():
    graph = {m: project_imports(m) for m in MODULES}
    assert not [m for m, deps in graph.items() if "train_trl_grpo" in deps]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_worker_process_modules_import_no_torch():
    for m in WORKER_MODULES:
        tree = ast.parse((ROOT / f"{m}.py").read_text())
        heavy = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        assert not {h for h in heavy if h and h.split(".")[0] in ("torch", "transformers", "trl")}


def test_the_script_stays_readable_and_never_asks_which_task_it_is():
    text = (ROOT / "train_trl_grpo.py").read_text()
    assert len(text.splitlines()) <= 1200
    assert not re.search(r"\bkind\b", text)  # a task carries its grading; no branches on it
    assert not re.search(r"\.name\s*==|==\s*[\"'](gsm8k|math|mbpp)[\"']", text.split("TASKS")[-1])


def test_every_task_grades_formats_and_votes_through_its_own_functions():
    for task in T.TASKS.values():
        assert callable(task.grade) and callable(task.well_formed)
        assert task.vote_key is None or callable(task.vote_key)
    key = T.TASKS["gsm8k"].vote_key
    assert key("so \\boxed{18.00}") == key("The answer is \\boxed{\\$18}") == "18"
    assert T.TASKS["mbpp"].well_formed("```python\ndef f():\n    return 1\n```")
    assert not T.TASKS["mbpp"].well_formed("no code")


def test_config_fields_flag_lists_exactly_the_config_fields():
    out = subprocess.run(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), "--config-fields"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out == [f.name for f in T.dataclasses.fields(T.Config)]


def test_eval_ks_are_parsed_once_into_a_sorted_tuple():
    cfg = T.resolve_config(["--eval-samples", "8", "--eval-ks", "4, 1,4"])
    assert cfg.eval_ks == (1, 4)
    with pytest.raises(T.ConfigError, match="eval_ks: cannot parse"):
        T.resolve_config(["--eval-ks", "1,two"])


# ---------------------------------------------------------------- launchers' --help examples
def help_examples(script: str) -> list[str]:
    text = subprocess.run(
        ["bash", str(ROOT / script), "-h"], capture_output=True, text=True, check=True
    ).stdout
    lines = text.split("Examples:\n", 1)[1].splitlines()
    examples = [line.split("#", 1)[0].strip() for line in lines if line.startswith("  ")]
    assert examples
    return examples


def trainer_commands(output: str) -> list[tuple[dict[str, str], list[str]]]:
    """(GRPO_* environment, flags) of every trainer command a DRY_RUN printed."""
    found = []
    for line in output.splitlines():
        words = shlex.split(line) if "train_trl_grpo.py" in line else []
        if words and not line.startswith("#"):
            env = dict(w.split("=", 1) for w in words if re.match(r"GRPO_\w+=", w))
            found.append((env, words[words.index("train_trl_grpo.py") + 1 :]))
    return found


@pytest.mark.parametrize("script", ["run_algo.sh", "run_sweep.sh"])
def test_every_help_example_passes_the_real_trainer_parser(script, monkeypatch):
    checked = 0
    for example in help_examples(script):
        words = shlex.split(example)
        at = next(i for i, w in enumerate(words) if w.endswith(script))
        env = dict(w.split("=", 1) for w in words[:at])
        env.setdefault("GPUS", "0,1,2,3,4,5,6,7")  # no nvidia-smi here: the box of the example
        run = subprocess.run(
            ["bash", str(ROOT / script), *words[at + 1 :]],
            env={**os.environ, **env, "DRY_RUN": "1"},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert run.returncode == 0, (example, run.stderr)
        for grpo_env, flags in trainer_commands(run.stdout):
            with monkeypatch.context() as m:
                for k, v in grpo_env.items():
                    m.setenv(k, v)
                T.resolve_config(flags)  # raises ConfigError on a flag the trainer does not take
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------- secrets
def test_a_dotenv_secret_is_never_printed_or_saved(tmp_path):
    secret = "sk-not-a-real-key-5b1f0c"
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={secret}\nGRPO_LR=2e-6\n")
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), "--smoke", "--dry-run"]
        + ["--output-dir", str(out), "--report-to", "wandb"],
        cwd=tmp_path,  # where the .env file is found
        env={k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "GRPO_"))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "2e-06" in run.stdout  # the .env file was read
    saved = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert secret not in run.stdout + run.stderr + saved


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launchers_are_shellcheck_clean():
    scripts = ["run_algo.sh", "run_sweep.sh", "scripts/launcher_common.sh"]
    result = subprocess.run(
        ["shellcheck", "-x", *scripts], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_real_engine_test_lives_in_the_file_its_tier_runs():
    # scripts/test_vllm_cpu.sh runs tests/test_vllm_cpu.py only: a vllm_cpu test elsewhere would
    # never run.
    files = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_layout.py"]
    assert {p.name for p in files if "mark.vllm_cpu" in p.read_text()} == {"test_vllm_cpu.py"}
    assert "tests/test_vllm_cpu.py" in (ROOT / "scripts" / "test_vllm_cpu.sh").read_text()
