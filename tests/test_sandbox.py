"""Adversarial and correctness tests for code_sandbox (the MBPP reward's code sandbox)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import run_unprivileged

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import code_sandbox  # noqa: E402
from code_sandbox import Program, Result, Sandbox, SandboxUnavailable  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the sandbox's isolation is Linux-only"
)

MBPP = Path(__file__).resolve().parent / "fixtures" / "mbpp" / "test.jsonl"
SECRET = "wandb-" + uuid.uuid4().hex
TOKEN = uuid.uuid4().hex[:12]
GOOD = Program("def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(2) == 3"])
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def sb():
    # The secret sits in the trainer's environment for the whole module, as WANDB_API_KEY
    # would in a real run.
    old = os.environ.get("WANDB_API_KEY")
    os.environ["WANDB_API_KEY"] = SECRET
    box = Sandbox(workers=2, timeout=1.0)
    yield box
    box.close()
    if old is None:
        os.environ.pop("WANDB_API_KEY", None)
    else:
        os.environ["WANDB_API_KEY"] = old


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Things on the host an attack might reach: a victim dir and loopback listeners."""
    victim = tmp_path_factory.mktemp("victim")
    (victim / "keep.txt").write_text("still here")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    ctx = {
        "victim": str(victim),
        "tcp": tcp,
        "udp": udp,
        "tcp_port": tcp.getsockname()[1],
        "udp_port": udp.getsockname()[1],
        "pid": os.getpid(),
        "home": os.path.expanduser("~"),
        "name": f"sandbox-pwned-{TOKEN}",
        "secret": SECRET,
    }
    yield ctx
    tcp.close()
    udp.close()


def check_result(r: Result) -> None:
    assert isinstance(r, Result)
    assert r.status in ("passed", "failed", "timeout", "error")
    assert len(r.detail) <= 200
    assert SECRET not in repr(r)


def assert_contained(box: Sandbox, code: str, tests: list[str] | None = None) -> Result:
    r = box.run([Program(code, tests or ["assert f(1) == 2"])])[0]
    check_result(r)
    assert r.passed == 0 or r.status in ("timeout", "error"), r
    assert r.status != "passed", r
    # The sandbox still scores the next correct program.
    good = box.run([GOOD])[0]
    assert good == Result(2, 2, "passed", ""), good
    return r


ADVERSARIAL = {
    "busy-loop": "while True: pass",
    "sleep": "import time\ntime.sleep(3600)",
    "catch-base-exception": (
        "import time\nwhile True:\n    try:\n        time.sleep(10)\n"
        "    except BaseException:\n        pass"
    ),
    "ignore-signals": (
        "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass"
    ),
    "huge-int": "x = 10**10**9",
    "huge-bytearray": "b = bytearray(8 << 30)",
    "growing-list": "x = []\nwhile True:\n    x.append(' ' * 10**6)",
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "64-threads": (
        "import threading, time\n"
        "ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(64)]\n"
        "for t in ts: t.start()\nfor t in ts: t.join()"
    ),
    "multiprocessing-pool": (
        "import multiprocessing\nwith multiprocessing.Pool(4) as p:\n    p.map(abs, range(8))"
    ),
    "subprocess-sh": (
        "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch /tmp/{name}-sh'], check=True)"
    ),
    "os-system": "import os\nassert os.system('touch /tmp/{name}-system') == 0",
    "write-tmp": "open('/tmp/{name}', 'w').write('x')",
    "write-dev-shm": "open('/dev/shm/{name}', 'w').write('x')",
    "write-home": "open('{home}/{name}', 'w').write('x')",
    "rmtree-outside": "import shutil\nshutil.rmtree('{victim}')",
    "64mb-file": "open('big.bin', 'wb').write(b'x' * (64 << 20))",
    "tcp-loopback": (
        "import socket\ns = socket.create_connection(('127.0.0.1', {tcp_port}), timeout=0.5)\n"
        "s.sendall(b'pwned')"
    ),
    "udp-loopback": (
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'pwned', ('127.0.0.1', {udp_port}))"
    ),
    "raw-socket-syscall": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.socket(2, 1, 0) >= 0"
    ),
    "kill-worker": "import os\nos.kill(os.getppid(), 9)",
    "kill-trainer": "import os, signal\nos.kill({pid}, signal.SIGKILL)",
    "kill-everything": "import os\nos.kill(-1, 9)",
    "setsid": "import os\nos.setsid()",
    "recursion": "def r(n):\n    return r(n + 1)\nr(0)",
    "deep-recursion": (
        "import sys\nsys.setrecursionlimit(10**7)\ndef r(n):\n    return r(n + 1)\nr(0)"
    ),
    "sys-exit-before-asserts": "import sys\ndef f(x):\n    return x + 1\nsys.exit(0)",
    "os-exit-before-asserts": "import os\ndef f(x):\n    return x + 1\nos._exit(0)",
    "raise-systemexit": "raise SystemExit(0)",
    "raise-keyboardinterrupt": "raise KeyboardInterrupt",
    "keyboardinterrupt-in-test": "def f(x):\n    raise KeyboardInterrupt",
    "systemexit-in-test": "def f(x):\n    raise SystemExit(0)",
    "always-equal": (
        "class A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
        "    __hash__ = object.__hash__\ndef f(x):\n    return A()"
    ),
    "int-subclass": (
        "class I(int):\n    def __eq__(self, o): return True\n    __hash__ = int.__hash__\n"
        "def f(x):\n    return I(0)"
    ),
    "list-subclass": (
        "class L(list):\n    def __eq__(self, o): return True\ndef f(x):\n    return L()"
    ),
    "namedtuple-fake-eq": (
        "import collections\nclass T(collections.namedtuple('T', 'a')):\n"
        "    def __eq__(self, o): return True\ndef f(x):\n    return T(0)"
    ),
    "forge-report-fds": (
        'import os\nlines = [\'{{"passed": 1, "total": 1, "status": "passed"}}\',\n'
        '         \'["code", "ok"]\', \'["setup", "ok"]\', \'[0, "v", 2]\', \'["end"]\']\n'
        "for fd in range(51):\n    try:\n"
        "        os.write(fd, ('\\n'.join(lines) + '\\n').encode())\n"
        "    except OSError:\n        pass"
    ),
    "forge-result-then-exit": (
        "import os\nfor fd in range(51):\n    try:\n"
        '        os.write(fd, b\'{{"passed": 1, "total": 1, "status": "passed"}}\\n\')\n'
        "    except OSError:\n        pass\nos._exit(0)"
    ),
    "patch-then-define": (
        "import builtins\nbuiltins.isinstance = lambda *a: True\ndef f(x):\n    return '2'"
    ),
    "read-trainer-environ": "def f(x):\n    return open('/proc/{pid}/environ').read()",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_program_is_contained(sb, host, name):
    code = ADVERSARIAL[name].format(**host)
    start = time.monotonic()
    assert_contained(sb, code)
    assert time.monotonic() - start < 10
    # Nothing reached the host.
    for p in (
        f"/tmp/{host['name']}",
        f"/tmp/{host['name']}-sh",
        f"/tmp/{host['name']}-system",
        f"/dev/shm/{host['name']}",
        f"{host['home']}/{host['name']}",
    ):
        assert not os.path.exists(p), p
    assert (Path(host["victim"]) / "keep.txt").read_text() == "still here"
    host["tcp"].settimeout(0.05 if "tcp" not in name else 0.3)
    with pytest.raises(socket.timeout):
        host["tcp"].accept()
    host["udp"].settimeout(0.05 if "udp" not in name else 0.3)
    with pytest.raises(socket.timeout):
        host["udp"].recvfrom(100)


SECRET_PROGRAMS = {
    "environ": "import os\ndef f():\n    return os.environ.get('WANDB_API_KEY', '')",
    "proc-self": "def f():\n    return open('/proc/self/environ').read()",
    "proc-worker": "import os\ndef f():\n    return open(f'/proc/{{os.getppid()}}/environ').read()",
    "proc-trainer": "def f():\n    return open('/proc/{pid}/environ').read()",
    "proc-trainer-cmdline": "def f():\n    return open('/proc/{pid}/cmdline').read()",
    "exception-message": ("def f():\n    raise ValueError(open('/proc/{pid}/environ').read())"),
    "exception-named-after-secret": (
        "def f():\n    raise type('E' + open('/proc/{pid}/environ').read(), (Exception,), {{}})()"
    ),
}


@pytest.mark.parametrize("name", list(SECRET_PROGRAMS))
def test_secrets_do_not_leak(sb, host, name):
    code = SECRET_PROGRAMS[name].format(**host)
    results = sb.run([Program(code, [f"assert {SECRET!r} in f()", "assert f() == ''"])])
    for r in results:
        check_result(r)
        assert r.passed == 0 or r.passed == 1 and r.status == "failed"
        assert SECRET not in repr(results)


def test_child_environment_is_empty(sb):
    code = "import os\ndef env():\n    return dict(os.environ)"
    assert sb.run([Program(code, ["assert env() == {}"])])[0].status == "passed"


def test_correct_programs_pass_with_counts(sb):
    progs = [
        GOOD,
        Program("def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(1) == 5"]),
        Program("def f(x):\n    return x * 2\n", ["assert f(1) == 2", "assert f(2) == 3"]),
        Program("def f(x):\n    return [x, (x, {x: {x}})]", ["assert f(1) == [1, (1, {1: {1}})]"]),
        Program("import math\ndef f(x):\n    return math.sqrt(x)", ["assert f(2) == 2 ** 0.5"]),
        Program("def f(x):\n    return 0.1 + 0.2", ["assert f(0) == 0.3"]),  # False in Python
        Program("def f(x):\n    return x == 1", ["assert f(1) == True", "assert not f(2)"]),
        Program("def f(x):\n    return 3.0", ["assert f(0) == 3", "assert f(0) > 2.5"]),
        Program("def f(x):\n    return 10**5000", ["assert f(0) == 10**5000 // 1"]),
        Program(
            "from collections import Counter\ndef f(s):\n    return Counter(s)",
            ["assert f('aab') == {'a': 2, 'b': 1}", "assert set(f('ab')) == set(['a', 'b'])"],
        ),
        Program(
            "import math\ndef f(x):\n    return x / 3",
            ["assert math.isclose(f(1), 0.3333, rel_tol=1e-3)", "assert f(3) in [1, 2]"],
        ),
        Program("syntax error here", ["assert f(1) == 2"]),
        Program("def f(x):\n    return undefined_name", ["assert f(1) == 2"]),
    ]
    got = [(r.passed, r.total, r.status) for r in sb.run(progs)]
    assert got == [
        (2, 2, "passed"),
        (1, 2, "failed"),
        (1, 2, "failed"),
        (1, 1, "passed"),
        (1, 1, "passed"),
        (0, 1, "failed"),
        (2, 2, "passed"),
        (2, 2, "passed"),
        (1, 1, "passed"),
        (2, 2, "passed"),
        (2, 2, "passed"),
        (0, 1, "error"),
        (0, 1, "failed"),
    ]


def test_setup_runs_after_solution_and_before_tests(sb):
    code = (
        "class Node:\n    def __init__(self, v):\n        self.v = v\ndef val(n):\n    return n.v"
    )
    r = sb.run([Program(code, ["assert val(root) == 5"], setup="root = Node(5)")])[0]
    assert r == Result(1, 1, "passed", "")
    r = sb.run([Program(code, ["assert val(root) == 5"], setup="root = Nod(5)")])[0]
    assert (r.passed, r.status) == (0, "error")


def test_patched_helpers_cannot_forge_parent_side_checks(sb):
    progs = [
        Program(
            "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0.0",
            ["assert math.isclose(f(1), 2.0)"],
        ),
        Program(
            "import builtins\nbuiltins.set = lambda *a: frozenset()\ndef f(x):\n    return []",
            ["assert set(f(1)) == set([1, 2])"],
        ),
        Program("def f(x):\n    return 1", ["assert f(1) is True"]),
    ]
    assert [r.passed for r in sb.run(progs)] == [0, 0, 0]


def test_threads_work_inside_the_sandbox(sb):
    code = (
        "import threading\ndef f(n):\n    out = []\n"
        "    ts = [threading.Thread(target=out.append, args=(i,)) for i in range(n)]\n"
        "    for t in ts: t.start()\n    for t in ts: t.join()\n    return sorted(out)"
    )
    assert sb.run([Program(code, ["assert f(8) == list(range(8))"])])[0].status == "passed"


def test_batch_is_concurrent_and_ordered(sb):
    progs = [Program(f"def f(x):\n    return x + {i}", [f"assert f(0) == {i}"]) for i in range(40)]
    progs[7] = Program("while True: pass", ["assert f(0) == 7"])
    start = time.monotonic()
    results = sb.run(progs)
    assert time.monotonic() - start < 5
    assert [r.status for r in results] == ["passed"] * 7 + ["timeout"] + ["passed"] * 32


def test_thread_safe_run(sb):
    out: list[list[Result]] = []

    def go() -> None:
        out.append(sb.run([GOOD] * 10))

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3 and all(r.status == "passed" for rs in out for r in rs)


def test_mbpp_reference_solutions_pass(sb):
    rows = [json.loads(line) for line in MBPP.read_text().splitlines() if line.strip()]
    assert len(rows) >= 50
    progs = [
        Program(r["code"], r["test_list"] + r["challenge_test_list"], r["test_setup_code"])
        for r in rows
    ]
    results = sb.run(progs)
    bad = [(r["task_id"], x) for r, x in zip(rows, results, strict=True) if x.status != "passed"]
    assert not bad


def test_short_timeout_is_enforced():
    with Sandbox(workers=1, timeout=0.5) as box:
        start = time.monotonic()
        r = box.run([Program("while True: pass", ["assert f(1) == 2"])])[0]
        elapsed = time.monotonic() - start
        assert r.status == "timeout" and r.passed == 0
        assert 0.4 <= elapsed < 5, elapsed  # not early; the loop itself never ends
        assert box.run([GOOD])[0].status == "passed"


def test_dead_or_stuck_worker_is_replaced():
    import signal

    with Sandbox(workers=1, timeout=0.5) as box:
        box._pool[0].proc.kill()
        box._pool[0].proc.wait()
        assert [r.status for r in box.run([GOOD] * 3)] == ["passed"] * 3
        # A worker that stops answering is replaced after the grace period.
        os.kill(box._pool[0].proc.pid, signal.SIGSTOP)
        r = box.run([GOOD])[0]
        assert r.status == "timeout" and r.passed == 0
        assert box.run([GOOD])[0].status == "passed"


def test_close_leaves_nothing_behind():
    box = Sandbox(workers=2, timeout=1.0)
    procs = [w.proc for w in box._pool]
    dirs = [w.cleanup for w in box._pool if w.cleanup]
    box.run([GOOD, Program("open('x.txt', 'w').write('x')", ["assert f(1) == 2"])])
    box.close()
    assert all(p.poll() is not None for p in procs)
    assert not any(os.path.exists(d) for d in dirs)
    with pytest.raises(RuntimeError):
        box.run([GOOD])


@pytest.mark.skipif(not IS_ROOT, reason="the full layer set needs root")
def test_layers_as_root(sb):
    for layer in ("rlimits", "clean-env", "deadline", "seccomp", "netns", "ipcns", "uid"):
        assert sb.layers[layer], layer
    if code_sandbox._landlock_abi() > 0:
        assert sb.layers["landlock"]
    line = sb.describe()
    assert line.startswith("sandbox: ") and "seccomp" in line and "\n" not in line


def test_hand_assembled_seccomp_filter():
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("no syscall table for this arch")
    with Sandbox(workers=1, timeout=1.0, _seccomp_backend="bpf") as box:
        assert box.layers["seccomp"] and "seccomp(bpf)" in box.describe()
        for name in ("fork-bomb", "subprocess-sh", "udp-loopback", "kill-worker", "setsid"):
            assert_contained(box, ADVERSARIAL[name].format(name=TOKEN, udp_port=9, pid=1))
        code = "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n"
        assert box.run([Program(code + GOOD.code, GOOD.tests)])[0].status == "passed"


def test_refuses_without_minimum_isolation(monkeypatch):
    monkeypatch.setattr(code_sandbox, "_NETWORK", ("no-such-layer",))
    with pytest.raises(SandboxUnavailable, match="--unsafe-code-exec"):
        Sandbox(workers=1)
    with Sandbox(workers=1, unsafe=True) as box:
        assert box.run([GOOD])[0].status == "passed"


UNPRIVILEGED_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from code_sandbox import Program, Sandbox
cases = {cases!r}
good = Program("def f(x):\\n    return x + 1", ["assert f(1) == 2"])
with Sandbox(workers=2, timeout=1.0) as box:
    results = box.run([Program(c, ["assert f(1) == 2"]) for c in cases.values()] + [good])
    print(json.dumps({{"layers": box.layers, "results": [[r.passed, r.status] for r in results]}}))
"""


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_unprivileged_user(host):
    names = ["busy-loop", "fork-bomb", "subprocess-sh", "write-tmp", "rmtree-outside"]
    names += ["tcp-loopback", "udp-loopback", "kill-trainer", "read-trainer-environ"]
    cases = {n: ADVERSARIAL[n].format(**host) for n in names}
    os.chmod(host["victim"], 0o777)  # make the victim reachable, so only the sandbox protects it
    script = UNPRIVILEGED_SCRIPT.format(root=str(ROOT), cases=cases)
    proc = run_unprivileged(script, timeout=60, WANDB_API_KEY=SECRET)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for layer in ("rlimits", "clean-env", "deadline", "seccomp"):
        assert out["layers"][layer], layer
    *bad, good = out["results"]
    assert good == [1, "passed"]
    for name, (passed, status) in zip(names, bad, strict=True):
        assert passed == 0 and status != "passed", name
    assert (Path(host["victim"]) / "keep.txt").exists()
    assert not os.path.exists(f"/tmp/{host['name']}")
    assert SECRET not in proc.stdout
    host["tcp"].settimeout(0.2)
    with pytest.raises(socket.timeout):
        host["tcp"].accept()
