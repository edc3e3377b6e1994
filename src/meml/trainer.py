"""The training loop: stage 1 (MEF) then stage 2 (RIEL, or GRPO / Dr.GRPO with one expert).

    meml train [preset] [key=value ...]

One RL step, as in docs/ALGORITHM.md:
  1. take the step's questions (a seeded shuffle; each process gets its share)
  2. roll out G answers per (question, expert) under the expert's system prompt
  3. score them with the verifier and any reward functions
  4. advantages: reward minus its group's mean (group = (question, expert) by default)
  5. IML: per question, the strongest expert's best answer is taught to the weakest
  6. HSFT: gold solutions of questions an expert failed go to the buffer; a full buffer
     adds an SFT term to this step's loss and is emptied
  7. one update on L = L_PG + lambda1 * L_IML + lambda2 * L_SFT; the rollout engine is
     synced to the new weights
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from meml import checkpoint as ckpt
from meml import sft as mef
from meml.advantages import group_advantages, group_index, group_keys
from meml.config import Config, to_yaml
from meml.evaluation import greedy_eval, records_as_dicts
from meml.experts import response_ids
from meml.hsft import HardExample, should_push
from meml.iml import IMLPair, is_correct, select_pair
from meml.logger import console_line
from meml.losses import sequence_weights
from meml.metrics_rl import rl_metrics
from meml.model import frozen_copy
from meml.rewards.functions import score_episodes
from meml.rollout import SamplingParams
from meml.session import (
    Session,
    attach_model,
    make_optimizer,
    open_session,
    rng_state,
    set_rng_state,
)
from meml.types import Episode, Example
from meml.update import LossSettings, NonFiniteError, TrainItem, optimizer_step, score_logprobs

log = logging.getLogger("meml")


class StopRequested(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the step."""


# ----------------------------------------------------------------------------- entry point


def train(cfg: Config, preset: str | None = None) -> dict:
    """Run the configured stages; returns held-out accuracy before and after."""
    s = open_session(cfg, preset, load_model=False)  # config, data and rewards checked first
    resume = find_resume_checkpoint(cfg, s.run_dir)
    manifest = ckpt.read_manifest(resume) if resume else None
    attach_model(s, source=str(resume / "model") if resume and not cfg.model.lora.enabled else None)
    if resume and cfg.model.lora.enabled:
        load_adapter(s, resume / "model")
    install_signal_handlers(s)
    results: dict = {}
    if s.is_main:
        log.info("run directory: %s\n%s", s.run_dir, to_yaml(cfg))
    if cfg.eval.before and not resume:
        results["before"] = evaluate(s, "before", step=0)
    try:
        stage, step = (manifest["stage"], manifest["step"]) if manifest else (None, 0)
        if cfg.sft.enabled and stage in (None, "sft"):
            run_mef(s, start_step=step if stage == "sft" else 0, state=_state(resume) if stage == "sft" else None)
        if cfg.train.steps > 0:
            run_rl(s, start_step=step if stage == "rl" else 0, state=_state(resume) if stage == "rl" else None)
    except StopRequested:
        log.warning("stopped on request; resume with checkpoint.resume=auto output_dir=%s", s.run_dir)
        s.logger.close()
        return results
    if cfg.eval.after:
        results["after"] = evaluate(s, "after", step=cfg.train.steps)
    if s.is_main:
        report_accuracy(results)
        (s.run_dir / "results.json").write_text(json.dumps(results, indent=1))
    s.logger.close()
    return results


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        if not cfg.output_dir:
            raise ValueError("checkpoint.resume=auto needs output_dir=<the run directory to resume>")
        found = ckpt.find_latest(run_dir)
        if found is None:
            log.info("checkpoint.resume=auto: no valid checkpoint in %s, starting fresh", run_dir)
        return found
    path = Path(cfg.checkpoint.resume)
    reason = ckpt.validate_checkpoint(path)
    if reason:
        raise ValueError(f"checkpoint.resume={path}: not a valid checkpoint ({reason})")
    return path


def _state(path: Path | None) -> dict | None:
    return ckpt.load_trainer_state(path) if path else None


def load_adapter(s: Session, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(s.unwrapped, load_file(str(path / "adapter_model.safetensors")))
    s.engine.sync_weights(s.unwrapped)


def install_signal_handlers(s: Session) -> None:
    def request_stop(signum, _frame):
        if s.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received signal %d: finishing this step, saving a checkpoint, then exiting", signum)
        s.stop_requested = True

    try:
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread (e.g. under some test runners)
        pass


# ----------------------------------------------------------------------------- stages


def run_mef(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 1: SFT on every expert's traces."""
    cfg = s.cfg
    keys = mef.trace_keys(s)
    total = mef.total_steps(s)
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.sft.lr, cfg, total)
    if state:
        restore(s, state, optimizer, scheduler)
    if s.is_main:
        log.info("stage 1 (MEF): %d traces, %d steps; traces per expert: %s", len(keys), total, s.trace_report)

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        batch = mef.batch_keys(keys, step - 1, cfg.sft.batch_size, cfg.seed)
        local = batch[s.accelerator.process_index :: s.accelerator.num_processes]
        tokens = sum(len(response_ids(s.tokenizer, s.traces[k])) for k in local)
        global_tokens = int(_global_sum(s, [tokens])[0])
        stats = optimizer_step(s, optimizer, scheduler, mef.sft_items(s, local, global_tokens), LossSettings())
        dt = time.perf_counter() - t0
        return {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": stats["lr"], "skipped": stats["skipped"],
                "tokens": global_tokens, "tokens_per_s": global_tokens / dt, "step_time_s": dt}

    run_stage(s, "sft", start_step, total, step_fn, optimizer, scheduler)


def run_rl(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 2: RIEL (or GRPO / Dr.GRPO when there is one expert and IML/HSFT are off)."""
    cfg = s.cfg
    world = s.accelerator.num_processes
    if cfg.train.questions_per_step % world:
        raise ValueError(f"train.questions_per_step={cfg.train.questions_per_step} must be divisible by the {world} processes")
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.optim.lr, cfg, cfg.train.steps)
    if state:
        restore(s, state, optimizer, scheduler)
    reference = frozen_copy(s.unwrapped) if cfg.algo.kl_coef > 0 else None  # only when the KL term is on
    if s.is_main:
        log.info("stage 2 (RL): %d steps x %d questions x %d experts x %d answers", cfg.train.steps,
                 cfg.train.questions_per_step, len(s.experts), cfg.rollout.num_generations_per_expert)
    run_stage(s, "rl", start_step, cfg.train.steps, lambda step: rl_step(s, step, optimizer, scheduler, reference), optimizer, scheduler)


def run_stage(s: Session, stage: str, start_step: int, total: int, step_fn, optimizer, scheduler) -> None:
    """Steps start_step+1..total with logging, periodic eval, checkpoints and signals."""
    cfg = s.cfg
    s.logger.truncate_after(stage, start_step)
    bar = tqdm(range(start_step + 1, total + 1), desc=f"{stage}", disable=not (cfg.log.progress and s.is_main), initial=start_step, total=total)
    for step in bar:
        record = {"stage": stage, "step": step, **step_fn(step)}
        if s.is_main:
            s.logger.log(record)
            bar.set_postfix_str(console_line(record).split(" | ", 1)[-1])
            log.info(console_line(record))
        if stage == "rl" and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != total:
            evaluate(s, f"step{step}", step)
        bad = s.counters["bad_streak"] >= cfg.train.max_bad_steps
        due = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if due or step == total or s.stop_requested or bad:
            save(s, stage, step, optimizer, scheduler)
        if bad:
            raise NonFiniteError(
                f"{cfg.train.max_bad_steps} updates in a row had a non-finite loss or gradient (stage {stage}, step {step}); "
                f"the last good weights are saved in {s.run_dir / 'checkpoints'}. Lower the learning rate or check the data."
            )
        if s.stop_requested:
            raise StopRequested(stage)


def save(s: Session, stage: str, step: int, optimizer, scheduler) -> None:
    state = {"stage": stage, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "buffer": s.buffer.state_dict(), "counters": dict(s.counters)}
    s.accelerator.wait_for_everyone()
    if s.is_main:
        path = ckpt.save_checkpoint(s.run_dir, stage, step, s.unwrapped, s.tokenizer, state, to_yaml(s.cfg), s.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)
    s.accelerator.wait_for_everyone()


def restore(s: Session, state: dict, optimizer, scheduler) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    s.buffer.load_state_dict(state["buffer"])
    s.counters.update(state["counters"])


# ----------------------------------------------------------------------------- one RL step


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
    s.engine.sync_weights(s.unwrapped)
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
    seed = s.cfg.seed * 1_000_003 + step * 7919 + s.accelerator.process_index
    params = SamplingParams(cfg.num_generations_per_expert, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed)
    generations = s.engine.generate(prompts, params)
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
    rng = random.Random(f"{s.cfg.seed}:hsft:{step}:{s.accelerator.process_index}")
    pushed = []
    for q in questions:
        eps = by_question[q.id]
        for e in range(len(s.experts)):
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


def _global_sum(s: Session, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=s.accelerator.device)
    if s.accelerator.num_processes > 1:
        t = s.accelerator.reduce(t, reduction="sum")
    return t.tolist()


def update_policy(s: Session, optimizer, scheduler, episodes, advantages, pairs: list[IMLPair], hard: list[HardExample], reference, step: int) -> dict:
    """L = L_PG + lambda1 L_IML + lambda2 L_SFT; PPO epochs/mini-batches when configured.

    IML and HSFT terms join the first optimizer step of the batch only.
    """
    a = s.cfg.algo
    settings = LossSettings(a.loss, a.clip_eps_low, a.clip_eps_high, a.kl_coef)
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
    n_global, tok_global = _global_sum(s, [len(idx), float(lengths.sum())])
    weights = sequence_weights(lengths, s.cfg.algo.aggregation, s.cfg.rollout.max_new_tokens, int(n_global), int(tok_global))
    items = [TrainItem("pg", episodes[i].prompt_ids, episodes[i].completion_ids, weight=float(w), advantage=float(advantages[i]))
             for i, w in zip(idx, weights)]
    return [it for it in items if it.advantage != 0 and it.response_ids] if drop_zero else [it for it in items if it.response_ids]


def iml_items(s: Session, pairs: list[IMLPair], num_questions: int) -> list[TrainItem]:
    """-(1/|O+|) sum_t log p(O+_t | P_E-, q, O+_<t), averaged over the batch's questions (or the fired ones)."""
    c = s.cfg.algo.iml
    n_questions, n_fired = _global_sum(s, [num_questions, len(pairs)])
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
    (n_global,) = _global_sum(s, [len(hard)])
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


# ----------------------------------------------------------------------------- evaluation


def evaluate(s: Session, tag: str, step: int) -> dict:
    """Greedy accuracy per expert on the held-out split (main process), logged and saved.

    With eval.samples > 0 also pass@k, compute-matched coverage and zero-signal estimates.
    Records go to <run>/eval/<tag>.jsonl, one line per question.
    """
    summary: dict = {}
    if s.is_main:
        t0 = time.perf_counter()
        summary, records = greedy_eval(s, s.eval_examples, s.cfg.eval.max_new_tokens, samples=s.cfg.eval.samples)
        summary["eval_time_s"] = time.perf_counter() - t0
        s.logger.log({"stage": "eval", "tag": tag, "step": step, **summary})
        path = s.run_dir / "eval" / f"{tag}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records_as_dicts(records)))
        log.info("eval %s: %s", tag, ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("acc/")))
    s.accelerator.wait_for_everyone()
    return summary


def report_accuracy(results: dict) -> None:
    if not results:
        return
    keys = sorted({k for r in results.values() for k in r if k.startswith("acc/")})
    lines = ["held-out greedy accuracy:", f"  {'':16s}" + "".join(f"{tag:>10s}" for tag in results)]
    for k in keys:
        lines.append(f"  {k:16s}" + "".join(f"{results[tag].get(k, float('nan')):10.3f}" for tag in results))
    print("\n".join(lines), flush=True)
