"""LoRA with vLLM: TRL's weight sync (its real iterator and colocate push, into a stand-in engine)
on a bf16 tiny Qwen2 must leave the frozen base exactly as it was."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import train_trl_grpo as T
from grpo_extensions import exact_lora_sync

SYNCS = 10


class _Engine:
    """What TRL's colocate sync touches of vLLM's LLM: load_weights and reset_prefix_cache."""

    def __init__(self) -> None:
        self.pushed: dict[str, torch.Tensor] = {}
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        worker = SimpleNamespace(model_runner=runner)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.pushed[name] = tensor.clone()

    def reset_prefix_cache(self) -> None:
        pass


def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = T.build_smoke_model(tokenizer, seed=0).to(torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _train_adapters(model, step: int) -> None:
    """A stand-in optimizer step: new adapter values (B starts at zero, which merges to nothing)."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _sync_path(model, tokenizer, monkeypatch):
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    engine = _Engine()
    monkeypatch.setattr(VLLMGeneration, "_init_vllm", lambda self: setattr(self, "llm", engine))
    vg = VLLMGeneration(model, Accelerator(cpu=True), tokenizer, mode="colocate")
    return vg, engine


def _base(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("exact", [True, False], ids=["ours", "trl-alone"])
def test_weight_syncs_leave_the_lora_base_exact(tokenizer, monkeypatch, exact):
    model = _lora_model(tokenizer)
    start = _base(model)
    vg, engine = _sync_path(model, tokenizer, monkeypatch)
    if exact:
        exact_lora_sync(vg)
    for step in range(SYNCS):
        _train_adapters(model, step)
        vg.sync_weights()
    now = _base(model)
    assert all(torch.equal(now[n], start[n]) for n in start if "base_layer" not in n)
    layers = [n for n in start if "base_layer" in n]
    changed = sum(int((now[n] != start[n]).sum()) for n in layers)
    if not exact:  # TRL's in-place merge and unmerge alone: the test can see the drift
        assert changed > 0.1 * sum(start[n].numel() for n in layers)
        return
    assert changed == 0
    # The engine got the merged policy: each weight as peft merges it (to within the one bf16
    # rounding peft does twice), under the names TRL gives them.
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(engine.pushed) == sorted(n for n in merged if n != "lm_head.weight")
    lora_layers = 0
    for name, tensor in engine.pushed.items():
        assert tensor.dtype == torch.bfloat16
        if name.endswith("proj.weight"):
            lora_layers += 1
            assert not torch.equal(tensor, start[_peft_name(name, start)])
            assert torch.allclose(tensor.float(), merged[name].float(), rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(tensor, merged[name])
    assert lora_layers == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers


def _peft_name(name: str, start: dict) -> str:
    (hit,) = [n for n in start if n.endswith(name.replace(".weight", ".base_layer.weight"))]
    return hit


def test_saved_adapter_on_the_original_base_is_the_trained_policy(tokenizer, monkeypatch, tmp_path):
    from peft import PeftModel

    model = _lora_model(tokenizer)
    vg, _ = _sync_path(model, tokenizer, monkeypatch)
    exact_lora_sync(vg)
    for step in range(SYNCS):
        _train_adapters(model, step)
        vg.sync_weights()
    model.save_pretrained(tmp_path / "adapter")
    original = T.build_smoke_model(tokenizer, seed=0).to(torch.bfloat16)
    reloaded = PeftModel.from_pretrained(original, tmp_path / "adapter")
    ids = torch.tensor([tokenizer("What is 2 + 2? The answer is 4.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_lora_variants_are_refused(tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    base = T.build_smoke_model(tokenizer, seed=0).to(torch.bfloat16)
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    vg, _ = _sync_path(get_peft_model(base, config), tokenizer, monkeypatch)
    with pytest.raises(ValueError, match="not supported"):
        exact_lora_sync(vg)
