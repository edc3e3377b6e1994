"""`meml distill` with a local teacher (the policy itself, or another model), the
rejection-sampling rule and the resumable output file. CPU, the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meml.core.errors import DataError
from meml.core.load import load_config
from meml.core.types import Example, Expert
from meml.distill import run_distill
from meml.distill.output import TraceWriter, done_pairs
from meml.distill.teachers import Pair, keep_first_verified
from meml.engines.base import Generation
from meml.engines.hf import HFEngine

from conftest import tiny_overrides

ROW_KEYS = {"question_id", "expert", "response", "teacher", "verified", "attempt", "finish_reason"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cfg(tiny_model_dir: Path, tmp_path: Path, **extra):
    base = {
        "distill.max_examples": 3,
        "distill.experts": "[tutor, checker]",
        "distill.samples_per_question": 2,
        "distill.max_new_tokens": 6,
        "distill.output": str(tmp_path / "traces.jsonl"),
    }
    base.update(extra)
    return load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "run", **base))


def test_keep_first_verified_takes_the_first_that_verifies():
    pair = Pair(Example("q", "1 + 1?", "2"), 0, Expert("e", "sys"))
    verify = lambda text, ex, finished: finished and text.endswith(ex.answer)  # noqa: E731
    samples = [("3", True, {}), ("2", False, {}), ("2", True, {"n": 3}), ("also 2", True, {})]
    r = keep_first_verified(pair, samples, verify)
    assert (r.response, r.verified, r.attempts, r.extra) == ("2", True, 3, {"n": 3})
    r = keep_first_verified(pair, samples[:2], verify)
    assert (r.response, r.verified, r.attempts) == ("2", False, 2)  # the last sample, flagged


@pytest.mark.parametrize("teacher", ["self", "hf"])
@pytest.mark.e2e
def test_local_teacher_writes_one_row_per_pair_and_resumes(tiny_model_dir, tmp_path, teacher):
    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        **{"distill.teacher": teacher, "distill.model": str(tiny_model_dir) if teacher == "hf" else ""},
    )
    report = run_distill(cfg)
    rows = _rows(tmp_path / "traces.jsonl")
    assert len(rows) == 6 and all(set(r) == ROW_KEYS for r in rows)
    assert {r["expert"] for r in rows} == {"tutor", "checker"}
    assert all(r["teacher"] == f"{teacher}:{tiny_model_dir}" for r in rows)
    for name in ("tutor", "checker"):
        c = report[name]
        assert c["pairs"] == 3 and c["verified"] + c["unverified"] == 3 and c["failed"] == 0
    unverified = [r for r in rows if not r["verified"]]
    assert all(r["attempt"] == 2 for r in unverified)  # a random model verifies (almost) nothing

    again = run_distill(cfg)  # everything is in the file: nothing to do, no model is loaded
    assert all(c["pairs"] == 0 and c["skipped"] == 3 for c in again.values())
    assert len(_rows(tmp_path / "traces.jsonl")) == 6


@pytest.mark.e2e
def test_self_teacher_keeps_the_first_verified_sample(tiny_model_dir, tmp_path, monkeypatch):
    """An engine that answers wrong, right, right: the first right one is kept."""
    cfg = _cfg(tiny_model_dir, tmp_path, **{"distill.samples_per_question": 3})
    calls = []

    def fake_generate(self, prompts, params):
        calls.append((len(prompts), params.num_samples))
        out = []
        for ids in prompts:
            prompt = self.tokenizer.decode(ids)
            gold = next(ex.answer for ex in examples if ex.question in prompt)
            out.append(
                [
                    Generation([], "The answer is -1.", True),
                    Generation([], f"So the answer is {gold}.", True),
                    Generation([], f"The answer is {gold}.", True),
                ]
            )
        return out

    from meml.train.session import open_workload

    examples = open_workload(cfg).train_examples[:3]
    monkeypatch.setattr(HFEngine, "generate", fake_generate)
    report = run_distill(cfg)
    rows = _rows(tmp_path / "traces.jsonl")
    assert calls == [(6, 3)]  # all pairs in one batched call, 3 samples each
    assert len(rows) == 6 and all(r["verified"] and r["attempt"] == 2 and r["response"].startswith("So") for r in rows)
    assert report["tutor"] == {"pairs": 3, "verified": 3, "unverified": 0, "failed": 0, "attempts": 6, "skipped": 0}


def test_trace_writer_drops_a_partial_last_line_and_refuses_a_broken_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question_id": "a", "expert": "e", "response": "x"}\n{"question_id": "b", "ex')
    with TraceWriter(path) as writer:
        assert writer.done == {("a", "e")}
        writer.write({"question_id": "b", "expert": "e", "response": "y"})
    assert done_pairs(path) == {("a", "e"), ("b", "e")} and len(_rows(path)) == 2
    path.write_text('not json\n{"question_id": "a", "expert": "e", "response": "x"}\n')
    with pytest.raises(DataError, match="t.jsonl:1"):
        done_pairs(path)


@pytest.mark.e2e
def test_distill_is_a_subcommand_and_checks_its_config(tiny_model_dir, tmp_path, capsys):
    from meml.cli import build_parser, main

    assert build_parser().parse_args(["distill", "distill.teacher=openai"]).func.__module__ == "meml.cli.distill"
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    assert main(["distill", *overrides, "distill.teacher=openai"]) == 2
    assert "distill.model" in capsys.readouterr().err
    assert main(["distill", *overrides, "distill.experts=[nobody]"]) == 2
    assert "nobody" in capsys.readouterr().err
