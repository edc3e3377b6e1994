"""`meml distill`: stage-1 traces for experts from a teacher (self, a local model, or an
OpenAI-compatible endpoint); the work is meml.distill.run_distill, docs/DISTILL.md."""

from __future__ import annotations

import argparse
import sys

from meml.cli.args import split_args
from meml.core.load import load_config
from meml.distill import __doc__ as distill_doc
from meml.distill import run_distill
from meml.distill.http_client import TeacherHTTPError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="write expert traces (JSONL) for stage 1 from a teacher: self, a local model or an HTTP endpoint",
        description=distill_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "e.g. meml distill distill.teacher=openai distill.model=NAME distill.output=traces.jsonl (see "
            "docs/DISTILL.md)"
        ),
    )
    p.add_argument("args", nargs="*", help="[PRESET] [key=value ...]")
    p.set_defaults(func=cmd_distill)


def cmd_distill(ns) -> int:
    preset, overrides = split_args(ns.args)
    cfg = load_config(preset, overrides)
    try:
        report = run_distill(cfg, preset)
    except TeacherHTTPError as exc:
        print(
            f"error: teacher: {exc}\nRows written so far are kept; rerun the same command to resume.", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows written so far are kept; rerun the same command to resume.", file=sys.stderr)
        return 130
    pairs, failed = (sum(c[k] for c in report.values()) for k in ("pairs", "failed"))
    if pairs and failed == pairs:  # nothing came back: not a success, whatever the cause
        print(
            f"error: the teacher failed on all {failed} requested pairs (each after its retries); nothing was written. "
            "The reasons are in the warnings above; fix them and rerun the same command.",
            file=sys.stderr,
        )
        return 1
    if failed:
        print(
            f"warning: the teacher failed on {failed} of {pairs} pairs; they were not written, and rerunning the same "
            "command asks for them again.",
            file=sys.stderr,
        )
    return 0
