"""Evaluation maths against hand-computed values and slow enumerating oracles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from meml.eval.metrics import (
    compute_matched_coverage,
    coverage,
    majority_vote,
    mixture_pass,
    paired_bootstrap,
    pass_at_k,
    prob_all_wrong,
    zero_signal,
)

# ----------------------------------------------------------------------------- oracles


def oracle_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n answers (the first c correct); count those with a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def oracle_mixture(ns: list[int], cs: list[int], k: int) -> float:
    """Enumerate one k-subset per expert jointly (the cartesian product of their subsets)."""
    per_expert = [list(itertools.combinations(range(n), k)) for n in ns]
    hits = total = 0
    for choice in itertools.product(*per_expert):
        total += 1
        hits += any(any(i < c for i in s) for s, c in zip(choice, cs))
    return hits / total


# ----------------------------------------------------------------------------- majority vote


def test_majority_vote_hand_examples():
    assert majority_vote(["7", "7", "3"]) == "7"
    assert majority_vote(["3", "7", "7", "3"]) == "3"  # tie: the first seen wins
    assert majority_vote([None, "5", None]) == "5"  # missing answers do not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


# ----------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_examples():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert float(pass_at_k(4, 1, 2)) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert float(pass_at_k(5, 2, 2)) == pytest.approx(0.7)
    # k=1 is the plain accuracy c/n
    assert float(pass_at_k(8, 3, 1)) == pytest.approx(3 / 8)
    assert float(pass_at_k(6, 0, 3)) == 0.0
    assert float(pass_at_k(6, 4, 3)) == 1.0  # only 2 wrong answers: any 3 hold a correct one
    assert float(pass_at_k(6, 6, 6)) == 1.0


def test_pass_at_k_matches_enumeration_and_binomials():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert float(pass_at_k(n, c, k)) == pytest.approx(exact, abs=1e-12)
                assert float(pass_at_k(n, c, k)) == pytest.approx(oracle_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised_and_stable_for_large_n():
    n = np.array([[4, 5], [8, 8]])
    c = np.array([[1, 2], [0, 8]])
    np.testing.assert_allclose(pass_at_k(n, c, 2), [[0.5, 0.7], [0.0, 1.0]])
    big = float(pass_at_k(2000, 3, 500))  # C(2000, 500) overflows floats; the product does not
    assert big == pytest.approx(1 - math.comb(1997, 500) / math.comb(2000, 500), rel=1e-9)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k larger than the samples


# ----------------------------------------------------------------------------- coverage


def test_coverage_hand_example():
    assert coverage([[True, False, False], [False, False, False], [False, True, True], [True, True, True]]) == 0.75
    assert coverage([]) == 0.0


def test_mixture_hand_example_and_oracle():
    # experts with (n, c) = (4, 1) and (4, 2), k = 2: 1 - (3/6) * (1/6)
    assert float(mixture_pass([4, 4], [1, 2], 2)) == pytest.approx(1 - 0.5 / 6)
    for ns, cs in [([3, 3], [0, 1]), ([4, 3, 2], [1, 0, 1]), ([4, 4], [2, 2])]:
        for k in range(1, min(ns) + 1):
            assert float(mixture_pass(ns, cs, k)) == pytest.approx(oracle_mixture(ns, cs, k), abs=1e-12)


def test_zero_signal_of_a_training_group():
    # n=4 answers with c=1 correct, groups of 2: all wrong C(3,2)/C(4,2) = 1/2, all right 0
    all_wrong, all_equal = zero_signal([4], [1], 2)
    assert all_wrong.tolist() == pytest.approx([0.5]) and all_equal.tolist() == pytest.approx([0.5])
    # c=2: all wrong 1/6, all right 1/6
    all_wrong, all_equal = zero_signal([4], [2], 2)
    assert all_wrong.tolist() == pytest.approx([1 / 6]) and all_equal.tolist() == pytest.approx([2 / 6])


# ----------------------------------------------------------------------------- compute-matched


def test_compute_matched_hand_example():
    # 2 questions, 2 experts, n=4 samples each, k=2: the mixture draws 2 per expert, each
    # single expert draws 4 (all of its samples).
    n = [[4, 4], [4, 4]]
    c = [[1, 0], [0, 1]]  # each expert solves one question, once
    result = compute_matched_coverage(n, c, ["a", "b"], k=2, resamples=200)
    # question 1: mixture 1 - (3/6)(1) = 0.5; single a with 4 draws = 1, single b = 0
    assert result.mixture == pytest.approx(0.5)
    assert result.single == pytest.approx({"a": 0.5, "b": 0.5})
    assert result.best == "a"  # tie: the first expert
    assert result.gain == pytest.approx(0.0)
    assert result.k == 2 and result.questions == 2
    summary = result.as_summary()
    assert summary["coverage/budget"] == 4 and summary["coverage/best"] == pytest.approx(0.5)


def test_compute_matched_when_experts_are_complementary():
    # Expert a is strong on question 1 only, b on question 2 only; 8 samples each, k=4.
    n = [[8, 8], [8, 8]]
    c = [[4, 0], [0, 4]]
    r = compute_matched_coverage(n, c, ["a", "b"], k=4, resamples=500)
    mix_q = 1 - math.comb(4, 4) / math.comb(8, 4)  # one expert has 4 wrong of 8, draws 4
    assert r.mixture == pytest.approx(mix_q)
    assert r.single == pytest.approx({"a": 0.5, "b": 0.5})  # 8 draws of 8: certain on its question
    assert r.gain == pytest.approx(mix_q - 0.5)
    assert r.gain_low <= r.gain <= r.gain_high


def test_compute_matched_oracle():
    rng = np.random.default_rng(1)
    n = np.full((5, 2), 4)
    c = rng.integers(0, 5, size=(5, 2))
    r = compute_matched_coverage(n, c, ["a", "b"], k=2, resamples=10)
    mixture = np.mean([oracle_mixture(list(n[q]), list(c[q]), 2) for q in range(5)])
    singles = [np.mean([oracle_pass_at_k(4, int(c[q, e]), 4) for q in range(5)]) for e in range(2)]
    assert r.mixture == pytest.approx(mixture)
    assert list(r.single.values()) == pytest.approx(singles)
    assert r.gain == pytest.approx(mixture - max(singles))


def test_compute_matched_needs_enough_samples():
    with pytest.raises(ValueError, match="needs >= 4 samples"):
        compute_matched_coverage([[3, 4]], [[1, 1]], ["a", "b"], k=2)


# ----------------------------------------------------------------------------- bootstrap


def test_paired_bootstrap_hand_example():
    # per-question gains [1, 0]: resampled means are 0, 1/2, 1 with probability 1/4, 1/2, 1/4,
    # so the 95% interval is [0, 1] and the 40% interval is [1/2, 1/2].
    point, low, high = paired_bootstrap([1.0, 0.0], [[0.0], [0.0]], resamples=4000, seed=0)
    assert (point, low, high) == (0.5, 0.0, 1.0)
    _, low, high = paired_bootstrap([1.0, 0.0], [[0.0], [0.0]], resamples=4000, seed=0, confidence=0.4)
    assert (low, high) == (0.5, 0.5)


def test_paired_bootstrap_is_paired_and_seeded():
    mixture = np.linspace(0, 1, 30)
    # a constant per-question difference: pairing removes all of the spread between questions
    point, low, high = paired_bootstrap(mixture, (mixture - 0.1)[:, None], resamples=300, seed=3)
    assert point == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    assert paired_bootstrap(mixture, mixture[::-1, None], seed=5) == paired_bootstrap(
        mixture, mixture[::-1, None], seed=5
    )


def test_paired_bootstrap_reselects_the_best_expert_per_resample():
    """Oracle: the same resamples, looped, picking the best expert inside each one."""
    rng = np.random.default_rng(0)
    mixture = rng.random(12)
    singles = rng.random((12, 3))
    point, low, high = paired_bootstrap(mixture, singles, resamples=200, seed=7)
    idx = np.random.default_rng(7).integers(0, 12, size=(200, 12))
    gains = []
    for rows in idx:
        best = max(float(np.mean([singles[q, e] for q in rows])) for e in range(3))
        gains.append(float(np.mean([mixture[q] for q in rows])) - best)
    assert point == pytest.approx(mixture.mean() - singles.mean(0).max())
    assert (low, high) == pytest.approx(tuple(np.percentile(gains, [2.5, 97.5])))


def test_prob_all_wrong_shapes():
    assert prob_all_wrong(np.zeros((0, 3), dtype=int), np.zeros((0, 3), dtype=int), 2).shape == (0, 3)


def test_split_pass_by_hand_and_against_the_equal_split():
    from meml.eval.metrics import mixture_pass, split_pass

    n, c = np.array([[4, 4, 4]]), np.array([[1, 0, 2]])
    # 2 from expert 0 (none right: C(3,2)/C(4,2) = 1/2), 0 from expert 1, 1 from expert 2 (2/4 wrong)
    assert split_pass(n, c, [2, 0, 1])[0] == pytest.approx(1 - 0.5 * 1.0 * 0.5)
    assert split_pass(n, c, [2, 2, 2]) == pytest.approx(mixture_pass(n, c, 2))


def test_budget_coverage_compares_with_the_better_of_uniform_and_the_best_single_expert():
    from meml.eval.metrics import budget_coverage

    # expert a is right on question 1 only, expert b on question 2 only (12 samples each, 6 right)
    n = np.array([[12, 12], [12, 12]])
    c = np.array([[6, 0], [0, 6]])
    r = budget_coverage(n, c, ["a", "b"], [6, 6], resamples=200)
    # uniform = the split here: 1 - C(6,6)/C(12,6) on each question; a single expert covers one question
    p6 = 1 - 1 / 924
    assert r.coverage == pytest.approx(p6) and r.uniform == pytest.approx(p6)
    assert r.single == pytest.approx({"a": 0.5, "b": 0.5})
    assert r.gain == pytest.approx(0.0)  # the split is the uniform one
    lopsided = budget_coverage(n, c, ["a", "b"], [12, 0], resamples=200)
    assert lopsided.coverage == pytest.approx(0.5) and lopsided.gain == pytest.approx(0.5 - p6)
    with pytest.raises(ValueError, match="needs >= 12 samples"):
        budget_coverage(np.array([[8, 8]]), np.array([[1, 1]]), ["a", "b"], [6, 6])


def test_splits_enumerates_every_split_with_the_floor():
    from meml.eval.metrics import splits

    assert splits(4, 2, floor=1) == [[1, 3], [2, 2], [3, 1]]
    assert splits(3, 3, floor=1) == [[1, 1, 1]]
    assert splits(2, 3, floor=1) == []
    assert len(splits(12, 3, floor=2)) == 28  # 6 spare answers over 3 experts: C(8, 2)
    assert all(sum(s) == 12 and min(s) >= 2 for s in splits(12, 3, floor=2))


def test_best_split_by_hand():
    from meml.eval.metrics import best_split

    # 4 samples per (question, expert). Question 1: expert 0 right on 1 of 4, expert 1 never.
    # Question 2: expert 0 never, expert 1 right on 2 of 4. Budget 2 answers, floor 0:
    #   [2, 0]: q1 1 - C(3,2)/C(4,2) = 1/2, q2 0   -> mean 1/4
    #   [1, 1]: q1 1/4, q2 2/4                      -> mean 3/8
    #   [0, 2]: q1 0,  q2 1 - C(2,2)/C(4,2) = 5/6   -> mean 5/12 (the best)
    n, c = np.array([[4, 4], [4, 4]]), np.array([[1, 0], [0, 2]])
    assert best_split(n, c, 2) == [0, 2]
    assert best_split(n, c, 2, floor=1) == [1, 1]  # the only split with one each
    # all splits equal (nothing is ever right): the first one
    assert best_split(np.array([[4, 4]]), np.array([[0, 0]]), 2) == [0, 2]
    with pytest.raises(ValueError, match="cannot give 2 experts 2 each"):
        best_split(n, c, 2, floor=2)
