"""Stage 1, multi-expert fine-tuning (MEF): SFT on every expert's traces.

L_MEF = - sum_q sum_i log p(A_q^(i) | P_i, q), loss on response tokens only, averaged
over the tokens of each optimizer step's batch (algo/objective.py). Expert i's traces are
rendered under expert i's system prompt, so each prompt becomes associated with its own
reasoning style: this is where the experts' heterogeneity comes from (docs/ALGORITHM.md).
"""

from __future__ import annotations

import math
import random

from meml.core.types import Expert

TraceKey = tuple[str, int]  # (question id, expert index)


def trace_keys(traces: dict[TraceKey, str], experts: list[Expert], wanted: list[str]) -> list[TraceKey]:
    """The (question id, expert) pairs stage 1 trains on, in a fixed order; `wanted` names
    the experts to train (empty: all)."""
    names = set(wanted) or {e.name for e in experts}
    return sorted(k for k in traces if experts[k[1]].name in names)


def steps_per_epoch(num_traces: int, sequences_per_step: int) -> int:
    return max(1, math.ceil(num_traces / sequences_per_step))


def total_steps(num_traces: int, sequences_per_step: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * steps_per_epoch(num_traces, sequences_per_step)))


def batch_keys(keys: list[TraceKey], step: int, sequences_per_step: int, seed: int) -> list[TraceKey]:
    """The traces of 0-based optimizer step `step`: a fresh seeded shuffle each epoch."""
    per_epoch = steps_per_epoch(len(keys), sequences_per_step)
    epoch, position = divmod(step, per_epoch)
    order = list(keys)
    random.Random(f"{seed}:mef:{epoch}").shuffle(order)
    return order[position * sequences_per_step : (position + 1) * sequences_per_step]
