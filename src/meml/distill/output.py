"""The trace file of `meml distill`: append-only JSONL, one row per finished pair.

A row is {"question_id", "expert", "response", "teacher", "verified", "attempt", ...}.
Rows are written and flushed one at a time as pairs finish, so a killed run loses only
the pairs in flight. On restart, (question_id, expert) pairs already in the file are
skipped. A line cut short by a kill mid-write is removed before appending, so the file
stays valid JSONL for `meml.tasks.traces`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from meml.tasks.traces import read_trace_file

log = logging.getLogger("meml")


def _drop_partial_last_line(path: Path) -> None:
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # 0 when the only line is partial
        f.truncate(keep)
    log.warning("%s: removed a partial last line (%d bytes) left by an interrupted run", path, size - keep)


def done_pairs(path: Path) -> set[tuple[str, str]]:
    """(question_id, expert name) pairs that already have a row (the file is read as stage 1
    reads it: tasks/traces.py; a malformed row is an error naming its line)."""
    if not path.exists():
        return set()
    return {(row["question_id"], row["expert"]) for row in read_trace_file(path)}


class TraceWriter:
    """Appends rows to the trace file and flushes each one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _drop_partial_last_line(path)
        self.path = path
        self.done = done_pairs(path)
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add((row["question_id"], row["expert"]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
