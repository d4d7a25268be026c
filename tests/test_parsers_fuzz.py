"""Everything that reads model output in the trainer process returns a value for any string.

Completions are hostile input: one that kills the answer extraction, the majority-vote key or a
format rule kills the training run. Property-based tests over arbitrary text and over hostile
shapes (huge numbers with exponents and thousands separators, deep braces, unterminated boxes,
NUL and surrogate characters, code fences), up to a few MB per completion, assert that each call
returns a value of the right type within a generous bound, and that what cannot be parsed earns 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_stats  # noqa: E402
import math_grader as mg  # noqa: E402
import train_trl_grpo as T  # noqa: E402

# Generous on purpose: a linear parser takes milliseconds on these inputs even on a loaded 2-core
# machine; a quadratic one takes minutes on a few MB.
CALL_BOUND_S = 2.0
MAX_CHARS = 3_000_000
FUZZ = settings(
    max_examples=40,
    deadline=None,  # our own bound, per call, below
    derandomize=True,  # the same examples every run: a fuzz test must not be flaky
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every code point, surrogates and NUL included.
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())


@st.composite
def hostile_numbers(draw) -> str:
    """Plain numbers as a model might box them, from `7` to millions of digits."""
    digits = draw(st.sampled_from([1, 3, 28, 29, 400, 5000, 1_000_001]))
    body = draw(st.sampled_from("0123456789٣")) * digits
    if draw(st.booleans()):
        body = "1" + ",000" * min(digits, 300_000)  # thousands separators
    if draw(st.booleans()):
        body += "." + draw(st.sampled_from(["", "0", "5", "0" * 1_000_000, "9" * 1000]))
    if draw(st.booleans()):
        body += draw(st.sampled_from(["e", "E", "e-", "e+"])) + str(
            draw(st.sampled_from([5, 999_999, 10**18, 10**400]))
        )
    return draw(st.sampled_from(["", "-", "$", "\\$", "-$"])) + body


FRAGMENTS = st.sampled_from(
    [
        "\\boxed{", "\\boxed ", "\\fbox{", "\\boxed", "{", "}", "\\{", "\\}", "\\\\", "$", "$$",
        "\\(", "\\)", "\\[", "\\]", "####", "The answer is ", "answer:", "**Answer:** ", "=",
        ",", ".", "-", "+", "e", "^", "^{\\circ}", "\\circ", "\\frac", "\\dfrac12", "\\left(",
        "\\right)", "\\text{", "\\$", "%", " dollars", "```", "```python\n", "```py\n", "\n",
        " ", "\t", "\x00", "\ud800", "\udfff", "٣", "18", "9", "0", "x",
    ]
)  # fmt: skip
PIECE = st.one_of(FRAGMENTS, hostile_numbers(), st.text(alphabet=ANY_CHAR, max_size=20))
REPEATS = st.sampled_from([1, 1, 2, 3, 50, 1000, 100_000, 1_000_000])


@st.composite
def hostile_text(draw) -> str:
    """A completion built from pieces, each repeated up to a million times (at most ~3 MB)."""
    out: list[str] = []
    size = 0
    for piece, n in draw(st.lists(st.tuples(PIECE, REPEATS), max_size=8)):
        n = min(n, max(1, (MAX_CHARS - size) // max(1, len(piece))))
        out.append(piece * n)
        size += len(piece) * n
        if size >= MAX_CHARS:
            break
    return "".join(out)


COMPLETIONS = st.one_of(st.text(alphabet=ANY_CHAR), hostile_text())
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
CANONICAL_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d*[1-9])?")


def bounded(fn, *args, **kwargs):
    """fn(*args, **kwargs), which must not raise and must return within CALL_BOUND_S."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    took = time.perf_counter() - t0
    size = len(args[0]) if args and isinstance(args[0], str) else "?"
    assert took < CALL_BOUND_S, f"{fn.__name__} took {took:.1f} s on {size} chars"
    return out


# --- math_grader: the parsers the trainer process calls directly --------------------------------


@FUZZ
@given(text=COMPLETIONS, dataset=st.sampled_from(mg.DATASETS))
def test_math_parsers_return_for_any_text(text: str, dataset: str) -> None:
    boxed = bounded(mg.last_boxed, text)
    assert boxed is None or isinstance(boxed, str)
    raw = bounded(mg.extract_answer, text, dataset)
    assert raw is None or isinstance(raw, str)
    if raw is not None:  # the majority-vote key of evaluate()
        assert isinstance(bounded(mg.normalize_answer, raw, dataset), str)
    # The whole completion as an answer too: that is what a model boxes when it boxes everything.
    assert isinstance(bounded(mg.normalize_answer, text, dataset), str)
    fmt = bounded(mg.formatted_answer, text, dataset)
    assert fmt is None or (isinstance(fmt, str) and fmt.strip())
    canon = bounded(mg._canonical_number, text)
    assert canon is None or NUMBER_RE.fullmatch(canon)
    try:  # dataset rows, not model output; its contract is a value or ValueError
        gold = bounded(mg.gold_from_solution, text, dataset)
        assert isinstance(gold, str) and gold
    except ValueError:
        pass


@FUZZ
@given(number=hostile_numbers())
@example(number="1" * 1_000_001)  # the report: Decimal.normalize() raised Overflow
@example(number="9" * 1_000_000 + "." + "0" * 1_000_000)
def test_boxed_huge_numbers(number: str) -> None:
    text = f"The total is \\boxed{{{number}}}."
    fmt = bounded(mg.formatted_answer, text, "gsm8k")
    key = bounded(mg.normalize_answer, bounded(mg.extract_answer, text, "gsm8k"), "gsm8k")
    canon = bounded(mg._canonical_number, key)
    if canon is not None:  # a plain number: the GSM8K format rule accepts it, the key is exact
        assert fmt is not None
        assert canon == key
        if len(number) <= 5000:
            value = Decimal(number.lstrip("\\$-").replace(",", "").replace("٣", "3"))
            # copy_negate: unlike `-x`, it does not round to the context's 28 digits
            assert Decimal(canon) == (value.copy_negate() if number.startswith("-") else value)


@FUZZ
@given(
    sign=st.sampled_from(["", "-"]),
    whole=st.text("0123456789", min_size=1, max_size=60),
    frac=st.one_of(st.none(), st.text("0123456789", max_size=40)),
)
def test_canonical_number_is_exact(sign: str, whole: str, frac: str | None) -> None:
    s = sign + whole + ("" if frac is None else "." + frac)
    canon = mg._canonical_number(s)
    assert canon is not None and Decimal(canon) == Decimal(s)  # exact at any length
    assert canon == mg._canonical_number(canon)  # a fixed point
    assert CANONICAL_RE.fullmatch(canon) and canon != "-0"
    if Decimal(s) == 0:
        assert canon == "0"
    elif len(Decimal(s).as_tuple().digits) <= 28:  # where Decimal is exact, the same as before
        assert canon == format(Decimal(s).normalize(), "f")


def test_canonical_numbers_differing_past_28_digits_are_two_votes() -> None:
    a, b = "1" * 29, "1" * 28 + "2"
    assert mg.normalize_answer(a, "gsm8k") != mg.normalize_answer(b, "gsm8k")


def test_deep_nested_boxes() -> None:
    depth = 200_000  # 1.4 MB; slicing every nested argument once needed ~140 GB
    text = "\\boxed{" * depth + "5" + "}" * depth
    assert bounded(mg.last_boxed, text) == "5"
    assert bounded(mg.formatted_answer, text, "math") is None  # a box in a box: no one answer
    assert bounded(mg.formatted_answer, "\\boxed{\\boxed}", "math") is None


def test_degree_mark_regex_is_linear() -> None:
    text = "^" + " " * 1_000_000 + "x"
    for dataset in mg.DATASETS:
        assert bounded(mg.normalize_answer, text, dataset) == "^x"
        assert bounded(mg.formatted_answer, f"\\boxed{{{text}}}", dataset) in (None, text)


# --- train_trl_grpo: the reward functions and the vote, through the public API ------------------


def reward_funcs(name: str) -> dict:
    cfg = T.resolve_config(["--dataset", name, "--smoke"])
    return {f.__name__: f for f in T.make_reward_funcs(cfg, T.TASKS[name])}


@FUZZ
@given(texts=st.lists(COMPLETIONS, min_size=1, max_size=3), name=st.sampled_from(["gsm8k", "math"]))
def test_math_format_reward_and_vote_return_for_any_text(texts: list[str], name: str) -> None:
    fmt = reward_funcs(name)["format"]
    scores = bounded(fmt, completions=texts)
    assert len(scores) == len(texts) and set(scores) <= {0.0, 1.0}
    keys = [bounded(mg.extract_answer, t, name) for t in texts]
    keys = [None if k is None else bounded(mg.normalize_answer, k, name) for k in keys]
    assert isinstance(bounded(eval_stats.majority_correct, keys, [False] * len(keys)), bool)


@FUZZ
@given(texts=st.lists(COMPLETIONS, min_size=1, max_size=3))
def test_code_format_reward_returns_for_any_text(texts: list[str]) -> None:
    scores = bounded(reward_funcs("mbpp")["format"], completions=texts)
    assert len(scores) == len(texts) and set(scores) <= {0.0, 1.0}
    for t in texts:  # what the correctness reward takes to the sandbox
        assert all(isinstance(b, str) for b in bounded(T.code_blocks, t))


def test_code_block_extraction_is_linear() -> None:
    # In a child with a timeout: the old quadratic regex held a process for ~25 minutes here.
    code = textwrap.dedent(
        """
        import json, time
        import train_trl_grpo as T
        cfg = T.resolve_config(["--dataset", "mbpp", "--smoke"])
        fmt = T.make_reward_funcs(cfg, T.TASKS["mbpp"])[1]
        text = "```" + " " * 1_000_000 + "x\\n```python\\nprint(1)\\n```"
        t0 = time.perf_counter()
        scores = fmt(completions=[text])
        blocks = T.code_blocks(text)
        print(json.dumps([time.perf_counter() - t0, scores, blocks[0] if blocks else None]))
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the mbpp format reward did not return within 15 s on 1 MB")
    assert proc.returncode == 0, proc.stderr
    took, scores, block = json.loads(proc.stdout)
    assert took < CALL_BOUND_S
    # The spaced fence never reaches a newline, so it opens no block: one block, well formed.
    assert scores == [1.0] and block == "print(1)\n"


@pytest.fixture(scope="module")
def math_rewards():
    funcs = reward_funcs("math")
    yield funcs
    T.close_graders()


# The worker pool: start-up on a loaded machine included, and each item's own deadline
# (grader_timeout); the deadline itself is tested in test_math_grader.py.
POOL_BOUND_S = 60.0


@settings(FUZZ, max_examples=6)
@given(texts=st.lists(COMPLETIONS, min_size=1, max_size=2))
@example(texts=["\\boxed{" + "1" * 1_000_001 + "}", "\\boxed{" * 300_000])
def test_math_correctness_reward_returns_for_any_text(math_rewards, texts: list[str]) -> None:
    t0 = time.perf_counter()
    scores = math_rewards["correctness"](completions=texts, gold=["\\frac{1}{2}"] * len(texts))
    assert time.perf_counter() - t0 < POOL_BOUND_S
    assert len(scores) == len(texts) and set(scores) <= {0.0, 1.0}
    # The pool reads a completion's tail only; no answer in the whole text, none in its tail.
    unparsable = [mg.extract_answer(t, "math") is None for t in texts]
    assert all(s == 0.0 for s, u in zip(scores, unparsable, strict=True) if u)
