"""The sandbox's second red-team round: each hole is written as the attack a policy would find.

Workers are pinned to one per sandbox where the attack needs "the next program on the same
worker" to be deterministic.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import run_unprivileged

import code_sandbox
from code_sandbox import Program, Result, Sandbox

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's isolation is Linux-only"
)

MBPP = Path(__file__).resolve().parent / "fixtures" / "mbpp" / "test.jsonl"
TOKEN = uuid.uuid4().hex[:12]
KEY = random.SystemRandom().randrange(1 << 20, 1 << 30)  # SysV key no one else uses
SHM_SIZE = (1 << 20) + 3 * 4096 + KEY % 4096 * 4096  # an odd size to spot IPC_PRIVATE leftovers
MQ_NAME = f"/sandbox-{TOKEN}"
GOOD = Program("def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(2) == 3"])
P61 = 2**61 - 1  # every multiple has the same hash as 0


@pytest.fixture(scope="module", autouse=True)
def remove_host_ipc():
    """Whatever an attack managed to leave on the host goes away with the module."""
    yield
    libc = ctypes.CDLL(None, use_errno=True)
    for kind, ctl in (("shm", libc.shmctl), ("sem", libc.semctl), ("msg", libc.msgctl)):
        for line in host_ipc().get(kind, []):
            ctl(int(line.split()[1]), 0, None)  # IPC_RMID
    host_mq_exists()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=1, timeout=2.0) as b:
        yield b


def host_ipc() -> dict[str, list[str]]:
    """SysV objects on the host carrying our key or our odd segment size."""
    found: dict[str, list[str]] = {}
    for kind in ("shm", "sem", "msg"):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        hits = []
        for line in lines:
            cols = line.split()
            if int(cols[0]) == KEY or (kind == "shm" and int(cols[3]) == SHM_SIZE):
                hits.append(line)
        found[kind] = hits
    return found


def host_mq_exists() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.mq_open(MQ_NAME.encode(), os.O_RDONLY)
    if fd >= 0:
        libc.mq_close(fd)
        libc.mq_unlink(MQ_NAME.encode())
        return True
    return False


# ---- 1. SysV and POSIX IPC -----------------------------------------------------------------

IPC_WRITER = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def attack():
    made = []
    for key in ({KEY}, 0):  # a named segment to pass data on, an IPC_PRIVATE one to pin memory
        shmid = libc.shmget(key, {SHM_SIZE}, 0o1666)
        if shmid >= 0:
            made.append('shm')
            addr = libc.shmat(shmid, None, 0)
            if addr and addr != ctypes.c_void_p(-1).value:
                ctypes.memmove(addr, b'{TOKEN}', 12)
    if libc.semget({KEY}, 1, 0o1666) >= 0:
        made.append('sem')
    if libc.msgget({KEY}, 0o1666) >= 0:
        made.append('msg')
    if libc.mq_open(b'{MQ_NAME}', os.O_CREAT | os.O_RDWR, 0o666, None) >= 0:
        made.append('mq')
    return made
"""

IPC_READER = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
def read():
    shmid = libc.shmget({KEY}, 0, 0)
    if shmid < 0:
        return ''
    addr = libc.shmat(shmid, None, 0)
    return ctypes.string_at(addr, 12).decode()
"""


def test_ipc_objects_cannot_be_created_shared_or_left_behind(box):
    assert not any(host_ipc().values())
    writer = Program(IPC_WRITER, ["assert attack() == []"])
    reader = Program(IPC_READER, [f"assert read() == {TOKEN!r}"])
    got = box.run([writer, reader])
    assert got[0].status == "passed", got  # the child made no IPC object at all
    assert got[1].passed == 0, got  # and a later program on the same worker finds nothing
    assert not any(host_ipc().values()), host_ipc()
    assert not host_mq_exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces are only guaranteed as root")
def test_ipc_namespace_layer(box):
    assert box.layers["ipcns"]
    assert "ipcns" in box.describe()


# ---- 2. A report that stalls the parent -----------------------------------------------------


def forged_report(value: str) -> str:
    """A program that writes its own report, claiming that probe 0 returned `value` (Python
    source of a JSON-able value, built in the child: the program itself stays short)."""
    return (
        "import json, os\nlines = [['code', 'ok'], ['setup', 'ok'], [0, 'v', VALUE], ['end']]\n"
        "data = ''.join(json.dumps(x) + '\\n' for x in lines).encode()\n"
        "view = memoryview(data)\nwhile view:\n    view = view[os.write(3, view):]\nos._exit(0)\n"
    ).replace("VALUE", value)


COLLIDING = "['s', *[k * (2**61 - 1) for k in range(1, {n})]]"


def test_colliding_hashes_are_refused_by_the_decoder():
    ints = [k * P61 for k in range(1, 3001)]
    with pytest.raises(ValueError):
        code_sandbox._decode(["s", *ints])
    with pytest.raises(ValueError):
        code_sandbox._decode(["S", *ints])
    with pytest.raises(ValueError):
        code_sandbox._decode(["d", *[x for k in ints for x in (k, 0)]])
    # Honest sets and dicts still decode to what they are.
    assert code_sandbox._decode(["s", 1, 2, -1, -2, "a"]) == {1, 2, -1, -2, "a"}
    assert code_sandbox._decode(["d", 1, ["l", 2], "k", None]) == {1: [2], "k": None}


def test_colliding_hash_report_does_not_stall_other_programs():
    # About 1 MB of ints that all hash alike: quadratic to put in a set.
    hostile = Program(forged_report(COLLIDING.format(n=45000)), ["assert f(1)"])
    # Honest programs still running while the parent looks at the hostile report.
    slow = "import time\ntime.sleep(0.8)\ndef f(x):\n    return x + "
    honest = [Program(f"{slow}{i}", [f"assert f(0) == {i}"]) for i in range(4)]
    with Sandbox(workers=2, timeout=2.0) as b:
        got = b.run([hostile, *honest])
    assert [r.status for r in got[1:]] == ["passed"] * 4, got
    assert got[0].status != "passed"


# ---- 3. One program sinks the next -----------------------------------------------------------

SINKERS = {
    "chmod-base-read-only": "import os\nos.chmod('..', 0o555)",
    "chmod-base-zero": "import os\nos.chmod('..', 0)",
    "precreate-next-dirs": (
        "import os\nme = int(os.path.basename(os.getcwd()))\n"
        "for n in range(me + 1, me + 40):\n    d = f'../{n}'\n"
        "    os.makedirs(d + '/x/y')\n    os.chmod(d + '/x', 0)\n    os.chmod(d, 0o500)"
    ),
    "chmod-own-dir": "import os\nos.makedirs('a/b')\nos.chmod('a/b', 0)\nos.chmod('.', 0)",
}


@pytest.mark.parametrize("name", list(SINKERS))
def test_a_program_cannot_sink_the_next_one(box, name):
    got = box.run([Program(SINKERS[name], ["assert f(1) == 2"]), GOOD, GOOD])
    assert [r.status for r in got[1:]] == ["passed", "passed"], got


def test_program_whose_worker_died_is_retried_once():
    prog = Program("import time\ntime.sleep(0.3)\n" + GOOD.code, GOOD.tests)
    with Sandbox(workers=1, timeout=5.0) as b:
        out: list[Result] = []
        t = threading.Thread(target=lambda: out.extend(b.run([prog])))
        t.start()
        end = time.monotonic() + 30
        while b._pool[0].job is None and time.monotonic() < end:
            time.sleep(0.001)
        b._pool[0].proc.kill()  # the worker dies under the program, through no fault of its own
        t.join()
        assert out == [Result(2, 2, "passed", "")]
        assert b.run([GOOD])[0].status == "passed"


def test_a_program_whose_workers_keep_dying_gets_one_retry(monkeypatch):
    with Sandbox(workers=1, timeout=5.0) as b:
        real_send, sends = code_sandbox._send, []

        def send_then_kill(fd: int, obj: object) -> None:
            real_send(fd, obj)
            if "KILLS-ITS-WORKER" in obj.get("code", ""):  # type: ignore[union-attr]
                sends.append(fd)
                worker = next(w for w in b._pool if w.wfd == fd)
                worker.proc.kill()
                worker.proc.wait()

        monkeypatch.setattr(code_sandbox, "_send", send_then_kill)
        killer = Program("# KILLS-ITS-WORKER\n" + GOOD.code, GOOD.tests)
        got = b.run([killer, GOOD])
        assert len(sends) == 2
        assert got == [Result(0, 2, "error", "sandbox worker died"), Result(2, 2, "passed", "")]


# ---- 4. Files left for the next program ------------------------------------------------------

LEAVE_FILE = (
    "import os\nos.makedirs('keep/inner')\n"
    f"open('keep/inner/s.txt', 'w').write('{TOKEN}')\n"
    "os.chmod('keep/inner', 0o500)\nos.chmod('keep', 0o500)\nos.chmod('.', 0o500)"
)
FIND_FILE = (
    "import glob, os\ndef leak():\n    me = int(os.path.basename(os.getcwd()))\n"
    "    paths = [f'../{me - 1}/keep/inner/s.txt', 'keep/inner/s.txt']\n"
    "    paths += glob.glob('../**/s.txt', recursive=True)\n"
    "    paths += glob.glob('/tmp/**/s.txt', recursive=True)\n"
    "    for p in paths:\n        try:\n            return open(p).read()\n"
    "        except OSError:\n            pass\n    return ''"
)


def test_read_only_leftovers_do_not_reach_the_next_program(box):
    got = box.run(
        [Program(LEAVE_FILE, ["assert f(1) == 2"]), Program(FIND_FILE, ["assert leak()"])]
    )
    assert got[1].passed == 0, got
    assert box.run([Program(FIND_FILE, [f"assert leak() == {TOKEN!r}"])])[0].passed == 0


# ---- 5. Operands that never call the solution ------------------------------------------------

FAKES = {
    "patched-sum": (
        "import builtins\nbuiltins.sum = lambda *a, **k: 'x'\ndef f(x):\n    return 'x'",
        "assert f(3) == sum([1, 2, 3])",
        "",
    ),
    "patched-range-in-comprehension": (
        "import builtins\nbuiltins.range = lambda *a: []\ndef f(x):\n    return []",
        "assert f(3) == [i * i for i in range(3)]",
        "",
    ),
    "setup-name-rebound-by-the-call": (
        "def f(x):\n    globals()['expected'] = 'w'\n    return 'w'",
        "assert f(3) == expected",
        "expected = 6",
    ),
    "is-with-computed-right-side": (
        "import builtins\n_s = object()\nbuiltins.bool = lambda *a: _s\ndef f(x):\n    return _s",
        "assert f(1) is bool(1)",
        "",
    ),
    "is-with-setup-right-side": (
        "def f(x):\n    globals()['flag'] = 7\n    return 7",
        "assert f(1) is flag",
        "flag = True",
    ),
    "multi-statement-always-equal": (
        "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()",
        "res = f(3)\nassert res == 6",
        "",
    ),
    "multi-statement-patched-len": (
        "import builtins\nbuiltins.len = lambda *a: 3\ndef f(x):\n    return []",
        "res = f(3)\nassert len(res) == len([1, 2, 3])\nassert res == [1, 2, 3]",
        "",
    ),
}


@pytest.mark.parametrize("name", list(FAKES))
def test_wrong_solution_cannot_fake_a_non_solution_operand(box, name):
    code, test, setup = FAKES[name]
    r = box.run([Program(code, [test], setup)])[0]
    assert r.passed == 0, r


HONEST_SHAPES = [
    ("def f(x):\n    return x * (x + 1) // 2", "assert f(3) == sum([1, 2, 3])", ""),
    (
        "def f(x):\n    return [i * i for i in range(x)]",
        "assert f(3) == [i * i for i in range(3)]",
        "",
    ),
    ("def f(x):\n    return x * 2", "assert f(3) == expected", "expected = 6"),
    ("def f(x):\n    return x > 0", "assert f(1) is bool(1)", ""),
    ("def f(x):\n    return True", "assert f(1) is flag", "flag = True"),
    (
        "def f(x):\n    return [1, 2, 3]",
        "res = f(3)\nassert res == [1, 2, 3]\nassert len(res) == 3",
        "",
    ),
    ("import math\ndef f(x):\n    return math.sqrt(x)", "assert f(2) == math.sqrt(2)", ""),
    ("class N:\n    v = 5\ndef f(n):\n    return n.v", "assert f(node) == 5", "node = N()"),
    ("def f(x):\n    return x", "assert f(data) == data", "data = {'a': [1, 2]}"),
]


def test_honest_solutions_pass_every_split_shape(box):
    got = box.run([Program(c, [t], s) for c, t, s in HONEST_SHAPES])
    assert [r.status for r in got] == ["passed"] * len(HONEST_SHAPES), got


# ---- 6. Float equality is Python's ----------------------------------------------------------

NEAR_MISSES = [
    ("0.30000000003", "assert f(0) == 0.3"),
    ("0.0", "assert f(0) == 5e-13"),
    ("0.1 + 0.2", "assert f(0) == 0.3"),
    ("[0.30000000003]", "assert f(0) == [0.3]"),
    ("{'a': 1e-13}", "assert f(0) == {'a': 0.0}"),
]
STATED_TOLERANCE = [
    ("0.30000000003", "assert math.isclose(f(0), 0.3, rel_tol=1e-6)"),
    ("0.30000000003", "assert round(f(0), 2) == 0.3"),
    ("0.1 + 0.2", "assert abs(f(0) - 0.3) < 1e-9"),
    ("3.0", "assert f(0) == 3"),
]


def test_float_equality_is_exact_unless_the_test_states_a_tolerance(box):
    near = [Program(f"import math\ndef f(x):\n    return {v}", [t]) for v, t in NEAR_MISSES]
    ok = [Program(f"import math\ndef f(x):\n    return {v}", [t]) for v, t in STATED_TOLERANCE]
    got = box.run(near + ok)
    assert [r.passed for r in got] == [0] * len(near) + [1] * len(ok), got


# ---- The whole round at once -----------------------------------------------------------------

CLASSIC = {
    "busy-loop": "while True: pass",
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "memory": "x = []\nwhile True:\n    x.append(' ' * 10**6)",
    "kill-worker": "import os\nos.kill(os.getppid(), 9)",
}


@pytest.mark.slow
def test_hostile_programs_mixed_into_512_gold_programs():
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    gold = [Program(r["code"], r["test_list"], r["test_setup_code"]) for r in rows]
    gold = [gold[i % len(gold)] for i in range(512)]
    hostile = [Program(c, ["assert f(1) == 2"]) for c in [*SINKERS.values(), *CLASSIC.values()]]
    hostile += [Program(IPC_WRITER, ["assert attack()"]), Program(IPC_READER, ["assert read()"])]
    hostile += [Program(LEAVE_FILE, ["assert f(1) == 2"]), Program(FIND_FILE, ["assert leak()"])]
    hostile += [Program(c, [t], s) for c, t, s in FAKES.values()]
    hostile.append(Program(forged_report(COLLIDING.format(n=20000)), ["assert f"]))
    programs = list(gold)
    rng = random.Random(0)
    where = sorted(rng.sample(range(len(gold) + len(hostile)), len(hostile)))
    for pos, prog in zip(where, hostile, strict=True):
        programs.insert(pos, prog)
    with Sandbox(workers=2, timeout=1.0) as b:
        got = b.run(programs)
    is_gold = [True] * len(programs)
    for pos in where:
        is_gold[pos] = False
    gold_results = [r for r, g in zip(got, is_gold, strict=True) if g]
    hostile_results = [r for r, g in zip(got, is_gold, strict=True) if not g]
    assert len(gold_results) == 512
    assert sum(r.status == "passed" for r in gold_results) == 512, [
        r for r in gold_results if r.status != "passed"
    ]
    assert not any(r.status == "passed" for r in hostile_results), hostile_results
    assert not any(host_ipc().values()), host_ipc()
    assert not host_mq_exists()


CAPS = (
    "import ctypes, os\ndef caps():\n"
    "    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)\n    data = (ctypes.c_uint32 * 6)()\n"
    "    assert ctypes.CDLL(None).capget(hdr, data) == 0\n    return list(data)\n"
    "def ids():\n    return [os.getuid(), os.stat('..').st_uid]"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="the separate child uid needs root")
def test_child_has_no_capabilities_and_not_the_workers_uid(box):
    r = box.run([Program(CAPS, ["assert caps() == [0] * 6", "assert ids()[0] != ids()[1]"])])
    assert r == [Result(2, 2, "passed", "")]


UNPRIVILEGED = """
import json, sys
sys.path.insert(0, {root!r})
from code_sandbox import Program, Sandbox
good = Program("def f(x):\\n    return x + 1", ["assert f(1) == 2"])
progs = [Program(c, t) for c, t in {cases!r}]
out = []
with Sandbox(workers=1, timeout=1.0) as box:
    for p in progs:
        out.append([[r.passed, r.status] for r in box.run([p, good])])
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="root + setpriv")
def test_attacks_as_an_unprivileged_user():
    cases = [(c, ["assert f(1) == 2"]) for c in SINKERS.values()]
    cases += [(LEAVE_FILE, ["assert f(1) == 2"]), (FIND_FILE, [f"assert leak() == {TOKEN!r}"])]
    cases += [(IPC_WRITER, ["assert attack()"]), (IPC_READER, [f"assert read() == {TOKEN!r}"])]
    for d in ("/tmp", "/dev/shm"):  # writable there without Landlock: emptied after each program
        cases.append((f"open('{d}/{TOKEN}', 'w').write('x')", ["assert f(1) == 2"]))
        cases.append((f"def f(x):\n    return open('{d}/{TOKEN}').read()", ["assert f(1) == 'x'"]))
    root = str(Path(__file__).resolve().parents[1])
    script = UNPRIVILEGED.format(root=root, cases=cases)
    proc = run_unprivileged(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (hostile, good), (code, _) in zip(json.loads(proc.stdout), cases, strict=True):
        assert hostile[0] == 0, code
        assert good == [1, "passed"], code
    assert not any(host_ipc().values()), host_ipc()


def test_a_task_that_shadows_a_builtin_is_still_tested(box):
    # "Write max()": the test names no solution-only name, yet it tests the solution's max.
    tests = ["assert max([1, 5, 2]) == 5", "assert max([-1, -3]) == -1"]
    right = "def max(xs):\n    return sorted(xs)[-1]"
    wrong = "def max(xs):\n    return 0"
    got = box.run([Program(right, tests), Program(wrong, tests)])
    assert [r.passed for r in got] == [2, 0], got


@pytest.mark.skipif(os.geteuid() != 0, reason="root without a user namespace")
def test_attacks_as_root_without_a_user_namespace():
    # Worker and children then share one uid: the worker repairs the base and removes what the
    # child left, whatever modes it set.
    cases = [Program(c, ["assert f(1) == 2"]) for c in SINKERS.values()]
    cases += [Program(LEAVE_FILE, ["assert f(1) == 2"]), Program(FIND_FILE, ["assert leak()"])]
    with Sandbox(workers=1, timeout=1.0, _user_namespace=False) as b:
        assert b.layers["uid"] and b._info["uid"] == b._info["worker_uid"]
        for prog in cases:
            hostile, good = b.run([prog, GOOD])
            assert hostile.passed == 0 and good.status == "passed", (prog.code, hostile, good)
