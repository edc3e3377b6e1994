"""Scoring episodes: the task's verifier plus user reward functions, TRL's contract.

A user reward function is named in the config by import path ("package.module:function")
and is called as f(prompts, completions, **columns) -> list[float | None], where prompts
are the user messages, completions the generated texts, and columns hold, aligned with
them: answer, question_id, expert, finished, completion_ids and every extra dataset
column. None means "does not apply to this completion" and is skipped in the sum.

A function that raises or runs past `timeout_s` is retried one completion at a time, so
only the completions that really fail get None; failures are counted and logged with the
example id, and training goes on. (A timed-out call's thread cannot be killed in Python;
it is abandoned and finishes in the background.)
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meml.data.base import Task
from meml.types import Episode, Example

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]


class RewardConfigError(ValueError):
    pass


def load_reward_function(path: str) -> RewardFn:
    """Import "package.module:function" (or "package.module.function")."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardConfigError(f"reward.functions: '{path}' is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardConfigError(f"reward.functions: cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardConfigError(f"reward.functions: '{module_name}' has no callable '{attr}'")
    return fn


@dataclass
class RewardStats:
    failures: int = 0  # completions a reward function failed on (raised, timed out, bad output)
    abstentions: int = 0  # completions whose verifier abstained (gold answer unparseable)
    failed_ids: list[str] = field(default_factory=list)


_POOL = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="meml-reward")


def _call(fn: RewardFn, timeout_s: float, prompts: list[str], completions: list[str], columns: dict) -> list:
    future = _POOL.submit(fn, prompts, completions, **columns)
    values = future.result(timeout=timeout_s)
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        raise ValueError(f"returned {type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}, expected a list of {len(completions)}")
    out = []
    for v in values:
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ValueError(f"returned a non-finite or non-numeric value {v!r}")
        out.append(None if v is None else float(v))
    return out


def call_reward_function(
    fn: RewardFn, name: str, prompts: list[str], completions: list[str], columns: dict, timeout_s: float, ids: Sequence[str], stats: RewardStats
) -> list[float | None]:
    """One function over a batch; failing completions get None, the others their value."""
    try:
        return _call(fn, timeout_s, prompts, completions, columns)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        log.warning("reward function %s failed on a batch (%s); retrying one completion at a time", name, _describe(exc))
    values: list[float | None] = []
    for i in range(len(completions)):
        one = {k: v[i : i + 1] for k, v in columns.items()}
        try:
            values.append(_call(fn, timeout_s, prompts[i : i + 1], completions[i : i + 1], one)[0])
        except Exception as exc:  # noqa: BLE001
            log.warning("reward function %s failed on example %s: %s", name, ids[i], _describe(exc))
            stats.failures += 1
            stats.failed_ids.append(ids[i])
            values.append(None)
    return values


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cf.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def score_episodes(
    episodes: list[Episode],
    examples: dict[str, Example],
    task: Task,
    expert_names: Sequence[str],
    format_instruction: str,
    use_verifier: bool,
    functions: Sequence[tuple[str, RewardFn, float]],
    timeout_s: float,
) -> RewardStats:
    """Fill `reward` and `reward_breakdown` of each episode in place."""
    stats = RewardStats()
    totals: list[list[float]] = [[] for _ in episodes]
    for k, ep in enumerate(episodes):
        ex = examples[ep.question_id]
        if use_verifier:
            verdict = task.verify(ep.completion, ex, ep.finished)
            ep.reward_breakdown.update(verdict.breakdown)
            ep.reward_breakdown["extracted"] = verdict.extracted
            if verdict.score is None:
                stats.abstentions += 1
            else:
                ep.reward_breakdown["verifier"] = verdict.score
                totals[k].append(verdict.score)
    if functions:
        qs = [examples[e.question_id] for e in episodes]
        prompts = [q.question if not format_instruction else f"{q.question}\n\n{format_instruction}" for q in qs]
        completions = [e.completion for e in episodes]
        columns: dict[str, list] = {
            "answer": [q.answer for q in qs],
            "question_id": [e.question_id for e in episodes],
            "expert": [expert_names[e.expert] for e in episodes],
            "finished": [e.finished for e in episodes],
            "completion_ids": [e.completion_ids for e in episodes],
        }
        for key in sorted({k for q in qs for k in q.columns}):
            columns.setdefault(key, [q.columns.get(key) for q in qs])
        ids = [e.question_id for e in episodes]
        for name, fn, weight in functions:
            values = call_reward_function(fn, name, prompts, completions, columns, timeout_s, ids, stats)
            for k, v in enumerate(values):
                episodes[k].reward_breakdown[name] = v
                if v is not None:
                    totals[k].append(weight * v)
    for k, ep in enumerate(episodes):
        ep.reward = sum(totals[k]) if totals[k] else None
    return stats
