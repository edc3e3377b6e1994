"""`meml compare STUDY.yaml`: run a study of arms x seeds x learning rates, then summarise it.

meml compare studies/sparse_arithmetic.yaml            run what has no record yet, then summarise
meml compare studies/sparse_arithmetic.yaml --print    the commands instead (to launch elsewhere)
meml compare studies/sparse_arithmetic.yaml --summary  only the summary, tables and plots
meml compare studies/sparse_arithmetic.yaml --only meml,grpo
meml compare studies/sparse_arithmetic.yaml --seeds 0   a first pass: one seed (lr grids run on theirs)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

HELP = """\
Runs every (arm, lr, seed) of a study one after the other, each as `meml sft` / `meml train`
followed by `meml eval` on every evaluation set, and writes one JSON record per finished run
to records_dir as soon as it finishes. A rerun skips runs that have a record and refuses
records or run directories made with other settings. Then writes records_dir/summary.json,
summary.md (tables) and plots/*.png (`meml report RECORDS_DIR` draws them again).

The study file (YAML; every key is checked, a typo is refused):

  name: sparse-arithmetic
  runs_dir: runs/study                      # run directories, checkpoints, logs (not for git)
  records_dir: bench/results/study          # one JSON per run + summary (commit these)
  seeds: [0, 1, 2]                          # the seed moves stage 1 and stage 2
  launcher: []                              # default: this python -m meml.cli; e.g.
                                            #   [accelerate, launch, --num_processes, "8", -m, meml.cli]
  common: [task.options.difficulty=3]       # overrides for every sft/train command
  rl: [train.steps=16, train.questions_per_step=4]   # overrides for every stage-2 command
  stage1:                                   # starting points shared by arms, one run per seed
    mef:   {preset: meml}
    tutor: {preset: grpo, overrides: [sft.epochs=3]}
    mef_3ep: {preset: meml, overrides: [sft.epochs=3], seeds: [0]}   # a start no arm uses, on seed 0 only
  arms:                                     # preset + overrides, from a stage-1 recipe
    grpo: {preset: grpo, stage1: tutor, overrides: [rollout.num_generations_per_expert=12], lrs: [2.0e-6, 1.0e-5]}
    meml: {preset: meml, stage1: mef, lrs: [2.0e-6, 1.0e-5]}
    meml_budget: {preset: adaptive_budget, stage1: mef, lr_from: meml}   # the lr chosen for meml
  evaluation:                               # greedy accuracy per expert on each set
    validation: {split: validation, questions: 100}
    test: {split: test, questions: 200}
    transfer: {task: gym, split: test, questions: 100, overrides: ["task.options={dataset: leg_counting, size: 100}"]}
  selection: {split: validation, seeds: [0]}   # the lr grid runs on these seeds; lr chosen here
  shared_expert: tutor                      # the expert every arm has
  report: [test, transfer]                  # sets whose figures are compared (never the selection split)
  comparisons: [[meml, grpo]]               # [arm, baseline]: paired bootstrap over seeds x questions
  bootstrap: {resamples: 2000, seed: 0, confidence: 0.95}
  keep_checkpoints: false                   # stage-2 checkpoints are removed once evaluated

Reported per arm and set: the shared expert's accuracy, any expert correct, the majority
vote, and the expert that was best on the selection split, each as mean ± sd over seeds.
Per arm with a stage-1 start: stage 2's gain over that start (the shared expert, paired by
seed and question); per comparison of arms with different starts: the difference of those
gains, which keeps the stage-1 recipe out of what stage 2 is credited with.

Records carried to another machine without their run directories: a stage-1 model whose
checkpoints are gone is trained again from its command and seed when a run needs it. The
copy need not be bit-identical, so it gets a record of its own (<job>-rebuilt<N>.json,
on the reported sets), the runs that start from it name it (start_record), and their gains
are measured against it; summary.md sets each rebuilt model beside its original.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="run a study (arms x seeds x lrs) and compare the arms with paired statistics",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", help="the study file (YAML)")
    p.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the commands of the jobs without a record; run nothing",
    )
    p.add_argument("--summary", action="store_true", help="only write the summary, tables and plots from the records")
    p.add_argument("--only", default="", help="comma-separated arms to run (their stage-1 runs included)")
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated seeds to run (a first pass on fewer seeds); the lr grids still run on the "
        "selection seeds",
    )
    p.set_defaults(func=_run)


def _run(ns) -> int:
    from meml.core.errors import ConfigError
    from meml.study.runner import Runner, StudyError, plan_lines
    from meml.study.spec import load_study

    spec = load_study(ns.study)
    only = [a for a in ns.only.split(",") if a]
    unknown = [a for a in only if a not in spec.arms]
    if unknown:
        raise ConfigError(f"--only: {unknown} are not arms of {ns.study} ({', '.join(spec.arms)})")
    try:
        seeds = [int(x) for x in ns.seeds.split(",") if x.strip()] or None
    except ValueError:
        raise ConfigError(f"--seeds {ns.seeds!r}: comma-separated whole numbers, e.g. --seeds 0,1") from None
    if seeds and set(seeds) - set(spec.seeds):
        raise ConfigError(f"--seeds: {sorted(set(seeds) - set(spec.seeds))} are not seeds of {ns.study} {spec.seeds}")
    if ns.print_only:
        print("\n".join(plan_lines(spec)))
        return 0
    if not ns.summary:
        Path(spec.runs_dir).mkdir(parents=True, exist_ok=True)
        with (Path(spec.runs_dir) / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"another `meml compare` is running this study ({spec.runs_dir}/.lock)") from None
            spec.records.mkdir(parents=True, exist_ok=True)
            (spec.records / "study.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
            # A scheduler stops jobs with SIGTERM: treat it as Ctrl-C, so the running job is
            # asked to stop too (it saves a checkpoint) instead of being orphaned.
            signal.signal(signal.SIGTERM, _raise_interrupt)
            try:
                Runner(spec).run_all(only or None, seeds)
            except KeyboardInterrupt:
                print("stopped; run the same command again to continue", file=sys.stderr)
                return 130
            except StudyError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            finally:
                write_summary(spec)
        return 0
    write_summary(spec)
    return 0


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def write_summary(spec) -> Path:
    from meml.study.plots import draw
    from meml.study.runner import read_records, write_json
    from meml.study.summary import summarize_study
    from meml.study.tables import markdown

    records = read_records(spec)
    summary = summarize_study(spec, records)
    write_json(spec.records / "summary.json", summary)
    (spec.records / "summary.md").write_text(markdown(spec, summary))
    plots = draw(summary, spec.records / "plots")
    print(markdown(spec, summary))
    print(
        f"wrote {spec.records / 'summary.json'}, summary.md and {len(plots)} plots in {spec.records / 'plots'}",
        file=sys.stderr,
    )
    return spec.records / "summary.json"
