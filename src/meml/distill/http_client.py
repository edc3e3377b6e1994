"""A small client for OpenAI-compatible chat endpoints (vLLM, SGLang, hosted APIs).

One call is one POST {base_url}/chat/completions with n=1. Transient failures (429, 5xx,
timeouts, refused or dropped connections) are retried with exponential backoff and
jitter, waiting at least what a Retry-After header asks for, at most `max_retries` times.
Any other 4xx is not retried: it raises `TeacherHTTPError` with the status and the
server's message.

The API key is sent in the Authorization header and nowhere else. Servers sometimes
echo the key back in an error body ("Incorrect API key provided: sk-..."), so every
message that leaves this module goes through `_scrub` first, and the client's repr
leaves the key out.

Blocking stdlib HTTP (urllib) in a thread pool, rather than asyncio + httpx: the work is a
few dozen requests in flight at most, each waiting seconds for the model, which threads
handle well (the GIL is released while waiting); and it needs no extra dependency.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("meml")

MAX_RETRY_AFTER_S = 600.0  # a server asking for a longer pause is waited on for this long only


class TeacherHTTPError(RuntimeError):
    """A request that failed for good; `status` is the HTTP status, None for network errors."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable  # True when it was retried until max_retries ran out


@dataclass
class ChatReply:
    content: str  # the answer; a reasoning model's thinking (reasoning_content) is not part of it
    finished: bool  # False when the server cut the answer at max_tokens
    extra: dict = field(default_factory=dict)  # finish_reason, reasoning_chars


class _Transient(Exception):
    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.status = status
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date).

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after(None) is None
    True
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(retry: int, base_s: float, max_s: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with jitter: half the step fixed, half random, so many clients
    that failed together do not retry together; never shorter than Retry-After."""
    step = min(max_s, base_s * 2**retry)
    delay = step / 2 + rng.uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


class ChatClient:
    backoff_base_s = 1.0  # first retry waits 0.5-1 s, then doubling
    backoff_max_s = 60.0

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        sleep: Callable[[float], None] = time.sleep,
        seed: int = 0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key or ""
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.sleep = sleep
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def complete(self, messages: list[dict], temperature: float, top_p: float, max_tokens: int) -> ChatReply:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "n": 1}
        data = json.dumps(body).encode("utf-8")
        for retry in range(self.max_retries + 1):
            try:
                return self._post(data)
            except _Transient as exc:
                if retry == self.max_retries:
                    raise TeacherHTTPError(
                        f"{self.url}: gave up after {retry + 1} tries, last: {exc}", exc.status, retryable=True
                    ) from None
                delay = backoff_delay(retry, self.backoff_base_s, self.backoff_max_s, exc.retry_after, self._rng)
                log.info("%s: %s; retry %d/%d in %.2fs", self.url, exc, retry + 1, self.max_retries, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, data: bytes) -> ChatReply:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:  # before URLError, its parent
            detail = self._scrub(_error_detail(exc))
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}: {detail}", exc.code, parse_retry_after(exc.headers.get("Retry-After"))) from None
            raise TeacherHTTPError(f"{self.url}: HTTP {exc.code}: {detail}", exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # OSError covers timeouts
            reason = getattr(exc, "reason", exc)
            raise _Transient(self._scrub(f"{type(exc).__name__}: {reason}")) from None
        return self._parse(raw)

    def _parse(self, raw: bytes) -> ChatReply:
        try:
            choice = json.loads(raw)["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._scrub(raw[:200].decode("utf-8", "replace"))
            raise TeacherHTTPError(f"{self.url}: the reply is not a chat completion (does base_url end in /v1?): {snippet!r}") from None
        reason = choice.get("finish_reason")
        extra = {"finish_reason": reason}
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if thinking:
            extra["reasoning_chars"] = len(thinking)
        return ChatReply(message.get("content") or "", reason != "length", extra)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's error message: OpenAI's {"error": {"message": ...}} or the body's start."""
    try:
        body = exc.read().decode("utf-8", "replace")
    except OSError:
        return exc.reason or ""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return body[:300].strip() or str(exc.reason)
