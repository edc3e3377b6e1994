"""The few record types that flow through meml, from data to update.

`Example` is one question of a task; `Expert` is one system prompt (plus where its
stage-1 traces come from); `Episode` is one sampled answer, carrying the ids that say
which question, expert and group it belongs to; `Verdict` is a verifier's judgement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One question with its gold answer.

    `rationales` maps a trace style name to a worked solution ending in the gold answer
    (e.g. {"prose": ..., "equations": ...}); an expert's `trace_source` names one of them.
    `columns` holds any further dataset columns; they are passed to reward functions as
    keyword arguments, TRL-style.
    """

    id: str
    question: str
    answer: str
    rationales: dict[str, str] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Expert:
    """An expert is a system prompt; single-expert GRPO is the case of one expert.

    `trace_source` says where its stage-1 (MEF) traces come from: the name of one of the
    dataset's rationale styles (e.g. "prose"), or "file:PATH" for a JSONL trace file.
    """

    name: str
    system_prompt: str
    trace_source: str = "prose"


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one completion.

    score: 1.0 / 0.0, or None when the verifier abstains (the gold answer cannot be
    parsed); abstentions are counted and reported, never scored as wrong.
    """

    score: float | None
    extracted: str | None = None
    breakdown: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One sampled completion and everything the update needs to know about it.

    Group ids are explicit: `slot` is the position of the question's draw in the step's
    batch (a question drawn twice has two slots), `group_id` numbers the (slot, expert)
    groups of the step. Baselines, IML and HSFT group by these, never by question id.
    """

    question_id: str
    expert: int  # index into the run's expert list
    group_id: int  # the (slot, expert) group
    slot: int  # the draw of the question in the step
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    finished: bool  # ended with an end-of-sequence token (False: cut at max_new_tokens)
    sample_logprobs: list[float] | None = None  # the engine's log-probs when sampling
    reward: float | None = None  # None: reward abstained or failed for this completion
    reward_breakdown: dict[str, Any] = field(default_factory=dict)
