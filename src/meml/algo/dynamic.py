"""Dynamic sampling (DAPO, arXiv 2503.14476, section 3.2), as pure rules.

A baseline group whose valid rewards are all equal (all right, all wrong) has advantage 0
everywhere: it carries no policy gradient and only dilutes the normaliser. Dynamic sampling
leaves such groups out of the policy-gradient term and samples more until the step holds as
many informative groups as it was configured with (Q N groups per step; Q with the baseline
pooled over a question's experts), in at most `max_rounds` refill rounds. Where a refill
comes from:

  questions  fresh questions, the next ones in the training order; a round asks for
             ceil(missing / (groups per question x informative rate so far)) of them,
             at most Q (all Q when nothing so far was informative)
  experts    each dead (draw, expert) group, once, in group order, up to the number missing:
             the same question under the expert whose group on that draw had the largest
             reward variance. For 0/1 rewards that is p (1 - p), p the expert's success
             rate on the question, and a fresh group of n answers is informative with
             probability 1 - p^n - (1 - p)^n, which grows with p (1 - p): the expert whose
             outcome on this question is least settled. A dead group whose draw has no
             live group has no such expert; what is still missing comes from fresh questions.

Groups left out of the policy gradient still take part in IML and HSFT (an all-wrong group
is exactly what HSFT is for).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from meml.core.types import Episode


def zero_signal(rewards: Sequence[float | None]) -> bool:
    """Whether a group's valid rewards are all equal (or fewer than two): every advantage is 0."""
    return len({r for r in rewards if r is not None}) <= 1


def informative_mask(episodes: Sequence[Episode], keys: Sequence[Hashable]) -> list[bool]:
    """Per episode: does its baseline group (keys: algo.advantages.group_keys) have reward spread."""
    groups: dict[Hashable, list[float | None]] = {}
    for e, k in zip(episodes, keys):
        groups.setdefault(k, []).append(e.reward)
    live = {k: not zero_signal(r) for k, r in groups.items()}
    return [live[k] for k in keys]


@dataclass(frozen=True)
class GroupStat:
    """One baseline group, as the refill rules see it."""

    group: int  # group id (episode.group_id; the slot when the baseline pools a draw's experts)
    slot: int
    question_id: str
    expert: int | None  # None when the group pools the draw's experts
    rewards: tuple[float | None, ...]

    @property
    def dead(self) -> bool:
        return zero_signal(self.rewards)

    @property
    def variance(self) -> float:
        """Population variance of the valid rewards (p (1 - p) for 0/1 rewards); 0 without any."""
        valid = [r for r in self.rewards if r is not None]
        if not valid:
            return 0.0
        mean = sum(valid) / len(valid)
        return sum((r - mean) ** 2 for r in valid) / len(valid)


def group_stats(episodes: Sequence[Episode], pooled: bool) -> list[GroupStat]:
    """The groups of some episodes, ordered by group id; pooled: one group per slot."""
    rewards: dict[int, list[float | None]] = {}
    where: dict[int, tuple[int, str, int | None]] = {}
    for e in episodes:
        key = e.slot if pooled else e.group_id
        rewards.setdefault(key, []).append(e.reward)
        where[key] = (e.slot, e.question_id, None if pooled else e.expert)
    return [GroupStat(k, *where[k], tuple(rewards[k])) for k in sorted(rewards)]


def fresh_questions(missing: int, groups_per_question: int, informative: int, sampled: int, cap: int) -> int:
    """How many fresh questions a refill round draws: enough to make up `missing` informative
    groups at the rate seen so far (`informative` of `sampled` groups), that is
    ceil(missing / (groups_per_question x informative / sampled)), at least 1 and at most
    `cap`; `cap` when nothing so far was informative."""
    if missing <= 0:
        return 0
    if informative <= 0:
        return cap
    need = -(-missing * sampled // (groups_per_question * informative))  # exact ceiling on integers
    return max(1, min(cap, need))


def expert_refills(stats: Sequence[GroupStat], missing: int, used: set[int]) -> list[tuple[int, int, int]]:
    """(dead group, slot, expert to sample) for up to `missing` dead (draw, expert) groups not in
    `used`, in group order: the draw's live expert with the largest reward variance (ties: the
    earlier expert). Dead groups whose draw has no live group are passed over."""
    by_slot: dict[int, list[GroupStat]] = {}
    for g in stats:
        by_slot.setdefault(g.slot, []).append(g)
    out = []
    for g in stats:
        if len(out) >= missing:
            break
        if not g.dead or g.group in used or g.expert is None:
            continue
        live = [x for x in by_slot[g.slot] if not x.dead and x.expert is not None]
        if not live:
            continue
        best = max(live, key=lambda x: (x.variance, -x.expert))
        out.append((g.group, g.slot, best.expert))
    return out
