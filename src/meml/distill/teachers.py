"""Teachers: where the responses come from, and rejection sampling over them.

Every teacher turns a list of (question, expert) pairs into a stream of `PairResult`s,
one per pair, in the order they finish. A pair is asked up to `samples_per_question`
times under the expert's prompt; the first response the task verifies is kept. When
none verifies, the last response is reported with verified=False.

  http_results   an OpenAI-compatible endpoint; each pair's tries run one after another
                 (later tries are skipped once one verifies), pairs run `concurrency` at a time.
  local_results  a rollout engine (the policy itself, or another local model): all
                 samples of a batch of pairs come from one `engine.generate` call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from meml.core.types import Example, Expert
from meml.distill.http_client import ChatClient, TeacherHTTPError
from meml.engines.base import SamplingParams
from meml.tasks.experts import user_message

log = logging.getLogger("meml")

Verify = Callable[[str, Example, bool], bool]  # (response, example, finished) -> verified
# Statuses that would fail every request the same way (bad key, no access, wrong model or
# URL, a redirect the client does not follow): stop the run instead of failing each pair in turn.
FATAL_STATUSES = (301, 302, 303, 307, 308, 401, 403, 404)


@dataclass(frozen=True)
class Pair:
    example: Example
    expert_index: int
    expert: Expert


@dataclass
class PairResult:
    pair: Pair
    response: str | None  # None: the teacher failed, nothing is written and a rerun retries it
    verified: bool
    attempts: int  # responses looked at, up to and including the one kept
    extra: dict = field(default_factory=dict)  # finish_reason, reasoning_chars
    error: str | None = None


def chat_messages(expert: Expert, example: Example, format_instruction: str) -> list[dict]:
    """The same system + user messages the policy is trained and sampled on."""
    return [
        {"role": "system", "content": expert.system_prompt},
        {"role": "user", "content": user_message(example, format_instruction)},
    ]


def keep_first_verified(pair: Pair, samples: list[tuple[str, bool, dict]], verify: Verify) -> PairResult:
    """Rejection sampling over samples (text, finished, extra) already drawn."""
    for attempt, (text, finished, extra) in enumerate(samples, start=1):
        if verify(text, pair.example, finished):
            return PairResult(pair, text, True, attempt, extra)
    text, _, extra = samples[-1]
    return PairResult(pair, text, False, len(samples), extra)


def local_results(
    pairs: list[Pair],
    engine,
    prompt_of: Callable[[Pair], list[int]],
    verify: Verify,
    params: SamplingParams,
    pairs_per_call: int,
) -> Iterator[PairResult]:
    """Sample `params.num_samples` answers per pair with a rollout engine, a batch at a time
    (so a killed run loses one batch), and keep the first that verifies."""
    for start in range(0, len(pairs), pairs_per_call):
        chunk = pairs[start : start + pairs_per_call]
        groups = engine.generate([prompt_of(p) for p in chunk], replace(params, seed=params.seed + start))
        for pair, group in zip(chunk, groups):
            samples = [(g.text, g.finished, {"finish_reason": "stop" if g.finished else "length"}) for g in group]
            yield keep_first_verified(pair, samples, verify)


def _ask_until_verified(
    client: ChatClient,
    pair: Pair,
    format_instruction: str,
    verify: Verify,
    tries: int,
    sampling: dict,
    stop: threading.Event,
) -> PairResult:
    """Runs in a worker thread, so `verify` must be thread-safe (verifiers are pure functions)."""
    messages = chat_messages(pair.expert, pair.example, format_instruction)
    samples: list[tuple[str, bool, dict]] = []
    for _ in range(tries):
        if stop.is_set():
            return PairResult(pair, None, False, len(samples), error="stopped")
        try:
            reply = client.complete(messages, **sampling)
        except TeacherHTTPError as exc:
            if exc.status in FATAL_STATUSES:
                raise
            return PairResult(pair, None, False, len(samples), error=str(exc))
        samples.append((reply.content, reply.finished, reply.extra))
        if verify(reply.content, pair.example, reply.finished):
            break
    return keep_first_verified(pair, samples, verify)


def http_results(
    pairs: list[Pair],
    client: ChatClient,
    format_instruction: str,
    verify: Verify,
    tries: int,
    sampling: dict,
    concurrency: int,
) -> Iterator[PairResult]:
    """Ask the endpoint with at most `concurrency` pairs (so requests) in flight.

    Stops with TeacherHTTPError on a status that no retry can fix, or when 2 x concurrency
    pairs in a row failed (the endpoint looks down); pairs not yet finished are dropped
    and a rerun picks them up."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="distill")
    stop = threading.Event()  # set on the way out: pairs in flight start no further tries
    todo = iter(pairs)
    running: set = set()
    failures_in_a_row = 0
    try:
        while True:
            for pair in todo:  # top the pool up to `concurrency` pairs, no more
                running.add(
                    pool.submit(_ask_until_verified, client, pair, format_instruction, verify, tries, sampling, stop)
                )
                if len(running) >= concurrency:
                    break
            if not running:
                return
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()  # re-raises a fatal TeacherHTTPError
                failures_in_a_row = failures_in_a_row + 1 if result.error else 0
                yield result
            if failures_in_a_row >= 2 * concurrency:
                raise TeacherHTTPError(f"{failures_in_a_row} pairs in a row failed; last error: {result.error}")
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
