"""Stage-1 (MEF) traces: one worked solution per (question, expert).

An expert's `trace_source` is a rationale style the task provides ("prose",
"equations", ...), "none" (no stage-1 traces for this expert), or "file:PATH", a JSONL
file of rows {"question_id", "expert", "response"} (as written by `meml distill`). Every
trace from a file is verified against the gold answer; unverified ones are dropped and
counted, never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from meml.core.errors import DataError
from meml.core.types import Example, Expert
from meml.tasks.base import Task


def read_trace_file(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"trace file {path} does not exist (write it with `meml distill`)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            for key in ("question_id", "expert", "response"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise DataError(f"{path}:{lineno}: field '{key}' is missing or not a string")
            rows.append(row)
    return rows


def load_expert_traces(
    task: Task, experts: list[Expert], examples: list[Example]
) -> tuple[dict[tuple[str, int], str], dict]:
    """(question id, expert index) -> trace text, and a report of what was kept and dropped."""
    traces: dict[tuple[str, int], str] = {}
    report: dict[str, dict] = {}
    by_id = {e.id: e for e in examples}
    for i, expert in enumerate(experts):
        source = expert.trace_source
        kept = dropped = unknown = 0
        if source == "none":
            pass  # an expert without stage-1 traces: it learns only in stage 2
        elif source.startswith("file:"):
            path = Path(source[len("file:") :]).expanduser()
            for row in read_trace_file(path):
                if row["expert"] != expert.name:
                    continue
                example = by_id.get(row["question_id"])
                if example is None:
                    unknown += 1
                    continue
                # a response the writer flagged as unverified or cut at the length limit is
                # dropped even if its text happens to contain a correct answer marker
                finished = row.get("finish_reason") != "length"
                if row.get("verified") is not False and task.verify(row["response"], example, finished).score == 1.0:
                    if (example.id, i) not in traces:
                        traces[(example.id, i)] = row["response"]
                        kept += 1
                else:
                    dropped += 1
        else:
            if source not in task.styles:
                raise DataError(
                    f"expert '{expert.name}': trace_source '{source}' is not a rationale style of task "
                    f"'{task.name}' (styles: {', '.join(task.styles)}); or use file:PATH"
                )
            for example in examples:
                text = example.rationales.get(source)
                if text:
                    traces[(example.id, i)] = text
                    kept += 1
        report[expert.name] = {
            "source": source,
            "kept": kept,
            "dropped_unverified": dropped,
            "unknown_question": unknown,
        }
    return traces, report
