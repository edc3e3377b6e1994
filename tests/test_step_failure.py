"""A step that fails with an unexpected error (a bug, a RuntimeError from the model) ends the
run with exit 1 and an `error:` line naming the stage, step and code location and how to go
on; a checkpoint of the step before is saved where that state is intact, and a resume from
it ends bitwise where an uninterrupted run ends. A KeyboardInterrupt inside a step is not
such a failure.

Runs are in process (`meml.cli.main`), stage 2 only, on the tiny model."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from test_resume import _assert_equal, assert_same_metrics, records

import meml.train.rl_step
import meml.train.update
from meml.cli import main
from meml.train import checkpoint as ckpt

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e  # runs of the trainer end to end

# LoRA with dropout: the update draws from the torch RNG, which a rewound step must put
# back. HSFT pushes every group with a wrong answer (max_wrong 0, push_prob 1), so the
# buffer changes inside the failing step too, whatever the random model samples.
SETTINGS = {
    "sft.enabled": "false",
    "train.steps": 4,
    "checkpoint.every_steps": 0,
    "checkpoint.keep_last": 3,
    "reward.use_verifier": "false",
    "reward.functions": "[reward_fns:length_parity]",
    "optim.lr": "1e-3",
    "model.lora.enabled": "true",
    "model.lora.r": 4,
    "model.lora.dropout": 0.3,
    "algo.hsft.buffer_size": 4,
    "algo.hsft.push_prob": 1.0,
    "algo.hsft.max_wrong": 0,
}


def _args(model_dir, out, *flags, **extra):
    return ["train", *tiny_overrides(model_dir, out, **{**SETTINGS, **extra}), *flags]


def _fail_on_call(monkeypatch, module, name: str, call: int, exc: BaseException) -> None:
    """Make the `call`-th call (1-based) of module.name run, then raise exc."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        value = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            raise exc
        return value

    monkeypatch.setattr(module, name, wrapper)


def _same_checkpoint(a, b) -> None:
    files = sorted(p.relative_to(a) for p in (a / "model").glob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in (b / "model").glob("*.safetensors"))
    for f in files:
        wa, wb = load_file(str(a / f)), load_file(str(b / f))
        assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    _assert_equal(ckpt.load_trainer_state(a), ckpt.load_trainer_state(b), "trainer_state")


def test_a_step_failing_before_its_update_saves_the_step_before_and_resumes_exactly(
    tiny_model_dir, tmp_path, monkeypatch, capsys, caplog
):
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    assert main(_args(tiny_model_dir, straight)) == 0
    # step 3 fails after its rollouts, rewards, HSFT pushes and backward pass (dropout drew
    # from the RNG), before the optimizer touched the weights
    with monkeypatch.context() as m:
        _fail_on_call(
            m, meml.train.update, "accumulate_gradients", 3, RuntimeError("CUDA error: an illegal memory access")
        )
        with caplog.at_level(logging.ERROR):
            assert main(_args(tiny_model_dir, failed)) == 1
    err = capsys.readouterr().err
    saved = failed / "checkpoints" / "rl-000002"
    assert "error: rl step 3 failed at train/update.py:" in err and "in optimizer_step" in err
    assert "RuntimeError: CUDA error: an illegal memory access" in err
    assert f"Saved the state at the end of rl step 2 (before the failed step) in {saved}" in err
    assert f"continue from rl-000002 with: meml train --resume output_dir={failed}" in err
    assert "rl step 3 failed:" in caplog.text and "Traceback" in caplog.text  # the traceback is logged
    assert [p.name for p in ckpt.list_checkpoints(failed)] == ["rl-000002"]
    assert [r["step"] for r in records(failed)] == [1, 2]
    assert not (failed / "results.json").exists()
    # the buffer changed inside the failed step: the checkpoint must hold it as it was before
    assert records(straight)[2]["hsft/pushed"] > 0

    assert main(_args(tiny_model_dir, failed, "--resume")) == 0
    assert_same_metrics(failed, straight)
    _same_checkpoint(failed / "checkpoints" / "rl-000004", straight / "checkpoints" / "rl-000004")


def test_a_step_failing_after_its_update_saves_nothing_and_says_so(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # the weights moved in step 2's update; the rollout engine's sync then fails
    _fail_on_call(monkeypatch, meml.train.rl_step, "sync_rollout_weights", 2, RuntimeError("out of memory"))
    assert main(_args(tiny_model_dir, tmp_path, **{"checkpoint.every_steps": 0})) == 1
    err = capsys.readouterr().err
    assert "error: rl step 2 failed at train/rl_step.py:" in err and "RuntimeError: out of memory" in err
    assert "No checkpoint was saved: the failure came in or after the optimizer update of step 2" in err
    assert "There is no checkpoint: fix the cause, then start again" in err
    assert ckpt.list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())
    assert [r["step"] for r in records(tmp_path)] == [1]


def test_a_failure_in_the_first_step_or_with_the_previous_checkpoint_on_disk_saves_nothing_new(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    first, later = tmp_path / "first", tmp_path / "later"
    with monkeypatch.context() as m:
        _fail_on_call(m, meml.train.rl_step, "collect", 1, ValueError("a bug"))
        assert main(_args(tiny_model_dir, first)) == 1
    err = capsys.readouterr().err
    assert "error: rl step 1 failed at train/rl_step.py:" in err and "in rl_step" in err and "ValueError: a bug" in err
    assert "No rl step of this start had finished, so there was nothing new to save" in err
    assert ckpt.list_checkpoints(first) == []
    with monkeypatch.context() as m:
        _fail_on_call(m, meml.train.rl_step, "collect", 3, ValueError("a bug"))
        assert main(_args(tiny_model_dir, later, **{"checkpoint.every_steps": 1})) == 1
    err = capsys.readouterr().err
    assert f"The state at the end of rl step 2 is in {later / 'checkpoints' / 'rl-000002'}" in err
    assert "continue from rl-000002 with: meml train --resume" in err


def test_a_keyboard_interrupt_inside_a_step_is_not_a_step_failure(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _fail_on_call(monkeypatch, meml.train.rl_step, "collect", 2, KeyboardInterrupt())
    assert main(_args(tiny_model_dir, tmp_path, **{"checkpoint.every_steps": 0})) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "failed" not in err
    assert ckpt.list_checkpoints(tmp_path) == []
