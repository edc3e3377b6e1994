"""The rollouts of one RL step: its questions, the answers per (draw, expert) (G, or the
adaptive budget's split), their rewards, and dynamic sampling's refill rounds
(algo/dynamic.py, algo/budget.py; docs/ALGORITHM.md).

Every draw has a global slot and every (draw, expert) samples with a seed of its own, so
what a step samples depends on (seed, step) and the weights only: not on the number of
processes, and not on whether the run was resumed. Refill rounds are planned from every
process's groups (gathered), the same way on each process; each then samples its share.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from accelerate.utils import gather_object

from meml.algo.dynamic import expert_refills, fresh_questions, group_stats
from meml.algo.iml import is_correct
from meml.algo.shaping import overlong_penalty
from meml.core.config import RolloutConfig
from meml.core.types import Episode, Example
from meml.engines.base import Engine, SamplingParams, prompt_seed
from meml.tasks.rewards import RewardStats, score_episodes
from meml.train.session import Session, global_sum


@dataclass(frozen=True)
class Draw:
    """One question drawn for a step: its position in the step's batch (over all processes),
    how many times it was drawn earlier among the step's own questions (0 almost always),
    the refill round that drew it (0: the step's own) and the experts it is sampled under."""

    slot: int
    example: Example
    repeat: int = 0
    round: int = 0
    experts: tuple[int, ...] | None = None  # None: every expert; a refill by experts names one

    def seed_parts(self) -> tuple:
        """What keys this draw's RNGs besides (run seed, step, question, expert). Nothing for
        the first draw of one of the step's own questions."""
        return ((self.repeat,) if self.repeat else ()) + (("refill", self.slot) if self.round else ())


def example_at(examples: list[Example], seed: int, position: int) -> Example:
    """The question at a position of the training order (a seeded shuffle per epoch)."""
    epoch, i = divmod(position, len(examples))
    order = list(range(len(examples)))
    random.Random(f"{seed}:questions:{epoch}").shuffle(order)
    return examples[order[i]]


def question_batch(
    examples: list[Example], seed: int, step: int, per_step: int, rank: int = 0, world: int = 1
) -> list[Draw]:
    """This process's share of the 1-based step's questions (positions (step-1) Q .. step Q - 1)."""
    start = (step - 1) * per_step
    chosen: list[Draw] = []
    for slot, pos in enumerate(range(start, start + per_step)):
        example = example_at(examples, seed, pos)
        chosen.append(Draw(slot, example, sum(d.example.id == example.id for d in chosen)))
    return chosen[rank::world]


def roll_out(
    engine: Engine,
    prompt: Callable[[Example, int], list[int]],
    draws: list[Draw],
    num_experts: int,
    cfg: RolloutConfig,
    seed: int,
    step: int,
    sizes: list[int] | None = None,
) -> list[Episode]:
    """The answers of each (draw, expert): G, or sizes[expert] (the adaptive budget). The group
    id numbers the (slot, expert) pairs."""
    pairs = [(d, e) for d in draws for e in (d.experts if d.experts is not None else range(num_experts))]
    counts = [sizes[e] if sizes is not None else cfg.num_generations_per_expert for _, e in pairs]
    prompts = [prompt(d.example, e) for d, e in pairs]
    # one seed per (question, expert, draw): samples do not depend on batching or the process count
    seeds = [prompt_seed(seed, step, d.example.id, e, *d.seed_parts()) for d, e in pairs]
    generations: list = [None] * len(pairs)
    for n in sorted(set(counts)):  # one call per group size; sample j of a prompt depends on its seed and j only
        idx = [i for i, c in enumerate(counts) if c == n]
        params = SamplingParams(n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed)
        for i, group in zip(idx, engine.generate([prompts[i] for i in idx], params, [seeds[i] for i in idx])):
            generations[i] = group
    episodes = []
    for (d, e), prompt_ids, group in zip(pairs, prompts, generations):
        for g in group:
            episodes.append(
                Episode(
                    d.example.id,
                    e,
                    d.slot * num_experts + e,
                    d.slot,
                    prompt_ids,
                    g.token_ids,
                    g.text,
                    g.finished,
                    g.logprobs,
                )
            )
    return episodes


@dataclass
class StepRollouts:
    """What `collect` sampled on this process, and the step's refill counts (all processes)."""

    draws: list[Draw] = field(default_factory=list)  # the step's own first, then refills
    episodes: list[Episode] = field(default_factory=list)
    reward_stats: RewardStats = field(default_factory=RewardStats)
    generate_s: float = 0.0
    dynamic: dict[str, float] = field(default_factory=dict)  # dynamic/* metrics, when dynamic sampling is on


def collect(s: Session, step: int, sizes: list[int] | None) -> StepRollouts:
    """The step's own rollouts, scored; with rollout.dynamic.enabled, refill rounds until the
    step holds Q N informative groups (Q with pooled baselines) or max_rounds ran out."""
    cfg, acc = s.cfg, s.accelerator
    rank, world, num_experts = acc.process_index, acc.num_processes, len(s.experts)
    per_step = cfg.train.questions_per_step
    out = StepRollouts()

    def sample(draws: list[Draw]) -> None:
        t = time.perf_counter()
        episodes = roll_out(s.engine, s.prompt, draws, num_experts, cfg.rollout, cfg.seed, step, sizes)
        out.generate_s += time.perf_counter() - t
        stats = score_episodes(
            episodes,
            s.examples_by_id,
            s.task,
            [e.name for e in s.experts],
            s.task.format_instruction,
            cfg.reward.use_verifier,
            s.reward_functions,
            cfg.reward.timeout_s,
        )
        if cfg.reward.overlong_buffer > 0:
            shape_overlong(
                episodes, cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer, cfg.reward.overlong_penalty
            )
        out.reward_stats.failures += stats.failures
        out.reward_stats.abstentions += stats.abstentions
        out.reward_stats.failed_ids += stats.failed_ids
        out.draws.extend(draws)
        out.episodes.extend(episodes)

    sample(question_batch(s.train_examples, cfg.seed, step, per_step, rank, world))
    d = cfg.rollout.dynamic
    if not d.enabled:
        return out
    pooled = cfg.algo.advantage_grouping == "question"
    per_question = 1 if pooled else num_experts  # groups a question adds
    target = per_step * per_question
    position, slot, used, rounds = step * per_step, per_step, set(), 0  # next training position and slot
    for r in range(1, d.max_rounds + 1):
        stats = group_stats(out.episodes, pooled)
        if world > 1:
            stats = sorted(gather_object(stats), key=lambda g: g.group)
        informative = sum(not g.dead for g in stats)
        if informative >= target:
            break
        plan: list[Draw] = []
        if d.refill == "experts":
            for group, source, expert in expert_refills(stats, target - informative, used):
                used.add(group)
                question = next(g.question_id for g in stats if g.slot == source)
                plan.append(Draw(slot + len(plan), s.examples_by_id[question], round=r, experts=(expert,)))
        fresh = fresh_questions(target - informative - len(plan), per_question, informative, len(stats), per_step)
        for _ in range(fresh):
            plan.append(Draw(slot + len(plan), example_at(s.train_examples, cfg.seed, position), round=r))
            position += 1
        slot += len(plan)
        sample(plan[rank::world])
        rounds = r
    final = group_stats(out.episodes, pooled)
    extra = sum(1 for e in out.episodes if e.slot >= per_step)
    dropped, kept, extra = global_sum(s, [sum(g.dead for g in final), sum(not g.dead for g in final), extra])
    out.dynamic = {
        "dynamic/rounds": rounds,
        "dynamic/extra_rollouts": int(extra),
        "dynamic/dropped_groups": int(dropped),
        "dynamic/informative_groups": int(kept),
    }
    return out


def update_budget(s: Session, episodes: list[Episode]) -> list[float]:
    """Feed the step's per-expert success (all processes) to the adaptive budget; the
    experts' success averages after the update."""
    n, b = len(s.experts), s.cfg.rollout.budget
    correct, answers = [0] * n, [0] * n
    for e in episodes:
        if e.reward is not None:
            answers[e.expert] += 1
            correct[e.expert] += is_correct(e)
    counts = global_sum(s, correct + answers)
    s.budget.update([int(c) for c in counts[:n]], [int(a) for a in counts[n:]], b.smoothing)
    return list(s.budget.rates)


def shape_overlong(episodes: list[Episode], max_new_tokens: int, buffer: int, scale: float) -> None:
    """DAPO's soft overlong punishment (algo/shaping.py) added to each scored reward; the
    breakdown keeps it as "overlong"."""
    for e in episodes:
        penalty = overlong_penalty(len(e.completion_ids), max_new_tokens, buffer, scale)
        e.reward_breakdown["overlong"] = penalty
        if e.reward is not None and penalty:
            e.reward += penalty
