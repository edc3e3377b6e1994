"""Running a study: jobs, one JSON record per finished run, resumable.

The jobs, in the order they run (breadth first, so a study stopped early has every arm
on the first seeds):
  1. stage 1 of each recipe an arm needs, per seed, when first needed
     (`meml sft PRESET ... seed=S`), evaluated like any run;
  2. the learning-rate grid: every arm at every lr of its grid, on the selection seeds
     (`meml train PRESET model.name_or_path=<stage-1 model> sft.enabled=false optim.lr=LR`);
  3. each arm's lr is chosen on the selection split (metrics.choose_by_validation), and the
     other seeds run at that lr.
Each run is then evaluated (`meml eval RUN_DIR ...`), and its record `<records>/<job>.json`
is written at once. A grid run is evaluated on the selection split alone; once its arm's
grid is complete and the lr chosen, the runs at that lr get the other evaluation sets
(their records grow) and the others' checkpoints are removed: the reported sets are never
computed for an lr that was not chosen. Other runs get every set. A record holds the arm,
seed, lr, the resolved config,
the commands, every eval summary, per-question scores per expert and of the majority
vote, and training statistics from metrics.jsonl.

Rerunning the study skips jobs whose record exists; a record or run directory made with
other settings than the study now asks for is refused, naming what changed. A run that
was killed continues from its newest checkpoint (`--resume`), or starts again when it
had none; an evaluation continues from the records it wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from meml.core.errors import ConfigError
from meml.study.jobs import Job, all_stage1_jobs, chosen_lr, grid, grid_jobs, rl_job, seed_jobs
from meml.study.spec import StudySpec

log = logging.getLogger("meml")

REBUILT_MARKER = "study-rebuilt.json"  # in a stage-1 run directory that was trained again


class StudyError(RuntimeError):
    """A job of the study failed; its log is named in the message."""


# ----------------------------------------------------------------------------- records


def read_records(spec: StudySpec) -> dict[str, dict]:
    out = {}
    if spec.records.exists():
        for path in sorted(spec.records.glob("*.json")):
            if path.name in ("summary.json", "study.json"):
                continue
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc}); delete it to run that job again") from None
            if isinstance(rec, dict) and "job" in rec:
                out[rec["job"]] = rec
    return out


def planned_config(job: Job) -> dict:
    """The resolved config the job's command gives (nothing is loaded but the config)."""
    from meml.core.load import load_config, to_dict
    from meml.train.preflight import check_choices

    stage1 = ["sft.enabled=true", "train.steps=0"] if job.kind == "stage1" else []  # what `meml sft` adds
    try:
        cfg = load_config(job.preset, [*stage1, *job.overrides])
        check_choices(cfg)
        return to_dict(cfg)
    except ConfigError as exc:
        raise ConfigError(f"job {job.key} (preset {job.preset}): {exc}") from None


_ABSENT = object()


def config_differences(old: dict, new: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """'key: old -> new' for each setting that differs. A key the old config does not have is
    no difference when the new one leaves it at its default (`defaults`): a setting added to
    meml after the old run was made."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        d = defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, d if isinstance(d, dict) else None, f"{prefix}{key}."))
        elif a is _ABSENT and d is not _ABSENT and b == d:
            continue
        elif a != b:
            out.append(f"{prefix}{key}: {None if a is _ABSENT else a!r} -> {None if b is _ABSENT else b!r}")
    return out


def _comparable(config: dict) -> dict:
    """A saved config with renamed keys under their current names, `checkpoint.resume` left out."""
    from meml.core.load import upgrade_keys

    out = upgrade_keys(json.loads(json.dumps(config)))
    out.get("checkpoint", {}).pop("resume", None)
    return out


def _defaults() -> dict:
    from meml.core.config import Config
    from meml.core.load import to_dict

    return to_dict(Config())


def check_unchanged(job: Job, record: dict | None) -> None:
    """Refuse a record or run directory made with other settings than the study asks for."""
    planned = planned_config(job)
    if record is not None:
        changed = config_differences(_comparable(record["config"]), _comparable(planned), _defaults())
        old_evals = record.get("evals", {})
        changed += [
            f"evaluation set {name}" for name in job.evals if name in old_evals and old_evals[name] != job.evals[name]
        ]
        if changed:
            commit = ((record.get("code") or {}).get("commit") or "")[:12]
            raise ConfigError(
                f"{job.key}: its record {record['_path']} was made with other settings ({'; '.join(changed[:6])})"
                f"{f' at commit {commit}' if commit else ''}. Restore the study file, or delete that record (and its "
                "run directory) to run the job again."
                + (
                    " Where the study file does not set what changed, a default changed since: run the study from "
                    f"commit {commit} (a `git worktree` of it, with PYTHONPATH=<worktree>/src)."
                    if commit
                    else ""
                )
            )
        return
    saved = job.run_dir / "config.yaml"
    if saved.exists():
        import yaml

        old = yaml.safe_load(saved.read_text()) or {}
        changed = config_differences(_comparable(old), _comparable(planned), _defaults())
        if changed:
            raise ConfigError(
                f"{job.key}: {job.run_dir} holds a run made with other settings ({'; '.join(changed[:6])}). "
                "Restore the study file, or delete that directory to run the job again."
            )


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running


class Runner:
    """Runs jobs as subprocesses (`launcher` + arguments), one at a time."""

    def __init__(self, spec: StudySpec, launcher: list[str] | None = None, echo=print):
        self.spec = spec
        self.launcher = launcher or list(spec.launcher) or [sys.executable, "-m", "meml.cli"]
        self.echo = echo
        self.records = read_records(spec)
        for key, rec in self.records.items():
            rec["_path"] = str(spec.records / f"{key}.json")

    def command(self, job: Job) -> list[str]:
        return [*self.launcher, job.subcommand, job.preset, *job.overrides, "--resume"]

    def eval_command(self, job: Job, name: str) -> list[str]:
        return [*self.launcher, "eval", *job.evals[name]]

    def ensure(self, job: Job) -> dict:
        """The job's record: read, or made by running what is missing."""
        record = self.records.get(job.key)
        if job.start is not None:
            self.ensure(job.start)
        check_unchanged(job, record)
        if record is not None:
            missing = [name for name in job.evals if name not in record["eval"]]
            return self.add_evals(job, record, missing) if missing else record
        t0 = time.time()
        self.echo(
            f"{time.strftime('%H:%M:%S')} {job.key}: "
            f"{'training' if not (job.run_dir / 'results.json').exists() else 'evaluating'}"
        )
        if not (job.run_dir / "results.json").exists():
            if job.start is not None:
                self.rebuild_start(job.start)
            if job.run_dir.exists() and not list((job.run_dir / "checkpoints").glob("*-0*")):
                shutil.rmtree(job.run_dir)  # killed before its first checkpoint: start it again, logs and all
            self.run(self.command(job), job.run_dir.parent / "logs" / f"{job.key}.log")
        for name in job.evals:
            self.run(self.eval_command(job, name), job.run_dir.parent / "logs" / f"{job.key}.eval-{name}.log")
        from meml.study.record import build_record

        record = build_record(self.spec, job, planned_config(job), self.command(job), wall_s=time.time() - t0)
        if job.start is not None:
            record["start_record"] = self.start_record(job.start)
        self.save(job, record)
        self.echo(f"{time.strftime('%H:%M:%S')} {job.key}: done in {time.time() - t0:.0f} s -> {record['_path']}")
        return record

    def rebuild_start(self, start: Job) -> None:
        """A stage-1 model whose record was kept but whose run directory is gone (a study
        carried to another machine with its records only): train it again from the same
        command and seed. The original record stays as it was; the rebuilt model, which
        need not be bit-identical, gets a record of its own on the reported sets
        (`<start>-rebuilt<N>`), and the runs that start from it name it (`start_record`),
        so a stage-2 gain is measured against the model the run actually started from."""
        marker = start.run_dir / REBUILT_MARKER
        if not marker.exists() and not list((start.run_dir / "checkpoints").glob("*-0*")):
            self.echo(f"{time.strftime('%H:%M:%S')} {start.key}: its checkpoints are gone; training it again")
            if start.run_dir.exists():
                shutil.rmtree(start.run_dir)
            n = 1 + sum(1 for k in self.records if k.startswith(f"{start.key}-rebuilt"))
            write_json(marker, {"record": f"{start.key}-rebuilt{n}", "trained": False})
        if not marker.exists():
            return  # the original model is here
        state = json.loads(marker.read_text())
        if not state["trained"]:  # (again, with --resume, after a kill during the rebuild)
            self.run(self.command(start), start.run_dir.parent / "logs" / f"{start.key}.log")
            write_json(marker, {**state, "trained": True})
        self.record_rebuilt(start)

    def record_rebuilt(self, start: Job) -> dict:
        """The rebuilt stage-1 model's record, evaluated on the reported sets (once)."""
        from meml.study.record import build_record

        key = self.start_record(start)
        if key in self.records:
            return self.records[key]
        t0 = time.time()
        rebuilt = replace(start, key=key, evals={n: a for n, a in start.evals.items() if n in self.spec.report})
        for name in rebuilt.evals:
            if not (start.run_dir / f"eval-{name}" / "summary.json").exists():
                self.run(self.eval_command(rebuilt, name), start.run_dir.parent / "logs" / f"{key}.eval-{name}.log")
        record = build_record(self.spec, rebuilt, planned_config(start), self.command(start), wall_s=time.time() - t0)
        record["rebuilt_from"] = start.key
        self.save(rebuilt, record)
        return record

    def start_record(self, start: Job) -> str:
        """The record of the stage-1 model a run starts from: the rebuilt one's where the
        start was trained again, else the start's own."""
        marker = start.run_dir / REBUILT_MARKER
        return json.loads(marker.read_text())["record"] if marker.exists() else start.key

    def add_evals(self, job: Job, record: dict, names: list[str]) -> dict:
        """Evaluate a finished run on more sets (a grid run whose lr was chosen)."""
        from meml.study.record import eval_entry

        if not list((job.run_dir / "checkpoints").glob("*-0*")):
            raise StudyError(
                f"{job.key}: its record lacks {names} and its checkpoints are gone; delete {record['_path']} to run "
                "it again"
            )
        t0 = time.time()
        self.echo(f"{time.strftime('%H:%M:%S')} {job.key}: evaluating on {', '.join(names)}")
        for name in names:
            self.run(self.eval_command(job, name), job.run_dir.parent / "logs" / f"{job.key}.eval-{name}.log")
            record["eval"][name] = eval_entry(job.run_dir / f"eval-{name}", record["experts"])
            record["evals"][name] = job.evals[name]
        if "test" in names:
            record["test_questions"] = len(record["eval"]["test"]["question_ids"])
        record["wall_s"] += time.time() - t0
        self.save(job, record)
        return record

    def save(self, job: Job, record: dict) -> None:
        record.pop("_path", None)
        path = self.spec.records / f"{job.key}.json"
        write_json(path, record)
        record["_path"] = str(path)
        self.records[job.key] = record
        if job.kind == "rl" and not self.spec.keep_checkpoints and set(record["eval"]) == set(self.spec.evaluation):
            shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)  # the record holds what was measured

    def settle_grid(self, arm: str) -> None:
        """Once an arm's grid has records: the chosen lr's runs get every set, the others'
        checkpoints go."""
        spec = self.spec
        lr = chosen_lr(spec, arm, self.records)
        if lr is None or len(spec.arms[arm].lrs) <= 1:
            return
        for seed in spec.selection_seeds:
            self.ensure(rl_job(spec, arm, lr, seed, "grid", chosen=True))
            for other in grid(spec, arm):
                if other != lr and not spec.keep_checkpoints:
                    shutil.rmtree(rl_job(spec, arm, other, seed, "grid").run_dir / "checkpoints", ignore_errors=True)

    def run(self, argv: list[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except BaseException:
                proc.terminate()  # Ctrl-C or a kill of `meml compare`: the job stops with a checkpoint
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if rc != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise StudyError(f"`{' '.join(argv)}` failed (exit {rc}); log: {log_path}\n" + "\n".join(tail))

    def run_all(self, only: list[str] | None = None, seeds: list[int] | None = None) -> dict[str, dict]:
        """Every job of the study, breadth first; returns the records. only: these arms;
        seeds: these seeds (the lr grids still run on the selection seeds, which choose lrs)."""
        spec = self.spec

        def wanted(j: Job) -> bool:
            return (not only or j.arm in only) and (seeds is None or j.seed in seeds)

        for job in all_stage1_jobs(spec):
            if job.seed in spec.selection_seeds and (
                not only or any(spec.arms[a].stage1 == job.arm for a in only if a in spec.arms) or job.arm in only
            ):
                self.ensure(job)
        for arm in spec.arms:
            if only and arm not in only:
                continue
            for job in grid_jobs(spec, self.records):  # an arm with lr_from: once that arm's lr is chosen
                if job.arm == arm:
                    self.ensure(job)
            self.settle_grid(arm)
        jobs, waiting = seed_jobs(spec, self.records)
        for arm in waiting:
            if not only or arm in only:
                raise StudyError(f"arm {arm}: its lr grid is not finished; cannot choose its lr")
        for job in all_stage1_jobs(spec):
            if job.key not in self.records and (not only or job.arm in only) and (seeds is None or job.seed in seeds):
                self.ensure(job)
        for job in jobs:
            if wanted(job):
                self.ensure(job)
        return self.records


def plan_lines(spec: StudySpec, launcher: list[str] | None = None) -> list[str]:
    """Shell lines for the jobs that have no record yet, in order (for launching elsewhere)."""
    import shlex

    runner = Runner(spec, launcher, echo=lambda *_: None)
    lines: list[str] = []
    done = runner.records

    def emit(job: Job) -> None:
        if job.key in done or any(job.key in line for line in lines if line.startswith("# job ")):
            return
        if job.start is not None:
            emit(job.start)
        lines.append(f"# job {job.key}")
        lines.append(shlex.join(runner.command(job)))
        lines.extend(shlex.join(runner.eval_command(job, name)) for name in job.evals)

    for job in [*all_stage1_jobs(spec), *grid_jobs(spec, done)]:
        emit(job)
    for arm in spec.arms:
        lr = chosen_lr(spec, arm, done)
        if lr is not None and len(spec.arms[arm].lrs) > 1:
            for seed in spec.selection_seeds:
                job = rl_job(spec, arm, lr, seed, "grid", chosen=True)
                rec = done.get(job.key)
                if rec is not None and set(job.evals) - set(rec["eval"]):
                    lines.append(f"# job {job.key}: the other evaluation sets, now that its lr is chosen")
                    lines.extend(shlex.join(runner.eval_command(job, n)) for n in job.evals if n not in rec["eval"])
    jobs, waiting = seed_jobs(spec, done)
    for job in jobs:
        emit(job)
    for arm in waiting:
        rest = [s for s in spec.seeds if s not in spec.selection_seeds]
        if rest:
            lines.append(
                f"# arm {arm}: seeds {rest} run at the lr chosen on '{spec.selection.split}' once its grid has "
                "records: "
                "run `meml compare STUDY` (it only assembles records of runs that are done) and print again"
            )
    lines.append("# then: meml compare STUDY  (writes a record per finished run, the summary and the plots)")
    return lines
