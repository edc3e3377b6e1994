"""The statistics of `meml compare` against hand-worked examples and slow oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from meml.eval.metrics import (
    bootstrap_weights,
    choose_by_validation,
    mean_and_sd,
    paired_difference,
)


def test_identical_arms_differ_by_nothing():
    a = [[1, 0, 1, 1], [0, 0, 1, 0]]
    r = paired_difference(a, a, resamples=300)
    assert (r.estimate, r.low, r.high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert r.per_seed == [0.0, 0.0] and (r.seeds, r.questions) == (2, 4)


def test_a_constant_difference_has_a_degenerate_interval_and_the_smallest_p():
    # every cell differs by +1: every resample's mean is 1, none is as far from 1 as 1 is from 0
    a, b = np.ones((3, 5)), np.zeros((3, 5))
    r = paired_difference(a, b, resamples=999)
    assert (r.estimate, r.low, r.high) == (1.0, 1.0, 1.0)
    assert r.p_value == pytest.approx(1 / 1000)


def test_two_questions_one_seed_resample_distribution_by_hand():
    # d = [1, 0]: a resample of 2 questions has mean 0 (both q2), 1/2 or 1 (both q1), with
    # probabilities 1/4, 1/2, 1/4. One seed, so the seed draw is always that seed.
    r = paired_difference([[1, 0]], [[0, 0]], resamples=20000, seed=3)
    assert r.estimate == 0.5
    assert (r.low, r.high) == (0.0, 1.0)
    # |m - 0.5| >= 0.5 holds for m in {0, 1}: p = (1 + ~B/2) / (1 + B)
    assert r.p_value == pytest.approx(0.5, abs=0.02)


def test_vectorised_bootstrap_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(3, 7)).astype(float)
    b = rng.integers(0, 2, size=(3, 7)).astype(float)
    r = paired_difference(a, b, resamples=400, seed=11)
    # oracle: the same generator, the same draws, an explicit double loop over the cells
    draws = np.random.default_rng(11)
    w = bootstrap_weights(draws, 3, 400)
    v = bootstrap_weights(draws, 7, 400)
    means = []
    for k in range(400):
        total = 0.0
        for s, q in itertools.product(range(3), range(7)):
            total += w[k, s] * v[k, q] * (a[s, q] - b[s, q])
        means.append(total / 21)
    low, high = np.percentile(means, [2.5, 97.5])
    assert (r.low, r.high) == (pytest.approx(low), pytest.approx(high))
    far = sum(abs(m - r.estimate) >= abs(r.estimate) - 1e-12 for m in means)
    assert r.p_value == pytest.approx((1 + far) / 401)


def test_bootstrap_weights_count_draws():
    w = bootstrap_weights(np.random.default_rng(1), 5, 50)
    assert w.shape == (50, 5) and (w.sum(1) == 5).all() and (w >= 0).all()


def test_the_interval_widens_with_run_to_run_spread():
    # the same mean difference (+0.25 over 40 questions), but in the second study the seeds
    # disagree (+0.5, +0.25, 0): the two-way bootstrap must carry that spread
    def row(k: int) -> list[int]:
        return [1] * k + [0] * (40 - k)

    zeros = [row(0)] * 3
    steady = paired_difference([row(10)] * 3, zeros, resamples=4000)
    spread = paired_difference([row(20), row(10), row(0)], zeros, resamples=4000)
    assert steady.estimate == spread.estimate == 0.25
    assert steady.per_seed == [0.25, 0.25, 0.25] and spread.per_seed == [0.5, 0.25, 0.0]
    assert steady.low > 0.05  # 10 of 40 questions on every seed: clearly above 0
    assert spread.low <= 0.0 < spread.high  # one seed gained nothing: 0 is not excluded
    assert spread.high - spread.low > 1.5 * (steady.high - steady.low)


def test_paired_difference_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_mean_and_sd_by_hand():
    assert mean_and_sd([0.2]) == (0.2, 0.0)
    m, sd = mean_and_sd([0.1, 0.3])
    assert m == pytest.approx(0.2) and sd == pytest.approx(0.1414213562)


def test_choice_on_validation_takes_the_best_mean_and_the_first_on_a_tie():
    assert choose_by_validation({2e-6: [0.30], 1e-5: [0.35]}) == 1e-5
    assert choose_by_validation({"tutor": [0.5], "algebraist": [0.5], "checker": [0.4]}) == "tutor"
    assert choose_by_validation({"a": [0.2, 0.6], "b": [0.5, 0.2]}) == "a"  # 0.4 vs 0.35
    with pytest.raises(ValueError):
        choose_by_validation({})
