"""Tests for the evaluation section: pass@k, maj@n, summaries, evaluate(), the vLLM server client
(against a local stand-in speaking vLLM's OpenAI-compatible API) and --eval-only end to end."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import combinations
from pathlib import Path

import pytest
from conftest import fast_time, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_stats  # noqa: E402
import generation  # noqa: E402
import train_trl_grpo as ttg  # noqa: E402
from train_trl_grpo import ConfigError, EvalError, Sample  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODEL = ttg.SMOKE_MODEL  # what --smoke trains and evaluates; the stand-in server serves it


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No GRPO_* variable from the caller's shell or a .env file may change a resolved config."""
    for name in list(os.environ):
        if name.startswith("GRPO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _close_graders():
    yield
    ttg.close_graders()


def _fixture_rows(dataset: str, split: str = "test") -> list[dict]:
    with (FIXTURES / dataset / f"{split}.jsonl").open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------------------
# 1. pass@k
# ------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                got = eval_stats.pass_at_k(n, c, k)
                assert got == pytest.approx(expected, abs=1e-12), (n, c, k)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (0, 0, 1), (8, 8, 9), (1, 0, 20)])
def test_pass_at_k_needs_k_samples(n, c, k):
    with pytest.raises(ValueError, match=f"pass@{k}"):
        eval_stats.pass_at_k(n, c, k)


def test_eval_ks_above_eval_samples_is_rejected_never_clamped(capsys):
    argv = ["--eval-ks", "1,20", "--eval-samples", "10"]
    with pytest.raises(ConfigError, match=r"k=20 > eval_samples=10"):
        ttg.resolve_config(argv)
    assert ttg.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval_ks" in err[0] and "k=20" in err[0]


# ------------------------------------------------------------------------------------------------
# 2. maj@n
# ------------------------------------------------------------------------------------------------
def test_majority_correct():
    # The most frequent answer wins, right or wrong.
    assert eval_stats.majority_correct(["1", "2", "2"], [False, True, True]) is True
    assert eval_stats.majority_correct(["1", "2", "2"], [True, False, False]) is False
    # Ties go to the answer seen first, whichever order the counts come in.
    assert eval_stats.majority_correct(["a", "b", "b", "a"], [True, False, False, True]) is True
    assert eval_stats.majority_correct(["b", "a", "a", "b"], [False, True, True, False]) is False
    assert eval_stats.majority_correct(["x", "y"], [False, True]) is False
    assert eval_stats.majority_correct(["y", "x"], [True, False]) is True
    # None (no answer extracted) does not vote: two Nones do not outvote one answer.
    assert eval_stats.majority_correct([None, None, "3"], [False, False, True]) is True
    assert eval_stats.majority_correct(
        [None, "3", None, "4", "4"], [False, True, False, False, False]
    ) is (False)
    # Nothing extracted at all: wrong, whatever the correctness flags say.
    assert eval_stats.majority_correct([None, None], [False, False]) is False
    assert eval_stats.majority_correct([None], [True]) is False


# ------------------------------------------------------------------------------------------------
# 3. summarize
# ------------------------------------------------------------------------------------------------
def _hand_rows(partial: bool = False) -> list[dict]:
    return [
        {
            "row": 0,
            "n": 3,
            "correct": [1, 0, 0],
            "answers": ["5", "7", "7"],
            "rewards": {"correctness": [1.0, 0.5 if partial else 0.0, 0.0], "format": [1, 1, 0]},
            "lengths": [10, 20, 30],
            "truncated": [0, 0, 1],
            "greedy_correct": 1,
        },
        {
            "row": 1,
            "n": 3,
            "correct": [0, 1, 1],
            "answers": [None, "3", "3"],
            "rewards": {"correctness": [0.0, 1.0, 1.0], "format": [0, 1, 1]},
            "lengths": [5, 5, 5],
            "truncated": [0, 0, 0],
            "greedy_correct": 0,
        },
    ]


def test_summarize_math_by_hand():
    cfg = ttg.resolve_config(["--dataset", "gsm8k", "--eval-samples", "3", "--eval-ks", "1,2,3"])
    s = ttg.summarize(cfg, ttg.TASKS["gsm8k"], _hand_rows())
    expected = {
        "pass@1": (1 / 3 + 2 / 3) / 2,
        "pass@2": (2 / 3 + 1.0) / 2,  # row 0: 1 - C(2,2)/C(3,2); row 1: a pair always hits
        "pass@3": 1.0,
        "mean@3": 0.5,
        "maj@3": 0.5,  # row 0: "7" (wrong) wins; row 1: "3" (right) wins, None does not vote
        "reward/correctness": 3 / 6,
        "reward/format": 4 / 6,
        "format_rate": 4 / 6,
        "completion_length": 75 / 6,
        "truncated_rate": 1 / 6,
        "greedy_pass@1": 0.5,
    }
    assert s.keys() == expected.keys()
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-12), key


def test_summarize_code_has_no_majority_and_keeps_partial_rewards():
    cfg = ttg.resolve_config(["--dataset", "mbpp", "--eval-samples", "3", "--eval-ks", "1,3"])
    rows = _hand_rows(partial=True)
    for r in rows:
        r["answers"] = [None] * 3
        r["greedy_correct"] = None
    s = ttg.summarize(cfg, ttg.TASKS["mbpp"], rows)
    assert "maj@3" not in s and "greedy_pass@1" not in s and "pass@2" not in s
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["pass@3"] == pytest.approx(1.0)
    # A half-passing program counts toward the mean reward, never toward pass@k.
    assert s["reward/correctness"] == pytest.approx(3.5 / 6)
    assert s["mean@3"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# 4. evaluate() with a fake generation backend
# ------------------------------------------------------------------------------------------------
def _gsm8k_examples(idx: list[int]) -> list[dict]:
    task = ttg.TASKS["gsm8k"]
    rows = _fixture_rows("gsm8k")
    return [{"prompt": f"prompt {i}", "gold": task.gold(rows[i]), "row": i} for i in idx]


def _gsm8k_cfg(tmp_path: Path, *extra: str):
    return ttg.resolve_config(
        ["--dataset", "gsm8k", "--output-dir", str(tmp_path), "--eval-samples", "4"]
        + ["--eval-ks", "1,2,4", "--grader-workers", "1", "--max-completion-length", "64"]
        + ["--eval-temperature", "0.6", "--eval-top-p", "0.95", "--top-k", "20", *extra]
    )


R, W, N = "right", "wrong", "none"
PLAN = [[R, R, R, R], [R, W, W, N], [W, R, R, W], [N, W, R, R]]  # per problem, per sample
GREEDY = [R, W, R, W]


def _text(kind: str, gold: str) -> str:
    if kind == R:
        return f"Adding it up.\nThe final answer is \\boxed{{{gold}}}."
    if kind == W:
        return f"Adding it up.\nThe final answer is \\boxed{{{int(gold) + 1}}}."
    return "I am not sure how to go on"


class FakeGenerate:
    """Returns the planned completions, and records how it was called."""

    def __init__(self, examples: list[dict], bad: str = ""):
        self.gold = {e["prompt"]: e["gold"] for e in examples}
        self.order = [e["prompt"] for e in examples]
        self.calls: list[tuple[list[str], int, dict]] = []
        self.bad = bad

    def __call__(self, prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        self.calls.append((list(prompts), n, dict(sp)))
        out = []
        for p in prompts:
            i = self.order.index(p)
            kinds = GREEDY[i : i + 1] if n == 1 else PLAN[i]
            out.append(
                [
                    Sample(_text(kind, self.gold[p]), 10 * (i + 1) + j, kind == N)
                    for j, kind in enumerate(kinds)
                ]
            )
        if self.bad == "short" and n > 1 or self.bad == "greedy" and n == 1:
            out[1] = out[1][:-1] if n > 1 else []
        if self.bad == "prompts":
            out = out[:-1]
        return out


def _comb_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_evaluate_writes_summary_and_rows(tmp_path):
    examples = _gsm8k_examples([0, 5, 7, 11])
    cfg = _gsm8k_cfg(tmp_path)
    gen = FakeGenerate(examples)
    summary = ttg.evaluate(cfg, ttg.TASKS["gsm8k"], examples, gen, step=7)["summary"]

    # One call, all prompts, the eval sampling parameters.
    assert gen.calls == [
        (
            [e["prompt"] for e in examples],
            4,
            {
                "temperature": 0.6,
                "top_p": 0.95,
                "top_k": 20,
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "max_tokens": 64,
            },
        )
    ]
    path = tmp_path / "eval" / "step_00007.json"
    data = json.loads(path.read_text())
    assert data["step"] == 7 and data["split"] == "test"
    assert data["summary"] == summary
    rows = data["rows"]
    assert [r["row"] for r in rows] == [0, 5, 7, 11]
    assert all(r["n"] == 4 for r in rows)
    assert [r["correct"] for r in rows] == [[int(k == R) for k in plan] for plan in PLAN]
    golds = [e["gold"] for e in examples]
    assert rows[1]["answers"] == [golds[1], str(int(golds[1]) + 1), str(int(golds[1]) + 1), None]
    assert rows[3]["rewards"]["format"] == [0.0, 1.0, 1.0, 1.0]
    assert rows[2]["lengths"] == [30, 31, 32, 33]
    assert rows[1]["truncated"] == [0, 0, 0, 1]
    assert all(r["greedy_correct"] is None for r in rows)

    # Anyone can recompute the summary from the rows.
    for k in (1, 2, 4):
        recomputed = sum(_comb_pass_at_k(r["n"], sum(r["correct"]), k) for r in rows) / len(rows)
        assert summary[f"pass@{k}"] == pytest.approx(recomputed, abs=1e-12)
    # ... and by hand: c = 4, 1, 2, 2 out of n = 4.
    assert summary["pass@1"] == pytest.approx(9 / 16)
    assert summary["pass@2"] == pytest.approx((1 + 0.5 + 5 / 6 + 5 / 6) / 4)
    assert summary["pass@4"] == pytest.approx(1.0)
    assert summary["mean@4"] == pytest.approx(9 / 16)
    # maj: all right; "wrong" twice; a tie the wrong answer saw first; right twice vs None.
    assert summary["maj@4"] == pytest.approx(2 / 4)
    assert summary["format_rate"] == pytest.approx(14 / 16)
    assert summary["reward/correctness"] == pytest.approx(9 / 16)
    assert summary["truncated_rate"] == pytest.approx(2 / 16)
    assert summary["completion_length"] == pytest.approx(424 / 16)  # 10 * (i + 1) + j
    assert "greedy_pass@1" not in summary


def test_majority_vote_counts_equivalent_answer_forms_as_one(tmp_path):
    """Three spellings of the gold outvote two copies of a wrong answer."""
    (example,) = _gsm8k_examples([0])
    g = example["gold"]
    texts = [f"\\boxed{{{g}.00}}", f"\\boxed{{\\${g}}}", f"\\boxed{{{g}}}"]
    texts += [f"\\boxed{{{int(g) + 1}}}"] * 2

    def generate(prompts, n, sp):
        return [[Sample(t, 5, False) for t in texts]]

    cfg = _gsm8k_cfg(tmp_path, "--eval-samples", "5")
    summary = ttg.evaluate(cfg, ttg.TASKS["gsm8k"], [example], generate, step=0)["summary"]
    assert summary["maj@5"] == 1.0 and summary["mean@5"] == pytest.approx(3 / 5)
    rows = json.loads((tmp_path / "eval" / "step_00000.json").read_text())["rows"]
    assert rows[0]["answers"] == [g, g, g, str(int(g) + 1), str(int(g) + 1)]


def test_evaluate_greedy_adds_greedy_pass_at_1(tmp_path):
    examples = _gsm8k_examples([0, 5, 7, 11])
    cfg = _gsm8k_cfg(tmp_path, "--eval-greedy")
    gen = FakeGenerate(examples)
    summary = ttg.evaluate(cfg, ttg.TASKS["gsm8k"], examples, gen, step=0)["summary"]
    assert len(gen.calls) == 2
    _, n, sp = gen.calls[1]
    assert n == 1 and sp == {**gen.calls[0][2], "temperature": 0.0}
    assert summary["greedy_pass@1"] == pytest.approx(0.5)
    rows = json.loads((tmp_path / "eval" / "step_00000.json").read_text())["rows"]
    assert [r["greedy_correct"] for r in rows] == [1, 0, 1, 0]


@pytest.mark.parametrize("bad", ["short", "prompts", "greedy"])
def test_evaluate_wrong_count_raises(tmp_path, bad):
    examples = _gsm8k_examples([0, 5, 7, 11])
    cfg = _gsm8k_cfg(tmp_path, "--eval-greedy")
    with pytest.raises(EvalError, match="wrong number"):
        ttg.evaluate(cfg, ttg.TASKS["gsm8k"], examples, FakeGenerate(examples, bad), step=3)
    assert not (tmp_path / "eval" / "step_00003.json").exists()


def test_evaluate_mbpp(tmp_path):
    task = ttg.TASKS["mbpp"]
    rows = _fixture_rows("mbpp")[:2]
    examples = [{"prompt": f"p{i}", "gold": task.gold(r), "row": i} for i, r in enumerate(rows)]
    cfg = ttg.resolve_config(
        ["--dataset", "mbpp", "--output-dir", str(tmp_path), "--eval-samples", "2"]
        + ["--eval-ks", "1,2", "--sandbox-workers", "1"]
    )

    def generate(prompts, n, sp):
        return [
            [Sample(task.gold_completion(rows[0]), 5, False), Sample("no code", 2, False)],
            [Sample("```python\ndef is_woodall(x):\n    return 1\n```", 9, True)] * 2,
        ]

    summary = ttg.evaluate(cfg, task, examples, generate, step=1)["summary"]
    out = json.loads((tmp_path / "eval" / "step_00001.json").read_text())["rows"]
    assert [r["correct"] for r in out] == [[1, 0], [0, 0]]
    assert out[0]["answers"] == [None, None]
    assert summary["pass@1"] == pytest.approx(0.25)
    assert summary["pass@2"] == pytest.approx(0.5)
    # The two code blocks of problem 1 were truncated: the format reward does not pay for them.
    assert summary["format_rate"] == pytest.approx(1 / 4)
    assert "maj@2" not in summary


def test_evaluate_writes_95_intervals_beside_the_flat_summary(tmp_path):
    examples = _gsm8k_examples([0, 5, 7, 11])
    cfg = _gsm8k_cfg(tmp_path, "--eval-greedy")
    record = ttg.evaluate(cfg, ttg.TASKS["gsm8k"], examples, FakeGenerate(examples), step=2)
    data = json.loads((tmp_path / "eval" / "step_00002.json").read_text())
    assert {k: data[k] for k in record} == record
    assert data["problems"] == 4 and data["subsample"] is False
    assert all(isinstance(v, float) for v in data["summary"].values())  # the summary stays flat
    ci = data["ci95"]
    assert ci.keys() == {"pass@1", "pass@2", "pass@4", "mean@4", "maj@4", "greedy_pass@1"}
    for metric, (lo, hi) in ci.items():
        assert lo <= data["summary"][metric] <= hi, metric
    # Per problem, pass@1 is 1, 1/4, 1/2, 1/2: resampled means stay within that range.
    assert 0.25 <= ci["pass@1"][0] < ci["pass@1"][1] <= 1.0
    assert ci["pass@4"] == [1.0, 1.0]  # every problem solved at least once: no spread at all
    ttg.evaluate(cfg, ttg.TASKS["gsm8k"], examples, FakeGenerate(examples), step=3)
    again = json.loads((tmp_path / "eval" / "step_00003.json").read_text())["ci95"]
    assert again == ci  # fixed seed: the same rows give the same interval


def test_bootstrap_ci_has_the_width_of_the_normal_interval():
    """400 problems solved with p = 0.3: the 95 % interval is ~ +-1.96 * sqrt(p(1-p)/n)."""
    values = [1.0] * 120 + [0.0] * 280
    lo, hi = ttg.bootstrap_ci(values)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert lo < 0.3 < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(0.3, abs=0.01)
    assert ttg.bootstrap_ci([0.5] * 7) == (0.5, 0.5)


def test_eval_subset_is_the_same_fixed_problems_whatever_the_seed(tmp_path):
    examples = [{"prompt": f"p{i}", "gold": "1", "row": i} for i in range(50)]

    def subset(*extra):
        cfg = _gsm8k_cfg(tmp_path, *extra)
        return [e["row"] for e in ttg.eval_subset(cfg, examples)]

    picked = subset("--eval-subsample", "10")
    assert len(picked) == len(set(picked)) == 10 and picked == sorted(picked)
    assert picked != list(range(10))  # drawn across the set, not its first rows
    assert subset("--eval-subsample", "10", "--seed", "7") == picked
    assert subset("--eval-subsample", "0") == list(range(50))
    assert subset("--eval-subsample", "50") == list(range(50))
    with pytest.raises(ConfigError, match="eval_subsample"):
        _gsm8k_cfg(tmp_path, "--eval-subsample", "-1")


def test_print_table_shows_intervals_and_which_problems(capsys):
    ci = {"pass@1": [0.25, 0.5]}
    history = [
        {"step": 0, "pass@1": 0.375, "format_rate": 1.0, "problems": 8, "subsample": False},
        {"step": 2, "pass@1": 0.5, "format_rate": 1.0, "problems": 3, "subsample": True},
    ]
    history[0]["ci95"] = history[1]["ci95"] = ci
    ttg.print_table(history)
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines[0] == ["step", "problems", "pass@1", "format_rate"]
    assert lines[1] == ["0", "8", "all", "0.375", "[0.250,", "0.500]", "1.000"]
    assert lines[2] == ["2", "3", "subsample", "0.500", "[0.250,", "0.500]", "1.000"]


# ------------------------------------------------------------------------------------------------
# 5. The vLLM server client, against a stand-in speaking vLLM's OpenAI-compatible API
# ------------------------------------------------------------------------------------------------
class StandIn:
    """GET /health, GET /v1/models, POST /v1/completions, like `vllm serve`, in a thread."""

    def __init__(self, model=MODEL, answer=None, fail=0, shuffle=False, drop=0, hold=0.0):
        self.model = model
        self.hold = hold  # seconds a completion request waits for a second one to arrive
        self.in_flight = self.max_in_flight = 0
        self.cond = threading.Condition()
        self.answer = answer or (lambda prompt, j: (f"{prompt}#{j}", [7] * (j + 1), "stop"))
        self.fail = fail  # completion requests answered 500 first; -1 = every one
        self.shuffle = shuffle
        self.drop = drop  # choices left out of every answer
        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handler(self):
        stand = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": stand.model}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand.bodies.append(body)
                with stand.cond:
                    stand.in_flight += 1
                    stand.max_in_flight = max(stand.max_in_flight, stand.in_flight)
                    stand.cond.notify_all()
                    # Waits (bounded) for a second request: a client that sends one at a time
                    # never gets one, and the count stays at 1.
                    stand.cond.wait_for(lambda: stand.in_flight >= 2, timeout=stand.hold)
                try:
                    self._answer(body)
                finally:
                    with stand.cond:
                        stand.in_flight -= 1

            def _answer(self, body: dict) -> None:
                if stand.fail == -1 or len(stand.bodies) <= stand.fail:
                    return self._send(500, {"error": "internal server error"})
                try:
                    choices = []
                    for i, prompt in enumerate(body["prompt"]):
                        for j in range(body["n"]):
                            text, ids, finish = stand.answer(prompt, j)
                            choices.append(
                                {
                                    "index": i * body["n"] + j,
                                    "text": text,
                                    "token_ids": ids,
                                    "finish_reason": finish,
                                    "logprobs": None,
                                }
                            )
                except Exception as e:  # an unknown prompt: a server error, as vLLM would
                    return self._send(500, {"error": repr(e)})
                if stand.shuffle:
                    random.Random(0).shuffle(choices)
                choices = choices[stand.drop :]
                self._send(200, {"object": "text_completion", "choices": choices})

        return Handler


@pytest.fixture
def stand_in():
    started: list[StandIn] = []

    def start(**kw) -> StandIn:
        started.append(StandIn(**kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


SP = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_tokens": 3,
}


def test_server_client_sends_sampling_params_and_reorders(stand_in):
    def answer(prompt, j):
        return f"{prompt}#{j}", list(range(j + 2)), "length" if j == 1 else "stop"

    server = stand_in(answer=answer, shuffle=True)
    gen = ttg.vllm_server_generate(server.url, MODEL, batch_prompts=2)
    out = gen(["a", "b", "c"], 2, SP)
    assert [[s.text for s in group] for group in out] == [
        ["a#0", "a#1"],
        ["b#0", "b#1"],
        ["c#0", "c#1"],
    ]
    assert [[s.length for s in group] for group in out] == [[2, 3]] * 3
    assert [[s.truncated for s in group] for group in out] == [[False, True]] * 3
    # Two requests of at most batch_prompts prompts, each carrying the sampling parameters.
    assert sorted(b["prompt"] for b in server.bodies) == [["a", "b"], ["c"]]
    for body in server.bodies:
        assert body["model"] == MODEL and body["n"] == 2 and body["return_token_ids"] is True
        assert {k: body[k] for k in SP} == SP


def test_server_eval_keeps_several_requests_in_flight(stand_in):
    server = stand_in(hold=5.0)
    prompts = [f"p{i}" for i in range(256)]
    out = ttg.vllm_server_generate(server.url, MODEL)(prompts, 2, SP)
    assert [[s.text for s in g] for g in out] == [[f"{p}#0", f"{p}#1"] for p in prompts]
    assert sorted(p for b in server.bodies for p in b["prompt"]) == sorted(prompts)
    assert 2 <= server.max_in_flight <= 8  # concurrent, and bounded


def _trl_sampling_fields() -> set[str]:
    """The sampling fields TRL's VLLMClient.generate puts in every training request."""
    import inspect

    from trl.generation.vllm_client import VLLMClient

    not_sampling = {"self", "prompts", "features", "logprobs", "structured_outputs_regex"}
    params = set(inspect.signature(VLLMClient.generate).parameters) - not_sampling
    return params - {"generation_kwargs"}


def test_eval_requests_sample_exactly_as_training(tmp_path, stand_in, capsys, monkeypatch):
    monkeypatch.delenv("RUN_ALGO_FRESH_SERVER", raising=False)
    server = stand_in(answer=lambda prompt, j: ("The final answer is \\boxed{1}.", [3] * 4, "stop"))
    out = tmp_path / "run"
    argv = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--vllm-mode", "server"]
    argv += ["--output-dir", str(out), "--vllm-port", str(server.port), "--eval-greedy"]
    argv += ["--temperature", "0.9", "--top-p", "0.95", "--top-k", "7"]
    assert ttg.main(argv) == 0
    # What training sends: TRL's request fields, with GRPOConfig's values as the trainer builds it.
    args = ttg.grpo_config(ttg.resolve_config(argv))
    training = {
        "n": 4,
        "repetition_penalty": args.repetition_penalty,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": 0.0 if args.min_p is None else args.min_p,  # TRL sends 0.0 for None
        "max_tokens": args.max_completion_length,
    }
    assert set(training) == _trl_sampling_fields()
    sampled = [b for b in server.bodies if b["n"] == 4]
    greedy = [b for b in server.bodies if b["n"] == 1]
    assert sampled and greedy
    for body in sampled:
        assert {k: body[k] for k in training} == training
    for body in greedy:
        assert {k: body[k] for k in training} == {**training, "n": 1, "temperature": 0.0}
    # ... and recorded with the eval rows.
    data = json.loads((out / "eval" / "step_00000.json").read_text())
    assert data["sampling"] == {**training, "greedy": {**training, "n": 1, "temperature": 0.0}}
    err = capsys.readouterr()
    assert "eval at step 0: 32 completions of 8 problems in" in err.out
    assert data["summary"]["eval_seconds"] >= 0
    # The server may hold trained weights under model_id's name: one line says so.
    lines = [ln for ln in err.err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and f":{server.port}" in lines[0] and MODEL in lines[0]


def test_eval_only_on_a_server_the_launcher_just_started_has_no_weights_warning(
    tmp_path, stand_in, capsys, monkeypatch
):
    monkeypatch.setenv("RUN_ALGO_FRESH_SERVER", "1")
    server = stand_in(answer=lambda prompt, j: ("no answer", [3], "stop"))
    argv = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--vllm-mode", "server"]
    argv += ["--output-dir", str(tmp_path), "--vllm-port", str(server.port)]
    assert ttg.main(argv) == 0
    assert "warning:" not in capsys.readouterr().err


def test_server_client_fails_loudly_after_retries(stand_in, monkeypatch):
    sleeps = fast_time(monkeypatch, generation)
    server = stand_in(fail=-1)
    gen = ttg.vllm_server_generate(server.url, MODEL)
    with pytest.raises(EvalError, match="failed 3 times"):
        gen(["a", "b"], 2, SP)
    assert len(server.bodies) == 3
    assert sleeps == [1, 2]


def test_server_client_wrong_choice_count_is_an_error(stand_in, monkeypatch):
    fast_time(monkeypatch, generation)
    server = stand_in(drop=1)
    with pytest.raises(EvalError, match="got 3 completions, expected 4"):
        ttg.vllm_server_generate(server.url, MODEL)(["a", "b"], 2, SP)
    assert len(server.bodies) == 3


def test_server_client_retries_a_transient_failure(stand_in, monkeypatch):
    sleeps = fast_time(monkeypatch, generation)
    server = stand_in(fail=1)
    out = ttg.vllm_server_generate(server.url, MODEL)(["a", "b"], 2, SP)
    assert [[s.text for s in g] for g in out] == [["a#0", "a#1"], ["b#0", "b#1"]]
    assert len(server.bodies) == 2 and sleeps == [1]


class _ScriptedModel:
    """A model whose generate() appends fixed completions, n per prompt."""

    training = False

    def __init__(self, completions: list[list[int]]):
        import torch

        self.device = torch.device("cpu")
        self.completions = completions

    def eval(self) -> None:
        pass

    def train(self, mode: bool = True) -> None:
        pass

    def generate(self, input_ids, attention_mask, **kw):
        import torch

        return torch.tensor([r.tolist() + c for r in input_ids for c in self.completions])


def test_completion_length_counts_the_end_of_sequence_token_in_every_backend(tokenizer, stand_in):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # What each backend hands back for the same three completions: transformers pads after the
    # end-of-sequence token, vLLM (in process or behind the server) stops on it.
    padded = [[11, 12, eos, pad], [11, 12, 13, 14], [11, eos, pad, pad]]
    stopped = [[11, 12, eos], [11, 12, 13, 14], [11, eos]]
    sp = {**SP, "max_tokens": 4}
    hf = ttg.hf_generate(_ScriptedModel(padded), tokenizer)(["a"], 3, sp)[0]
    colocate = generation.samples_from_ids(tokenizer, stopped, 4)
    finish = ["stop", "length", "stop"]
    server = stand_in(answer=lambda prompt, j: ("x", stopped[j], finish[j]))
    served = ttg.vllm_server_generate(server.url, MODEL)(["a"], 3, sp)[0]
    for samples in (hf, colocate, served):
        assert [s.length for s in samples] == [3, 4, 2]
        assert [s.truncated for s in samples] == [False, True, False]


def test_transformers_eval_ignores_the_model_generation_config(tokenizer):
    model = ttg.build_smoke_model(tokenizer, 0).eval()
    prompts = ["What is 2 + 2?", "Name a prime number."]
    sp = {**SP, "temperature": 0.0, "max_tokens": 16}
    plain = [g[0].text for g in ttg.hf_generate(model, tokenizer)(prompts, 1, sp)]
    # Qwen2.5-Instruct ships such a generation_config.json; greedy decoding would apply its penalty.
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.top_k = 5
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    default = model.generate(**enc, max_new_tokens=16, do_sample=False)
    by_default = tokenizer.batch_decode(
        default[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert by_default != plain  # the model's own config changes greedy output here ...
    ours = [g[0].text for g in ttg.hf_generate(model, tokenizer)(prompts, 1, sp)]
    assert ours == plain  # ... and evaluation does not take it


def _server_cfg(port: int, *extra: str):
    return ttg.resolve_config(
        ["--smoke", "--vllm-mode", "server", "--vllm-host", "127.0.0.1"]
        + ["--vllm-port", str(port), *extra]
    )


def test_check_vllm_server_none_running(monkeypatch):
    fast_time(monkeypatch, generation)
    port = free_port()
    cfg = _server_cfg(port, "--vllm-server-timeout", "1")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        ttg.check_vllm_server(cfg)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "./run_algo.sh" in msg and "\n" not in msg


def test_check_vllm_server_other_model(stand_in):
    server = stand_in(model="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ConfigError) as err:
        ttg.check_vllm_server(_server_cfg(server.port))
    msg = str(err.value)
    assert "Qwen/Qwen2.5-7B-Instruct" in msg and MODEL in msg and f":{server.port}" in msg


def test_check_vllm_server_right_model(stand_in):
    server = stand_in()
    assert ttg.check_vllm_server(_server_cfg(server.port)) is None


# ------------------------------------------------------------------------------------------------
# 6. --eval-only end to end
# ------------------------------------------------------------------------------------------------
def test_eval_only_server_end_to_end(tmp_path, stand_in):
    out = tmp_path / "run"
    argv = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--vllm-mode", "server"]
    argv += ["--output-dir", str(out)]
    # The stand-in answers every prompt with its fixture gold, found through the trainer's own
    # prompt builder: an unknown prompt would be a server error and fail the run.
    cfg = ttg.resolve_config(argv)
    task = ttg.TASKS["gsm8k"]
    examples = ttg.to_examples(
        cfg, task, ttg.load_tokenizer(cfg), ttg.load_rows(cfg, task, "test"), cfg.max_eval_samples
    )
    golds = {e["prompt"]: e["gold"] for e in examples}

    def answer(prompt, j):
        return (
            f"Step by step.\nThe final answer is \\boxed{{{golds[prompt]}}}.",
            [1] * (5 + j),
            "stop",
        )

    server = stand_in(model=MODEL, answer=answer)
    rc = ttg.main(argv + ["--vllm-host", "127.0.0.1", "--vllm-port", str(server.port)])
    assert rc == 0
    for name in ("eval/step_00000.json", "metrics.png", "summary.json", "resolved_config.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "eval" / "step_00000.json").read_text())
    assert len(data["rows"]) == len(examples) == 8  # --smoke: max_eval_samples 8
    assert all(r["n"] == 4 and r["correct"] == [1] * 4 for r in data["rows"])
    assert data["rows"][0]["lengths"] == [5, 6, 7, 8]
    s = data["summary"]
    assert s["pass@1"] == s["pass@4"] == s["maj@4"] == s["format_rate"] == 1.0
    (entry,) = json.loads((out / "summary.json").read_text())["eval"]
    assert entry == {"step": 0, **s, "problems": 8, "subsample": False, "ci95": data["ci95"]}
    sent = [p for b in server.bodies for p in b["prompt"]]
    assert sorted(sent) == sorted(golds)
    assert all(b["n"] == 4 and b["max_tokens"] == 32 and b["model"] == MODEL for b in server.bodies)


def test_eval_only_math_transformers_cpu(tmp_path):
    out = tmp_path / "math"
    rc = ttg.main(
        ["--dataset", "math", "--smoke", "--eval-only", "--vllm-mode", "none"]
        + ["--max-eval-samples", "2", "--eval-samples", "2", "--eval-ks", "1,2"]
        + ["--output-dir", str(out)]
    )
    assert rc == 0
    for name in ("eval/step_00000.json", "metrics.png", "summary.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "eval" / "step_00000.json").read_text())
    assert data["split"] == "validation"
    assert len(data["rows"]) == 2 and all(r["n"] == 2 for r in data["rows"])
    assert all(0 <= n <= 32 for r in data["rows"] for n in r["lengths"])
    for key in ("pass@1", "pass@2", "mean@2", "maj@2", "format_rate"):
        assert 0.0 <= data["summary"][key] <= 1.0, key


# ------------------------------------------------------------------------------------------------
# 7. Opt-in: a real `trl vllm-serve` (pytest -m vllm; needs vllm and a CUDA GPU)
# ------------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_real_vllm_server(tmp_path):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    trl_cli = shutil.which("trl", path=str(Path(sys.executable).parent)) or shutil.which("trl")
    if trl_cli is None:
        pytest.skip("the trl command is not installed")
    # A small local model directory: the --smoke model (random weights) and the bundled tokenizer.
    cfg = ttg.resolve_config(["--smoke"])
    tok = ttg.load_tokenizer(cfg)
    model_dir = tmp_path / "tiny-qwen2"
    ttg.build_smoke_model(tok, 0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    port = free_port()
    log = (tmp_path / "vllm.log").open("w")
    proc = subprocess.Popen(
        [trl_cli, "vllm-serve", "--model", str(model_dir), "--host", "127.0.0.1"]
        + ["--port", str(port), "--gpu-memory-utilization", "0.2", "--enforce-eager"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        cfg = _server_cfg(port, "--model-id", str(model_dir), "--vllm-server-timeout", "300")
        ttg.check_vllm_server(cfg)
        gen = ttg.vllm_server_generate(ttg.server_url(cfg), str(model_dir))
        out = gen(["Hello", "What is 2 + 2?"], 3, {**SP, "max_tokens": 8})
        assert [len(g) for g in out] == [3, 3]
        for s in (s for g in out for s in g):
            assert isinstance(s.text, str) and 1 <= s.length <= 8
            assert not s.truncated or s.length == 8
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
