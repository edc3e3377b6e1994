"""The batched forward/backward: micro-batching gives the whole batch's gradient."""

import pytest
import torch
from accelerate import Accelerator

from meml.algo import losses
from meml.algo.objective import LossSettings, TrainItem
from meml.train.forward import _cache_argument, collate, micro_batches, response_logits
from meml.train.update import accumulate_gradients


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _items():
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(7):
        p = torch.randint(3, 200, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        kind = ["pg", "iml", "sft"][i % 3]
        items.append(
            TrainItem(kind, p, r, weight=1.0 / (i + 2), coef=0.5 if kind != "pg" else 1.0, advantage=(i - 3) / 3)
        )
    return items


def _grads(model, items, budget, settings=None):
    model.zero_grad(set_to_none=True)
    acc = Accelerator(cpu=True)
    stats = accumulate_gradients(model, items, settings or LossSettings(), budget, 2, acc)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def test_micro_batches_respect_the_budget_and_cover_every_item():
    items = _items()
    groups = micro_batches(items, token_budget=24)
    assert sorted(i for g in groups for i in g) == list(range(len(items)))
    for g in groups:
        if len(g) > 1:
            width = max(len(items[i].prompt_ids) for i in g) + max(len(items[i].response_ids) for i in g)
            assert len(g) * width <= 24


def test_split_batch_gradient_equals_whole_batch_gradient(model):
    items = _items()
    whole, stats_whole = _grads(model, items, budget=10_000)
    split, stats_split = _grads(model, items, budget=16)
    assert stats_split["loss"] == pytest.approx(stats_whole["loss"], rel=1e-5)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def test_loss_matches_a_per_sequence_oracle(model):
    """Sum over items of weight * coef * (per-token loss), one unpadded sequence at a time."""
    items = _items()
    _, stats = _grads(model, items, budget=10_000)
    expected = 0.0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it.prompt_ids + it.response_ids])
            logits = model(ids).logits[0, len(it.prompt_ids) - 1 : -1]  # predicts each response token
            logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(it.response_ids)[:, None]).squeeze(-1)
            per_token = -it.advantage * logp if it.kind == "pg" else -logp
            expected += it.weight * it.coef * per_token.sum().item()
    assert stats["loss"] == pytest.approx(expected, rel=1e-4)


def test_left_padded_collate_puts_every_response_at_the_same_columns(model):
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=2, device="cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 2, 2], [2, 2, 8, 10, 11, 12]]
    assert batch.mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch.position_ids.tolist()[1][2:] == [0, 1, 2, 3]
    logits = response_logits(model, batch)
    assert logits.shape[:2] == (2, 3)


def test_padding_does_not_change_logprobs(model):
    alone = collate([[5, 6, 7]], [[9, 10]], pad_id=2, device="cpu")
    padded = collate([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7]], [[9, 10], [11, 12, 13, 14]], pad_id=2, device="cpu")
    with torch.no_grad():
        a = losses.token_logprobs(response_logits(model, alone), alone.targets)[0, :2]
        b = losses.token_logprobs(response_logits(model, padded), padded.targets)[0, :2]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ppo_clip_single_update_has_reinforce_gradient(model):
    items = [it for it in _items() if it.kind == "pg"]
    g_reinforce, _ = _grads(model, items, 10_000, LossSettings("reinforce"))
    g_ppo, _ = _grads(model, items, 10_000, LossSettings("ppo_clip"))
    for name in g_reinforce:
        torch.testing.assert_close(g_ppo[name], g_reinforce[name], rtol=1e-4, atol=1e-6)


def test_tis_correction_weights_each_pg_token(model):
    """With sampler log-probs, the PG gradient is the REINFORCE gradient with per-token weights
    min(pi/q, cap); rows without sampler log-probs keep weight 1."""
    items = [it for it in _items() if it.kind == "pg"][:2]
    with torch.no_grad():
        batch = collate([it.prompt_ids for it in items], [it.response_ids for it in items], 2, "cpu")
        logp = losses.token_logprobs(response_logits(model, batch), batch.targets)
    first = items[0]
    n = len(first.response_ids)
    shift = torch.tensor([0.5, -0.5, 2.0, 0.0, 0.1][:n])
    first.sample_logprobs = logp[0, :n] - shift  # pi/q = e^shift -> weights e^0.5, e^-0.5, cap 2, ...
    _, stats = _grads(model, items, 10_000, LossSettings("reinforce", tis_cap=2.0))
    expected_w = torch.exp(shift).clamp(max=2.0)
    assert stats["is_tokens"] == n
    assert stats["is_weight_sum"] == pytest.approx(float(expected_w.sum()), rel=1e-5)
    manual = 0.0
    for row, it in enumerate(items):
        k = len(it.response_ids)
        w = expected_w if row == 0 else torch.ones(k)
        manual += float((-it.advantage * logp[row, :k] * w).sum() * it.weight)
    assert stats["pg_loss"] == pytest.approx(manual, rel=1e-4)


def _grouped_items():
    """Two prompts of different lengths, each with several answers of different lengths."""
    g = torch.Generator().manual_seed(1)
    items = []
    for q, plen in enumerate((6, 3)):
        p = torch.randint(3, 200, (plen,), generator=g).tolist()
        for k in range(3):
            r = torch.randint(3, 200, (2 + k + q,), generator=g).tolist()
            items.append(TrainItem("pg", p, r, weight=0.25, coef=1.0, advantage=(k - 1) * (q + 1) / 2))
    return items


def test_shared_prompt_pass_gives_the_full_rows_logits_and_gradients(model):
    assert _cache_argument(model)  # the shared-prompt pass applies to this model
    items = _grouped_items()
    batch = collate([it.prompt_ids for it in items], [it.response_ids for it in items], pad_id=2, device="cpu")
    assert batch.distinct_rows.tolist() == [0, 3] and batch.prompt_rows.tolist() == [0, 0, 0, 1, 1, 1]

    def grads_of(b):
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, b)
        logp = losses.token_logprobs(logits, b.targets)
        (logp * b.mask * torch.arange(1, len(items) + 1)[:, None]).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full = collate([it.prompt_ids for it in items], [it.response_ids for it in items], pad_id=2, device="cpu")
    full.distinct_rows = None  # forces one forward over every full row
    shared_logits, shared = grads_of(batch)
    full_logits, whole = grads_of(full)
    mask = batch.mask.bool()
    torch.testing.assert_close(shared_logits[mask], full_logits[mask], rtol=1e-4, atol=1e-5)
    for name in whole:
        torch.testing.assert_close(shared[name], whole[name], rtol=1e-4, atol=1e-6)


def test_micro_batches_keep_a_prompts_rows_together():
    items = _grouped_items()
    for group in micro_batches(items, token_budget=40):
        prompts = [tuple(items[i].prompt_ids) for i in group]
        assert prompts == sorted(prompts, key=prompts.index)  # each prompt's rows adjacent


def test_a_finished_stage_releases_its_optimizer_state():
    """Stage 1's AdamW moments do not live on through stage 2 (accelerate keeps a reference
    to every optimizer it prepared)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from meml.train.loop import release_learner

    model = torch.nn.Linear(4, 4)
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    assert len(optimizer.state) == 2 and optimizer in accelerator._optimizers
    release_learner(SimpleNamespace(accelerator=accelerator), SimpleNamespace(optimizer=optimizer))
    assert len(optimizer.state) == 0 and optimizer not in accelerator._optimizers
    assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_runs_and_gives_the_same_gradients(tiny_model_dir):
    """`model.gradient_checkpointing` checkpoints every layer in the update (transformers skips
    it for a model left in eval mode, as from_pretrained returns it), with the same gradients;
    the policy trains without dropout, so scoring passes and the update agree."""
    from meml.core.config import ModelConfig
    from meml.engines.model import load_policy

    plain = load_policy(ModelConfig(name_or_path=str(tiny_model_dir)), str(tiny_model_dir))
    ckpt = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), gradient_checkpointing=True), str(tiny_model_dir))
    assert plain.training and ckpt.training
    layers = ckpt.model.layers
    calls = []
    for layer in layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: (calls.append(1), _f(*a, **k))[1]
    items = _items()
    want, _ = _grads(plain, items, budget=10_000)
    got, _ = _grads(ckpt, items, budget=10_000)
    assert len(calls) == len(layers)  # one forward pass, every layer checkpointed
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert all(m.p == 0.0 for m in ckpt.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.attention_dropout == 0.0 for m in ckpt.modules() if hasattr(m, "attention_dropout"))
