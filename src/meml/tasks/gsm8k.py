"""GSM8K: grade-school math word problems (JSONL rows {question, answer}).

`answer` is a worked solution with `<<a*b=c>>` calculator notes whose last line is
`#### <final answer>`. Two trace styles come from it:
  prose      the solution text without the calculator notes, ending "The answer is N."
  equations  the calculator notes alone, one equation per line, ending the same way
Splits: train (7,473) and test (1,319). Example ids: "gsm8k-<split>-<line - 1>".
task.path: a directory holding <split>.jsonl, a .jsonl file, or a hub dataset id
(default "openai/gsm8k", config "main", loaded through `datasets`).
"""

from __future__ import annotations

import re

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example
from meml.tasks.base import NUMERIC_FORMAT, Task
from meml.tasks.generic import collect, make_verify, open_split, text_field
from meml.tasks.verifiers import parse_number

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


def parse_row(row: dict, where: str, split: str, index: int) -> Example:
    question = text_field(row, "question", where)
    solution = text_field(row, "answer", where)
    try:
        body, final = split_solution(solution)
    except ValueError as exc:
        raise DataError(f"{where}: field 'answer': {exc}") from None
    return Example(id=f"gsm8k-{split}-{index}", question=question, answer=final, rationales=rationales(body, final))


def build(cfg: TaskConfig, lenient: bool) -> Task:
    if cfg.options:
        raise DataError(f"task.options: gsm8k takes no options (got {sorted(cfg.options)})")
    skipped: dict[str, int] = {}

    def load(split: str) -> list[Example]:
        rows, where, name = open_split(cfg.path or HUB_ID, split, fmt="jsonl" if cfg.path else None, hub_config="main")
        examples, skipped[split] = collect(rows, lambda r, w, i: parse_row(r, w, name, i), cfg.skip_invalid, where)
        return examples

    verify = make_verify("numeric", lenient)
    return Task("gsm8k", load, verify, NUMERIC_FORMAT, styles=("prose", "equations"), skipped=skipped)
