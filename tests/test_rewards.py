"""The format rewards pay for one real final answer in a completion that ended, not for its shape.

SmolLM2-135M found in 8 GRPO steps that `\\boxed{}\\boxed{}...` earned the full format reward.
Every string here is one a model can write; the hack's own strings must score 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_trl_grpo as T
from train_trl_grpo import Sample

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MAX_LEN = 16  # max_completion_length of the configs below
EOS = 151645  # <|im_end|>, the Qwen2.5 tokenizer's eos


@pytest.fixture(autouse=True)
def _clean(clean_env):
    yield
    T.close_graders()


def cfg_for(dataset: str, tmp_path: Path) -> T.Config:
    return T.resolve_config(
        ["--dataset", dataset, "--output-dir", str(tmp_path), "--grader-workers", "1"]
        + ["--sandbox-workers", "1", "--max-completion-length", str(MAX_LEN)]
    )


def ended_ids(n: int = 5) -> list[int]:
    """Token ids of a completion that stopped on its own: short, or ending on eos."""
    return [11] * (n - 1) + [EOS]


TRUNCATED_IDS = [11] * MAX_LEN  # hit max_completion_length without an eos


def fmt(dataset: str, tmp_path: Path, texts: list[str], ids: list[list[int]] | None = None):
    """The format reward as GRPOTrainer calls it (with completion_ids)."""
    cfg = cfg_for(dataset, tmp_path)
    funcs = T.make_reward_funcs(cfg, T.TASKS[dataset], stop_ids={EOS})
    fmt_fn = funcs[1]
    assert fmt_fn.__name__ == "format"
    ids = ids if ids is not None else [ended_ids() for _ in texts]
    return fmt_fn(completions=texts, completion_ids=ids, gold=["18"] * len(texts))


HACKS = {
    "empty box": "\\boxed{}",
    "empty box spam": "\\boxed{}" * 40,
    "empty box after text": "So the answer is \\boxed{ }.",
    "unclosed box": "The answer is \\boxed{18",
    # Seen in a learning run: the instruction's example copied, boxes nested.
    "nested boxes": "3 + \\boxed{\\boxed{\\rm sm}21}",
    "two answers": "It is \\boxed{17} or \\boxed{18}.",
    "placeholder": "The answer is: \\boxed{ANSWER}",
    "no number": "So \\boxed{number}.",
}


@pytest.mark.parametrize("name", list(HACKS))
def test_math_format_pays_nothing_for_the_hack(tmp_path, name):
    assert fmt("gsm8k", tmp_path, [HACKS[name]]) == [0.0]


def test_math_format_pays_nothing_for_a_box_in_a_truncated_completion(tmp_path):
    text = "Janet has 16 eggs. 16 - 3 - 4 = 9. 9 * 2 = 18. \\boxed{18} and then"
    assert fmt("gsm8k", tmp_path, [text], [TRUNCATED_IDS]) == [0.0]
    # The same text that ended on eos at exactly the length limit did end: it is paid.
    assert fmt("gsm8k", tmp_path, [text], [ended_ids(MAX_LEN)]) == [1.0]
    # Shorter than the limit: generation can only have stopped on its own.
    assert fmt("gsm8k", tmp_path, [text], [[11] * (MAX_LEN - 1)]) == [1.0]


def test_math_format_pays_one_real_answer_once(tmp_path):
    one = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe final answer is \\boxed{18}."
    wrong = "The final answer is \\boxed{17}."  # format is not correctness
    units = "She makes \\boxed{\\$18} a day."  # a number in words or units is still a number
    spam = "\\boxed{18}" * 40
    scores = fmt("gsm8k", tmp_path, [one, wrong, units, spam, "The answer is 18."])
    # Spam earns no more than one answer; a right answer without a box is not the format asked.
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_math_format_pays_any_single_nonempty_answer_on_math(tmp_path):
    """MATH answers are expressions, not only numbers; one box is still the rule."""
    texts = ["So $x = \\boxed{\\frac{1}{2}}$.", "\\boxed{(1, 2)}", "\\boxed{a}\\boxed{b}"]
    texts += ["$\\boxed{10}$.\n\n- OR -\n\nSo it is $\\boxed{10}$."]  # MATH's own solutions do this
    assert fmt("math", tmp_path, texts) == [1.0, 1.0, 0.0, 1.0]


def test_math_format_uses_the_correctness_extraction(tmp_path):
    """Whatever the format reward pays for, the correctness reward reads the same answer."""
    mg = T.math_grader
    texts = ["\\fbox{18}", "\\boxed 18", "\\boxed{18 eggs}", "\\boxed{}", "\\boxed{x}"]
    scores = fmt("gsm8k", tmp_path, texts)
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0]
    for text in texts[:3]:  # what format pays for, correctness reads as 18
        assert mg.normalize_answer(mg.extract_answer(text, "gsm8k"), "gsm8k") == "18"


CODE = "```python\ndef f(x):\n    return x\n```"


@pytest.mark.parametrize(
    "text",
    [
        "```python\n```",  # empty block
        "```python\n   \n```",  # blank block
        CODE + "\n" + CODE,  # two blocks
        "```python\n" * 30,  # fence spam, never closed
        "def f(x):\n    return x",  # no block
    ],
)
def test_mbpp_format_pays_only_for_exactly_one_nonempty_block(tmp_path, text):
    assert fmt("mbpp", tmp_path, [text]) == [0.0]


def test_mbpp_format_one_block_in_an_ended_completion(tmp_path):
    assert fmt("mbpp", tmp_path, [CODE]) == [1.0]
    assert fmt("mbpp", tmp_path, [CODE], [TRUNCATED_IDS]) == [0.0]


def test_evaluation_applies_the_same_rule_to_truncated_samples(tmp_path):
    """evaluate() knows truncation from the backend, not from ids: same rule, same scores."""
    rows = [json.loads(x) for x in (FIXTURES / "gsm8k" / "test.jsonl").open()][:1]
    task = T.TASKS["gsm8k"]
    gold = task.gold(rows[0])
    examples = [{"prompt": "p", "gold": gold, "row": 0}]
    cfg = T.resolve_config(
        ["--dataset", "gsm8k", "--output-dir", str(tmp_path), "--eval-samples", "4"]
        + ["--eval-ks", "1", "--grader-workers", "1"]
    )
    good = f"So \\boxed{{{gold}}}."

    def generate(prompts, n, sp):
        return [
            [
                Sample(good, 5, False),
                Sample(good, 64, True),
                Sample("\\boxed{}" * 20, 60, False),
                Sample("\\boxed{}" * 30, 64, True),
            ]
        ]

    summary = T.evaluate(cfg, task, examples, generate, step=0)["summary"]
    out = json.loads((tmp_path / "eval" / "step_00000.json").read_text())["rows"][0]
    assert out["rewards"]["format"] == [1.0, 0.0, 0.0, 0.0]
    assert summary["format_rate"] == pytest.approx(1 / 4)
