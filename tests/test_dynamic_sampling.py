"""Dynamic sampling: which groups are dropped, how many fresh questions a round draws, which
expert refills a dead group (by hand), and RL steps whose refills are sampled and counted."""

import pytest
from test_budget import HalfRightEngine

import meml.train.rl_step as riel
from meml.algo.dynamic import GroupStat, expert_refills, fresh_questions, group_stats, informative_mask, zero_signal
from meml.core.errors import ConfigError
from meml.core.load import load_config
from meml.core.types import Episode
from meml.engines.base import prompt_seed
from meml.train.loop import make_learner
from meml.train.sampling import Draw, question_batch
from meml.train.session import open_session

from conftest import tiny_overrides

# ----------------------------------------------------------------------------- the rules


def test_zero_signal_groups_are_those_without_reward_spread():
    assert zero_signal([1.0, 1.0, 1.0]) and zero_signal([0.0, None, 0.0]) and zero_signal([0.5, 0.5])
    assert zero_signal([None, 1.0]) and zero_signal([])  # one valid reward: its own baseline
    assert not zero_signal([1.0, 0.0]) and not zero_signal([0.0, None, 0.5])


def _ep(slot, expert, reward, num_experts=3, qid="q"):
    return Episode(qid, expert, slot * num_experts + expert, slot, [1], [2], "", True, reward=reward)


def test_the_mask_drops_whole_groups_and_follows_the_baseline_grouping():
    eps = [_ep(0, 0, 0.0), _ep(0, 0, 0.0), _ep(0, 1, 1.0), _ep(0, 1, 0.0), _ep(1, 0, 1.0), _ep(1, 0, 1.0)]
    assert informative_mask(eps, [e.group_id for e in eps]) == [False, False, True, True, False, False]
    assert informative_mask(eps, [e.slot for e in eps]) == [True] * 4 + [False] * 2  # pooled per draw


def test_group_stats_and_variance():
    eps = [_ep(0, 1, 1.0), _ep(0, 1, 0.0), _ep(0, 1, 1.0), _ep(0, 1, 0.0), _ep(0, 0, None), _ep(0, 0, 0.0)]
    by_id = {g.group: g for g in group_stats(eps, pooled=False)}
    assert list(by_id) == [0, 1] and by_id[1].variance == 0.25 and by_id[0].dead and by_id[0].variance == 0.0
    assert by_id[1].question_id == "q" and by_id[1].expert == 1
    (pooled,) = group_stats(eps, pooled=True)
    assert pooled.expert is None and not pooled.dead and len(pooled.rewards) == 6


def test_fresh_questions_by_hand():
    # 4 groups missing, 2 of 6 groups informative so far, 3 groups a question: 4 / (3 x 1/3) = 4
    assert fresh_questions(4, 3, informative=2, sampled=6, cap=8) == 4
    assert fresh_questions(5, 3, informative=2, sampled=6, cap=8) == 5
    assert fresh_questions(4, 3, informative=2, sampled=6, cap=2) == 2  # at most the cap (Q)
    assert fresh_questions(1, 3, informative=6, sampled=6, cap=8) == 1  # 1/3 rounds up to one question
    assert fresh_questions(3, 3, informative=0, sampled=6, cap=8) == 8  # nothing informative: the whole cap
    assert fresh_questions(0, 3, informative=0, sampled=6, cap=8) == 0


def _stat(slot, expert, rewards):
    return GroupStat(slot * 3 + expert, slot, f"q{slot}", expert, tuple(rewards))


def test_expert_refills_take_the_live_expert_with_the_most_spread():
    stats = [
        _stat(0, 0, [0, 0, 0, 0]),  # dead
        _stat(0, 1, [1, 0, 1, 0]),  # variance 0.25
        _stat(0, 2, [1, 1, 1, 0]),  # variance 0.1875
        _stat(1, 0, [0, 0]),  # slot 1: every group dead, nobody to refill it
        _stat(1, 1, [1, 1]),
        _stat(1, 2, [0, 0]),
        _stat(2, 0, [1, 0]),  # variance 0.25
        _stat(2, 1, [0, 1]),  # variance 0.25: the tie goes to the earlier expert
        _stat(2, 2, [1, 1]),  # dead
    ]
    assert expert_refills(stats, missing=10, used=set()) == [(0, 0, 1), (8, 2, 0)]
    assert expert_refills(stats, missing=1, used=set()) == [(0, 0, 1)]
    assert expert_refills(stats, missing=10, used={0}) == [(8, 2, 0)]  # a dead group is refilled once


def test_refill_draws_seed_apart_from_the_steps_own():
    q = question_batch([*map(lambda i: type("E", (), {"id": str(i)})(), range(4))], 0, 1, 2)[0].example
    own, again, refill = Draw(0, q), Draw(3, q, repeat=1), Draw(5, q, round=1, experts=(1,))
    assert own.seed_parts() == () and again.seed_parts() == (1,) and refill.seed_parts() == ("refill", 5)
    seeds = {prompt_seed(0, 1, q.id, 1, *d.seed_parts()) for d in (own, again, refill)}
    assert len(seeds) == 3


def test_dynamic_settings_are_checked():
    with pytest.raises(ConfigError, match="Did you mean 'experts'"):
        load_config(None, ["rollout.dynamic.refill=expert"])
    with pytest.raises(ConfigError, match="rollout.dynamic.refill=experts.*advantage_grouping"):
        load_config(
            None, ["rollout.dynamic.enabled=true", "rollout.dynamic.refill=experts", "algo.advantage_grouping=question"]
        )
    with pytest.raises(ConfigError, match="rollout.dynamic.max_rounds"):
        load_config(None, ["rollout.dynamic.max_rounds=-1"])


# ----------------------------------------------------------------------------- RL steps


@pytest.fixture
def make_session(tiny_model_dir, tmp_path):
    def make(**extra):
        settings = {"sft.enabled": "false", "algo.hsft.push_prob": 1.0, "algo.hsft.buffer_size": 100}
        cfg = load_config("meml", tiny_overrides(tiny_model_dir, tmp_path, **settings, **extra))
        s = open_session(cfg)
        s.engine = HalfRightEngine(s)  # expert 1 half right, experts 0 and 2 always wrong
        return s

    return make


def _spy_updates(monkeypatch):
    captured = []
    real_step = riel.optimizer_step
    monkeypatch.setattr(riel, "optimizer_step", lambda *a: captured.append(list(a[1])) or real_step(*a))
    return captured


def test_refill_with_fresh_questions(make_session, monkeypatch):
    """Q = 2 questions x 3 experts = 6 groups wanted; each question gives 1 informative group
    (expert 1's). Round 1: 4 missing at a rate of 2/6 -> 4 questions, capped at Q = 2; round 2:
    2 missing at 4/12 -> 2 questions; then 6 informative groups: done after 2 rounds."""
    s = make_session(**{"rollout.dynamic.enabled": "true"})
    captured = _spy_updates(monkeypatch)
    m = riel.rl_step(s, 1, make_learner(s, 1e-4, 2), None)
    assert m["dynamic/rounds"] == 2 and m["dynamic/extra_rollouts"] == 4 * 3 * 2
    assert m["dynamic/informative_groups"] == 6 and m["dynamic/dropped_groups"] == 12
    # the fresh questions are the next ones in the training order: steps 2 and 3's
    asked = [k[0] for k in s._prompt_cache]
    later = [d.example.id for step in (1, 2, 3) for d in question_batch(s.train_examples, s.cfg.seed, step, 2)]
    assert list(dict.fromkeys(asked)) == list(dict.fromkeys(later))
    assert m["iml/fired"] == 6 and m["hsft/pushed"] == 2 * 6  # dropped groups still feed IML and HSFT
    pg = [it for it in captured[0] if it.kind == "pg"]
    assert len(pg) == 6  # expert 1's right answer in each informative group
    # token mean over the informative groups only (expert 1's 12 answers), not all 36 answers
    right = sum(len(it.response_ids) for it in pg)
    assert sum(it.weight * len(it.response_ids) for it in pg) == pytest.approx(right / (right + 6 * _wrong_len(s)))
    assert m["tokens_per_s"] * m["step_time_s"] == pytest.approx(right + 30 * _wrong_len(s))  # refills counted


def _wrong_len(s):
    return len(s.tokenizer("The answer is -1.", add_special_tokens=False)["input_ids"]) + 1


def test_refill_with_other_experts(make_session, monkeypatch):
    """The 4 dead groups (experts 0 and 2 on both questions) are refilled under expert 1, the
    only live expert of their draws: 4 new groups of expert 1, one round, 6 informative."""
    s = make_session(**{"rollout.dynamic.enabled": "true", "rollout.dynamic.refill": "experts"})
    captured = _spy_updates(monkeypatch)
    seen = []
    real_generate = s.engine.generate
    s.engine.generate = lambda prompts, params, seeds=None: (
        seen.append((prompts, seeds)) or real_generate(prompts, params, seeds)
    )
    m = riel.rl_step(s, 1, make_learner(s, 1e-4, 2), None)
    assert m["dynamic/rounds"] == 1 and m["dynamic/extra_rollouts"] == 4 * 2
    assert m["dynamic/informative_groups"] == 6 and m["dynamic/dropped_groups"] == 4
    own = question_batch(s.train_examples, s.cfg.seed, 1, 2)
    (own_prompts, own_seeds), (refill_prompts, refill_seeds) = seen
    refills = [next(k for k, v in s._prompt_cache.items() if v == p) for p in refill_prompts]
    assert refills == [(own[0].example.id, 1)] * 2 + [(own[1].example.id, 1)] * 2  # dead groups in group order
    assert len(set(refill_seeds)) == 4 and not set(refill_seeds) & set(own_seeds)  # fresh seeds per refill group
    assert m["iml/fired"] == 2  # refill draws hold one expert: IML fires on the step's own draws
    assert m["hsft/pushed"] == 4
    assert len([it for it in captured[0] if it.kind == "pg"]) == 6


def test_without_dynamic_sampling_nothing_is_dropped_or_refilled(make_session, monkeypatch):
    s = make_session()
    captured = _spy_updates(monkeypatch)
    m = riel.rl_step(s, 1, make_learner(s, 1e-4, 2), None)
    assert not any(k.startswith("dynamic/") for k in m)
    pg = [it for it in captured[0] if it.kind == "pg"]
    right = sum(len(it.response_ids) for it in pg)
    # every group counts in the token mean: 2 right answers and 10 wrong ones
    assert sum(it.weight * len(it.response_ids) for it in pg) == pytest.approx(right / (right + 10 * _wrong_len(s)))


def test_one_expert_refills_with_questions(tiny_model_dir, tmp_path):
    """GRPO's one expert (expert 0 of the scripted engine) is always wrong: every group is
    dead, so each of the 3 rounds draws the cap, Q fresh questions, and nothing is trained.
    With pooled baselines (algo.advantage_grouping=question) a draw is one group."""
    settings = {"sft.enabled": "false", "rollout.dynamic.enabled": "true", "algo.advantage_grouping": "question"}
    cfg = load_config("grpo", tiny_overrides(tiny_model_dir, tmp_path, **settings, **{"experts.0.name": "x"}))
    s = open_session(cfg)
    s.engine = HalfRightEngine(s)
    m = riel.rl_step(s, 1, make_learner(s, 1e-4, 1), None)
    assert m["dynamic/rounds"] == 3 and m["dynamic/extra_rollouts"] == 3 * 2 * 2  # 3 rounds x Q = 2 x G = 2
    assert m["dynamic/informative_groups"] == 0 and m["dynamic/dropped_groups"] == 8
    assert m["trained_sequences"] == 0
