"""Turning training items into gradients: batched forward passes in micro-batches.

Every loss term (policy gradient, IML, HSFT, stage-1 SFT) is a set of `TrainItem`s: a
prompt, a response to score, a per-token weight that already holds the aggregation's
normaliser, and a coefficient (lambda). They share micro-batches, so the IML term's
forward pass of O+ under the weak expert's prompt is batched with the policy-gradient
sequences. Layout of a micro-batch: prompts left-padded, responses right-padded, so all
responses start at the same column and one `logits_to_keep` slice covers them.

Shared prompts. The G answers of a group share one prompt, which is often longer than the
answers. Micro-batches keep a prompt's rows together, and the forward pass runs each
distinct prompt once (keeping its key/value cache, with gradients), gathers that cache to
the prompt's rows and runs only the responses on top: the same logits and gradients as
running every row in full, for a fraction of the prompt's compute (docs/benchmarks.md).
It falls back to full rows where that is not safe or not supported: a wrapped model
(DDP/FSDP run one forward per backward), gradient checkpointing (no cache), a model
without `past_key_values`/`logits_to_keep`, or a micro-batch without a repeated prompt.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from meml.algo import losses

log = logging.getLogger("meml")


@dataclass
class TrainItem:
    kind: str  # pg | iml | sft
    prompt_ids: list[int]
    response_ids: list[int]
    weight: float  # per-token normaliser of this item's term
    coef: float = 1.0  # the term's coefficient (lambda1, lambda2; 1 for pg)
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None  # (len(response_ids),) for ppo_clip with several updates
    ref_logprobs: torch.Tensor | None = None  # (len(response_ids),) for the KL term
    sample_logprobs: torch.Tensor | None = None  # (len(response_ids),) the engine's, for the IS correction
    teacher_prompt_ids: list[int] | None = None  # IML token-KL form: the strong expert's prompt


@dataclass(frozen=True)
class LossSettings:
    loss: str = "reinforce"  # reinforce | ppo_clip
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0
    tis_cap: float = 0.0  # truncated importance-sampling correction of engine/trainer mismatch; 0 = off


def micro_batches(items: list[TrainItem], token_budget: int) -> list[list[int]]:
    """Indices of items grouped so that rows * (max prompt + max response) <= budget.

    Longest prompts first, and the rows of one prompt next to each other (longest response
    first), so that a group's rows share micro-batches and their prompt is run once."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].prompt_ids), items[i].prompt_ids, len(items[i].response_ids)), reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    max_p = max_r = 0
    for i in order:
        p, r = len(items[i].prompt_ids), len(items[i].response_ids)
        new_p, new_r = max(max_p, p), max(max_r, r)
        if current and (len(current) + 1) * (new_p + new_r) > token_budget:
            batches.append(current)
            current, new_p, new_r = [], p, r
        current.append(i)
        max_p, max_r = new_p, new_r
    if current:
        batches.append(current)
    return batches


@dataclass
class Collated:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R), counting from each row's first real token
    targets: torch.Tensor  # (B, R) response tokens, pad where masked
    mask: torch.Tensor  # (B, R) 1.0 on response tokens
    response_width: int
    prompt_rows: torch.Tensor | None = None  # (B,) each row's index into the distinct prompts
    distinct_rows: torch.Tensor | None = None  # (U,) the first row holding each distinct prompt


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> Collated:
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.long)
    targets = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros((B, R))
    for b, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[b, P - len(p) : P] = torch.tensor(p)
        input_ids[b, P : P + len(r)] = torch.tensor(r)
        attention[b, P - len(p) : P + len(r)] = 1
        targets[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1.0
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    distinct: dict[tuple, int] = {}  # prompt -> its index among the distinct prompts
    first_rows: list[int] = []
    for b, p in enumerate(prompts):
        if tuple(p) not in distinct:
            distinct[tuple(p)] = len(first_rows)
            first_rows.append(b)
    prompt_rows = torch.tensor([distinct[tuple(p)] for p in prompts])
    return Collated(input_ids.to(device), attention.to(device), position_ids.to(device), targets.to(device), mask.to(device), R,
                    prompt_rows.to(device), torch.tensor(first_rows).to(device))


def response_logits(model: torch.nn.Module, batch: Collated) -> torch.Tensor:
    """Logits predicting each response token: (B, R, V)."""
    if batch.distinct_rows is not None and len(batch.distinct_rows) < len(batch.input_ids) and (cache_arg := _cache_argument(model)):
        return shared_prompt_logits(model, batch, cache_arg)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
    R = batch.response_width
    if _accepts_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=R + 1).logits  # (B, R + 1, V)
    else:
        logits = model(**kwargs).logits[:, -(R + 1) :]
    return logits[:, :-1]  # position P-1+t predicts response token t


def shared_prompt_logits(model: torch.nn.Module, batch: Collated, cache_arg: str = "past_key_values") -> torch.Tensor:
    """`response_logits` with each distinct prompt run once: (B, R, V).

    The prompt pass keeps its key/value cache (in the autograd graph) and the logits of its
    last position, which predict every row's first response token; the cache is gathered
    to the rows, and the response pass predicts the other tokens from it. Gradients of the
    rows flow back through the gather into the one prompt pass.
    """
    R = batch.response_width
    P = batch.input_ids.shape[1] - R
    rows = batch.distinct_rows  # (U,)
    last = torch.tensor([P - 1], device=rows.device)  # an index, not a slice: the head gets a contiguous input
    out = model(input_ids=batch.input_ids[rows, :P], attention_mask=batch.attention_mask[rows, :P], position_ids=batch.position_ids[rows, :P],
                use_cache=True, logits_to_keep=last)  # (U, 1, V)
    first = out.logits[batch.prompt_rows]  # (B, 1, V): predicts response token 0
    if R == 1:
        return first
    cache = out[cache_arg]
    cache.batch_select_indices(batch.prompt_rows)  # (U, ...) -> (B, ...), a differentiable gather
    rest = model(input_ids=batch.input_ids[:, P : P + R - 1], attention_mask=batch.attention_mask[:, : P + R - 1],
                 position_ids=batch.position_ids[:, P : P + R - 1], **{cache_arg: cache}, use_cache=True, logits_to_keep=0).logits  # (B, R-1, V)
    return torch.cat([first, rest], dim=1)


_CACHE_ARG: dict[type, str | None] = {}


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The forward's key/value-cache argument ("cache" from transformers 5.2x, before that
    "past_key_values") where the shared-prompt pass applies, else None: it needs an
    unwrapped model (DDP/FSDP expect one forward per backward), no gradient checkpointing
    (which turns the cache off) and a forward taking a cache and logits_to_keep."""
    if hasattr(model, "module") or type(model).__name__.startswith(("FullyShardedDataParallel", "FSDP")):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(m, "gradient_checkpointing", False) is True for m in inner.modules()):
        return None
    key = type(inner)
    if key not in _CACHE_ARG:
        from transformers import DynamicCache

        params = inspect.signature(inner.forward).parameters
        name = next((n for n in ("cache", "past_key_values") if n in params), None)
        _CACHE_ARG[key] = name if name and "logits_to_keep" in params and hasattr(DynamicCache, "batch_select_indices") else None
    return _CACHE_ARG[key]


_KEEP_CACHE: dict[type, bool] = {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    key = type(inner)
    if key not in _KEEP_CACHE:
        _KEEP_CACHE[key] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _KEEP_CACHE[key]


@torch.no_grad()
def score_logprobs(model, items: list[TrainItem], token_budget: int, pad_id: int, autocast, field: str) -> None:
    """Fill `old_logprobs` or `ref_logprobs` of each item with a no-grad pass of `model`."""
    device = next(model.parameters()).device
    for idx in micro_batches(items, token_budget):
        batch = collate([items[i].prompt_ids for i in idx], [items[i].response_ids for i in idx], pad_id, device)
        with autocast():
            logp = losses.token_logprobs(response_logits(model, batch), batch.targets)  # (B, R)
        for row, i in enumerate(idx):
            setattr(items[i], field, logp[row, : len(items[i].response_ids)].float().cpu())


def _stack(values: list[torch.Tensor | None], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(values), width))
    for b, v in enumerate(values):
        if v is not None:
            out[b, : v.numel()] = v
    return out.to(device)


def micro_batch_loss(model, items: list[TrainItem], batch: Collated, settings: LossSettings, autocast, pad_id: int) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one micro-batch and its statistics (sums, not yet averaged)."""
    device = batch.targets.device
    R = batch.response_width
    with autocast():
        logits = response_logits(model, batch)  # (B, R, V)
    logp = losses.token_logprobs(logits, batch.targets)  # (B, R) fp32
    kinds = [it.kind for it in items]
    is_pg = torch.tensor([k == "pg" for k in kinds], device=device)
    weight = torch.tensor([it.weight for it in items], device=device, dtype=torch.float32)  # (B,)
    coef = torch.tensor([it.coef for it in items], device=device, dtype=torch.float32)  # (B,)
    adv = torch.tensor([it.advantage for it in items], device=device, dtype=torch.float32)  # (B,)
    stats: dict[str, float] = {"clip_frac_sum": 0.0, "kl_sum": 0.0, "is_weight_sum": 0.0, "is_truncated_sum": 0.0, "is_tokens": 0.0}  # same keys on every process

    # The policy this update is relative to: the scored old log-probs (PPO, several updates
    # per batch), else the current policy itself, detached (ratio 1).
    has_old = settings.loss == "ppo_clip" and all(it.old_logprobs is not None for it in items if it.kind == "pg")
    behaviour = _stack([it.old_logprobs for it in items], R, device) if has_old else logp.detach()
    if settings.loss == "ppo_clip":
        pg_tok, clipped = losses.ppo_clip_loss(logp, behaviour, adv, settings.clip_eps_low, settings.clip_eps_high)
        stats["clip_frac_sum"] = float((clipped * batch.mask)[is_pg].sum())
    else:
        pg_tok = losses.reinforce_loss(logp, adv)
    if settings.tis_cap > 0 and any(it.sample_logprobs is not None for it in items):
        has = torch.tensor([it.sample_logprobs is not None for it in items], device=device).unsqueeze(-1)  # (B, 1)
        w = losses.truncated_is_weights(behaviour, _stack([it.sample_logprobs for it in items], R, device), settings.tis_cap)
        w = torch.where(has, w, torch.ones_like(w))  # (B, R); 1 where the engine reported nothing
        pg_tok = pg_tok * w
        pg_mask = batch.mask * (is_pg.unsqueeze(-1) & has)
        stats["is_weight_sum"] = float((w * pg_mask).sum())
        stats["is_truncated_sum"] = float(((w >= settings.tis_cap) * pg_mask).sum())
        stats["is_tokens"] = float(pg_mask.sum())
    token_loss = torch.where(is_pg.unsqueeze(-1), pg_tok, losses.nll_loss(logp))  # (B, R)

    teacher_rows = [b for b, it in enumerate(items) if it.teacher_prompt_ids is not None]
    if teacher_rows:  # IML token-KL form: replace those rows' NLL with KL(teacher || student)
        teacher_batch = collate([items[b].teacher_prompt_ids for b in teacher_rows], [items[b].response_ids for b in teacher_rows], pad_id, device)
        with torch.no_grad(), autocast():
            teacher_logits = response_logits(model, teacher_batch)  # (b, R', V)
        width = teacher_batch.response_width
        kl = losses.distribution_kl(teacher_logits, logits[teacher_rows, :width])  # (b, R')
        token_loss = token_loss.clone()
        token_loss[teacher_rows, :width] = kl

    if settings.kl_coef > 0 and any(it.ref_logprobs is not None for it in items):
        ref = _stack([it.ref_logprobs for it in items], R, device)
        kl_tok = losses.k3_kl(logp, ref)  # (B, R)
        token_loss = token_loss + settings.kl_coef * kl_tok * is_pg.unsqueeze(-1)
        stats["kl_sum"] = float((kl_tok.detach() * batch.mask)[is_pg].sum())

    loss = losses.weighted_sum(token_loss, batch.mask, weight * coef)
    per_row = (token_loss.detach() * batch.mask).sum(-1) * weight  # (B,) the term's value, without coef
    for kind in ("pg", "iml", "sft"):
        rows = torch.tensor([k == kind for k in kinds], device=device)
        stats[f"{kind}_loss"] = float(per_row[rows].sum())
    stats["pg_tokens"] = float(batch.mask[is_pg].sum())
    stats["tokens"] = float(batch.mask.sum())
    return loss, stats


def accumulate_gradients(model, items: list[TrainItem], settings: LossSettings, token_budget: int, pad_id: int, accelerator) -> dict:
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
            loss, stats = micro_batch_loss(model, batch_items, batch, settings, accelerator.autocast, pad_id)
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


def optimizer_step(s, optimizer, scheduler, items: list[TrainItem], settings: LossSettings) -> dict:
    """One optimizer step on `items`: accumulate, check finiteness, clip, step.

    A non-finite loss or gradient norm skips the update: gradients are dropped, and the
    weights, the optimizer's moments and the schedule stay as they were. It is counted in
    s.counters ("bad_streak", reset by a good update, and "skipped_updates"); the training
    loop stops the run after train.max_bad_steps in a row.
    Under fp16 loss scaling (an accelerate-prepared optimizer with a GradScaler) an overflow
    of the scaled gradients is the scaler's normal work: it skips the step and lowers its
    scale. That is counted as skipped but not as bad, unless the scale has fallen below 1
    (then the gradients are non-finite whatever the scale).
    """
    cfg = s.cfg
    optimizer.zero_grad(set_to_none=True)
    stats = accumulate_gradients(s.policy, items, settings, cfg.train.micro_batch_tokens, s.tokenizer.pad_token_id, s.accelerator)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = s.accelerator.clip_grad_norm_(s.policy.parameters(), max_norm)  # unscales first under a scaler
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    loss = stats.get("loss", 0.0)
    scaler = getattr(s.accelerator, "scaler", None)
    overflow = False
    if math.isfinite(loss) and (math.isfinite(grad_norm) or scaler is not None):
        optimizer.step()  # a scaler skips it when the gradients overflowed, and lowers its scale
        overflow = scaler is not None and bool(getattr(optimizer, "step_was_skipped", False))
        applied = not overflow
    else:
        applied = False
        if scaler is not None:
            scaler.update()  # no step this time: reset the scaler's per-step state left by unscale_
    if applied:
        scheduler.step()
        s.counters["bad_streak"] = 0
    else:
        optimizer.zero_grad(set_to_none=True)
        s.counters["skipped_updates"] += 1
        if overflow and scaler.get_scale() >= 1:
            log.info("fp16 gradient overflow: update skipped, loss scale now %g", scaler.get_scale())
        else:
            s.counters["bad_streak"] += 1
            log.warning("non-finite %s (loss %s, grad norm %s): update skipped, %d in a row (the run stops at %d), %d in all",
                        "loss" if not math.isfinite(loss) else "gradient", loss, grad_norm,
                        s.counters["bad_streak"], cfg.train.max_bad_steps, s.counters["skipped_updates"])
    stats["grad_norm"] = grad_norm
    stats["skipped"] = 0.0 if applied else 1.0
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats
