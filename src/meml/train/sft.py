"""Stage 1, multi-expert fine-tuning (MEF): SFT on every expert's traces.

L_MEF = - sum_q sum_i log p(A_q^(i) | P_i, q), loss on response tokens only, averaged
over the tokens of each optimizer step's batch. Expert i's traces are rendered under
expert i's system prompt, so each prompt becomes associated with its own reasoning style:
this is where the experts' heterogeneity comes from (METHOD.md).
"""

from __future__ import annotations

import math
import random

import torch

from meml.algo.losses import sequence_weights
from meml.tasks.experts import response_ids
from meml.train.update import TrainItem


def trace_keys(s) -> list[tuple[str, int]]:
    """The (question id, expert) pairs stage 1 trains on, in a fixed order."""
    wanted = set(s.cfg.sft.experts) or {e.name for e in s.experts}
    return sorted(k for k in s.traces if s.experts[k[1]].name in wanted)


def steps_per_epoch(num_traces: int, batch_size: int) -> int:
    return max(1, math.ceil(num_traces / batch_size))


def total_steps(s) -> int:
    per_epoch = steps_per_epoch(len(trace_keys(s)), s.cfg.sft.sequences_per_step)
    return max(1, math.ceil(s.cfg.sft.epochs * per_epoch))


def batch_keys(keys: list[tuple[str, int]], step: int, batch_size: int, seed: int) -> list[tuple[str, int]]:
    """The traces of 0-based optimizer step `step`: a fresh seeded shuffle each epoch."""
    per_epoch = steps_per_epoch(len(keys), batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(keys)
    random.Random(f"{seed}:mef:{epoch}").shuffle(order)
    return order[position * batch_size : (position + 1) * batch_size]


def sft_items(s, keys: list[tuple[str, int]], num_global_tokens: int | None = None) -> list[TrainItem]:
    """Token-mean NLL items; the normaliser counts the tokens of the whole (global) batch."""
    pairs = [(s.prompt(s.examples_by_id[qid], e), response_ids(s.tokenizer, s.traces[(qid, e)])) for qid, e in keys]
    lengths = torch.tensor([len(r) for _, r in pairs])
    total = num_global_tokens if num_global_tokens is not None else int(lengths.sum())
    weights = sequence_weights(lengths, "token_mean", 1, total_tokens=total)
    return [TrainItem("sft", p, r, weight=float(w)) for (p, r), w in zip(pairs, weights)]
