"""Tests for run_sweep.sh, run for real on top of run_algo.sh against stand-ins on PATH.

The stand-ins are test_run_algo.py's (a `trl vllm-serve` that serves /health, trainers that
record what they got), behind a thin wrapper per name that

* gives every run its own record directory, STUB_ROOT/<server port>, so runs side by side do not
  overwrite each other's records, and writes wrapper.json (pid, time, environment) as a trainer
  starts;
* holds a trainer until the file STUB_GATE exists (so a test decides when runs end), makes the
  runs named in STUB_FAIL_RUNS fail at once (exit 5), and lets every other trainer leave a run
  directory in GRPO_OUTPUT_DIR as the real trainer does (test_compare.fake_run);
* hands `python -c` (the sweep's config check), `python train_trl_grpo.py --compare` and
  `--config-fields` to the real interpreter.

Every wait is bounded; only loopback addresses and free ports are used.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import terminal_job
from test_run_algo import STUB, alive, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_sweep.sh"
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("setsid") is None or not Path("/proc").is_dir(),
    reason="needs bash, setsid and /proc (Linux)",
)

WRAPPER = r"""#!__PYTHON__
import json, os, random, sys, time
from pathlib import Path

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
real, inner = "__PYTHON__", os.path.join("__INNER__", name)
if name == "python" and (
    "--compare" in args
    or "--config-fields" in args
    or (args[:1] == ["-c"] and "train_trl_grpo" in args[1])
):
    os.execv(real, [real, *args])


def opt(flag):
    return args[args.index(flag) + 1] if flag in args else None


port = opt("--port") if name == "trl" else opt("--vllm-port")
run_dir = Path(os.environ["STUB_ROOT"]) / (port or "")
run_dir.mkdir(exist_ok=True)  # the records of the run on that server port
os.environ["STUB_DIR"] = str(run_dir)
if name != "trl" and port:
    keys = ("WANDB_RUN_GROUP", "GRPO_RUN_NAME", "GRPO_OUTPUT_DIR", "GRPO_LR", "GRPO_BETA")
    env = {k: os.environ.get(k) for k in keys}
    info = {"pid": os.getpid(), "time": time.time(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    tmp = run_dir / "wrapper.json.tmp"  # replaced in one step: a reader never sees half of it
    tmp.write_text(json.dumps({**info, "env": env, "argv": args}))
    os.replace(tmp, run_dir / "wrapper.json")
    run_name = os.environ.get("GRPO_RUN_NAME", "")
    if run_name in os.environ.get("STUB_FAIL_RUNS", "").split(","):
        os.environ.update(STUB_TRAIN_EXIT="5", STUB_TRAIN_SLEEP="0")
    else:
        gate = os.environ.get("STUB_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.05)
        out = os.environ.get("GRPO_OUTPUT_DIR")
        if out:
            sys.path[:0] = ["__TESTS__", "__ROOT__"]
            from test_compare import fake_run, outcomes

            final = outcomes(random.Random(run_name), 0.5, range(20))
            fake_run(Path(out).parent, Path(out).name, final)
os.execv(inner, [inner, *args])
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    inner = tmp_path / "stubenv" / "inner"
    bin_dir = tmp_path / "stubenv" / "bin"
    inner.mkdir(parents=True)
    bin_dir.mkdir()
    wrapper = WRAPPER.replace("__PYTHON__", sys.executable).replace("__INNER__", str(inner))
    wrapper = wrapper.replace("__TESTS__", str(TESTS)).replace("__ROOT__", str(ROOT))
    for name in ("trl", "python", "accelerate"):
        for path, text in (
            (inner / name, STUB.replace("__PYTHON__", sys.executable)),
            (bin_dir / name, wrapper),
        ):
            path.write_text(text)
            path.chmod(0o755)
    return bin_dir


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_blocks(n: int, count: int = 3) -> list[int]:
    """`count` disjoint runs of `n` consecutive free ports."""
    rng = random.Random()
    bases: list[int] = []
    while len(bases) < count:
        base = rng.randrange(20000, 60000 - n)
        if all(abs(base - b) > n for b in bases) and all(port_free(base + i) for i in range(n)):
            bases.append(base)
    return bases


class Sweep:
    def __init__(self, stubs: Path, tmp: Path, runs: int, **env):
        self.root = tmp / "stub-records"
        self.root.mkdir()
        self.gate = tmp / "gate"
        self.dir = tmp / "sweep"
        self.ports, self.group_ports, self.main_ports = (
            list(range(b, b + runs)) for b in free_blocks(runs)
        )
        drop = {"TRAIN_GPU", "MODEL_ID", "DRY_RUN", "SERVE_ONLY", "START_SERVER", "LOG_DIR"}
        drop |= {"ACCELERATE_CONFIG", "HEALTH_TIMEOUT", "STOP_GRACE", "MAIN_PROCESS_PORT"}
        drop |= {"CUDA_VISIBLE_DEVICES", "GPUS", "GPUS_PER_RUN", "PORT_BASE", "GROUP_PORT_BASE"}
        drop |= {"MAIN_PORT_BASE", "WANDB_RUN_GROUP"}
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GRPO_", "VLLM_", "STUB_", "SWEEP_")) and k not in drop
        }
        self.env = {
            **base,
            "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "VIRTUAL_ENV": str(stubs.parent),
            "STUB_ROOT": str(self.root),
            "STUB_GATE": str(self.gate),
            "SWEEP_DIR": str(self.dir),
            "SWEEP_NAME": "test-sweep",
            "PORT_BASE": str(self.ports[0]),
            "GROUP_PORT_BASE": str(self.group_ports[0]),
            "MAIN_PORT_BASE": str(self.main_ports[0]),
            "GPUS": "0,1,2,3,4,5,6,7",
            "HEALTH_TIMEOUT": "30",
            "STOP_GRACE": "3",
            **env,
        }
        self.out = tmp / "sweep.out"
        self.err = tmp / "sweep.err"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str) -> Sweep:
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [str(SCRIPT), *args],
                env=self.env,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,  # own process group, like a shell job on a terminal
                preexec_fn=terminal_job,
            )
        return self

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"sweep did not exit within {timeout}s:\n{self.stderr}") from None
        return self.proc.returncode, self.out.read_text(), self.stderr

    def run(self, *args: str, timeout: float = 180) -> tuple[int, str, str]:
        return self.start(*args).finish(timeout)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def record(self, port: int, name: str):
        path = self.root / str(port) / name
        return json.loads(path.read_text()) if path.exists() else None

    def started(self, i: int):
        """The trainer of run i, once it is up (after its server's /health)."""
        return self.record(self.ports[i], "wrapper.json")

    def pids(self) -> list[int]:
        out = []
        for rec in self.root.glob("*/*.json"):
            data = json.loads(rec.read_text())
            out += [data[k] for k in ("pid", "child_pid") if isinstance(data.get(k), int)]
        return out

    def open_gate(self) -> None:
        self.gate.touch()


@pytest.fixture
def make_sweep(stubs: Path, tmp_path: Path):
    sweeps: list[Sweep] = []

    def factory(runs: int, **env) -> Sweep:
        sweep = Sweep(stubs, tmp_path, runs, **env)
        sweeps.append(sweep)
        return sweep

    yield factory
    for sweep in sweeps:  # never leave anything behind, whatever the test did
        sweep.open_gate()
        if sweep.proc and sweep.proc.poll() is None:
            os.killpg(sweep.proc.pid, signal.SIGKILL)
            sweep.proc.wait(5)
        for pid in sweep.pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


LRS = "lr=1e-6,3e-6,1e-5,3e-5"


def dry_runs(out: str) -> list[dict]:
    """Each run of a DRY_RUN: its '# run' line, server and trainer command lines."""
    runs: list[dict] = []
    for line in out.splitlines():
        if line.startswith("# run "):
            runs.append({"head": line, "cmds": []})
        elif runs and not line.startswith("#"):
            runs[-1]["cmds"].append(shlex.split(line))
    return runs


def status_lines(out: str) -> dict[str, str]:
    """The sweep's status table (before --compare's tables): {run name: its line}."""
    head = out.split("final evaluations")[0]
    return {ln.split()[0]: ln for ln in head.splitlines() if ln.startswith("gsm8k-lr")}


def opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def env_of(cmd: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in cmd if "=" in w and not w.startswith("-"))


# ---------------------------------------------------------------- dry run, bad input, static
def test_dry_run_gives_4_runs_disjoint_gpu_pairs_and_distinct_ports(make_sweep):
    sweep = make_sweep(4, DRY_RUN="1")
    rc, out, err = sweep.run("gsm8k", LRS)
    assert rc == 0, err
    runs = dry_runs(out)
    assert len(runs) == 4
    gpus, ports, dirs, names = [], [], set(), set()
    for run, lr in zip(runs, ["1e-6", "3e-6", "1e-5", "3e-5"], strict=True):
        server, trainer = run["cmds"]
        assert server[1:3] == ["trl", "vllm-serve"]
        senv, tenv = env_of(server), env_of(trainer)
        gpus.append((senv["CUDA_VISIBLE_DEVICES"], tenv["CUDA_VISIBLE_DEVICES"]))
        ports.append((opt(server, "--port"), opt(trainer, "--vllm-group-port")))
        assert opt(trainer, "--vllm-port") == opt(server, "--port")
        assert tenv["GRPO_LR"] == lr
        assert tenv["GRPO_RUN_NAME"] == f"gsm8k-lr{lr}" and tenv["GRPO_RUN_NAME"] in run["head"]
        assert tenv["GRPO_OUTPUT_DIR"] == str(sweep.dir / tenv["GRPO_RUN_NAME"])
        dirs.add(tenv["GRPO_OUTPUT_DIR"])
        names.add(tenv["GRPO_RUN_NAME"])
        assert opt(trainer, "--dataset") == "gsm8k"
    flat = [g for pair in gpus for g in pair]
    assert sorted(flat) == [str(g) for g in range(8)]  # 4 disjoint pairs over the 8 GPUs
    assert len({p for pair in ports for p in pair}) == 8  # 4 server + 4 weight-sync ports
    assert [int(p) for p, _ in ports] == sweep.ports
    assert len(dirs) == len(names) == 4
    assert "queued" not in out
    assert not list(sweep.root.iterdir()) and not sweep.dir.exists(), "DRY_RUN runs nothing"


def test_dry_run_grid_product_flags_and_several_trainer_gpus(make_sweep):
    sweep = make_sweep(4, DRY_RUN="1", GPUS_PER_RUN="2", ACCELERATE_CONFIG="ddp")
    rc, out, err = sweep.run("math", "lr=1e-6,3e-6 beta=0,0.04", "--", "--total-steps", "5")
    assert rc == 0, err
    runs = dry_runs(out)
    values = [(env_of(r["cmds"][1])["GRPO_LR"], env_of(r["cmds"][1])["GRPO_BETA"]) for r in runs]
    assert values == [("1e-6", "0"), ("1e-6", "0.04"), ("3e-6", "0"), ("3e-6", "0.04")]
    # 8 GPUs in slots of 1 server + 2 trainer GPUs: 2 slots, 2 GPUs left, 2 runs queued.
    assert [env_of(r["cmds"][1])["CUDA_VISIBLE_DEVICES"] for r in runs[:2]] == ["1,2", "4,5"]
    assert "queued" not in runs[1]["head"] and "queued" in runs[2]["head"]
    assert "2 GPU(s) unused" in out
    mains = [opt(r["cmds"][1], "--main_process_port") for r in runs]
    assert [int(m) for m in mains] == sweep.main_ports
    assert all(r["cmds"][1][-2:] == ["--total-steps", "5"] for r in runs)
    assert [env_of(r["cmds"][1])["GRPO_RUN_NAME"] for r in runs][1] == "math-lr1e-6-beta0.04"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["gsm8k", "learning_rate=1e-6,3e-6"], {}, "not a Config field"),
        (["gsm8k", "vllm_port=1,2"], {}, "set by the sweep or run_algo.sh"),
        (["gsm8k", "lr=abc,1e-6"], {}, "cannot parse 'abc'"),
        (["gsm8k", "lr=1e-6,,3e-6"], {}, "none empty"),
        (["lr=1e-6"], {}, "no dataset"),
        (["gsm8k"], {}, "no grid"),
        (["gsm8k", LRS, "--", "--lr", "1"], {}, "override the grid field"),
        (["gsm8k", LRS, "--", "--vllm-port", "1"], {}, "--vllm-port"),
        (["gsm8k", LRS], {"VLLM_PORT": "8001"}, "VLLM_PORT is set per run"),
        (["gsm8k", LRS], {"GPUS": "0"}, "needs 2 GPUs"),
        (["gsm8k", LRS], {"GPUS": "0,1,1"}, "twice"),
        (["gsm8k", LRS], {"GPUS_PER_RUN": "0"}, "GPUS_PER_RUN"),
    ],
)
def test_bad_input_is_one_line_and_runs_nothing(make_sweep, args, env, message):
    sweep = make_sweep(4, **env)
    rc, _, err = sweep.run(*args, timeout=30)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not list(sweep.root.iterdir()) and not sweep.dir.exists()


def test_help_lists_every_variable(make_sweep):
    rc, out, _ = make_sweep(1).run("-h")
    assert rc == 0
    for var in ("GPUS", "GPUS_PER_RUN", "PORT_BASE", "GROUP_PORT_BASE", "MAIN_PORT_BASE"):
        assert var in out
    assert "SWEEP_NAME" in out and "WANDB_RUN_GROUP" in out and "DRY_RUN" in out


# ---------------------------------------------------------------- real runs with stand-ins
def test_four_runs_side_by_side_then_one_table(make_sweep):
    sweep = make_sweep(4).start("gsm8k", LRS)
    wait_for(lambda: all(sweep.started(i) for i in range(4)), 120, "all four trainers")
    sweep.open_gate()
    rc, out, err = sweep.finish()
    assert rc == 0, err
    pairs = []
    for i, lr in enumerate(["1e-6", "3e-6", "1e-5", "3e-5"]):
        server, trainer = sweep.record(sweep.ports[i], "server.json"), sweep.started(i)
        assert opt(server["argv"], "--port") == str(sweep.ports[i])
        assert opt(trainer["argv"], "--vllm-group-port") == str(sweep.group_ports[i])
        assert trainer["env"]["GRPO_LR"] == lr
        assert trainer["env"]["WANDB_RUN_GROUP"] == "test-sweep"  # one wandb group per sweep
        pairs += [server["cuda"], trainer["cuda"]]
        assert (sweep.dir / "logs" / f"gsm8k-lr{lr}.log").is_file()
    assert sorted(pairs) == [str(g) for g in range(8)]
    assert not any(alive(pid) for pid in sweep.pids())
    # The end: a status line per run, then --compare over the four run directories.
    for lr in ["1e-6", "3e-6", "1e-5", "3e-5"]:
        assert any(ln.startswith(f"gsm8k-lr{lr} ") and " ok " in ln for ln in out.splitlines())
    assert "paired differences from ref = gsm8k-lr1e-6" in out
    table = out[out.index("final evaluations") :].splitlines()
    assert [ln.split()[0] for ln in table[2:6]] == [
        f"gsm8k-lr{x}" for x in ["1e-6", "3e-6", "1e-5", "3e-5"]
    ]
    assert "pass@1" in table[1] and "reward first -> last" in table[1]
    assert (sweep.dir / "compare.png").stat().st_size > 5000
    assert "paired differences" in (sweep.dir / "results.txt").read_text()


def test_six_runs_on_eight_gpus_queue_the_last_two(make_sweep):
    sweep = make_sweep(6).start("gsm8k", "lr=1e-6,3e-6,1e-5 beta=0.0,0.04")
    # 3 x 2 = 6 runs; 4 slots: the first four start, the last two wait while the gate is shut.
    wait_for(lambda: all(sweep.started(i) for i in range(4)), 120, "the first four trainers")
    wait_for(lambda: "queued" in sweep.stderr, 10, "the sweep to report its queue")
    assert not (sweep.root / str(sweep.ports[4])).exists()
    assert not (sweep.root / str(sweep.ports[5])).exists()
    first_four = {sweep.started(i)["cuda"] for i in range(4)}
    sweep.open_gate()
    rc, out, err = sweep.finish()
    assert rc == 0, err
    for i in (4, 5):  # started later, on GPUs that a finished run gave back
        assert sweep.started(i)["time"] > min(sweep.started(j)["time"] for j in range(4))
        assert sweep.started(i)["cuda"] in first_four
        assert opt(sweep.started(i)["argv"], "--vllm-port") == str(sweep.ports[i])
    assert sum(" ok " in ln for ln in out.splitlines()) == 6


def test_a_failing_run_leaves_the_others_running(make_sweep):
    sweep = make_sweep(4, STUB_FAIL_RUNS="gsm8k-lr3e-6").start("gsm8k", LRS)
    wait_for(lambda: "gsm8k-lr3e-6 failed with status 5" in sweep.stderr, 60, "the failure")
    others = [0, 2, 3]
    wait_for(lambda: all(sweep.started(i) for i in others), 30, "the other trainers")
    assert all(alive(sweep.started(i)["pid"]) for i in others)  # still training
    assert sweep.proc.poll() is None
    sweep.open_gate()
    rc, out, err = sweep.finish()
    assert rc == 1
    assert "1 of 4 run(s) failed: gsm8k-lr3e-6" in err
    status = status_lines(out)
    assert "failed (5)" in status["gsm8k-lr3e-6"]
    assert all(" ok " in status[f"gsm8k-lr{x}"] for x in ["1e-6", "1e-5", "3e-5"])
    assert "final evaluations" in out  # the others are still compared
    assert not any(alive(pid) for pid in sweep.pids())


def test_sigint_stops_every_run_and_starts_no_queued_one(make_sweep):
    sweep = make_sweep(6).start("gsm8k", "lr=1e-6,3e-6,1e-5,3e-5,1e-4,3e-4")
    wait_for(lambda: all(sweep.started(i) for i in range(4)), 120, "the first four trainers")
    os.killpg(sweep.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    rc, out, err = sweep.finish(timeout=60)
    assert rc == 130, err
    pids = sweep.pids()
    assert len(pids) >= 4 * 3  # every server, its child and every trainer were recorded
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, f"stand-in process {pid} to be gone")
    assert not (sweep.root / str(sweep.ports[4])).exists()
    assert not (sweep.root / str(sweep.ports[5])).exists()
    status = status_lines(out)
    assert sum("stopped" in s for s in status.values()) == 4
    assert "not started" in status["gsm8k-lr1e-4"] and "not started" in status["gsm8k-lr3e-4"]
    assert not sweep.gate.exists()  # nothing could finish on its own: the stop did it
