"""Users' own data: JSONL, JSON, CSV or parquet files, or a hub dataset, with a column
mapping; and the row readers every dataset loader shares.

    meml train task.name=generic task.path=data/ task.options.question=problem \
        task.options.answer=solution task.options.verifier=numeric

task.path: a directory holding <split>.<ext>, a path with "{split}" in it, one file
(then every split reads it: fine for `meml data inspect`, wrong for training), or a hub
dataset id. task.options (all optional):
  question, answer   column names (default "question", "answer")
  rationale          column with a worked solution, the expert-0 "prose" trace; a
                     solution that does not end in an answer the verifier reads gets
                     "The answer is <answer>." appended
  id                 column with a unique row id (default "<name>-<split>-<row>")
  extra              columns passed to reward functions (default: every other column)
  verifier           numeric (default) | choice | yes_no | text
  choices            for verifier=choice: the column holding the options, as a mapping
                     letter -> text, a list (lettered a, b, ...) or "a ) x , b ) y"
  format             jsonl | json | csv | parquet (default: the file's suffix)
  files              split -> file name inside task.path, e.g. {train: tr.csv, test: te.csv}
  hub_config         the hub dataset's config name
  instruction        replaces the verifier's format instruction

Every loader reads rows through `open_split` and `collect`: a malformed row raises a
DataError naming "<file>:<line>" (JSONL, CSV) or "<file> row <i>" (JSON, parquet, hub)
and the field; with task.skip_invalid such rows are skipped, counted, logged and kept in
`Task.skipped`; a split without rows is an error.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from meml.core import hub
from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example
from meml.tasks import verifiers
from meml.tasks.base import NUMERIC_FORMAT, Task
from meml.tasks.choices import CHOICE_FORMAT, choices_of, render_options, verify_choice

log = logging.getLogger(__name__)

YES_NO_FORMAT = 'End your reply with a sentence that starts with "The answer is" and says yes or no.'
TEXT_FORMAT = 'End your reply with a sentence that starts with "The answer is" and gives the final answer.'
INSTRUCTIONS = {"numeric": NUMERIC_FORMAT, "choice": CHOICE_FORMAT, "yes_no": YES_NO_FORMAT, "text": TEXT_FORMAT}
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
OPTIONS = (
    "question",
    "answer",
    "rationale",
    "id",
    "extra",
    "verifier",
    "choices",
    "format",
    "files",
    "hub_config",
    "instruction",
)

Row = tuple[str, int, object]  # (where, row index, the row's dict or the DataError reading it)


# ----------------------------------------------------------------------------- reading rows


# Python's csv module refuses fields over 128 KiB by default; a long worked solution or
# a long context column is legitimate data, so the limit is raised (to 2 GiB - 1, which
# fits a C long everywhere).
CSV_FIELD_LIMIT = 2**31 - 1


def read_rows(path: Path, fmt: str | None = None) -> Iterator[Row]:
    """Every row of a local file; a row that cannot be read at all comes as a DataError.

    A file that cannot be read as a whole (bytes that are not UTF-8 in JSON or CSV, a
    damaged parquet file) raises a DataError naming the file and, where known, the line."""
    fmt = fmt or SUFFIXES.get(path.suffix.lower())
    if fmt == "jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield (
                        where,
                        lineno - 1,
                        DataError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"),
                    )
                    continue
                if line.strip():
                    yield where, lineno - 1, _json_line(line, where)
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        yield from ((f"{path} row {i}", i, row) for i, row in enumerate(data))
    elif fmt == "csv":
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                for i, row in enumerate(reader):
                    yield f"{path}:{reader.line_num}", i, row
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num + 1}: not readable as CSV ({exc})") from None
    elif fmt == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc}); it may be truncated or damaged") from None
        yield from ((f"{path} row {i}", i, row) for i, row in enumerate(table.to_pylist()))
    else:
        raise DataError(f"{path}: unknown file format '{fmt}'; use task.options.format=jsonl|json|csv|parquet")


def _not_utf8(path: Path) -> DataError:
    """A DataError naming the first line of `path` that is not UTF-8 (read again in binary:
    a text reader's error position is relative to its buffer, not to the file)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")


def hub_rows(source: str, split: str, config: str | None = None) -> Iterator[Row]:
    """Rows of a hub dataset split, through `datasets` (downloads on first use)."""
    from datasets import load_dataset

    try:
        rows = load_dataset(source, config, split=split)
    except (
        OSError,
        ValueError,
        KeyError,
        ImportError,
    ) as exc:  # includes datasets' ConnectionError, DatasetNotFoundError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"task.path='{source}': could not load split '{split}' from the Hugging Face hub "
            f"({type(exc).__name__}: {first})"
        ) from None
    yield from ((f"{source}[{split}] row {i}", i, dict(row)) for i, row in enumerate(rows))


def open_split(
    source: str,
    split: str,
    names: dict[str, tuple[str, ...]] | None = None,
    fmt: str | None = None,
    hub_config: str | None = None,
    hub_splits: dict[str, str] | None = None,
) -> tuple[Iterator[Row], str, str]:
    """(rows, where they come from, the split's name for example ids) for one split of a
    local path or a hub id.

    `names` maps a split to the file stems to try in a directory, in order (so MathQA's
    "train" can fall back to dev.json, and its ids stay "mathqa-dev-<row>");
    `hub_splits` renames splits for the hub. A name that reads as a local path
    (`meml.core.hub.looks_like_local_path`) is never looked up on the hub."""
    path = Path(source.replace("{split}", split)).expanduser()
    if path.is_dir():
        stems = (names or {}).get(split, (split,))
        for stem in stems:
            for file in sorted(path.glob(f"{stem}.*")):
                if file.suffix.lower() in SUFFIXES and (fmt is None or SUFFIXES[file.suffix.lower()] == fmt):
                    if stem != split:
                        log.info("split '%s': no %s file in %s, reading %s", split, split, path, file.name)
                    return read_rows(file, fmt), str(file), stem
        raise DataError(
            f"task.path: no file for split '{split}' in {path} (looked for {', '.join(s + '.*' for s in stems)})"
        )
    if path.exists():
        return read_rows(path, fmt), str(path), split
    if hub.looks_like_local_path(source) or path.suffix.lower() in SUFFIXES:
        raise DataError(
            f"task.path: {path} does not exist (it reads as a local path, so it is not looked up "
            "on the Hugging Face hub)"
        )
    # Offline, `datasets` reads its cache or fails at once by itself; online with the hub out
    # of reach it would retry for half a minute, so that is caught here.
    reason = None if hub.offline() else hub.unreachable_reason()
    if reason:
        raise DataError(
            f"task.path='{source}' is not a local path, and the Hugging Face hub ({hub.endpoint()}) "
            f"cannot be reached ({reason}): check the network, give a local path, or set "
            "HF_HUB_OFFLINE=1 to use a copy in the datasets cache"
        )
    hub_split = (hub_splits or {}).get(split, split)
    return hub_rows(source, hub_split, hub_config), f"{source}[{hub_split}]", split


def collect(
    rows: Iterator[Row], parse: Callable[[dict, str, int], Example], skip_invalid: bool, source: str
) -> tuple[list[Example], int]:
    """Parse rows into Examples: a malformed row or a repeated id raises, or with
    `skip_invalid` is skipped and counted. No rows at all is an error."""
    examples: list[Example] = []
    seen: dict[str, str] = {}
    skipped, first_error = 0, None
    for where, index, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
            example = parse(row, where, index)
            if example.id in seen:
                raise DataError(f"{where}: field 'id': '{example.id}' repeats the id of {seen[example.id]}")
            seen[example.id] = where
            examples.append(example)
        except DataError as exc:
            if not skip_invalid:
                raise
            skipped += 1
            first_error = first_error or str(exc)
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (task.skip_invalid); the first: %s", source, skipped, first_error)
    if not examples:
        raise DataError(f"{source}: the split has no rows" + (f" ({skipped} malformed, skipped)" if skipped else ""))
    return examples, skipped


def text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' is missing or not a non-empty string")
    return value.strip()


# ----------------------------------------------------------------------------- the generic task


def make_verify(kind: str, lenient: bool, choices_key: str = "options") -> Callable:
    def verify(completion: str, example: Example, finished: bool = True):
        if kind == "choice":
            options = example.columns.get(choices_key) or {}
            return verify_choice(completion, example.answer, options, finished, lenient)
        fn = {"numeric": verifiers.verify_numeric, "yes_no": verifiers.verify_yes_no, "text": verifiers.verify_text}[
            kind
        ]
        return fn(completion, example.answer, finished, lenient)

    return verify


def with_ending(solution: str, example: Example, verify: Callable) -> str:
    """A worked solution that ends in an answer its verifier reads: as written when it
    already does, else with "The answer is <answer>." appended."""
    if verify(solution, example, True).score == 1.0:
        return solution
    return f"{solution.rstrip()}\nThe answer is {example.answer}."


def build(cfg: TaskConfig, lenient: bool) -> Task:
    unknown = set(cfg.options) - set(OPTIONS)
    if unknown:
        raise DataError(f"task.options: unknown option(s) {sorted(unknown)} for generic; valid: {', '.join(OPTIONS)}")
    if not cfg.path:
        raise DataError("task.path: the generic task needs a file, a directory or a hub dataset id")
    opts = {"question": "question", "answer": "answer", "verifier": "numeric", **cfg.options}
    kind = opts["verifier"]
    if kind not in INSTRUCTIONS:
        raise DataError(f"task.options.verifier='{kind}' is not one of {', '.join(INSTRUCTIONS)}")
    if kind == "choice" and not opts.get("choices"):
        raise DataError("task.options.choices: verifier=choice needs the column holding each row's options")
    verify = make_verify(kind, lenient)
    skipped: dict[str, int] = {}
    name = Path(cfg.path).stem.replace("{split}", "").strip("_-.") or "data"

    def parse(row: dict, where: str, index: int, split: str) -> Example:
        question = text_field(row, opts["question"], where)
        answer_value = row.get(opts["answer"])
        if kind == "yes_no" and isinstance(answer_value, bool):
            answer_value = "yes" if answer_value else "no"
        answer = text_field({**row, opts["answer"]: answer_value}, opts["answer"], where)
        used = {opts["question"], opts["answer"], opts.get("rationale"), opts.get("id"), opts.get("choices")}
        extra = opts.get("extra")
        columns = {k: row.get(k) for k in (extra if extra is not None else [k for k in row if k not in used])}
        if kind == "choice":
            options = choices_of(row.get(opts["choices"]), where, opts["choices"])
            columns["options"] = options
            question = render_options(question, options)
        row_id = (
            str(row[opts["id"]]) if opts.get("id") and row.get(opts["id"]) is not None else f"{name}-{split}-{index}"
        )
        example = Example(id=row_id, question=question, answer=answer, columns=columns)
        solution = row.get(opts["rationale"]) if opts.get("rationale") else None
        if isinstance(solution, str) and solution.strip():
            prose = with_ending(solution.strip(), example, verify)
            example = Example(example.id, example.question, example.answer, {"prose": prose}, example.columns)
        return example

    def load(split: str) -> list[Example]:
        files = opts.get("files") or {}
        source = str(Path(cfg.path) / files[split]) if split in files else cfg.path
        rows, where, name = open_split(source, split, fmt=opts.get("format"), hub_config=opts.get("hub_config"))
        examples, skipped[split] = collect(rows, lambda r, w, i: parse(r, w, i, name), cfg.skip_invalid, where)
        return examples

    styles = ("prose",) if opts.get("rationale") else ()
    instruction = opts.get("instruction") or INSTRUCTIONS[kind]
    return Task("generic", load, verify, instruction, styles=styles, skipped=skipped)
