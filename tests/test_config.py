"""Config overrides: CLI > shell environment > .env > defaults, and one-line errors with exit 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_script

import train_trl_grpo as T

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return run_script(args, cwd, env)


def test_defaults_are_the_documented_ones(clean_env):
    cfg = T.resolve_config([])
    assert (cfg.model_id, cfg.lr, cfg.batch_size) == ("Qwen/Qwen2.5-1.5B-Instruct", 3e-6, 4)
    assert (cfg.grad_accum_steps, cfg.total_steps, cfg.num_generations) == (128, 100, 16)
    assert cfg.dataset == "gsm8k" and cfg.eval_split == "test"
    assert cfg.output_dir == "outputs/gsm8k-Qwen2.5-1.5B-Instruct"


def test_every_field_is_a_flag_and_an_env_variable(clean_env, monkeypatch):
    help_text = T.build_parser().format_help()
    for f in dataclasses.fields(T.Config):
        assert "--" + f.name.replace("_", "-") in help_text
        assert "GRPO_" + f.name.upper() in help_text


@pytest.mark.parametrize(
    ("dotenv", "shell", "cli", "expected"),
    [
        (None, None, None, 3e-6),
        ("9e-6", None, None, 9e-6),
        ("9e-6", "1.5e-5", None, 1.5e-5),
        ("9e-6", "1.5e-5", "2e-5", 2e-5),
        (None, None, "2e-5", 2e-5),
    ],
)
def test_precedence_cli_over_shell_over_dotenv_over_default(
    clean_env, monkeypatch, dotenv, shell, cli, expected
):
    if dotenv:
        (clean_env / ".env").write_text(f"GRPO_LR={dotenv}\n")
    if shell:
        monkeypatch.setenv("GRPO_LR", shell)
    cfg = T.resolve_config(["--lr", cli] if cli else [])
    assert cfg.lr == expected
    monkeypatch.delenv("GRPO_LR", raising=False)  # load_dotenv may have exported it


def test_dataset_and_eval_every_flags(clean_env):
    cfg = T.resolve_config(["--dataset", "math", "--eval-every", "20"])
    assert (cfg.dataset, cfg.eval_every, cfg.eval_split) == ("math", 20, "validation")


def test_types_are_parsed_from_env(clean_env, monkeypatch):
    monkeypatch.setenv("GRPO_GRADIENT_CHECKPOINTING", "false")
    monkeypatch.setenv("GRPO_EVAL_TEMPERATURE", "0.6")
    monkeypatch.setenv("GRPO_TOTAL_STEPS", "7")
    cfg = T.resolve_config(["--no-gradient-checkpointing", "--eval-top-p", "none"])
    assert cfg.gradient_checkpointing is False
    assert cfg.eval_temperature == 0.6 and cfg.eval_top_p is None and cfg.total_steps == 7


def test_smoke_preset_yields_to_explicit_values(clean_env, monkeypatch):
    monkeypatch.setenv("GRPO_TOTAL_STEPS", "3")
    cfg = T.resolve_config(["--smoke", "--dataset", "mbpp", "--num-generations", "2"])
    assert cfg.model_id == T.SMOKE_MODEL and cfg.vllm_mode == "none"
    assert cfg.total_steps == 3 and cfg.num_generations == 2
    assert cfg.data_dir.endswith(str(Path("tests") / "fixtures" / "mbpp"))


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--no-such-flag"], {}, "--no-such-flag"),
        ([], {"GRPO_LR": "fast"}, "lr"),
        (["--lr", "1e-3x"], {}, "lr"),
        (["--total-steps", "1.5"], {}, "total_steps"),
        (["--dataset", "imagenet"], {}, "dataset"),
        (["--vllm-mode", "remote"], {}, "vllm_mode"),
        (["--loss-type", "ppo"], {}, "loss_type"),
        (["--eval-samples", "4", "--eval-ks", "1,8"], {}, "eval_ks"),
        (["--batch-size", "3", "--grad-accum-steps", "1"], {}, "num_generations"),
        (["--dataset", "gsm8k", "--eval-split", "validation"], {}, "eval_split"),
        # Greedy decoding gives n identical samples: pass@k and maj@k would be pass@1 in disguise,
        # and a GRPO group would have no variance to learn from.
        (["--eval-temperature", "0", "--eval-samples", "4"], {}, "eval_temperature"),
        (["--temperature", "0"], {}, "temperature"),
        (["--save-steps", "-1"], {}, "save_steps"),
        (["--report-to", "wandb"], {"WANDB_API_KEY": "", "WANDB_MODE": "online"}, "WANDB_API_KEY"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, needle):
    res = run_cli(args, tmp_path, env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_dry_run_shows_lr_with_env_dotenv_and_cli(tmp_path):
    (tmp_path / ".env").write_text("GRPO_LR=9e-6\nWANDB_API_KEY=do-not-print-me\n")
    base = ["--dataset", "gsm8k", "--smoke", "--dry-run", "--output-dir", str(tmp_path / "o")]
    res = run_cli(base, tmp_path, {"GRPO_LR": "1.5e-5"})
    assert res.returncode == 0, res.stderr
    assert "1.5e-05" in res.stdout and "9e-06" not in res.stdout
    assert "do-not-print-me" not in res.stdout + res.stderr
    assert "<|im_start|>user" in res.stdout and "\\boxed{}" in res.stdout
    assert "splits: train 32 rows, test 8 rows" in res.stdout
    res = run_cli([*base, "--lr", "2e-5"], tmp_path, {"GRPO_LR": "1.5e-5"})
    assert res.returncode == 0 and "2e-05" in res.stdout
    res = run_cli(base, tmp_path)  # only the .env file is left
    assert "9e-06" in res.stdout
    saved = json.loads((tmp_path / "o" / "resolved_config.json").read_text())
    assert saved["lr"] == 9e-6 and saved["dataset"] == "gsm8k"


def test_missing_model_is_one_line(tmp_path):
    res = run_cli(
        ["--dataset", "gsm8k", "--model-id", str(tmp_path / "nope"), "--dry-run"], tmp_path
    )
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "nope" in res.stderr


def test_vllm_mode_on_cpu_is_a_clear_error(clean_env, tmp_path):
    # Server mode checks its server first (tests/test_startup.py); colocate goes straight to CUDA
    # (with a model directory: --smoke's in-memory model is refused before, see below).
    model = str(ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer")
    res = run_cli(
        ["--smoke", "--model-id", model, "--vllm-mode", "colocate"]
        + ["--output-dir", str(tmp_path / "o")],
        tmp_path,
    )
    assert res.returncode == 2
    # Without vllm installed (CPU boxes) the package check answers first, before any loading.
    needle = "needs a CUDA GPU" if importlib.util.find_spec("vllm") else "needs the vllm package"
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_colocate_on_cpu_needs_the_cpu_build_of_vllm(clean_env, tmp_path):
    model = str(ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer")  # never loaded: refused first
    res = run_cli(
        ["--smoke", "--model-id", model, "--vllm-mode", "colocate"]
        + ["--output-dir", str(tmp_path / "o")],
        tmp_path,
    )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "CPU build" in res.stderr and "scripts/vllm_cpu_env.sh" in res.stderr


def test_smoke_with_colocate_is_refused_at_start(clean_env, tmp_path):
    res = run_cli(["--smoke", "--vllm-mode", "colocate", "--eval-only"], tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--model-id DIR" in res.stderr
