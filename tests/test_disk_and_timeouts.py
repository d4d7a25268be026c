"""What a run leaves on disk (checkpoints kept, final/ dtype) and the settings a multi-process
run depends on (collective timeout, ZeRO-3's sharded loading), on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_grpo_extensions import _odd_rows_vary, _prompts

import train_trl_grpo as T


def _cfg(*extra: str) -> T.Config:
    return T.resolve_config(["--smoke", "--output-dir", "o", *extra])


def test_checkpoints_kept_default_to_the_newest_one(clean_env):
    assert T.Config.save_total_limit == 1
    assert T.grpo_config(_cfg()).save_total_limit == 1
    assert T.grpo_config(_cfg("--save-total-limit", "3")).save_total_limit == 3
    assert T.grpo_config(_cfg("--save-total-limit", "0")).save_total_limit is None  # keep all
    with pytest.raises(T.ConfigError, match="^save_total_limit: must be >= 0"):
        _cfg("--save-total-limit", "-1")


def test_collective_timeout_outlasts_an_evaluation(clean_env):
    """The other processes wait in a barrier while the main one evaluates: the default 30 minutes
    of torch.distributed would kill a run whose evaluation takes longer."""
    args = T.grpo_config(_cfg())
    assert args.ddp_timeout == T.Config.ddp_timeout >= 3 * 3600
    assert T.grpo_config(_cfg("--ddp-timeout", "60")).ddp_timeout == 60
    with pytest.raises(T.ConfigError, match="^ddp_timeout: must be >= 1"):
        _cfg("--ddp-timeout", "0")


def test_final_model_in_the_compute_dtype_is_half_the_size(clean_env, tokenizer):
    cfg = _cfg("--dtype", "bf16", "--final-compute-dtype")
    trainer = T.build_trainer(
        cfg, T.build_smoke_model(tokenizer, 0), tokenizer, _prompts(tokenizer), [_odd_rows_vary]
    )
    trainer.save_final(str(clean_env / "full"))
    trainer.save_final(str(clean_env / "half"), T.torch_dtype(cfg))

    def tensors(name):
        with safe_open(str(clean_env / name / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    full, half = tensors("full"), tensors("half")
    assert full.keys() == half.keys()
    assert {v.dtype for v in full.values()} == {torch.float32}  # the fp32 master weights
    assert {v.dtype for v in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())
    size = {n: (clean_env / n / "model.safetensors").stat().st_size for n in ("full", "half")}
    assert size["half"] == pytest.approx(size["full"] / 2, rel=0.01)
    config = json.loads((clean_env / "half" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert next(trainer.model.parameters()).dtype == torch.float32  # training's weights: as were


def test_zero3_config_exists_before_the_model_loads(clean_env, monkeypatch):
    """accelerate's zero3_init_flag reaches from_pretrained only through the DeepSpeed config
    that the training arguments register: they must come first."""
    import accelerate.utils

    events: list[str] = []

    class FakeDeepSpeedPlugin:  # deepspeed itself is not installed here
        def __init__(self, *a, **k):
            pass

        def set_mixed_precision(self, *a):
            pass

        def set_deepspeed_weakref(self):
            events.append("deepspeed config")

    class Loaded(Exception):
        pass

    def load_model(*a, **k):
        events.append("model")
        raise Loaded

    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", FakeDeepSpeedPlugin)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(T, "load_model", load_model)
    with pytest.raises(Loaded):
        T.main(["--smoke", "--output-dir", "o", "--eval-samples", "0"])
    assert events[:2] == ["deepspeed config", "model"]
