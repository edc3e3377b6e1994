"""Each loss term against hand-computed values."""

import math

import pytest
import torch

from meml.algo import losses
from meml.algo.objective import sequence_weights


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    out = losses.token_logprobs(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75))


def test_reinforce_loss_is_minus_advantage_times_logp():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    out = losses.reinforce_loss(logp, torch.tensor([2.0, -1.0]))
    assert out.flatten().tolist() == pytest.approx([2.0, 4.0, -0.5, -0.1])


def test_reinforce_gradient_raises_logp_of_positive_advantage():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    losses.reinforce_loss(logp, torch.tensor([1.0])).sum().backward()
    assert logp.grad.item() == -1.0  # descending the loss increases log p


def test_ppo_clip_by_hand():
    old = torch.zeros(1, 4)
    # ratios e^x: 1.5, 0.5, 1.1, 0.7 ; advantages +1, +1, -1, -1 ; eps 0.2
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    out_pos, clipped_pos = losses.ppo_clip_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    # A>0: -min(r, clip(r)) -> r=1.5 -> clip 1.2 -> -1.2 ; r=0.5 -> -0.5 ; r=1.1 -> -1.1 ; r=0.7 -> -0.7
    assert out_pos.tolist()[0] == pytest.approx([-1.2, -0.5, -1.1, -0.7])
    assert clipped_pos.tolist()[0] == [1.0, 0.0, 0.0, 0.0]
    out_neg, _ = losses.ppo_clip_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    # A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5, 0.8, 1.1, 0.8
    assert out_neg.tolist()[0] == pytest.approx([1.5, 0.8, 1.1, 0.8])


def test_ppo_clip_asymmetric_eps_high():
    logp = torch.log(torch.tensor([[1.5]]))
    out, _ = losses.ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert out.item() == pytest.approx(-1.28)


def test_ppo_clip_at_ratio_one_has_reinforce_gradient():
    logp = torch.tensor([[-0.7, -1.3]], requires_grad=True)
    loss, _ = losses.ppo_clip_loss(logp, logp.detach(), torch.tensor([0.5]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5])


def test_k3_kl_by_hand_and_zero_at_equality():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    out = losses.k3_kl(logp, ref)
    d = 1.0  # ref - logp at the second token
    assert out.tolist()[0] == pytest.approx([0.0, math.exp(d) - d - 1])


def test_distribution_kl_by_hand():
    t = torch.log(torch.tensor([[[0.5, 0.5]]]))
    s = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.distribution_kl(t, s).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("token_mean", [1 / 6, 1 / 6]),  # lengths 2 and 4: six tokens
        ("seq_mean", [1 / (2 * 2), 1 / (2 * 4)]),
        ("constant", [1 / (2 * 10), 1 / (2 * 10)]),  # max_new_tokens = 10
    ],
)
def test_sequence_weights(aggregation, expected):
    w = sequence_weights(torch.tensor([2, 4]), aggregation, max_new_tokens=10)
    assert w.tolist() == pytest.approx(expected)


def test_sequence_weights_with_global_counts():
    w = sequence_weights(torch.tensor([2]), "token_mean", 10, num_sequences=4, total_tokens=20)
    assert w.tolist() == pytest.approx([1 / 20])
    w = sequence_weights(torch.tensor([2]), "seq_mean", 10, num_sequences=4, total_tokens=20)
    assert w.tolist() == pytest.approx([1 / 8])


def test_weighted_sum_masks_padding():
    token_loss = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = losses.weighted_sum(token_loss, mask, torch.tensor([0.5, 2.0]))
    assert out.item() == pytest.approx(0.5 * 3 + 2.0 * 3)


def test_token_mean_aggregation_end_to_end_by_hand():
    # two sequences, advantages 1 and -1, lengths 2 and 1; token mean over 3 tokens
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_token = losses.reinforce_loss(logp, torch.tensor([1.0, -1.0]))
    w = sequence_weights(torch.tensor([2, 1]), "token_mean", 2).float()
    total = losses.weighted_sum(per_token, mask, w)
    assert total.item() == pytest.approx((1 + 2 - 3) / 3)


def test_truncated_is_weights_by_hand():
    policy = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    w = losses.truncated_is_weights(policy, sampler, cap=2.0)
    assert w.flatten().tolist() == pytest.approx([2.0, 0.5, 2.0])  # ratios 2, 0.5, 3 -> capped at 2


def test_truncated_is_weights_carry_no_gradient():
    policy = torch.tensor([[-1.0]], requires_grad=True)
    w = losses.truncated_is_weights(policy, torch.tensor([[-1.5]]), cap=5.0)
    assert not w.requires_grad and w.item() == pytest.approx(math.exp(0.5))
