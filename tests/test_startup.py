"""The first minutes of a run: which check comes first, what each failure says, and a log that
survives a run that dies. Nothing here is timed: the order of checks is asserted instead (a failure
that happens before torch is imported cannot cost torch's import time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import fast_time, free_port

import modes
import run_log
import startup
import train_trl_grpo as T

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HEAVY = ("torch", "transformers", "datasets", "trl", "accelerate", "peft", "vllm")

# Runs the script with every heavy import refused: a check that happens before them must answer
# on its own, and one that does not shows up as an ImportError naming the module.
LIGHT_RUNNER = f"""
import runpy, sys
HEAVY = {HEAVY!r}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError("heavy import before the check: " + name)
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).parent))  # as `python SCRIPT` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("GRPO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def hub_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a box without network: HF_HUB_OFFLINE unset, the Hub endpoint a closed
    local port, an empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPO_", "HF_"))}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, light: bool = True):
    """train_trl_grpo.py in a fresh process with no network; with `light`, one that may not import
    torch & co."""
    pre = [sys.executable, "-c", LIGHT_RUNNER] if light else [sys.executable]
    return subprocess.run(
        [*pre, str(ROOT / "train_trl_grpo.py"), *args],
        cwd=tmp_path,
        env={**hub_env(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


class Health:
    """A server that listens but answers /health with 503 `sick` times before it is healthy."""

    def __init__(self, sick: int, model: str = T.SMOKE_MODEL):
        self.polls = 0
        health = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    health.polls += 1
                    code, body = (503, b"{}") if health.polls <= sick else (200, b"{}")
                elif self.path == "/v1/models":
                    code, body = 200, json.dumps({"data": [{"id": model}]}).encode()
                else:
                    code, body = 404, b"{}"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health():
    started: list[Health] = []

    def start(sick: int = 0, **kw) -> Health:
        started.append(Health(sick, **kw))
        return started[-1]

    yield start
    for h in started:
        h.close()


# ------------------------------------------------------------------------------------------------
# 1. The vLLM server is checked before the tokenizer, the data and the model
# ------------------------------------------------------------------------------------------------
def test_no_server_fails_before_tokenizer_data_and_model(monkeypatch, capsys, tmp_path):
    calls: list[str] = []
    for name in ("load_tokenizer", "load_rows", "load_model"):
        monkeypatch.setattr(T, name, lambda *a, _n=name, **k: calls.append(_n))
    port = free_port()
    rc = T.main(["--vllm-port", str(port), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and calls == []
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "./run_algo.sh" in err[0], err


def test_default_command_names_the_server_before_any_heavy_import(tmp_path):
    # The README's run command on a box with no server and no network (the Hub unreachable).
    port = free_port()
    res = run(["--dataset", "gsm8k"], tmp_path, {"GRPO_VLLM_PORT": str(port)})
    line = one_error_line(res)
    assert res.returncode == 2
    assert f"127.0.0.1:{port}" in line and "./run_algo.sh gsm8k" in line
    assert "--vllm-mode none" in line  # the way out on a machine without GPUs


def test_refused_connection_is_not_waited_for(monkeypatch):
    sleeps = fast_time(monkeypatch, startup)
    port = free_port()
    cfg = T.resolve_config(["--vllm-port", str(port), "--vllm-server-timeout", "600"])
    with pytest.raises(T.ConfigError, match=f"nothing listens at 127.0.0.1:{port}"):
        T.check_vllm_server(cfg)
    assert sum(sleeps) <= 5  # a few quick tries, not vllm_server_timeout's 600 s of polling


def test_listening_but_unhealthy_server_is_waited_for(monkeypatch, health):
    sleeps = fast_time(monkeypatch, startup)
    server = health(sick=3)
    cfg = T.resolve_config(["--smoke", "--vllm-mode", "server", "--vllm-port", str(server.port)])
    assert T.check_vllm_server(cfg) is None
    assert server.polls == 4 and len(sleeps) == 3


def test_server_that_never_gets_healthy_times_out_naming_it(monkeypatch, health):
    fast_time(monkeypatch, startup)
    server = health(sick=10**9)
    cfg = T.resolve_config(
        ["--smoke", "--vllm-mode", "server", "--vllm-port", str(server.port)]
        + ["--vllm-server-timeout", "0.5"]
    )
    with pytest.raises(T.ConfigError) as err:
        T.check_vllm_server(cfg)
    msg = str(err.value)
    assert f"127.0.0.1:{server.port}" in msg and "not healthy" in msg and "\n" not in msg
    assert server.polls >= 2


def test_server_mode_on_cpu_with_a_healthy_server_says_cuda(health, capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # vllm installed, as on a box that has the extra
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    server = health()
    out = tmp_path / "o"
    argv = ["--smoke", "--vllm-mode", "server", "--vllm-port", str(server.port)]
    assert T.main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert server.polls == 1


# ------------------------------------------------------------------------------------------------
# 1. The Hub: detected offline within seconds, the cache used, the way out named
# ------------------------------------------------------------------------------------------------
def test_unreachable_hub_names_local_model_dir_and_data_dir(tmp_path):
    res = run(["--dataset", "gsm8k", "--vllm-mode", "none"], tmp_path)
    line = one_error_line(res)
    assert res.returncode == 1
    assert "Qwen/Qwen2.5-1.5B-Instruct" in line and "unreachable" in line
    assert "--model-id DIR" in line and "--data-dir DIR" in line
    assert "Hub" in res.stdout and "HF_HUB_OFFLINE" in res.stdout  # said once, not retried


def test_unreachable_hub_with_local_model_names_data_dir(tmp_path):
    tok = str(FIXTURES / "qwen2.5-tokenizer")
    res = run(["--vllm-mode", "none", "--model-id", tok, "--dry-run"], tmp_path, light=False)
    line = one_error_line(res)
    assert res.returncode == 1
    assert "openai/gsm8k" in line and "--data-dir DIR" in line and "--model-id" not in line
    assert "HF_HUB_OFFLINE=1" in res.stdout


def test_unreachable_hub_with_a_cached_model_runs_from_the_cache(tmp_path):
    # A Hub cache holding the model's tokenizer: with the Hub unreachable, the run goes on offline.
    repo = tmp_path / "hf_home" / "hub" / "models--Qwen--Qwen2.5-1.5B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    files = repo / "snapshots" / ("0" * 40)
    shutil.copytree(FIXTURES / "qwen2.5-tokenizer", files)
    (files / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    args = ["--vllm-mode", "none", "--dry-run", "--data-dir", str(FIXTURES / "gsm8k")]
    res = run([*args, "--output-dir", str(tmp_path / "o")], tmp_path, light=False)
    assert res.returncode == 0, res.stderr
    assert "HF_HUB_OFFLINE=1" in res.stdout and "<|im_start|>user" in res.stdout


def test_reachable_hub_stays_online(monkeypatch, health):
    server = health()  # any HTTP answer means the Hub is there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.port}")
    cfg = T.resolve_config(["--vllm-mode", "none", "--model-id", "nobody/not-a-model"])
    assert T.check_hub(cfg, T.BUILTIN_MODELS) is None
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hub_is_not_probed_when_nothing_needs_it(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    T.check_hub(T.resolve_config(["--smoke"]), T.BUILTIN_MODELS)
    assert "HF_HUB_OFFLINE" not in os.environ and capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------
# 2. Paths that do not exist fail in one line before any heavy import
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "rc", "needles"),
    [
        (["--data-dir", "/nonexistent"], 1, ["data_dir", "/nonexistent", "no such directory"]),
        (["--model-id", "/nonexistent"], 1, ["model_id", "/nonexistent", "nor a Hub id"]),
        (["--model-id", "outputs/run/final"], 1, ["model_id", "outputs/run/final"]),
        (["--score", "missing.jsonl"], 1, ["score", "missing.jsonl", "no such file"]),
        (["--resume", "--output-dir", "empty"], 2, ["resume", "no checkpoint-", "empty"]),
    ],
)
def test_missing_paths_fail_in_one_line_before_heavy_imports(tmp_path, args, rc, needles):
    res = run([*args, "--vllm-mode", "none"], tmp_path)
    line = one_error_line(res)
    assert res.returncode == rc
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize(
    ("model_id", "ok"),
    [
        ("Qwen/Qwen2.5-1.5B-Instruct", True),
        ("gpt2", True),
        ("my-org/model.v2_final", True),
        ("/abs/path", False),
        ("./rel", False),
        ("~/models/x", False),
        ("a/b/c", False),
        ("org/-bad", False),
        ("org/a..b", False),
        ("org/a--b", False),
        ("org/" + "x" * 97, False),
    ],
)
def test_hub_id_shape(model_id, ok):
    assert startup.is_hub_id(model_id) is ok


def test_existing_paths_pass(tmp_path):
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-12").mkdir()
    (tmp_path / "s.jsonl").write_text("")
    cfg = T.resolve_config(
        ["--resume", "--output-dir", str(tmp_path / "run"), "--score", str(tmp_path / "s.jsonl")]
        + ["--model-id", str(tmp_path), "--data-dir", str(tmp_path)]
    )
    assert T.check_paths(cfg, T.BUILTIN_MODELS) is None
    assert T.last_checkpoint(cfg.output_dir) == str(tmp_path / "run" / "checkpoint-12")


# ------------------------------------------------------------------------------------------------
# 3. eval_ks follows eval_samples unless set
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "ks"),
    [
        ([], (1, 2, 4, 8, 10)),
        (["--eval-samples", "4"], (1, 2, 4)),
        (["--eval-samples", "6"], (1, 2, 4, 6)),
        (["--eval-samples", "1"], (1,)),
        (["--eval-samples", "16"], (1, 2, 4, 8, 16)),
        (["--eval-samples", "0", "--num-generations", "8"], (1, 2, 4, 8)),  # train/pass@k only
        (["--eval-samples", "4", "--eval-ks", "3,1"], (1, 3)),  # explicit ks are kept, sorted
    ],
)
def test_eval_ks_follow_eval_samples(args, ks):
    cfg = T.resolve_config(args)
    assert cfg.eval_ks == ks
    assert all(k <= (cfg.eval_samples or cfg.num_generations) for k in cfg.eval_ks)


def test_explicit_eval_ks_above_eval_samples_stay_an_error(monkeypatch):
    monkeypatch.setenv("GRPO_EVAL_SAMPLES", "4")
    with pytest.raises(T.ConfigError, match=r"k=8 > eval_samples=4"):
        T.resolve_config(["--eval-ks", "1,8"])


# ------------------------------------------------------------------------------------------------
# 4. log.jsonl: every logged step on disk as it happens; --plot redraws metrics.png from it
# ------------------------------------------------------------------------------------------------
def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_run_killed_before_its_first_checkpoint_keeps_its_log(monkeypatch, tmp_path):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    build = T.build_trainer
    monkeypatch.setattr(T, "build_trainer", lambda *a: build(*a[:6], [*a[6], CtrlC()]))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        T.main(
            ["--smoke", "--output-dir", str(out), "--save-steps", "100", "--max-eval-samples", "2"]
        )
    assert not list(out.glob("checkpoint-*"))  # nothing but log.jsonl keeps the history
    records = _records(out)
    assert records[0] == {"event": "train_begin", "step": 0}
    train = [r for r in records[1:] if "loss" in r]
    evals = [r for r in records[1:] if "eval_pass@1" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    assert all({"reward", "rewards/correctness/mean", "pass@1"} <= set(r) for r in train)
    files = [json.loads((out / "eval" / f"step_{s:05d}.json").read_text()) for s in (0, 2)]
    summaries = [{**f["summary"], "problems": f["problems"]} for f in files]
    for rec, summary, f in zip(evals, summaries, files, strict=True):
        assert {k[5:]: v for k, v in rec.items() if k != "step" and "_ci95_" not in k} == summary
        cis = {k[5:]: v for k, v in rec.items() if "_ci95_" in k}
        want = {}
        for m, (lo, hi) in f["ci95"].items():
            want |= {f"{m}_ci95_lo": lo, f"{m}_ci95_hi": hi}
        assert cis == want

    (out / "metrics.png").unlink(missing_ok=True)
    seen = {}
    plot = modes.plot_metrics
    monkeypatch.setattr(
        modes, "plot_metrics", lambda d, h, e: seen.update(h=h, e=e) or plot(d, h, e)
    )
    assert T.main(["--plot", str(out)]) == 0
    assert seen["h"] == train
    assert seen["e"] == [
        {"step": s, **summary} for s, summary in zip((0, 2), summaries, strict=True)
    ]
    assert (out / "metrics.png").stat().st_size > 1000


def test_read_log_drops_what_a_resumed_run_redoes(tmp_path):
    lines = [
        {"event": "train_begin", "step": 0},
        {"step": 0, "eval_pass@1": 0.1},
        {"step": 1, "loss": 1.0, "reward": 0.1},
        {"step": 2, "loss": 1.0, "reward": 0.2},
        {"step": 2, "eval_pass@1": 0.2},
        {"step": 3, "loss": 1.0, "reward": 0.3},  # past checkpoint-2: redone after the resume
        {"step": 3, "eval_pass@1": 0.3},
        {"event": "train_begin", "step": 2},
        {"step": 3, "loss": 1.0, "reward": 0.33},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo'  # killed mid-write
    (tmp_path / "log.jsonl").write_text(text)
    history, evals = run_log.read_log(str(tmp_path))
    assert [(h["step"], h["reward"]) for h in history] == [(1, 0.1), (2, 0.2), (3, 0.33)]
    assert evals == [{"step": 0, "pass@1": 0.1}, {"step": 2, "pass@1": 0.2}]


def test_eval_only_logs_its_summary(tmp_path):
    out = tmp_path / "e"
    argv = ["--smoke", "--eval-only", "--max-eval-samples", "1", "--eval-samples", "2"]
    assert T.main([*argv, "--output-dir", str(out)]) == 0
    rec = json.loads((out / "eval" / "step_00000.json").read_text())
    logged = {f"eval_{k}": v for k, v in {**rec["summary"], "problems": rec["problems"]}.items()}
    assert _records(out) == [{"step": 0, **logged}]  # as a training run logs its evaluations


def test_plot_without_a_log_is_one_line(tmp_path, capsys):
    assert T.main(["--plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log.jsonl" in err[0]
