"""Dataset adapters: the MATH validation carve, prompts, caps and local file formats."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest

import models
import train_trl_grpo as T

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _cfg(*args: str) -> T.Config:
    return T.resolve_config(["--smoke", "--output-dir", "o", *args])


def test_math_carve_is_stratified_fixed_and_disjoint(clean_env):
    task = T.TASKS["math"]
    rows = [
        {"problem": f"p{i}", "solution": "\\boxed{1}", "type": f"s{i % 7}"} for i in range(7500)
    ]
    rows[:700] = [dict(r, type="s0") for r in rows[:700]]  # uneven subjects
    train, val = T.carve_validation(rows, task)
    assert (len(train), len(val)) == (7000, 500)
    assert {r["problem"] for r in train}.isdisjoint(r["problem"] for r in val)
    total, picked = Counter(r["type"] for r in rows), Counter(r["type"] for r in val)
    for subject, n in total.items():
        assert abs(picked[subject] - n * 500 / 7500) < 1  # proportional, to the row
    assert T.carve_validation(copy.deepcopy(rows), task)[1] == val  # the same 500 every run


def test_math_validation_split_ignores_the_training_seed(clean_env):
    task = T.TASKS["math"]
    a = T.load_rows(_cfg("--dataset", "math", "--seed", "1"), task, "validation")
    b = T.load_rows(_cfg("--dataset", "math", "--seed", "2"), task, "validation")
    train = T.load_rows(_cfg("--dataset", "math"), task, "train")
    assert a == b and len(a) == 7 and len(train) == 98  # 105 local rows, 1/15 carved


def test_train_and_eval_prompts_come_from_one_builder(clean_env, tokenizer):
    cfg = _cfg("--dataset", "gsm8k", "--max-train-samples", "5", "--max-eval-samples", "3")
    task = T.TASKS["gsm8k"]
    rows = T.load_rows(cfg, task, "test")
    train = T.to_examples(cfg, task, tokenizer, T.load_rows(cfg, task, "train"), 5)
    evals = T.to_examples(cfg, task, tokenizer, rows, 3)
    assert len(train) == 5 and len(evals) == 3
    # The train file repeats the first test rows, so the same row must give the same prompt.
    assert train[0]["prompt"] == evals[0]["prompt"] == T.build_prompt(cfg, task, tokenizer, rows[0])
    assert evals[0]["gold"] == "18" and evals[2]["row"] == 2


def test_system_prompt_and_instruction_are_config(clean_env, tokenizer):
    row = json.loads((FIXTURES / "mbpp" / "test.jsonl").read_text().splitlines()[0])
    task = T.TASKS["mbpp"]
    default = T.build_prompt(_cfg("--dataset", "mbpp"), task, tokenizer, row)
    assert "You are a helpful assistant." in default and T.CODE_INSTRUCTION in default
    assert default.index(T.CODE_INSTRUCTION) < default.index(row["test_list"][0])
    cfg = _cfg("--dataset", "mbpp", "--system-prompt", "Be terse.", "--instruction", "Code only:")
    custom = T.build_prompt(cfg, task, tokenizer, row)
    assert "Be terse." in custom and "Code only:" in custom and T.CODE_INSTRUCTION not in custom
    assert all(t in custom for t in row["test_list"])


def test_chatml_template_only_for_tokenizers_without_one(clean_env, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(conf))
    bare = T.load_tokenizer(_cfg("--model-id", str(tmp_path / "tok")))
    assert bare.chat_template == models.CHATML_TEMPLATE
    assert T.load_tokenizer(_cfg()).chat_template != models.CHATML_TEMPLATE  # Qwen's own is kept


def test_parquet_files_load_like_jsonl(clean_env, tmp_path):
    from datasets import Dataset

    rows = [json.loads(x) for x in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()]
    Dataset.from_list(rows[:10]).to_parquet(str(tmp_path / "test.parquet"))
    cfg = T.resolve_config(["--data-dir", str(tmp_path), "--output-dir", "o"])
    assert T.load_rows(cfg, T.TASKS["gsm8k"], "test") == rows[:10]


def test_hub_loading_offline_is_one_clear_error(clean_env):
    cfg = T.resolve_config(["--dataset", "gsm8k", "--output-dir", "o"])
    with pytest.raises(T.DataError, match="openai/gsm8k.*--data-dir"):
        T.load_rows(cfg, T.TASKS["gsm8k"], "test")


MATH500 = FIXTURES / "math500_schema"  # bundled MATH rows in MATH-500's schema (not MATH-500)


def test_math500_split_reads_its_own_schema_with_gold_from_answer(clean_env, tmp_path, tokenizer):
    cfg = _cfg("--dataset", "math", "--data-dir", str(MATH500), "--eval-split", "math500")
    rows = T.load_rows(cfg, T.TASKS["math"], "math500")
    assert len(rows) == 500 and "type" not in rows[0]
    assert set(rows[0]) == {"problem", "solution", "answer", "subject", "level", "unique_id"}
    # The gold is the answer field, even where the solution's \boxed{} says something else.
    row = dict(rows[0], solution="So it is \\boxed{5}.", answer="\\frac{7}{2}")
    (tmp_path / "math500.jsonl").write_text(json.dumps(row) + "\n")
    cfg = _cfg("--dataset", "math", "--data-dir", str(tmp_path), "--eval-split", "math500")
    (ex,) = T.to_examples(
        cfg, T.TASKS["math"], tokenizer, T.load_rows(cfg, T.TASKS["math"], "math500"), 0
    )
    assert ex["gold"] == "\\frac{7}{2}" and row["problem"] in ex["prompt"]


@pytest.mark.parametrize(
    ("split", "field"), [("math500", "answer"), ("train", "type"), ("validation", "type")]
)
def test_math_fields_are_required_only_where_needed(clean_env, tmp_path, split, field):
    rows = [json.loads(x) for x in (MATH500 / "math500.jsonl").read_text().splitlines()[:20]]
    rows = [dict(r, type=r["subject"]) for r in rows]
    for name in ("train", "test", "math500"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg("--dataset", "math", "--data-dir", str(tmp_path))
    task = T.TASKS["math"]
    assert (
        len(T.load_rows(cfg, task, split)) == {"math500": 20, "train": 19, "validation": 1}[split]
    )
    file = "train" if split == "validation" else split
    broken = [dict(r) for r in rows]
    del broken[3][field]
    (tmp_path / f"{file}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    with pytest.raises(T.DataError, match=f"row 3: missing field '{field}'"):
        T.load_rows(cfg, task, split)
    # The test split is not carved: a hendrycks-style file without `type` (or `answer`) loads.
    bare = [{k: r[k] for k in ("problem", "solution")} for r in rows]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bare))
    assert len(T.load_rows(cfg, task, "test")) == 20


def test_math500_from_the_hub_offline_is_one_clear_error(clean_env):
    cfg = T.resolve_config(["--dataset", "math", "--eval-split", "math500", "--output-dir", "o"])
    with pytest.raises(T.DataError, match="HuggingFaceH4/MATH-500 .*test.*--data-dir"):
        T.load_rows(cfg, T.TASKS["math"], "math500")
    with pytest.raises(T.ConfigError, match="math500"):
        T.resolve_config(["--dataset", "gsm8k", "--eval-split", "math500", "--output-dir", "o"])
