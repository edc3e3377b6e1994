"""Loss terms as pure functions over tensors; every one returns per-token losses.

Shapes: B sequences, T response positions, V vocabulary. `mask` (B, T) is 1 on response
tokens and 0 on padding. Per-token losses are summed with per-sequence weights that hold
the term's normaliser (algo/objective.py), so a batch split into micro-batches gives
exactly the gradient of the whole batch. POLICY_LOSSES names the policy-gradient losses
`algo.loss` chooses from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meml.core.registry import Registry


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, computed in fp32. logits (B, T, V), targets (B, T) -> (B, T)."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, in fp32: (B, T, V) -> (B, T).

    H = log Z - sum_v p_v logit_v, with Z the partition function (no log of a probability
    that underflows to 0)."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """On-policy policy gradient: -A * log p(token). logp (B, T), advantages (B,) -> (B, T)."""
    return -advantages.unsqueeze(-1) * logp


def ppo_clip_loss(
    logp: torch.Tensor,  # (B, T) current policy
    old_logp: torch.Tensor,  # (B, T) policy that sampled (or before this update)
    advantages: torch.Tensor,  # (B,)
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A) per token, and where the clip was active."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def truncated_is_weights(policy_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi(t) / q(t), cap) for tokens sampled from an engine q
    whose numerics differ from the trainer's pi (e.g. vLLM's kernels). Detached: a weight,
    not a path for gradients. (B, T), (B, T) -> (B, T)."""
    return torch.exp(policy_logp.detach() - sampler_logp).clamp(max=cap)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: e^d - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def nll_loss(logp: torch.Tensor) -> torch.Tensor:
    """Supervised term (IML, HSFT, SFT): -log p(token). (B, T) -> (B, T)."""
    return -logp


def distribution_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary at each position; the teacher is not trained.

    (B, T, V), (B, T, V) -> (B, T). Used by the token-level form of the IML term.
    """
    t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def weighted_sum(token_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b weights[b] * sum_t mask[b, t] * token_loss[b, t]. (B, T), (B, T), (B,) -> scalar."""
    return (token_loss * mask * weights.unsqueeze(-1)).sum()


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per sequence, the
    geometric mean of its tokens' ratios, s = exp(mean_t (logp - old_logp)), clipped as in
    PPO: L = -min(s A, clip(s, 1-eps_low, 1+eps_high) A). Returned per token (L repeated at
    each response position, so that a sequence-mean aggregation gives mean over sequences
    of L) with where the clip was active. logp, old_logp, mask (B, T); advantages (B,)."""
    length = mask.sum(-1).clamp(min=1)  # (B,)
    ratio = torch.exp(((logp - old_logp) * mask).sum(-1) / length)  # (B,)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)  # (B,)
    active = (clipped < unclipped).float()
    return loss.unsqueeze(-1).expand_as(logp), active.unsqueeze(-1).expand_as(logp)


def cispo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): the importance weight is clipped and detached,
    and every token keeps its gradient: L_t = -sg(clip(r_t, 1-eps_low, 1+eps_high)) A log p_t,
    r_t = exp(logp_t - old_logp_t). PPO's clip instead zeroes the gradient of clipped tokens.
    (B, T), (B, T), (B,) -> per-token loss and where the weight was clipped."""
    ratio = torch.exp(logp.detach() - old_logp)
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -weight * advantages.unsqueeze(-1) * logp, (weight != ratio).float()


# A policy loss: (logp, behaviour logp, advantages, mask, eps_low, eps_high) -> (per-token
# loss, where a clip was active or None). behaviour is the policy the update is relative to.
PolicyLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor | None]
]


def _reinforce(logp, behaviour, advantages, mask, eps_low, eps_high):
    return reinforce_loss(logp, advantages), None


def _ppo_clip(logp, behaviour, advantages, mask, eps_low, eps_high):
    return ppo_clip_loss(logp, behaviour, advantages, eps_low, eps_high)


def _gspo(logp, behaviour, advantages, mask, eps_low, eps_high):
    return gspo_loss(logp, behaviour, advantages, mask, eps_low, eps_high)


def _cispo(logp, behaviour, advantages, mask, eps_low, eps_high):
    return cispo_loss(logp, behaviour, advantages, eps_low, eps_high)


POLICY_LOSSES: Registry[PolicyLoss] = Registry(
    "algo.loss", {"reinforce": _reinforce, "ppo_clip": _ppo_clip, "gspo": _gspo, "cispo": _cispo}
)
