"""The adaptive expert budget: the split by hand, the success averages, HSFT's trigger on
unequal groups, an RL step that moves answers toward the expert that succeeds, and an exact
resume with the budget (and dynamic sampling) on."""

import math
import random

import pytest

import meml.train.rl_step as riel
from meml.algo.budget import ExpertBudget, budget_weights, hsft_max_wrong, split_budget
from meml.core.errors import ConfigError
from meml.core.load import load_config
from meml.engines.base import Generation
from meml.train import checkpoint as ckpt
from meml.train.loop import make_learner
from meml.train.session import open_session

from conftest import tiny_overrides

# ----------------------------------------------------------------------------- the split


def test_split_by_hand():
    # weights exp(s / tau) = [3, 1, 1] / 5 = [0.6, 0.2, 0.2]; spare 12 - 3 x 2 = 6 -> [3.6, 1.2, 1.2]
    # whole parts [3, 1, 1] leave 1, which goes to the largest remainder (0.6): expert 0
    assert split_budget(12, [math.log(3), 0.0, 0.0], floor=2, temperature=1.0) == [6, 3, 3]
    # exp([0.8, 0.2, 0.2] / 0.2) = [e^4, e, e]: w0 = 54.598 / (54.598 + 5.437) = 0.909 -> 6 w = [5.46, 0.27, 0.27]
    assert split_budget(12, [0.8, 0.2, 0.2], floor=2, temperature=0.2) == [8, 2, 2]


def test_the_log_scale_by_hand_and_it_is_scale_free():
    # log scale at tau 1: w proportional to s = [4, 1, 1] / 6; spare 6 -> [4, 1, 1] exactly
    assert split_budget(12, [0.04, 0.01, 0.01], 2, 1.0, scale="log") == [6, 3, 3]
    assert split_budget(12, [0.8, 0.2, 0.2], 2, 1.0, scale="log") == [6, 3, 3]  # every rate x 20: same split
    # tau 0.5: w ~ s^2 = [9, 1, 0] / 10 -> 6 w = [5.4, 0.6, 0]; whole [5, 0, 0], the one left to the 0.6 remainder
    assert split_budget(12, [0.03, 0.01, 0.0], 2, 0.5, scale="log") == [7, 3, 2]
    # the linear scale at tau 0.1 sees exp([0.3, 0.1, 0]) = [1.350, 1.105, 1] -> 6 w = [2.34, 1.92, 1.74]:
    # whole [2, 1, 1], the two left to the 0.92 and 0.74 remainders -> the even split
    assert split_budget(12, [0.03, 0.01, 0.0], 2, 0.1) == [4, 4, 4]
    # the study's validation rates (docs/benchmarks.md): linear gives [4, 4, 4], log the tutor's [8, 2, 2]
    assert split_budget(12, [0.038, 0.008, 0.015], 2, 0.1) == [4, 4, 4]
    assert split_budget(12, [0.038, 0.008, 0.015], 2, 0.1, scale="log") == [8, 2, 2]
    # every rate 0: nothing to rank, the even split (ties to the earlier expert)
    assert split_budget(14, [0.0, 0.0, 0.0], 2, 0.1, scale="log") == [5, 5, 4]
    assert budget_weights([1e-300, 1e-300], 0.01, "log") == [0.5, 0.5]  # ratios, not powers that underflow
    with pytest.raises(ValueError, match="unknown scale"):
        budget_weights([0.1, 0.2], 0.1, "logit")


def test_equal_rates_split_evenly_and_remainder_ties_go_to_the_earlier_expert():
    assert split_budget(12, [0.4, 0.4, 0.4], 2, 0.1) == [4, 4, 4]
    assert split_budget(13, [0.4, 0.4, 0.4], 2, 0.1) == [5, 4, 4]  # spare 7: 7/3 each, one left over
    assert split_budget(14, [0.0, 0.0, 0.0], 2, 0.1) == [5, 5, 4]


def test_the_floor_holds_however_lopsided_the_rates():
    assert split_budget(12, [1.0, 0.0, 0.0], 2, 0.01) == [8, 2, 2]
    assert split_budget(6, [1.0, 0.0, 0.0], 2, 0.01) == [2, 2, 2]  # nothing to spare
    rng = random.Random(0)
    for _ in range(200):
        n, floor = rng.randint(1, 5), rng.randint(1, 3)
        total = n * floor + rng.randint(0, 20)
        rates = [rng.choice([0.0, rng.random()]) for _ in range(n)]
        for scale in ("linear", "log"):
            sizes = split_budget(total, rates, floor, rng.choice([0.01, 0.1, 1.0]), scale)
            assert sum(sizes) == total and min(sizes) >= floor
    with pytest.raises(ValueError):
        split_budget(5, [0.0, 0.0, 0.0], 2, 0.1)


def test_success_averages_by_hand_and_the_state_round_trips():
    b = ExpertBudget(2)
    b.update(correct=[1, 3], answers=[4, 4], smoothing=0.3)
    assert b.rates == [0.25, 0.75] and b.seen == [1, 1]  # the first observation sets the average
    b.update(correct=[4, 0], answers=[4, 4], smoothing=0.3)
    assert b.rates == pytest.approx([0.7 * 0.25 + 0.3 * 1.0, 0.7 * 0.75]) == [0.475, 0.525]
    b.update(correct=[0, 2], answers=[0, 4], smoothing=0.3)  # expert 0 sampled nothing: its average stays
    assert b.rates[0] == pytest.approx(0.475) and b.seen == [2, 3]
    assert b.answers == [8, 12] and b.correct == [5, 5]
    c = ExpertBudget(2)
    c.load_state_dict(b.state_dict())
    assert c.state_dict() == b.state_dict() and c.split(10, 2, 0.1) == b.split(10, 2, 0.1)
    with pytest.raises(ValueError, match="experts"):
        ExpertBudget(3).load_state_dict(b.state_dict())


def test_hsft_trigger_scales_with_the_group_size():
    # K = 3 of G = 4: more than 3/4 of the group wrong
    assert hsft_max_wrong(3, 4, 4) == 3  # the configured group: K itself
    assert hsft_max_wrong(3, 4, 2) == 1  # 2 answers: both wrong (> 1.5)
    assert hsft_max_wrong(3, 4, 12) == 9  # 12 answers: at least 10 wrong (> 9)
    assert hsft_max_wrong(3, 4, 1) == 0  # 1 answer: wrong (> 0.75)
    assert hsft_max_wrong(1, 2, 8) == 4  # K = 1 of 2: more than half


def test_budget_settings_are_checked():
    with pytest.raises(ConfigError, match="rollout.budget.answers_per_question=5"):
        load_config(None, ["rollout.budget.enabled=true", "rollout.budget.answers_per_question=5"])
    with pytest.raises(ConfigError, match="rollout.budget.smoothing"):
        load_config(None, ["rollout.budget.smoothing=1.5"])
    with pytest.raises(ConfigError, match="rollout.budget.scale='logg'.*Did you mean 'log'"):
        load_config(None, ["rollout.budget.scale=logg"])
    with pytest.raises(ConfigError, match="rollout.budget.temperature"):
        load_config(None, ["rollout.budget.temperature=0"])
    assert load_config("adaptive_budget").rollout.budget.enabled


# ----------------------------------------------------------------------------- an RL step


class HalfRightEngine:
    """Expert 1 answers correctly on even samples and wrongly on odd ones; experts 0 and 2 are
    always wrong. Records each generate call's (num_samples, experts)."""

    def __init__(self, s):
        self.s = s
        self.calls = []

    def generate(self, prompts, params, seeds=None):
        keys = [next(k for k, v in self.s._prompt_cache.items() if v == p) for p in prompts]
        self.calls.append((params.num_samples, sorted({e for _, e in keys})))
        out = []
        for qid, expert in keys:
            gold = self.s.examples_by_id[qid].answer
            group = []
            for j in range(params.num_samples):
                text = f"The answer is {gold}." if expert == 1 and j % 2 == 0 else "The answer is -1."
                ids = self.s.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.s.tokenizer.eos_token_id]
                group.append(Generation(ids, text, True))
            out.append(group)
        return out

    def sync_weights(self, policy):
        pass


def test_the_budget_moves_toward_the_expert_that_succeeds(tiny_model_dir, tmp_path):
    cfg = load_config(
        "adaptive_budget",
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{"sft.enabled": "false", "algo.hsft.push_prob": 1.0, "algo.hsft.buffer_size": 100},
        ),
    )
    s = open_session(cfg)
    s.engine = HalfRightEngine(s)
    learner = make_learner(s, 1e-4, 2)
    first = riel.rl_step(s, 1, learner, None)
    assert s.engine.calls == [(4, [0, 1, 2])]  # 12 answers, equal rates: 4 each, one call
    assert first["budget/algebraist"] == first["budget/tutor"] == pytest.approx(1 / 3)
    assert s.budget.rates == [0.0, 0.5, 0.0]
    assert first["budget/success/algebraist"] == 0.5

    # exp([0, 0.5, 0] / 0.1): w1 = e^5 / (e^5 + 2) = 0.987; spare 6 -> [0.04, 5.92, 0.04] -> [2, 8, 2]
    second = riel.rl_step(s, 2, learner, None)
    assert s.engine.calls[1:] == [(2, [0, 2]), (8, [1])]  # one generate call per group size
    assert second["budget/algebraist"] == pytest.approx(8 / 12) and second["budget/checker"] == pytest.approx(2 / 12)
    assert second["correct/algebraist"] == 0.5 and second["iml/fired"] == 2
    # HSFT on unequal groups (K = 1 of G = 2, i.e. more than half wrong): experts 0 and 2 (2 of 2
    # wrong) push; expert 1 (4 of 8 wrong, not more than 8 / 2) does not, where K = 1 read as a count would
    assert second["hsft/pushed/algebraist"] == 0
    assert second["hsft/pushed/tutor"] == second["hsft/pushed/checker"] == 2
    assert second["trained_sequences"] == 2 * 4  # the 4 right answers of each 8-answer group: A = 1 - 0.5


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.e2e
def test_in_process_stop_and_resume_is_exact_with_the_budget_and_dynamic_sampling(tiny_model_dir, tmp_path):
    """Stopped after RL step 1 and resumed: the budget's success averages come back from the
    checkpoint, so later splits (and everything else) match an uninterrupted run."""
    from test_resume import SETTINGS, _assert_equal, _run_in_process, assert_same_metrics, records

    extra = {
        **SETTINGS,
        "train.steps": 3,
        "sft.sequences_per_step": 12,
        "checkpoint.every_steps": 0,
        "rollout.budget.enabled": "true",
        "rollout.budget.answers_per_question": 9,
        "rollout.dynamic.enabled": "true",
        "rollout.dynamic.refill": "experts",
        "eval.before": "false",
        "eval.every_steps": 0,
        "eval.after": "false",
    }
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run_in_process(load_config(None, tiny_overrides(tiny_model_dir, straight, **extra)))
    _run_in_process(load_config(None, tiny_overrides(tiny_model_dir, stopped, **extra)), stop_after=1)
    assert [p.name for p in ckpt.list_checkpoints(stopped)] == ["sft-000002", "rl-000001"]
    _run_in_process(
        load_config(None, tiny_overrides(tiny_model_dir, stopped, **extra, **{"checkpoint.resume": "auto"}))
    )
    assert_same_metrics(stopped, straight)
    a, b = (ckpt.load_trainer_state(run / "checkpoints" / "rl-000003") for run in (stopped, straight))
    _assert_equal(a, b, "trainer_state")
    assert b["budget"]["seen"] == [3, 3, 3]
    rl = [r for r in records(straight) if r["stage"] == "rl"]
    assert len({r["budget/tutor"] for r in rl}) > 1  # the split moved, so a lost state would show
