"""One optimizer step on training items: forward and backward in micro-batches, then the step.

The loss is algo/objective.py's; this module runs the passes (train/forward.py) and the
optimizer, and keeps a non-finite loss or gradient from touching the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from meml.algo import losses, objective
from meml.algo.objective import LossSettings, TrainItem
from meml.train.forward import Collated, collate, micro_batches, response_logits, token_stats

log = logging.getLogger("meml")


@dataclass
class Learner:
    """What an update needs: the policy as prepared by accelerate, its optimizer and schedule,
    and how to batch. `counters` is the run's (bad_streak, skipped_updates), checkpointed."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: object
    pad_id: int
    micro_batch_tokens: int
    grad_clip: float  # max global grad norm; 0: no clipping
    counters: dict
    max_bad_steps: int  # for the warning; the loop stops the run
    chunk_tokens: int = 0  # positions whose logits exist at once in the loss (train.logit_chunk_tokens); 0: all


def micro_batch_loss(
    model, items: list[TrainItem], batch: Collated, settings: LossSettings, autocast, pad_id: int, chunk_tokens: int = 0
) -> tuple[torch.Tensor, dict]:
    """The forward passes of one micro-batch, then algo/objective.py's loss on their per-token
    log-probs (computed `chunk_tokens` positions at a time: train/forward.py)."""
    with autocast():
        stats = token_stats(model, batch, chunk_tokens, entropy=settings.needs_entropy)
        kl = None
        rows = [b for b, it in enumerate(items) if it.teacher_prompt_ids is not None]
        if rows:  # IML token-KL form: the strong expert's distribution over the same tokens
            teacher_batch = collate(
                [items[b].teacher_prompt_ids for b in rows],
                [items[b].response_ids for b in rows],
                pad_id,
                batch.targets.device,
            )
            with torch.no_grad():
                teacher = response_logits(model, teacher_batch)  # (b, R', V)
            width = teacher_batch.response_width
            kl = (rows, losses.distribution_kl(teacher, stats.row_logits(rows, width)))  # (b, R')
    return objective.micro_batch_loss(items, stats.logp, batch.mask, settings, stats.entropy, kl)


def accumulate_gradients(
    model,
    items: list[TrainItem],
    settings: LossSettings,
    token_budget: int,
    pad_id: int,
    accelerator,
    chunk_tokens: int = 0,
) -> dict:
    """Forward and backward every item in micro-batches; gradients add up in `.grad`.

    All ranks run the same number of micro-batches (padding with zero-weight copies), as
    FSDP and DDP need matching collective calls.
    """
    device = accelerator.device
    groups = micro_batches(items, token_budget)
    count = torch.tensor([len(groups)], device=device)
    target = int(accelerator.gather(count).max()) if accelerator.num_processes > 1 else len(groups)
    while len(groups) < target:
        groups.append([])
    totals: dict[str, float] = defaultdict(float)
    for n, idx in enumerate(groups):
        batch_items = [items[i] for i in idx] or [_dummy(items)]
        batch = collate([it.prompt_ids for it in batch_items], [it.response_ids for it in batch_items], pad_id, device)
        last = n == len(groups) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            loss, stats = micro_batch_loss(
                model, batch_items, batch, settings, accelerator.autocast, pad_id, chunk_tokens
            )
            # DDP averages gradients over ranks; the weights already hold global normalisers.
            accelerator.backward(loss * accelerator.num_processes)
        totals["loss"] += float(loss.detach())
        for k, v in stats.items():
            totals[k] += v
    if accelerator.num_processes > 1:  # losses and counts are sums over every process's items
        keys = sorted(totals)
        summed = accelerator.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device), "sum")
        totals = dict(zip(keys, summed.tolist()))
    return dict(totals)


def _dummy(items: list[TrainItem]) -> TrainItem:
    if items:
        it = items[0]
        return TrainItem(it.kind, it.prompt_ids, it.response_ids, weight=0.0, coef=0.0)
    return TrainItem("sft", [0], [0], weight=0.0, coef=0.0)


class NonFiniteError(RuntimeError):
    """train.max_bad_steps updates in a row had a non-finite loss or gradient; the run
    stopped after saving a checkpoint of the last good weights."""


def optimizer_step(learner: Learner, items: list[TrainItem], settings: LossSettings) -> dict:
    """One optimizer step on `items`: accumulate, check finiteness, clip, step.

    A non-finite loss or gradient norm skips the update: gradients are dropped, and the
    weights, the optimizer's moments and the schedule stay as they were. It is counted in
    learner.counters ("bad_streak", reset by a good update, and "skipped_updates"); the training
    loop stops the run after train.max_bad_steps in a row.
    Under fp16 loss scaling (an accelerate-prepared optimizer with a GradScaler) an overflow
    of the scaled gradients is the scaler's normal work: it skips the step and lowers its
    scale. That is counted as skipped but not as bad, unless the scale has fallen below 1
    (then the gradients are non-finite whatever the scale).
    """
    optimizer, scheduler, accelerator, counters = (
        learner.optimizer,
        learner.scheduler,
        learner.accelerator,
        learner.counters,
    )
    optimizer.zero_grad(set_to_none=True)
    stats = accumulate_gradients(
        learner.policy, items, settings, learner.micro_batch_tokens, learner.pad_id, accelerator, learner.chunk_tokens
    )
    max_norm = learner.grad_clip if learner.grad_clip > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(learner.policy.parameters(), max_norm)  # unscales first under a scaler
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    loss = stats.get("loss", 0.0)
    scaler = getattr(accelerator, "scaler", None)
    overflow = False
    if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler is not None):
        optimizer.step()  # a scaler skips it when the gradients overflowed, and lowers its scale
        overflow = scaler is not None and bool(getattr(optimizer, "step_was_skipped", False))
        applied = not overflow
    else:
        applied = False
        if scaler is not None:
            scaler.update()  # no step this time: reset the scaler's per-step state left by unscale_
    optimizer.zero_grad(set_to_none=True)  # the gradients are spent: free them until the next update
    if applied:
        scheduler.step()
        counters["bad_streak"] = 0
    else:
        counters["skipped_updates"] += 1
        if overflow and scaler.get_scale() >= 1:
            log.info("fp16 gradient overflow: update skipped, loss scale now %g", scaler.get_scale())
        else:
            counters["bad_streak"] += 1
            log.warning(
                "non-finite %s (loss %s, grad norm %s): update skipped, %d in a row (the run stops at %d), %d in all",
                "loss" if not math.isfinite(loss) else "gradient",
                loss,
                grad_norm,
                counters["bad_streak"],
                learner.max_bad_steps,
                counters["skipped_updates"],
            )
    stats["grad_norm"] = grad_norm
    stats["skipped"] = 0.0 if applied else 1.0
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats
