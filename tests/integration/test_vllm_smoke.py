"""Proof the install is complete: a real vLLM CPU server with a LoRA adapter on SmolLM2."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.vllm_process import VLLMProcess

pytestmark = pytest.mark.slow


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA adapter with random non-zero B, so it really changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


def test_vllm_serves_a_lora_adapter(smollm2_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(smollm2_dir, tmp_path / "adapter", seed=0)
    with VLLMProcess(str(smollm2_dir), adapters={"a0": str(adapter)}, max_lora_rank=8) as vllm:
        models = httpx.get(f"{vllm.url}/v1/models", timeout=30).json()
        assert {m["id"] for m in models["data"]} >= {"a0"}
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}
        body["logprobs"] = 1
        lora = httpx.post(f"{vllm.url}/v1/completions", json={**body, "model": "a0"}, timeout=120)
        base = httpx.post(
            f"{vllm.url}/v1/completions", json={**body, "model": str(smollm2_dir)}, timeout=120
        )
        assert lora.status_code == 200, lora.text
        choice = lora.json()["choices"][0]
        assert choice["text"].strip()
        # the adapter is applied: its log-probs differ from the base model's
        lp_lora = choice["logprobs"]["token_logprobs"]
        lp_base = base.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert lp_lora[0] != pytest.approx(lp_base[0], abs=1e-4)
    assert not vllm.running()
