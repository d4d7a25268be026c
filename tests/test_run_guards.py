"""Run guards (run_guards.py): the stall watchdog in real processes, and each learning-health check
on plain numbers or a tiny torch module, written as the failure it must catch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import run_guards as G

ROOT = Path(__file__).resolve().parents[1]


# ==================================================================================================
# Watchdog
# ==================================================================================================
def run_py(code: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RUN_DIR": str(tmp_path)},
    )


def test_watchdog_ends_a_process_blocked_in_c_and_names_the_call(tmp_path):
    # The main thread blocks in a socket read (C, GIL released) on a listener that never answers.
    t0 = time.monotonic()
    r = run_py(
        """
        import os, socket, run_guards as G
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        c = socket.create_connection(srv.getsockname())
        G.start_watchdog(1.0, os.environ["RUN_DIR"], rank=0, step=lambda: 7)
        G.beat("evaluation request answered")
        with G.waiting_on("POST http://127.0.0.1:9/v1/completions"):
            c.recv(1)
        print("NOT REACHED")
        """,
        tmp_path,
    )
    assert time.monotonic() - t0 < 30  # fires at 1 s; generous bound for a busy machine
    assert r.returncode == G.EXIT_STALL, r.stderr
    assert "NOT REACHED" not in r.stdout
    lines = [x for x in r.stderr.splitlines() if x.startswith("stalled:")]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert "training step 7" in line and "rank 0" in line
    assert "stuck in: POST http://127.0.0.1:9/v1/completions" in line
    assert "last progress: evaluation request answered" in line
    assert "vLLM server is alive" in line  # what to check
    stacks = (tmp_path / "stall_stacks.rank0.txt").read_text()
    assert stacks.startswith("stalled:")
    assert "c.recv(1)" in stacks or "line 8" in stacks  # the main thread's frame
    assert "stall-watchdog" in stacks or "Thread 0x" in stacks


def test_watchdog_backstop_fires_when_c_code_holds_the_gil(tmp_path):
    # libc sleep() through PyDLL keeps the GIL: the monitor thread cannot run, faulthandler's C
    # timer still dumps the stacks and exits.
    r = run_py(
        """
        import ctypes, os, run_guards as G
        wd = G.Watchdog(1.0, os.environ["RUN_DIR"], poll=0.1, backstop_grace=1.0).start()
        import time; time.sleep(0.5)  # let the monitor arm the backstop
        ctypes.PyDLL(None).sleep(120)
        print("NOT REACHED")
        """,
        tmp_path,
    )
    assert r.returncode != 0
    assert "NOT REACHED" not in r.stdout
    stacks = (tmp_path / "stall_stacks.rank0.txt").read_text()
    assert "Timeout" in stacks and "File" in stacks


def test_watchdog_stays_quiet_while_progress_is_made(tmp_path):
    r = run_py(
        """
        import os, time, run_guards as G
        G.start_watchdog(5.0, os.environ["RUN_DIR"])
        for i in range(30):
            with G.waiting_on("work"):
                time.sleep(0.1)
            G.beat(f"step {i}")
        G.stop_watchdog()
        print("finished")
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "finished"
    assert not list(tmp_path.iterdir())  # the unused backstop file is removed on close


def test_module_functions_are_no_ops_without_a_watchdog():
    G.stop_watchdog()
    G.beat("anything")
    with G.waiting_on("anything"):
        pass


def test_stuck_on_lists_the_calls_in_progress(tmp_path):
    wd = G.Watchdog(100, tmp_path)
    with wd.waiting_on("collective all_gather"), wd.waiting_on("POST http://h:1/generate/"):
        assert wd.stuck_on() == "collective all_gather; POST http://h:1/generate/"
    assert wd.stuck_on() == ""


# ==================================================================================================
# Checks on plain numbers
# ==================================================================================================
def step(**kw) -> dict:
    base = {"reward": 0.5, "reward_std": 0.3, "frac_reward_zero_std": 0.25, "loss": 0.1}
    return {**base, **kw}


def test_no_signal_trips_after_k_steps_of_equal_rewards_and_says_all_zero():
    flat = step(
        reward=0.0,
        reward_std=0.0,
        frac_reward_zero_std=1.0,
        **{"rewards/correctness/mean": 0.0, "rewards/format/mean": 0.0},
    )
    assert G.check_no_signal([step(), flat, flat], k=3) is None  # only two in a row
    msg = G.check_no_signal([step(), flat, flat, flat], k=3)
    assert msg.startswith("no learning signal") and "all 0" in msg
    assert "correctness 0" in msg and "format 0" in msg


def test_no_signal_at_the_maximum_and_in_between():
    top = step(reward=1.1, reward_std=0.0, frac_reward_zero_std=1.0)
    assert "all at the maximum 1.1" in G.check_no_signal([top] * 3, 3, max_reward=1.1)
    mixed = step(reward=0.4, reward_std=0.5, frac_reward_zero_std=1.0)
    assert "equal within each group" in G.check_no_signal([mixed] * 3, 3, max_reward=1.1)


def test_importance_weights_out_of_range():
    key = "sampling/importance_sampling_ratio/mean"
    assert G.check_importance([step(**{key: 1.02})]) is None
    assert G.check_importance([step()]) is None  # not logged (no vLLM): nothing to say
    assert "out of range" in G.check_importance([step(**{key: 0.3})])
    assert "2.5" in G.check_importance([step(**{key: 2.5})])


def test_truncated_for_k_steps():
    cut = step(**{"completions/clipped_ratio": 1.0})
    assert G.check_truncated([cut, cut], 3) is None
    assert G.check_truncated([cut, step(), cut, cut], 3) is None
    assert "max_completion_length" in G.check_truncated([cut] * 3, 3)


def test_non_finite():
    assert G.non_finite({"loss": 0.1, "grad_norm": 3.0}) == []
    assert G.non_finite({"loss": math.nan, "grad_norm": math.inf}) == ["loss=nan", "grad_norm=inf"]


def test_weights_moved():
    before = {"a": [1.0, 2.0], "b": [3.0], "frozen": [5.0]}
    moved = {"a": [1.5, 2.0], "b": [3.0], "frozen": [5.0]}
    assert G.check_weights_moved(before, moved, ["a", "b"]) == (None, None)
    still, _ = G.check_weights_moved(before, dict(before), ["a", "b"])
    assert still.startswith("weights not moving")
    _, frozen = G.check_weights_moved(before, {**moved, "frozen": [5.5]}, ["a", "b"])
    assert frozen.startswith("frozen tensors changed: frozen")


def test_engine_following():
    assert G.check_engine_following([-1.0, -2.0], [-1.01, -2.02]) is None
    msg = G.check_engine_following([-1.0, -2.0], [-3.0, -0.5])
    assert msg.startswith("engine not following") and "1.75" in msg
    assert "no usable" in G.check_engine_following([math.nan], [-1.0])


def test_prompt_logprob_values_reads_both_shapes():
    ids = [5, 6, 7]
    http = [
        None,
        {"6": {"logprob": -0.5, "rank": 1}},
        {"9": {"logprob": -0.1}, "7": {"logprob": -2}},
    ]
    assert G._prompt_logprob_values(http, ids) == [-0.5, -2.0]
    obj = types.SimpleNamespace
    local = [None, {6: obj(logprob=-0.25)}, {7: obj(logprob=-1.5)}]
    assert G._prompt_logprob_values(local, ids) == [-0.25, -1.5]


# ==================================================================================================
# The callback, fed as the Trainer feeds it
# ==================================================================================================
torch = pytest.importorskip("torch")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.layers[0].requires_grad_(False)  # a frozen part, as a LoRA base is


def fake(step_no: int = 1):
    from transformers import TrainerControl

    return types.SimpleNamespace(global_step=step_no), TrainerControl()


def optimizer_with_lr(lr: float):
    return types.SimpleNamespace(param_groups=[{"lr": lr}])


def drive(mon: G.HealthMonitor, model, steps: list[dict], update=None, lr: float = 1e-3):
    """on_train_begin, then per step: on_step_begin, the update, on_step_end, then the Trainer's
    flow (a save due at every step) and on_log. Returns the controls."""
    state, control = fake(0)
    mon.on_train_begin(None, state, control, model=model)
    controls = []
    for i, logs in enumerate(steps, 1):
        state, control = fake(i)
        mon.on_step_begin(None, state, control, optimizer=optimizer_with_lr(lr))
        if update:
            update(model)
        mon.on_step_end(None, state, control)
        control.should_save = True  # DefaultFlowCallback, after the monitor, on a save step
        mon.on_log(None, state, control, logs=logs)
        controls.append(control)
    return controls


def sgd_step(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)


def test_monitor_constant_reward_trips_no_signal_once_and_logs_health_keys():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", max_reward=1.1, printer=lines.append)
    flat = [step(reward=0.0, reward_std=0.0, frac_reward_zero_std=1.0) for _ in range(5)]
    controls = drive(mon, Tiny(), flat, update=sgd_step)
    assert len(lines) == 1 and lines[0].startswith("health: step 3: no learning signal")
    assert flat[0]["health/no_signal"] == 0.0 and flat[2]["health/no_signal"] == 1.0
    assert all(f"health/{c}" in flat[4] for c in G.HealthMonitor.CHECKS)
    assert not any(c.should_training_stop for c in controls)  # warn keeps going
    assert mon.summary()["tripped"]["no_signal"]["step"] == 3


def test_monitor_abort_stops_at_the_first_tripped_check_without_saving():
    mon = G.HealthMonitor("abort", printer=lambda s: None)
    flat = [step(frac_reward_zero_std=1.0) for _ in range(3)]
    controls = drive(mon, Tiny(), flat, update=sgd_step)
    assert controls[-1].should_training_stop and not controls[-1].should_save
    assert "no_signal" in mon.stopped


def test_monitor_non_finite_stops_even_in_warn():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)
    logs = [step(grad_norm=1.0), step(loss=math.nan, grad_norm=math.inf)]
    controls = drive(mon, Tiny(), logs, update=sgd_step)
    assert not controls[0].should_training_stop
    assert controls[1].should_training_stop and not controls[1].should_save
    assert lines == [lines[0]] and "step 2: non-finite values: loss=nan, grad_norm=inf" in lines[0]
    assert "step 2" in mon.stopped


def test_monitor_weights_overflowing_in_an_update_stop_before_the_next_generation():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)

    def overflow_on_second_step(model, calls=[]):  # noqa: B006 - a counter across calls
        calls.append(1)
        sgd_step(model)
        if len(calls) == 2:
            with torch.no_grad():
                model.layers[2].weight.mul_(float("inf"))

    logs = [step(grad_norm=1.0), step(grad_norm=1.0), step(grad_norm=1.0)]
    controls = drive(mon, Tiny(), logs[:2], update=overflow_on_second_step)
    assert not controls[0].should_training_stop and controls[0].should_save
    assert controls[1].should_training_stop and not controls[1].should_save
    assert logs[1]["health/non_finite"] == 1.0  # the step still reaches the loggers
    assert len(lines) == 1 and "step 2: non-finite values: the weights" in lines[0]
    assert "layers.2.weight" in lines[0]


def test_monitor_off_checks_nothing():
    mon = G.HealthMonitor("off", printer=lambda s: pytest.fail(s))
    logs = [step(loss=math.nan, frac_reward_zero_std=1.0) for _ in range(4)]
    controls = drive(mon, Tiny(), logs)
    assert not any(c.should_training_stop for c in controls) and "health/no_signal" not in logs[0]


def test_monitor_weights_not_moving():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)
    drive(mon, Tiny(), [step(grad_norm=1.0)], update=None)  # an optimizer that changed nothing
    assert any("weights not moving" in x for x in lines), lines


def test_monitor_waits_for_a_step_with_lr_and_gradient_before_judging():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)
    # A zero gradient (no signal) and a zero learning rate (warm-up) move nothing, rightly.
    drive(mon, Tiny(), [step(grad_norm=0.0)], update=None)
    drive(mon, Tiny(), [step(grad_norm=1.0)], update=None, lr=0.0)
    assert lines == []


def test_monitor_frozen_parameter_changed_on_purpose():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)

    def step_and_touch_frozen(model):
        sgd_step(model)
        with torch.no_grad():
            model.layers[0].weight.mul_(2.0)

    logs = [step(grad_norm=1.0)]
    drive(mon, Tiny(), logs, update=step_and_touch_frozen)
    assert logs[0]["health/frozen_changed"] == 1.0 and logs[0]["health/weights_not_moving"] == 0
    assert any("frozen tensors changed: layers.0.weight" in x for x in lines), lines


def test_monitor_engine_probe_trips_on_stale_engine():
    lines: list[str] = []
    mon = G.HealthMonitor("warn", printer=lines.append)
    mon.after_sync(lambda: ([-1.0, -2.0], [-1.0, -2.0]))  # a following engine
    mon.after_sync(lambda: ([-1.0, -2.0], [-4.0, -0.1]))  # stale
    logs = [step()]
    drive(mon, Tiny(), logs, update=sgd_step)
    assert logs[0]["health/engine_not_following"] == 1.0
    assert lines and "engine not following" in lines[0]


def test_sample_params_skips_embeddings_and_spreads():
    model = torch.nn.ModuleDict(
        {"embed_tokens": torch.nn.Embedding(10, 4), "lm_head": torch.nn.Linear(4, 10)}
    )
    for i in range(20):
        model[f"l{i}"] = torch.nn.Linear(2, 2)
    trainable, frozen = G.sample_params(model, tensors=4)
    names = [n for n, _ in trainable]
    assert len(names) == 4 and names[0] == "l0.weight" and names[-1] == "l19.bias"
    assert frozen == []


# ==================================================================================================
# End to end: the script against a stand-in server that stops answering
# ==================================================================================================
class SilentServer:
    """Answers /health and /v1/models like `trl vllm-serve`, then never answers a completion."""

    def __init__(self, model: str) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        release = self.release = threading.Event()
        self.completion_requests = 0
        self.first_request_at: float | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                body = {"data": [{"id": model}]} if self.path == "/v1/models" else {}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                outer.completion_requests += 1
                outer.first_request_at = outer.first_request_at or time.monotonic()
                release.wait()  # the stall: the request is read, never answered

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def silent_server():
    import train_trl_grpo as T

    server = SilentServer(T.SMOKE_MODEL)
    yield server
    server.close()


STALL = 8  # seconds: stall_timeout in the end-to-end tests


def session_processes(sid: int) -> list[int]:
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(d.name)) == sid and state != "Z":
                    left.append(int(d.name))
            except OSError:
                pass
    return left


def run_own_session(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """The script in its own session; returns (status, stdout, stderr) once it and every process
    it started are gone (a leftover fails the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        deadline = time.monotonic() + 10  # PR_SET_PDEATHSIG'd workers need a moment
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(proc.pid) == [], "processes left behind"
    finally:
        if proc.poll() is None or session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err


def test_eval_only_against_a_server_that_never_answers_stops_and_names_it(silent_server, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "gsm8k", "--smoke", "--eval-only", "--vllm-mode", "server"]
    argv += ["--vllm-port", str(silent_server.port), "--output-dir", str(out)]
    rc, _, err = run_own_session([*argv, "--stall-timeout", str(STALL)], tmp_path)
    assert rc == G.EXIT_STALL, err[-3000:]
    # It reached the server, which then stalled; the run ended within stall_timeout + 30 s of it.
    assert silent_server.first_request_at is not None
    assert time.monotonic() - silent_server.first_request_at < STALL + 30
    lines = [x for x in err.splitlines() if x.startswith("stalled:")]
    assert len(lines) == 1, err[-3000:]
    url = f"http://127.0.0.1:{silent_server.port}/v1/completions"
    assert f"stuck in: POST {url}" in lines[0]
    assert "vLLM server is alive" in lines[0]
    stacks = (out / "stall_stacks.rank0.txt").read_text()
    assert stacks.startswith("stalled:")
    # Every thread: the main one waiting for the answers, a request thread inside the socket read.
    assert "line" in stacks and " in generate" in stacks and " in request" in stacks
    assert "socket.py" in stacks


# ==================================================================================================
# End to end: --smoke runs that cannot learn, or blow up
# ==================================================================================================
# Small steps: the checks need steps, not long completions.
FAST = ["--dataset", "gsm8k", "--smoke", "--eval-samples", "0", "--max-completion-length", "8"]


def test_smoke_random_model_has_no_learning_signal_and_says_so(tmp_path):
    # The random model never earns a reward: every group is all 0, the constant-reward failure.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = [*FAST, "--total-steps", "3", "--output-dir", str(out), "--report-to", "tensorboard"]
    rc, _, err = run_own_session(argv, tmp_path)
    assert rc == 0, err[-3000:]  # warn: the run goes on
    lines = [x for x in err.splitlines() if x.startswith("health: ")]
    no_signal = [x for x in lines if "no learning signal" in x]
    assert len(no_signal) == 1 and no_signal[0].startswith("health: step 3: ")
    assert "(all 0; component means: correctness 0, format 0)" in no_signal[0]
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "reward" in x]
    assert [x["health/no_signal"] for x in steps] == [0.0, 0.0, 1.0]
    assert all(f"health/{c}" in x for x in steps for c in G.HealthMonitor.CHECKS)
    health = json.loads((out / "summary.json").read_text())["health"]
    assert health["mode"] == "warn" and health["tripped"]["no_signal"]["step"] == 3
    assert len(health["tripped"]) == len(lines)  # one printed line per tripped check
    (run_dir,) = {p.parent for p in out.glob("runs/**/events.out.tfevents.*")}
    tags = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert "train/health/no_signal" in tags, tags


def test_overflowing_learning_rate_stops_at_that_step_and_keeps_the_last_checkpoint(tmp_path):
    # Warm-up makes step 1's learning rate 0 (a good checkpoint-1); step 2's 1e39 overflows fp32.
    out = tmp_path / "run"
    argv = [*FAST, "--total-steps", "4", "--output-dir", str(out), "--save-steps", "1"]
    argv += ["--lr", "1e39", "--warmup-steps", "1"]
    rc, _, err = run_own_session(argv, tmp_path)
    assert rc == G.EXIT_HEALTH, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("health: ")]
    assert len(lines) == 1 and lines[0].startswith("health: step 2: non-finite values"), err[-3000:]
    assert "error: health: stopped at step 2" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "final").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["health"]["tripped"]["non_finite"]["step"] == 2 and summary["steps"] == 2
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "reward" in x]  # the step still reached the loggers
    assert [(x["step"], x["health/non_finite"]) for x in steps] == [(1, 0.0), (2, 1.0)]
