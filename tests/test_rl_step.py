"""One RL step with scripted rollouts: IML pairs, HSFT pushes and metrics, end to end."""

import pytest

import meml.train.rl_step as riel
from meml.core.load import load_config
from meml.engines.base import Generation
from meml.train.loop import make_learner
from meml.train.session import open_session

from conftest import tiny_overrides


class ScriptedEngine:
    """Expert 1 always answers correctly (in 2 lengths), experts 0 and 2 always wrongly."""

    def __init__(self, s):
        self.s = s
        self.calls = []

    def generate(self, prompts, params, seeds=None):
        self.calls.append(params)
        out = []
        for prompt in prompts:
            qid, expert = next(k for k, v in self.s._prompt_cache.items() if v == prompt)
            gold = self.s.examples_by_id[qid].answer
            texts = (
                [f"So it is {gold}. The answer is {gold}.", f"The answer is {gold}."]
                if expert == 1
                else ["The answer is -1."] * 2
            )
            group = []
            for j in range(params.num_samples):
                ids = self.s.tokenizer(texts[j % 2], add_special_tokens=False)["input_ids"] + [
                    self.s.tokenizer.eos_token_id
                ]
                group.append(Generation(ids, texts[j % 2], True))
            out.append(group)
        return out

    def sync_weights(self, policy):
        pass


@pytest.fixture
def session(tiny_model_dir, tmp_path):
    cfg = load_config(
        "meml",
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{"sft.enabled": "false", "algo.hsft.push_prob": 1.0, "algo.hsft.buffer_size": 100},
        ),
    )
    s = open_session(cfg)
    s.engine = ScriptedEngine(s)
    return s


def test_rl_step_pairs_weak_and_strong_experts_and_pushes_hard_examples(session, monkeypatch):
    s = session
    captured = []
    real_step = riel.optimizer_step

    def spy(learner, items, settings):
        captured.append(list(items))
        return real_step(learner, items, settings)

    monkeypatch.setattr(riel, "optimizer_step", spy)
    metrics = riel.rl_step(s, 1, make_learner(s, 1e-4, 2), None)

    questions = [
        d.example for d in riel.question_batch(s.train_examples, s.cfg.seed, 1, s.cfg.train.questions_per_step)
    ]
    assert metrics["iml/fired"] == len(questions) == metrics["rescued"]
    assert metrics["iml/strong/algebraist"] == len(questions) and metrics["iml/weak/tutor"] == len(questions)
    assert metrics["correct/algebraist"] == 1.0 and metrics["correct/tutor"] == 0.0
    assert metrics["zero_signal_frac"] == 1.0  # every (question, expert) group is all-right or all-wrong
    iml = [it for it in captured[0] if it.kind == "iml"]
    assert len(iml) == len(questions)
    for it, q in zip(sorted(iml, key=lambda i: i.prompt_ids), sorted(questions, key=lambda q: s.prompt(q, 0))):
        assert it.prompt_ids == s.prompt(q, 0)  # trained under the weak expert's prompt
        text = s.tokenizer.decode(it.response_ids, skip_special_tokens=True)
        assert text == f"The answer is {q.answer}."  # the strong expert's shortest correct answer
    # experts 0 and 2 got every answer wrong (> K = 1 of G = 2): their gold solutions were pushed
    assert metrics["hsft/pushed"] == 2 * len(questions) == len(s.buffer)
    pushed = {(h.question_id, h.expert) for h in s.buffer.items}
    assert pushed == {(q.id, e) for q in questions for e in (0, 2)}
    assert all(it.kind != "pg" for it in captured[0])  # zero advantage everywhere: no PG sequence is forwarded


def test_buffer_flush_adds_an_sft_term_and_empties_it(session, monkeypatch):
    s = session
    s.buffer.capacity = 3
    captured = []
    real_step = riel.optimizer_step
    monkeypatch.setattr(riel, "optimizer_step", lambda *a: captured.append(list(a[1])) or real_step(*a))
    metrics = riel.rl_step(s, 1, make_learner(s, 1e-4, 2), None)
    sft = [it for it in captured[0] if it.kind == "hsft"]
    assert len(sft) == 4 and len(s.buffer) == 0 and metrics["hsft/flushes"] == 1
    assert metrics["hsft/loss"] > 0


@pytest.mark.e2e
def test_a_question_drawn_twice_in_a_step_is_two_draws(tiny_model_dir, tmp_path, monkeypatch):
    """3 training questions, 4 a step: the 4th draw repeats a question (an epoch boundary).
    Each draw has its own groups, sampling seeds, IML pair and HSFT pushes."""
    cfg = load_config(
        "meml",
        tiny_overrides(
            tiny_model_dir,
            tmp_path,
            **{
                "sft.enabled": "false",
                "algo.hsft.push_prob": 1.0,
                "algo.hsft.buffer_size": 100,
                "train.questions_per_step": 4,
                "task.options": "{train_size: 3, test_size: 4, difficulty: 1}",
            },
        ),
    )
    s = open_session(cfg)
    s.engine = ScriptedEngine(s)
    draws = riel.question_batch(s.train_examples, cfg.seed, 1, 4)
    assert [d.slot for d in draws] == [0, 1, 2, 3] and sorted(d.repeat for d in draws) == [0, 0, 0, 1]
    twice = next(d for d in draws if d.repeat == 1).example.id
    assert sum(d.example.id == twice for d in draws) == 2

    seen = {}
    real_generate = s.engine.generate

    def spy(prompts, params, seeds=None):
        seen["seeds"] = seeds
        return real_generate(prompts, params, seeds)

    s.engine.generate = spy
    episodes = riel.roll_out(s.engine, s.prompt, draws, len(s.experts), cfg.rollout, cfg.seed, 1)
    same = [e for e in episodes if e.question_id == twice]
    assert {e.slot for e in same} == {d.slot for d in draws if d.example.id == twice}
    assert len({e.group_id for e in same}) == 2 * len(s.experts)  # (2 draws) x (3 experts) groups, not 3
    seeds = seen["seeds"]
    assert len(set(seeds)) == len(seeds)  # the repeated draw samples with seeds of its own

    metrics = riel.rl_step(s, 1, make_learner(s, 1e-4, 1), None)
    assert metrics["iml/fired"] == 4  # one pair per draw
    assert metrics["hsft/pushed"] == 2 * 4  # experts 0 and 2 failed every draw
