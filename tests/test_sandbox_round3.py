"""The sandbox's third red-team round: each hole is written as the attack a policy would find.

One worker per sandbox where the attack needs "the next program on the same worker".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from conftest import run_unprivileged

import code_sandbox
from code_sandbox import Program, Sandbox

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's isolation is Linux-only"
)

MBPP = Path(__file__).resolve().parent / "fixtures" / "mbpp" / "test.jsonl"
PREFIX = "QzMark"  # what the scanner looks for; the secret part is only known by its hash
SECRET = uuid.uuid4().hex[:16]
MARK = PREFIX + SECRET
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
GOOD = Program("def f(x):\n    return x + 1\n", ["assert f(1) == 2"])


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=1, timeout=5.0) as b:
        yield b


# ---- 1. Nothing of an earlier job in a child's memory ----------------------------------------

# The previous program leaves its mark in its source, its reply and a clean child's value.
PLANTER = f"def f():\n    return {MARK!r}\n"
PLANTER_TESTS = [f"assert f() == ''.join([{PREFIX!r}, {SECRET!r}])"]

# Finds a mark by its hash: the scanner's own memory holds the prefix, never the secret.
SCANNER = """
import ctypes, gc, hashlib, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
libc.write.restype = ctypes.c_ssize_t
PAGE = 4096

def hits(data, prefix, digest, n):
    found, at = 0, data.find(prefix)
    while at >= 0:
        tail = data[at + len(prefix): at + len(prefix) + n]
        if hashlib.sha256(tail).hexdigest() == digest:
            found += 1
        at = data.find(prefix, at + 1)
    return found

def page(r, w, addr):
    # write() from an unmapped address fails with EFAULT instead of crashing us
    if libc.write(w, addr, PAGE) != PAGE:
        return None
    return os.read(r, PAGE)

def memory(prefix, digest, n):
    r, w = os.pipe()
    prefix = prefix.encode()
    seeds = {id(o) & ~(PAGE - 1) for o in gc.get_objects()[::50]}
    seeds.add(id(sys) & ~(PAGE - 1))
    done, found = set(), 0
    for seed in sorted(seeds):
        if seed in done:
            continue
        for step in (PAGE, -PAGE):
            addr, gap, carry = seed if step > 0 else seed - PAGE, 0, b''
            while gap < 64 and len(done) < 60000:
                if addr in done:
                    break
                done.add(addr)
                data = page(r, w, addr)
                if data is None:
                    gap += 1
                    carry = b''
                else:
                    gap = 0
                    chunk = carry + data if step > 0 else data + carry
                    found += hits(chunk, prefix, digest, n)
                    carry = data[:64] if step < 0 else data[-64:]
                addr += step
    return found

def frames(prefix, digest, n):
    found, f = 0, sys._getframe()
    while f is not None:
        text = repr(f.f_locals).encode(errors='replace')
        found += hits(text, prefix.encode(), digest, n)
        f = f.f_back
    for o in gc.get_objects():
        if isinstance(o, dict):
            text = repr(o).encode(errors='replace')
            found += hits(text, prefix.encode(), digest, n)
    return found

def scan(prefix, digest, n):
    return memory(prefix, digest, n) + frames(prefix, digest, n)

def own(prefix):
    # a mark of our own, made at run time, must be found: the scanner works
    secret = ''.join(reversed('{own}'))
    keep = (prefix + secret) * 1
    found = scan(prefix, hashlib.sha256(secret.encode()).hexdigest(), len(secret))
    return found >= 1 and keep is not None
"""


def scanner() -> Program:
    own = uuid.uuid4().hex[:16]
    code = SCANNER.replace("{own}", own[::-1])
    tests = [f"assert own({PREFIX!r}) is True", f"assert scan({PREFIX!r}, {DIGEST!r}, 16) == 0"]
    return Program(code, tests)


def test_a_child_finds_nothing_of_the_previous_program_in_its_memory(box):
    got = box.run([Program(PLANTER, PLANTER_TESTS)])
    assert got[0].status == "passed", got
    got = box.run([scanner()])
    assert got[0].passed == 2, got  # the scanner finds its own mark and nothing of the planter


REPLAY = """
import os, sys
# Task-agnostic: walk up to the worker's frames and hand in the last reply's report as our own.
fr = sys._getframe()
while fr is not None:
    for v in list(fr.f_locals.values()):
        if isinstance(v, dict) and isinstance(v.get('out'), str) and v['out']:
            os.write(3, v['out'].encode())
            os._exit(0)
    fr = fr.f_back
"""


def test_replaying_the_previous_report_scores_nothing(box):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    for row in rows[:3]:
        gold = Program(row["code"], row["test_list"], row["test_setup_code"])
        replay = Program(REPLAY, row["test_list"], row["test_setup_code"])
        got = box.run([gold])
        assert got[0].status == "passed", got
        got = box.run([replay])
        assert got[0].passed == 0, got


# ---- 2. Only the solution's own calls run in the child -----------------------------------------

ANY_SUB = "class Z:\n    def __sub__(self, o):\n        return 0\n    __rsub__ = __sub__\n"
ALWAYS_EQ = "class E:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
PATCH_ISCLOSE = "import math\nmath.isclose = lambda *a, **k: True\n"
WRAPPED = {
    # name: (attack code, test, setup, honest code)
    "abs-difference": (
        ANY_SUB + "def f(x):\n    return Z()",
        "assert abs(f(1) - 0.123456) < 1e-9",
        "",
        "def f(x):\n    return 0.123456",
    ),
    "difference-is-zero": (
        ANY_SUB + "def f(x):\n    return Z()",
        "assert f(1) - 0.123456 == 0",
        "",
        "def f(x):\n    return 0.123456",
    ),
    "isclose-compared-to-true": (
        PATCH_ISCLOSE + "def f(x):\n    return 0",
        "assert math.isclose(f(1), 0.123456) == True",
        "",
        "def f(x):\n    return 0.123456",
    ),
    "isclose-setup-tolerance": (
        PATCH_ISCLOSE + "def f(x):\n    return 0",
        "assert math.isclose(f(1), 0.123456, rel_tol=TOL)",
        "import math\nTOL = 1e-9",
        "def f(x):\n    return 0.123456",
    ),
    "isclose-imported-by-setup": (
        PATCH_ISCLOSE + "def f(x):\n    return 0",
        "assert isclose(f(1), 0.123456, abs_tol=TOL)",
        "from math import isclose\nTOL = 1e-9",
        "def f(x):\n    return 0.123456",
    ),
    "all-over-zip": (
        ALWAYS_EQ + "def f(x):\n    return [E(), E(), E()]",
        "assert all(a == b for a, b in zip(f(1), [1, 2, 3]))",
        "",
        "def f(x):\n    return [1, 2, 3]",
    ),
    "nested-comparison": (
        ALWAYS_EQ + "def f(x):\n    return E()",
        "assert (f(1) == 7) == True",
        "",
        "def f(x):\n    return 7",
    ),
    "len-of-result": (
        "import builtins\nbuiltins.len = lambda *a: 3\ndef f(x):\n    return []",
        "assert len(f(1)) == 3",
        "",
        "def f(x):\n    return [1, 2, 3]",
    ),
    "assigned-then-wrapped": (
        ANY_SUB + "def f(x):\n    return Z()",
        "res = f(1)\nassert abs(res - 0.5) < 1e-9",
        "",
        "def f(x):\n    return 0.5",
    ),
    "sorted-of-result": (
        "import builtins\nbuiltins.sorted = lambda *a, **k: [1, 2]\ndef f(x):\n    return 0",
        "assert sorted(f(1)) == [1, 2]",
        "",
        "def f(x):\n    return (2, 1)",
    ),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_a_wrapper_around_the_result_is_judged_outside_the_child(box, name):
    attack, test, setup, honest = WRAPPED[name]
    got = box.run([Program(attack, [test], setup), Program(honest, [test], setup)])
    assert got[0].passed == 0, got
    assert got[1].status == "passed", got


UNSPLITTABLE = {
    "loop": "for i in range(3):\n    assert f(i) == i + 1",
    "call-in-comprehension": "assert all(f(i) == i + 1 for i in range(3))",
    "walrus": "assert (y := f(1)) == 2",
}


def test_shapes_that_cannot_be_split_fail_closed_and_are_counted(box):
    honest = "def f(x):\n    return x + 1"
    before = sum(code_sandbox.UNSPLITTABLE.values())
    got = box.run([Program(honest, [t, "assert f(1) == 2"]) for t in UNSPLITTABLE.values()])
    assert [(r.passed, r.total) for r in got] == [(1, 2)] * len(UNSPLITTABLE), got
    assert sum(code_sandbox.UNSPLITTABLE.values()) - before == len(UNSPLITTABLE)


# ---- 5. Scratch has an inode cap ---------------------------------------------------------------

MANY_FILES = """
import os
import shutil
def f():
    n = 0
    try:
        while n < 200000:
            os.close(os.open(str(n), os.O_CREAT | os.O_WRONLY, 0o600))
            n += 1
    except OSError:
        pass
    return n
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the private scratch tmpfs needs namespaces")
def test_scratch_has_an_inode_cap(box):
    got = box.run([Program(MANY_FILES, ["assert f() < 10000"]), GOOD])
    assert got == [code_sandbox.Result(1, 1, "passed", ""), code_sandbox.Result(1, 1, "passed", "")]


# ---- 4. Memory the child creates is bounded, memfd included ------------------------------------

MEMFD = """
import os
import shutil
def f():
    held, fds = 0, []
    chunk = b'x' * (1 << 20)
    try:
        for i in range(48):
            fd = os.memfd_create('m%d' % i)
            fds.append(fd)
            for _ in range(15):
                os.write(fd, chunk)
                held += 1
    except OSError:
        pass
    return held
"""


def test_memfd_cannot_escape_the_memory_limit():
    with Sandbox(workers=1, timeout=5.0, memory_mb=128) as b:
        got = b.run([Program(MEMFD, ["assert f() < 128"])])
    assert got[0].status == "passed", got


# ---- 3. Reports are small and cheap to decode ----------------------------------------------------


def forged_report(value: str, index: int = 1) -> str:
    """A program that writes its own report, claiming that its first call returned `value`
    (Python source of a JSON-able value, built in the child: the program stays short)."""
    code = (
        "import json, os\n"
        "lines = [['code', 'ok'], ['setup', 'ok'], [0, 'ok'], [INDEX, 'v', VALUE], ['end']]\n"
        "data = ''.join(json.dumps(x) + '\\n' for x in lines).encode()\n"
        "view = memoryview(data)\n"
        "while view:\n"
        "    view = view[os.write(3, view):]\n"
        "os._exit(0)\n"
    )
    return code.replace("VALUE", value).replace("INDEX", str(index))


def test_a_report_of_tiny_containers_costs_the_trainer_milliseconds(box, monkeypatch):
    import time

    spent = []
    parse = code_sandbox._parse_report

    def timed(*args):  # noqa: ANN002, ANN202
        t0 = time.perf_counter()
        try:
            return parse(*args)
        finally:
            spent.append(time.perf_counter() - t0)

    monkeypatch.setattr(code_sandbox, "_parse_report", timed)
    just_under_old_cap = forged_report("['l', *[['l']] * 550000]")
    got = box.run([Program(just_under_old_cap, ["assert f(1) == 2"]), GOOD])
    assert got[0].passed == 0 and got[1].status == "passed", got
    assert max(spent) < 0.5, spent  # it took ~4 s with a 4 MB cap


def test_decoded_elements_are_capped():
    many = ["l", *[["l"]] * (code_sandbox._MAX_ELEMENTS + 1)]
    text = json.dumps([1, "v", many]) + "\n"
    with pytest.raises(ValueError):
        code_sandbox._parse_report(text, 2)
    fits = ["l", *[["l"]] * (code_sandbox._MAX_ELEMENTS // 2 - 1)]
    vals = code_sandbox._parse_report(json.dumps([1, "v", fits]) + "\n", 2)[0]
    assert len(vals[1]) == code_sandbox._MAX_ELEMENTS // 2 - 1


# ---- 6. No sockets at all; no file locks ------------------------------------------------------

SOCKETS = """
import socket
def made():
    out = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        try:
            socket.socket(socket.AF_UNIX, kind)
            out.append(int(kind))
        except OSError:
            pass
    try:
        socket.socketpair()
        out.append('pair')
    except OSError:
        pass
    return out

def reach(path, token):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(token.encode())
        return True
    except OSError:
        return False
"""


def shared_dir() -> Path | None:
    """A host directory outside /tmp (the child's /tmp and /dev/shm are its own)."""
    here = Path(__file__).resolve().parent
    if str(here).startswith(("/tmp/", "/dev/shm/")) or not os.access(here, os.W_OK):
        return None
    return here


def test_the_child_can_create_no_socket_and_reach_no_socket_file(box):
    import socket
    import tempfile

    base = shared_dir()
    if base is None:
        pytest.skip("the repository is in /tmp or read-only: no socket file to put outside")
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        os.chmod(d, 0o777)
        path = str(d / "s")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(4)
        server.settimeout(0.5)
        tests = ["assert made() == []", f"assert reach({path!r}, {SECRET!r}) is False"]
        got = box.run([Program(SOCKETS, tests)])
        assert got[0].status == "passed", got
        with pytest.raises(socket.timeout):
            server.accept()
        server.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


LOCKS = """
import fcntl, os
def locks():
    got = []
    fd = os.open('/dev/null', os.O_RDONLY)  # a file every program can open
    for name, call in (
        ('flock', lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
        ('lockf', lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
        ('getlk', lambda: fcntl.fcntl(fd, fcntl.F_GETLK, bytes(32))),
    ):
        try:
            call()
            got.append(name)
        except OSError:
            pass
    return got
"""


def test_file_locks_are_refused(box):
    got = box.run([Program(LOCKS, ["assert locks() == []"])])
    assert got[0].status == "passed", got


# ---- 7. Values the encoder must carry ----------------------------------------------------------

FRACTION_TEST = "assert f() == Fraction(1, 3)"


def test_fractions_and_decimals_are_carried_and_a_patched_module_buys_nothing(box):
    setup = "from fractions import Fraction"
    gold = Program(
        "from fractions import Fraction\ndef f():\n    return Fraction(1, 3)",
        [FRACTION_TEST],
        setup,
    )
    dec = Program(
        "from decimal import Decimal\ndef f():\n    return Decimal('1.10')",
        ["assert f() == Decimal('1.1')"],
        "from decimal import Decimal",
    )
    patched = Program(
        "import fractions\nfractions.Fraction.__eq__ = lambda s, o: True\n"
        "def f():\n    return fractions.Fraction(0)",
        [FRACTION_TEST],
        setup,
    )
    got = box.run([gold, dec, patched])
    assert [r.status for r in got[:2]] == ["passed", "passed"], got
    assert got[2].passed == 0, got


def test_the_hand_assembled_filter_refuses_the_same():
    progs = [
        Program(SOCKETS, ["assert made() == []"]),
        Program(LOCKS, ["assert locks() == []"]),
        Program(MEMFD, ["assert f() == 0"]),
    ]
    with Sandbox(workers=1, timeout=5.0, _seccomp_backend="bpf") as b:
        assert b._info["seccomp_backend"] == "bpf"
        got = b.run(progs)
    assert [r.status for r in got] == ["passed"] * 3, got


# ---- 7. stat() does not reveal the host's files ------------------------------------------------

STAT = """
import os
def seen(paths):
    return [p for p in paths if os.path.lexists(p)]
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the hidden host tree needs a mount namespace")
def test_host_paths_are_not_visible_to_stat(box):
    import tempfile

    base = shared_dir()
    if base is None:
        pytest.skip("the repository is in /tmp or read-only")
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        secret = d / "answers.json"
        secret.write_text("{}")
        here = str(Path(__file__).resolve())
        paths = [str(secret), str(d), here, "/etc/hostname", "/etc/passwd"]
        paths = [p for p in paths if os.path.lexists(p)]
        got = box.run([Program(STAT, [f"assert seen({paths!r}) == []"])])
        assert got[0].status == "passed", (got, paths)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- The whole round at once -------------------------------------------------------------------


def round3_attacks() -> list[Program]:
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    here = str(Path(__file__).resolve())
    out = [Program(scanner().code, [f"assert scan({PREFIX!r}, {DIGEST!r}, 16) >= 1"])]
    out += [Program(REPLAY, r["test_list"], r["test_setup_code"]) for r in rows[:8]]
    out += [Program(attack, [test], setup) for attack, test, setup, _ in WRAPPED.values()]
    always = ALWAYS_EQ + "def f(x):\n    return E()"
    out += [Program(always, [t]) for t in UNSPLITTABLE.values()]
    out += [
        Program(MANY_FILES, ["assert f() >= 10000"]),
        Program(MEMFD, ["assert f() >= 128"]),
        Program(SOCKETS, ["assert made()"]),
        Program(LOCKS, ["assert locks()"]),
        Program(forged_report("['l', *[['l']] * 550000]"), ["assert f(1) == 2"]),
        Program(
            "import fractions\nfractions.Fraction.__eq__ = lambda s, o: True\n"
            "def f():\n    return fractions.Fraction(0)",
            [FRACTION_TEST],
            "from fractions import Fraction",
        ),
        Program(STAT, [f"assert seen([{here!r}])"]),
    ]
    return out


def test_round_three_attacks_mixed_into_512_gold_programs():
    import random

    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    gold = [Program(r["code"], r["test_list"], r["test_setup_code"]) for r in rows]
    gold = [gold[i % len(gold)] for i in range(512)]
    hostile = round3_attacks()
    programs = list(gold)
    rng = random.Random(0)
    where = sorted(rng.sample(range(len(gold) + len(hostile)), len(hostile)))
    for pos, prog in zip(where, hostile, strict=True):
        programs.insert(pos, prog)
    with Sandbox(workers=2, timeout=2.0) as b:
        planted = b.run([Program(PLANTER, PLANTER_TESTS)] * 2)  # marks for the scanner to find
        got = b.run(programs)
    assert [r.status for r in planted] == ["passed"] * 2
    hostile_at = set(where)
    gold_results = [r for i, r in enumerate(got) if i not in hostile_at]
    hostile_results = [r for i, r in enumerate(got) if i in hostile_at]
    assert len(gold_results) == 512
    assert [r for r in gold_results if r.status != "passed"] == []
    assert [r for r in hostile_results if r.status == "passed"] == [], hostile_results


KEEPS_WORKER = """
import json, sys
sys.path.insert(0, {root!r})
from code_sandbox import Program, Sandbox
good = Program("def f(x):\\n    return x + 1", ["assert f(1) == 2"])
with Sandbox(workers=1, timeout=2.0) as box:
    pids = []
    for _ in range(3):
        box.run([good])
        pids.append(box._pool[0].info["pid"])
print(json.dumps(pids))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="root + setpriv")
def test_an_unprivileged_worker_is_not_replaced_after_every_program():

    root = str(Path(__file__).resolve().parents[1])
    proc = run_unprivileged(KEEPS_WORKER.format(root=root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(set(json.loads(proc.stdout))) == 1, proc.stdout


def test_iterators_a_solution_returns_are_carried_as_iterators(box):
    tests = ["assert list(f(3)) == [0, 2, 4]", "assert sorted(f(3), reverse=True) == [4, 2, 0]"]
    gen = "def f(n):\n    return (2 * i for i in range(n))"
    lazy = "def f(n):\n    return map(lambda i: 2 * i, range(n))"
    rng = "def f(n):\n    return range(0, 2 * n, 2)"
    direct = Program(gen, ["assert f(3) == [0, 2, 4]"])  # a generator is no list, in Python too
    got = box.run([Program(gen, tests), Program(lazy, tests), Program(rng, tests), direct])
    assert [r.passed for r in got] == [2, 2, 2, 0], got


PIPES = """
import fcntl, os
def grown():
    r, w = os.pipe()
    try:
        return fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MiB of kernel memory a pipe
    except OSError:
        return 0
"""


def test_pipe_buffers_cannot_grow():
    progs = [Program(PIPES, ["assert grown() == 0"])]
    for backend in ("libseccomp", "bpf"):
        with Sandbox(workers=1, timeout=5.0, _seccomp_backend=backend) as b:
            assert b.run(progs)[0].status == "passed", backend
