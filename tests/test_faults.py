"""Faults that must never lose a run: reward functions that raise or hang, non-finite
losses and gradients, and bad config, data or output directories caught before the model
loads. (Checkpoint-write faults are in test_checkpoint.py, kills and signals in
test_resume.py.)"""

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meml.cli import main
from meml.tasks.rewards import RewardStats, call_reward_function
from meml.train import checkpoint as ckpt

import reward_fns
from conftest import tiny_overrides

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures" / "data"
IDS = ["q1", "q2", "q3", "q4"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]  # odd, even, odd, even


def _call(fn, timeout_s=5.0, completions=COMPLETIONS, name=None):
    stats = RewardStats()
    columns = {"question_id": IDS[: len(completions)]}
    values = call_reward_function(
        fn, name or fn.__name__, ["p"] * len(completions), completions, columns, timeout_s, IDS, stats
    )
    return values, stats


# ----------------------------------------------------------------------------- reward functions


def test_a_raising_reward_function_gives_none_only_where_it_fails(caplog):
    with caplog.at_level(logging.WARNING):
        values, stats = _call(reward_fns.raises_on_odd)
    assert values == [None, 1.0, None, 1.0]
    assert (stats.failures, stats.failed_ids) == (2, ["q1", "q3"])
    assert (
        "raises_on_odd gave None on 2 of 4 completions (RuntimeError: odd completion); examples: q1, q3" in caplog.text
    )


@pytest.mark.parametrize(
    ("fn", "shown"),
    [
        (reward_fns.calls_sys_exit, "SystemExit(0)"),
        (reward_fns.raises_keyboard_interrupt, "KeyboardInterrupt()"),
        (reward_fns.raises_generator_exit, "GeneratorExit('closed')"),
    ],
)
def test_a_reward_function_that_exits_or_interrupts_only_fails(fn, shown, caplog):
    """SystemExit, KeyboardInterrupt and other BaseExceptions from the function's thread are
    that function's failures: counted and logged with the ids, never re-raised as an exit
    or a Ctrl-C of the run."""
    with caplog.at_level(logging.WARNING):
        values, stats = _call(fn)
    assert values == [None] * 4 and (stats.failures, stats.failed_ids) == (4, IDS)
    assert f"{fn.__name__} gave None on 4 of 4 completions ({shown} raised inside the function" in caplog.text
    assert "examples: q1, q2, q3, q4" in caplog.text


@pytest.mark.e2e
def test_training_goes_on_through_reward_functions_that_exit_or_interrupt(tiny_model_dir, tmp_path):
    """A real `meml train` process: before, the sys.exit(0) ended it with exit code 0, no
    message and no results."""
    extra = {
        "sft.enabled": "false",
        "reward.use_verifier": "false",
        "reward.functions": (
            "[reward_fns:length_parity, reward_fns:calls_sys_exit, reward_fns:raises_keyboard_interrupt]"
        ),
    }
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "meml.cli", "train", *tiny_overrides(tiny_model_dir, tmp_path, **extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        json.loads((tmp_path / "results.json").read_text()) == {}
    )  # written: the run reached its end (no evals asked)
    rl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1, 2]
    assert all(r["reward_failures"] == 2 * 3 * 2 * 2 for r in rl)  # 2 functions x 2 questions x 3 experts x 2 answers
    assert "calls_sys_exit gave None on 12 of 12 completions (SystemExit(0) raised inside the function" in done.stderr
    assert "raises_keyboard_interrupt gave None on 12 of 12 completions (KeyboardInterrupt()" in done.stderr
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["rl-000002"]


def test_a_hanging_reward_function_times_out_per_completion_and_promptly(caplog):
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        values, stats = _call(reward_fns.sleeps_on_odd, timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert values == [None, 1.0, None, 1.0] and stats.failed_ids == ["q1", "q3"]
    assert elapsed < 10  # the batch call's 0.5 s, then concurrent retries of 0.5 s: never the 120 s sleep
    assert "timed out after reward.timeout_s=0.5); examples: q1, q3" in caplog.text


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (reward_fns.returns_nan, [None, None, None]),  # non-finite values are failures, not rewards
        (reward_fns.one_short, [None, None, None]),  # a list of the wrong length too (and 0 for one)
        (reward_fns.numpy_scalars, [0.5, 1.0, 1.0]),  # numpy scalars and bools are numbers
    ],
)
def test_malformed_reward_values(fn, expected):
    values, stats = _call(fn, completions=COMPLETIONS[:3])
    assert values == expected and stats.failures == expected.count(None)


def test_a_function_with_too_many_hung_calls_is_not_called_again(monkeypatch, caplog):
    monkeypatch.setattr("meml.tasks.rewards.MAX_ABANDONED", 2)
    _call(reward_fns.sleeps, timeout_s=0.05, name="hangs")  # leaves 5 calls running for 5 s
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        values, stats = _call(reward_fns.sleeps, timeout_s=0.05, name="hangs")
    assert values == [None] * 4 and stats.failures == 4 and time.monotonic() - t0 < 0.05
    assert "timed-out calls are still running; not called this step" in caplog.text


def test_hung_reward_calls_do_not_hold_up_the_exit_of_the_process():
    code = (
        "import reward_fns\nfrom meml.tasks.rewards import RewardStats, call_reward_function\n"
        "print(call_reward_function(reward_fns.sleeps_forever, 'f', ['p'] * 3, ['a'] * 3, {}, 0.2, ['q'] * 3, "
        "RewardStats()))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "[None, None, None]" in done.stdout
    assert time.monotonic() - t0 < 60  # a non-daemon pool would wait for the hour-long calls


@pytest.mark.e2e
def test_training_goes_on_through_reward_function_failures(tiny_model_dir, tmp_path, caplog):
    extra = {
        "sft.enabled": "false",
        "reward.functions": "[reward_fns:length_parity, reward_fns:raises_on_odd, reward_fns:sleeps_on_odd]",
        "reward.timeout_s": 0.5,
    }
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert main(["train", *tiny_overrides(tiny_model_dir, tmp_path, **extra)]) == 0
    assert time.monotonic() - t0 < 100  # 2 steps; a blocking call would take 120 s each
    rl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1, 2]
    assert sum(r["reward_failures"] for r in rl) > 0 and all(math.isfinite(r["loss"]) for r in rl)
    assert "raises_on_odd gave None on" in caplog.text and "sleeps_on_odd gave None on" in caplog.text
    assert re.search(r"examples: arith-d1-s0-train-\d+", caplog.text)  # the failing examples, by id


# ----------------------------------------------------------------------------- non-finite updates


def _poison(monkeypatch, bad_calls: set[int], kind: str) -> None:
    """Make the optimizer steps numbered in bad_calls (1-based) see a NaN gradient or an infinite loss."""
    import meml.train.update

    real = meml.train.update.accumulate_gradients
    calls = []

    def accumulate(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) in bad_calls:
            if kind == "grad":
                grad = next(p.grad for p in model.parameters() if p.grad is not None)
                grad.view(-1)[0] = float("nan")
            else:
                stats["loss"] = float("inf")
        return stats

    monkeypatch.setattr(meml.train.update, "accumulate_gradients", accumulate)


def _weights(run, name):
    return load_file(str(run / "checkpoints" / name / "model" / "model.safetensors"))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["grad", "loss"])
@pytest.mark.e2e
def test_non_finite_updates_are_skipped_and_too_many_stop_the_run_with_a_checkpoint(
    kind, tiny_model_dir, tmp_path, monkeypatch, capsys, caplog
):
    _poison(monkeypatch, {2, 4, 5, 6}, kind)
    extra = {
        "sft.enabled": "false",
        "train.steps": 8,
        "train.max_bad_steps": 3,
        "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 10,
        "reward.use_verifier": "false",
        "reward.functions": "[reward_fns:length_parity]",
        "optim.lr": "1e-3",
    }
    with caplog.at_level(logging.WARNING):
        assert main(["train", *tiny_overrides(tiny_model_dir, tmp_path, **extra)]) == 1
    err = capsys.readouterr().err
    assert "error: 3 updates in a row had a non-finite loss or gradient (stage rl, step 6)" in err
    assert str(tmp_path / "checkpoints" / "rl-000006") in err
    assert "update skipped, 1 in a row (the run stops at 3), 1 in all" in caplog.text
    rl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rl] == [0, 1, 0, 1, 1, 1]  # stopped at step 6 of 8
    assert _same(_weights(tmp_path, "rl-000002"), _weights(tmp_path, "rl-000001"))  # a skipped update changes nothing
    assert not _same(_weights(tmp_path, "rl-000003"), _weights(tmp_path, "rl-000002"))  # a good one does
    last = _weights(tmp_path, "rl-000006")
    assert _same(last, _weights(tmp_path, "rl-000003")) and all(torch.isfinite(t).all() for t in last.values())
    state, good = (ckpt.load_trainer_state(tmp_path / "checkpoints" / n) for n in ("rl-000006", "rl-000003"))
    assert state["counters"]["bad_streak"] == 3 and state["counters"]["skipped_updates"] == 4
    assert (
        state["optimizer"]["state"][0]["step"] == good["optimizer"]["state"][0]["step"] == 2
    )  # AdamW moved on good steps only
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], good["optimizer"]["state"][0]["exp_avg"])
    assert ckpt.find_latest(tmp_path).name == "rl-000006"


def test_fp16_overflows_are_the_loss_scalers_to_skip_and_training_goes_on(monkeypatch):
    """fp16 loss scaling as accelerate sets it up on CUDA (a GradScaler, a prepared
    optimizer), simulated on CPU: an overflow is skipped by the scaler and lowers its scale
    without counting as bad, a non-finite loss is bad, and every next step still runs
    (a skip that bypassed the scaler would make its next unscale_ raise)."""
    from accelerate import Accelerator

    import meml.train.update
    from meml.algo.objective import LossSettings
    from meml.core.load import load_config
    from meml.train.session import make_optimizer
    from meml.train.update import Learner, optimizer_step

    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**16), True
    model = torch.nn.Linear(2, 1, bias=False)
    cfg = load_config(None, [])
    optimizer, scheduler = make_optimizer(model.parameters(), 0.1, cfg, 10, accelerator)
    counters = {"bad_streak": 0, "skipped_updates": 0, "reward_failures": 0}
    learner = Learner(
        model,
        optimizer,
        scheduler,
        accelerator,
        pad_id=0,
        micro_batch_tokens=cfg.train.micro_batch_tokens,
        grad_clip=cfg.optim.grad_clip,
        counters=counters,
        max_bad_steps=cfg.train.max_bad_steps,
    )
    scale_of_input = {}

    def accumulate(model, items, settings, budget, pad_id, accelerator, chunk_tokens=0):
        loss = model(torch.full((1, 2), scale_of_input["x"])).sum()
        accelerator.backward(loss)
        return {"loss": float(loss.detach())}

    monkeypatch.setattr(meml.train.update, "accumulate_gradients", accumulate)

    def step(x):
        scale_of_input["x"] = x
        before = model.weight.detach().clone()
        stats = optimizer_step(learner, [], LossSettings())
        return stats["skipped"], not torch.equal(before, model.weight), dict(counters)

    assert step(1e36) == (
        1.0,
        False,
        {"bad_streak": 0, "skipped_updates": 1, "reward_failures": 0},
    )  # x * 2**16 overflows
    assert accelerator.scaler.get_scale() == 2.0**15
    assert step(1.0)[:2] == (0.0, True)
    assert step(float("nan")) == (1.0, False, {"bad_streak": 1, "skipped_updates": 2, "reward_failures": 0})
    assert step(1.0) == (0.0, True, {"bad_streak": 0, "skipped_updates": 2, "reward_failures": 0})


# ----------------------------------------------------------------------------- checks before the model loads


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was caught")

    monkeypatch.setattr("meml.engines.model.load_policy", refuse)
    monkeypatch.setattr("meml.engines.model.load_tokenizer", refuse)


def _bad_gsm8k(tmp_path) -> Path:
    data = tmp_path / "gsm8k"
    shutil.copytree(FIXTURES / "gsm8k", data)
    shutil.copy(FIXTURES / "gsm8k_bad.jsonl", data / "train.jsonl")
    return data


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("config typo", 2, "config error: .*trian"),
        ("malformed dataset row", 2, r"error: .*train.jsonl:2: not valid JSON"),
        ("bad reward function path", 2, r"error: reward.functions: cannot import module 'no_such_module'"),
        ("unwritable output_dir", 1, r"error: output_dir .*a-file/run is not writable \(Not a directory"),
    ],
)
@pytest.mark.e2e
def test_bad_config_data_and_output_dir_fail_before_the_model_loads(
    case, code, message, tiny_model_dir, tmp_path, no_model_load, capsys
):
    out = tmp_path / "run"
    preset, extra = None, {}
    if case == "config typo":
        extra = {"trian.steps": 2}
    elif case == "malformed dataset row":
        preset, extra = (
            "task_gsm8k",
            {"task.path": _bad_gsm8k(tmp_path), "task.options": "{}", "experts.2.trace_source": "none"},
        )
    elif case == "bad reward function path":
        extra = {"reward.functions": "[no_such_module:score]"}
    else:
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "run"
    args = ["train", *([preset] if preset else []), *tiny_overrides(tiny_model_dir, out, **extra)]
    assert main(args) == code
    assert re.search(message, capsys.readouterr().err)
