"""The objective of an update, in one place.

    stage 2:  L = L_PG + lambda1 L_IML + lambda2 L_HSFT
    stage 1:  L = L_SFT

Each term is a list of `TrainItem`s: a prompt, a response, a per-token weight holding the
term's normaliser, and a coefficient (1, lambda1, lambda2). The loss of a batch is

    L = sum_rows coef * weight * sum_t mask_t * loss_t

so a batch cut into micro-batches, or over processes, sums to the same value and gradient.
The normalisers (written once, in the functions below; counts are over the whole batch,
every process's items included: callers pass global counts):

    PG  token_mean  w_i = 1 / T           T: response tokens of the step's PG sequences
        seq_mean    w_i = 1 / (N |o_i|)   N: PG sequences of the step (GRPO's sequence mean)
        constant    w_i = 1 / (N L)       L: rollout.max_new_tokens (Dr.GRPO: no length bias)
    IML             w_p = 1 / (Q |O+_p|)  Q: the step's questions (iml.normalize=batch) or
                                          the pairs that fired (normalize=fired)
    HSFT            w_h = 1 / (B |o_h|)   B: buffer items flushed into this step
    SFT             w = 1 / T             T: trace tokens of the step's batch

The per-token loss of a row (`micro_batch_loss`):
    pg    the policy loss POLICY_LOSSES[algo.loss] (REINFORCE, PPO-clip, GSPO, CISPO), times
          the truncated importance weight min(pi/q, tis_cap) when tis_cap > 0, kept only
          on the top-entropy tokens when top_entropy_quantile < 1, plus kl_coef * k3(pi,
          reference), minus entropy_coef * H (an entropy bonus)
    iml   -log p(O+_t | P_E-, q, O+_<t); with iml.form=kl, KL(p(.|P_E+, ...) || p(.|P_E-, ...))
    hsft, sft   -log p(o_t | P_e, q, o_<t)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meml.algo import losses
from meml.algo.hsft import HardExample
from meml.algo.iml import IMLPair
from meml.core.registry import Registry
from meml.core.types import Episode

KINDS = ("pg", "iml", "hsft", "sft")  # stage-2 policy gradient, mutual learning, hard examples; stage-1 SFT


@dataclass
class TrainItem:
    kind: str  # one of KINDS
    prompt_ids: list[int]
    response_ids: list[int]
    weight: float  # per-token normaliser of this item's term
    coef: float = 1.0  # the term's coefficient (lambda1, lambda2; 1 for pg and sft)
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None  # (len(response_ids),) for ppo_clip with several updates
    ref_logprobs: torch.Tensor | None = None  # (len(response_ids),) for the KL term
    sample_logprobs: torch.Tensor | None = None  # (len(response_ids),) the engine's, for the IS correction
    teacher_prompt_ids: list[int] | None = None  # IML token-KL form: the strong expert's prompt
    expert: int = -1  # the expert a pg item was sampled under (for per-expert statistics)


@dataclass(frozen=True)
class LossSettings:
    loss: str = "reinforce"  # a name of losses.POLICY_LOSSES
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    tis_cap: float = 0.0  # truncated importance-sampling correction of engine/trainer mismatch; 0 = off
    entropy_coef: float = 0.0  # entropy bonus on policy-gradient tokens; 0 = off
    top_entropy_quantile: float = 1.0  # train the PG term on this top share of tokens by entropy; 1 = all
    num_experts: int = 0  # entropy statistics per expert index 0..n-1 (0: none)

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef > 0 or self.top_entropy_quantile < 1.0 or self.num_experts > 0


# ----------------------------------------------------------------------------- normalisers


def _token_mean(lengths: torch.Tensor, n: int, total: float, max_new_tokens: int) -> torch.Tensor:
    return torch.full_like(lengths, 1.0 / max(total, 1))  # 1 / T


def _seq_mean(lengths: torch.Tensor, n: int, total: float, max_new_tokens: int) -> torch.Tensor:
    return 1.0 / (max(n, 1) * lengths.clamp(min=1))  # 1 / (N |o_i|)


def _constant(lengths: torch.Tensor, n: int, total: float, max_new_tokens: int) -> torch.Tensor:
    return torch.full_like(lengths, 1.0 / (max(n, 1) * max_new_tokens))  # 1 / (N L)


AGGREGATIONS = Registry("algo.aggregation", {"token_mean": _token_mean, "seq_mean": _seq_mean, "constant": _constant})


def sequence_weights(
    lengths: torch.Tensor,
    aggregation: str,
    max_new_tokens: int,
    num_sequences: int | None = None,
    total_tokens: float | None = None,
) -> torch.Tensor:
    """Per-token weight of each sequence so that sum(weight * token loss) aggregates as asked.

    lengths (N,): response tokens of this process's sequences; num_sequences and
    total_tokens describe the whole batch (all processes) and default to these.
    """
    lengths = lengths.double()
    n = num_sequences if num_sequences is not None else lengths.numel()
    total = total_tokens if total_tokens is not None else float(lengths.sum())
    return AGGREGATIONS.get(aggregation)(lengths, n, total, max_new_tokens)


# ----------------------------------------------------------------------------- terms


def policy_items(
    episodes: Sequence[Episode],
    advantages: torch.Tensor,
    indices: Sequence[int],
    aggregation: str,
    max_new_tokens: int,
    num_sequences: int,
    total_tokens: float,
    drop_zero: bool,
) -> list[TrainItem]:
    """L_PG's items. The normaliser counts every sequence of the batch (num_sequences,
    total_tokens: global), but a sequence with zero advantage carries no gradient and is
    left out when drop_zero (no KL term)."""
    lengths = torch.tensor([len(episodes[i].completion_ids) for i in indices])
    weights = sequence_weights(lengths, aggregation, max_new_tokens, num_sequences, total_tokens)
    items = []
    for i, w in zip(indices, weights.tolist()):
        e = episodes[i]
        if not e.completion_ids or (drop_zero and float(advantages[i]) == 0):
            continue
        sampled = None if e.sample_logprobs is None else torch.tensor(e.sample_logprobs)
        items.append(
            TrainItem(
                "pg",
                e.prompt_ids,
                e.completion_ids,
                weight=w,
                advantage=float(advantages[i]),
                sample_logprobs=sampled,
                expert=e.expert,
            )
        )
    return items


def trained_indices(episodes: Sequence[Episode], indices: Sequence[int], mask_truncated: bool) -> list[int]:
    """The episodes the policy-gradient term covers: all, or (algo.mask_truncated, DAPO's
    overlong filtering) all but those cut at the length limit, which then count in no
    normaliser either."""
    return [i for i in indices if episodes[i].finished] if mask_truncated else list(indices)


def iml_items(
    pairs: Sequence[IMLPair],
    weak_prompts: Sequence[list[int]],
    teacher_prompts: Sequence[list[int] | None],
    coef: float,
    normaliser: float,
) -> list[TrainItem]:
    """L_IML's items: O+ (the strong expert's answer) under the weak expert's prompt, each
    token-mean and divided by `normaliser` (Q questions, or the pairs that fired)."""
    return [
        TrainItem(
            "iml",
            prompt,
            p.answer.completion_ids,
            weight=1.0 / (len(p.answer.completion_ids) * normaliser),
            coef=coef,
            teacher_prompt_ids=teacher,
        )
        for p, prompt, teacher in zip(pairs, weak_prompts, teacher_prompts)
    ]


def hsft_items(hard: Sequence[HardExample], coef: float, num_items: float) -> list[TrainItem]:
    """L_HSFT's items: the mean over the flushed buffer items of their token-mean NLL."""
    return [
        TrainItem("hsft", h.prompt_ids, h.response_ids, weight=1.0 / (len(h.response_ids) * num_items), coef=coef)
        for h in hard
    ]


def sft_items(pairs: Sequence[tuple[list[int], list[int]]], total_tokens: float) -> list[TrainItem]:
    """L_SFT's items (stage 1): (prompt, trace) pairs, token mean over the step's batch."""
    return [TrainItem("sft", prompt, response, weight=1.0 / max(total_tokens, 1)) for prompt, response in pairs]


# ----------------------------------------------------------------------------- the loss of a micro-batch


def _stack(values: list[torch.Tensor | None], width: int, device) -> torch.Tensor:
    """Per-row vectors (None: zeros) as one right-padded (rows, width) tensor."""
    out = torch.zeros((len(values), width))
    for b, v in enumerate(values):
        if v is not None:
            out[b, : v.numel()] = v
    return out.to(device)


def micro_batch_loss(
    items: Sequence[TrainItem],
    logp: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    entropy: torch.Tensor | None = None,
    kl: tuple[list[int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one micro-batch and its statistics (sums, to be averaged later).

    logp (B, R): log p of each response token (fp32, with gradients); mask (B, R): 1 on
    response tokens. entropy (B, R): of the next-token distribution, where the settings
    use it (logging, bonus, top-entropy tokens). kl: (rows, per-token KL (b, R')) of the IML
    token-KL rows, which replaces their NLL.
    """
    device, R = logp.device, logp.shape[1]
    kinds = [it.kind for it in items]
    is_pg = torch.tensor([k == "pg" for k in kinds], device=device)  # (B,)
    weight = torch.tensor([it.weight for it in items], device=device, dtype=torch.float32)  # (B,)
    coef = torch.tensor([it.coef for it in items], device=device, dtype=torch.float32)  # (B,)
    adv = torch.tensor([it.advantage for it in items], device=device, dtype=torch.float32)  # (B,)
    pg_mask = mask * is_pg.unsqueeze(-1)  # (B, R): policy-gradient tokens
    stats = dict.fromkeys(STAT_KEYS, 0.0)  # same keys on every process

    # The policy this update is relative to: the scored old log-probs (several updates per
    # batch), else the current policy itself, detached (ratio 1).
    has_old = settings.loss != "reinforce" and all(it.old_logprobs is not None for it in items if it.kind == "pg")
    behaviour = _stack([it.old_logprobs for it in items], R, device) if has_old else logp.detach()  # (B, R)
    loss_fn = losses.POLICY_LOSSES.get(settings.loss)
    pg_tok, clipped = loss_fn(logp, behaviour, adv, mask, settings.clip_eps_low, settings.clip_eps_high)
    if clipped is not None:
        stats["clip_frac_sum"] = float((clipped * pg_mask).sum())
    if settings.tis_cap > 0 and any(it.sample_logprobs is not None for it in items):
        has = torch.tensor([it.sample_logprobs is not None for it in items], device=device).unsqueeze(-1)  # (B, 1)
        w = losses.truncated_is_weights(
            behaviour, _stack([it.sample_logprobs for it in items], R, device), settings.tis_cap
        )
        w = torch.where(has, w, torch.ones_like(w))  # (B, R); 1 where the engine reported nothing
        pg_tok = pg_tok * w
        is_mask = pg_mask * has
        stats["is_weight_sum"] = float((w * is_mask).sum())
        stats["is_truncated_sum"] = float(((w >= settings.tis_cap) * is_mask).sum())
        stats["is_tokens"] = float(is_mask.sum())
    if settings.top_entropy_quantile < 1.0 and entropy is not None and pg_mask.any():
        keep = high_entropy_tokens(entropy.detach(), pg_mask, settings.top_entropy_quantile)  # (B, R)
        pg_tok = pg_tok * keep
        stats["entropy_kept_tokens"] = float((keep * pg_mask).sum())
    token_loss = torch.where(is_pg.unsqueeze(-1), pg_tok, losses.nll_loss(logp))  # (B, R): supervised rows get the NLL

    if kl is not None:  # IML token-KL form: those rows' NLL becomes KL(teacher || student)
        rows, kl_tok = kl
        token_loss = token_loss.clone()
        token_loss[rows, : kl_tok.shape[1]] = kl_tok

    if settings.kl_coef > 0 and any(it.ref_logprobs is not None for it in items):
        kl_ref = losses.k3_kl(logp, _stack([it.ref_logprobs for it in items], R, device))  # (B, R)
        token_loss = token_loss + settings.kl_coef * kl_ref * is_pg.unsqueeze(-1)
        stats["kl_sum"] = float((kl_ref.detach() * pg_mask).sum())

    if settings.entropy_coef > 0 and entropy is not None:  # a bonus: lower loss for a flatter policy
        token_loss = token_loss - settings.entropy_coef * entropy * is_pg.unsqueeze(-1)

    loss = losses.weighted_sum(token_loss, mask, weight * coef)
    per_row = (token_loss.detach() * mask).sum(-1) * weight  # (B,) the term's value, without its coefficient
    for kind in KINDS:
        stats[f"{kind}_loss"] = float(per_row[torch.tensor([k == kind for k in kinds], device=device)].sum())
    stats["pg_tokens"] = float(pg_mask.sum())
    stats["tokens"] = float(mask.sum())
    if entropy is not None:
        for e in range(settings.num_experts):
            rows = torch.tensor([it.kind == "pg" and it.expert == e for it in items], device=device)
            stats[f"entropy_sum/{e}"] = float((entropy.detach() * mask)[rows].sum())
            stats[f"entropy_tokens/{e}"] = float(mask[rows].sum())
    return loss, stats


STAT_KEYS = ("clip_frac_sum", "kl_sum", "is_weight_sum", "is_truncated_sum", "is_tokens", "entropy_kept_tokens")


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """1 at the masked tokens whose entropy is in the top `top_quantile` share of the masked
    tokens (at or above the (1 - q) quantile), else 0: the "forking" tokens of Wang et al.
    2025 (arXiv 2506.01939), TRL's top_entropy_quantile. (B, R), (B, R) -> (B, R).

    >>> e = torch.tensor([[0.1, 0.9, 0.5, 0.3]]); m = torch.ones(1, 4)
    >>> high_entropy_tokens(e, m, 0.5).tolist()
    [[0.0, 1.0, 1.0, 0.0]]
    """
    values = entropy[mask > 0]
    threshold = torch.quantile(values.float(), 1.0 - top_quantile)
    return ((entropy >= threshold) & (mask > 0)).float()
