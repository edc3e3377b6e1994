"""`meml compare` end to end on the tiny model, and its choices on hand-made records.

The end-to-end study: two arms (one with a two-lr grid, scored on validation until its lr
is chosen) from two stage-1 recipes, two seeds, validation and test sets. It is killed in
the middle of a job, run again (it finishes, leaving the records written before the kill
untouched), and refuses to go on when a setting of a finished run changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meml.core.errors import ConfigError
from meml.study.jobs import chosen_lr, grid, rl_job
from meml.study.spec import ArmSpec, BootstrapSpec, EvalSetSpec, StudySpec, load_study
from meml.study.summary import arm_records, best_on_validation, summarize_study
from meml.study.tables import markdown

STUDY = """
name: tiny
runs_dir: {root}/runs
records_dir: {root}/records
seeds: [0, 1]
common:
  - model.name_or_path={model}
  - "task.options={{train_size: 40, validation_size: 4, test_size: 4, difficulty: 1}}"
  - rollout.max_new_tokens=12
  - eval.max_new_tokens=8
  - sft.max_examples=8
  - sft.sequences_per_step=8
rl: [train.steps={steps}, train.questions_per_step=2, rollout.num_generations_per_expert=2, algo.hsft.max_wrong=1]
stage1:
  mef: {{preset: meml}}
  tutor: {{preset: grpo}}
arms:
  grpo: {{preset: grpo, stage1: tutor, lrs: [1.0e-4, 1.0e-3]}}
  meml: {{preset: meml, stage1: mef, overrides: [algo.hsft.buffer_size=2]}}
evaluation:
  validation: {{split: validation, questions: 4}}
  test: {{split: test, questions: 4}}
report: [test]
comparisons: [[meml, grpo]]
bootstrap: {{resamples: 200}}
"""
JOBS = [
    "stage1-mef-s0",
    "stage1-tutor-s0",
    "grpo-lr1e-4-s0",
    "grpo-lr1e-3-s0",
    "meml-lrdefault-s0",
    "stage1-mef-s1",
    "stage1-tutor-s1",
    "meml-lrdefault-s1",
]  # + grpo at its chosen lr, seed 1


def write_study(root: Path, model: Path, steps: int = 2) -> Path:
    path = root / "study.yaml"
    path.write_text(STUDY.format(root=root, model=model, steps=steps))
    return path


def compare(study: Path, *flags: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "meml.cli", "compare", str(study), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.e2e
def test_a_study_runs_resumes_after_a_kill_and_refuses_a_changed_setting(tiny_model_dir, tmp_path):
    study = write_study(tmp_path, tiny_model_dir)
    records = tmp_path / "records"
    # 1. killed (with its whole process group, as a lost machine would be) during the 4th job
    proc = compare(study, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "runs" / "logs" / "grpo-lr1e-3-s0.log").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # inside that job's training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in records.glob("*.json") if p.name != "study.json"}
    assert set(before) == {"stage1-mef-s0.json", "stage1-tutor-s0.json", "grpo-lr1e-4-s0.json"}

    # 2. run again: the killed job is redone, earlier records are kept as they were; a
    # stage-1 model whose run directory is gone (records carried to a fresh machine) is
    # trained again for the runs that start from it, its record untouched
    shutil.rmtree(tmp_path / "runs" / "stage1-mef-s0")
    proc = compare(study)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    names = {p.stem for p in records.glob("*.json")} - {"study", "summary"}
    grpo_lr = json.loads((records / "summary.json").read_text())["arms"]["grpo"]["lr"]
    assert grpo_lr in (1e-4, 1e-3)
    assert names == {*JOBS, "stage1-mef-s0-rebuilt1", f"grpo-lr{'1e-4' if grpo_lr == 1e-4 else '1e-3'}-s1"}
    chosen = f"grpo-lr{'1e-4' if grpo_lr == 1e-4 else '1e-3'}-s0"
    other = f"grpo-lr{'1e-3' if grpo_lr == 1e-4 else '1e-4'}-s0"
    for name, text in before.items():
        old, new = json.loads(text), json.loads((records / name).read_text())
        assert new["config"] == old["config"] and all(new["eval"][k] == v for k, v in old["eval"].items()), name
        if name != f"{chosen}.json":
            assert (records / name).read_text() == text, f"{name} was rewritten"
    # the grid is scored on validation; only the chosen lr's run is then scored on test
    assert set(json.loads((records / f"{other}.json").read_text())["eval"]) == {"validation"}
    assert set(json.loads((records / f"{chosen}.json").read_text())["eval"]) == {"validation", "test"}
    assert "stage1-mef-s0: training" not in out  # nothing that had a record ran again
    assert "stage1-mef-s0: its checkpoints are gone; training it again" in out
    assert "stage1-tutor-s0: its checkpoints are gone" not in out  # only what was missing
    # the rebuilt model has a record of its own on the reported sets, and the run that started
    # from it names it: its stage-2 gain is measured against the model it started from
    rebuilt = json.loads((records / "stage1-mef-s0-rebuilt1.json").read_text())
    assert rebuilt["rebuilt_from"] == "stage1-mef-s0" and set(rebuilt["eval"]) == {"test"}
    assert json.loads((records / "meml-lrdefault-s0.json").read_text())["start_record"] == "stage1-mef-s0-rebuilt1"
    assert json.loads((records / "meml-lrdefault-s1.json").read_text())["start_record"] == "stage1-mef-s1"

    rec = json.loads((records / "meml-lrdefault-s1.json").read_text())
    assert (rec["arm"], rec["seed"], rec["lr"], rec["steps"], rec["test_questions"]) == ("meml", 1, None, 2, 4)
    assert rec["config"]["model"]["name_or_path"].endswith("stage1-mef-s1")  # the seed moved stage 1 too
    assert set(rec["eval"]) == {"validation", "test"} and len(rec["eval"]["test"]["scores"]["tutor"]) == 4
    assert rec["train"]["rl_steps"] == 2 and rec["experts"] == ["tutor", "algebraist", "checker"]
    assert not (tmp_path / "runs" / "meml-lrdefault-s1" / "checkpoints").exists()  # removed once evaluated

    summary = json.loads((records / "summary.json").read_text())
    assert [(r["record"], r["questions"]) for r in summary["rebuilt_starts"]] == [("stage1-mef-s0-rebuilt1", 4)]
    (meml_gain,) = [g for g in summary["stage2_gains"] if g["arm"] == "meml"]
    assert meml_gain["rebuilt_start_seeds"] == [0]
    comp = {(c["eval"], c["metric"]): c for c in summary["comparisons"]}
    assert set(comp) == {("test", m) for m in ("shared", "any", "majority", "best_val")}
    assert comp[("test", "shared")]["seeds"] == 2 and comp[("test", "shared")]["questions"] == 4
    assert (records / "summary.md").exists() and (records / "plots" / "accuracy_test.png").exists()

    # the summary and plots are made again from the records alone
    (records / "summary.json").unlink()
    shutil.rmtree(records / "plots")
    redone = subprocess.run([sys.executable, "-m", "meml.cli", "report", str(records)], capture_output=True, text=True)
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert json.loads((records / "summary.json").read_text())["comparisons"] == summary["comparisons"]
    assert (records / "plots" / "accuracy_test.png").exists()

    # 3. nothing left to do, and --print says so
    printed = subprocess.run(
        [sys.executable, "-m", "meml.cli", "compare", str(study), "--print"], capture_output=True, text=True
    )
    assert printed.returncode == 0 and "# job" not in printed.stdout

    # 4. a changed setting is refused, naming the job and the setting
    write_study(tmp_path, tiny_model_dir, steps=3)
    proc = compare(study)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "stage1" not in out.split("config error")[-1].split(":")[0]
    assert "grpo-lr1e-4-s0" in out and "train.steps: 2 -> 3" in out


# ----------------------------------------------------------------------------- choices


def _record(job: str, arm: str, seed: int, lr, val: dict, test: dict) -> dict:
    """A record with per-expert accuracies on 4 questions (val and test)."""

    def entry(acc: dict) -> dict:
        scores = {name: [1.0] * round(4 * a) + [0.0] * (4 - round(4 * a)) for name, a in acc.items()}
        scores["majority"] = scores[next(iter(acc))]
        return {
            "summary": {f"acc/{k}": v for k, v in acc.items()},
            "question_ids": ["q0", "q1", "q2", "q3"],
            "scores": scores,
        }

    return {
        "job": job,
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "experts": list(val),
        "eval": {"validation": entry(val), "test": entry(test)},
        "train": {},
        "wall_s": 1.0,
    }


def _spec() -> StudySpec:
    spec = StudySpec(
        name="s",
        seeds=[0, 1],
        arms={"a": ArmSpec(preset="grpo", lrs=[1e-6, 1e-5]), "b": ArmSpec(preset="grpo")},
        evaluation={"validation": EvalSetSpec("validation", 4), "test": EvalSetSpec("test", 4)},
        comparisons=[["a", "b"]],
    )
    return spec


def test_the_lr_is_chosen_on_validation_even_when_test_says_otherwise():
    spec = _spec()
    recs = {}
    for lr, val, test in ((1e-6, 0.25, 1.0), (1e-5, 0.75, 0.0)):  # test favours 1e-6, validation 1e-5
        job = rl_job(spec, "a", lr, 0, "grid").key
        recs[job] = _record(job, "a", 0, lr, {"tutor": val}, {"tutor": test})
    assert chosen_lr(spec, "a", recs) == 1e-5
    lr, chosen = arm_records(spec, "a", recs)
    assert lr == 1e-5 and [r["lr"] for r in chosen] == [1e-5]


def test_no_lr_is_chosen_before_the_grid_is_complete():
    spec = _spec()
    job = rl_job(spec, "a", 1e-6, 0, "grid").key
    assert chosen_lr(spec, "a", {job: _record(job, "a", 0, 1e-6, {"tutor": 0.5}, {"tutor": 0.5})}) is None
    assert grid(spec, "b") == [None] and chosen_lr(spec, "b", {}) is None  # no grid: the preset's lr, nothing to choose


def test_the_best_expert_is_chosen_on_validation_and_reported_on_test():
    spec = _spec()
    rec = _record("x", "a", 0, 1e-5, {"tutor": 0.25, "algebraist": 0.75}, {"tutor": 1.0, "algebraist": 0.25})
    assert best_on_validation(spec, rec) == "algebraist"
    recs = {
        rl_job(spec, "a", lr, 0, "grid").key: {**rec, "job": rl_job(spec, "a", lr, 0, "grid").key, "lr": lr}
        for lr in (1e-6, 1e-5)
    }
    summary = summarize_study(spec, recs)
    test = summary["arms"]["a"]["eval"]["test"]
    assert test["best_val"]["per_seed"] == [0.25]  # the algebraist's test accuracy, not the tutor's 1.0
    assert test["shared"]["per_seed"] == [1.0] and test["any"]["per_seed"] == [1.0]


def test_study_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\narms: {a: {preset: grpo, stage1: nope}}\nevaluation: {validation: {split: validation}}\n")
    with pytest.raises(ConfigError, match="arms.a.stage1: 'nope' is not a stage1 recipe"):
        load_study(bad)
    bad.write_text("name: x\narmz: {}\n")
    with pytest.raises(ConfigError, match="armz"):
        load_study(bad)
    bad.write_text(
        "name: x\narms: {a: {preset: grpo}}\nevaluation: {validation: {split: validation}, test: {}}\nreport: "
        "[validation]\n"
    )
    with pytest.raises(ConfigError, match="selection split"):
        load_study(bad)


def test_a_setting_added_to_meml_after_a_record_is_no_change_at_its_default():
    from meml.study.runner import _comparable, _defaults, config_differences

    defaults = _defaults()
    old = json.loads(json.dumps(defaults))
    old["rollout"]["batch_size"] = old["rollout"].pop("sequences_per_generate")  # saved before the rename
    del old["algo"]["iml"]["weight"]  # saved before this setting existed
    new = json.loads(json.dumps(defaults))
    assert config_differences(_comparable(old), _comparable(new), defaults) == []
    new["algo"]["iml"]["weight"] = 0.5  # not its default: that is a change
    assert config_differences(_comparable(old), _comparable(new), defaults) == ["algo.iml.weight: None -> 0.5"]


def test_an_arm_with_lr_from_runs_at_the_lr_chosen_for_the_other_arm():
    from meml.study.jobs import grid, grid_jobs, seed_jobs

    spec = _spec()
    spec.arms["c"] = ArmSpec(preset="grpo", lr_from="a")
    assert grid(spec, "c", {}) == [] and [j.arm for j in grid_jobs(spec, {})] == ["a", "a", "b"]  # not chosen yet
    recs = {}
    for lr, val in ((1e-6, 0.25), (1e-5, 0.75)):
        job = rl_job(spec, "a", lr, 0, "grid").key
        recs[job] = _record(job, "a", 0, lr, {"tutor": val}, {"tutor": val})
    assert chosen_lr(spec, "c", recs) == 1e-5 and grid(spec, "c", recs) == [1e-5]
    c_jobs = [j for j in grid_jobs(spec, recs) if j.arm == "c"]
    assert [(j.lr, set(j.evals)) for j in c_jobs] == [(1e-5, {"validation", "test"})]  # one run: every set
    later, waiting = seed_jobs(spec, recs)
    assert [(j.arm, j.seed, j.lr) for j in later if j.arm == "c"] == [("c", 1, 1e-5)] and waiting == []


def test_lr_from_and_stage1_seeds_are_checked(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text(
        "name: x\nseeds: [0, 1]\nstage1: {m: {preset: meml, seeds: [0]}}\n"
        "arms: {a: {preset: grpo, lr_from: b}, b: {preset: grpo, stage1: m}}\n"
        "evaluation: {validation: {split: validation}}\n"
    )
    with pytest.raises(ConfigError, match="arms.a.lr_from: 'b' is not an arm listed before it") as e:
        load_study(bad)
    assert "does not run on every study seed" in str(e.value)


def test_only_and_seeds_narrow_the_jobs_but_the_lr_choice_still_runs(tmp_path, monkeypatch):
    from meml.study.runner import Runner

    spec = load_study(write_study(tmp_path, tmp_path / "model"))
    ran: list[str] = []

    def fake_ensure(self, job):
        ran.append(job.key)
        return {}

    monkeypatch.setattr(Runner, "ensure", fake_ensure)
    Runner(spec, echo=lambda *_: None).run_all(["meml"], seeds=[0])
    assert ran == ["stage1-mef-s0", "meml-lrdefault-s0"]  # no seed-1 job, no grpo job
    ran.clear()
    Runner(spec, echo=lambda *_: None).run_all(["meml"], seeds=[1])
    # seed 0 still runs where it chooses (here: nothing to choose for meml, its grid is its default lr)
    assert ran == ["stage1-mef-s0", "meml-lrdefault-s0", "meml-lrdefault-s1"]
    ran.clear()
    with pytest.raises(Exception, match="grid is not finished"):  # grpo's lr is not chosen: its seed 1 cannot run
        Runner(spec, echo=lambda *_: None).run_all(["grpo"], seeds=[1])


def test_compare_refuses_seeds_the_study_does_not_have(tmp_path):
    study = write_study(tmp_path, tmp_path / "model")
    out = subprocess.run(
        [sys.executable, "-m", "meml.cli", "compare", str(study), "--seeds", "0,7"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--seeds: [7] are not seeds of" in out.stdout + out.stderr


def _scored(arm: str, seed: int, test: list[float], lr=None) -> dict:
    """A one-expert record with explicit per-question test scores (validation: the same)."""
    entry = {"summary": {"acc/tutor": sum(test) / 4}, "question_ids": ["q0", "q1", "q2", "q3"], "scores": {}}
    entry["scores"] = {"tutor": list(test), "majority": list(test)}
    return {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "experts": ["tutor"],
        "eval": {"validation": entry, "test": entry},
        "train": {},
        "wall_s": 1.0,
    }


def test_stage2_gains_and_their_difference_by_hand():
    from meml.study.jobs import stage1_job
    from meml.study.spec import Stage1Spec

    spec = StudySpec(
        name="s",
        seeds=[0, 1],
        stage1={"x": Stage1Spec(), "y": Stage1Spec()},
        arms={"a": ArmSpec(stage1="x"), "b": ArmSpec(stage1="y"), "c": ArmSpec(stage1="x")},
        evaluation={"validation": EvalSetSpec("validation", 4), "test": EvalSetSpec("test", 4)},
        comparisons=[["a", "b"], ["a", "c"]],
        bootstrap=BootstrapSpec(resamples=500),
    )
    scores = {  # (name, seed) -> the tutor's test scores on q0..q3
        ("x", 0): [0, 0, 1, 0], ("a", 0): [1, 0, 1, 0],  # a's gain [1, 0, 0, 0]: +0.25
        ("y", 0): [1, 1, 0, 0], ("b", 0): [1, 1, 0, 1],  # b's gain [0, 0, 0, 1]: +0.25
        ("x", 1): [0, 0, 0, 0], ("a", 1): [1, 1, 0, 0],  # +0.5
        ("y", 1): [1, 0, 0, 0], ("b", 1): [1, 0, 0, 0],  # 0
        ("c", 0): [0, 0, 1, 0], ("c", 1): [0, 0, 0, 0],  # no gain
    }  # fmt: skip
    recs = {}
    for (name, seed), test in scores.items():
        key = stage1_job(spec, name, seed).key if name in spec.stage1 else rl_job(spec, name, None, seed, "grid").key
        recs[key] = _scored(name, seed, test)

    summary = summarize_study(spec, recs)
    gains = {g["arm"]: g for g in summary["stage2_gains"]}
    assert (gains["a"]["start_acc"], gains["a"]["final_acc"], gains["a"]["diff"]) == (0.125, 0.5, 0.375)
    assert gains["a"]["per_seed"] == [0.25, 0.5] and gains["a"]["seeds_used"] == [0, 1]
    assert (gains["b"]["start_acc"], gains["b"]["final_acc"], gains["b"]["diff"]) == (0.375, 0.5, 0.125)
    assert gains["c"]["diff"] == 0.0 and gains["c"]["p"] == 1.0
    # a and b end level (0.5 each) but a gained 0.25 more from its start; a and c share a start,
    # so their plain comparison already is the difference of gains and is not repeated
    plain = {(c["arm"], c["baseline"]): c for c in summary["comparisons"] if c["metric"] == "shared"}
    assert plain[("a", "b")]["diff"] == 0.0
    (diff,) = summary["gain_comparisons"]
    assert (diff["arm"], diff["baseline"]) == ("a", "b")
    assert (diff["arm_gain"], diff["baseline_gain"], diff["diff"]) == (0.375, 0.125, 0.25)
    assert diff["per_seed"] == [0.0, 0.5] and diff["low"] <= 0.0 < 0.5 <= diff["high"]

    # a start missing for a seed: that seed leaves the gain and the difference, not the rest
    del recs[stage1_job(spec, "y", 1).key]
    summary = summarize_study(spec, recs)
    gains = {g["arm"]: g for g in summary["stage2_gains"]}
    assert gains["b"]["seeds_used"] == [0] and gains["b"]["diff"] == 0.25
    (diff,) = summary["gain_comparisons"]
    assert diff["seeds_used"] == [0] and diff["diff"] == 0.0
    md = markdown(spec, summary)
    assert "## Stage 2's gain over its own stage-1 model" in md and "| a | b | test | +0.250 | +0.250 | +0.000" in md


def test_a_gain_is_measured_against_the_start_the_run_named_by_hand():
    """A run whose stage-1 model was trained again names that model's record; its gain is
    taken against it, and the rebuilt model is set beside the original."""
    from meml.study.jobs import stage1_job
    from meml.study.spec import Stage1Spec

    spec = StudySpec(
        name="s",
        seeds=[0, 1],
        stage1={"x": Stage1Spec()},
        arms={"a": ArmSpec(stage1="x")},
        evaluation={"validation": EvalSetSpec("validation", 4), "test": EvalSetSpec("test", 4)},
        bootstrap=BootstrapSpec(resamples=200),
    )
    recs = {
        stage1_job(spec, "x", 0).key: _scored("x", 0, [0, 0, 0, 0]),
        stage1_job(spec, "x", 1).key: _scored("x", 1, [0, 0, 0, 0]),
        "stage1-x-s1-rebuilt1": {**_scored("x", 1, [1, 1, 0, 0]), "rebuilt_from": "stage1-x-s1"},
        rl_job(spec, "a", None, 0, "grid").key: _scored("a", 0, [1, 0, 0, 0]),  # +0.25 over the original
        rl_job(spec, "a", None, 1, "grid").key: {
            **_scored("a", 1, [1, 1, 1, 0]),
            "start_record": "stage1-x-s1-rebuilt1",  # +0.25 over the rebuilt start (+0.75 over the original)
        },
    }
    summary = summarize_study(spec, recs)
    (gain,) = [g for g in summary["stage2_gains"] if g["eval"] == "test"]
    # against the original starts it would read 0.0 -> 0.5, a gain of +0.5
    assert (gain["start_acc"], gain["final_acc"], gain["diff"]) == (0.25, 0.5, 0.25)
    assert gain["per_seed"] == [0.25, 0.25] and gain["rebuilt_start_seeds"] == [1]
    (row,) = [r for r in summary["rebuilt_starts"] if r["eval"] == "test"]
    assert (row["original_acc"], row["rebuilt_acc"], row["same_score"], row["questions"]) == (0.0, 0.5, 2, 4)
    md = markdown(spec, summary)
    assert "`x` (rebuilt: s1)" in md and "| stage1-x-s1-rebuilt1 | stage1-x-s1 | test | 0.000 | 0.500 | 2 of 4 |" in md
    # the stage-1 rows stay the recipe's own records
    assert summary["stage1"]["x"]["eval"]["test"]["shared"]["per_seed"] == [0.0, 0.0]


def test_a_rebuild_killed_while_training_continues_from_its_checkpoint(tmp_path, monkeypatch):
    from meml.study.jobs import stage1_job
    from meml.study.runner import REBUILT_MARKER, Runner
    from meml.study.spec import Stage1Spec

    spec = StudySpec(
        name="s",
        runs_dir=str(tmp_path / "runs"),
        records_dir=str(tmp_path / "records"),
        seeds=[0],
        stage1={"x": Stage1Spec()},
        arms={"a": ArmSpec(stage1="x")},
        evaluation={"test": EvalSetSpec("test", 4)},
    )
    start = stage1_job(spec, "x", 0)
    ran, recorded = [], []

    def run(self, argv, log_path):
        ran.append(argv)
        if len(ran) == 1:
            (start.run_dir / "checkpoints" / "step-00001").mkdir(parents=True)  # a checkpoint, then the kill
            raise KeyboardInterrupt

    def record_rebuilt(self, job):
        recorded.append(json.loads((job.run_dir / REBUILT_MARKER).read_text()))
        self.records[recorded[-1]["record"]] = {}

    monkeypatch.setattr(Runner, "run", run)
    monkeypatch.setattr(Runner, "record_rebuilt", record_rebuilt)
    runner = Runner(spec, echo=lambda *_: None)
    assert runner.start_record(start) == start.key  # nothing rebuilt: the recipe's own record
    with pytest.raises(KeyboardInterrupt):
        runner.rebuild_start(start)
    assert json.loads((start.run_dir / REBUILT_MARKER).read_text()) == {
        "record": f"{start.key}-rebuilt1",
        "trained": False,
    }
    # its checkpoint does not make the half-trained model pass for a finished one: training continues
    runner.rebuild_start(start)
    assert len(ran) == 2 and ran[1] == runner.command(start) and ran[1][-1] == "--resume"
    assert recorded == [{"record": f"{start.key}-rebuilt1", "trained": True}]
    assert runner.start_record(start) == f"{start.key}-rebuilt1"
    runner.rebuild_start(start)  # done: not trained again
    assert len(ran) == 2 and len(recorded) == 2 and recorded[1]["trained"]
