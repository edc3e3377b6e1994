"""Per-token log-probs and entropies computed a chunk of positions at a time equal the ones
from full logits, values and gradients; and the loss variants and entropy terms by hand."""

from __future__ import annotations

import math

import pytest
import torch

from meml.algo import losses
from meml.algo.objective import LossSettings, TrainItem, high_entropy_tokens, micro_batch_loss
from meml.train.forward import collate, response_logits, split_head, token_stats


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch(shared: bool):
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10], [11, 12, 13]] if shared else [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    responses = [[20, 21, 22], [23, 24], [25, 26, 27, 28, 29], [30]][: len(prompts)]
    return collate(prompts, responses, 0, "cpu")


@pytest.mark.parametrize("shared", [False, True])  # the shared-prompt pass also goes through the split head
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_stats_equal_full_logits_values_and_gradients(model, shared, chunk):
    batch = _batch(shared)
    full = token_stats(model, batch, chunk_tokens=0, entropy=True)
    assert full.logits is not None  # the plain path
    ((full.logp * batch.mask).sum() + (full.entropy * batch.mask).sum()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part = token_stats(model, batch, chunk_tokens=chunk, entropy=True)
    assert part.logits is None and part.hidden is not None  # no (B, R, V) tensor was kept
    ((part.logp * batch.mask).sum() + (part.entropy * batch.mask).sum()).backward()
    torch.testing.assert_close(part.logp, full.logp * batch.mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.entropy, full.entropy * batch.mask, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_row_logits_of_the_split_head_equal_the_full_ones(model):
    batch = _batch(False)
    full = response_logits(model, batch)
    stats = token_stats(model, batch, chunk_tokens=2)
    torch.testing.assert_close(stats.row_logits([0, 2], 3), full[[0, 2], :3], rtol=1e-5, atol=1e-5)


def test_the_head_is_not_split_off_where_logits_are_post_processed(model):
    assert split_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 does after its head
    assert split_head(model) is None


def test_token_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # p = (1/2, 1/2) and (3/4, 1/4)
    h = losses.token_entropy(logits)[0]
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


# ----------------------------------------------------------------------------- GSPO, CISPO


def test_gspo_uses_one_ratio_per_sequence_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # mean log-ratio over the 2 tokens: (0.5 + 0.1) / 2 = 0.3; s = e^0.3 = 1.3499 > 1 + 0.2
    loss, clipped = losses.gspo_loss(logp, old, torch.tensor([2.0]), mask, 0.2, 0.2)
    assert loss[0, 0].item() == pytest.approx(-1.2 * 2.0)  # the clipped value wins for A > 0
    assert clipped[0, :2].tolist() == [1.0, 1.0]
    loss, clipped = losses.gspo_loss(logp, old, torch.tensor([2.0]), mask, 0.2, 0.5)
    assert loss[0, 0].item() == pytest.approx(-math.exp(0.3) * 2.0, rel=1e-6) and clipped[0, 0].item() == 0.0
    # gradient of s * A with respect to logp_t: A * s / |o| at the 2 response tokens
    loss[0, 0].backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.0 * math.exp(0.3) / 2] * 2 + [0.0], rel=1e-6)


def test_cispo_clips_the_weight_but_keeps_every_tokens_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0]])  # ratios e^0.5 = 1.65 (clipped to 1.28) and 1
    loss, clipped = losses.cispo_loss(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([1.28 * 1.0, 1.0 * 2.0])  # -w * A * logp
    assert clipped[0].tolist() == [1.0, 0.0]
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.28, -1.0])  # PPO's clip would give 0 at the first token


# ----------------------------------------------------------------------------- entropy in the objective


def test_high_entropy_tokens_keep_the_top_share_of_the_masked_tokens():
    e = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 7.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # 7 and 9 are padding
    keep = high_entropy_tokens(e, m, 0.5)
    # masked values 0.1 0.9 0.5 0.3 0.8 0.2: the median is 0.4, so 0.9 0.5 0.8 are kept
    assert keep.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_entropy_bonus_statistics_per_expert_and_top_entropy_tokens():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]], requires_grad=True)
    entropy = torch.tensor([[1.0, 3.0], [2.0, 0.5]], requires_grad=True)
    mask = torch.ones(2, 2)
    items = [
        TrainItem("pg", [1], [2, 3], weight=0.5, advantage=1.0, expert=0),
        TrainItem("pg", [1], [4, 5], weight=0.5, advantage=1.0, expert=1),
    ]
    plain, stats = micro_batch_loss(items, logp, mask, LossSettings(num_experts=2), entropy)
    assert plain.item() == pytest.approx(0.5 * (1 + 2) + 0.5 * (3 + 1))  # -A logp, weighted
    assert (stats["entropy_sum/0"], stats["entropy_tokens/0"], stats["entropy_sum/1"]) == (4.0, 2.0, 2.5)
    bonus, _ = micro_batch_loss(items, logp, mask, LossSettings(entropy_coef=0.1), entropy)
    assert bonus.item() == pytest.approx(plain.item() - 0.1 * 0.5 * (1 + 3 + 2 + 0.5))
    top, stats = micro_batch_loss(items, logp, mask, LossSettings(top_entropy_quantile=0.5), entropy)
    # entropies 1 3 2 0.5: the top half (3 and 2) keep their loss: 0.5 * 2 + 0.5 * 3
    assert top.item() == pytest.approx(0.5 * 2 + 0.5 * 3) and stats["entropy_kept_tokens"] == 2.0


def test_the_update_computes_log_probs_in_the_configured_chunks(model, monkeypatch):
    """train.logit_chunk_tokens reaches the forward pass of every micro-batch (it once stopped
    at the Learner: full logits were built whatever it said), and the optimizer keeps no
    gradients between updates."""
    from accelerate import Accelerator

    import meml.train.update as update
    from meml.train.update import Learner, optimizer_step

    seen = []
    real = update.token_stats

    def spy(model, batch, chunk_tokens, entropy=False):
        seen.append(chunk_tokens)
        return real(model, batch, chunk_tokens, entropy)

    monkeypatch.setattr(update, "token_stats", spy)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    counters = {"bad_streak": 0, "skipped_updates": 0}
    learner = Learner(model, optimizer, scheduler, accelerator, 0, 64, 1.0, counters, 3, chunk_tokens=5)
    items = [TrainItem("sft", [5, 6, 7], [20, 21, 22, 23], weight=1.0, coef=1.0) for _ in range(3)]
    stats = optimizer_step(learner, items, LossSettings())
    assert stats["skipped"] == 0.0 and seen and set(seen) == {5}
    assert all(p.grad is None for p in model.parameters())
