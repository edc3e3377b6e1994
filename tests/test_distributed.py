"""Two CPU processes (gloo, through `accelerate launch`) against one process, same global
batch and seeds: the trained parameters agree.

Rollout seeds are per (question, expert) and every normaliser is global, so both runs see
the same samples and take the same gradient; what differs is float summation order in the
gradient all-reduce. Tolerance: parameters agree to 1% of the largest parameter update
after MEF + 2 RL steps at lr 1e-3 (AdamW turns a gradient element near zero, whose sign the
summation order can move, into an update of ~lr, so an absolute bound tighter than that is
a property of the CPU, not of the code; a wrong normaliser moves parameters by a whole step).
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")]


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _final_params(run_dir):
    from safetensors.torch import load_file

    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    return load_file(str(ckpt / "model" / "model.safetensors"))


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    extra = {
        "model.dtype": "fp32",
        "train.questions_per_step": 4,
        "sft.sequences_per_step": 8,
        "sft.max_examples": 8,
        "optim.lr": "1e-3",
        "sft.lr": "1e-3",
        "rollout.num_generations_per_expert": 4,
        "algo.hsft.max_wrong": 2,
        "reward.use_verifier": "false",
        "reward.functions": "[reward_fns:length_parity]",
    }
    tests_dir = os.path.dirname(__file__)
    one = tmp_path / "one"
    two = tmp_path / "two"
    _run([sys.executable, "-m", "meml.cli", "train", "meml", *tiny_overrides(tiny_model_dir, one, **extra)], tests_dir)
    # --multi_gpu picks the torchrun launcher; on a machine without GPUs meml asks accelerate for gloo on CPU
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "meml.cli",
        "train",
        "meml",
    ]
    result = _run([*launch, *tiny_overrides(tiny_model_dir, two, **extra)], tests_dir)
    assert "2 process(es)" in result.stderr + result.stdout
    a, b = _final_params(one), _final_params(two)
    start = _final_params_of(tiny_model_dir)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs did train
    worst = max((b[k] - a[k]).abs().max().item() for k in a)
    print(f"largest parameter update {moved:.2e}, largest difference between 1 and 2 processes {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.01 * moved, msg=lambda m, k=k: f"{k}: {m}")
    metrics_one = (one / "metrics.jsonl").read_text().count('"stage": "rl"')
    assert metrics_one == 2 and (two / "metrics.jsonl").read_text().count('"stage": "rl"') == 2


def _final_params_of(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
