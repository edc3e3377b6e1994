"""`meml report`: PNG plots and a self-contained HTML page per run and across runs.

    meml report RUN_DIR                        -> RUN_DIR/report/index.html and its PNGs
    meml report runs/grpo-1 runs/meml-1        -> each run's report, plus one page with both
                                                  runs on the same axes (--out, default
                                                  <parent of the first run>/report-grpo-1-vs-meml-1)

Everything comes from files a run writes: metrics.jsonl (per-step records of the stages
"sft" and "rl", and "eval" records), config.yaml, results.json, command.txt and
samples.jsonl; a missing file leaves its part of the page out. Each figure has one panel
per metric (per expert where the metric is per expert) and one line per run, coloured the
same in every figure. The page embeds every PNG (base64) and names its file; a table
gives the final figures of each run and the commands that produced it: the command line
as recorded in command.txt, and an equivalent `meml train` command rebuilt from
config.yaml (every setting that differs from the defaults), which reproduces the config
exactly even when command.txt is absent.

    meml report bench/results/study            -> a study's records (`meml compare`): its
                                                  summary.json, summary.md and plots/, redone
                                                  from the records and study.json alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meml.cli.report_page import write_page
from meml.cli.report_runs import Run, draw_plots, load_run


def make_report(runs: list[Run], out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # a figure that has no data any more must not linger beside the page
    return write_page(runs, draw_plots(runs, out), out, title)


def report(run_dirs: list[str], out: str | None = None, names: list[str] | None = None) -> list[Path]:
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, names or [None] * len(paths))]
    seen: dict[str, int] = {}
    for run in runs:  # two runs called "r" become r and r-2
        seen[run.name] = seen.get(run.name, 0) + 1
        run.name += f"-{seen[run.name]}" if seen[run.name] > 1 else ""
    pages = [make_report([run], run.path / "report", f"meml report: {run.name}") for run in runs]
    if len(runs) > 1:
        target = Path(out) if out else paths[0].resolve().parent / ("report-" + "-vs-".join(r.name for r in runs))
        pages.append(make_report(runs, target, "meml report: " + " vs ".join(r.name for r in runs)))
    return pages


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="plots and an HTML page per run and across runs, or of a study's records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories (output_dir of meml train), or a study's records directory")
    p.add_argument("--out", default=None, help="directory of the page comparing the runs")
    p.add_argument("--names", default=None, help="comma-separated names for the runs, in order")
    p.set_defaults(func=_run)


def _run(ns) -> int:
    studies = [Path(r) for r in ns.runs if (Path(r) / "study.json").exists()]
    for records in studies:
        from meml.cli.compare import write_summary
        from meml.study.spec import study_from_json

        write_summary(study_from_json(records / "study.json", records))
    ns.runs = [r for r in ns.runs if Path(r) not in studies]
    if not ns.runs:
        return 0
    names = ns.names.split(",") if ns.names else None
    if names and len(names) != len(ns.runs):
        from meml.core.errors import ConfigError

        raise ConfigError(f"--names gives {len(names)} names for {len(ns.runs)} runs")
    for page in report(ns.runs, ns.out, names):
        print(f"wrote {page}")
    return 0
