"""Tests for run_algo.sh, run for real against stand-ins on PATH.

The stand-ins (written into a temporary bin/ by the `stubs` fixture) are one Python script
under three names:

* ``trl``: `trl vllm-serve` stand-in. Records its argv/environment/process group, starts a
  child process (like vLLM's workers), and after STUB_SERVER_DELAY seconds serves
  ``/health`` on --host/--port. STUB_SERVER_DIE=1 makes it exit during start-up,
  STUB_SERVER_IGNORE_TERM=1 makes it ignore SIGTERM (so only SIGKILL stops it).
* ``python`` / ``accelerate``: trainer stand-ins. They record argv/environment, probe the
  server's /health themselves, then sleep STUB_TRAIN_SLEEP seconds and exit with
  STUB_TRAIN_EXIT. ``python -c ...`` (the launcher's import checks) fails for the modules
  named in STUB_MISSING_MODULES; other ``python -c`` snippets run in the real interpreter.

Every wait is bounded; only loopback addresses and free ephemeral ports are used.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import terminal_job

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_algo.sh"
DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("setsid") is None or not Path("/proc").is_dir(),
    reason="needs bash, setsid and /proc (Linux)",
)

STUB = r"""#!__PYTHON__
import http.server
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

role = os.path.basename(sys.argv[0])
stub_dir = os.environ["STUB_DIR"]


def record(name, data):
    tmp = os.path.join(stub_dir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(stub_dir, name))


def opt(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def base_info():
    return {
        "argv": sys.argv[1:],
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "time": time.time(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "grpo": {k: v for k, v in os.environ.items() if k.startswith("GRPO_")},
        "vllm_port_env": os.environ.get("VLLM_PORT"),
        "fresh_server": os.environ.get("RUN_ALGO_FRESH_SERVER"),
        "kv_cache_space": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
    }


def serve():
    args = sys.argv[2:]
    info = base_info()
    # A child in the same process group, like vLLM's engine/worker processes.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    info["child_pid"] = child.pid
    record("server.json", info)
    if os.environ.get("STUB_SERVER_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stub vllm-serve: loading", args, flush=True)
    time.sleep(float(os.environ.get("STUB_SERVER_DELAY", "0.3")))
    if os.environ.get("STUB_SERVER_DIE") == "1":
        print("stub vllm-serve: CUDA out of memory (simulated)", flush=True)
        sys.exit(3)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path.rstrip("/") == "/health" else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    address = (opt(args, "--host"), int(opt(args, "--port")))
    httpd = http.server.ThreadingHTTPServer(address, Handler)
    record("server_ready.json", {"time": time.time()})
    print("stub vllm-serve: ready", flush=True)
    httpd.serve_forever()


def train():
    args = sys.argv[1:]
    info = base_info()
    host, port = opt(args, "--vllm-host"), opt(args, "--vllm-port")
    if host and port:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as r:
                info["health"] = r.status
        except Exception as exc:
            info["health"] = repr(exc)
    record("trainer.json", info)
    print(f"stub trainer {role} running on GPUs {info['cuda']}", flush=True)
    try:
        time.sleep(float(os.environ.get("STUB_TRAIN_SLEEP", "0")))
    except KeyboardInterrupt:
        record("trainer_exit.json", {"how": "KeyboardInterrupt"})
        sys.exit(130)
    code = int(os.environ.get("STUB_TRAIN_EXIT", "0"))
    print(f"stub trainer exits with {code}", flush=True)
    sys.exit(code)


if role == "trl":
    assert sys.argv[1] == "vllm-serve", sys.argv
    serve()
elif role == "python" and sys.argv[1:2] == ["-c"] and "find_spec" not in sys.argv[2]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
elif role == "python" and len(sys.argv) > 1 and sys.argv[1] == "-c":
    missing = [m for m in os.environ.get("STUB_MISSING_MODULES", "").split(",") if m]
    sys.exit(1 if any(m in sys.argv[2:] for m in missing) else 0)
else:
    train()
"""


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


class Run:
    """One launcher invocation with its own stand-in record directory and ports."""

    def __init__(self, stubs: Path, tmp: Path, name: str = "run", **env):
        self.dir = tmp / name
        self.dir.mkdir()
        self.port = free_port()
        self.group_port = free_port()
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("GRPO_", "VLLM_", "STUB_"))
            and k
            not in {
                "TRAIN_GPU",
                "MODEL_ID",
                "DRY_RUN",
                "SERVE_ONLY",
                "START_SERVER",
                "ACCELERATE_CONFIG",
                "LOG_DIR",
                "HEALTH_TIMEOUT",
                "STOP_GRACE",
                "MAIN_PROCESS_PORT",
                "CUDA_VISIBLE_DEVICES",
            }
        }
        self.env = {
            **base,
            "PATH": f"{stubs}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "VIRTUAL_ENV": str(stubs.parent),
            "STUB_DIR": str(self.dir),
            "LOG_DIR": str(tmp / "logs"),
            "VLLM_PORT": str(self.port),
            "VLLM_GROUP_PORT": str(self.group_port),
            "MAIN_PROCESS_PORT": str(free_port()),
            "VLLM_GPU": "0",
            "TRAIN_GPU": "1",
            "HEALTH_TIMEOUT": "20",
            "STOP_GRACE": "3",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, cwd: Path | None = None) -> Run:
        self.proc = subprocess.Popen(
            [str(SCRIPT), *args],
            cwd=cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # own process group, like a shell job on a terminal
            preexec_fn=terminal_job,
        )
        return self

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            msg = f"launcher did not exit within {timeout}s:\n{out}\n{err}"
            raise AssertionError(msg) from None
        return self.proc.returncode, out, err

    def run(self, *args: str, timeout: float = 30, cwd: Path | None = None) -> tuple[int, str, str]:
        return self.start(*args, cwd=cwd).finish(timeout)

    @property
    def server(self):
        return read_json(self.dir / "server.json")

    @property
    def server_ready(self):
        return read_json(self.dir / "server_ready.json")

    @property
    def trainer(self):
        return read_json(self.dir / "trainer.json")

    def assert_server_gone(self, timeout: float = 5):
        server = self.server
        assert server is not None, "the server stand-in never started"
        for pid in (server["pid"], server["child_pid"]):
            wait_for(lambda pid=pid: not alive(pid), timeout, f"server process {pid} to be gone")


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "stubenv" / "bin"
    bin_dir.mkdir(parents=True)
    text = STUB.replace("__PYTHON__", sys.executable)
    for name in ("trl", "python", "accelerate"):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


@pytest.fixture
def make_run(stubs: Path, tmp_path: Path):
    runs: list[Run] = []

    def factory(name: str = "run", **env) -> Run:
        run = Run(stubs, tmp_path, name, **env)
        runs.append(run)
        return run

    yield factory
    for run in runs:  # never leave anything behind, whatever the test did
        if run.proc and run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(5)
        for rec in (run.server, run.trainer):
            if rec:
                for pid in (rec["pid"], rec.get("child_pid")):
                    if pid and alive(pid):
                        os.kill(pid, signal.SIGKILL)


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- dry run, help, static checks
def test_dry_run_pins_server_and_trainer(make_run):
    run = make_run(DRY_RUN="1", VLLM_GPU="2", TRAIN_GPU="3", VLLM_PORT="8001", GRPO_LR="1e-6")
    del run.env["VLLM_GROUP_PORT"]
    rc, out, err = run.run("math")
    assert rc == 0, err
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 2, out
    server, trainer = commands
    assert server[:3] == ["CUDA_VISIBLE_DEVICES=2", "trl", "vllm-serve"]
    assert server[server.index("--model") + 1] == DEFAULT_MODEL
    assert server[server.index("--port") + 1] == "8001"
    assert server[server.index("--tensor-parallel-size") + 1] == "1"
    assert server[server.index("--gpu-memory-utilization") + 1] == "0.9"
    assert trainer[0] == "CUDA_VISIBLE_DEVICES=3"
    assert "GRPO_LR=1e-6" in trainer
    i = trainer.index("train_trl_grpo.py")
    assert trainer[i - 1] == "python"
    assert trainer[trainer.index("--dataset") + 1] == "math"
    assert trainer[trainer.index("--model-id") + 1] == DEFAULT_MODEL
    assert trainer[trainer.index("--vllm-mode") + 1] == "server"
    assert trainer[trainer.index("--vllm-host") + 1] == "127.0.0.1"
    assert trainer[trainer.index("--vllm-port") + 1] == "8001"
    assert trainer[trainer.index("--vllm-group-port") + 1] == "51217"  # 51216 moves with the port
    assert not list(run.dir.iterdir()), "DRY_RUN must not run anything"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, "configs/accelerate/zero2.yaml"),
        ("zero3", "configs/accelerate/zero3.yaml"),
        ("ddp", "configs/accelerate/ddp.yaml"),
    ],
)
def test_dry_run_multi_gpu_uses_accelerate(make_run, config, expected):
    env = {"DRY_RUN": "1", "VLLM_GPU": "0,1", "VLLM_TENSOR_PARALLEL": "2", "TRAIN_GPU": "2,3,4"}
    if config:
        env["ACCELERATE_CONFIG"] = config
    run = make_run(**env)
    rc, out, err = run.run("mbpp", "--", "--max-steps", "5")
    assert rc == 0, err
    server, trainer = (shlex.split(line) for line in out.splitlines() if not line.startswith("#"))
    assert server[0] == "CUDA_VISIBLE_DEVICES=0,1"
    assert server[server.index("--tensor-parallel-size") + 1] == "2"
    assert trainer[:3] == ["CUDA_VISIBLE_DEVICES=2,3,4", "accelerate", "launch"]
    assert trainer[trainer.index("--config_file") + 1] == expected
    assert (ROOT / expected).is_file()
    assert trainer[trainer.index("--num_processes") + 1] == "3"
    assert trainer[-2:] == ["--max-steps", "5"]


def test_dry_run_colocate_runs_trainer_alone(make_run):
    run = make_run(DRY_RUN="1", VLLM_MODE="colocate")
    del run.env["TRAIN_GPU"]
    rc, out, err = run.run()
    assert rc == 0, err
    (trainer,) = (shlex.split(line) for line in out.splitlines())
    assert trainer[0] == "CUDA_VISIBLE_DEVICES=0"
    assert trainer[trainer.index("--vllm-mode") + 1] == "colocate"
    assert trainer[trainer.index("--dataset") + 1] == "gsm8k"
    assert "--vllm-port" not in trainer


def test_help_lists_every_variable(make_run):
    rc, out, _ = make_run().run("-h")
    assert rc == 0
    for var in (
        "VLLM_GPU",
        "TRAIN_GPU",
        "VLLM_PORT",
        "VLLM_GROUP_PORT",
        "MODEL_ID",
        "VLLM_GPU_MEMORY_UTILIZATION",
        "VLLM_TENSOR_PARALLEL",
        "VLLM_HOST",
        "HEALTH_TIMEOUT",
        "VLLM_MODE",
        "ACCELERATE_CONFIG",
        "LOG_DIR",
        "DRY_RUN",
        "SERVE_ONLY",
        "GRPO_",
        "uv pip install deepspeed",
    ):
        assert var in out, var


def test_overlapping_gpus_are_refused(make_run):
    run = make_run(VLLM_GPU="0,1", TRAIN_GPU="1,2")
    rc, _, err = run.run()
    assert rc != 0
    assert "overlap" in one_line_error(err)
    assert not list(run.dir.iterdir())


def test_taken_port_is_refused(make_run):
    run = make_run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", run.port))
        s.listen()
        rc, _, err = run.run()
    assert rc != 0
    assert str(run.port) in one_line_error(err)
    assert run.server is None and run.trainer is None


def test_trainer_flags_owned_by_the_launcher_are_refused(make_run):
    run = make_run()
    rc, _, err = run.run("gsm8k", "--", "--vllm-port=1234")
    assert rc != 0
    assert "--vllm-port" in one_line_error(err)
    rc, _, err = make_run("env", GRPO_MODEL_ID="x").run()
    assert rc != 0
    assert "GRPO_MODEL_ID" in one_line_error(err)


def test_missing_deepspeed_is_refused(make_run):
    run = make_run(TRAIN_GPU="1,2", ACCELERATE_CONFIG="zero2", STUB_MISSING_MODULES="deepspeed")
    rc, _, err = run.run()
    assert rc != 0
    assert "uv pip install deepspeed" in one_line_error(err)
    assert run.server is None and run.trainer is None


# ---------------------------------------------------------------- real runs with stand-ins
def test_trainer_starts_after_health_with_same_model_port_and_pinned_gpus(make_run, tmp_path):
    run = make_run(
        VLLM_GPU="3",
        TRAIN_GPU="5",
        MODEL_ID="org/tiny-model",
        GRPO_LR="3e-6",
        STUB_SERVER_DELAY="1.0",
    )
    rc, out, err = run.run("mbpp", "--", "--max-steps", "2")
    assert rc == 0, err
    server, trainer, ready = run.server, run.trainer, run.server_ready
    # server: pinned, own process group/session, flags as configured
    assert server["cuda"] == "3"
    assert server["argv"][0] == "vllm-serve"
    args = server["argv"]
    assert args[args.index("--model") + 1] == "org/tiny-model"
    assert args[args.index("--port") + 1] == str(run.port)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert server["pgid"] == server["pid"] == server["sid"]
    assert server["pgid"] != run.proc.pid
    # trainer: after health, same model/host/port/group port, pinned, env passed through
    assert trainer["time"] >= ready["time"]
    assert trainer["health"] == 200
    assert trainer["cuda"] == "5"
    assert trainer["cwd"] == str(ROOT)
    t = trainer["argv"]
    assert t[0] == "train_trl_grpo.py"
    assert t[t.index("--dataset") + 1] == "mbpp"
    assert t[t.index("--model-id") + 1] == "org/tiny-model"
    assert t[t.index("--vllm-mode") + 1] == "server"
    assert t[t.index("--vllm-host") + 1] == "127.0.0.1"
    assert t[t.index("--vllm-port") + 1] == str(run.port)
    assert t[t.index("--vllm-group-port") + 1] == str(run.group_port)
    assert t[-2:] == ["--max-steps", "2"]
    assert trainer["grpo"] == {"GRPO_LR": "3e-6"}
    assert trainer["pgid"] not in (run.proc.pid, server["pgid"])
    run.assert_server_gone()
    # logs: server output in its file, trainer output in its file and on the terminal
    logs = tmp_path / "logs"
    assert "stub vllm-serve: ready" in (logs / f"vllm_mbpp_{run.port}.log").read_text()
    train_log = (logs / f"train_mbpp_{run.port}.log").read_text()
    assert "stub trainer python running on GPUs 5" in train_log
    assert "stub trainer python running on GPUs 5" in out


def test_trainer_failure_status_is_returned_and_server_stopped(make_run):
    run = make_run(STUB_TRAIN_EXIT="7")
    rc, _, err = run.run()
    assert rc == 7, err
    run.assert_server_gone()
    # A failed run ends with the last lines of both logs, the trainer's error and the server's.
    assert "last lines of " in err and "stub trainer exits with 7" in err
    assert "stub vllm-serve: ready" in err


def test_server_ignoring_sigterm_is_killed(make_run):
    run = make_run(STUB_SERVER_IGNORE_TERM="1", STOP_GRACE="1")
    rc, _, err = run.run()
    assert rc == 0, err
    run.assert_server_gone()
    assert "SIGKILL" in err


@pytest.mark.parametrize(
    ("sig", "to_group", "code"),
    [
        (signal.SIGINT, True, 130),  # Ctrl-C: the terminal signals the launcher's process group
        (signal.SIGTERM, False, 143),  # kill <launcher pid>
    ],
)
def test_signal_stops_trainer_and_server(make_run, sig, to_group, code):
    run = make_run(STUB_TRAIN_SLEEP="60").start()
    trainer = wait_for(lambda: run.trainer, 15, "the trainer to start")
    if to_group:
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    rc, _, err = run.finish(timeout=15)
    assert rc == code, err
    run.assert_server_gone()
    wait_for(lambda: not alive(trainer["pid"]), 5, "the trainer to be gone")
    if sig == signal.SIGINT:  # the trainer got Ctrl-C as SIGINT (KeyboardInterrupt), not a kill
        assert read_json(run.dir / "trainer_exit.json") == {"how": "KeyboardInterrupt"}


def test_server_dying_during_startup_fails_with_log_tail(make_run):
    run = make_run(STUB_SERVER_DIE="1")
    rc, _, err = run.run()
    assert rc != 0
    assert "while starting" in err
    assert "CUDA out of memory (simulated)" in err
    assert run.trainer is None
    run.assert_server_gone()


def test_health_timeout_is_reported(make_run):
    run = make_run(HEALTH_TIMEOUT="1", STUB_SERVER_DELAY="30")
    rc, _, err = run.run()
    assert rc != 0
    assert "HEALTH_TIMEOUT" in err
    assert run.trainer is None
    run.assert_server_gone()


def test_server_dying_during_training_stops_the_trainer(make_run):
    run = make_run(STUB_TRAIN_SLEEP="60").start()
    trainer = wait_for(lambda: run.trainer, 15, "the trainer to start")
    log = Path(run.env["LOG_DIR"]) / f"train_gsm8k_{run.port}.log"
    wait_for(lambda: "running on GPUs" in log.read_text(), 15, "the trainer's first line")
    os.kill(run.server["pid"], signal.SIGKILL)
    rc, _, err = run.finish(timeout=15)
    assert rc != 0
    assert "during training" in err
    assert "stub vllm-serve: ready" in err and "running on GPUs" in err
    wait_for(lambda: not alive(trainer["pid"]), 5, "the trainer to be gone")
    run.assert_server_gone()


def test_two_launchers_side_by_side(make_run, tmp_path):
    a = make_run("a", VLLM_GPU="0", TRAIN_GPU="1", STUB_TRAIN_SLEEP="1")
    b = make_run("b", VLLM_GPU="2", TRAIN_GPU="3", STUB_TRAIN_SLEEP="1")
    a.start("gsm8k")
    b.start("gsm8k")
    # both trainers run at the same time
    wait_for(lambda: a.trainer and b.trainer, 15, "both trainers to start")
    (rc_a, _, err_a), (rc_b, _, err_b) = a.finish(), b.finish()
    assert rc_a == 0, err_a
    assert rc_b == 0, err_b
    for run, vllm_gpu, train_gpu in ((a, "0", "1"), (b, "2", "3")):
        assert run.server["cuda"] == vllm_gpu
        assert run.trainer["cuda"] == train_gpu
        t = run.trainer["argv"]
        assert t[t.index("--vllm-port") + 1] == str(run.port)
        assert run.trainer["health"] == 200
        log = (tmp_path / "logs" / f"train_gsm8k_{run.port}.log").read_text()
        assert f"running on GPUs {train_gpu}" in log
        assert (tmp_path / "logs" / f"vllm_gsm8k_{run.port}.log").is_file()
        run.assert_server_gone()


def test_multi_gpu_trainer_runs_through_accelerate(make_run):
    run = make_run(VLLM_GPU="0", TRAIN_GPU="1,2,3", ACCELERATE_CONFIG="ddp")
    rc, _, err = run.run("math")
    assert rc == 0, err
    t = run.trainer["argv"]
    assert run.trainer["cuda"] == "1,2,3"
    assert t[:3] == ["launch", "--config_file", "configs/accelerate/ddp.yaml"]
    assert t[t.index("--num_processes") + 1] == "3"
    assert t[t.index("--main_process_port") + 1] == run.env["MAIN_PROCESS_PORT"]
    i = t.index("train_trl_grpo.py")
    assert t[i + 1 : i + 3] == ["--dataset", "math"]
    assert t[t.index("--vllm-port") + 1] == str(run.port)
    run.assert_server_gone()


def test_existing_server_is_used_and_left_running(make_run, stubs, tmp_path):
    served = make_run("served")
    server = subprocess.Popen(
        [str(stubs / "trl"), "vllm-serve", "--host", "127.0.0.1", "--port", str(served.port)],
        env=served.env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        run = make_run("client", START_SERVER="0", VLLM_PORT=str(served.port))
        del run.env["TRAIN_GPU"]
        rc, _, err = run.run()
        assert rc == 0, err
        assert run.server is None, "no second server may be started"
        assert run.trainer["health"] == 200
        assert run.trainer["cuda"] == "0"  # no local server, so the trainer defaults to GPU 0
        assert server.poll() is None, "a server the launcher did not start must stay up"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(5)


def test_serve_only_blocks_until_stopped(make_run):
    run = make_run(SERVE_ONLY="1", VLLM_BIND_HOST="127.0.0.1").start()
    wait_for(lambda: run.server_ready, 15, "the server to be ready")
    time.sleep(0.8)  # the launcher sees /health, then blocks on the server
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGTERM)
    rc, _, err = run.finish(timeout=15)
    assert rc == 143, err
    assert "VLLM_HOST=" in err
    assert run.trainer is None
    run.assert_server_gone()


# ---------------------------------------------------------------- GPU path (issue 9)
def test_vllm_port_is_kept_out_of_server_and_trainer_environment(make_run):
    """vLLM reads VLLM_PORT as the base of its internal ports: side-by-side runs would collide."""
    run = make_run(VLLM_GPU="2", TRAIN_GPU="3")
    rc, _, err = run.run()
    assert rc == 0, err
    assert run.env["VLLM_PORT"] == str(run.port)
    assert run.server["vllm_port_env"] is None and run.trainer["vllm_port_env"] is None
    s, t = run.server["argv"], run.trainer["argv"]
    assert s[s.index("--port") + 1] == t[t.index("--vllm-port") + 1] == str(run.port)
    run.assert_server_gone()


@pytest.mark.parametrize("start_server", ["0", "1"])
def test_server_mode_trainer_without_vllm_is_refused(make_run, stubs, start_server):
    """Node B of a multi-node run (no local server) still needs vllm for TRL's weight sync."""
    run = make_run(START_SERVER=start_server, STUB_MISSING_MODULES="vllm")
    rc, _, err = run.run()
    assert rc != 0
    assert "vllm" in one_line_error(err)
    assert run.server is None and run.trainer is None
    none = make_run("none", VLLM_MODE="none", STUB_MISSING_MODULES="vllm")
    rc, _, err = none.run()
    assert rc == 0, err
    assert none.trainer is not None


def test_serve_only_polls_the_address_it_is_bound_to(make_run):
    run = make_run(SERVE_ONLY="1", VLLM_BIND_HOST="127.0.0.2", HEALTH_TIMEOUT="15").start()
    wait_for(lambda: run.server_ready, 15, "the server to be ready")
    args = run.server["argv"]
    assert args[args.index("--host") + 1] == "127.0.0.2"
    time.sleep(1.5)  # let the launcher see /health; it then blocks on the server
    assert run.proc.poll() is None, run.proc.stderr.read()
    run.proc.send_signal(signal.SIGTERM)
    rc, _, err = run.finish(timeout=15)
    assert rc == 143, err
    assert f"vLLM server is healthy at http://127.0.0.2:{run.port}/health" in err
    run.assert_server_gone()


def test_relative_paths_resolve_against_the_callers_directory(make_run, tmp_path):
    caller = tmp_path / "caller"
    (caller / "models" / "tiny").mkdir(parents=True)
    run = make_run(MODEL_ID="models/tiny", GRPO_SCORE="c.jsonl")
    rc, _, err = run.run(
        "gsm8k", "--", "--data-dir", "data", "--output-dir=out", "--lr", "1e-6", cwd=caller
    )
    assert rc == 0, err
    s, t = run.server["argv"], run.trainer["argv"]
    assert s[s.index("--model") + 1] == t[t.index("--model-id") + 1] == str(caller / "models/tiny")
    assert t[t.index("--data-dir") + 1] == str(caller / "data")
    assert f"--output-dir={caller / 'out'}" in t
    assert t[t.index("--lr") + 1] == "1e-6"
    assert run.trainer["grpo"] == {"GRPO_SCORE": str(caller / "c.jsonl")}
    assert run.trainer["cwd"] == str(ROOT)
    hub = make_run("hub", DRY_RUN="1", MODEL_ID="org/not-a-local-dir")
    rc, out, err = hub.run(cwd=caller)
    assert rc == 0, err
    assert "--model-id org/not-a-local-dir" in out  # a Hub id stays a Hub id


def test_server_tensor_parallel_defaults_to_1_and_must_match_the_gpus(make_run):
    rc, out, err = make_run(DRY_RUN="1").run()
    assert rc == 0, err
    server = shlex.split(out.splitlines()[0])
    assert server[server.index("--tensor-parallel-size") + 1] == "1"
    run = make_run("two", DRY_RUN="1", VLLM_GPU="0,1", TRAIN_GPU="2")
    rc, _, err = run.run()
    assert rc != 0
    assert "VLLM_TENSOR_PARALLEL" in one_line_error(err)


@pytest.mark.parametrize(("tp", "ok"), [("3", False), ("5", False), ("2", True), ("4", True)])
def test_tensor_parallel_must_fit_the_models_heads(make_run, tmp_path, tp, ok):
    """12 attention heads and 2 KV heads (Qwen2.5-1.5B): vLLM takes 2, and 4 (KV heads copied)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 1536})
    )
    gpus = ",".join(str(i) for i in range(int(tp)))
    run = make_run(MODEL_ID=str(model), VLLM_GPU=gpus, VLLM_TENSOR_PARALLEL=tp, TRAIN_GPU="7")
    rc, _, err = run.run()
    if ok:
        assert rc == 0, err
        assert run.server is not None
        run.assert_server_gone()
    else:
        assert rc != 0
        line = one_line_error(err)
        assert f"VLLM_TENSOR_PARALLEL={tp}" in line and "12 attention heads" in line
        assert run.server is None and run.trainer is None


# ---------------------------------------------------------------- VLLM_DEVICE=cpu
def _nvidia_smi(stubs: Path, gpus: int) -> None:
    """An nvidia-smi that lists `gpus` GPUs, as on a GPU box (none: as a driver without GPUs)."""
    path = stubs / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n" for i in range(gpus))
    path.write_text("#!/bin/sh\n" + (lines or "echo 'No devices were found'; exit 6\n"))
    path.chmod(0o755)


def test_cpu_server_is_refused_on_a_gpu_box(make_run, stubs):
    _nvidia_smi(stubs, 2)
    run = make_run(VLLM_DEVICE="cpu")
    rc, _, err = run.run("gsm8k")
    assert rc != 0, err
    line = one_line_error(err)
    assert "VLLM_DEVICE=cpu" in line and "GPU" in line
    assert run.server is None and run.trainer is None


def test_cpu_server_serves_eagerly_with_a_small_kv_cache_and_no_gpus(make_run, stubs):
    _nvidia_smi(stubs, 0)
    run = make_run(VLLM_DEVICE="cpu")
    rc, out, err = run.run("gsm8k", "--", "--eval-only")
    assert rc == 0, err
    server, trainer = run.server, run.trainer
    assert "--enforce-eager" in server["argv"]
    assert server["kv_cache_space"] == "1"  # GiB of KV cache, unless the caller sets it
    assert server["cuda"] == trainer["cuda"] == ""
    run.assert_server_gone()


def test_trainer_knows_whether_the_launcher_loaded_the_server(make_run):
    run = make_run(RUN_ALGO_FRESH_SERVER="1", VLLM_MODE="none", TRAIN_GPU="0")
    assert run.run("gsm8k")[0] == 0
    assert run.trainer["fresh_server"] is None  # nothing loaded here: never inherited
    run = make_run("started", RUN_ALGO_FRESH_SERVER="0")
    assert run.run("gsm8k")[0] == 0
    assert run.trainer["fresh_server"] == "1"
    run.assert_server_gone()


def test_bad_vllm_device_is_refused(make_run):
    rc, _, err = make_run(VLLM_DEVICE="tpu").run("gsm8k")
    assert rc == 2 and "VLLM_DEVICE must be gpu or cpu" in one_line_error(err)
