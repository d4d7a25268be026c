"""Answer extraction and sandboxed grading for GSM8K and MATH.

Equivalence is decided by math-verify (``parse`` + ``verify``), but never inside the caller's
process: a small pool of long-lived worker processes does the sympy work, each item has a hard
wall-clock deadline enforced by the parent with SIGKILL, and workers talk JSON lines over pipes.
Pathological answers (``9^{9^{9^9}}``, ``(10^8)!``) can therefore only cost one deadline and a
worker restart, never a hung trainer.

This module imports only the standard library at top level, so the trainer can import it
cheaply; the workers run this same file as a script (``python -I -S math_grader.py --worker``)
and import math-verify there, so a worker never imports torch, transformers or the trainer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

DATASETS = ("gsm8k", "math")

# ---------------------------------------------------------------------------------------------
# Pure string helpers (used by the parent for extraction and by the workers for normalization)
# ---------------------------------------------------------------------------------------------

# `\boxed` / `\fbox` not followed by another letter (so `\boxedx` is not a box).
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Escaped braces and `\\` are consumed as units so that `\{` never opens a group and `\\{`
# (line break followed by a group) still does.
_BRACE_TOKEN_RE = re.compile(r"\\[\\{}]|[{}]")
_SPACE_RE = re.compile(r"\s*")
_BARE_ARG_RE = re.compile(r"\s+([^\s$]+)")


def _brace_group_end(text: str, open_idx: int) -> int | None:
    """Index of the `}` closing the `{` at ``open_idx``, or None when it is never closed."""
    depth = 0
    for m in _BRACE_TOKEN_RE.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _all_group_ends(text: str) -> dict[int, int]:
    """Map every `{` that gets closed to its `}` in one linear pass."""
    stack: list[int] = []
    ends: dict[int, int] = {}
    for m in _BRACE_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            ends[stack.pop()] = m.start()
    return ends


def _box_span(text: str, cmd_end: int, ends: dict[int, int] | None) -> tuple[int, int] | None:
    """Where the argument of the box command ending at ``cmd_end`` lies in ``text``; None if it
    has no closed argument."""
    brace = _SPACE_RE.match(text, cmd_end).end()
    if brace < len(text) and text[brace] == "{":
        close = ends.get(brace) if ends is not None else _brace_group_end(text, brace)
        return None if close is None else (brace + 1, close)
    # `\boxed 5` form: the argument is the next whitespace-delimited token.
    m = _BARE_ARG_RE.match(text, cmd_end)
    if m is None:
        return None
    return m.start(1), m.start(1) + len(m.group(1).rstrip(".,;"))


def _box_argument(text: str, cmd_end: int, ends: dict[int, int] | None) -> str | None:
    """Argument of the box command ending at ``cmd_end``; None if it has no closed argument."""
    span = _box_span(text, cmd_end, ends)
    return None if span is None else text[span[0] : span[1]]


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in ``text``.

    Nested braces are handled; escaped braces (``\\{``) do not count. Runs in linear time even
    on many unclosed boxes: only the last box is scanned directly, and if that one is unclosed
    a single pass matches all braces at once.
    """
    cmd_ends = [m.end() for m in _BOX_CMD_RE.finditer(text)]
    if not cmd_ends:
        return None
    arg = _box_argument(text, cmd_ends[-1], None)
    if arg is not None:
        return arg
    ends = _all_group_ends(text)
    for cmd_end in reversed(cmd_ends[:-1]):
        arg = _box_argument(text, cmd_end, ends)
        if arg is not None:
            return arg
    return None


_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_INLINE_MATH_RE = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_NUMBER_IN_TEXT_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _after_answer_is(text: str, dataset: str) -> str | None:
    """The answer stated after the last "answer is" / "answer:" in ``text``."""
    last = None
    for last in _ANSWER_IS_RE.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + 500].lstrip(" \t*:")
    line = rest.split("\n", 1)[0].strip().strip("*").strip()
    if not line:
        return None
    if dataset == "gsm8k":
        # "The answer is 5 + 3 = 8": the result follows the last "=".
        line = line.rsplit("=", 1)[-1].replace("{,}", ",")
        m = _NUMBER_IN_TEXT_RE.search(line)
        return m.group() if m else None
    m = _INLINE_MATH_RE.search(line)
    if m is not None:
        return next(g for g in m.groups() if g is not None).strip() or None
    # Plain text: up to the end of the sentence (a period followed by space or end of line).
    ans = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip()
    return ans or None


def extract_answer(text: str, dataset: str) -> str | None:
    """The final answer stated in a completion, or None if it states none.

    Both datasets: the last ``\\boxed{}``. GSM8K then falls back to the text after the last
    ``####`` and then to "answer is X"; MATH falls back to "answer is $X$".
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if dataset == "gsm8k":
        idx = text.rfind("####")
        if idx >= 0:
            tail = text[idx + 4 : idx + 504].strip().split("\n", 1)[0].strip().rstrip(".")
            if tail:
                return tail
    return _after_answer_is(text, dataset)


def formatted_answer(text: str, dataset: str) -> str | None:
    """The answer a completion gives in the format asked of it, or None.

    One final answer: every closed box says the same non-empty thing (a restated answer, as in
    MATH's own "- OR -" solutions, counts once; two different answers, or a box nested in a box,
    count as none), and for GSM8K it is a number (GSM8K's answers always are, so a boxed word or
    a copied `\\boxed{ANSWER}` can never be right). This is what a format reward may pay for;
    anything looser was gamed by a 135M model within 8 GRPO steps (empty boxes, box spam)."""
    ends = _all_group_ends(text)
    ans = None
    inside_until = -1  # end of the last closed box's argument
    for m in _BOX_CMD_RE.finditer(text):
        if m.start() < inside_until:
            # A box in a box. Checked before anything is sliced: slicing every argument of
            # 200,000 nested boxes (1.4 MB) would copy ~140 GB.
            return None
        span = _box_span(text, m.end(), ends)
        if span is None:
            continue
        inside_until = span[1]
        arg = text[span[0] : span[1]]
        if ans is not None and arg != ans:
            return None
        ans = arg
    if ans is None:
        return None
    ans = ans.strip()
    if not ans:
        return None
    if dataset == "gsm8k" and _canonical_number(normalize_answer(ans, dataset)) is None:
        return None
    return ans


def gold_from_solution(solution: str, dataset: str) -> str:
    """Reference answer from a dataset row: GSM8K ``answer`` field or MATH ``solution`` field."""
    if dataset == "gsm8k":
        idx = solution.rfind("####")
        if idx < 0:
            raise ValueError("GSM8K solution has no '####' answer line")
        gold = solution[idx + 4 :].strip().split("\n", 1)[0].strip().replace(",", "")
        if not gold:
            raise ValueError("GSM8K solution has an empty '####' answer")
        return gold
    if dataset == "math":
        gold = last_boxed(solution)
        if gold is None or not gold.strip():
            raise ValueError("MATH solution has no \\boxed{} answer")
        return gold.strip()
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


_LATEX_NOISE_RE = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;: ]|~")
# Possessive runs: with `\s*\{?\s*` two runs could split one stretch of spaces every way, which
# is quadratic on `^` followed by a million spaces.
_DEGREE_RE = re.compile(r"\^\s*+(?:\{\s*+)?\\circ\s*+\}?")
_WS_RE = re.compile(r"\s+")
_FRAC_DIGITS_RE = re.compile(r"\\frac(\d)(\d)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
# A single number surrounded only by words/units/currency, e.g. "18 dollars", "\$18.00",
# "x = 18", "25\%": GSM8K answers are numbers, so the words around them carry no meaning.
_LONE_NUMBER_RE = re.compile(
    r"[A-Za-z\s$\\{}:=~*]*?(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)[A-Za-z\s$\\{}%.~*]*"
)
# `\text{5 inches}`: math-verify reads the whole \text{} as one symbol, so unwrap the number.
_TEXT_NUMBER_RE = re.compile(
    r"\\(?:text|textbf|mbox|mathrm)\{\s*(-?\d[\d,]*(?:\.\d+)?)\s*[A-Za-z][A-Za-z\s]*\}"
)


def _canonical_number(s: str) -> str | None:
    """Canonical decimal string of a plain number ("18.00" -> "18", "1,234" -> "1234").

    String work only, linear in the length: Decimal's normalize() raises Overflow on a
    million-digit number and rounds to 28 significant digits, which would make two long numbers
    that differ past the 28th digit one vote."""
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    if not s.isascii():  # `\d` matched other scripts' digits, e.g. Arabic-Indic
        import unicodedata

        s = s.translate({ord(c): str(unicodedata.decimal(c)) for c in set(s) if not c.isascii()})
    whole, _, frac = s.removeprefix("-").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    if out == "0":
        return "0"
    return "-" + out if s.startswith("-") else out


def normalize_answer(answer: str, dataset: str) -> str:
    """Cheap canonical form of an extracted answer, used as the majority-vote key.

    Plain numbers become canonical decimals (``$1,234.50`` -> ``1234.5``); for GSM8K a single
    number wrapped in words or units is reduced to that number. Other LaTeX only loses spacing,
    ``\\left``/``\\right``, ``\\dfrac`` and degree marks; real equivalence is math-verify's job.
    """
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = _LATEX_NOISE_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = _DEGREE_RE.sub("", s)
    s = _WS_RE.sub("", s).rstrip(".")
    s = _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)
    num = s.removeprefix("\\$").removeprefix("$")
    canon = _canonical_number(num)
    if canon is not None:
        return canon
    if len(answer) < 200:
        lone_re = _LONE_NUMBER_RE if dataset == "gsm8k" else _TEXT_NUMBER_RE
        m = lone_re.fullmatch(answer.strip())
        if m is not None:
            canon = _canonical_number(m.group(1))
            if canon is not None:
                return canon
    return s


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------


class _SoftTimeout(BaseException):
    """Raised by the worker's interval timer; BaseException so library `except Exception`
    blocks (math-verify, sympy) cannot swallow it."""


def _worker_main(config_json: str) -> None:
    cfg = json.loads(config_json)
    if os.getppid() != cfg["ppid"]:  # parent already gone
        os._exit(0)
    try:
        import ctypes

        # Die with the parent even while stuck in C code that never returns to Python.
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 == PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != cfg["ppid"]:
        os._exit(0)
    if cfg.get("mem_bytes"):
        try:
            import resource

            lim = int(cfg["mem_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ImportError, ValueError, OSError):
            pass
    # Keep a private copy of stdout for the protocol; anything a library prints goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.path[:0] = cfg["paths"]

    import logging

    # math-verify logs a warning for every disabled/expired internal timeout; we own timeouts.
    logging.disable(logging.CRITICAL)

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    soft_s = float(cfg["soft_timeout"])
    extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def _raise_soft(signum: int, frame: Any) -> None:
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, _raise_soft)

    cache_parse: dict[str, list] = {}
    cache_verdict: dict[tuple[str, str], bool] = {}
    cache_limit = 20000

    def parse_boxed(s: str) -> list:
        hit = cache_parse.get(s)
        if hit is None:
            # Wrapping in \boxed{} makes math-verify take the whole string as one answer;
            # its own timers are disabled because SIGALRM is ours (see _raise_soft).
            hit = parse("\\boxed{" + s + "}", extraction_config=extraction, parsing_timeout=None)
            if len(cache_parse) >= cache_limit:
                cache_parse.clear()
            cache_parse[s] = hit
        return hit

    def check(answer: str, gold: str, dataset: str) -> bool:
        norm_a = normalize_answer(answer, dataset)
        norm_g = normalize_answer(gold, dataset)
        if norm_a == norm_g:
            return True
        if _canonical_number(norm_a) is not None and _canonical_number(norm_g) is not None:
            return False  # two different plain numbers: no need for sympy
        key = (gold, answer)
        verdict = cache_verdict.get(key)
        if verdict is None:
            verdict = bool(verify(parse_boxed(gold), parse_boxed(answer), timeout_seconds=None))
            if len(cache_verdict) >= cache_limit:
                cache_verdict.clear()
            cache_verdict[key] = verdict
        return verdict

    # Warm up the LaTeX parser so the first real item does not pay for loading the grammar.
    check("\\frac{1}{2}", "0.5", "math")
    check("x=5", "5", "math")

    def send(obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[os.write(out_fd, data) :]

    send({"ready": True, "pid": os.getpid()})
    for raw in sys.stdin.buffer:
        try:
            msg = json.loads(raw)
        except ValueError:
            send({"i": -1, "c": False, "s": "error"})
            continue
        if "cmd" in msg:
            if msg["cmd"] == "modules":
                send({"i": msg["i"], "modules": sorted(sys.modules)})
            elif msg["cmd"] == "sleep":  # lets tests occupy a worker deterministically
                time.sleep(float(msg.get("s", 0)))
                send({"i": msg["i"], "c": False, "s": "ok"})
            continue
        status = "ok"
        correct = False
        if soft_s > 0:
            signal.setitimer(signal.ITIMER_REAL, soft_s)
        try:
            correct = check(msg["a"], msg["g"], msg["d"])
        except _SoftTimeout:
            status = "timeout"
        except RecursionError:
            status = "error"
        except MemoryError:
            status = "error"
        except Exception:
            status = "error"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        send({"i": msg["i"], "c": correct, "s": status})


# ---------------------------------------------------------------------------------------------
# Parent-side pool
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grade:
    correct: bool
    answer: str | None  # normalized extracted answer; equal strings vote together
    status: str  # "ok" | "no_answer" | "timeout" | "error"


# Modules the workers need; their install directories are the workers' whole sys.path.
_WORKER_PACKAGES = ("math_verify", "latex2sympy2_extended", "sympy", "mpmath", "antlr4")
_START_TIMEOUT_S = 60.0
# Small messages are pipelined a few deep per worker so a worker never idles waiting for the
# parent; big ones are only sent to an idle worker so a blocking write cannot stall the parent.
_PIPELINE_DEPTH = 4
_PIPELINE_MAX_BYTES = 8192


def _worker_paths() -> list[str]:
    paths: list[str] = []
    for name in _WORKER_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            if name in ("math_verify", "sympy"):
                raise ImportError(f"math_grader workers need the {name!r} package")
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        if root not in paths:
            paths.append(root)
    return paths


class _Worker:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.out_fd = proc.stdout.fileno()
        self.in_fd = proc.stdin.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.inflight: deque[tuple[int, int]] = deque()  # (message id, item index)
        self.head_since = 0.0  # when the head in-flight item started its deadline clock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc.wait()


class MathGrader:
    """Grades completions against gold answers in a pool of math-verify worker processes.

    ``grade`` is thread-safe (calls are serialized) and uses no signals in the calling process,
    so it may run on any thread. Each item that needs sympy gets a hard deadline of ``timeout``
    seconds; an overrunning worker is SIGKILLed and replaced and only that item is marked
    ``"timeout"``. Completions are cut to their last ``max_chars`` characters before extraction.

    ``mem_limit_mb`` caps each worker's address space (a blow-up becomes an ``"error"`` item, not
    an OOM); ``soft_timeout=False`` disables the in-worker early timer so every overrun goes
    through the kill-and-replace path (used by the tests to exercise it).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout: float = 2.0,
        max_chars: int = 4000,
        mem_limit_mb: int | None = 4096,
        soft_timeout: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.n_workers = workers
        self.timeout = float(timeout)
        self.max_chars = int(max_chars)
        self._lock = threading.Lock()
        self._closed = False
        self._msg_id = 0
        self._config = json.dumps(
            {
                "paths": _worker_paths(),
                "ppid": os.getpid(),
                # The worker's own timer fires early enough that it can still answer in time,
                # which saves a process restart; the parent's SIGKILL stays the real guarantee.
                "soft_timeout": max(0.05, self.timeout * 0.8 - 0.05) if soft_timeout else 0.0,
                "mem_bytes": mem_limit_mb * 2**20 if mem_limit_mb else None,
            }
        )
        # Workers are started from one long-lived thread: PR_SET_PDEATHSIG fires when the
        # spawning *thread* exits, so spawning from a short-lived caller thread would kill them.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-grader-spawn")
        self._workers: list[_Worker] = [self._spawn() for _ in range(workers)]

    # -- process management -------------------------------------------------------------------

    def _spawn_now(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--worker", self._config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            close_fds=True,
            bufsize=0,
        )

    def _spawn(self) -> _Worker:
        return _Worker(self._spawner.submit(self._spawn_now).result())

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        nw = self._spawn()
        self._workers[self._workers.index(w)] = nw
        return nw

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (for monitoring and tests)."""
        return [w.pid for w in self._workers]

    def close(self) -> None:
        """Kill all workers and reap them; the grader cannot be used afterwards."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                w.kill()
            self._workers = []
            self._spawner.shutdown(wait=True)

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- I/O helpers ------------------------------------------------------------------------

    def _next_id(self) -> int:
        self._msg_id += 1
        return self._msg_id

    @staticmethod
    def _write(w: _Worker, data: bytes) -> bool:
        try:
            while data:
                data = data[os.write(w.in_fd, data) :]
        except OSError:
            return False
        return True

    @staticmethod
    def _read_lines(w: _Worker) -> list[dict] | None:
        """Complete messages available from ``w``; None on EOF (worker died)."""
        try:
            chunk = os.read(w.out_fd, 1 << 16)
        except OSError:
            return None
        if not chunk:
            return None
        w.buf += chunk
        *lines, w.buf = w.buf.split(b"\n")
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except ValueError:
            return None  # a worker that breaks the protocol is treated as crashed

    # -- grading ------------------------------------------------------------------------------

    def grade(self, completions: list[str], golds: list[str], dataset: str) -> list[Grade]:
        """Grade ``completions[i]`` against ``golds[i]``; results come back in the same order."""
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        if len(completions) != len(golds):
            raise ValueError("completions and golds must have the same length")
        results: list[Grade | None] = [None] * len(completions)
        answers: list[str | None] = [None] * len(completions)
        jobs: deque[tuple[int, bytes]] = deque()
        for i, (text, gold) in enumerate(zip(completions, golds, strict=True)):
            text = text[-self.max_chars :] if self.max_chars > 0 else text
            raw = extract_answer(text, dataset)
            if raw is None:
                results[i] = Grade(False, None, "no_answer")
                continue
            answers[i] = normalize_answer(raw, dataset)
            gold = self._coerce_gold(gold, dataset)
            jobs.append((i, json.dumps({"a": raw, "g": gold, "d": dataset})[1:-1].encode()))
        if jobs:
            with self._lock:
                if self._closed:
                    raise RuntimeError("MathGrader is closed")
                for i, status, correct in self._run(jobs):
                    results[i] = Grade(correct, answers[i], status)
        return [
            r if r is not None else Grade(False, answers[i], "error") for i, r in enumerate(results)
        ]

    @staticmethod
    def _coerce_gold(gold: str, dataset: str) -> str:
        # Accept a raw dataset field as gold too, so a caller passing the whole solution works.
        if dataset == "gsm8k" and "####" in gold:
            return gold_from_solution(gold, dataset)
        if dataset == "math" and ("\\boxed" in gold or "\\fbox" in gold):
            return last_boxed(gold) or gold
        return gold.strip()

    def _run(self, jobs: deque[tuple[int, bytes]]) -> list[tuple[int, str, bool]]:
        """Dispatch ``(item index, JSON body)`` jobs; returns ``(index, status, correct)``."""
        done: list[tuple[int, str, bool]] = []
        pending = jobs
        bodies = dict(jobs)
        by_fd: dict[int, _Worker] = {}
        start_failures = 0
        # Collect "ready" lines that arrived since the last batch, so that the first dispatch
        # round already sees every started worker.
        for w in self._workers:
            if not w.ready and select.select([w.out_fd], [], [], 0)[0]:
                msgs = self._read_lines(w)
                w.ready = bool(msgs and any(m.get("ready") for m in msgs))
                if msgs is None:
                    self._replace(w)

        def fail_head(w: _Worker, status: str) -> _Worker:
            # The head item is the one the worker was running: it gets the blame; the items
            # queued behind it were never started and go back to the queue.
            if w.inflight:
                done.append((w.inflight.popleft()[1], status, False))
                for _, idx in reversed(w.inflight):
                    pending.appendleft((idx, bodies[idx]))
            return self._replace(w)

        while pending or any(w.inflight for w in self._workers):
            now = time.monotonic()
            # Deal items out round-robin, one pipeline slot per worker per round, so a batch is
            # spread evenly and a slow item delays as few others as possible.
            dead: set[int] = set()
            for depth in range(1, _PIPELINE_DEPTH + 1):
                for w in self._workers:
                    if not pending:
                        break
                    if not w.ready or w.pid in dead or len(w.inflight) >= depth:
                        continue
                    idx, body = pending[0]
                    if w.inflight and len(body) > _PIPELINE_MAX_BYTES:
                        continue
                    mid = self._next_id()
                    if not self._write(w, b'{"i":%d,%s}\n' % (mid, body)):
                        dead.add(w.pid)  # its EOF is handled below
                        continue
                    pending.popleft()
                    if not w.inflight:
                        w.head_since = now
                    w.inflight.append((mid, idx))
            by_fd = {w.out_fd: w for w in self._workers}
            deadlines = [
                (w.head_since + self.timeout) if w.ready else (w.started + _START_TIMEOUT_S)
                for w in self._workers
                if w.inflight or not w.ready
            ]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            readable, _, _ = select.select(list(by_fd), [], [], wait)
            for fd in readable:
                w = by_fd[fd]
                msgs = self._read_lines(w)
                if msgs is None:
                    if not w.ready:
                        start_failures += 1
                        if start_failures >= 3 * self.n_workers:
                            raise RuntimeError("math_grader workers fail to start (see stderr)")
                    fail_head(w, "error")
                    continue
                for m in msgs:
                    if m.get("ready"):
                        w.ready = True
                        start_failures = 0
                        continue
                    if not w.inflight or m.get("i") != w.inflight[0][0]:
                        continue  # stray reply (e.g. to a debug command); not ours
                    _, idx = w.inflight.popleft()
                    done.append((idx, m.get("s", "error"), bool(m.get("c"))))
                    w.head_since = time.monotonic()
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.inflight and now > w.head_since + self.timeout:
                    fail_head(w, "timeout")
                elif not w.ready and now > w.started + _START_TIMEOUT_S:
                    raise RuntimeError("math_grader worker did not start in time")
        return done

    def _command(self, cmd: dict, worker: int = 0, wait_s: float = 60.0) -> dict:
        """Send a debug command to one idle worker and return its reply (tests, diagnostics)."""
        with self._lock:
            w = self._workers[worker]
            deadline = time.monotonic() + wait_s
            mid = self._next_id()
            sent = False
            while time.monotonic() < deadline:
                if w.ready and not sent:
                    if not self._write(w, json.dumps({**cmd, "i": mid}).encode() + b"\n"):
                        break
                    sent = True
                r, _, _ = select.select([w.out_fd], [], [], max(0.0, deadline - time.monotonic()))
                if not r:
                    break
                msgs = self._read_lines(w)
                if msgs is None:
                    break
                for m in msgs:
                    if m.get("ready"):
                        w.ready = True
                    elif m.get("i") == mid:
                        return m
            raise RuntimeError(f"worker did not answer {cmd!r}")

    def worker_modules(self) -> list[str]:
        """Names in a worker's ``sys.modules`` (to check what the sandbox imports)."""
        return self._command({"cmd": "modules"})["modules"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: math_grader.py --worker CONFIG_JSON (started by MathGrader)")
