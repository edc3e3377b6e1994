"""reasoning-gym tasks as a source: procedural puzzles and maths, scored by the library.

    pip install reasoning-gym
    meml train task.name=gym task.options.dataset=chain_sum task.options.size=2000 \
        task.options.config='{min_terms: 2, max_terms: 3}'

task.options: dataset (a reasoning-gym dataset name, required), size (default 1000, rows
per split), seed (default 0; the test split uses seed + 1, so the splits are generated
independently), config (a mapping of the dataset's own options), test_size (default: size).

Verifier: the answer span is everything after the last answer marker ("The answer is",
"Answer:", "####"), or the last `\\boxed{}` or `<answer>...</answer>`, up to the end of
the completion, without a final full stop; with lenient=True a completion without one
offers its last line. The span is scored by the dataset's own `score_answer`, which may
give partial credit (a score between 0 and 1). Note: a few reasoning-gym scorers parse
answers with sympy or Python literals; that code is the library's, not ours.
The examples carry no worked solutions (Task.styles is empty): give MEF experts traces
from `meml distill` (trace_source "file:PATH").
"""

from __future__ import annotations

import logging
import re

from meml.core.config import TaskConfig
from meml.core.errors import DataError
from meml.core.types import Example, Verdict
from meml.tasks.base import Task
from meml.tasks.generic import TEXT_FORMAT
from meml.tasks.verifiers import ANSWER_MARKER_RE, answer_span

log = logging.getLogger(__name__)
DEFAULT_OPTIONS = {"dataset": None, "size": 1000, "test_size": None, "seed": 0, "config": {}}
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def import_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("task.name=gym needs the reasoning-gym package: pip install reasoning-gym") from None
    return reasoning_gym


def gym_answer(completion: str, lenient: bool = False) -> tuple[str | None, str]:
    """The answer text of a completion for reasoning-gym scoring, and how it was found."""
    tags = _ANSWER_TAG_RE.findall(completion)
    markers = list(ANSWER_MARKER_RE.finditer(completion))
    boxed_at = completion.rfind("\\boxed{")
    last_marker = markers[-1].start() if markers else -1
    if tags and completion.rfind("<answer>") > max(last_marker, boxed_at):
        return tags[-1].strip(), "answer_tag"
    if boxed_at > last_marker:
        span, how = answer_span(completion)
        if how == "boxed":
            return span, how
    if markers:
        tail = completion[markers[-1].end() :].strip().lstrip(":").strip()
        return (tail[:-1] if tail.endswith(".") else tail) or None, "marker"
    if lenient:
        lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1].rstrip("."), "last_line"
    return None, "no_marker"


def make_examples(dataset, name: str, split: str) -> list[Example]:
    examples = []
    for i, entry in enumerate(dataset):
        examples.append(
            Example(
                id=f"gym-{name}-{split}-{i}",
                question=str(entry["question"]),
                answer=str(entry["answer"]),
                columns={"metadata": entry.get("metadata", {})},
            )
        )
    return examples


def build(cfg: TaskConfig, lenient: bool) -> Task:
    unknown = set(cfg.options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise DataError(f"task.options: unknown option(s) {sorted(unknown)} for gym; valid: {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **cfg.options}
    if not opts["dataset"]:
        raise DataError("task.options.dataset: name a reasoning-gym dataset, e.g. task.options.dataset=chain_sum")
    rg = import_gym()
    name = str(opts["dataset"])
    seeds = {"train": int(opts["seed"]), "test": int(opts["seed"]) + 1}
    sizes = {"train": int(opts["size"]), "test": int(opts["test_size"] or opts["size"])}
    datasets: dict = {}

    def dataset_for(split: str):
        if split not in seeds:
            raise DataError(f"gym has splits {sorted(seeds)}, not '{split}'")
        if split not in datasets:
            try:
                datasets[split] = rg.create_dataset(
                    name, size=sizes[split], seed=seeds[split], **dict(opts["config"] or {})
                )
            except Exception as exc:  # noqa: BLE001 - an unknown name or option, in the library's words
                raise DataError(f"task.options: reasoning-gym could not build '{name}': {exc}") from None
        return datasets[split]

    def load(split: str) -> list[Example]:
        return make_examples(dataset_for(split), name, split)

    def verify(completion: str, example: Example, finished: bool = True) -> Verdict:
        if not finished:
            return Verdict(0.0, None, {"reason": "truncated", "correct": 0.0})
        answer, how = gym_answer(completion, lenient)
        if answer is None:
            return Verdict(0.0, None, {"reason": how, "correct": 0.0})
        entry = {
            "question": example.question,
            "answer": example.answer,
            "metadata": example.columns.get("metadata", {}),
        }
        try:
            scorer = next(iter(datasets.values())) if datasets else dataset_for(example.id.rsplit("-", 2)[-2])
            score = float(scorer.score_answer(answer, entry))
        except Exception as exc:  # noqa: BLE001 - the library's scorer must not stop training
            log.debug("reasoning-gym scorer failed on %s: %s", example.id, exc)
            return Verdict(0.0, answer, {"reason": "scorer_error", "correct": 0.0})
        return Verdict(score, answer, {"reason": how, "correct": float(score == 1.0)})

    return Task("gym", load, verify, TEXT_FORMAT, styles=(), skipped={})
