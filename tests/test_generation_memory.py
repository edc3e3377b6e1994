"""The transformers engine's memory-bounding parts: the rollout copy built in its dtype, and
generate calls planned by a token budget, with outputs that do not depend on the plan."""

import copy

import pytest
import torch

from meml.engines.base import SamplingParams
from meml.engines.hf import HFEngine, copy_in_dtype, plan_calls


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["Sam has 3 apples.", "Maya has 12 coins. She gets 5 more.", "How many?", "Add 4 and 9, then double it."]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


def _ids(groups):
    return [[g.token_ids for g in group] for group in groups]


def test_copy_in_dtype_equals_deepcopy_then_cast(policy):
    old = copy.deepcopy(policy).to(torch.bfloat16)
    new = copy_in_dtype(policy, torch.bfloat16)
    a, b = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert [n for n, _ in old.named_buffers()] == [n for n, _ in new.named_buffers()]
    for (name, x), (_, y) in zip(old.named_buffers(), new.named_buffers()):  # rotary tables too
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert not any(p.requires_grad for p in new.parameters())
    assert new.get_output_embeddings().weight is new.get_input_embeddings().weight  # tied stays tied
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())  # the policy untouched


def test_plan_calls_without_a_budget_is_the_row_count_alone():
    widths = [5, 9, 3, 7, 7, 2, 8]
    for per_call in (1, 2, 3, 7, 10):
        expected = [slice(s, min(s + per_call, len(widths))) for s in range(0, len(widths), per_call)]
        assert plan_calls(widths, 4, per_call, 16, 0) == expected


@pytest.mark.parametrize("budget", [1, 40, 100, 250, 10_000])
def test_plan_calls_keeps_each_call_within_the_budget(budget):
    widths = [5, 9, 3, 7, 7, 2, 8, 30]
    rows, new = 2, 10
    calls = plan_calls(widths, rows, 5, new, budget)
    assert [i for c in calls for i in range(c.start, c.stop)] == list(range(len(widths)))  # in order, each once
    for c in calls:
        n = c.stop - c.start
        assert 1 <= n <= 5
        assert n == 1 or n * rows * (max(widths[c]) + new) <= budget


def test_a_token_budget_changes_the_calls_not_the_outputs(policy, tiny_tokenizer, prompts):
    whole = HFEngine(policy, tiny_tokenizer, torch.float32, sequences_per_generate=64)
    split = HFEngine(policy, tiny_tokenizer, torch.float32, sequences_per_generate=64, tokens_per_generate=40)
    calls = []
    generate = split._generate_chunk
    split._generate_chunk = lambda chunk, *a: calls.append(len(chunk)) or generate(chunk, *a)
    greedy = SamplingParams(num_samples=1, temperature=0.0, max_new_tokens=12)
    sampled = SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=12)
    seeds = [11, 22, 33, 44]
    assert _ids(split.generate(prompts, greedy)) == _ids(whole.generate(prompts, greedy))
    assert _ids(split.generate(prompts, sampled, seeds)) == _ids(whole.generate(prompts, sampled, seeds))
    assert len(calls) > 2  # the budget did split the batch


def test_the_bf16_engine_generates_as_before(policy, tiny_tokenizer, prompts):
    """The engine's copy is built differently now; what it generates is not."""
    engine = HFEngine(policy, tiny_tokenizer, torch.bfloat16, sequences_per_generate=8)
    reference = HFEngine(policy, tiny_tokenizer, torch.float32, sequences_per_generate=8, share_weights=False)
    reference.model = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)  # the old construction
    for params in (SamplingParams(1, 0.0, 1.0, 10), SamplingParams(2, 1.0, 1.0, 10)):
        assert _ids(engine.generate(prompts, params, [1, 2, 3, 4])) == _ids(
            reference.generate(prompts, params, [1, 2, 3, 4])
        )


def test_the_token_budget_is_a_setting(policy, tiny_tokenizer):
    from meml.core.errors import ConfigError
    from meml.core.load import load_config
    from meml.engines.factory import make_engine

    assert load_config(None, []).rollout.tokens_per_generate == 0  # off by default: the default batches stay
    assert load_config(None, ["rollout.tokens_per_generate=8192"]).rollout.tokens_per_generate == 8192
    with pytest.raises(ConfigError, match="rollout.tokens_per_generate"):
        load_config(None, ["rollout.tokens_per_generate=-1"])
    engine = make_engine("hf", policy, tiny_tokenizer, torch.bfloat16, 48, tokens_per_generate=8192)
    assert engine.tokens_per_generate == 8192
