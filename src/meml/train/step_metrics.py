"""Per-step RL metrics, per expert where it matters.

reward/mean, reward/<expert>          mean reward of the step's answers
correct/mean, correct/<expert>        fraction of answers the verifier accepted
zero_signal_frac, zero_signal/<e>     (draw, expert) groups whose rewards are all equal:
                                      their advantage is 0 and they teach nothing
zero_signal_frac_question             draws of a question whose pooled rewards are all equal
all_wrong_frac_question               questions with no correct answer from any expert
rescued                               questions where expert 0 had no correct answer but
                                      another expert did
iml/fired, iml/weak/<e>, iml/strong/<e>, iml/loss
hsft/pushed, hsft/pushed/<e>, hsft/buffer, hsft/flushes, hsft/loss
loss, pg_loss, kl, clip_frac, grad_norm, lr, skipped_updates
completion_len, truncated_frac, reward_failures, verifier_abstained
tokens_per_s (completion tokens / step time), gen_tokens_per_s, step_time_s, time/*
                                      (every answer the step sampled, refills included)
With rollout.dynamic.enabled (train/sampling.py), over all processes:
dynamic/rounds                        refill rounds the step ran
dynamic/extra_rollouts                answers sampled by refills, beyond the step's own
dynamic/dropped_groups                baseline groups without reward spread, left out of the
                                      policy gradient (own and refill groups)
dynamic/informative_groups            baseline groups the policy gradient used
With rollout.budget.enabled:
budget/<e>                            expert e's share of the answers per question this step
budget/success/<e>                    its success average after this step (the next split's input)
"""

from __future__ import annotations

from collections import defaultdict

import torch
from accelerate.utils import gather_object

from meml.algo.iml import is_correct


def _episode_rows(episodes, advantages) -> list[tuple]:
    """(slot, expert, reward, correct, length, finished, advantage, group) per episode."""
    return [
        (e.slot, e.expert, e.reward, is_correct(e), len(e.completion_ids), e.finished, float(a), e.group_id)
        for e, a in zip(episodes, advantages.tolist())
    ]


def rl_metrics(
    episodes, advantages, pairs, pushed, buffer, stats: dict, reward_stats, timing: dict, names: list[str], accelerator
) -> dict:
    """The step's metrics, over every process's episodes (gathered) and counts (summed)."""
    multi = accelerator.num_processes > 1
    rows = gather_object(_episode_rows(episodes, advantages)) if multi else _episode_rows(episodes, advantages)
    pair_rows = gather_object([(p.strong, p.weak) for p in pairs]) if multi else [(p.strong, p.weak) for p in pairs]
    pushed_experts = gather_object([h.expert for h in pushed]) if multi else [h.expert for h in pushed]
    counts = [reward_stats.failures, reward_stats.abstentions]
    failures, abstained = (
        accelerator.reduce(torch.tensor(counts, device=accelerator.device), "sum").tolist() if multi else counts
    )
    m: dict[str, float] = {}
    valid = [r for r in rows if r[2] is not None]
    m["reward/mean"] = sum(r[2] for r in valid) / max(1, len(valid))
    m["correct/mean"] = sum(r[3] for r in rows) / max(1, len(rows))
    groups: dict[int, list] = defaultdict(list)  # (draw, expert) groups
    questions: dict[int, list] = defaultdict(list)  # draws of a question
    for r in rows:
        groups[r[7]].append(r)
        questions[r[0]].append(r)
    zero = {k: len({x[2] for x in g if x[2] is not None}) <= 1 for k, g in groups.items()}
    m["zero_signal_frac"] = sum(zero.values()) / max(1, len(zero))
    m["zero_signal_frac_question"] = sum(
        len({x[2] for x in q if x[2] is not None}) <= 1 for q in questions.values()
    ) / max(1, len(questions))
    m["all_wrong_frac_question"] = sum(not any(x[3] for x in q) for q in questions.values()) / max(1, len(questions))
    for i, name in enumerate(names):
        mine = [r for r in valid if r[1] == i]
        m[f"reward/{name}"] = sum(r[2] for r in mine) / max(1, len(mine))
        m[f"correct/{name}"] = sum(r[3] for r in rows if r[1] == i) / max(1, sum(1 for r in rows if r[1] == i))
        z = [v for g, v in zero.items() if groups[g][0][1] == i]
        m[f"zero_signal/{name}"] = sum(z) / max(1, len(z))
        m[f"iml/weak/{name}"] = sum(1 for _, w in pair_rows if w == i)
        m[f"iml/strong/{name}"] = sum(1 for st, _ in pair_rows if st == i)
        m[f"hsft/pushed/{name}"] = sum(1 for e in pushed_experts if e == i)
    m["rescued"] = (
        sum(
            1 for q in questions.values() if not any(r[3] for r in q if r[1] == 0) and any(r[3] for r in q if r[1] != 0)
        )
        if len(names) > 1
        else 0
    )
    m["iml/fired"] = len(pair_rows)
    m["iml/loss"] = stats.get("iml_loss", 0.0)
    m["hsft/pushed"] = len(pushed_experts)
    m["hsft/buffer"] = len(buffer)
    m["hsft/flushes"] = buffer.flushes
    m["hsft/loss"] = stats.get("hsft_loss", 0.0)
    m["loss"] = stats.get("loss", 0.0)
    m["pg_loss"] = stats.get("pg_loss", 0.0)
    pg_tokens = stats.get("pg_tokens", 0.0)
    m["kl"] = stats.get("kl_sum", 0.0) / pg_tokens if pg_tokens else 0.0
    m["clip_frac"] = stats.get("clip_frac_sum", 0.0) / pg_tokens if pg_tokens else 0.0
    is_tokens = stats.get("is_tokens", 0.0)
    if is_tokens:  # the truncated IS correction was applied (algo.tis_cap > 0 and the engine reports log-probs)
        m["is/weight_mean"] = stats["is_weight_sum"] / is_tokens
        m["is/truncated_frac"] = stats["is_truncated_sum"] / is_tokens
    m["grad_norm"] = stats.get("grad_norm", 0.0)
    m["lr"] = stats.get("lr", 0.0)
    m["skipped_updates"] = stats.get("skipped", 0.0)
    lengths = [r[4] for r in rows]
    m["completion_len"] = sum(lengths) / max(1, len(lengths))
    m["truncated_frac"] = sum(1 for r in rows if not r[5]) / max(1, len(rows))
    m["reward_failures"] = failures
    m["verifier_abstained"] = abstained
    m["trained_sequences"] = sum(1 for r in rows if r[6] != 0)
    m["tokens_per_s"] = sum(lengths) / timing["step_time_s"]
    m["gen_tokens_per_s"] = sum(lengths) / max(1e-9, timing["time/generate_s"])
    m.update(timing)
    return m


def budget_metrics(sizes: list[int], rates: list[float], names: list[str]) -> dict:
    """The adaptive budget's split this step (as shares of the answers per question) and the
    success averages the next split will use."""
    total = sum(sizes)
    m = {f"budget/{name}": n / total for name, n in zip(names, sizes)}
    m.update({f"budget/success/{name}": r for name, r in zip(names, rates)})
    return m


def entropy_metrics(stats: dict, names: list[str]) -> dict:
    """entropy/<expert>: the mean per-token entropy of the policy on that expert's trained
    answers (algo.entropy.log); entropy/kept_tokens: tokens the top-entropy rule kept."""
    out = {}
    for e, name in enumerate(names):
        tokens = stats.get(f"entropy_tokens/{e}", 0.0)
        if f"entropy_sum/{e}" in stats:
            out[f"entropy/{name}"] = stats[f"entropy_sum/{e}"] / tokens if tokens else 0.0
    if stats.get("entropy_kept_tokens"):
        out["entropy/kept_tokens"] = stats["entropy_kept_tokens"]
    return out
