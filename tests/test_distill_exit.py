"""`meml distill` whose every request fails is not a success: exit 1 and a message with the
count (it used to exit 0 when fewer pairs failed than stop the run as a dead endpoint).
Uses the loopback chat server of test_distill_http.py."""

import threading

import pytest
from test_distill_http import KEY, KEY_ENV, FakeChatServer, _golds, _overrides, _rows

from meml.cli import main
from meml.distill.http_client import ChatClient


@pytest.fixture
def chat_server(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(ChatClient, "backoff_base_s", 0.01)
    srv = FakeChatServer(_golds(tmp_path))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_distill_where_every_request_fails_exits_1_with_the_count(chat_server, tmp_path, capsys):
    chat_server.default = "400"  # each pair fails at once; 2 pairs stay under the 2 x concurrency that stops a run
    args = ["distill", *_overrides(tmp_path, chat_server, **{"distill.max_examples": 1, "distill.concurrency": 2})]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: the teacher failed on all 2 requested pairs (each after its retries); nothing was written" in err
    assert len(chat_server.requests) == 2 and _rows(tmp_path / "traces.jsonl") == []


def test_distill_where_some_requests_fail_exits_0_and_says_how_many(chat_server, tmp_path, capsys):
    chat_server.plan = ["400"]
    assert main(["distill", *_overrides(tmp_path, chat_server, **{"distill.concurrency": 1})]) == 0
    assert "warning: the teacher failed on 1 of 8 pairs; they were not written" in capsys.readouterr().err
    assert len(_rows(tmp_path / "traces.jsonl")) == 7
