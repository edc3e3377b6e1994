"""`meml data inspect SOURCE [key=value ...]`: look at a task's data before training on it.

    meml data inspect gsm8k task.path=PATH/TO/gsm8k
    meml data inspect PATH/TO/mathqa                   (the task is inferred from the files)
    meml data inspect mydata.csv task.options.question=problem -n 3

SOURCE is a registered task name or a path. For a path the task is inferred from the
files: "####" answers in JSONL -> gsm8k; JSON rows with Problem/options/correct ->
mathqa; JSON rows with qid/facts -> strategyqa; anything else -> generic (whose column
mapping goes in task.options). task.name=... overrides the guess.

For each split (task.train_split and task.eval_split; a single file is one split named
after it) it prints the row count, the malformed rows skipped (with task.skip_invalid),
the gold-answer parse rate (the verifier does not abstain on "The answer is <gold>.")
with the ids it could not parse, and the share of each rationale style that scores 1
under the task's own verifier (a rationale whose gold did not parse abstains and is
counted apart). Then, for the first examples, the prompt of each expert
and the start of its stage-1 trace.

Prompts are shown as plain text, system then user message, without the model's chat
template: no model or tokenizer is loaded (that could mean a download), and the template
adds only role markers around exactly this text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meml.core.errors import DataError
from meml.core.types import Example
from meml.tasks.base import Task
from meml.tasks.experts import user_message
from meml.tasks.inspect import MAX_LISTED, guess_task, split_report
from meml.tasks.registry import build_task


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="look at a task's data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser(
        "inspect",
        help="row counts, rendered prompts per expert, gold-answer parse rate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("source", help="a task name (gsm8k, mathqa, ...) or a data file / directory")
    q.add_argument("-n", "--examples", type=int, default=2, help="examples whose prompts are shown (default 2)")
    # REMAINDER, so that "-n 3" may also come after the overrides
    q.add_argument(
        "args", nargs=argparse.REMAINDER, help="key=value config overrides, e.g. task.options.question=problem"
    )
    q.set_defaults(func=_run_from_args)


def _run_from_args(ns) -> int:
    overrides, examples = [], ns.examples
    args = iter(ns.args)
    for arg in args:
        if arg in ("-n", "--examples"):
            value = next(args, "")
            if not value.isdigit():
                raise DataError(f"{arg} needs a whole number, got '{value}'")
            examples = int(value)
        else:
            overrides.append(arg)
    return run_inspect(ns.source, overrides, examples)


# ----------------------------------------------------------------------------- guessing the task


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / max(1, n):.2f}%)"


def _indent(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " [...]"
    return "\n".join("    " + line for line in text.splitlines())


def run_inspect(source: str, overrides: list[str], num_examples: int = 2) -> int:
    from meml.core.load import load_config

    path = Path(source).expanduser()
    named = any(o.startswith("task.name=") for o in overrides)
    if path.exists():
        extra = [f"task.path={path}"] + ([] if named else [f"task.name={guess_task(path)}"])
    elif "/" in source or path.suffix:
        raise DataError(f"{source}: no such file or directory (SOURCE is a task name or a path)")
    else:
        extra = [] if named else [f"task.name={source}"]
    cfg = load_config(None, [*extra, *overrides])
    task = build_task(cfg.task, lenient=cfg.reward.lenient)
    splits = [path.stem] if path.is_file() else list(dict.fromkeys([cfg.task.train_split, cfg.task.eval_split]))
    print(f"task {task.name}   source {cfg.task.path or '(built in / hub default)'}")
    print(f"format instruction: {task.format_instruction}")
    print(f"rationale styles: {', '.join(task.styles) or '(none)'}")
    first: list[Example] = []
    for split in splits:
        try:
            examples = task.load(split)
        except DataError as exc:
            print(f"\nsplit {split}: error: {exc}")
            return 2
        report = split_report(task, examples)
        print(f"\nsplit {split}: {report['rows']} rows, {task.skipped.get(split, 0)} malformed rows skipped")
        print(f"  gold answers parsed: {_pct(report['gold_parsed'], report['rows'])}")
        if report["unparsed_ids"]:
            print(f"  not parsed (first {MAX_LISTED}): {', '.join(report['unparsed_ids'])}")
        for style, r in report["rationales"].items():
            line = f"  rationale '{style}': {r['present']} present, verified {_pct(r['verified'], r['present'])}"
            line += f", {r['abstained']} abstained (gold not parsed)" if r["abstained"] else ""
            print(line + (f"; failing: {', '.join(r['failed_ids'])}" if r["failed_ids"] else ""))
        first = first or examples[:num_examples]
    _print_prompts(task, cfg.experts, first)
    return 0


def _print_prompts(task: Task, experts, examples: list[Example]) -> None:
    for expert in experts:
        if expert.trace_source not in task.styles and not expert.trace_source.startswith("file:"):
            print(
                f"\nnote: expert '{expert.name}' takes traces from style '{expert.trace_source}', which task "
                f"'{task.name}' does not provide ({', '.join(task.styles) or 'none'}): set its trace_source"
            )
    for example in examples:
        print(f"\n=== {example.id} (gold: {example.answer})")
        for expert in experts:
            print(f"--- expert '{expert.name}'\n  [system]\n{_indent(expert.system_prompt)}")
            print(f"  [user]\n{_indent(user_message(example, task.format_instruction))}")
            trace = example.rationales.get(expert.trace_source)
            if trace:
                print(f"  [trace: {expert.trace_source}]\n{_indent(trace, 300)}")
