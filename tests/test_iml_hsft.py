"""IML selection (E+, E-, O+) with ties, and the HSFT trigger, push and flush."""

import random

import pytest

from meml.algo.hsft import HardExample, HardExampleBuffer, push_probability, should_push
from meml.algo.iml import expert_means, is_correct, select_pair
from meml.core.types import Episode


def ep(expert, reward, length=3, q="q1"):
    return Episode(
        q,
        expert,
        expert,
        0,
        [1],
        list(range(length)),
        "",
        True,
        reward=reward,
        reward_breakdown={"correct": float(reward == 1.0)} if reward is not None else {},
    )


def test_expert_means_skip_missing_rewards():
    eps = [ep(0, 1.0), ep(0, 0.0), ep(1, None), ep(2, 0.0)]
    assert expert_means(eps, 3) == [0.5, None, 0.0]


def test_strong_teaches_weak_with_its_shortest_correct_answer():
    eps = [ep(0, 0.0), ep(0, 0.0), ep(1, 1.0, length=9), ep(1, 1.0, length=4), ep(1, 0.0), ep(2, 1.0), ep(2, 0.0)]
    pair = select_pair(eps, 3)
    assert (pair.strong, pair.weak) == (1, 0)  # means 0, 2/3, 1/2
    assert len(pair.answer.completion_ids) == 4
    assert select_pair(eps, 3, "first").answer is eps[2]


def test_ties_go_to_the_earlier_expert():
    # means: e0 = 1, e1 = 0, e2 = 1, e3 = 0 -> E+ = 0, E- = 1
    eps = [ep(0, 1.0), ep(1, 0.0), ep(2, 1.0), ep(3, 0.0)]
    pair = select_pair(eps, 4)
    assert (pair.strong, pair.weak) == (0, 1)


def test_shortest_answer_ties_keep_the_first():
    eps = [ep(0, 1.0, length=5), ep(0, 1.0, length=5), ep(1, 0.0)]
    assert select_pair(eps, 2).answer is eps[0]


def test_no_pair_when_all_experts_are_equal():
    assert select_pair([ep(0, 0.0), ep(1, 0.0), ep(2, 0.0)], 3) is None
    assert select_pair([ep(0, 1.0), ep(1, 1.0)], 2) is None


def test_no_pair_when_the_strong_expert_has_no_correct_answer():
    # rewards from a format term only: E+ is better on average but nothing is correct
    eps = [ep(0, 0.5), ep(1, 0.0)]
    for e in eps:
        e.reward_breakdown = {"correct": 0.0}
    assert select_pair(eps, 2) is None


def test_no_pair_with_fewer_than_two_scored_experts():
    assert select_pair([ep(0, 1.0), ep(1, None)], 2) is None


def test_is_correct_falls_back_to_reward_without_a_verifier():
    e = Episode("q", 0, 0, 0, [1], [2], "", True, reward=1.0)
    assert is_correct(e)
    e.reward = 0.3
    assert not is_correct(e)


def test_trigger_needs_more_than_k_wrong():
    rng = random.Random(0)
    assert not should_push(6, 8, 6, 1.0, rng)  # exactly K wrong: no trigger
    assert should_push(7, 8, 6, 1.0, rng)
    assert not should_push(8, 8, 6, 0.0, rng)


def test_push_probability_defaults_to_k_over_g():
    assert push_probability(6, 8, None) == 0.75
    assert push_probability(6, 8, 0.3) == 0.3


def test_push_with_a_seeded_rng_by_hand():
    # random.Random(3) draws 0.2380, 0.5442, 0.3699, 0.6039, 0.6254 ; p = 6/8 = 0.75 -> all pushed
    # with p = 0.5: pushed, not, pushed, not, not
    rng = random.Random(3)
    draws = [random.Random(3).random() for _ in range(1)]
    assert draws[0] == pytest.approx(0.23796462709189137)
    assert [should_push(8, 8, 6, 0.5, rng) for _ in range(5)] == [True, False, True, False, False]


def test_buffer_flushes_when_full_and_round_trips_its_state():
    buf = HardExampleBuffer(capacity=2)
    buf.push(HardExample("q1", 0, [1, 2], [3]))
    assert not buf.ready()
    buf.push(HardExample("q2", 1, [1], [4, 5]))
    assert buf.ready()
    state = buf.state_dict()
    items = buf.flush()
    assert [i.question_id for i in items] == ["q1", "q2"] and len(buf) == 0 and buf.flushes == 1
    other = HardExampleBuffer(capacity=9)
    other.load_state_dict(state)
    assert other.capacity == 2 and [i.response_ids for i in other.items] == [[3], [4, 5]]
