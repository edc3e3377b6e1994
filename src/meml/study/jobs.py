"""The jobs of a study, planned from the study file and the records so far.

  stage 1   one run per (recipe, seed): `meml sft PRESET ... seed=S`
  grid      every arm at every lr of its grid, on the selection seeds
  seeds     the other seeds of an arm, at the lr chosen on the selection split
Every job is a `meml` command (its overrides come last where the study owns them) and an
evaluation per set (`meml eval RUN_DIR ...`); its key names its record file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meml.core.errors import ConfigError
from meml.eval.metrics import choose_by_validation
from meml.study.spec import StudySpec


@dataclass
class Job:
    key: str  # the record's file name: stage1-<recipe>-s<seed> or <arm>-lr<lr>-s<seed>
    kind: str  # stage1 | rl
    arm: str  # the arm, or the stage-1 recipe for kind stage1
    seed: int
    lr: float | None
    preset: str
    overrides: list[str]
    run_dir: Path
    start: Job | None = None  # the stage-1 job whose model it starts from
    phase: str = "grid"  # grid (the lr selection runs) | seeds (the other seeds, at the chosen lr)
    evals: dict[str, list[str]] = field(default_factory=dict)  # eval set -> `meml eval` arguments

    @property
    def subcommand(self) -> str:
        return "sft" if self.kind == "stage1" else "train"


def lr_tag(lr: float | None) -> str:
    return "default" if lr is None else f"{lr:.0e}".replace("e-0", "e-")


def stage1_job(spec: StudySpec, recipe: str, seed: int) -> Job:
    r = spec.stage1[recipe]
    key = f"stage1-{recipe}-s{seed}"
    run_dir = Path(spec.runs_dir) / key
    overrides = [*spec.common, *r.overrides, *_fixed(seed, run_dir), "checkpoint.keep_last=1"]
    job = Job(key, "stage1", recipe, seed, None, r.preset, overrides, run_dir)
    job.evals = eval_arguments(spec, run_dir)
    return job


def rl_job(spec: StudySpec, arm: str, lr: float | None, seed: int, phase: str, chosen: bool = False) -> Job:
    """A stage-2 run; in the grid phase it is evaluated on the selection split only, unless
    its lr is the chosen one (`chosen`)."""
    a = spec.arms[arm]
    key = f"{arm}-lr{lr_tag(lr)}-s{seed}"
    run_dir = Path(spec.runs_dir) / key
    start = stage1_job(spec, a.stage1, seed) if a.stage1 else None
    # model.name_or_path=<a run directory> loads that run's newest checkpoint
    start_model = [f"model.name_or_path={start.run_dir}"] if start else []
    overrides = [
        *spec.common,
        *spec.rl,
        *a.overrides,
        "sft.enabled=false",
        *start_model,
        *([f"optim.lr={lr}"] if lr is not None else []),
        *_fixed(seed, run_dir),
        "eval.after_mef=false",
        "checkpoint.keep_last=1",
    ]
    job = Job(key, "rl", arm, seed, lr, a.preset, overrides, run_dir, start, phase)
    job.evals = eval_arguments(spec, run_dir)
    if phase == "grid" and not chosen and len(a.lrs) > 1:
        job.evals = {spec.selection.split: job.evals[spec.selection.split]}
    return job


def _fixed(seed: int, run_dir: Path) -> list[str]:
    """Overrides the study owns: they come last, so they win over the arms' own."""
    return [f"seed={seed}", f"output_dir={run_dir}", "eval.before=false", "eval.after=false", "log.progress=false"]


def eval_arguments(spec: StudySpec, run_dir: Path) -> dict[str, list[str]]:
    out = {}
    for name, e in spec.evaluation.items():
        args = [
            str(run_dir),
            *(["--task", e.task] if e.task else []),
            f"task.eval_split={e.split}",
            f"task.max_eval_examples={'null' if e.questions is None else e.questions}",
            *e.overrides,
            f"output_dir={run_dir / ('eval-' + name)}",
            "log.progress=false",
        ]
        out[name] = args
    return out


def grid(spec: StudySpec, arm: str, records: dict[str, dict] | None = None) -> list[float | None]:
    """The lrs an arm runs at: its grid, the preset's lr ([None]), or, for an arm with
    lr_from, the lr chosen for that arm ([] until it is chosen)."""
    a = spec.arms[arm]
    if a.lr_from:
        lr = chosen_lr(spec, a.lr_from, records or {})
        return [lr] if lr is not None else []
    return list(a.lrs) or [None]


def grid_jobs(spec: StudySpec, records: dict[str, dict] | None = None) -> list[Job]:
    return [
        rl_job(spec, arm, lr, seed, "grid")
        for seed in spec.selection_seeds
        for arm in spec.arms
        for lr in grid(spec, arm, records)
    ]


def chosen_lr(spec: StudySpec, arm: str, records: dict[str, dict]) -> float | None:
    """The arm's lr chosen on the selection split, or None while its grid is unfinished.

    Score: the shared expert's accuracy on the selection split, mean over the selection seeds.
    An arm with lr_from takes the lr chosen for that arm."""
    if spec.arms[arm].lr_from:
        return chosen_lr(spec, spec.arms[arm].lr_from, records)
    lrs = grid(spec, arm)
    if len(lrs) == 1:
        return lrs[0]
    scores = {}
    for lr in lrs:
        recs = [records.get(rl_job(spec, arm, lr, s, "grid").key) for s in spec.selection_seeds]
        if any(r is None for r in recs):
            return None
        scores[lr] = [r["eval"][spec.selection.split]["summary"][f"acc/{shared_expert(spec, r)}"] for r in recs]
    return choose_by_validation(scores)


def shared_expert(spec: StudySpec, record: dict) -> str:
    experts = record["experts"]
    if spec.shared_expert not in experts:
        raise ConfigError(
            f"shared_expert '{spec.shared_expert}' is not an expert of {record['job']} (experts: {experts})"
        )
    return spec.shared_expert


def seed_jobs(spec: StudySpec, records: dict[str, dict]) -> tuple[list[Job], list[str]]:
    """The non-selection seeds of every arm whose lr is chosen; the arms still waiting."""
    jobs, waiting = [], []
    rest = [s for s in spec.seeds if s not in spec.selection_seeds]
    for arm in spec.arms:
        lr = chosen_lr(spec, arm, records)
        if lr is None and not is_default_lr(spec, arm):
            waiting.append(arm)
            continue
        jobs.extend(rl_job(spec, arm, lr, seed, "seeds") for seed in rest)
    jobs.sort(key=lambda j: (spec.seeds.index(j.seed), list(spec.arms).index(j.arm)))
    return jobs, waiting


def is_default_lr(spec: StudySpec, arm: str) -> bool:
    """An arm that runs at its preset's lr: no grid, no lr_from (its chosen lr is None)."""
    return not spec.arms[arm].lrs and not spec.arms[arm].lr_from


def all_stage1_jobs(spec: StudySpec) -> list[Job]:
    """Every stage-1 recipe on its seeds (default: every seed). A recipe no arm uses is still
    run and evaluated: a study can compare starting points alone."""
    return [
        stage1_job(spec, recipe, seed)
        for seed in spec.seeds
        for recipe, r in spec.stage1.items()
        if not r.seeds or seed in r.seeds
    ]
