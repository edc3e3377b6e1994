"""Scoring episodes: the task's verifier plus user reward functions, TRL's contract.

A user reward function is named in the config by import path ("package.module:function")
and is called as f(prompts, completions, **columns) -> list[float | None], where prompts
are the user messages, completions the generated texts, and columns hold, aligned with
them: answer, question_id, expert, finished, completion_ids and every extra dataset
column. None means "does not apply to this completion" and is skipped in the sum.

A function that raises, returns something malformed, or runs past `timeout_s` on the
batch is retried one completion at a time (the retries run concurrently, each with its
own timeout_s, so a step waits at most about 2 x timeout_s per function), and only the
completions that really fail get None. Failures are counted (RewardStats, the
`reward_failures` metric) and logged with the example ids, and training goes on.
"Raises" means any exception, BaseException included: a function that calls sys.exit()
or raises KeyboardInterrupt fails like any other (it must not end or interrupt the run;
a real Ctrl-C reaches the main thread, never the function's thread).
Each call runs on its own daemon thread: a timed-out call cannot be killed in Python, so
it is abandoned and finishes in the background without holding up the step or the exit
of the process. A function with more than MAX_ABANDONED such calls still running is not
called again until they finish: its completions get None. User functions should thus be
thread-safe.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meml.core.errors import RewardConfigError
from meml.core.types import Episode, Example
from meml.tasks.base import Task

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]


class RewardFunctionAborted(Exception):
    """A reward function raised a BaseException that is not an Exception (SystemExit,
    KeyboardInterrupt, GeneratorExit, ...): a failure of that function, nothing more."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{cause!r} raised inside the function; scored as a failure, not an exit")
        self.cause = cause


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


MAX_ABANDONED = 32  # timed-out calls of one function still running before it is skipped
_abandoned: dict[str, list[threading.Thread]] = {}


class _Call:
    """fn(*args, **kwargs) on a daemon thread; `result` waits until a deadline."""

    def __init__(self, fn: RewardFn, *args, **kwargs):
        self._done = threading.Event()
        self._value, self._error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True, name="meml-reward")
        self.thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            self._error = exc
        finally:
            self._done.set()

    def result(self, deadline: float, name: str):
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            _abandoned.setdefault(name, []).append(self.thread)
            raise TimeoutError
        if isinstance(self._error, Exception):
            raise self._error
        if self._error is not None:  # SystemExit, KeyboardInterrupt...: the function's, not the run's
            raise RewardFunctionAborted(self._error) from self._error
        return self._value


def _checked(values, n: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(
            f"returned {type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}, "
            f"expected a list of {n}"
        )
    out = []
    for v in values:
        if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):  # numpy scalars too
            raise ValueError(f"returned a non-finite or non-numeric value {v!r}")
        out.append(None if v is None else float(v))
    return out


def _still_running(name: str) -> int:
    alive = [t for t in _abandoned.get(name, []) if t.is_alive()]
    _abandoned[name] = alive
    return len(alive)


def call_reward_function(
    fn: RewardFn,
    name: str,
    prompts: list[str],
    completions: list[str],
    columns: dict,
    timeout_s: float,
    ids: Sequence[str],
    stats: RewardStats,
) -> list[float | None]:
    """One function over a batch; failing completions get None, the others their value."""
    n = len(completions)
    if _still_running(name) > MAX_ABANDONED:
        log.warning(
            "reward function %s: %d timed-out calls are still running; not called this step, its %d completions get "
            "None",
            name,
            _still_running(name),
            n,
        )
        stats.failures += n
        stats.failed_ids.extend(ids)
        return [None] * n
    try:
        return _checked(_Call(fn, prompts, completions, **columns).result(time.monotonic() + timeout_s, name), n)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        log.info(
            "reward function %s failed on a batch of %d (%s); retrying one completion at a time",
            name,
            n,
            _describe(exc, timeout_s),
        )
    deadline = time.monotonic() + timeout_s
    calls = [
        _Call(fn, prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in columns.items()})
        for i in range(n)
    ]
    values: list[float | None] = []
    failed: dict[str, list[str]] = {}  # reason -> example ids
    for i, call in enumerate(calls):
        try:
            values.append(_checked(call.result(deadline, name), 1)[0])
        except Exception as exc:  # noqa: BLE001
            failed.setdefault(_describe(exc, timeout_s), []).append(ids[i])
            stats.failed_ids.append(ids[i])
            values.append(None)
    stats.failures += sum(map(len, failed.values()))
    for reason, where in failed.items():
        log.warning(
            "reward function %s gave None on %d of %d completions (%s); examples: %s",
            name,
            len(where),
            n,
            reason,
            ", ".join(where),
        )
    return values


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after reward.timeout_s={timeout_s:g}"
    if isinstance(exc, RewardFunctionAborted):
        return str(exc)
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
