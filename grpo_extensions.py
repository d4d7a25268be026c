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
  `dynamic_sampling/rounds` and `dynamic_sampling/cap_hit`; TRL's generation metrics (reward,
  lengths, ...) are pooled over the rounds, each round weighted by the groups it generated. With
  it off, every override below calls TRL's method unchanged.
* Time breakdown: every optimizer step logs `time/generation`, `time/reward`, `time/train`
  (forward, backward, the old/ref log-prob passes, the NaN check, gradient clipping and the
  optimizer step), `time/weight_sync`, `time/eval`, their window `time/step` (from the step's
  start to the end of its evaluation; checkpoint saving and logging come after it) and
  `generation/tokens_per_s` (all processes' completion tokens), and `time/health_probe` (the
  engine-not-following probe, run_guards.py). On a GPU each section boundary synchronizes the
  device, so queued kernels count where they were launched.
* Truncated sampling with vLLM (top_k > 0 or top_p < 1): vLLM reports each sampled token's
  log-probability after its top-k / top-p truncation, the trainer's are of the whole distribution,
  so TRL's importance weight old / sampling per token is the mass Z_t the truncation kept, and its
  product over a sequence (5e-12 .. 6e-5 on SmolLM2-135M) scaled the loss to nothing (TRL #6789).
  `_generate` adds log Z_t, computed from the trainer's own logits by vLLM's rule, to vLLM's
  log-probabilities: the weight then compares the two engines on the same truncated distribution,
  the gap the correction is for. The policy gradient stays that of the untruncated policy, as
  without the correction. Cost: one extra no-grad forward per generation batch, only then.
* LoRA with vLLM: TRL's weight sync merges the adapter into the frozen base in place and unmerges
  it after (peft's merge_adapter / unmerge_adapter); in bf16 that round trip is not exact, and the
  base drifted (8 % of its entries changed after 10 syncs, 43 % after 100). `exact_lora_sync`
  keeps TRL's sync (its names, gathering and transport) but pushes each LoRA layer's merged
  weight as a new tensor, W + scale * B @ A rounded once, and leaves the base untouched.

The callbacks: `LogCallback` appends every log to output_dir/log.jsonl as it happens;
`EvalCallback` evaluates at the baseline, every eval_every steps and at the last step, on the
weights the generation engine holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

import run_guards
from run_log import append_log

TIME_KEYS = ("generation", "reward", "train", "weight_sync", "eval", "health_probe")


class StepClock:
    """Wall time per category; time inside a nested section counts for the inner category only,
    so the categories of one step add up to the time they cover.

    On a GPU every boundary waits for the queued kernels first (`sync`, torch.cuda.synchronize by
    default): kernels run asynchronously, so without it a section that launches work (backward)
    ends early and the next one to wait for the GPU (often a NaN check or the optimizer) is billed
    for it. One synchronize per boundary, a handful per step, costs microseconds."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        if sync is None and torch.cuda.is_available():
            sync = torch.cuda.synchronize
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, start, time spent in nested sections]

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open.append([name, self.now(), 0.0])

    def stop(self) -> None:
        name, start, nested = self._open.pop()
        elapsed = self.now() - start
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
    """Opens the step window and the "train" section at on_step_begin; "train" closes after the
    optimizer step, the window in on_step_end. So "train" is the step up to and including the
    optimizer step (forward, backward, the NaN check, gradient clipping, optimizer) less the
    sections nested in it (generation, reward, weight sync). Added after every other callback,
    so the evaluation callback's on_step_end falls inside the window."""

    def __init__(self, trainer: DynamicSamplingGRPOTrainer) -> None:
        self.t = trainer
        self.begin = 0.0

    def on_step_begin(self, args, state, control, **kw):
        clock = self.t.clock
        clock.totals.clear()
        self.t._generated_tokens = 0
        self.begin = clock.now()
        clock.start("train")

    def on_optimizer_step(self, args, state, control, **kw):
        self.t.clock.stop()

    def on_step_end(self, args, state, control, **kw):
        clock, metrics, acc = self.t.clock, self.t._metrics["train"], self.t.accelerator
        totals = clock.totals
        metrics["time/step"].append(clock.now() - self.begin)
        for key in TIME_KEYS:
            metrics[f"time/{key}"].append(totals.get(key, 0.0))
        # Every process generates its share of the batch: the throughput is all of their tokens
        # over this process's generation time (the processes wait for each other inside it).
        tokens = int(acc.gather(torch.tensor([self.t._generated_tokens], device=acc.device)).sum())
        if totals.get("generation"):
            metrics["generation/tokens_per_s"].append(tokens / totals["generation"])


class DynamicSamplingGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with dynamic sampling (off by default), the per-step time breakdown, vLLM
    log-probs made comparable under top-k/top-p, and an exact LoRA weight sync."""

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
            if hasattr(self.model, "peft_config"):
                exact_lora_sync(self.vllm_generation)
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
    def _generate(self, prompts: list):
        with self.clock.section("generation"), run_guards.waiting_on(self._generation_what()):
            out = super()._generate(prompts)
        run_guards.beat("training generation finished")
        self._generated_tokens += sum(len(ids) for ids in out[1])  # out[1]: completion_ids
        if self.use_vllm and out[4] is not None and (self.top_k > 0 or self.top_p < 1):
            with self.clock.section("train"):  # a log-prob pass, like TRL's old-log-prob one
                logps = self._untruncated_sampling_logps(out[0], out[1], out[4])
            out = (*out[:4], logps, *out[5:])
        return out

    # --- truncated sampling: vLLM's log-probs made comparable to the trainer's -------------------
    def _untruncated_sampling_logps(self, prompt_ids, completion_ids, logprobs):
        """vLLM's per-token log-probabilities (after top-k / top-p) plus the log of the mass that
        truncation kept under the current weights: log p(y) = log p_trunc(y) + log Z. Z comes from
        the trainer's logits, so a token near the cut-off is never sent to -inf by the two engines
        disagreeing on it; the engines' disagreement elsewhere is left for the correction."""
        from trl.models.utils import disable_gradient_checkpointing

        model, device = self.model, self.accelerator.device
        fixed = []
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs),
        ):
            for prompt, completion, lps in zip(prompt_ids, completion_ids, logprobs, strict=True):
                if not completion:
                    fixed.append(lps)
                    continue
                ids = torch.tensor([list(prompt) + list(completion)], device=device)
                with self.accelerator.autocast():
                    # The positions that predict the completion: the last len+1 but the final one.
                    logits = model(input_ids=ids, logits_to_keep=len(completion) + 1).logits[0, :-1]
                log_z = kept_log_mass(logits / self.temperature, self.top_k, self.top_p).tolist()
                fixed.append(
                    [None if x is None else x + z for x, z in zip(lps, log_z, strict=True)]
                )
        return fixed

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self.clock.section("reward"):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards  # every process's rows, for the dynamic-sampling filter
        return rewards

    # --- final model in another dtype -----------------------------------------------------------
    def save_final(self, output_dir: str, dtype: torch.dtype | None = None) -> None:
        """save_model, with the floating-point weights cast to `dtype` when given (the compute
        dtype: bf16 halves the fp32 master weights' size on disk)."""
        self._final_dtype = dtype
        try:
            self.save_model(output_dir)
        finally:
            self._final_dtype = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        dtype = getattr(self, "_final_dtype", None)
        if dtype is None:
            return super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        state = model.state_dict() if state_dict is None else state_dict
        cast: dict[tuple, torch.Tensor] = {}  # tied weights (embeddings) stay one tensor
        state = {
            k: cast.setdefault((v.data_ptr(), v.shape), v.to(dtype)) if v.is_floating_point() else v
            for k, v in state.items()
        }
        super()._save(output_dir, state)
        # save_pretrained writes the dtype of the live (fp32) model; vLLM's dtype "auto" reads it.
        path = os.path.join(output_dir or self.args.output_dir, "config.json")
        if os.path.isfile(path):  # a LoRA adapter has none
            with open(path) as fh:
                config = json.load(fh)
            config["dtype"] = str(dtype).removeprefix("torch.")
            with open(path, "w") as fh:
                json.dump(config, fh, indent=2)

    # --- resume: the refill stream continues where the checkpoint left it ----------------------
    def _refill_state_path(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"refill_state_{self.accelerator.process_index}.json")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = f"checkpoint-{self.state.global_step}"
        path = self._refill_state_path(os.path.join(self._get_output_dir(trial=trial), folder))
        os.makedirs(os.path.dirname(path), exist_ok=True)  # a process may get here before rank 0
        version, state, gauss = self._refill_rng.getstate()
        with open(path, "w") as fh:
            json.dump({"rng": [version, list(state), gauss], "order": self._refill_order}, fh)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not os.path.isfile(self._refill_state_path(checkpoint)):
            return  # a checkpoint from before this file existed: the stream starts afresh
        with open(self._refill_state_path(checkpoint)) as fh:
            saved = json.load(fh)
        version, state, gauss = saved["rng"]
        self._refill_rng.setstate((version, tuple(state), gauss))
        self._refill_order = saved["order"]

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
        metrics = self._metrics["train"]
        start = {k: len(v) for k, v in metrics.items()}
        per_round: list[tuple[int, dict[str, list[float]]]] = []  # (groups, metrics it appended)
        for rounds in range(1, self.max_rounds + 1):
            before = {k: len(v) for k, v in metrics.items()}
            out = super()._generate_and_score_completions(batch)
            signal = self._groups_with_signal(len(batch))
            for g, has_signal in enumerate(signal):
                (kept if has_signal else spare).append((out, g))
            counts = acc.gather(
                torch.tensor([len(signal), len(signal) - sum(signal), len(kept)], device=acc.device)
            ).view(-1, 3)
            per_round.append((int(counts[:, 0].sum()), _appended(metrics, before)))
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
        _pool_rounds(metrics, start, per_round)
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


def exact_lora_sync(vllm_generation) -> None:
    """Makes TRL's weight sync of a peft LoRA model leave the base weights bitwise as they were
    (see the module docstring). Plain LoRA on linear layers only, which is what this harness
    builds; anything else (DoRA and other variants, LoRA biases, embeddings) is refused."""
    from peft.tuners.lora import Linear, LoraLayer

    model = vllm_generation.model
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        if not isinstance(m, Linear) or m.lora_variant or any(m.lora_bias.values()):
            raise ValueError(
                f"LoRA with vLLM: {type(m).__name__} layers with variants or biases are not "
                "supported (plain LoRA on linear layers is)"
            )
    trl_iter = vllm_generation._iter_named_params

    def merged(m) -> torch.Tensor:
        w = m.get_base_layer().weight
        total = w.float()
        for name in m.active_adapters:
            if name in m.lora_A and not m.disable_adapters:
                total = total + m.get_delta_weight(name).float()
        return total.to(w.dtype)

    def iter_named_params():
        # TRL's iterator, with its in-place merge and unmerge turned off: it then yields each
        # base weight as it is, and that tensor is swapped for the merged one.
        model.merge_adapter = model.unmerge_adapter = lambda *a, **k: None
        swapped = set()
        try:
            by_storage = None
            for name, tensor in trl_iter():
                if by_storage is None:  # here: under TRL's parameter gathering (ZeRO-3)
                    by_storage = {m.get_base_layer().weight.data_ptr(): m for m in layers}
                m = by_storage.get(tensor.data_ptr())
                if m is not None and tensor.shape == m.get_base_layer().weight.shape:
                    swapped.add(m)
                    tensor = merged(m)
                yield name, tensor
        finally:
            del model.merge_adapter, model.unmerge_adapter
        if len(swapped) != len(layers):  # e.g. FSDP's own iteration: never push unmerged weights
            raise RuntimeError(
                f"LoRA weight sync: {len(layers) - len(swapped)} of {len(layers)} LoRA layers "
                "were not found among the weights TRL pushes"
            )

    vllm_generation._iter_named_params = iter_named_params


def kept_log_mass(logits: torch.Tensor, top_k: int, top_p: float, chunk: int = 128) -> torch.Tensor:
    """Per row of `logits` (temperature applied), the log of the probability mass that vLLM's
    sampler keeps, by its rule (vllm/v1/sample/ops/topk_topp_sampler.py,
    apply_top_k_top_p_pytorch): top-k keeps the logits >= the k-th largest (ties kept); top-p then
    drops, smallest first, the tokens whose cumulative probability (after top-k) is <= 1 - p,
    never the largest. Rows in chunks: a sort over the vocabulary is the peak memory."""
    out = []
    for rows in logits.float().split(chunk):
        total = rows.logsumexp(-1)
        if 0 < top_k < rows.size(-1):
            kth = rows.topk(top_k, dim=-1).values[:, -1:]
            rows = rows.masked_fill(rows < kth, -math.inf)
        if top_p < 1:
            ascending = rows.sort(-1).values
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False
            rows = ascending.masked_fill(drop, -math.inf)
        out.append(rows.logsumexp(-1) - total)
    return torch.cat(out) if out else logits.new_zeros(0)


def _pad_to(x: torch.Tensor, width: int, value: float, side: str) -> torch.Tensor:
    fill = x.new_full((x.size(0), width - x.size(1)), value)
    return torch.cat([fill, x] if side == "left" else [x, fill], dim=1)


# TRL sets this metric (a running total) instead of appending to it.
_SET_NOT_APPENDED = ("num_tokens",)


def _appended(metrics: dict[str, list], before: dict[str, int]) -> dict[str, list[float]]:
    return {
        k: v[before.get(k, 0) :]
        for k, v in metrics.items()
        if len(v) > before.get(k, 0) and k not in _SET_NOT_APPENDED
    }


def _pool_rounds(
    metrics: dict[str, list], start: dict[str, int], rounds: list[tuple[int, dict[str, list]]]
) -> None:
    """Replace what TRL appended in each generation round of one batch by one value per metric,
    weighted by the groups each round generated. TRL averages a metric's list at log time, so a
    refill round of one group would otherwise weigh as much as the first round of the whole batch.
    Minima and maxima are taken over the rounds; everything else (means, shares, standard
    deviations) is the group-weighted mean of the rounds' values."""
    for key in dict.fromkeys(k for _, appended in rounds for k in appended):
        vals = [
            (groups, sum(ok) / len(ok))
            for groups, appended in rounds
            if (ok := [x for x in appended.get(key, []) if not math.isnan(x)])
        ]
        del metrics[key][start.get(key, 0) :]
        leaf = key.rsplit("/", 1)[-1]
        if not vals:
            metrics[key].append(math.nan)  # as TRL's log(): a NaN-only metric logs None
        elif leaf == "min" or leaf.startswith("min_") or leaf.endswith("_min"):
            metrics[key].append(min(v for _, v in vals))
        elif leaf == "max" or leaf.startswith("max_") or leaf.endswith("_max"):
            metrics[key].append(max(v for _, v in vals))
        else:
            metrics[key].append(sum(g * v for g, v in vals) / sum(g for g, _ in vals))


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
        if args.top_k > 0 or args.top_p < 1:
            print(
                f"truncated sampling (top_k {args.top_k}, top_p {args.top_p}): vLLM's log-probs "
                "get the log of the mass vLLM's top-k / top-p truncation kept (one extra no-grad "
                "forward per generation batch), so the weights compare like with like"
            )
    else:
        print("vLLM importance-sampling correction: off (--vllm-mode none: no vLLM to correct)")
    sys.stdout.flush()


# --- callbacks ----------------------------------------------------------------------------------
class LogCallback(TrainerCallback):
    """Every log (training steps, and evaluations through on_log) appended to log.jsonl."""

    def __init__(self, output_dir: str, config: dict | None = None) -> None:
        self.output_dir, self.config = output_dir, config

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:  # marks where a resumed run picks up (run_log.read_log)
            append_log(self.output_dir, {"event": "train_begin", "step": state.global_step})
            wandb = sys.modules.get("wandb")  # TRL's wandb callback gives the run GRPOConfig only
            if self.config and wandb is not None and wandb.run is not None:
                wandb.run.config.update({"harness": self.config}, allow_val_change=True)

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
            for metric, (lo, hi) in record["ci95"].items():  # the 95 % intervals, as eval files
                logs[f"eval_{metric}_ci95_lo"], logs[f"eval_{metric}_ci95_hi"] = lo, hi
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
