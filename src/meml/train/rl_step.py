"""One step of stage 2 (RIEL; GRPO / Dr.GRPO when there is one expert and IML/HSFT are off).

  1. take the step's questions (a seeded shuffle; each process gets its share)
  2. roll out G answers per (question, expert) under the expert's system prompt
  3. score them with the verifier and any reward functions
  4. advantages: reward minus its group's mean (group = (question, expert) by default)
  5. IML: per question, the strongest expert's best answer is taught to the weakest
  6. HSFT: gold solutions of questions an expert failed go to the buffer; a full buffer
     adds an SFT term to this step's loss and is emptied
  7. one update on L = L_PG + lambda1 * L_IML + lambda2 * L_SFT, then the rollout engine
     is synced to the new weights
docs/ALGORITHM.md has the details and every decision beyond the paper.
"""

from __future__ import annotations

import json
import random
import time

import torch
from accelerate.utils import gather_object

from meml.algo.advantages import group_advantages, group_index, group_keys
from meml.algo.hsft import HardExample, should_push
from meml.algo.iml import IMLPair, is_correct, select_pair
from meml.algo.losses import sequence_weights
from meml.core.types import Episode, Example
from meml.engines.base import SamplingParams, prompt_seed
from meml.tasks.experts import response_ids
from meml.tasks.rewards import score_episodes
from meml.train.session import Session, global_sum, sync_rollout_weights
from meml.train.step_metrics import rl_metrics
from meml.train.update import LossSettings, TrainItem, optimizer_step, score_logprobs


def rl_step(s: Session, step: int, optimizer, scheduler, reference) -> dict:
    cfg = s.cfg
    t0 = time.perf_counter()
    questions = question_batch(s, step)
    episodes = roll_out(s, questions, step)
    t_gen = time.perf_counter()
    reward_stats = score_episodes(episodes, s.examples_by_id, s.task, [e.name for e in s.experts],
                                  s.task.format_instruction, cfg.reward.use_verifier, s.reward_functions, cfg.reward.timeout_s)
    s.counters["reward_failures"] += reward_stats.failures
    rewards = torch.tensor([float("nan") if e.reward is None else e.reward for e in episodes])  # (N,)
    groups = group_index(group_keys(episodes, cfg.algo.advantage_grouping))  # (N,)
    advantages = group_advantages(rewards, groups, cfg.algo.std_normalize, cfg.algo.positive_only)  # (N,)
    by_question = _by_question(episodes)
    pairs = [p for eps in by_question.values() if (p := select_pair(eps, len(s.experts), cfg.algo.iml.answer_choice))] if cfg.algo.iml.enabled else []
    pushed = push_hard_examples(s, questions, by_question, step) if cfg.algo.hsft.enabled else []
    flushed = _flush_buffer(s)
    t_score = time.perf_counter()
    stats = update_policy(s, optimizer, scheduler, episodes, advantages, pairs, flushed, reference, step)
    sync_rollout_weights(s)
    t_end = time.perf_counter()
    if cfg.log.samples_every and step % cfg.log.samples_every == 0:
        log_samples(s, episodes, step)
    timing = {"step_time_s": t_end - t0, "time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen, "time/update_s": t_end - t_score}
    return rl_metrics(s, episodes, advantages, pairs, pushed, flushed, stats, reward_stats, timing)


def question_batch(s: Session, step: int) -> list[Example]:
    """This process's share of the 1-based step's questions (a seeded shuffle per epoch)."""
    per_step = s.cfg.train.questions_per_step
    n = len(s.train_examples)
    start = (step - 1) * per_step
    chosen = []
    for pos in range(start, start + per_step):
        epoch, i = divmod(pos, n)
        order = list(range(n))
        random.Random(f"{s.cfg.seed}:questions:{epoch}").shuffle(order)
        chosen.append(s.train_examples[order[i]])
    return chosen[s.accelerator.process_index :: s.accelerator.num_processes]


def roll_out(s: Session, questions: list[Example], step: int) -> list[Episode]:
    """G answers per (question, expert); group ids number the (question, expert) pairs."""
    cfg = s.cfg.rollout
    pairs = [(q, e) for q in questions for e in range(len(s.experts))]
    prompts = [s.prompt(q, e) for q, e in pairs]
    params = SamplingParams(cfg.num_generations_per_expert, cfg.temperature, cfg.top_p, cfg.max_new_tokens, s.cfg.seed)
    # one seed per (question, expert): samples do not depend on batching or the process count
    seeds = [prompt_seed(s.cfg.seed, step, q.id, e) for q, e in pairs]
    generations = s.engine.generate(prompts, params, seeds)
    episodes = []
    for group_id, ((q, e), prompt, group) in enumerate(zip(pairs, prompts, generations)):
        for g in group:
            episodes.append(Episode(q.id, e, group_id, prompt, g.token_ids, g.text, g.finished, g.logprobs))
    return episodes


def _by_question(episodes: list[Episode]) -> dict[str, list[Episode]]:
    out: dict[str, list[Episode]] = {}
    for e in episodes:
        out.setdefault(e.question_id, []).append(e)
    return out


def push_hard_examples(s: Session, questions: list[Example], by_question: dict[str, list[Episode]], step: int) -> list[HardExample]:
    """Push gold solutions of (question, expert) groups with more than K wrong answers."""
    h = s.cfg.algo.hsft
    G = s.cfg.rollout.num_generations_per_expert
    pushed = []
    for q in questions:
        eps = by_question[q.id]
        for e in range(len(s.experts)):
            rng = random.Random(f"{s.cfg.seed}:hsft:{step}:{q.id}:{e}")  # independent of the process count
            group = [x for x in eps if x.expert == e]
            wrong = sum(1 for x in group if x.reward is not None and not is_correct(x))
            if not should_push(wrong, G, h.max_wrong, h.push_prob, rng):
                continue
            response = gold_response(s, q, e, eps)
            if response is not None:
                pushed.append(HardExample(q.id, e, s.prompt(q, e), response))
    everyone = gather_object(pushed) if s.accelerator.num_processes > 1 else pushed
    for item in everyone:
        s.buffer.push(item)
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


def _flush_buffer(s: Session) -> list[HardExample]:
    if not s.buffer.ready():
        return []
    items = s.buffer.flush()
    return items[s.accelerator.process_index :: s.accelerator.num_processes]


def update_policy(s: Session, optimizer, scheduler, episodes, advantages, pairs: list[IMLPair], hard: list[HardExample], reference, step: int) -> dict:
    """L = L_PG + lambda1 L_IML + lambda2 L_SFT; PPO epochs/mini-batches when configured.

    IML and HSFT terms join the first optimizer step of the batch only.
    """
    a = s.cfg.algo
    settings = LossSettings(a.loss, a.clip_eps_low, a.clip_eps_high, a.kl_coef, a.tis_cap)
    order = list(range(len(episodes)))
    if a.mini_batches > 1:
        random.Random(f"{s.cfg.seed}:minibatch:{step}").shuffle(order)
    chunks = [order[c :: a.mini_batches] for c in range(a.mini_batches)]
    pg = [policy_items(s, episodes, advantages, chunk, drop_zero=a.kl_coef == 0) for chunk in chunks]
    flat = [it for chunk in pg for it in chunk]
    if a.loss == "ppo_clip" and (a.ppo_epochs > 1 or a.mini_batches > 1):
        score_logprobs(s.policy, flat, s.cfg.train.micro_batch_tokens, s.tokenizer.pad_token_id, s.accelerator.autocast, "old_logprobs")
    if reference is not None:
        score_logprobs(reference, flat, s.cfg.train.micro_batch_tokens, s.tokenizer.pad_token_id, s.accelerator.autocast, "ref_logprobs")
    extra = iml_items(s, pairs, len({e.question_id for e in episodes})) + hsft_items(s, hard)
    totals: dict[str, float] = {}
    updates = 0
    for epoch in range(a.ppo_epochs):
        for c, chunk_items in enumerate(pg):
            items = chunk_items + (extra if epoch == 0 and c == 0 else [])
            stats = optimizer_step(s, optimizer, scheduler, items, settings)
            updates += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    averaged = {k: v / updates for k, v in totals.items() if k not in ("iml_loss", "sft_loss")}
    averaged["iml_loss"] = totals.get("iml_loss", 0.0)  # added once, in the first update
    averaged["sft_loss"] = totals.get("sft_loss", 0.0)
    averaged["skipped"] = totals.get("skipped", 0.0)
    return averaged


def policy_items(s: Session, episodes: list[Episode], advantages: torch.Tensor, idx: list[int], drop_zero: bool) -> list[TrainItem]:
    """Policy-gradient items; the aggregation normaliser counts every sequence of the batch,
    but sequences with zero advantage (and no KL term) carry no gradient and are skipped."""
    lengths = torch.tensor([len(episodes[i].completion_ids) for i in idx])
    n_global, tok_global = global_sum(s, [len(idx), float(lengths.sum())])
    weights = sequence_weights(lengths, s.cfg.algo.aggregation, s.cfg.rollout.max_new_tokens, int(n_global), int(tok_global))
    items = [TrainItem("pg", episodes[i].prompt_ids, episodes[i].completion_ids, weight=float(w), advantage=float(advantages[i]),
                       sample_logprobs=None if episodes[i].sample_logprobs is None else torch.tensor(episodes[i].sample_logprobs))
             for i, w in zip(idx, weights)]
    return [it for it in items if it.advantage != 0 and it.response_ids] if drop_zero else [it for it in items if it.response_ids]


def iml_items(s: Session, pairs: list[IMLPair], num_questions: int) -> list[TrainItem]:
    """-(1/|O+|) sum_t log p(O+_t | P_E-, q, O+_<t), averaged over the batch's questions (or the fired ones)."""
    c = s.cfg.algo.iml
    n_questions, n_fired = global_sum(s, [num_questions, len(pairs)])
    if not pairs:
        return []
    norm = n_questions if c.normalize == "batch" else n_fired
    items = []
    for p in pairs:
        q = s.examples_by_id[p.question_id]
        teacher = s.prompt(q, p.strong) if c.form == "kl" else None
        resp = p.answer.completion_ids
        items.append(TrainItem("iml", s.prompt(q, p.weak), resp, weight=1.0 / (len(resp) * norm), coef=c.weight, teacher_prompt_ids=teacher))
    return items


def hsft_items(s: Session, hard: list[HardExample]) -> list[TrainItem]:
    """lambda2 * mean over buffer items of their token-mean NLL."""
    (n_global,) = global_sum(s, [len(hard)])
    return [TrainItem("sft", h.prompt_ids, h.response_ids, weight=1.0 / (len(h.response_ids) * n_global), coef=s.cfg.algo.hsft.weight) for h in hard]


def log_samples(s: Session, episodes: list[Episode], step: int) -> None:
    if not s.is_main:
        return
    picked = episodes[:: max(1, len(episodes) // 4)][:4]
    with (s.run_dir / "samples.jsonl").open("a") as f:
        for e in picked:
            rec = {"step": step, "question_id": e.question_id, "expert": s.experts[e.expert].name, "reward": e.reward, "completion": e.completion}
            f.write(json.dumps(rec) + "\n")
            s.logger.log_text(f"samples/{s.experts[e.expert].name}", e.completion, step)


