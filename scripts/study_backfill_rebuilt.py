"""Back-fill the study records of stage-1 models that the runs at d8bb872 trained again.

The seeds of `studies/sparse_arithmetic.yaml` run from a worktree pinned at d8bb872 (main
refuses their records: defaults changed since). That commit's runner trains a lost stage-1
model again but writes no record for it, and its RL records name no `start_record`. This
script, run with main's code from the repository root after such runs, does what main's
runner does for a rebuilt start:

- the rebuilt model's evaluations, made with `meml eval` at d8bb872 into
  `eval-rebuilt-{test,transfer}`, become its `eval-*` directories;
- a record `stage1-<recipe>-s<seed>-rebuilt1.json` is written from them, with the original
  record's config and command and the code commit d8bb872;
- the marker `study-rebuilt.json` goes into the stage-1 run directory;
- every RL record finished on or after --since, of an arm that starts from that recipe and
  seed, gets `start_record`, so its stage-2 gain is measured against the rebuilt model.

It changes no accuracy; `meml compare studies/sparse_arithmetic.yaml --summary` re-renders
the tables afterwards.

    python scripts/study_backfill_rebuilt.py [--since 2026-12-03]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from meml.study.jobs import stage1_job
from meml.study.record import build_record
from meml.study.runner import REBUILT_MARKER, Runner, write_json
from meml.study.spec import load_study

PINNED = "d8bb87281fc4b16029f64f7ae2dea7ada4a007cb"
NOTE = (
    "trained again at d8bb872 by `meml compare` (its run directory was lost); evaluated with "
    "`meml eval` at d8bb872; record written afterwards from those outputs by scripts/study_backfill_rebuilt.py"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/sparse_arithmetic.yaml")
    parser.add_argument("--since", default="2026-12-03", help="RL records finished on or after this date")
    args = parser.parse_args()
    spec = load_study(args.study)
    runner = Runner(spec, echo=print)
    for recipe in spec.stage1:
        for seed in spec.seeds:
            start = stage1_job(spec, recipe, seed)
            run_dir = start.run_dir
            if not (run_dir / "eval-rebuilt-test").exists() and not (run_dir / REBUILT_MARKER).exists():
                continue
            key = f"{start.key}-rebuilt1"
            if key not in runner.records:
                for name in spec.report:
                    src, dst = run_dir / f"eval-rebuilt-{name}", run_dir / f"eval-{name}"
                    if src.exists() and not dst.exists():
                        src.rename(dst)
                original = runner.records[start.key]
                job = replace(start, key=key, evals={n: a for n, a in start.evals.items() if n in spec.report})
                record = build_record(spec, job, original["config"], original["command"], wall_s=0.0)
                record["code"] = {**original["code"], "commit": PINNED, "src_modified": False}
                record["rebuilt_from"] = start.key
                record["note"] = NOTE
                runner.save(job, record)
                write_json(run_dir / REBUILT_MARKER, {"record": key, "trained": True})
                print("wrote", key)
            arms = {name for name, arm in spec.arms.items() if arm.stage1 == recipe}
            for name, record in list(runner.records.items()):
                if (
                    record.get("kind") == "rl"
                    and record.get("arm") in arms
                    and record.get("seed") == seed
                    and record.get("finished", "") >= args.since
                    and record.get("start_record") != key
                ):
                    path = spec.records / f"{name}.json"
                    raw = json.loads(path.read_text())
                    raw["start_record"] = key
                    write_json(path, raw)
                    print("start_record", name, "->", key)


if __name__ == "__main__":
    main()
