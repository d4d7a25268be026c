"""Start-up checks: each fails in one line within seconds, before torch, transformers or datasets
are imported (they take ~10 s) and before anything is loaded. Plumbing, not task logic.

Order: `validate` when the config is resolved (values and combinations that cannot work); then, in
train_trl_grpo.main(), paths, (server mode) the vLLM server, the vllm package, the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from errors import ConfigError, DataError
from run_guards import HEALTH_MODES


def torch_threads(requested: int) -> tuple[int, str]:
    """torch's thread count for CPU runs and where it came from (`requested` 0 = automatic).

    The cores this process may use (taskset, cgroup cpusets), not the machine's: on a busy or
    pinned box, more threads than usable cores made a forward pass ~10x slower than one thread.
    """
    if requested:
        return requested, "cpu_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={omp!r}: the thread count must be an integer >= 1")
        return int(omp), "OMP_NUM_THREADS"
    return len(os.sched_getaffinity(0)), "usable cores"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# huggingface_hub's repo id rules: [owner/]name, word characters, "-" and ".", at most 96 each,
# starting and ending with a word character, no "--" or "..".
HUB_ID = re.compile(r"(?:\w(?:[\w.-]{0,94}\w)?/)?\w(?:[\w.-]{0,94}\w)?")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N directory, as transformers' get_last_checkpoint, sans its import."""
    steps = [
        int(p.name[len("checkpoint-") :])
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and p.name[len("checkpoint-") :].isdigit()
    ]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def check_paths(cfg, builtin_models: tuple[str, ...]) -> None:
    """Paths that cannot be found fail here, in one line, before seconds of heavy imports."""
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"data_dir: no such directory: {cfg.data_dir}")
    if not (
        cfg.model_id in builtin_models or Path(cfg.model_id).is_dir() or is_hub_id(cfg.model_id)
    ):
        raise DataError(
            f"model_id: {cfg.model_id!r} is neither a local directory nor a Hub id (owner/name)"
        )
    if cfg.score and not Path(cfg.score).is_file():
        raise DataError(f"score: no such file: {cfg.score}")
    if cfg.resume and last_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"resume: no checkpoint-* directory in {cfg.output_dir}")


def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether the Hub answers anything within `timeout` s, name lookup included (urllib honours
    the same proxy variables as huggingface_hub)."""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        except urllib.error.HTTPError:
            pass  # an HTTP error is still an answer
        except (OSError, ValueError):
            return
        answered.set()

    thread = threading.Thread(target=probe, daemon=True)  # a stuck DNS lookup has no timeout
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def check_hub(cfg, builtin_models: tuple[str, ...]) -> None:
    """With the Hub unreachable, go offline at once (the local cache only) instead of letting
    huggingface_hub retry for minutes, and fail in one line if the model is not cached. Runs before
    transformers and datasets are imported: they read HF_HUB_OFFLINE at import."""
    hub_model = not (cfg.score or cfg.verify_gold or cfg.model_id in builtin_models)
    hub_model = hub_model and not Path(cfg.model_id).is_dir()
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if offline.upper() in ("1", "ON", "YES", "TRUE") or not (hub_model or not cfg.data_dir):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if hub_reachable(endpoint):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    for name in ("huggingface_hub.constants", "datasets.config"):  # already imported (a notebook)
        if name in sys.modules:
            sys.modules[name].HF_HUB_OFFLINE = True
    print(f"the Hugging Face Hub ({endpoint}) is unreachable: local cache only (HF_HUB_OFFLINE=1)")
    if hub_model:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(cfg.model_id, "config.json"), str):
            data = "" if cfg.data_dir else " and local data with --data-dir DIR"
            raise DataError(
                f"model {cfg.model_id!r} is not in the local cache and the Hugging Face Hub "
                f"({endpoint}) is unreachable: pass a local model directory with --model-id DIR"
                + data
            )


def server_url(cfg) -> str:
    return f"http://{cfg.vllm_host}:{cfg.vllm_port}"


def check_vllm_server(cfg, connect_tries: int = 3) -> None:
    """Nothing listening at host:port fails within seconds: ./run_algo.sh starts the trainer only
    once its server is healthy, so no server is on its way. A server that listens but is not healthy
    yet is waited for, up to vllm_server_timeout. One serving another model is refused."""
    where = f"{cfg.vllm_host}:{cfg.vllm_port}"
    for attempt in range(1, connect_tries + 1):
        try:
            socket.create_connection((cfg.vllm_host, cfg.vllm_port), timeout=2).close()
            break
        except OSError as e:
            if attempt == connect_tries:
                raise ConfigError(
                    f"no vLLM server: nothing listens at {where} ({e.strerror or e}); start one "
                    f"with ./run_algo.sh {cfg.dataset} (or `trl vllm-serve --model {cfg.model_id} "
                    f"--port {cfg.vllm_port}`), or use --vllm-mode none (no GPU) / colocate"
                ) from None
            time.sleep(1)
    base = server_url(cfg)
    deadline, waiting = time.monotonic() + cfg.vllm_server_timeout, False
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"the vLLM server at {where} is not healthy after "
                f"{cfg.vllm_server_timeout:.0f} s (its /health never answered 200); see its log"
            )
        if not waiting:
            waiting = True
            print(
                f"waiting up to {cfg.vllm_server_timeout:.0f} s for {where} to be healthy",
                flush=True,
            )
        time.sleep(2)
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            served = [m["id"] for m in json.load(r)["data"]]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return  # an older server without /v1/models: TRL will report problems itself
    if cfg.model_id not in served:
        raise ConfigError(
            f"the vLLM server at {cfg.vllm_host}:{cfg.vllm_port} serves {served}, not "
            f"{cfg.model_id!r}: restart it with the same model as the trainer"
        )


def check_vllm_package(cfg, training: bool) -> None:
    """Before anything is loaded, so a missing vllm answers in a second, not after the model."""
    import importlib.util

    # The trainer talks to a server through vllm's NCCL client; --eval-only there needs only HTTP.
    if (cfg.vllm_mode == "colocate" and (training or cfg.eval_only)) or (
        cfg.vllm_mode == "server" and training
    ):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                f"vllm_mode={cfg.vllm_mode} needs the vllm package, which is not installed: "
                "run `uv sync --extra vllm` on a GPU box, or use vLLM's CPU build "
                "(scripts/vllm_cpu_env.sh), or --vllm-mode none"
            )


LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16
# transformers' schedulers that need no extra arguments ("constant" would ignore warmup_steps).
LR_SCHEDULERS = (
    "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt"
)  # fmt: skip


def validate(cfg, tasks: dict, in_memory_models: tuple[str, ...] = ()) -> None:
    """Values and combinations that cannot work, each refused in one line (ConfigError) when the
    config is resolved. `tasks`: train_trl_grpo.TASKS; `in_memory_models`: model ids built in
    memory (--smoke's), which vLLM cannot load."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.dataset in tasks, f"dataset: {cfg.dataset!r} is not one of {', '.join(tasks)}")
    need(not cfg.demo or cfg.dataset == "gsm8k", "demo: tuned for --dataset gsm8k only")
    need(cfg.vllm_mode in ("server", "colocate", "none"), "vllm_mode: server | colocate | none")
    need(
        not (cfg.model_id in in_memory_models and cfg.vllm_mode == "colocate"),
        "vllm_mode=colocate: vLLM loads a model directory, and --smoke builds its model in "
        "memory; save one and pass --model-id DIR, or use --vllm-mode none",
    )
    need(
        cfg.dtype != "fp16",
        "dtype: fp16 is not supported (fp16 loss scaling is untested here; with fp16 weights the "
        "first optimizer step fails); use bf16 (Ampere or newer GPU) or fp32",
    )
    need(cfg.dtype in ("auto", "bf16", "fp32"), "dtype: auto | bf16 | fp32")
    need(cfg.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler: one of {' | '.join(LR_SCHEDULERS)}")
    need(cfg.report_to in ("wandb", "tensorboard", "none"), "report_to: wandb | tensorboard | none")
    need(cfg.mbpp_reward in ("fraction", "all"), "mbpp_reward: fraction | all")
    need(cfg.loss_type in LOSS_TYPES, f"loss_type: one of {' | '.join(LOSS_TYPES)}")
    need(cfg.lora_r >= 0 and cfg.eval_samples >= 0, "lora_r and eval_samples must be >= 0")
    need(cfg.eval_subsample >= 0, "eval_subsample: must be >= 0 (0 = the whole eval set)")
    need(
        cfg.eval_split in tasks[cfg.dataset].splits,
        f"eval_split: {cfg.dataset} has splits "
        f"{', '.join(tasks[cfg.dataset].splits)}, not {cfg.eval_split!r}",
    )
    for name in ("batch_size", "grad_accum_steps", "total_steps", "num_generations"):
        need(getattr(cfg, name) >= 1, f"{name}: must be >= 1")
    need(cfg.num_generations >= 2, "num_generations: GRPO needs at least 2 completions per prompt")
    need(
        (cfg.batch_size * cfg.grad_accum_steps) % cfg.num_generations == 0,
        f"num_generations: batch_size * grad_accum_steps = {cfg.batch_size * cfg.grad_accum_steps}"
        f" is not a multiple of num_generations = {cfg.num_generations}",
    )
    need(all(k >= 1 for k in cfg.eval_ks), "eval_ks: each k must be >= 1")
    if cfg.eval_samples:
        bad = [k for k in cfg.eval_ks if k > cfg.eval_samples]
        need(
            not bad,
            f"eval_ks: k={bad[0]} > eval_samples={cfg.eval_samples} (never clamped)" if bad else "",
        )
    need(
        cfg.temperature > 0 or (cfg.eval_only and cfg.temperature == 0),
        "temperature: must be > 0 to train (at 0 every completion of a GRPO group is the same)",
    )
    eval_t = cfg.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    need(
        eval_t > 0 or (eval_t == 0 and cfg.eval_samples <= 1),
        f"eval_temperature: {eval_t} with eval_samples={cfg.eval_samples}: greedy samples are all "
        "the same; use --eval-samples 1, or --eval-greedy for greedy pass@1 beside sampled pass@k",
    )
    need(cfg.max_completion_length >= 1, "max_completion_length: must be >= 1")
    need(cfg.save_steps >= 0, "save_steps: must be >= 0 (0 = no checkpoints)")
    need(cfg.save_total_limit >= 0, "save_total_limit: must be >= 0 (0 = keep every checkpoint)")
    need(cfg.ddp_timeout >= 1, "ddp_timeout: must be >= 1 (seconds)")
    need(cfg.cpu_threads >= 0, "cpu_threads: must be >= 0 (0 = from the usable cores)")
    torch_threads(cfg.cpu_threads)  # a bad OMP_NUM_THREADS is a config error too
    need(cfg.dynamic_sampling_max_rounds >= 1, "dynamic_sampling_max_rounds: must be >= 1")
    need(
        0 <= cfg.overlong_buffer <= cfg.max_completion_length,
        "overlong_buffer: must be between 0 and max_completion_length",
    )
    need(cfg.overlong_penalty >= 0, "overlong_penalty: must be >= 0")
    need(cfg.grader_timeout > 0 and cfg.sandbox_timeout > 0, "timeouts must be > 0")
    need(cfg.stall_timeout >= 0, "stall_timeout: must be >= 0 (0 = off)")
    need(cfg.health in HEALTH_MODES, f"health: {' | '.join(HEALTH_MODES)}")
    if cfg.report_to == "wandb":
        need(
            bool(os.environ.get("WANDB_API_KEY"))
            or os.environ.get("WANDB_MODE") in ("offline", "disabled"),
            "report_to: wandb needs WANDB_API_KEY (or WANDB_MODE=offline) in the env or .env",
        )
