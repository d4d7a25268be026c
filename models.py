"""Loading the tokenizer and the model, each failure one DataError line; the tiny random model of
--smoke. Plumbing: which model and in which dtype is train_trl_grpo.load_model's decision."""

from __future__ import annotations

from errors import DataError

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_from(source: str, model_id: str):
    """The tokenizer at `source` (a directory or Hub id), with a chat template and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer for model {model_id!r}: {first}") from None
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE  # only for tokenizers that ship none
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_smoke_model(tokenizer, seed: int):
    """A tiny random-init Qwen2 (head_dim 32) over the real Qwen2.5 vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def pretrained_model(model_id: str, dtype):
    """A causal LM from a directory or the Hub, with flash attention 2 where it is installed."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, attn_implementation="flash_attention_2" if flash else "sdpa"
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load model {model_id!r}: {first}") from None
