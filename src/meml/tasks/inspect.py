"""What a task's data holds, without a model: the format of a path, the gold answers the
verifier can read, the rationales it accepts (`meml data inspect` prints these; the
trainer checks the gold parse rate before it loads a model)."""

from __future__ import annotations

import json
from pathlib import Path

from meml.core.types import Example
from meml.tasks.base import Task

MAX_LISTED = 20


def first_row(path: Path) -> dict:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            line = next((raw for raw in f if raw.strip()), "{}")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return {}
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}
        row = data[0] if isinstance(data, list) and data else {}
    else:
        return {}
    return row if isinstance(row, dict) else {}


def guess_task(path: Path) -> str:
    """The registered task whose native format the file (or the directory's files) has."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json")) if path.is_dir() else [path]
    for file in files:
        row = first_row(file)
        if {"Problem", "options", "correct"} <= set(row):
            return "mathqa"
        if {"qid", "question", "answer"} <= set(row) and ("facts" in row or "decomposition" in row):
            return "strategyqa"
        if file.suffix == ".jsonl" and "####" in str(row.get("answer", "")):
            return "gsm8k"
    return "generic"


# ----------------------------------------------------------------------------- figures


def unparsed_gold(task: Task, examples: list[Example]) -> list[str]:
    """Ids of the examples whose gold answer the task's verifier cannot read: it abstains on
    "The answer is <gold>.", so it would abstain on every answer to that question too."""
    return [e.id for e in examples if task.verify(f"The answer is {e.answer}.", e, True).score is None]


def split_report(task: Task, examples: list[Example]) -> dict:
    """Row count, gold parse rate and rationale self-verification of one split."""
    unparsed = unparsed_gold(task, examples)
    rationales = {}
    for style in task.styles:
        scores = {e.id: task.verify(e.rationales[style], e, True).score for e in examples if e.rationales.get(style)}
        failed = [i for i, score in scores.items() if score == 0.0]
        rationales[style] = {
            "present": len(scores),
            "verified": sum(score == 1.0 for score in scores.values()),
            "abstained": sum(score is None for score in scores.values()),  # their gold did not parse
            "failed_ids": failed[:MAX_LISTED],
        }
    return {
        "rows": len(examples),
        "gold_parsed": len(examples) - len(unparsed),
        "gold_parse_rate": (len(examples) - len(unparsed)) / max(1, len(examples)),
        "unparsed_ids": unparsed[:MAX_LISTED],
        "rationales": rationales,
    }
