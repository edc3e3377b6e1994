"""Advantages: a reward minus its group's mean, optionally divided by the group's std.

Groups are explicit integer ids. Which episodes share a group is decided in one place,
`group_keys`: per (draw of a question, expert) as in MEML-GRPO, or pooled over the
experts of a draw. Rewards of None (a reward function failed or the verifier abstained) take no
part in the baseline and get advantage 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from meml.core.registry import Registry
from meml.core.types import Episode


def group_keys(episodes: Sequence[Episode], grouping: str) -> list[Hashable]:
    """The baseline group of each episode: 'expert' -> its (draw, expert) group; 'question' ->
    its draw of the question, pooled over the experts. A question drawn twice in a step is
    two draws: two baselines."""
    if grouping == "expert":
        return [e.group_id for e in episodes]
    if grouping == "question":
        return [e.slot for e in episodes]
    raise ValueError(f"advantage grouping '{grouping}': choose expert or question")


def group_index(keys: Sequence[Hashable]) -> torch.Tensor:
    """Dense group ids 0..K-1 in order of first appearance."""
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)


def group_advantages(
    rewards: torch.Tensor,  # (N,) float, NaN where the reward is missing
    groups: torch.Tensor,  # (N,) long group id
    std_normalize: bool,
    positive_only: bool,
    eps: float = 1e-4,
) -> torch.Tensor:
    """A_i = r_i - mean(r in group); / (std + eps) if std_normalize; max(A, 0) if positive_only.

    The std is the unbiased sample std of the group (as TRL computes it); a group with a
    single valid reward has advantage 0. Returns (N,) float.
    """
    valid = ~torch.isnan(rewards)  # (N,)
    r = torch.where(valid, rewards, torch.zeros_like(rewards)).double()
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, valid.double())
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, r)
    mean = total / count.clamp(min=1)  # (K,)
    centred = torch.where(valid, r - mean[groups], torch.zeros_like(r))  # (N,)
    if std_normalize:
        sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, groups, centred**2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # (K,)
        centred = centred / (std[groups] + eps)
    if positive_only:
        centred = centred.clamp(min=0)
    return centred.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def best_of_group_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """pass@k-style advantage (verl's `grpo_passk`): in each group only the best answer gets
    a non-zero advantage, its reward minus the group's second-best; every other answer 0.
    With 0/1 rewards a group teaches only when exactly one answer is right: that answer
    then gets +1. Ties for the best go to the first. Missing rewards (NaN) take no part.

    >>> best_of_group_advantages(torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 1, 1])).tolist()
    [0.0, 1.0, 0.0, 0.0, 0.0]
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in groups.unique().tolist():
        members = [i for i in (groups == g).nonzero().flatten().tolist() if not torch.isnan(rewards[i])]
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda i: -float(rewards[i]))  # stable: the first of equal rewards leads
        out[ranked[0]] = float(rewards[ranked[0]] - rewards[ranked[1]])
    return out


def _group_mean(rewards, groups, std_normalize, positive_only):
    return group_advantages(rewards, groups, std_normalize, positive_only)


def _best_of_group(rewards, groups, std_normalize, positive_only):
    return best_of_group_advantages(rewards, groups)  # >= 0 already; no std


# algo.advantage_estimator: (rewards, groups, std_normalize, positive_only) -> advantages
ADVANTAGE_ESTIMATORS = Registry("algo.advantage_estimator", {"group_mean": _group_mean, "pass_k": _best_of_group})
