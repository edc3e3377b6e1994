"""Forward passes over training items: micro-batches, collation, logits at response positions.

Every loss term (policy gradient, IML, HSFT, stage-1 SFT) is a list of `TrainItem`s
(algo/objective.py). They share micro-batches, so the IML term's forward pass of O+ under
the weak expert's prompt is batched with the policy-gradient sequences. Layout of a
micro-batch: prompts left-padded, responses right-padded, so all responses start at the
same column and one `logits_to_keep` slice covers them.

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
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from meml.algo import losses
from meml.algo.losses import token_logprobs
from meml.algo.objective import TrainItem


def micro_batches(items: list[TrainItem], token_budget: int) -> list[list[int]]:
    """Indices of items grouped so that rows * (max prompt + max response) <= budget.

    Longest prompts first, and the rows of one prompt next to each other (longest response
    first), so that a group's rows share micro-batches and their prompt is run once."""
    order = sorted(
        range(len(items)),
        key=lambda i: (len(items[i].prompt_ids), items[i].prompt_ids, len(items[i].response_ids)),
        reverse=True,
    )
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
    return Collated(
        input_ids.to(device),
        attention.to(device),
        position_ids.to(device),
        targets.to(device),
        mask.to(device),
        R,
        prompt_rows.to(device),
        torch.tensor(first_rows).to(device),
    )


def response_logits(model: torch.nn.Module, batch: Collated) -> torch.Tensor:
    """Logits predicting each response token: (B, R, V)."""
    if (
        batch.distinct_rows is not None
        and len(batch.distinct_rows) < len(batch.input_ids)
        and (cache_arg := _cache_argument(model))
    ):
        return shared_prompt_logits(model, batch, cache_arg)
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
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
    out = model(
        input_ids=batch.input_ids[rows, :P],
        attention_mask=batch.attention_mask[rows, :P],
        position_ids=batch.position_ids[rows, :P],
        use_cache=True,
        logits_to_keep=last,
    )  # (U, 1, V)
    first = out.logits[batch.prompt_rows]  # (B, 1, V): predicts response token 0
    if R == 1:
        return first
    cache = out[cache_arg]
    cache.batch_select_indices(batch.prompt_rows)  # (U, ...) -> (B, ...), a differentiable gather
    rest = model(
        input_ids=batch.input_ids[:, P : P + R - 1],
        attention_mask=batch.attention_mask[:, : P + R - 1],
        position_ids=batch.position_ids[:, P : P + R - 1],
        **{cache_arg: cache},
        use_cache=True,
        logits_to_keep=0,
    ).logits  # (B, R-1, V)
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
        _CACHE_ARG[key] = (
            name if name and "logits_to_keep" in params and hasattr(DynamicCache, "batch_select_indices") else None
        )
    return _CACHE_ARG[key]


_ACCEPTS_LOGITS_TO_KEEP: dict[type, bool] = {}  # model class -> whether forward takes logits_to_keep


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    key = type(inner)
    if key not in _ACCEPTS_LOGITS_TO_KEEP:
        _ACCEPTS_LOGITS_TO_KEEP[key] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _ACCEPTS_LOGITS_TO_KEEP[key]


# ----------------------------------------------------------------------------- per-token statistics
#
# The loss needs, per response token, log p(token) and (for entropy) the entropy of the
# next-token distribution: two numbers per position. Materialising the logits for that,
# (rows x response x vocabulary), costs gigabytes at a 49k-152k vocabulary. Instead the
# model runs with its LM head bypassed, giving hidden states (rows x response x hidden),
# and the head is applied a chunk of positions at a time under activation checkpointing:
# the backward pass recomputes each chunk's logits, so at most one chunk of logits exists.


@dataclass
class TokenStats:
    logp: torch.Tensor  # (B, R) fp32, log p(target); 0 at padding
    entropy: torch.Tensor | None  # (B, R) fp32 entropy of the next-token distribution; None when not asked
    hidden: torch.Tensor | None = None  # (B, R, H) when the head was split off
    head: torch.nn.Module | None = None
    logits: torch.Tensor | None = None  # (B, R, V) when it was not

    def row_logits(self, rows: list[int], width: int) -> torch.Tensor:
        """Full logits of a few rows (the IML token-KL rows): (b, width, V)."""
        if self.logits is not None:
            return self.logits[rows, :width]
        return self.head(self.hidden[rows, :width])


_POSTPROCESSED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def split_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head of a model whose logits are exactly head(hidden states), else None: a
    DDP/FSDP wrapper (one forward per backward through the wrapper), or a model that
    scales or caps its logits after the head (those settings live in its config)."""
    if hasattr(model, "module") or type(model).__name__.startswith(("FullyShardedDataParallel", "FSDP")):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _POSTPROCESSED_LOGITS):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def _bypassed(head: torch.nn.Module):
    """The head returns its input while inside: the model's "logits" are its hidden states."""
    head.forward = lambda hidden, *_, **__: hidden  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def _chunk_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """log p(target) and the entropy at n positions: hidden (n, H), targets (n,) -> (n,), (n,)."""
    logits = head(hidden).float()  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, torch.zeros_like(logp)
    return logp, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = log Z - E_p[logit]


def token_stats(model: torch.nn.Module, batch: Collated, chunk_tokens: int, entropy: bool = False) -> TokenStats:
    """Per-token log-probs (and entropies) of the responses, logits computed `chunk_tokens`
    positions at a time; chunk_tokens <= 0 (or a model whose head cannot be split off)
    takes the plain path through full logits, with the same values."""
    head = split_head(model) if chunk_tokens > 0 else None
    if head is None:
        logits = response_logits(model, batch)  # (B, R, V)
        logp = token_logprobs(logits, batch.targets)
        ent = losses.token_entropy(logits) if entropy else None
        return TokenStats(logp, ent, logits=logits)
    with _bypassed(head):
        hidden = response_logits(model, batch)  # (B, R, H)
    B, R = batch.targets.shape
    where = batch.mask.reshape(-1).nonzero().squeeze(-1)  # response positions (no padding)
    flat_hidden = hidden.reshape(B * R, -1)[where]  # (n, H)
    flat_targets = batch.targets.reshape(-1)[where]  # (n,)
    logps, ents = [], []
    for start in range(0, len(where), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (head, flat_hidden[part], flat_targets[part], entropy)
        grad = torch.is_grad_enabled()
        lp, en = checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args)
        logps.append(lp)
        ents.append(en)

    def placed(values: list[torch.Tensor]) -> torch.Tensor:  # back to (B, R), 0 at padding
        return torch.zeros(B * R, device=hidden.device).index_put((where,), torch.cat(values)).view(B, R)

    return TokenStats(placed(logps), placed(ents) if entropy else None, hidden=hidden, head=head)


@torch.no_grad()
def score_logprobs(
    model, items: list[TrainItem], token_budget: int, pad_id: int, autocast, field: str, chunk_tokens: int = 0
) -> None:
    """Fill `old_logprobs` or `ref_logprobs` of each item with a no-grad pass of `model`."""
    device = next(model.parameters()).device
    for idx in micro_batches(items, token_budget):
        batch = collate([items[i].prompt_ids for i in idx], [items[i].response_ids for i in idx], pad_id, device)
        with autocast():
            logp = token_stats(model, batch, chunk_tokens).logp  # (B, R)
        for row, i in enumerate(idx):
            setattr(items[i], field, logp[row, : len(items[i].response_ids)].float().cpu())
