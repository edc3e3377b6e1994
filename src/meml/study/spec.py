"""The study file of `meml compare`: arms, seeds, learning-rate grids, evaluation sets.

A study is a YAML mapping read into the dataclasses below (OmegaConf: a misspelt key is
refused with the closest valid name). Every run of the study is a `meml` command built
from it, so what a study does is what the commands do.

    name: sparse-arithmetic
    seeds: [0, 1, 2]
    common: [task.options.difficulty=3]          # every command
    rl: [train.steps=16]                          # every stage-2 command
    stage1:                                       # shared starting points, one run per seed
      mef: {preset: meml}
      tutor: {preset: grpo, overrides: [sft.epochs=3]}
    arms:
      grpo: {preset: grpo, stage1: tutor, lrs: [2.0e-6, 1.0e-5]}
      meml: {preset: meml, stage1: mef, lrs: [2.0e-6, 1.0e-5]}
    evaluation:
      validation: {split: validation, questions: 100}
      test: {split: test, questions: 200}
    comparisons: [[meml, grpo]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from meml.core.errors import ConfigError


@dataclass
class Stage1Spec:
    """A stage-1 (SFT) starting point: `meml sft PRESET [overrides]`, once per seed."""

    preset: str = "meml"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the seeds it runs on; empty: every study seed


@dataclass
class ArmSpec:
    """One arm: `meml train PRESET` from its stage-1 checkpoint, at each lr of its grid."""

    preset: str = "meml"
    # The stage-1 recipe it starts from (a key of `stage1`); empty: the base model, no stage 1.
    stage1: str = ""
    overrides: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # the grid; empty: the preset's optim.lr
    # or the lr chosen for another arm on the selection split (an arm listed before this one):
    # a variant of that arm without a grid of its own
    lr_from: str = ""
    label: str = ""  # for tables and plots; default: the arm's key


@dataclass
class EvalSetSpec:
    """Greedy accuracy per expert on one set of questions: `meml eval RUN [--task T] ...`."""

    split: str = "test"
    questions: int | None = None  # the first N of the split; None: all
    task: str = ""  # another task (a transfer set): its name; empty: the study's own task
    overrides: list[str] = field(default_factory=list)  # e.g. the transfer task's options


@dataclass
class SelectionSpec:
    """How each arm's learning rate (and each run's best expert) is chosen: on `split`, never
    on a set that is reported, by the mean over `seeds` of the shared expert's accuracy."""

    split: str = "validation"
    seeds: list[int] = field(default_factory=list)  # lr-grid seeds; empty: the first study seed


@dataclass
class BootstrapSpec:
    resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95


@dataclass
class StudySpec:
    name: str = "study"
    runs_dir: str = "runs/study"  # run directories and checkpoints (large; not for git)
    records_dir: str = ""  # one JSON per finished run + summary (small; commit it). Default: <runs_dir>/records
    seeds: list[int] = field(default_factory=lambda: [0])
    # How a job is started; empty: this Python's `-m meml.cli`. E.g. on a GPU node:
    # [accelerate, launch, --num_processes, "8", -m, meml.cli]
    launcher: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=list)  # overrides for every train/sft command
    rl: list[str] = field(default_factory=list)  # overrides for every stage-2 command
    stage1: dict[str, Stage1Spec] = field(default_factory=dict)
    arms: dict[str, ArmSpec] = field(default_factory=dict)
    evaluation: dict[str, EvalSetSpec] = field(default_factory=dict)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    shared_expert: str = "tutor"  # the expert every arm has: the main figure is its accuracy
    report: list[str] = field(default_factory=lambda: ["test"])  # eval sets whose figures are compared
    comparisons: list[list[str]] = field(default_factory=list)  # [arm, baseline] pairs
    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)
    keep_checkpoints: bool = False  # keep stage-2 checkpoints after their evaluation (1.6 GB each for 135M)

    @property
    def records(self) -> Path:
        return Path(self.records_dir) if self.records_dir else Path(self.runs_dir) / "records"

    @property
    def selection_seeds(self) -> list[int]:
        return list(self.selection.seeds) or self.seeds[:1]

    def label(self, arm: str) -> str:
        return self.arms[arm].label or arm


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study file is a mapping (name, seeds, stage1, arms, evaluation, ...)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudySpec), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    spec: StudySpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check_study(spec, str(path))
    return spec


def study_from_json(path: Path, records_dir: Path | None = None) -> StudySpec:
    """The study a records directory was made by (its study.json, written by `meml compare`);
    records_dir points it at where the records are now."""
    import json

    merged = OmegaConf.merge(OmegaConf.structured(StudySpec), OmegaConf.create(json.loads(Path(path).read_text())))
    spec: StudySpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if records_dir is not None:
        spec.records_dir = str(records_dir)
    return spec


def check_study(spec: StudySpec, where: str = "study") -> None:
    """Every cross-reference of the study file, named when it is wrong."""
    problems = []
    if not spec.seeds:
        problems.append("seeds: at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        problems.append(f"seeds: {spec.seeds} repeats a seed")
    if not spec.arms:
        problems.append("arms: at least one arm")
    for name, recipe in spec.stage1.items():
        if set(recipe.seeds) - set(spec.seeds):
            problems.append(f"stage1.{name}.seeds: {sorted(set(recipe.seeds) - set(spec.seeds))} are not study seeds")
    for name, arm in spec.arms.items():
        if (
            arm.stage1 in spec.stage1
            and spec.stage1[arm.stage1].seeds
            and set(spec.seeds) - set(spec.stage1[arm.stage1].seeds)
        ):
            problems.append(f"arms.{name} starts from stage1.{arm.stage1}, which does not run on every study seed")
        if arm.stage1 and arm.stage1 not in spec.stage1:
            problems.append(
                f"arms.{name}.stage1: '{arm.stage1}' is not a stage1 recipe "
                f"({', '.join(spec.stage1) or 'none defined'})"
            )
        if any(lr <= 0 for lr in arm.lrs):
            problems.append(f"arms.{name}.lrs: learning rates must be > 0, got {arm.lrs}")
        if len(set(arm.lrs)) != len(arm.lrs):
            problems.append(f"arms.{name}.lrs: {arm.lrs} repeats a value")
        if arm.lr_from:
            earlier = list(spec.arms)[: list(spec.arms).index(name)]
            if arm.lrs:
                problems.append(f"arms.{name}: give lrs or lr_from, not both")
            if arm.lr_from not in earlier:
                before = ", ".join(earlier) or "none"
                problems.append(f"arms.{name}.lr_from: '{arm.lr_from}' is not an arm listed before it ({before})")
    for key in ("/", " "):
        bad = [n for n in [*spec.arms, *spec.stage1, *spec.evaluation] if key in n]
        if bad:
            problems.append(f"names may not contain '{key}': {bad}")
    if spec.selection.split not in spec.evaluation:
        problems.append(
            f"selection.split: '{spec.selection.split}' is not an evaluation set "
            f"({', '.join(spec.evaluation) or 'none defined'})"
        )
    for name in spec.report:
        if name not in spec.evaluation:
            problems.append(f"report: '{name}' is not an evaluation set")
        if name == spec.selection.split:
            problems.append(f"report: '{name}' is the selection split; report figures on sets that choose nothing")
    missing = [s for s in spec.selection_seeds if s not in spec.seeds]
    if missing:
        problems.append(f"selection.seeds: {missing} are not study seeds {spec.seeds}")
    for pair in spec.comparisons:
        if len(pair) != 2 or any(a not in spec.arms for a in pair):
            problems.append(f"comparisons: {pair} must be [arm, baseline], both arms of the study")
    if not 0 < spec.bootstrap.confidence < 1 or spec.bootstrap.resamples < 100:
        problems.append("bootstrap: confidence in (0, 1) and resamples >= 100")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
