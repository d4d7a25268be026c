"""Where the GRPO loop is, and what this harness adds to it (a subclass of TRL 1.16's
GRPOTrainer, not a fork), plus the callbacks train_trl_grpo.py hangs on it.

The loop is TRL's. Per optimizer step, `Trainer.training_step` runs once per micro-batch; every
`steps_per_generation` micro-batches, `GRPOTrainer._prepare_inputs` calls
`_generate_and_score_completions`, which generates (`_generate`: vLLM or transformers), scores
(`_calculate_rewards`: the reward functions, weighted by `reward_weights`), and computes the
group-relative advantages ((reward - group mean) / group std, per `scale_rewards`), the old
log-probs (`_get_per_token_logps_and_entropies`) and vLLM's importance-sampling weights.
`_compute_loss` (via `compute_loss`) then computes the clipped policy-gradient loss of `loss_type`
with the optional KL term. To change how advantages or the loss are computed, override those two
methods in `DynamicSamplingGRPOTrainer` below; everything else here leaves them as TRL has them.

What the subclass adds:

* Dynamic sampling (DAPO, arXiv:2503.14476): a group whose completions all got the same total
  reward has zero advantage everywhere, so it carries no GRPO signal. With `dynamic_sampling=True`
  `_generate_and_score_completions` (TRL's one place where a generation batch is produced) keeps
  only groups with reward variance and generates more groups, from prompts drawn at random from
  the training set, until the batch holds as many groups as configured, for at most `max_rounds`
  generation rounds per batch (the first included). When the cap is hit it says so in one line and
  fills the batch with dropped groups (zero advantage) so that TRL's batch shapes stay intact.
  Logged per step: `dynamic_sampling/dropped_frac` (share of generated groups dropped),
  `dynamic_sampling/rounds` and `dynamic_sampling/cap_hit`. With it off, every override below
  calls TRL's method unchanged.
* Time breakdown: every optimizer step logs `time/generation`, `time/reward`, `time/train`
  (forward, backward, the old/ref log-prob passes and the optimizer), `time/weight_sync`,
  `time/eval`, their window `time/step` (from the step's start to the end of its evaluation;
  checkpoint saving and logging come after it), `time/health_probe` (the engine-not-following
  probe, run_guards.py) and `generation/tokens_per_s`.

The callbacks: `LogCallback` appends every log to output_dir/log.jsonl as it happens;
`EvalCallback` evaluates at the baseline, every eval_every steps and at the last step, on the
weights the generation engine holds.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections import defaultdict

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

import run_guards
from run_log import append_log

TIME_KEYS = ("generation", "reward", "train", "weight_sync", "eval", "health_probe")


class StepClock:
    """Wall time per category; time inside a nested section counts for the inner category only,
    so the categories of one step add up to the time they cover."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, start, time spent in nested sections]

    def start(self, name: str) -> None:
        self._open.append([name, time.perf_counter(), 0.0])

    def stop(self) -> None:
        name, start, nested = self._open.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - nested
        if self._open:
            self._open[-1][2] += elapsed

    @contextlib.contextmanager
    def section(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()


class _StepTimer(TrainerCallback):
    """Opens the step window at on_step_begin and closes it in on_step_end. Added after every
    other callback, so the evaluation callback's on_step_end falls inside the window."""

    def __init__(self, trainer: DynamicSamplingGRPOTrainer) -> None:
        self.t = trainer
        self.begin = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self.t.clock.totals.clear()
        self.t._generated_tokens = 0
        self.begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.t.clock.start("train")

    def on_optimizer_step(self, args, state, control, **kw):
        self.t.clock.stop()

    def on_step_end(self, args, state, control, **kw):
        totals, metrics = self.t.clock.totals, self.t._metrics["train"]
        metrics["time/step"].append(time.perf_counter() - self.begin)
        for key in TIME_KEYS:
            metrics[f"time/{key}"].append(totals.get(key, 0.0))
        if totals.get("generation"):
            metrics["generation/tokens_per_s"].append(
                self.t._generated_tokens / totals["generation"]
            )


class DynamicSamplingGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with dynamic sampling (off by default) and the per-step time breakdown."""

    def __init__(self, *args, dynamic_sampling: bool = False, max_rounds: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.dynamic_sampling = dynamic_sampling
        self.max_rounds = max_rounds
        self.clock = StepClock()
        self._generated_tokens = 0
        self._last_rewards: torch.Tensor | None = None
        # Refill prompts: one seeded stream per process, independent of the trainer's sampler.
        self._refill_rng = random.Random(self.args.seed * 1000 + self.accelerator.process_index)
        self._refill_order: list[int] = []
        # Run guards (run_guards.py), set by the script after construction: the HealthMonitor,
        # and the engine probe's token ids and cadence (probe after these syncs only).
        self.health_monitor: run_guards.HealthMonitor | None = None
        self.probe_ids: list[int] | None = None
        self.probe_every = 0
        self._probed_step = -1
        if self.use_vllm:  # TRL's and our eval callback's syncs both go through this attribute
            sync = self.vllm_generation.sync_weights

            def timed_sync(*a, **k):
                with self.clock.section("weight_sync"), run_guards.waiting_on(self._sync_what()):
                    out = sync(*a, **k)
                run_guards.beat("weight sync finished")
                self._maybe_probe()
                return out

            self.vllm_generation.sync_weights = timed_sync
        self.add_callback(_StepTimer(self))

    # --- run guards: what a stall line names, and the engine probe ----------------------------
    def _server_url(self) -> str | None:
        client = getattr(getattr(self, "vllm_generation", None), "vllm_client", None)
        return getattr(client, "base_url", None)

    def _generation_what(self) -> str:
        url = self._server_url()
        if url:
            return f"POST {url}/v1/completions (training generation, TRL's vLLM client)"
        return f"training generation ({'colocated vLLM' if self.use_vllm else 'transformers'})"

    def _sync_what(self) -> str:
        url = self._server_url()
        if url:
            return f"weight sync to the vLLM server {url} (NCCL collective)"
        return "weight sync to the colocated vLLM engine"

    def _maybe_probe(self) -> None:
        """The engine-not-following check, at the first sync after an optimizer step and then
        every probe_every steps: the engine's and the trainer's logprobs of one fixed sequence."""
        step, mon = self.state.global_step, self.health_monitor
        if mon is None or not self.probe_ids or step < 1 or step == self._probed_step:
            return
        if self._probed_step >= 0 and not (self.probe_every and step % self.probe_every == 0):
            return
        self._probed_step = step
        with self.clock.section("health_probe"):
            model = self.accelerator.unwrap_model(self.model)
            url, ids = self._server_url(), self.probe_ids
            if url:
                model_name = self.vllm_generation.vllm_client.model  # served name, as TRL sends it
                engine = run_guards.server_logprobs(url, model_name, ids)
            else:
                engine = run_guards.colocate_logprobs(self.vllm_generation.llm, ids)
            mon.after_sync(lambda: (engine, run_guards.trainer_logprobs(model, ids)))

    # --- timing: each override calls TRL's method unchanged -----------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        with self.clock.section("train"):
            return super().training_step(model, inputs, num_items_in_batch)

    def _generate(self, prompts: list):
        with self.clock.section("generation"), run_guards.waiting_on(self._generation_what()):
            out = super()._generate(prompts)
        run_guards.beat("training generation finished")
        self._generated_tokens += sum(len(ids) for ids in out[1])  # out[1]: completion_ids
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self.clock.section("reward"):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards  # every process's rows, for the dynamic-sampling filter
        return rewards

    # --- dynamic sampling ---------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if not (self.dynamic_sampling and self.model.training):
            return super()._generate_and_score_completions(inputs)
        n, acc = self.num_generations, self.accelerator
        want = len(inputs) // n  # groups per generation batch on this process
        kept: list[tuple[dict, int]] = []  # (round output, group index in it)
        spare: list[tuple[dict, int]] = []  # zero-variance groups, for a batch the cap cuts short
        seen = dropped = 0
        batch = inputs
        for rounds in range(1, self.max_rounds + 1):
            out = super()._generate_and_score_completions(batch)
            signal = self._groups_with_signal(len(batch))
            for g, has_signal in enumerate(signal):
                (kept if has_signal else spare).append((out, g))
            counts = acc.gather(
                torch.tensor([len(signal), len(signal) - sum(signal), len(kept)], device=acc.device)
            ).view(-1, 3)
            seen, dropped = seen + int(counts[:, 0].sum()), dropped + int(counts[:, 1].sum())
            missing = want - int(counts[:, 2].min())  # the same on every process: same rounds
            if missing <= 0 or rounds == self.max_rounds:
                break
            # Enough prompts for the missing groups at the keep rate seen so far, at most a batch.
            rate = max(seen - dropped, 1) / seen
            batch = self._draw_prompts(min(want, max(missing, math.ceil(missing / rate))))
        if missing > 0 and acc.is_main_process:
            print(
                f"dynamic sampling: step {self.state.global_step + 1}: only "
                f"{want - missing}/{want} groups per process had reward variance after "
                f"{rounds} generation rounds (dynamic_sampling_max_rounds); the rest are "
                "zero-variance groups (zero advantage)",
                flush=True,
            )
        chosen = (kept + spare[::-1])[:want]  # newest spares first: the freshest samples
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/dropped_frac"].append(dropped / seen)
        metrics["dynamic_sampling/rounds"].append(float(rounds))
        metrics["dynamic_sampling/cap_hit"].append(float(missing > 0))
        return self._concat_groups(chosen)

    def _groups_with_signal(self, local_rows: int) -> list[bool]:
        """This process's groups: True where the total reward is not the same for all."""
        total = (self._last_rewards * self.reward_weights.to(self._last_rewards.device)).nansum(1)
        # A row every reward function left unscored is NaN: TRL gives it zero advantage.
        total[torch.isnan(self._last_rewards).all(1)] = torch.nan
        start = self.accelerator.process_index * local_rows
        groups = total[start : start + local_rows].view(-1, self.num_generations).tolist()
        return [len({x for x in g if not math.isnan(x)}) > 1 for g in groups]

    def _draw_prompts(self, groups: int) -> list[dict]:
        """`groups` training rows at random (a reshuffled pass over the set), each num_generations
        times in a row, the layout of TRL's RepeatSampler."""
        rows = []
        for _ in range(groups):
            if not self._refill_order:
                self._refill_order = list(range(len(self.train_dataset)))
                self._refill_rng.shuffle(self._refill_order)
            rows += [self.train_dataset[self._refill_order.pop()]] * self.num_generations
        return rows

    def _concat_groups(self, chosen: list[tuple[dict, int]]) -> dict:
        """One generation batch from groups of several rounds, re-padded to a common width."""
        n = self.num_generations
        out: dict = {}
        for key, value in chosen[0][0].items():
            if key == "num_items_in_batch":
                continue
            if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2):
                raise TypeError(f"dynamic_sampling: cannot regroup the {key!r} input")
            parts = [o[key][g * n : (g + 1) * n] for o, g in chosen]
            if value.dim() == 2:
                width = max(p.size(1) for p in parts)
                pad = self._tokenizer.pad_token_id if key.endswith("_ids") else 0
                side = "left" if key.startswith("prompt") else "right"  # TRL's padding sides
                parts = [_pad_to(p, width, pad, side) for p in parts]
            out[key] = torch.cat(parts)
        mask = out["completion_mask"] * out.get("tool_mask", 1)
        out["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()  # as TRL counts it
        return out


def _pad_to(x: torch.Tensor, width: int, value: float, side: str) -> torch.Tensor:
    fill = x.new_full((x.size(0), width - x.size(1)), value)
    return torch.cat([fill, x] if side == "left" else [x, fill], dim=1)


def print_run_summary(args, weights_dtype) -> None:
    """What a step is, and what TRL does silently, said once at start."""
    compute = "bf16 autocast" if args.bf16 else "fp32"
    print(f"precision: {str(weights_dtype).removeprefix('torch.')} weights, {compute} compute")
    world = args.world_size
    total = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    print(
        f"batch: {total} completions per optimizer step (global) = {total // args.num_generations} "
        f"prompts per step x {args.num_generations} generations per prompt; {world} trainer "
        f"process(es) x {args.per_device_train_batch_size} completions per micro-step x "
        f"{args.gradient_accumulation_steps} micro-steps"
    )
    print(
        f"lr: {args.learning_rate:g}, schedule {args.lr_scheduler_type.value}, "
        f"{args.warmup_steps} warm-up steps, {args.max_steps} steps"
    )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        print(
            "vLLM importance-sampling correction: on (TRL's default; "
            f"mode {args.vllm_importance_sampling_mode}, clip max "
            f"{args.vllm_importance_sampling_clip_max}): corrects the gap between vLLM's and "
            "the trainer's log-probs"
        )
    else:
        print("vLLM importance-sampling correction: off (--vllm-mode none: no vLLM to correct)")
    sys.stdout.flush()


# --- callbacks ----------------------------------------------------------------------------------
class LogCallback(TrainerCallback):
    """Every log (training steps, and evaluations through on_log) appended to log.jsonl."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:  # marks where a resumed run picks up (run_log.read_log)
            append_log(self.output_dir, {"event": "train_begin", "step": state.global_step})

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs:
            append_log(self.output_dir, {**logs, "step": state.global_step})


class EvalCallback(TrainerCallback):
    """Baseline before step 1, every `every` steps, and the final weights at the last step.

    `evaluate(trainer, step, whole)` runs on the main process and returns the evaluation's record
    (train_trl_grpo.evaluate's); `whole` is False for the evaluations between baseline and final,
    which may use a subsample. The record's summary goes to the report_to loggers as eval_*."""

    def __init__(self, evaluate, every: int) -> None:
        self.evaluate, self.every = evaluate, every
        self.trainer = None  # set once the trainer exists

    def run(self, state, control, args, whole: bool = True) -> None:
        t = self.trainer
        if t.health_monitor is not None and t.health_monitor.stopped:
            return  # the weights that stopped the run would only crash the sampler
        if t.use_vllm and state.global_step != t._last_loaded_step:
            # TRL pushes weights lazily before its next generation; evaluate what we claim.
            t.vllm_generation.sync_weights()
            t._last_loaded_step = state.global_step
        if t.accelerator.is_main_process:
            record = self.evaluate(t, state.global_step, whole)
            # "eval_" is the prefix the wandb and tensorboard callbacks file under "eval/".
            logs = {f"eval_{k}": v for k, v in record["summary"].items()}
            logs["eval_problems"] = record["problems"]
            # Straight to the report_to loggers; on_log clears should_log, which would drop this
            # step's own training log, so keep it.
            should_log = control.should_log
            t.callback_handler.on_log(args, state, control, logs=logs)
            control.should_log = should_log
        with run_guards.waiting_on("the processes' barrier after an evaluation (collective)"):
            t.accelerator.wait_for_everyone()
        run_guards.beat(f"evaluation at step {state.global_step} finished")

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step == 0:
            self.run(state, control, args)

    def on_step_end(self, args, state, control, **kw):
        last = state.global_step >= state.max_steps
        if last or (self.every and state.global_step % self.every == 0):
            with self.trainer.clock.section("eval"):  # logged as time/eval
                self.run(state, control, args, whole=last)
