"""MBPP's code-block extraction reads hostile model output: it must agree with the fence rule the
reward always had (a regex) on every input, and take linear time where that regex took hours."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

import train_trl_grpo as T

# The rule as a regex, as the script had it: right, but quadratic on "```" + spaces without "\n".
REFERENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)
PIECES = ["```", "`", " ", "\t", "\n", "python", "py", "Python", "pyx", "x = 1", "\r\n", "é"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_code_blocks_agree_with_the_fence_regex(text):
    assert T.code_blocks(text) == REFERENCE.findall(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_code_blocks_return_for_any_text(text):
    assert T.code_blocks(text) == REFERENCE.findall(text)


def test_a_fence_followed_by_a_megabyte_of_spaces_is_read_in_one_pass():
    # The regex needs ~10^12 steps here; one pass needs about a million.
    text = "```" + " " * 1_000_000 + "x\n```python\nprint(1)\n```"
    assert T.code_blocks(text) == ["print(1)\n"]
    assert T.TASKS["mbpp"].well_formed(text)
