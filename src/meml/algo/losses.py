"""Loss terms as pure functions over tensors; every one returns per-token losses.

Shapes: B sequences, T response positions, V vocabulary. `mask` (B, T) is 1 on response
tokens and 0 on padding. Per-token losses are summed with per-sequence weights that hold
the aggregation's normaliser (see `sequence_weights`), so a batch split into micro-batches
gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, computed in fp32. logits (B, T, V), targets (B, T) -> (B, T)."""
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


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


def sequence_weights(
    lengths: torch.Tensor,
    aggregation: str,
    max_new_tokens: int,
    num_sequences: int | None = None,
    total_tokens: int | None = None,
) -> torch.Tensor:
    """Per-token weight of each sequence so that sum(weight * token_loss) aggregates as asked.

    lengths (N,): response tokens of this process's sequences. num_sequences and
    total_tokens describe the whole batch being aggregated (across processes); they
    default to this process's own.
      token_mean: 1 / (total tokens)            every token counts equally
      seq_mean:   1 / (N * length_i)            every sequence counts equally (GRPO paper)
      constant:   1 / (N * max_new_tokens)      Dr.GRPO: no length bias
    """
    lengths = lengths.double()
    n = num_sequences if num_sequences is not None else lengths.numel()
    total = total_tokens if total_tokens is not None else float(lengths.sum())
    if aggregation == "token_mean":
        return torch.full_like(lengths, 1.0 / max(total, 1))
    if aggregation == "seq_mean":
        return 1.0 / (max(n, 1) * lengths.clamp(min=1))
    if aggregation == "constant":
        return torch.full_like(lengths, 1.0 / (max(n, 1) * max_new_tokens))
    raise ValueError(f"aggregation '{aggregation}': choose token_mean, seq_mean or constant")


def weighted_sum(token_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_b weights[b] * sum_t mask[b, t] * token_loss[b, t]. (B, T), (B, T), (B,) -> scalar."""
    return (token_loss * mask * weights.unsqueeze(-1)).sum()
