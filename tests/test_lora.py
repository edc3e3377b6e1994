"""LoRA through PEFT: only adapters train, the base stays put, the adapter loads back."""

import json

import pytest
import torch

from meml.core.load import load_config
from meml.train.loop import train

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e  # runs of the trainer end to end


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_run_trains_adapters_and_they_load_back(tiny_model_dir, tmp_path, checkpointing):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{
            "model.lora.enabled": "true",
            "model.lora.r": 4,
            "model.lora.alpha": 8,
            "model.gradient_checkpointing": str(checkpointing).lower(),
            "sft.lr": "1e-2",
            "optim.lr": "1e-2",
        },
    )
    train(load_config("meml", overrides), "meml")
    ckpt = sorted((tmp_path / "checkpoints").iterdir())[-1] / "model"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 4 and not (ckpt / "model.safetensors").exists()  # adapter only

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, ckpt)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    merged = model.merge_and_unload().state_dict()
    changed = [k for k in reference if not torch.equal(reference[k], merged[k])]
    assert any("q_proj" in k for k in changed)  # the adapters change the merged attention weights
    assert torch.equal(reference["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
