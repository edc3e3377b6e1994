"""Evaluation maths: majority vote, pass@k, coverage and the compute-matched comparison.

Pure functions over answers and per-(question, expert) counts; nothing here knows about
models. Notation: an expert answered one question n times (samples) and c of them were
correct.

  pass@k        P(at least one of k answers drawn without replacement from the n is
                correct) = 1 - C(n-c, k) / C(n, k), the unbiased estimator of Chen et al.
                (2021), computed as a product so it never forms a huge binomial.
  coverage      fraction of questions with at least one correct answer.
  compute-matched coverage
                MEML's premise is that N experts x k samples find a correct answer more
                often than one expert given the same budget of N*k samples. Per question,
                mixture = 1 - prod_i C(n_i-c_i, k)/C(n_i, k) (independent draws per expert),
                single_e = pass@(N*k) of expert e alone (needs n_e >= N*k).
  paired bootstrap
                resample questions with replacement (seeded); in each resample the gain is
                mean(mixture) - max_e mean(single_e), so the interval also carries the
                uncertainty of which expert is "best".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


def majority_vote(answers: list[str | None]) -> str | None:
    """Most common non-empty answer; a tie goes to the tied answer seen first.

    >>> majority_vote(["3", None, "4", "4", "3"])
    '3'
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def prob_all_wrong(n, c, k: int) -> np.ndarray:
    """C(n-c, k) / C(n, k): k draws (without replacement) from n answers, none correct.

    Elementwise over arrays n, c. As a product: prod_{i=n-c+1}^{n} (1 - k/i); it is 0 when
    fewer than k answers are wrong.
    >>> float(prob_all_wrong(4, 1, 2))  # C(3,2)/C(4,2) = 3/6
    0.5
    """
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    if k < 0 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
        raise ValueError(f"need 0 <= c <= n and n >= k={k}; got n={n.tolist()}, c={c.tolist()}")
    if k == 0 or n.size == 0:
        return np.ones(n.shape)
    i = np.arange(1, int(n.max()) + 1)  # (M,)
    in_range = (i > (n - c)[..., None]) & (i <= n[..., None])  # (..., M): the c factors of the product
    with np.errstate(divide="ignore"):  # factors with i <= k are 0 (log -inf): fewer than k wrong answers
        factors = np.log1p(-np.minimum(k / i, 1.0))  # (M,)
    return np.exp(np.where(in_range, factors, 0.0).sum(-1))


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k from n samples with c correct (elementwise).

    >>> float(pass_at_k(4, 1, 2)), float(pass_at_k(5, 0, 3)), float(pass_at_k(5, 3, 3))
    (0.5, 0.0, 1.0)
    """
    return 1.0 - prob_all_wrong(n, c, k)


def coverage(correct: list[list[bool]]) -> float:
    """Fraction of questions (rows) with at least one correct answer.

    >>> coverage([[False, True], [False, False]])
    0.5
    """
    return sum(any(row) for row in correct) / max(1, len(correct))


def mixture_pass(n, c, k: int) -> np.ndarray:
    """P(at least one correct) with k draws from each expert (last axis) independently.

    >>> float(mixture_pass([4, 4], [1, 0], 2))  # 1 - (3/6) * 1
    0.5
    """
    return 1.0 - prob_all_wrong(n, c, k).prod(-1)


def zero_signal(n, c, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability that a training group of `group_size` answers is all wrong, and that it
    is all equal (all wrong or all right: zero advantage, no learning signal)."""
    n = np.asarray(n)
    c = np.asarray(c)
    all_wrong = prob_all_wrong(n, c, group_size)
    all_right = prob_all_wrong(n, n - c, group_size)
    return all_wrong, all_wrong + all_right


def paired_bootstrap(
    mixture, singles, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Gain of the mixture over the best single expert, with a percentile interval.

    mixture: (Q,) per-question values; singles: (Q, E) per question and expert. Questions
    are resampled jointly (paired). Returns (point estimate, low, high).
    """
    mixture = np.asarray(mixture, dtype=float)  # (Q,)
    singles = np.asarray(singles, dtype=float).reshape(len(mixture), -1)  # (Q, E)
    point = float(mixture.mean() - singles.mean(0).max())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(mixture), size=(resamples, len(mixture)))  # (B, Q)
    gains = mixture[idx].mean(1) - singles[idx].mean(1).max(-1)  # (B,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail])
    return point, float(low), float(high)


@dataclass
class MatchedCoverage:
    k: int  # samples per expert in the mixture; each single expert gets N*k
    mixture: float
    single: dict[str, float]
    best: str
    gain: float  # mixture - best single
    gain_low: float
    gain_high: float
    questions: int

    def as_summary(self) -> dict:
        out: dict = {
            "coverage/k": self.k,
            "coverage/budget": self.k * len(self.single),
            "coverage/mixture": self.mixture,
        }
        out.update({f"coverage/{name}": v for name, v in self.single.items()})
        out.update(
            {
                "coverage/best": self.single[self.best],
                "coverage/gain": self.gain,
                "coverage/gain_low": self.gain_low,
                "coverage/gain_high": self.gain_high,
            }
        )
        return out


def compute_matched_coverage(
    n, c, expert_names: list[str], k: int, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> MatchedCoverage:
    """N experts x k samples against each single expert x N*k samples, per question.

    n, c: (Q, N) sample counts and correct counts per (question, expert); needs n >= N*k.
    """
    n = np.asarray(n)
    c = np.asarray(c)
    budget = k * len(expert_names)
    if n.size and n.min() < budget:
        raise ValueError(
            f"compute-matched coverage with k={k} and {len(expert_names)} experts needs "
            f">= {budget} samples per (question, expert); the fewest here is {n.min()}"
        )
    mixture = mixture_pass(n, c, k)  # (Q,)
    singles = pass_at_k(n, c, budget)  # (Q, N)
    means = singles.mean(0) if len(n) else np.zeros(len(expert_names))
    best = int(np.argmax(means))
    point, low, high = paired_bootstrap(mixture, singles, resamples, seed, confidence) if len(n) else (0.0, 0.0, 0.0)
    return MatchedCoverage(
        k,
        float(mixture.mean()) if len(n) else 0.0,
        dict(zip(expert_names, means.tolist())),
        expert_names[best],
        point,
        low,
        high,
        len(n),
    )


def split_pass(n, c, split) -> np.ndarray:
    """P(at least one correct) drawing split[e] answers from expert e (without replacement
    from its n_e samples), independently per expert. n, c: (Q, N) -> (Q,).

    >>> float(split_pass([[4, 4]], [[1, 0]], [2, 0])[0])  # 1 - C(3,2)/C(4,2) from expert 0 alone
    0.5
    """
    n = np.asarray(n).reshape(-1, len(split))
    c = np.asarray(c).reshape(-1, len(split))
    none = np.ones(len(n))
    for e, k in enumerate(split):
        none = none * prob_all_wrong(n[:, e], c[:, e], int(k))
    return 1.0 - none


def splits(total: int, experts: int, floor: int = 0) -> list[list[int]]:
    """Every way to give `experts` experts `total` answers, at least `floor` each.

    >>> splits(4, 2, floor=1)
    [[1, 3], [2, 2], [3, 1]]
    """
    if experts == 1:
        return [[total]] if total >= floor else []
    return [[k, *rest] for k in range(floor, total + 1) for rest in splits(total - k, experts - 1, floor)]


def best_split(n, c, total: int, floor: int = 0) -> list[int]:
    """The split of `total` answers (at least `floor` per expert) with the highest mean
    coverage (split_pass) over the questions of n, c: (Q, N). Ties go to the earlier split
    in `splits` order. Fitted on one split of the data, it is scored on another."""
    n, c = np.asarray(n), np.asarray(c)
    candidates = splits(total, n.shape[1], floor)
    if not candidates:
        raise ValueError(f"{total} answers cannot give {n.shape[1]} experts {floor} each")
    means = [float(split_pass(n, c, s).mean()) for s in candidates]
    return candidates[int(np.argmax(means))]


@dataclass
class BudgetCoverage:
    """Coverage at a fixed budget of A answers per question, split as given (e.g. by the
    adaptive expert budget), against the uniform split and each single expert with all A."""

    split: list[int]
    coverage: float
    uniform: float | None  # None when A is not a multiple of the number of experts
    single: dict[str, float]
    best: str
    gain: float  # split - the better of uniform and the best single expert
    gain_low: float
    gain_high: float
    questions: int

    def as_summary(self) -> dict:
        out = {"budget_coverage/budget": sum(self.split), "budget_coverage/split": self.coverage}
        out.update({f"budget_coverage/k/{i}": k for i, k in enumerate(self.split)})
        if self.uniform is not None:
            out["budget_coverage/uniform"] = self.uniform
        out.update({f"budget_coverage/single/{name}": v for name, v in self.single.items()})
        out.update(
            {
                "budget_coverage/best_single": self.single[self.best],
                "budget_coverage/gain": self.gain,
                "budget_coverage/gain_low": self.gain_low,
                "budget_coverage/gain_high": self.gain_high,
            }
        )
        return out


def budget_coverage(
    n, c, expert_names: list[str], split, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> BudgetCoverage:
    """The split's coverage against max(uniform split, best single expert x A), A = sum(split),
    with a paired bootstrap over questions (the comparison's winner is re-chosen in each
    resample, as in `paired_bootstrap`). Needs n >= A samples per (question, expert)."""
    n, c = np.asarray(n), np.asarray(c)
    budget, N = int(sum(split)), len(expert_names)
    if n.size and n.min() < budget:
        raise ValueError(
            f"a budget of {budget} answers needs >= {budget} samples per (question, expert); have {n.min()}"
        )
    mix = split_pass(n, c, split)  # (Q,)
    singles = pass_at_k(n, c, budget)  # (Q, N)
    others = singles
    uniform = None
    if budget % N == 0:
        uni = split_pass(n, c, [budget // N] * N)
        uniform = float(uni.mean())
        others = np.concatenate([singles, uni[:, None]], axis=1)  # (Q, N + 1)
    point, low, high = paired_bootstrap(mix, others, resamples, seed, confidence)
    means = singles.mean(0)
    best = int(np.argmax(means))
    return BudgetCoverage(
        [int(k) for k in split],
        float(mix.mean()),
        uniform,
        dict(zip(expert_names, means.tolist())),
        expert_names[best],
        point,
        low,
        high,
        len(n),
    )


# ----------------------------------------------------------------------------- studies
#
# `meml compare` runs arms over seeds and scores every final model on the same questions.
# The figures below turn those scores into claims: a (seeds, questions) array of 0/1
# correctness per arm, paired by seed and question id.


@dataclass
class PairedDifference:
    """mean(a) - mean(b) over seeds x questions, with a bootstrap interval and p-value."""

    estimate: float
    low: float
    high: float
    p_value: float
    per_seed: list[float]  # the difference on each seed (run-to-run spread)
    seeds: int
    questions: int

    def as_dict(self) -> dict:
        return {
            "diff": self.estimate,
            "low": self.low,
            "high": self.high,
            "p": self.p_value,
            "per_seed": self.per_seed,
            "seeds": self.seeds,
            "questions": self.questions,
        }


def bootstrap_weights(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """(resamples, size) counts: how often each index is drawn in a resample with replacement."""
    draws = rng.integers(0, size, size=(resamples, size))  # (B, size)
    return np.stack([np.bincount(row, minlength=size) for row in draws]).astype(float)


def paired_difference(a, b, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Paired comparison of two arms scored on the same (seed, question) cells.

    a, b: (S, Q) scores (seed s of both arms, question q). d = a - b. The estimate is the
    mean of d. Each bootstrap resample draws S seeds and, independently, Q questions with
    replacement (a two-way bootstrap: it carries both the run-to-run and the question-to-
    question spread); its mean is sum_s sum_q w_s v_q d_sq / (S Q) with w, v the draw
    counts. Interval: percentiles of the resampled means. p-value (two-sided, H0: no
    difference): the share of resampled means at least as far from the estimate as the
    estimate is from 0, (1 + #{|m_b - d| >= |d|}) / (1 + B).

    >>> r = paired_difference([[1, 1, 0, 1]], [[0, 1, 0, 0]], resamples=200)
    >>> r.estimate, r.per_seed
    (0.5, [0.5])
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(
            f"paired_difference needs two (seeds, questions) arrays of the same shape; got {a.shape} and {b.shape}"
        )
    d = a - b  # (S, Q)
    S, Q = d.shape
    estimate = float(d.mean())
    rng = np.random.default_rng(seed)
    w = bootstrap_weights(rng, S, resamples)  # (B, S)
    v = bootstrap_weights(rng, Q, resamples)  # (B, Q)
    means = np.einsum("bs,sq,bq->b", w, d, v) / (S * Q)  # (B,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    far = int(np.sum(np.abs(means - estimate) >= abs(estimate) - 1e-12))
    p = (1 + far) / (1 + resamples) if estimate != 0 else 1.0
    return PairedDifference(estimate, float(low), float(high), float(p), d.mean(1).tolist(), S, Q)


def mean_and_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value).

    >>> mean_and_sd([0.25, 0.5, 0.75])
    (0.5, 0.25)
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def choose_by_validation(scores: dict, higher_is_better: bool = True):
    """The key (an lr, an expert) whose mean validation score is best; a tie goes to the key
    listed first, so the rule is fixed before any score is read.

    scores: key -> list of validation scores (one per selection seed).
    >>> choose_by_validation({1e-6: [0.2, 0.3], 1e-5: [0.4, 0.1], 5e-5: [0.25, 0.2]})
    1e-06
    """
    if not scores:
        raise ValueError("nothing to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best_key, best = None, -float("inf")
    for key, values in scores.items():
        value = sign * float(np.mean(values))
        if value > best:
            best_key, best = key, value
    return best_key
