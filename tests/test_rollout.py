"""Rollout behaviour pinned on the tiny model: determinism, seeds, lengths, counts."""

import pytest
import torch

from meml.engines.base import SamplingParams, split_completion
from meml.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return HFEngine(model, tiny_tokenizer, torch.bfloat16, sequences_per_generate=8)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["Sam has 3 apples.", "Maya has 12 coins. She gets 5 more.", "How many?"]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


def _ids(groups):
    return [[g.token_ids for g in group] for group in groups]


def test_n_samples_come_back_for_n(engine, prompts):
    out = engine.generate(prompts, SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=5, seed=1))
    assert len(out) == len(prompts) and all(len(group) == 3 for group in out)


def test_temperature_zero_is_deterministic_and_batch_independent(engine, prompts):
    params = SamplingParams(num_samples=2, temperature=0.0, max_new_tokens=8, seed=0)
    a = _ids(engine.generate(prompts, params))
    b = _ids(engine.generate(prompts, SamplingParams(num_samples=2, temperature=0.0, max_new_tokens=8, seed=99)))
    assert a == b
    assert all(group[0] == group[1] for group in a)  # greedy samples of one prompt agree
    alone = _ids(engine.generate(prompts[1:2], params))
    assert alone[0] == a[1]  # left padding does not change greedy output


def test_same_seed_same_samples_other_seed_other_samples(engine, prompts):
    p = SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=10, seed=7)
    first, second = _ids(engine.generate(prompts, p)), _ids(engine.generate(prompts, p))
    other = _ids(engine.generate(prompts, SamplingParams(num_samples=4, temperature=1.0, max_new_tokens=10, seed=8)))
    assert first == second
    assert first != other


def test_sampling_does_not_touch_the_global_rng(engine, prompts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(prompts, SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=4, seed=5))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("max_new", [1, 3, 17])
def test_max_new_tokens_is_respected(engine, prompts, max_new):
    out = engine.generate(prompts, SamplingParams(num_samples=2, temperature=1.0, max_new_tokens=max_new, seed=3))
    for group in out:
        for g in group:
            assert 1 <= len(g.token_ids) <= max_new
            assert g.finished == (g.token_ids[-1] in engine.stop_ids)


def test_split_completion_cuts_after_the_first_stop():
    assert split_completion([5, 6, 2, 2, 2], [2]) == ([5, 6, 2], True)
    assert split_completion([5, 6, 7], [2]) == ([5, 6, 7], False)


def test_sync_weights_makes_the_copy_follow_the_policy(tiny_model_dir, tiny_tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eng = HFEngine(policy, tiny_tokenizer, torch.bfloat16, sequences_per_generate=8)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    eng.sync_weights(policy)
    for (name, a), (_, b) in zip(eng.model.named_parameters(), policy.named_parameters()):
        assert torch.equal(a, b.to(a.dtype)), name


def test_a_prompts_samples_do_not_depend_on_its_batch(tiny_model_dir, tiny_tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eng = HFEngine(model, tiny_tokenizer, torch.float32, sequences_per_generate=64)
    params = SamplingParams(num_samples=3, temperature=1.0, max_new_tokens=12)
    together = _ids(eng.generate(prompts, params, seeds=[11, 22, 33]))
    alone = _ids(eng.generate(prompts[2:], params, seeds=[33]))
    assert together[2] == alone[0]


def test_row_seeded_sampler_matches_the_distribution_and_top_p():
    from meml.engines.hf import RowSeededSampler

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().repeat(4000, 1)
    picked = RowSeededSampler(list(range(4000)), 1.0, 1.0, "cpu")(None, scores).argmax(-1)
    freq = torch.bincount(picked, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    # top_p = 0.7 keeps {0.5, 0.3}: renormalised 0.625 / 0.375, never the tail
    picked = RowSeededSampler(list(range(4000)), 1.0, 0.7, "cpu")(None, scores).argmax(-1)
    freq = torch.bincount(picked, minlength=4).float() / 4000
    assert freq[2] == 0 and freq[3] == 0 and abs(freq[0] - 0.625) < 0.03
    # temperature sharpens: at 0.5 the probabilities go as p^2
    picked = RowSeededSampler(list(range(4000)), 0.5, 1.0, "cpu")(None, scores).argmax(-1)
    sharp = probs**2 / (probs**2).sum()
    assert torch.allclose(torch.bincount(picked, minlength=4).float() / 4000, sharp, atol=0.03)
