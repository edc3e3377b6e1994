"""Advantages against hand-computed values."""

import math

import pytest
import torch

from meml.algo.advantages import group_advantages, group_index, group_keys
from meml.core.types import Episode

NAN = float("nan")


def adv(rewards, groups, std=False, pos=False):
    return group_advantages(torch.tensor(rewards), torch.tensor(groups), std, pos).tolist()


def test_group_mean_baseline_by_hand():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5; group 1: 1, 1, 1, 0 -> mean 0.75
    out = adv([1, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    assert out == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_all_zero_reward_group_gives_zero_advantage():
    assert adv([0, 0, 0, 0], [0, 0, 0, 0]) == [0, 0, 0, 0]
    assert adv([0, 0, 0, 0], [0, 0, 0, 0], std=True) == [0, 0, 0, 0]


def test_std_normalisation_uses_the_unbiased_group_std():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    out = adv([1, 0, 0, 1], [0, 0, 0, 0], std=True)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert out == pytest.approx([expected, -expected, -expected, expected], rel=1e-6)


def test_positive_only_clips_negative_advantages():
    out = adv([1, 0, 0, 0], [0, 0, 0, 0], pos=True)
    assert out == pytest.approx([0.75, 0, 0, 0])


def test_missing_rewards_take_no_part_and_get_zero():
    # the NaN reward is excluded from the mean (mean of 1, 0 = 0.5) and gets advantage 0
    out = adv([1, 0, NAN], [0, 0, 0])
    assert out == pytest.approx([0.5, -0.5, 0.0])


def test_singleton_group_has_zero_advantage_even_with_std():
    assert adv([1.0], [0], std=True) == [0.0]


def test_groups_need_not_be_contiguous():
    assert adv([1, 0, 0, 1], [0, 1, 0, 1]) == pytest.approx([0.5, -0.5, -0.5, 0.5])


def _ep(q, e, slot, num_experts=2):
    return Episode(q, e, slot * num_experts + e, slot, [1], [2], "", True)


def test_grouping_per_expert_or_pooled_per_question():
    eps = [_ep("a", 0, 0), _ep("a", 1, 0), _ep("b", 0, 1), _ep("a", 0, 0)]
    assert group_index(group_keys(eps, "expert")).tolist() == [0, 1, 2, 0]
    assert group_index(group_keys(eps, "question")).tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError):
        group_keys(eps, "nope")


def test_a_question_drawn_twice_in_a_step_is_two_groups_with_two_baselines():
    # question "a" in slots 0 and 2 (an epoch boundary): its draws are baselined apart
    eps = [_ep("a", 0, 0), _ep("a", 0, 0), _ep("b", 0, 1), _ep("a", 0, 2), _ep("a", 0, 2)]
    assert group_index(group_keys(eps, "expert")).tolist() == [0, 0, 1, 2, 2]
    assert group_index(group_keys(eps, "question")).tolist() == [0, 0, 1, 2, 2]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    a = group_advantages(rewards, group_index(group_keys(eps, "expert")), std_normalize=False, positive_only=False)
    # one baseline for both draws (0.25) would give +0.75, -0.25, ..., -0.25, -0.25
    assert a.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0])


def test_matches_a_slow_loop_oracle():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (60,), generator=g).float()
    groups = torch.randint(0, 7, (60,), generator=g)
    fast = group_advantages(rewards, groups, std_normalize=True, positive_only=False)
    for i in range(60):
        members = [rewards[j].item() for j in range(60) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        var = sum((m - mean) ** 2 for m in members) / max(1, len(members) - 1)
        expected = (rewards[i].item() - mean) / (math.sqrt(var) + 1e-4)
        assert fast[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pass_k_advantage_by_hand():
    from meml.algo.advantages import ADVANTAGE_ESTIMATORS, best_of_group_advantages

    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, float("nan"), 0.5, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    out = best_of_group_advantages(rewards, groups).tolist()
    # group 0: one right answer -> +1 for it; group 1: two right -> best minus second = 0;
    # group 2: all wrong -> 0; group 3: NaN left out, 0.5 - 0.2 for the best
    assert out == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0])
    same = ADVANTAGE_ESTIMATORS.get("pass_k")(rewards, groups, True, True)
    assert same.tolist() == pytest.approx(out)


def test_overlong_penalty_ramp_by_hand():
    from meml.algo.shaping import overlong_penalty

    assert [overlong_penalty(n, 128, 32) for n in (96, 97, 112, 128)] == pytest.approx([0.0, -1 / 32, -0.5, -1.0])
    assert overlong_penalty(128, 128, 0) == 0.0  # off
    assert overlong_penalty(120, 128, 32, scale=0.5) == pytest.approx(-0.5 * 24 / 32)
