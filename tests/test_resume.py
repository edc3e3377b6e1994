"""Exact resume: a run killed (SIGKILL, SIGTERM, or mid-checkpoint-write) and resumed ends
bitwise where an uninterrupted run ends: parameters, AdamW moments, scheduler, RNG states,
HSFT buffer, counters, and every logged metric except wall-clock timings.

The killed runs are real `meml train` processes. A small driver (DRIVER below) stands in
for the `meml` script and adds test-only hooks chosen by environment variables, so a kill
lands at a known point: after a given metrics record is written, inside a checkpoint
write, inside an RL step (in the rollout engine's generate, or in the optimizer's step
once it has changed the weights), or at the start of an RL step (to wait for SIGTERM). The test process sends the
signals itself where a real scheduler would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meml.core.load import load_config
from meml.train import checkpoint as ckpt

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e  # runs of the trainer end to end

TESTS = Path(__file__).parent
TIMING_KEYS = ("step_time_s", "tokens_per_s", "gen_tokens_per_s", "eval_time_s")

DRIVER = r"""
import os, signal, sys, time
from pathlib import Path

marker = os.environ.get("MEML_TEST_MARKER", "")
touch = lambda suffix="": Path(marker + suffix).touch()

if os.environ.get("MEML_TEST_HOLD_AFTER_RECORD"):  # "rl:4": write that record, then wait to be killed
    from meml.train.logger import MetricsLogger
    stage, step = os.environ["MEML_TEST_HOLD_AFTER_RECORD"].split(":")
    real_log = MetricsLogger.log
    def log(self, record):
        real_log(self, record)
        if (record.get("stage"), record.get("step")) == (stage, int(step)):
            touch()
            time.sleep(600)
    MetricsLogger.log = log

if os.environ.get("MEML_TEST_KILL_IN_SAVE"):  # "rl-000003": SIGKILL itself once that write has its trainer_state.pt
    import torch
    name, real_save = os.environ["MEML_TEST_KILL_IN_SAVE"], torch.save
    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if Path(f).parent.name.startswith(f".tmp-{name}-"):
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save

if os.environ.get("MEML_TEST_KILL_IN"):  # "generate:3" / "optimizer:3": SIGKILL itself there, inside RL step 3
    from torch.optim.optimizer import register_optimizer_step_post_hook
    import meml.train.loop as trainer
    from meml.engines.hf import HFEngine
    where, at = os.environ["MEML_TEST_KILL_IN"].split(":")
    now, real_step, real_generate = {"step": 0}, trainer.rl_step, HFEngine.generate
    def rl_step(s, step, *args):
        now["step"] = step
        try:
            return real_step(s, step, *args)
        finally:
            now["step"] = 0
    def generate(self, *args, **kwargs):
        out = real_generate(self, *args, **kwargs)
        if where == "generate" and now["step"] == int(at):  # the rollouts exist, only in memory
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    def stepped(optimizer, args, kwargs):
        if where == "optimizer" and now["step"] == int(at):  # the weights have moved, only in memory
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.rl_step, HFEngine.generate = rl_step, generate
    register_optimizer_step_post_hook(stepped)

# "3": at the start of RL step 3, wait for SIGTERM (and, with HOLD, a second)
if os.environ.get("MEML_TEST_WAIT_SIGNAL_AT"):
    import meml.train.loop as trainer
    at, real_step = int(os.environ["MEML_TEST_WAIT_SIGNAL_AT"]), trainer.rl_step
    def rl_step(s, step, *args):
        if step == at:
            touch()
            deadline = time.monotonic() + 60
            while not s.stop_requested and time.monotonic() < deadline:
                time.sleep(0.01)
            touch(".stopping")
            if os.environ.get("MEML_TEST_HOLD"):
                time.sleep(60)
        return real_step(s, step, *args)
    trainer.rl_step = rl_step

from meml.cli import main
sys.exit(main(sys.argv[1:]))
"""

# MEF: 8 questions x 3 experts = 24 traces in batches of 6 = 4 steps; then 6 RL steps.
# lr 1e-3 so that any state not carried over shows; a length-parity reward without the
# verifier so the policy gradient, IML and HSFT all fire on a random model; bf16 so the
# rollout engine keeps its own bf16 copy of the weights, which a resume must rebuild.
# Every failed group pushes (push_prob 1), so the buffer fills and flushes within 6 steps
# whatever the random model samples on a given CPU.
# Evals before, every 2 RL steps and after, and samples every step: their records must
# read as one uninterrupted run too.
SETTINGS = {
    "train.steps": 6,
    "sft.sequences_per_step": 6,
    "checkpoint.every_steps": 1,
    "checkpoint.keep_last": 2,
    "reward.use_verifier": "false",
    "reward.functions": "[reward_fns:length_parity]",
    "optim.lr": "1e-3",
    "sft.lr": "1e-3",
    "algo.hsft.buffer_size": 8,
    "algo.hsft.push_prob": 1.0,
    "model.dtype": "bf16",
    "eval.before": "true",
    "eval.every_steps": 2,
    "eval.after": "true",
    "log.samples_every": 1,
}


def _env(marker: Path | None = None, **hooks) -> dict:
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }  # one thread: see conftest.py
    if marker is not None:
        env["MEML_TEST_MARKER"] = str(marker)
    env.update({f"MEML_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
    return env


def start(model_dir, out, *flags, marker=None, **hooks) -> subprocess.Popen:
    args = [sys.executable, "-c", DRIVER, "train", *tiny_overrides(model_dir, out, **SETTINGS), *flags]  # flags win
    return subprocess.Popen(
        args, env=_env(marker, **hooks), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {path.name}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.02)


def kill9_at(model_dir, out, record: str, *flags) -> str:
    """Run until `record` ("stage:step") is logged, then SIGKILL it from here; its output."""
    marker = out.parent / f"{out.name}.{record.replace(':', '-')}.hold"
    proc = start(model_dir, out, *flags, marker=marker, hold_after_record=record)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    rc, text = finish(proc)
    assert rc == -signal.SIGKILL
    return text


def resume(model_dir, out) -> str:
    rc, text = finish(start(model_dir, out, "--resume"))
    assert rc == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, text = finish(start(tiny_model_dir, out))
    assert rc == 0, text[-3000:]
    return out


# ----------------------------------------------------------------------------- comparisons


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steady(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_KEYS and not k.startswith("time/")}


def assert_same_metrics(run: Path, reference: Path) -> None:
    """metrics.jsonl record for record (timings aside), and the files beside it."""
    got, want = records(run), records(reference)
    assert [(r["stage"], r.get("tag"), r["step"]) for r in got] == [(r["stage"], r.get("tag"), r["step"]) for r in want]
    for g, w in zip(got, want):
        assert _steady(g) == _steady(w), (
            g["stage"],
            g["step"],
            {k: (g.get(k), v) for k, v in _steady(w).items() if g.get(k) != v},
        )
    for path in [reference / "samples.jsonl", *sorted((reference / "eval").glob("*.jsonl"))]:
        if path.exists():
            assert (run / path.relative_to(reference)).read_text() == path.read_text(), path.name
    if (reference / "results.json").exists():
        steady = [
            {tag: _steady(r) for tag, r in json.loads((d / "results.json").read_text()).items()}
            for d in (run, reference)
        ]
        assert steady[0] == steady[1]


def assert_same_state(run: Path, reference: Path, name: str = "rl-000006") -> None:
    """Bitwise: weights, and everything in trainer_state.pt (AdamW moments and step counts,
    scheduler, RNG states, HSFT buffer, counters, data position)."""
    a, b = run / "checkpoints" / name, reference / "checkpoints" / name
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    _assert_equal(ckpt.load_trainer_state(a), ckpt.load_trainer_state(b), "trainer_state")


def _assert_equal(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif hasattr(x, "shape"):  # numpy RNG state
        assert (x == y).all(), where
    else:
        assert x == y, where


# ----------------------------------------------------------------------------- tests


def test_kill9_inside_mef_and_inside_rl_then_resume_matches_a_straight_run(straight_run, tiny_model_dir, tmp_path):
    """Killed after stage-1 step 2 was logged (newest checkpoint: sft-000001), resumed,
    killed again after RL step 4 was logged (newest: rl-000003), resumed to the end."""
    out = tmp_path / "run"
    kill9_at(tiny_model_dir, out, "sft:2")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["sft-000001"]
    text = kill9_at(tiny_model_dir, out, "rl:4", "--resume")
    assert "sft-000001 (sft step 1)" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["rl-000002", "rl-000003"]
    assert (records(out)[-1]["stage"], records(out)[-1]["step"]) == ("rl", 4)  # the killed run logged RL step 4 ...
    text = resume(tiny_model_dir, out)
    assert "rl-000003 (rl step 3)" in text  # ... which the resumed run dropped and redid
    assert_same_metrics(out, straight_run)
    assert_same_state(out, straight_run)
    # the kills cut through state that matters: a non-empty HSFT buffer crossed the RL kill
    # and was flushed afterwards, and stage 1's optimizer state crossed the MEF kill
    rl = {r["step"]: r for r in records(straight_run) if r["stage"] == "rl"}
    assert rl[3]["hsft/buffer"] > 0 and rl[6]["hsft/flushes"] > rl[3]["hsft/flushes"]
    assert ckpt.load_trainer_state(out / "checkpoints" / "rl-000006")["position"] == {"questions_seen": 12, "epoch": 0}
    assert len((out / "command.txt").read_text().splitlines()) == 3


def test_kills_before_the_first_checkpoint_and_inside_generation_and_the_optimizer_step_then_resume_matches(
    straight_run, tiny_model_dir, tmp_path
):
    """Killed after stage-1 step 1 was logged but before any checkpoint: --resume starts the
    run again from scratch, its logs cleared; killed again inside the rollout engine's
    generate in RL step 2 (newest checkpoint: rl-000001), resumed, killed inside the
    optimizer step of RL step 5 after it changed the weights (newest: rl-000004), resumed
    to the end."""
    out = tmp_path / "run"
    kill9_at(tiny_model_dir, out, "sft:1")
    assert ckpt.list_checkpoints(out) == [] and (out / "eval" / "before.jsonl").exists()
    assert [(r["stage"], r.get("tag"), r["step"]) for r in records(out)] == [("eval", "before", 0), ("sft", None, 1)]

    rc, text = finish(start(tiny_model_dir, out, "--resume", kill_in="generate:2"))
    assert rc == -signal.SIGKILL, text[-3000:]
    assert "no checkpoint yet, so the run starts again from scratch: removing" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["sft-000004", "rl-000001"]
    assert [(r["stage"], r.get("tag"), r["step"]) for r in records(out)][:2] == [
        ("eval", "before", 0),
        ("sft", None, 1),
    ]
    assert (records(out)[-1]["stage"], records(out)[-1]["step"]) == ("rl", 1)
    assert len((out / "command.txt").read_text().splitlines()) == 1  # the first start's line went with its logs

    rc, text = finish(start(tiny_model_dir, out, "--resume", kill_in="optimizer:5"))
    assert rc == -signal.SIGKILL and "rl-000001 (rl step 1)" in text, text[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["rl-000003", "rl-000004"]
    text = resume(tiny_model_dir, out)
    assert "rl-000004 (rl step 4)" in text
    assert_same_metrics(out, straight_run)
    assert_same_state(out, straight_run)
    assert len((out / "command.txt").read_text().splitlines()) == 3


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(straight_run, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    rc, _ = finish(start(tiny_model_dir, out, kill_in_save="rl-000003"))
    assert rc == -signal.SIGKILL
    root = out / "checkpoints"
    (stray,) = root.glob(".tmp-rl-000003-*")
    assert (stray / "trainer_state.pt").exists() and not (stray / "manifest.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["rl-000001", "rl-000002"]
    text = resume(tiny_model_dir, out)
    assert "removing" in text and stray.name in text and "rl-000002 (rl step 2)" in text
    assert not list(root.glob(".*"))
    assert_same_metrics(out, straight_run)
    assert_same_state(out, straight_run)


def test_sigterm_finishes_the_step_saves_and_exits_then_resumes(straight_run, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "at-step-3"
    proc = start(tiny_model_dir, out, "checkpoint.every_steps=0", marker=marker, wait_signal_at=3)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    rc, text = finish(proc)
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "received SIGTERM: finishing this step" in text and "stopped after rl step 3" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["sft-000004", "rl-000003"]  # saved because of the signal
    assert records(out)[-1]["step"] == 3
    resume(tiny_model_dir, out)
    assert_same_metrics(out, straight_run)
    assert_same_state(out, straight_run)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "at-step-3"
    proc = start(tiny_model_dir, out, marker=marker, wait_signal_at=3, hold=1)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(Path(f"{marker}.stopping"), proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, text = finish(proc)
    assert time.monotonic() - t0 < 30  # not the 60 s the driver holds for
    assert rc == 128 + signal.SIGTERM and "stopped at once by a second signal SIGTERM" in text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["rl-000001", "rl-000002"]
    assert ckpt.find_latest(out).name == "rl-000002"
    assert not list((out / "checkpoints").glob(".*"))


# ----------------------------------------------------------------------------- in-process variants


def _run_in_process(cfg, stop_after: int | None = None, engine_before: dict | None = None) -> None:
    """train(cfg); with stop_after, a real SIGTERM arrives during that RL step. engine_before
    collects the rollout engine's weights at the start of each RL step."""
    import meml.train.loop as trainer

    real_step = trainer.rl_step

    def rl_step(s, step, *args):
        if engine_before is not None:
            engine_before[step] = {n: p.detach().clone() for n, p in s.engine.model.named_parameters()}
        if step == stop_after:
            signal.raise_signal(signal.SIGTERM)
        return real_step(s, step, *args)

    previous = signal.getsignal(signal.SIGTERM)
    trainer.rl_step = rl_step
    try:
        result = trainer.train(cfg)
    finally:
        trainer.rl_step = real_step
    assert signal.getsignal(signal.SIGTERM) is previous  # train() puts the handlers back
    if stop_after:
        assert result["stopped"] == {"stage": "rl", "step": stop_after, "signal": signal.SIGTERM}


def test_in_process_stop_and_resume_is_exact_with_lora_kl_and_ppo(tiny_model_dir, tmp_path):
    """LoRA (the checkpoint holds only the adapter; resume loads the base, then it), the KL
    reference (the policy when RL started, after MEF: it must come back from the
    checkpoint, since the resumed policy has moved on) and PPO mini-batches. The engine's
    bf16 copy after the resume equals the uninterrupted run's at the same step. LoRA
    dropout draws from the torch RNG in every update, so the RNG state must come back too."""
    extra = {
        **SETTINGS,
        "train.steps": 3,
        "sft.sequences_per_step": 12,
        "checkpoint.every_steps": 0,
        "model.lora.enabled": "true",
        "model.lora.r": 4,
        "model.lora.dropout": 0.3,
        "algo.kl_coef": 0.5,
        "algo.loss": "ppo_clip",
        "algo.mini_batches": 2,
        "eval.before": "false",
        "eval.every_steps": 0,
        "eval.after": "false",
        "log.samples_every": 0,
    }
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    engine_straight, engine_resumed = {}, {}
    _run_in_process(load_config(None, tiny_overrides(tiny_model_dir, straight, **extra)), engine_before=engine_straight)
    _run_in_process(load_config(None, tiny_overrides(tiny_model_dir, stopped, **extra)), stop_after=1)
    assert [p.name for p in ckpt.list_checkpoints(stopped)] == ["sft-000002", "rl-000001"]
    resumed_cfg = load_config(None, tiny_overrides(tiny_model_dir, stopped, **extra, **{"checkpoint.resume": "auto"}))
    _run_in_process(resumed_cfg, engine_before=engine_resumed)
    assert sorted(engine_resumed) == [2, 3]
    assert {p.dtype for p in engine_resumed[2].values()} == {torch.bfloat16}
    for step in (2, 3):
        assert [n for n, p in engine_resumed[step].items() if not torch.equal(p, engine_straight[step][n])] == []
    assert_same_metrics(stopped, straight)
    assert all(r["kl"] > 0 for r in records(straight) if r["stage"] == "rl" and r["step"] > 1)
    a, b = stopped / "checkpoints" / "rl-000003", straight / "checkpoints" / "rl-000003"
    assert not (a / "model" / "model.safetensors").exists()  # the adapter only
    wa, wb = (
        load_file(str(a / "model" / "adapter_model.safetensors")),
        load_file(str(b / "model" / "adapter_model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    _assert_equal(ckpt.load_trainer_state(a), ckpt.load_trainer_state(b), "trainer_state")  # reference included
    reference = ckpt.load_trainer_state(a)["reference"]
    assert len(reference) == len(wa) and all("lora_" in name for name in reference)  # the adapter's share only
