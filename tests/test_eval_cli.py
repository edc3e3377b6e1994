"""`meml eval` end to end on the tiny model: outputs, resuming, refusing mixed settings,
evaluating a run directory, and periodic evaluation during training."""

from __future__ import annotations

import json

import pytest

from meml.cli import main
from meml.cli.args import pop_options

from conftest import tiny_overrides


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pop_options_takes_task_wherever_it_stands():
    rest, found = pop_options(["RUN", "--task", "gsm8k", "a=1", "--preset=grpo"], ("--preset", "--task"))
    assert rest == ["RUN", "a=1"] and found == {"--task": "gsm8k", "--preset": "grpo"}


@pytest.mark.e2e
def test_eval_writes_summary_and_per_question_records(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", str(tiny_model_dir), "--task", "arithmetic", *tiny_overrides(tiny_model_dir, out), "eval.samples=3"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == 4 and summary["samples"] == 3
    for key in (
        "acc/tutor",
        "acc/best",
        "acc/any",
        "acc/majority",
        "pass@1/checker",
        "pass@2/best",
        "coverage/mixture",
        "zero_signal/tutor",
    ):
        assert key in summary
    assert summary["settings"]["task"]["name"] == "arithmetic"
    records = _lines(out / "records.jsonl")
    assert len(records) == 4
    tutor = records[0]["experts"]["tutor"]
    assert "patient math tutor" in tutor["prompt"] and len(tutor["samples"]) == 3
    assert set(tutor["greedy"]) == {"completion", "extracted", "score", "finished"}
    assert "experts diversify?" in capsys.readouterr().out


@pytest.mark.e2e
def test_eval_resumes_after_a_kill_and_refuses_other_settings(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    args = [
        "eval",
        str(tiny_model_dir),
        *tiny_overrides(tiny_model_dir, out),
        "eval.questions_per_batch=2",
        "eval.samples=2",
    ]
    assert main(args) == 0
    full = (out / "records.jsonl").read_text()
    # a kill during the second batch: one batch on disk and half a line of the next
    first_batch = "".join(full.splitlines(keepends=True)[:2])
    (out / "records.jsonl").write_text(first_batch + '{"question_id": "arith')

    from meml.engines.hf import HFEngine

    generated = []
    real_generate = HFEngine.generate

    def counting_generate(self, prompts, params):
        generated.append(len(prompts))
        return real_generate(self, prompts, params)

    monkeypatch.setattr(HFEngine, "generate", counting_generate)
    assert main(args) == 0
    assert generated == [2 * 3, 2 * 3]  # 2 missing questions x 3 experts, greedy then sampled
    assert (out / "records.jsonl").read_text() == full  # same records as the uninterrupted run

    def no_model(*_args, **_kwargs):
        raise AssertionError("everything is done: the model must not be loaded")

    monkeypatch.setattr("meml.train.session.attach_model", no_model)
    assert main(args) == 0
    assert main([*args, "eval.max_new_tokens=5"]) == 2  # would mix settings: refused
    assert (out / "records.jsonl").read_text() == full


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """Two RL steps with evaluation every step, sampled answers included."""
    out = tmp_path_factory.mktemp("run") / "r"
    extra = {"sft.enabled": "false", "eval.every_steps": 1, "eval.after": "true", "eval.samples": 2, "train.steps": 2}
    assert main(["train", *tiny_overrides(tiny_model_dir, out, **extra)]) == 0
    return out


@pytest.mark.e2e
def test_periodic_evaluation_during_training(tiny_run):
    evals = [r for r in _lines(tiny_run / "metrics.jsonl") if r["stage"] == "eval"]
    assert [(r["tag"], r["step"]) for r in evals] == [("step1", 1), ("after", 2)]
    assert all(
        "acc/tutor" in r and "pass@1/tutor" in r and "coverage/mixture" not in r for r in evals
    )  # 2 samples < 3 experts
    assert len(_lines(tiny_run / "eval" / "step1.jsonl")) == 4
    results = json.loads((tiny_run / "results.json").read_text())
    assert "acc/majority" in results["after"]


@pytest.mark.e2e
def test_eval_of_a_run_directory_uses_its_checkpoint(tiny_run):
    assert main(["eval", str(tiny_run), "eval.samples=3"]) == 0
    (out,) = (tiny_run / "eval").glob("rl-*")  # named after the newest checkpoint
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["model"].endswith(f"checkpoints/{out.name}/model")
    assert summary["questions"] == 4 and "coverage/mixture" in summary
