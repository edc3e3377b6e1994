"""Two-step runs on the tiny model: every preset, and a close look at one."""

import json
import math
from pathlib import Path

import pytest
import torch

from meml.core.load import list_presets, load_config
from meml.train.loop import train

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e  # runs of the trainer end to end


def _records(run_dir, stage):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage]


ALGORITHM_PRESETS = [p for p in list_presets() if not p.startswith("task_")]
FIXTURES = Path(__file__).parent / "fixtures" / "data"


# what a preset needs beyond tiny_overrides to make sense at 12 new tokens
PRESET_EXTRAS = {"dapo": {"reward.overlong_buffer": 4}}


@pytest.mark.parametrize("preset", ALGORITHM_PRESETS)
def test_every_preset_runs_two_steps(preset, tiny_model_dir, tmp_path):
    cfg = load_config(preset, tiny_overrides(tiny_model_dir, tmp_path, **PRESET_EXTRAS.get(preset, {})))
    train(cfg, preset)
    if cfg.train.steps:
        rl = _records(tmp_path, "rl")
        assert [r["step"] for r in rl] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in rl)
    if cfg.sft.enabled:
        assert _records(tmp_path, "sft")
    assert (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("task", ["gsm8k", "mathqa", "strategyqa"])
def test_task_presets_run_on_native_format_fixtures(task, tiny_model_dir, tmp_path):
    """The task presets with the third expert's distilled traces swapped for none."""
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{"task.path": FIXTURES / task, "task.options": "{}", "experts.2.trace_source": "none"},
    )
    cfg = load_config(f"task_{task}+meml", overrides)
    train(cfg, f"task_{task}+meml")
    assert [r["step"] for r in _records(tmp_path, "rl")] == [1, 2]
    assert len(_records(tmp_path, "sft")) >= 1


@pytest.mark.parametrize("preset", ["meml", "grpo"])
def test_two_steps_change_every_trainable_parameter(preset, tiny_model_dir, tmp_path):
    """A reward with spread (even-length completions) so the policy gradient is not zero."""
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{
            "sft.enabled": "false",
            "reward.use_verifier": "false",
            "reward.functions": "[reward_fns:length_parity]",
            "optim.lr": "1e-3",
            "rollout.num_generations_per_expert": 4,
            "algo.hsft.max_wrong": 2,
        },
    )
    cfg = load_config(preset, overrides)
    train(cfg, preset)
    rl = _records(tmp_path, "rl")
    # (a PPO-clip loss at ratio 1 is -mean(A), which is 0 for group-centred advantages: check gradients)
    assert len(rl) == 2 and all(math.isfinite(r["loss"]) for r in rl)
    assert all(r["grad_norm"] > 0 for r in rl if r["zero_signal_frac"] < 1)
    for key in ("reward/mean", "zero_signal_frac", "completion_len", "tokens_per_s", "step_time_s", "kl", "iml/fired"):
        assert key in rl[0], key
    ckpt = sorted((tmp_path / "checkpoints").iterdir())[-1]
    after = AutoModelForCausalLM.from_pretrained(ckpt / "model").state_dict()
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"


def test_reward_function_columns_follow_trl_contract(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(
        tiny_model_dir, tmp_path, **{"sft.enabled": "false", "reward.functions": "[reward_fns:needs_answer_column]"}
    )
    train(load_config("grpo", overrides), "grpo")
    assert all(r["reward/mean"] >= 0.5 for r in _records(tmp_path, "rl"))


@pytest.mark.parametrize(
    "preset, keys",
    [
        (
            "dapo",
            ["dynamic/rounds", "dynamic/extra_rollouts", "dynamic/dropped_groups", "reward/overlong", "entropy/tutor"],
        ),
        ("adaptive_budget", ["budget/tutor", "budget/algebraist", "budget/checker", "entropy/checker"]),
        ("gspo", ["clip_frac", "entropy/algebraist"]),
        ("cispo", ["clip_frac", "entropy/tutor"]),
    ],
)
def test_the_toolkit_presets_log_their_metrics(preset, keys, tiny_model_dir, tmp_path):
    """Each sparse-reward feature's metrics reach metrics.jsonl (a length-parity reward gives
    the groups a spread, so the policy gradient and its entropy statistics are there)."""
    extra = {
        **PRESET_EXTRAS.get(preset, {}),
        "reward.use_verifier": "false",
        "reward.functions": "[reward_fns:length_parity]",
    }
    cfg = load_config(preset, tiny_overrides(tiny_model_dir, tmp_path, **extra))
    train(cfg, preset)
    rl = _records(tmp_path, "rl")
    assert len(rl) == 2
    for key in keys:
        assert all(key in r and math.isfinite(r[key]) for r in rl), key
