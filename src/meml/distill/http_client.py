"""A small client for OpenAI-compatible chat endpoints (vLLM, SGLang, hosted APIs).

One call is one POST {base_url}/chat/completions with n=1. Transient failures (429, 5xx,
timeouts, refused or dropped connections) are retried with exponential backoff and
jitter, waiting at least what a Retry-After header asks for, at most `max_retries` times.
Any other 4xx is not retried: it raises `TeacherHTTPError` with the status and the
server's message.

The API key is sent in the Authorization header and nowhere else. Servers sometimes
echo the key back in an error body ("Incorrect API key provided: sk-..."), so every
message that leaves this module goes through `_scrub` first, and the client's repr
leaves the key out. Only http and https base URLs are accepted (urllib would also read
file: and ftp: URLs). A redirect to another origin (scheme, host or port) is not followed:
urllib would send the Authorization header along to it, and take that host's reply as the
teacher's. Plain http to a host other than this machine is allowed with a warning when a
key is set, since the key then travels unencrypted. `check_endpoint` catches a key written
where the name of its environment variable belongs, without repeating it.

Blocking stdlib HTTP (urllib) in a thread pool, rather than asyncio + httpx: the work is a
few dozen requests in flight at most, each waiting seconds for the model, which threads
handle well (the GIL is released while waiting); and it needs no extra dependency.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import logging
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from meml.core.errors import ConfigError

log = logging.getLogger("meml")

MAX_RETRY_AFTER_S = 600.0  # a server asking for a longer pause is waited on for this long only
DEFAULT_PORTS = {"http": 80, "https": 443}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KEY_PREFIX = re.compile(r"(sk|pk|rk|gsk|hf|xai)[-_]")  # how common API keys start (lower case, unlike variable names)


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


class _OtherOrigin(Exception):
    """Raised from inside urllib when a reply redirects to another origin."""

    def __init__(self, code: int, target: str):
        super().__init__(target)
        self.code, self.target = code, target


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, except that a redirect to another scheme, host or port
    is refused instead of followed with every header, Authorization included."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            fp.close()
            raise _OtherOrigin(code, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in.

    >>> origin("http://Example.com/v1") == origin("http://example.com:80/x")
    True
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a number
        port = None
    return scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme)


def _show(url: str) -> str:
    """A URL for messages, without any user name or password in it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def looks_like_a_key(value: str) -> bool:
    """Whether distill.api_key_env holds what looks like a key rather than a variable name.

    >>> looks_like_a_key("OPENAI_API_KEY"), looks_like_a_key("sk-proj-abc123")
    (False, True)
    """
    if not ENV_NAME.fullmatch(value) or KEY_PREFIX.match(value):
        return True
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return len(value) >= 24 and mixed and "_" not in value  # a random token, not a NAME_LIKE_THIS


def check_endpoint(base_url: str | None, api_key_env: str) -> None:
    """Refuse, before anything runs or is logged, a base_url that is not http(s) and an
    api_key_env that holds a key instead of a variable name (the message leaves it out).
    base_url None: no endpoint is used (another teacher), only api_key_env is checked."""
    if api_key_env and looks_like_a_key(api_key_env):
        raise ConfigError(
            "distill.api_key_env must be the NAME of the environment variable that holds the API key "
            "(e.g. OPENAI_API_KEY), and the value given looks like a key itself; it is not repeated here, "
            "and nothing was sent or saved. Put the key in a variable (export MY_API_KEY=...) and pass "
            "distill.api_key_env=MY_API_KEY; if that value was a real key, consider it exposed (shell history) "
            "and replace it."
        )
    if base_url is None:
        return
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(
            f"distill.base_url={_show(base_url)!r}: give an http:// or https:// URL of an OpenAI-compatible "
            "endpoint (e.g. http://localhost:8000/v1); other kinds of URL (file:, ftp:, ...) are not accepted"
        )
    if parts.username or parts.password:
        raise ConfigError(
            f"distill.base_url={_show(base_url)!r}: holds a user name or password; leave them out and put the API key "
            "in the environment variable named by distill.api_key_env"
        )


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
        check_endpoint(base_url, "")  # also for clients made directly, not through meml distill
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key or ""
        scheme, host, _ = origin(self.url)
        if self._api_key and scheme == "http" and not is_loopback(host):
            log.warning(
                "distill.base_url %s is plain http to another machine: the API key travels unencrypted; "
                "use https:// unless the network between is yours",
                _show(self.url),
            )
        self._opener = urllib.request.build_opener(_SameOriginRedirects)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.sleep = sleep
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r}, key={'set' if self._api_key else 'none'})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def complete(self, messages: list[dict], temperature: float, top_p: float, max_tokens: int) -> ChatReply:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "n": 1,
        }
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
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except _OtherOrigin as exc:
            scheme, host, port = origin(exc.target)
            raise TeacherHTTPError(
                self._scrub(
                    f"{self.url}: HTTP {exc.code} redirects to another host ({scheme}://{host}:{port}); not followed, "
                    "so the API key and the prompts do not go there. Set distill.base_url to the endpoint that answers."
                ),
                exc.code,
            ) from None
        except urllib.error.HTTPError as exc:  # before URLError, its parent
            detail = self._scrub(_error_detail(exc))
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(
                    f"HTTP {exc.code}: {detail}", exc.code, parse_retry_after(exc.headers.get("Retry-After"))
                ) from None
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
            raise TeacherHTTPError(
                f"{self.url}: the reply is not a chat completion (does base_url end in /v1?): {snippet!r}"
            ) from None
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
