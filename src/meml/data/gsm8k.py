"""GSM8K: grade-school math word problems (JSONL rows {question, answer}).

`answer` is a worked solution with `<<a*b=c>>` calculator notes whose last line is
`#### <final answer>`. Two trace styles come from it:
  prose      the solution text without the calculator notes, ending "The answer is N."
  equations  the calculator notes alone, one equation per line, ending the same way
task.path: a directory holding <split>.jsonl, a .jsonl file, or a hub dataset id
(default "openai/gsm8k", config "main", loaded through `datasets`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from meml.config import TaskConfig
from meml.data.base import NUMERIC_FORMAT, DataError, Task, register_task
from meml.rewards.verifiers import parse_number, verify_numeric
from meml.types import Example

HUB_ID = "openai/gsm8k"
_CALC_RE = re.compile(r"<<([^<>]*)>>")


def split_solution(solution: str) -> tuple[str, str]:
    """(worked solution, final answer) of a GSM8K answer field; raises ValueError."""
    if "####" not in solution:
        raise ValueError("no '####' final-answer line")
    body, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if parse_number(final) is None:
        raise ValueError(f"final answer '{final}' is not a number")
    return body.strip(), final


def rationales(body: str, final: str) -> dict[str, str]:
    ending = f"The answer is {final}."
    prose = _CALC_RE.sub("", body).strip()
    notes = [n.strip() for n in _CALC_RE.findall(body) if n.strip()]
    equations = "\n".join(notes) if notes else prose
    return {"prose": f"{prose}\n{ending}", "equations": f"{equations}\n{ending}"}


def parse_row(row: dict, where: str, index: int) -> Example:
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: field '{key}' is missing or not a non-empty string")
    try:
        body, final = split_solution(row["answer"])
    except ValueError as exc:
        raise DataError(f"{where}: field 'answer': {exc}") from None
    return Example(
        id=str(row.get("id", f"gsm8k-{index}")),
        question=row["question"].strip(),
        answer=final,
        rationales=rationales(body, final),
    )


def read_jsonl(path: Path, split: str, skip_invalid: bool) -> tuple[list[Example], int]:
    examples, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                row.setdefault("id", f"gsm8k-{split}-{lineno - 1}")
                examples.append(parse_row(row, where, lineno - 1))
            except DataError:
                if not skip_invalid:
                    raise
                skipped += 1
    return examples, skipped


@register_task("gsm8k")
def build(cfg: TaskConfig, lenient: bool) -> Task:
    def load(split: str) -> list[Example]:
        source = cfg.path or HUB_ID
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / f"{split}.jsonl"
            if not path.exists():
                raise DataError(f"task.path: no {split}.jsonl in {path.parent}")
        if path.exists():
            examples, _ = read_jsonl(path, split, cfg.skip_invalid)
            return examples
        from datasets import load_dataset

        rows = load_dataset(source, "main", split=split)
        return [parse_row({**row, "id": f"gsm8k-{split}-{i}"}, f"{source}[{split}] row {i}", i) for i, row in enumerate(rows)]

    def verify(completion: str, example: Example, finished: bool = True):
        return verify_numeric(completion, example.answer, finished=finished, lenient=lenient)

    return Task("gsm8k", load, verify, NUMERIC_FORMAT, styles=("prose", "equations"))
