"""One step of stage 2: MEML-GRPO's RIEL, or GRPO / Dr.GRPO (one expert, IML and HSFT off).

  1. take the step's questions (a seeded shuffle; each process gets its share)
  2. roll out G answers per (question, expert) under the expert's system prompt (or the
     adaptive budget's split of A answers per question), and score them with the verifier
     and any reward functions; with dynamic sampling, refill rounds sample more until the
     step holds enough groups with reward spread (train/sampling.py)
  3. update the adaptive budget's success averages, when it is on
  4. advantages: reward minus its group's mean (group: one draw of a question under one
     expert, by default); with dynamic sampling, groups without spread leave the policy
     gradient (they still feed IML and HSFT)
  5. IML: per question drawn, the strongest expert's best answer is taught to the weakest
  6. HSFT: gold solutions of groups with too many wrong answers go to the buffer; a full
     buffer adds its SFT term to this step's loss and is emptied
  7. one update on L = L_PG + lambda1 L_IML + lambda2 L_HSFT (algo/objective.py), then the
     rollout engine is synced to the new weights
A question can be drawn twice in one step (an epoch boundary, a small dataset): each draw
is its own slot, with its own groups, samples and pushes. docs/ALGORITHM.md has the
details and every decision beyond the paper.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import torch
from accelerate.utils import gather_object

from meml.algo import objective
from meml.algo.advantages import ADVANTAGE_ESTIMATORS, group_index, group_keys
from meml.algo.budget import hsft_max_wrong
from meml.algo.dynamic import informative_mask
from meml.algo.hsft import HardExample, push_probability, should_push
from meml.algo.iml import IMLPair, is_correct, select_pair
from meml.algo.objective import LossSettings
from meml.core.config import Config
from meml.core.types import Episode, Example, Expert
from meml.tasks.experts import response_ids
from meml.train.forward import score_logprobs
from meml.train.sampling import Draw, collect, question_batch, roll_out, update_budget
from meml.train.session import Session, global_sum, sync_rollout_weights
from meml.train.step_metrics import budget_metrics, entropy_metrics, rl_metrics
from meml.train.update import Learner, optimizer_step

__all__ = ["Draw", "question_batch", "rl_step", "roll_out"]  # Draw, question_batch, roll_out live in train/sampling.py


def rl_step(s: Session, step: int, learner: Learner, reference) -> dict:
    cfg = s.cfg
    t0 = time.perf_counter()
    b = cfg.rollout.budget
    sizes = s.budget.split(b.answers_per_question, b.min_per_expert, b.temperature, b.scale) if s.budget else None
    rollouts = collect(s, step, sizes)  # this process's draws and scored episodes, refill rounds included
    draws, episodes, reward_stats = rollouts.draws, rollouts.episodes, rollouts.reward_stats
    s.counters["reward_failures"] += reward_stats.failures
    rates = update_budget(s, episodes) if s.budget else None
    rewards = torch.tensor([float("nan") if e.reward is None else e.reward for e in episodes])  # (N,)
    keys = group_keys(episodes, cfg.algo.advantage_grouping)
    estimator = ADVANTAGE_ESTIMATORS.get(cfg.algo.advantage_estimator)
    advantages = estimator(rewards, group_index(keys), cfg.algo.std_normalize, cfg.algo.positive_only)  # (N,)
    by_slot = episodes_by_slot(episodes)
    pairs = (
        [p for eps in by_slot.values() if (p := select_pair(eps, len(s.experts), cfg.algo.iml.answer_choice))]
        if cfg.algo.iml.enabled
        else []
    )
    pushed = []
    if cfg.algo.hsft.enabled:
        pushed = hard_examples(
            draws, by_slot, s.experts, cfg, step, lambda ex, e, eps: gold_response(s, ex, e, eps), s.prompt
        )
        for item in gather_object(pushed) if s.accelerator.num_processes > 1 else pushed:
            s.buffer.push(item)
    flushed = s.buffer.flush()[s.accelerator.process_index :: s.accelerator.num_processes] if s.buffer.ready() else []
    pg_episodes, pg_advantages = episodes, advantages
    if cfg.rollout.dynamic.enabled:  # groups without reward spread leave the policy gradient (and its normaliser)
        live = informative_mask(episodes, keys)
        pg_episodes = [e for e, keep in zip(episodes, live) if keep]
        pg_advantages = advantages[torch.tensor(live, dtype=torch.bool)]
    num_draws = sum(d.experts is None for d in draws)  # draws under every expert: where IML can fire
    t_score = time.perf_counter()
    stats = update_policy(s, learner, pg_episodes, pg_advantages, pairs, flushed, reference, step, num_draws)
    sync_rollout_weights(s)
    t_end = time.perf_counter()
    if cfg.log.samples_every and step % cfg.log.samples_every == 0:
        log_samples(s, episodes, step)
    timing = {
        "step_time_s": t_end - t0,
        "time/generate_s": rollouts.generate_s,
        "time/score_s": t_score - t0 - rollouts.generate_s,
        "time/update_s": t_end - t_score,
    }
    names = [e.name for e in s.experts]
    metrics = rl_metrics(
        episodes, advantages, pairs, pushed, s.buffer, stats, reward_stats, timing, names, s.accelerator
    )
    metrics.update(rollouts.dynamic)
    metrics.update(entropy_metrics(stats, names))
    if cfg.reward.overlong_buffer > 0:
        total, count = global_sum(s, [sum(e.reward_breakdown.get("overlong", 0.0) for e in episodes), len(episodes)])
        metrics["reward/overlong"] = total / max(1.0, count)
    if sizes is not None:
        metrics.update(budget_metrics(sizes, rates, names))
    return metrics


def episodes_by_slot(episodes: list[Episode]) -> dict[int, list[Episode]]:
    out: dict[int, list[Episode]] = {}
    for e in episodes:
        out.setdefault(e.slot, []).append(e)
    return out


def hard_examples(
    draws: list[Draw],
    by_slot: dict[int, list[Episode]],
    experts: list[Expert],
    cfg: Config,
    step: int,
    gold: Callable[[Example, int, list[Episode]], list[int] | None],
    prompt: Callable[[Example, int], list[int]],
) -> list[HardExample]:
    """Gold solutions of the (draw, expert) groups with more than K of G answers wrong (a group
    of n answers: more than K n / G, algo/budget.py), each pushed with probability p
    (algo/hsft.py); the draws come from an RNG keyed by the question and expert, so they do not
    depend on the process count."""
    h, G = cfg.algo.hsft, cfg.rollout.num_generations_per_expert
    p = push_probability(h.max_wrong, G, h.push_prob)
    pushed = []
    for d in draws:
        eps = by_slot[d.slot]
        for e in d.experts if d.experts is not None else range(len(experts)):
            rng = random.Random(f"{cfg.seed}:hsft:{step}:{d.example.id}:{e}" + "".join(f":{x}" for x in d.seed_parts()))
            size = sum(1 for x in eps if x.expert == e)
            wrong = sum(1 for x in eps if x.expert == e and x.reward is not None and not is_correct(x))
            if not should_push(wrong, size, hsft_max_wrong(h.max_wrong, G, size), p, rng):
                continue
            response = gold(d.example, e, eps)
            if response is not None:
                pushed.append(HardExample(d.example.id, e, prompt(d.example, e), response))
    return pushed


def gold_response(s: Session, q: Example, expert: int, episodes: list[Episode]) -> list[int] | None:
    """O_gt: the gold solution in the expert's own trace style, else the dataset's first style,
    else the shortest verified answer of another expert this step, else None."""
    style = s.experts[expert].trace_source
    text = q.rationales.get(style) or next((q.rationales[k] for k in s.task.styles if k in q.rationales), None)
    if text:
        return response_ids(s.tokenizer, text)
    correct = [e for e in episodes if e.expert != expert and is_correct(e)]
    return min(correct, key=lambda e: len(e.completion_ids)).completion_ids if correct else None


def update_policy(
    s: Session,
    learner: Learner,
    episodes: list[Episode],
    advantages: torch.Tensor,
    pairs: list[IMLPair],
    hard: list[HardExample],
    reference,
    step: int,
    num_draws: int,
) -> dict:
    """L = L_PG + lambda1 L_IML + lambda2 L_HSFT; PPO epochs/mini-batches when configured.

    IML and HSFT terms join the first optimizer step of the batch only.
    """
    a, cfg = s.cfg.algo, s.cfg
    settings = LossSettings(
        a.loss,
        a.clip_eps_low,
        a.clip_eps_high,
        a.kl_coef,
        a.tis_cap,
        a.entropy.coef,
        a.entropy.top_quantile,
        num_experts=len(s.experts) if a.entropy.log else 0,
    )
    order = objective.trained_indices(episodes, range(len(episodes)), a.mask_truncated)
    if a.mini_batches > 1:
        random.Random(f"{cfg.seed}:minibatch:{step}").shuffle(order)
    chunks = [order[c :: a.mini_batches] for c in range(a.mini_batches)]
    pg = []
    for chunk in chunks:
        lengths = sum(len(episodes[i].completion_ids) for i in chunk)
        n_global, tokens_global = global_sum(s, [len(chunk), float(lengths)])
        pg.append(
            objective.policy_items(
                episodes,
                advantages,
                chunk,
                a.aggregation,
                cfg.rollout.max_new_tokens,
                int(n_global),
                tokens_global,
                drop_zero=a.kl_coef == 0,
            )
        )
    flat = [it for chunk in pg for it in chunk]
    pad, budget, autocast = s.tokenizer.pad_token_id, cfg.train.micro_batch_tokens, s.accelerator.autocast
    chunk = cfg.train.logit_chunk_tokens
    if a.loss != "reinforce" and (a.ppo_epochs > 1 or a.mini_batches > 1):  # the ratio's denominator
        score_logprobs(s.policy, flat, budget, pad, autocast, "old_logprobs", chunk)
    if reference is not None:
        score_logprobs(reference, flat, budget, pad, autocast, "ref_logprobs", chunk)
    extra = iml_items(s, pairs, num_draws) + hsft_items(s, hard)
    totals: dict[str, float] = {}
    updates = 0
    for epoch in range(a.ppo_epochs):
        for c, chunk_items in enumerate(pg):
            items = chunk_items + (extra if epoch == 0 and c == 0 else [])
            stats = optimizer_step(learner, items, settings)
            updates += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    once = ("iml_loss", "hsft_loss", "skipped")  # added once (in the first update) or counted, not averaged
    averaged = {k: v / updates for k, v in totals.items() if k not in once}
    averaged.update({k: totals.get(k, 0.0) for k in once})
    return averaged


def iml_items(s: Session, pairs: list[IMLPair], num_draws: int) -> list[objective.TrainItem]:
    c = s.cfg.algo.iml
    n_draws, n_fired = global_sum(s, [num_draws, len(pairs)])
    if not pairs:
        return []
    examples = [s.examples_by_id[p.question_id] for p in pairs]
    weak = [s.prompt(q, p.weak) for q, p in zip(examples, pairs)]
    teachers = [s.prompt(q, p.strong) if c.form == "kl" else None for q, p in zip(examples, pairs)]
    return objective.iml_items(pairs, weak, teachers, c.weight, n_draws if c.normalize == "batch" else n_fired)


def hsft_items(s: Session, hard: list[HardExample]) -> list[objective.TrainItem]:
    (n_global,) = global_sum(s, [len(hard)])
    return objective.hsft_items(hard, s.cfg.algo.hsft.weight, n_global)


def log_samples(s: Session, episodes: list[Episode], step: int) -> None:
    if not s.is_main:
        return
    picked = episodes[:: max(1, len(episodes) // 4)][:4]
    with (s.run_dir / "samples.jsonl").open("a") as f:
        for e in picked:
            rec = {
                "step": step,
                "question_id": e.question_id,
                "expert": s.experts[e.expert].name,
                "reward": e.reward,
                "completion": e.completion,
            }
            f.write(json.dumps(rec) + "\n")
            s.logger.log_text(f"samples/{s.experts[e.expert].name}", e.completion, step)
