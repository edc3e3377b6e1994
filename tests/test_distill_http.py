"""`meml distill` against an OpenAI-compatible server started here on loopback.

The server answers right or wrong, or fails on request (429 with Retry-After, 500, a
hang past the client's timeout, 400, 401), records every request and the most requests
it had in flight at once. No network, no model."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meml.core.errors import ConfigError
from meml.core.load import load_config
from meml.distill import run_distill
from meml.distill.http_client import ChatClient, TeacherHTTPError, looks_like_a_key
from meml.distill.output import done_pairs
from meml.tasks.experts import experts_from_config
from meml.tasks.traces import load_expert_traces
from meml.train.session import open_workload

KEY = "sk-test-0123456789abcdef"
KEY_ENV = "MEML_TEST_DISTILL_KEY"


class FakeChatServer(ThreadingHTTPServer):
    """Modes: right, wrong, wrong_once (wrong the first time a prompt is seen, then right),
    reasoning, 429, 500, hang, 400, 401. `plan` is used up first, then `default`."""

    daemon_threads = True

    def __init__(self, golds: dict[str, str]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.golds = golds  # question text -> gold answer
        self.plan: list[str] = []
        self.default = "right"
        self.delay_s = 0.0
        self.hang_s = 0.6
        self.retry_after = "2"  # seconds, sent with every 429
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def gold(self, user: str) -> str:
        return next(a for q, a in self.golds.items() if user.startswith(q))


class _Handler(BaseHTTPRequestHandler):
    server: FakeChatServer

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        with srv.lock:
            mode = srv.plan.pop(0) if srv.plan else srv.default
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = json.dumps(body["messages"])  # system prompt + question: one expert's pair
            srv.seen[prompt] = srv.seen.get(prompt, 0) + 1
            first_time = srv.seen[prompt] == 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            time.sleep(srv.delay_s)
            status, payload, headers = self._answer(mode, user, first_time)
        finally:
            with srv.lock:  # before replying: the client may send its next request as soon as it reads this
                srv.in_flight -= 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            self._send(status, payload, headers)

    def _answer(self, mode: str, user: str, first_time: bool) -> tuple[int, dict, dict]:
        auth = self.headers.get("Authorization") or ""
        if mode == "hang":
            time.sleep(self.server.hang_s)
            mode = "right"
        if mode in ("429", "500", "400", "401"):
            headers = {"Retry-After": self.server.retry_after} if mode == "429" else {}
            # like some hosted APIs, echo the key back in the message
            return int(mode), {"error": {"message": f"refused ({mode}) for key {auth[7:]}"}}, headers
        right = mode in ("right", "reasoning") or (mode == "wrong_once" and not first_time)
        gold = self.server.gold(user)
        content = f"Work it out. The answer is {gold}." if right else f"The answer is {int(float(gold)) + 1}."
        message = {"role": "assistant", "content": content}
        if mode == "reasoning":
            message["reasoning_content"] = "thinking " * 10
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}, {}

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def _overrides(tmp_path: Path, server: FakeChatServer | None = None, **extra) -> list[str]:
    base = {
        "output_dir": str(tmp_path / "run"),
        "task.options": "{train_size: 20, test_size: 4, difficulty: 1}",
        "distill.teacher": "openai",
        "distill.model": "teacher-model",
        "distill.api_key_env": KEY_ENV,
        "distill.output": str(tmp_path / "traces.jsonl"),
        "distill.max_examples": 4,
        "distill.experts": "[tutor, checker]",
        "distill.samples_per_question": 2,
        "distill.concurrency": 2,
        "distill.max_retries": 2,
        "distill.request_timeout_s": 0.3,
    }
    if server is not None:
        base["distill.base_url"] = server.base_url
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _golds(tmp_path: Path) -> dict[str, str]:
    s = open_workload(load_config(None, _overrides(tmp_path)))
    return {e.question: e.answer for e in s.train_examples}


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(ChatClient, "backoff_base_s", 0.01)  # real retries, short waits
    srv = FakeChatServer(_golds(tmp_path))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _client(server: FakeChatServer, sleeps: list[float] | None = None, max_retries: int = 3) -> ChatClient:
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return ChatClient(server.base_url, "teacher-model", KEY, timeout_s=0.3, max_retries=max_retries, sleep=sleep)


def _ask(client: ChatClient, server: FakeChatServer):
    question = next(iter(server.golds))
    return client.complete([{"role": "user", "content": question}], temperature=0.7, top_p=1.0, max_tokens=32)


# ----------------------------------------------------------------------------- the client


def test_client_retries_429_500_and_timeouts_then_answers(server):
    server.plan = ["429", "500", "hang"]
    sleeps: list[float] = []
    reply = _ask(_client(server, sleeps), server)
    assert "The answer is" in reply.content and reply.finished
    assert len(server.requests) == 4
    assert len(sleeps) == 3 and sleeps[0] >= 2.0  # the 429's Retry-After: 2 is respected
    sent = server.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == f"Bearer {KEY}"
    assert sent["body"]["model"] == "teacher-model" and sent["body"]["n"] == 1 and sent["body"]["max_tokens"] == 32


def test_client_gives_up_after_max_retries(server):
    server.default = "500"
    with pytest.raises(TeacherHTTPError) as err:
        _ask(_client(server, max_retries=2), server)
    assert len(server.requests) == 3  # one try and two retries
    assert err.value.status == 500 and err.value.retryable and "gave up after 3 tries" in str(err.value)


def test_client_does_not_retry_other_4xx(server):
    server.default = "400"
    with pytest.raises(TeacherHTTPError) as err:
        _ask(_client(server), server)
    assert len(server.requests) == 1
    assert err.value.status == 400 and "refused (400)" in str(err.value) and KEY not in str(err.value)


def test_client_keeps_content_and_measures_reasoning(server):
    server.default = "reasoning"
    reply = _ask(_client(server), server)
    assert reply.content.startswith("Work it out.") and "thinking" not in reply.content
    assert reply.extra["reasoning_chars"] == len("thinking " * 10)


def test_client_connection_refused_is_retried_then_reported(server):
    client = ChatClient("http://127.0.0.1:9/v1", "m", KEY, timeout_s=0.3, max_retries=1, sleep=lambda s: None)
    with pytest.raises(TeacherHTTPError, match="gave up after 2 tries") as err:
        client.complete([{"role": "user", "content": "hi"}], 0.0, 1.0, 8)
    assert err.value.status is None and KEY not in repr(client)


# ----------------------------------------------------------------------------- the command


def test_concurrency_is_bounded(server, tmp_path):
    server.delay_s = 0.1
    report = run_distill(
        load_config(None, _overrides(tmp_path, server, **{"distill.concurrency": 3, "distill.max_examples": 6}))
    )
    assert 2 <= server.max_in_flight <= 3
    rows = _rows(tmp_path / "traces.jsonl")
    assert len(rows) == 12 and all(r["verified"] for r in rows)
    assert report["tutor"] == {"pairs": 6, "verified": 6, "unverified": 0, "failed": 0, "attempts": 6, "skipped": 0}


def test_rejection_sampling_keeps_first_verified_and_flags_the_rest(server, tmp_path):
    server.default = "wrong_once"
    run_distill(load_config(None, _overrides(tmp_path, server, **{"distill.samples_per_question": 3})))
    rows = _rows(tmp_path / "traces.jsonl")
    assert len(rows) == 8 and len(server.requests) == 16  # the third try is never asked
    assert all(r["verified"] and r["attempt"] == 2 and r["teacher"] == "openai:teacher-model" for r in rows)
    assert {r["expert"] for r in rows} == {"tutor", "checker"}

    out = tmp_path / "one_try.jsonl"
    server.default = "wrong"
    report = run_distill(
        load_config(None, _overrides(tmp_path, server, **{"distill.samples_per_question": 1, "distill.output": out}))
    )
    assert report["checker"]["unverified"] == 4 and report["checker"]["attempts"] == 4
    rows = _rows(out)
    assert len(rows) == 8 and not any(r["verified"] for r in rows)
    # the trainer's loader re-verifies: flagged rows are dropped and counted
    cfg = load_config(None, _overrides(tmp_path))
    s = open_workload(cfg)
    experts = experts_from_config(cfg.experts)
    experts[0] = type(experts[0])(experts[0].name, experts[0].system_prompt, f"file:{out}")
    traces, report = load_expert_traces(s.task, experts[:1], s.train_examples[:4])
    assert traces == {} and report["tutor"]["dropped_unverified"] == 4


def test_resume_after_a_killed_run_skips_written_pairs(server, tmp_path):
    out = tmp_path / "traces.jsonl"
    cfg = load_config(None, _overrides(tmp_path, server, **{"distill.concurrency": 1}))
    server.plan = ["right"] * 5
    server.default = "401"  # the run stops at the sixth pair, like a killed one
    with pytest.raises(TeacherHTTPError, match="401"):
        run_distill(cfg)
    assert len(_rows(out)) == 5
    with out.open("a") as f:
        f.write('{"question_id": "arith-train-3", "exp')  # a row cut short by the kill
    server.default = "right"
    asked_before = len(server.requests)
    report = run_distill(cfg)
    assert len(server.requests) - asked_before == 3
    assert sum(c["skipped"] for c in report.values()) == 5 and sum(c["pairs"] for c in report.values()) == 3
    rows = _rows(out)  # parses: the partial line is gone
    assert len(rows) == 8 and len(done_pairs(out)) == 8


def test_a_bad_request_fails_one_pair_and_the_run_goes_on(server, tmp_path):
    server.plan = ["400"]
    report = run_distill(load_config(None, _overrides(tmp_path, server, **{"distill.concurrency": 1})))
    assert sum(c["failed"] for c in report.values()) == 1
    assert len(_rows(tmp_path / "traces.jsonl")) == 7  # the failed pair is left for a rerun


def test_a_dead_endpoint_stops_the_run(server, tmp_path):
    server.default = "500"
    cfg = load_config(None, _overrides(tmp_path, server, **{"distill.concurrency": 1, "distill.max_retries": 0}))
    with pytest.raises(TeacherHTTPError, match="2 pairs in a row failed"):
        run_distill(cfg)
    assert len(server.requests) == 2


def test_the_api_key_never_leaks(server, tmp_path, caplog, capsys):
    from meml.cli import main

    server.plan = ["500", "right", "429", "400"]  # errors that echo the key, then a fatal one
    server.default = "401"
    server.retry_after = "0"
    caplog.set_level(logging.DEBUG, logger="meml")
    rc = main(["-v", "distill", *_overrides(tmp_path, server, **{"distill.concurrency": 1})])
    out, err = capsys.readouterr()
    assert rc == 2 and "401" in err and "refused" in err
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)  # it was sent...
    assert "retry" in caplog.text and "refused (500)" in caplog.text
    for text in (caplog.text, out, err, (tmp_path / "traces.jsonl").read_text()):  # ...and never shown
        assert KEY not in text
    assert "***" in err


def test_no_key_sends_no_authorization(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    run_distill(load_config(None, _overrides(tmp_path, server, **{"distill.max_examples": 1})))
    assert server.requests and all(r["auth"] is None for r in server.requests)


def test_an_expert_trains_on_the_written_file(server, tmp_path):
    """The documented hand-over: experts.N.trace_source=file:PATH, then stage 1 loads it."""
    out = tmp_path / "traces.jsonl"
    run_distill(load_config(None, _overrides(tmp_path, server)))
    cfg = load_config(None, [*_overrides(tmp_path), "sft.max_examples=4", f"experts.2.trace_source=file:{out}"])
    s = open_workload(cfg)
    assert s.trace_report["checker"] == {
        "source": f"file:{out}",
        "kept": 4,
        "dropped_unverified": 0,
        "unknown_question": 0,
    }
    assert s.traces[(s.train_examples[0].id, 2)].startswith("Work it out.")


# ----------------------------------------------------------------------------- where the key may go


class _Recorder(ThreadingHTTPServer):
    """Answers any request with (status, headers) from `plan` while it lasts, then with
    `status` and `headers`, and a chat completion as the body; records each request's
    method, path and Authorization header."""

    daemon_threads = True

    def __init__(self, status: int = 200, headers: dict | None = None, plan: list | None = None):
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.status, self.headers, self.plan = status, headers or {}, plan or []
        self.requests: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def log_message(self, *args) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        srv = self.server
        srv.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization")})
        status, headers = srv.plan.pop(0) if srv.plan else (srv.status, srv.headers)
        message = {"role": "assistant", "content": "The answer is 0."}
        _Handler._send(self, status, {"choices": [{"message": message, "finish_reason": "stop"}]}, headers)

    do_GET = do_POST = _any


@contextlib.contextmanager
def _serving(srv: ThreadingHTTPServer):
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_redirect_to_another_host_gets_neither_the_key_nor_a_trace(tmp_path, monkeypatch, caplog, capsys):
    """The endpoint answers 302 to a server on another port (another origin): the client
    stops there, so that server never sees a request, let alone the Authorization header."""
    from meml.cli import main

    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(ChatClient, "backoff_base_s", 0.01)
    caplog.set_level(logging.DEBUG, logger="meml")
    with _serving(_Recorder()) as other:
        location = f"{other.base_url}/chat/completions?leaked={KEY}"  # a target that names the key: scrubbed too
        with _serving(_Recorder(302, {"Location": location})) as endpoint:
            rc = main(
                [
                    "-v",
                    "distill",
                    *_overrides(tmp_path, **{"distill.base_url": endpoint.base_url, "distill.concurrency": 1}),
                ]
            )
    out, err = capsys.readouterr()
    assert rc == 2 and "HTTP 302 redirects to another host (http://127.0.0.1:" in err and "not followed" in err
    assert (
        len(endpoint.requests) == 1 and endpoint.requests[0]["auth"] == f"Bearer {KEY}"
    )  # one request, then the run stops
    assert other.requests == []
    traces = tmp_path / "traces.jsonl"
    assert not traces.exists() or traces.read_text() == ""
    for text in (caplog.text, out, err):
        assert KEY not in text


def test_a_redirect_within_the_endpoint_is_still_followed():
    """Same scheme, host and port: urllib's usual handling (a 302 to a POST becomes a GET)."""
    with _serving(_Recorder(plan=[(302, {"Location": "/v1/moved"})])) as srv:
        reply = ChatClient(srv.base_url, "m", KEY, timeout_s=2, max_retries=0).complete(
            [{"role": "user", "content": "hi"}], 0.0, 1.0, 8
        )
    assert reply.content == "The answer is 0."
    assert [(r["method"], r["path"]) for r in srv.requests] == [("POST", "/v1/chat/completions"), ("GET", "/v1/moved")]


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/v1", "localhost:8000/v1", "http:///v1"])
def test_only_http_and_https_base_urls_are_accepted(url, tmp_path, monkeypatch, capsys):
    from meml.cli import main

    monkeypatch.setenv(KEY_ENV, KEY)
    rc = main(["distill", *_overrides(tmp_path, **{"distill.base_url": url})])
    err = capsys.readouterr().err
    assert rc == 2 and "give an http:// or https:// URL" in err
    assert not (tmp_path / "traces.jsonl").exists() and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="http:// or https://"):
        ChatClient(url, "m", KEY, timeout_s=1, max_retries=0)


def test_a_file_url_is_not_read(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"choices": [{"message": {"content": "SECRET FILE CONTENT"}}]}')
    with pytest.raises(ConfigError) as err:
        ChatClient(f"file://{tmp_path}", "m", None, timeout_s=1, max_retries=0)
    assert "SECRET" not in str(err.value)


def test_a_user_and_password_in_the_base_url_are_refused_without_echoing_them():
    with pytest.raises(ConfigError, match="holds a user name or password") as err:
        ChatClient("https://me:hunter2@api.example.com/v1", "m", None, timeout_s=1, max_retries=0)
    assert "hunter2" not in str(err.value) and "https://api.example.com/v1" in str(err.value)


@pytest.mark.parametrize(
    "value", [KEY, "sk_live_51Habcdef", "hf_AbCdEfGhIjKlMnOpQr", "Bearer abc", "gsk_0123", "AbCdEf0123456789GhIjKlMnOp"]
)
def test_a_key_given_as_api_key_env_is_refused_without_showing_it(value, tmp_path, monkeypatch, caplog, capsys):
    from meml.cli import main

    monkeypatch.setattr(ChatClient, "backoff_base_s", 0.01)  # the code before this check tried a dead port
    caplog.set_level(logging.DEBUG, logger="meml")
    args = _overrides(
        tmp_path,
        **{"distill.api_key_env": value, "distill.base_url": "http://127.0.0.1:9/v1", "distill.max_retries": 0},
    )
    rc = main(["-v", "distill", *args])
    out, err = capsys.readouterr()
    assert rc == 2 and "distill.api_key_env must be the NAME of the environment variable" in err
    for text in (caplog.text, out, err):
        assert value not in text
    assert not (tmp_path / "run").exists() and not (tmp_path / "traces.jsonl").exists()  # no config.yaml holding it


@pytest.mark.parametrize(
    "name", ["OPENAI_API_KEY", "DEEPSEEK_API_KEY", "ARK_API_KEY", "HF_TOKEN", "my_teacher_key", "KEY2"]
)
def test_variable_names_are_not_mistaken_for_keys(name):
    assert not looks_like_a_key(name)


@pytest.mark.parametrize(
    ("url", "key", "warned"),
    [
        ("http://192.0.2.1:8000/v1", KEY, True),
        ("http://teacher.example.com/v1", KEY, True),
        ("http://192.0.2.1:8000/v1", None, False),  # no key to expose
        ("https://192.0.2.1/v1", KEY, False),
        ("http://127.0.0.1:8000/v1", KEY, False),
        ("http://localhost:8000/v1", KEY, False),
        ("http://[::1]:8000/v1", KEY, False),
    ],
)
def test_plain_http_to_another_machine_warns_that_the_key_is_unencrypted(url, key, warned, caplog):
    caplog.set_level(logging.WARNING, logger="meml")
    ChatClient(url, "m", key, timeout_s=1, max_retries=0)  # nothing is sent yet
    assert ("the API key travels unencrypted" in caplog.text) == warned
    assert KEY not in caplog.text
