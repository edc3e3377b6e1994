"""Metrics sinks: JSONL always, TensorBoard event files with the scalars, W&B offline
without network, resume truncation, the recorded command line, and sample completions
logged every N steps by a real (tiny) training run."""

from __future__ import annotations

import json
import math
import time

import pytest

from meml.train.logger import MetricsLogger, command_line

from conftest import tiny_overrides

RECORDS = [
    {"stage": "sft", "step": 1, "loss": 2.5},
    {"stage": "eval", "tag": "before", "step": 0, "acc/tutor": 0.25, "best_expert": "tutor"},
    {"stage": "rl", "step": 1, "reward/mean": 0.5, "reward/tutor": 0.25, "loss": float("nan")},
    {"stage": "rl", "step": 2, "reward/mean": 0.75, "reward/tutor": 0.5, "loss": 0.1},
    {"stage": "eval", "tag": "step2", "step": 2, "acc/tutor": 0.5},
    {"stage": "rl", "step": 3, "reward/mean": 1.0, "reward/tutor": 1.0, "loss": 0.2},
    {"stage": "eval", "tag": "after", "step": 3, "acc/tutor": 0.75},
]


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_always_and_non_finite_values_stay_visible(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"], {})
    for rec in RECORDS:
        logger.log(rec)
    logger.close()
    back = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(back) == len(RECORDS)
    assert back[2]["loss"] == "nan" and back[1]["best_expert"] == "tutor"
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_files_hold_the_scalars_and_text(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl", "tensorboard"], {})
    for rec in RECORDS:
        logger.log(rec)
    logger.log_text("samples/tutor", "The answer is 4.", 2)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    acc, scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["rl/reward/mean"] == [(1, 0.5), (2, 0.75), (3, 1.0)]
    assert scalars["sft/loss"] == [(1, 2.5)]
    assert scalars["eval/acc/tutor"] == [(0, 0.25), (2, 0.5), (3, 0.75)]
    assert math.isnan(scalars["rl/loss"][0][1])
    assert (
        "rl/step" not in scalars and "eval/best_expert" not in scalars
    )  # the step is the axis; strings are not scalars
    assert "samples/tutor/text_summary" in acc.Tags()["tensors"]


def test_wandb_offline_writes_a_run_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any upload would fail
    logger = MetricsLogger(tmp_path, ["jsonl", "wandb"], {"seed": 0}, wandb_project="meml-test", wandb_mode="offline")
    for rec in RECORDS:
        logger.log(rec)
    logger.log_text("samples/tutor", "The answer is 4.", 2)
    logger.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (data,) = run.glob("*.wandb")
    names = (b"rl/reward/mean", b"rl/step", b"sft/loss", b"eval/acc/tutor", b"samples/tutor")
    deadline = time.monotonic() + 30
    while not all(n in data.read_bytes() for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)  # offline finish() returns before wandb's service process has written the file
    raw = data.read_bytes()
    assert [n for n in names if n not in raw] == []


def test_truncate_after_keeps_one_uninterrupted_timeline(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"], {})
    for rec in RECORDS:
        logger.log(rec)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "rl", "st')  # cut by the kill

    def kept():
        return [
            (r["stage"], r.get("tag"), r["step"])
            for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        ]

    logger.truncate_after("rl", 2)  # resuming after RL step 2: step 3 and "after" go, step2's eval stays
    assert kept() == [("sft", None, 1), ("eval", "before", 0), ("rl", None, 1), ("rl", None, 2), ("eval", "step2", 2)]
    logger.truncate_after("sft", 0)  # resuming stage 1 from scratch: only the "before" eval stays
    assert kept() == [("eval", "before", 0)]


def test_command_line_is_recorded_per_start(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/meml", "train", "grpo", "train.steps=3", "task.options={a: 1}"])
    assert command_line() == "meml train grpo train.steps=3 'task.options={a: 1}'"
    MetricsLogger(tmp_path, ["jsonl"], {}).close()
    MetricsLogger(tmp_path, ["jsonl"], {}).close()  # a resume adds a line
    assert (tmp_path / "command.txt").read_text().splitlines() == [command_line()] * 2
    MetricsLogger(tmp_path / "worker", ["jsonl"], {}, enabled=False)
    assert not (tmp_path / "worker").exists()  # non-main processes write nothing


def test_training_logs_samples_every_n_steps(tiny_model_dir, tmp_path):
    from meml.cli import main

    extra = {"sft.enabled": "false", "train.steps": 2, "log.samples_every": 2, "log.backends": "[jsonl, tensorboard]"}
    assert main(["train", *tiny_overrides(tiny_model_dir, tmp_path, **extra)]) == 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["step"] for s in samples} == {2}
    assert {"question_id", "expert", "reward", "completion"} <= set(samples[0])
    acc, scalars = _scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["rl/reward/mean"]] == [1, 2]
    assert any(tag.startswith("samples/") for tag in acc.Tags()["tensors"])
