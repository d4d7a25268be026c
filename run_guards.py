"""Run guards: a run that never hangs silently, and says early when it cannot learn.

* `Watchdog`: a monitor thread that ends the process when nothing has made progress for
  `timeout` seconds. Progress is a `beat(what)`: a finished training step, an answered generation
  or evaluation request, a finished weight sync or evaluation. `waiting_on(description)` names
  the blocking call in progress (a server URL and endpoint, a collective), so that the line it
  prints says what is stuck. On expiry it dumps every thread's stack into the run's directory
  with `faulthandler` (C code, no GIL needed), prints one line and leaves with `os._exit`, which
  works while the main thread is blocked inside C (a socket read, an NCCL collective). Should a
  C call hold the GIL itself, the monitor thread cannot run; for that case it keeps
  faulthandler's own C timer armed a little beyond the deadline as a backstop.
  The module-level `beat` and `waiting_on` do nothing until `start_watchdog` is called, so the
  generation code can call them unconditionally.
* Learning-health checks: small functions over plain numbers (each returns a one-line message, or
  None when healthy), and `HealthMonitor`, a transformers TrainerCallback that feeds them the
  per-step logs TRL produces and snapshots of a few parameters. `health` = warn (print the line
  once, log, keep going) | abort (stop at the first tripped check) | off. Non-finite loss or
  gradient norm stops the run in warn and abort alike, before the step's checkpoint is written.

Worker-free and cheap: the per-step checks read numbers TRL has already computed; the parameter
snapshot is 1,024 strided elements of at most 12 tensors, taken once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_STALL = 3  # the watchdog's exit status: apart from config (2) and data/eval (1) errors
EXIT_HEALTH = 4  # a health check stopped the run (non-finite values, or health=abort)
HEALTH_MODES = ("warn", "abort", "off")

# The bounds and windows of the checks. Why these values:
NO_SIGNAL_STEPS = 3  # a single step of equal rewards is common early on; three in a row is not
TRUNCATED_STEPS = 3
TRUNCATED_FRAC = 0.95  # "nearly all": a few ended completions still leave the length too small
IS_RANGE = (0.5, 2.0)  # a mean importance weight outside it: sampler and trainer disagree
# Mean |engine - trainer| per-token logprob of the probe. bf16 engines against fp32 masters differ
# by a few hundredths; stale weights after a real update differ by far more.
ENGINE_TOL = 0.1
SNAPSHOT_TENSORS = 8  # trainable tensors sampled (and 4 frozen ones)
SNAPSHOT_ELEMENTS = 1024


# ==================================================================================================
# Stall watchdog
# ==================================================================================================
class Watchdog:
    """Ends the process after `timeout` seconds without a `beat`. `step` is a callable giving the
    current training step for the line (None outside training)."""

    def __init__(
        self,
        timeout: float,
        log_dir: str | os.PathLike,
        rank: int = 0,
        step: Callable[[], int | None] | None = None,
        poll: float = 1.0,
        exit_code: int = EXIT_STALL,
        backstop_grace: float = 30.0,
    ) -> None:
        self.timeout = float(timeout)
        self.rank = rank
        self.step = step or (lambda: None)
        self.poll = min(poll, max(self.timeout / 4, 0.05))
        self.exit_code = exit_code
        self.backstop_grace = backstop_grace
        self.stack_file = Path(log_dir) / f"stall_stacks.rank{rank}.txt"
        self.last = time.monotonic()
        self.last_what = "start"
        self._waits: dict[int, str] = {}  # id -> description of a blocking call in progress
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._backstop = None  # the file faulthandler's C timer writes into
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.stack_file.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def beat(self, what: str) -> None:
        self.last = time.monotonic()  # one float store: safe from any thread without the lock
        self.last_what = what

    @contextlib.contextmanager
    def waiting_on(self, description: str):
        key = next(self._ids)
        with self._lock:
            self._waits[key] = description
        try:
            yield
        finally:
            with self._lock:
                self._waits.pop(key, None)

    def stuck_on(self) -> str:
        with self._lock:
            waits = list(dict.fromkeys(self._waits.values()))  # oldest first, no repeats
        return "; ".join(waits)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._disarm_backstop()
        with contextlib.suppress(OSError):  # the backstop's file, if it never fired
            if self.stack_file.stat().st_size == 0:
                self.stack_file.unlink()

    # --- the monitor thread -------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            idle = time.monotonic() - self.last
            if idle >= self.timeout:
                self._expire(idle)
                return
            self._arm_backstop(self.timeout - idle + self.backstop_grace + 2 * self.poll)

    def _arm_backstop(self, seconds: float) -> None:
        if self._backstop is None:
            self._backstop = open(self.stack_file, "w")  # noqa: SIM115 - kept open for C
        faulthandler.dump_traceback_later(seconds, exit=True, file=self._backstop)

    def _disarm_backstop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self._backstop is not None:
            self._backstop.close()
            self._backstop = None

    def line(self, idle: float) -> str:
        step = self.step()
        where = f"at training step {step}" if step is not None else "outside training steps"
        stuck = self.stuck_on()
        return (
            f"stalled: no progress for {idle:.0f} s (stall_timeout {self.timeout:g} s) {where}, "
            f"rank {self.rank}; "
            + (f"stuck in: {stuck}; " if stuck else "")
            + f"last progress: {self.last_what}; stacks of every thread in {self.stack_file}; "
            + stall_hint(stuck)
        )

    def _expire(self, idle: float) -> None:
        self._disarm_backstop()
        msg = self.line(idle)
        try:
            with open(self.stack_file, "w") as f:
                f.write(msg + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        finally:
            # os.write: no Python-level stream lock that a stuck thread might hold.
            with contextlib.suppress(OSError):
                os.write(2, ("\n" + msg + "\n").encode())
            os._exit(self.exit_code)


def stall_hint(stuck: str) -> str:
    if "/v1/completions" in stuck or "/generate" in stuck or "server" in stuck:
        return (
            "check that the vLLM server is alive and answering (its log, `curl URL/health`, "
            "GPU memory), or raise stall_timeout for very long generations"
        )
    if "sync" in stuck or "collective" in stuck or "NCCL" in stuck:
        return (
            "check every process and the server are alive and reach each other "
            "(vllm_group_port, NCCL_DEBUG=INFO), or raise stall_timeout"
        )
    return "check the stacks for the blocking call, or raise stall_timeout if steps are this slow"


_active: Watchdog | None = None


def start_watchdog(
    timeout: float, log_dir: str | os.PathLike, rank: int = 0, step=None
) -> Watchdog | None:
    """The process's watchdog (0 = off). Replaces one started before."""
    global _active
    stop_watchdog()
    if timeout and timeout > 0:
        _active = Watchdog(timeout, log_dir, rank, step).start()
    return _active


def stop_watchdog() -> None:
    global _active
    if _active is not None:
        _active.close()
        _active = None


def beat(what: str) -> None:
    if _active is not None:
        _active.beat(what)


def waiting_on(description: str):
    return _active.waiting_on(description) if _active is not None else contextlib.nullcontext()


# ==================================================================================================
# Health checks: plain numbers in, a one-line message (or None) out
# ==================================================================================================
def _fmt(x: float) -> str:
    return f"{x:.3g}"


def check_no_signal(
    steps: list[dict], k: int = NO_SIGNAL_STEPS, max_reward: float | None = None
) -> str | None:
    """Every group's rewards equal (TRL's frac_reward_zero_std == 1) in each of the last k steps."""
    recent = steps[-k:]
    if len(recent) < k or not all(s.get("frac_reward_zero_std", 0.0) >= 1.0 for s in recent):
        return None
    last = recent[-1]
    reward = last.get("reward", math.nan)
    spread = last.get("reward_std", math.nan)
    if reward == 0 and spread == 0:
        what = "all 0"
    elif max_reward is not None and spread == 0 and math.isclose(reward, max_reward):
        what = f"all at the maximum {_fmt(max_reward)}"
    else:
        what = f"equal within each group (mean {_fmt(reward)})"
    parts = [
        f"{key[len('rewards/') : -len('/mean')]} {_fmt(v)}"
        for key, v in last.items()
        if key.startswith("rewards/") and key.endswith("/mean")
    ]
    return (
        f"no learning signal: every group's rewards were equal for {k} steps in a row ({what}; "
        f"component means: {', '.join(parts) or 'none logged'}); GRPO's advantages are 0, so "
        "nothing is learned: check the reward functions on a few completions (--score), the "
        "prompt format, and that the task is neither too hard nor too easy for the model"
    )


def check_importance(steps: list[dict], bounds: tuple[float, float] = IS_RANGE) -> str | None:
    value = steps[-1].get("sampling/importance_sampling_ratio/mean") if steps else None
    if value is None or math.isnan(value) or bounds[0] <= value <= bounds[1]:
        return None
    return (
        f"importance weights out of range: the mean vLLM importance weight is {_fmt(value)}, "
        f"outside [{bounds[0]:g}, {bounds[1]:g}]: the sampler and the trainer disagree on the "
        "completions' probabilities; check that weights reach the engine, that both use the same "
        "dtype and temperature, and sampling/sampling_logp_difference"
    )


def check_truncated(
    steps: list[dict], k: int = TRUNCATED_STEPS, frac: float = TRUNCATED_FRAC
) -> str | None:
    recent = steps[-k:]
    if len(recent) < k or not all(s.get("completions/clipped_ratio", 0.0) >= frac for s in recent):
        return None
    share = recent[-1]["completions/clipped_ratio"]
    return (
        f"completions truncated: {share:.0%} of completions hit max_completion_length for {k} "
        "steps in a row, so they end without an answer: raise max_completion_length, or ask for "
        "shorter answers in the prompt"
    )


def non_finite(logs: dict) -> list[str]:
    """The loss and gradient-norm keys whose value is NaN or infinite."""
    bad = []
    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, int | float) and not math.isfinite(value):
            bad.append(f"{key}={value}")
    return bad


def non_finite_params(params: list) -> list[str]:
    """Names of the watched tensors holding a NaN or an infinity (strided sample, like snapshot)."""
    import torch

    bad = []
    for name, p in params:
        flat = p.detach().reshape(-1)
        if not bool(torch.isfinite(flat[:: max(1, flat.numel() // SNAPSHOT_ELEMENTS)]).all()):
            bad.append(name)
    return bad


def check_weights_moved(
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    trainable: Iterable[str],
) -> tuple[str | None, str | None]:
    """(weights-not-moving message, frozen-changed message) from sampled tensor values taken
    before and after an optimizer step that had a learning rate and a gradient."""
    trainable = set(trainable)
    changed = {name for name in before if before[name] != after.get(name)}
    moving = frozen = None
    sampled_trainable = trainable & set(before)
    if sampled_trainable and not (changed & sampled_trainable):
        moving = (
            f"weights not moving: none of the {len(sampled_trainable)} sampled trainable tensors "
            "changed in an optimizer step with a non-zero learning rate and gradient; check that "
            "the optimizer holds the model's parameters (requires_grad, LoRA targets) and that "
            "nothing restores the weights"
        )
    moved_frozen = sorted(changed - trainable)
    if moved_frozen:
        frozen = (
            f"frozen tensors changed: {', '.join(moved_frozen[:3])}"
            + (f" and {len(moved_frozen) - 3} more" if len(moved_frozen) > 3 else "")
            + " changed though they are not trained (requires_grad=False); check what writes "
            "to them (weight tying, an in-place op, a LoRA merge left in place)"
        )
    return moving, frozen


def check_engine_following(
    engine: list[float], trainer: list[float], tol: float = ENGINE_TOL
) -> str | None:
    """Per-token logprobs of the same probe sequence from the generation engine and the trainer."""
    pairs = [(e, t) for e, t in zip(engine, trainer, strict=True) if math.isfinite(e)]
    if not pairs:
        return "engine not following: the engine returned no usable logprobs for the probe"
    gap = sum(abs(e - t) for e, t in pairs) / len(pairs)
    if gap <= tol:
        return None
    return (
        f"engine not following: after the weight sync the engine's logprobs of a fixed probe "
        f"differ from the trainer's by {gap:.3g} per token on average (tolerance {tol:g}): "
        "it is sampling with stale weights; check the weight sync (server log, "
        "vllm_group_port, that the server serves model_id)"
    )


# ==================================================================================================
# Parameter snapshots and the probe's logprobs (torch imported lazily: the checks above need none)
# ==================================================================================================
def sample_params(model, tensors: int = SNAPSHOT_TENSORS) -> tuple[list, list]:
    """(trainable, frozen) named parameters to watch: spread over the model, skipping embeddings
    and heads (a row of a token that was not sampled gets no gradient) and empty shards (ZeRO-3)."""
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.numel() > 0 and "embed" not in n and "lm_head" not in n
    ]

    def spread(items: list, count: int) -> list:
        if len(items) <= count:
            return items
        return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]

    trainable = spread([x for x in named if x[1].requires_grad], tensors)
    frozen = spread([x for x in named if not x[1].requires_grad], max(1, tensors // 2))
    return trainable, frozen


def snapshot(params: list) -> dict[str, list[float]]:
    out = {}
    for name, p in params:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // SNAPSHOT_ELEMENTS)
        out[name] = flat[::stride][:SNAPSHOT_ELEMENTS].float().cpu().tolist()
    return out


def trainer_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 under `model`."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
    return lp.cpu().tolist()


def _prompt_logprob_values(entries: list, ids: list[int]) -> list[float]:
    """The actual tokens' logprobs from vLLM prompt_logprobs (a list whose first item is None; each
    other item maps token id, an int in-process or a str over HTTP, to a Logprob or a dict)."""
    out = []
    for tok, entry in zip(ids[1:], entries[1:], strict=True):
        item = (entry or {}).get(tok, (entry or {}).get(str(tok)))
        value = getattr(item, "logprob", None) if not isinstance(item, dict) else item["logprob"]
        out.append(math.nan if value is None else float(value))
    return out


def colocate_logprobs(llm, ids: list[int]) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=1)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return _prompt_logprob_values(out.prompt_logprobs, ids)


def server_logprobs(base_url: str, model: str, ids: list[int], timeout: float = 120) -> list[float]:
    """Through the OpenAI-compatible route `trl vllm-serve` serves (the one TRL's own
    get_sequence_logprobs uses)."""
    import json
    import urllib.request

    body = {"model": model, "prompt": [ids], "max_tokens": 1, "temperature": 1.0}
    body["prompt_logprobs"] = 1
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{base_url}/v1/completions", json.dumps(body).encode(), headers)
    with waiting_on(f"POST {base_url}/v1/completions (health probe)"):
        with urllib.request.urlopen(req, timeout=timeout) as r:
            choice = json.load(r)["choices"][0]
    beat("health probe answered")
    return _prompt_logprob_values(choice["prompt_logprobs"], ids)


# ==================================================================================================
# The callback
# ==================================================================================================
class _HealthChecks:
    """The HealthMonitor's logic, free of transformers: `HealthMonitor` (below) adds the
    TrainerCallback base only when first used, so importing this module stays instant.

    Feeds TRL's per-step logs to the checks; adds `health/<check>` (1 = tripped at this step) to
    each training log, so log.jsonl and the report_to loggers carry them. It must see the logs
    before the loggers do: insert it first in the trainer's callback list.

    The trainer calls `after_sync(probe)` at the sync points it chooses; `probe` returns (engine
    logprobs, trainer logprobs) of the fixed probe sequence."""

    CHECKS = (
        "no_signal",
        "importance_weights",
        "weights_not_moving",
        "frozen_changed",
        "engine_not_following",
        "non_finite",
        "truncated",
    )

    def __init__(
        self,
        mode: str = "warn",
        max_reward: float | None = None,
        is_main: bool = True,
        k: int = NO_SIGNAL_STEPS,
        printer: Callable[[str], None] | None = None,
    ) -> None:
        if mode not in HEALTH_MODES:
            raise ValueError(f"health must be one of {HEALTH_MODES}, got {mode!r}")
        self.mode = mode
        self.max_reward = max_reward
        self.is_main = is_main
        self.k = k
        # A line of its own: a progress bar may be mid-line on stderr.
        self.printer = printer or (lambda s: print(f"\n{s}", file=sys.stderr, flush=True))
        self.steps: list[dict] = []
        self.tripped: dict[str, dict] = {}
        self.pending: dict[str, str] = {}  # tripped between logs (probe, snapshots)
        self._watch: tuple[list, list] | None = None
        self._before: dict | None = None
        self._lr = 0.0
        self.stopped: str | None = None  # set when the run must stop; the trainer's caller exits
        self.pending_fatal: str | None = None

    # --- results -------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"mode": self.mode, "checks": list(_HealthChecks.CHECKS), "tripped": self.tripped}

    def trip(self, name: str, step: int, message: str, fatal: bool = False) -> None:
        """Print the check's line the first time it trips; on a fatal check, or any with
        health=abort, ask the trainer to stop (`stopped` says why)."""
        if name not in self.tripped:
            self.tripped[name] = {"step": step, "line": message}
            if self.is_main:
                self.printer(f"health: step {step}: {message}")
        if (fatal or self.mode == "abort") and self.stopped is None:
            self.stopped = (
                f"health: stopped at step {step} ("
                + ("non-finite values stop every run" if fatal else f"{name}, health=abort")
                + "); the checkpoints saved before this step are kept, this step's is not saved"
            )

    # --- parameter snapshots -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.mode != "off" and model is not None:
            self._watch = sample_params(model)
            self._before = snapshot(self._watch[0] + self._watch[1])

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        if optimizer is not None and optimizer.param_groups:
            self._lr = float(optimizer.param_groups[0].get("lr", 0.0))  # the coming step's

    def on_step_end(self, args, state, control, **kw):
        # An update can overflow the weights while the step's loss and gradient were finite; the
        # next generation would then crash on NaN probabilities. Caught here, before it runs.
        if self.mode == "off" or self._watch is None:
            return
        bad = non_finite_params(self._watch[0] + self._watch[1])
        if bad:
            self.pending_fatal = (
                f"non-finite values: the weights after this step's update ({', '.join(bad[:3])}"
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                + "); lower the learning rate, check max_grad_norm and the dtype"
            )
            self.trip("non_finite", state.global_step, self.pending_fatal, fatal=True)
            # Stop, and log this step even off the logging_steps grid: on_log drops its checkpoint.
            control.should_training_stop = control.should_log = True

    def _judge_weights(self, step: int, grad_norm) -> None:
        if self._before is None or not self._lr > 0 or not grad_norm:
            return  # no update was asked for: nothing to judge yet
        trainable, frozen = self._watch
        after = snapshot(trainable + frozen)
        moving, moved_frozen = check_weights_moved(self._before, after, [n for n, _ in trainable])
        self._before = None  # judged once, on the first step that should have moved them
        if moving:
            self.pending["weights_not_moving"] = moving
        if moved_frozen:
            self.pending["frozen_changed"] = moved_frozen

    # --- the engine probe ----------------------------------------------------------------------
    def after_sync(self, probe: Callable[[], tuple[list[float], list[float]]]) -> None:
        if self.mode == "off":
            return
        engine, trainer = probe()
        message = check_engine_following(engine, trainer)
        if message:
            self.pending["engine_not_following"] = message

    # --- the per-step logs ---------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kw):
        if self.mode == "off" or not logs or "reward" not in logs:
            if self.stopped:  # whatever the log, no checkpoint of a step that stopped the run
                control.should_save = False
            return  # evaluation logs and the end-of-training summary carry no "reward"
        step = state.global_step
        self.steps = [*self.steps[-max(self.k, TRUNCATED_STEPS) :], dict(logs)]  # a window
        found = dict(self.pending)
        self.pending.clear()
        bad = non_finite(logs)
        if self.pending_fatal:
            found["non_finite"] = self.pending_fatal
        elif bad:
            found["non_finite"] = (
                f"non-finite values: {', '.join(bad)}; lower the learning rate, check "
                "max_grad_norm and the dtype, and look at the rewards of the steps before"
            )
        elif self._before is not None:
            self._judge_weights(step, logs.get("grad_norm"))
            found.update(self.pending)
            self.pending.clear()
        for name, fn in (
            ("no_signal", lambda: check_no_signal(self.steps, self.k, self.max_reward)),
            ("importance_weights", lambda: check_importance(self.steps)),
            ("truncated", lambda: check_truncated(self.steps, self.k)),
        ):
            message = fn()
            if message:
                found[name] = message
        for name in _HealthChecks.CHECKS:
            logs[f"health/{name}"] = float(name in found)
        if "non_finite" in found:
            self.trip("non_finite", step, found.pop("non_finite"), fatal=True)
        for name, message in found.items():
            self.trip(name, step, message)
        if self.stopped:
            # Stop after this log reaches the loggers, and write no checkpoint of this step: the
            # trainer saves after on_log, and only when should_save is still set.
            control.should_training_stop = True
            control.should_save = False


class _ProgressBeats:
    """Training progress for the watchdog: a finished step or checkpoint."""

    def on_train_begin(self, args, state, control, **kw):
        beat(f"training begins at step {state.global_step}")

    def on_step_end(self, args, state, control, **kw):
        beat(f"training step {state.global_step} finished")

    def on_save(self, args, state, control, **kw):
        beat(f"checkpoint of step {state.global_step} saved")


def __getattr__(name: str):
    # PEP 562: the callbacks get their TrainerCallback base on first use, importing transformers
    # then, so that importing this module costs nothing.
    base = {"HealthMonitor": _HealthChecks, "ProgressBeats": _ProgressBeats}.get(name)
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    cls = type(name, (base, TrainerCallback), {"__module__": __name__})
    globals()[name] = cls
    return cls


def attach(trainer, mode: str, max_reward: float, probe_ids: list[int], probe_every: int):
    """The learning-health checks (HealthMonitor) on `trainer`, first among its callbacks so that
    their health/* keys reach every logger, and the progress beats of its steps. The engine probe
    runs after weight syncs (the first after step 1, then every probe_every steps: eval_every) in
    single-process vLLM runs only: with several processes the trainer's forward pass would need
    all of them. Returns the monitor (its `stopped` says why a run was stopped)."""
    this = sys.modules[__name__]  # the callback classes come from __getattr__ on first use
    is_main = trainer.accelerator.is_main_process
    monitor = this.HealthMonitor(mode, max_reward=max_reward, is_main=is_main)
    trainer.callback_handler.callbacks.insert(0, monitor)
    trainer.add_callback(this.ProgressBeats())
    trainer.health_monitor = monitor
    if trainer.use_vllm and trainer.accelerator.num_processes == 1 and mode != "off":
        trainer.probe_ids, trainer.probe_every = probe_ids, probe_every
    return monitor
