"""The adaptive expert budget: a fixed number A of answers per question, split across the N
experts by how well each has been doing lately (a bandit over experts), with a floor m.

Each expert i keeps an exponential average s_i of its success rate (the fraction of its
answers the verifier accepted in a step). A step first gives every expert m answers, then
splits the rest, R = A - N m, by a softmax of the averages at temperature tau, read on a
linear or a log scale (`scale`), rounding by largest remainders:

    linear:  w_i = exp(s_i / tau) / sum_j exp(s_j / tau)
    log:     w_i = s_i^(1/tau) / sum_j s_j^(1/tau)        (the softmax of log s_i at tau)
    n_i = m + floor(R w_i), plus one more for the R - sum_j floor(R w_j) experts with the
          largest remainders R w_i - floor(R w_i) (ties: the earlier expert)

The linear scale compares absolute rates: rates of a few percent look alike at tau = 0.1 and
split evenly. The log scale is scale-free (multiplying every rate by c leaves the split as it
is): it compares ratios, so 0.04 against 0.01 weighs like 0.8 against 0.2. An expert at 0
gets only the floor; when every rate is 0 the split is even.

After the step, with c_i correct of a_i answers (all processes):

    s_i <- c_i / a_i                            the first step that observes expert i
    s_i <- (1 - alpha) s_i + alpha c_i / a_i    after that

The split draws no random numbers: it is a function of (s, seen), which checkpoints hold, so
a resumed run splits exactly as an uninterrupted one. The floor keeps every expert sampled,
so its average keeps moving and IML still has a mean for it on every question.

Groups then differ in size. HSFT's trigger ("more than K of G wrong") is read as a fraction:
a group of n answers triggers when more than K n / G are wrong (`hsft_max_wrong`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def softmax(values: Sequence[float], temperature: float) -> list[float]:
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def budget_weights(rates: Sequence[float], temperature: float, scale: str = "linear") -> list[float]:
    """Each expert's share of the spare answers: a softmax of the rates (linear) or of their logs (log)."""
    if scale == "linear":
        return softmax(rates, temperature)
    if scale != "log":
        raise ValueError(f"unknown scale {scale!r}: linear or log")
    if max(rates) <= 0:
        return [1 / len(rates)] * len(rates)
    top = max(rates)
    powers = [(r / top) ** (1 / temperature) if r > 0 else 0.0 for r in rates]  # over the top: no underflow to 0/0
    total = sum(powers)
    return [p / total for p in powers]


def split_budget(
    total: int, rates: Sequence[float], floor: int, temperature: float, scale: str = "linear"
) -> list[int]:
    """Answers per expert: the floor each, the rest by `budget_weights`, largest remainders."""
    n = len(rates)
    spare = total - n * floor
    if spare < 0:
        raise ValueError(f"{total} answers cannot give {n} experts {floor} each")
    raw = [spare * w for w in budget_weights(rates, temperature, scale)]
    whole = [math.floor(r) for r in raw]
    left = spare - sum(whole)
    by_remainder = sorted(range(n), key=lambda i: (-(raw[i] - whole[i]), i))
    for i in by_remainder[:left]:
        whole[i] += 1
    return [floor + w for w in whole]


def hsft_max_wrong(max_wrong: int, group_size: int, size: int) -> int:
    """K for a group of `size` answers: more than K n / G wrong <=> more than floor(K n / G)
    wrong (counts are whole numbers). Equals K when size = G."""
    return max_wrong * size // group_size


class ExpertBudget:
    """The bandit's state: each expert's success average and how many steps observed it,
    plus running totals for inspection."""

    def __init__(self, num_experts: int):
        self.rates = [0.0] * num_experts  # s_i
        self.seen = [0] * num_experts  # steps that observed expert i
        self.answers = [0] * num_experts  # totals over the run
        self.correct = [0] * num_experts

    def split(self, total: int, floor: int, temperature: float, scale: str = "linear") -> list[int]:
        return split_budget(total, self.rates, floor, temperature, scale)

    def update(self, correct: Sequence[int], answers: Sequence[int], smoothing: float) -> None:
        """One step's counts per expert (over all processes); experts with no answer keep their average."""
        for i, (c, a) in enumerate(zip(correct, answers)):
            if a <= 0:
                continue
            rate = c / a
            self.rates[i] = rate if self.seen[i] == 0 else (1 - smoothing) * self.rates[i] + smoothing * rate
            self.seen[i] += 1
            self.answers[i] += int(a)
            self.correct[i] += int(c)

    def state_dict(self) -> dict:
        return {
            "rates": list(self.rates),
            "seen": list(self.seen),
            "answers": list(self.answers),
            "correct": list(self.correct),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["rates"]) != len(self.rates):
            raise ValueError(
                f"the checkpoint's expert budget has {len(state['rates'])} experts, this run {len(self.rates)}"
            )
        self.rates = list(state["rates"])
        self.seen = list(state["seen"])
        self.answers = list(state["answers"])
        self.correct = list(state["correct"])
