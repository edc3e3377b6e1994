"""An output_dir that holds an earlier run: a fresh `meml train` refuses it (before the model
loads, touching nothing) unless told to continue it (--resume) or replace it (--overwrite);
`meml eval` writes into its own output_dir and is not held up by any of this.
(A run killed before its first checkpoint and started again with --resume is in
test_resume.py.)"""

import json
import logging
import re

import pytest

from meml.cli import main
from meml.train import checkpoint as ckpt

from conftest import tiny_overrides

pytestmark = pytest.mark.e2e  # runs of the trainer end to end

RUN = {"sft.enabled": "false", "checkpoint.every_steps": 1, "log.samples_every": 1}


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was caught")

    monkeypatch.setattr("meml.engines.model.load_policy", refuse)
    monkeypatch.setattr("meml.engines.model.load_tokenizer", refuse)


LEFTOVERS = {
    # a run killed before its first checkpoint (check_writable had made checkpoints/)
    "killed early": {
        "config.yaml": "seed: 0\n",
        "command.txt": "meml train\n",
        "metrics.jsonl": '{"stage": "eval", "tag": "before"}\n',
        "eval/before.jsonl": "{}\n",
        "checkpoints/.probe-1": "",
    },
    "results only": {"results.json": "{}"},
    "samples only": {"samples.jsonl": "{}\n"},
    "meml eval output": {
        "records.jsonl": "{}\n",
        "summary.json": "{}",
        "eval_settings.json": "{}",
        "config.yaml": "seed: 0\n",
    },
    "a stray checkpoint write": {"checkpoints/.tmp-rl-000001-123/trainer_state.pt": "x"},
}


@pytest.mark.parametrize("case", LEFTOVERS)
def test_a_fresh_run_refuses_an_output_dir_holding_an_earlier_run(
    case, tiny_model_dir, tmp_path, no_model_load, capsys
):
    out = tmp_path / "run"
    for name, text in LEFTOVERS[case].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = sorted((p.relative_to(out), p.read_text() if p.is_file() else None) for p in out.rglob("*"))
    assert main(["train", *tiny_overrides(tiny_model_dir, out, **RUN)]) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"config error: output_dir {out} already holds files of an earlier run \(.+\); continue that run with "
        r"--resume \(checkpoint.resume=auto\), replace it with --overwrite, or choose a new output_dir",
        err,
    ), err
    shown = [n for n in LEFTOVERS[case] if not n.startswith("checkpoints/.probe")]
    assert all(n.split("/")[0] in err for n in shown)
    assert (
        sorted((p.relative_to(out), p.read_text() if p.is_file() else None) for p in out.rglob("*")) == before
    )  # untouched


def test_resume_refuses_the_output_of_meml_eval(tiny_model_dir, tmp_path, no_model_load, capsys):
    for name in ("records.jsonl", "summary.json", "eval_settings.json"):
        (tmp_path / name).write_text("{}\n")
    assert main(["train", "--resume", *tiny_overrides(tiny_model_dir, tmp_path, **RUN)]) == 2
    assert (
        "holds the output of `meml eval` (records.jsonl, summary.json, eval_settings.json), not a run to resume"
        in capsys.readouterr().err
    )
    assert (tmp_path / "records.jsonl").read_text() == "{}\n"


def test_resume_and_overwrite_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--resume", "--overwrite", "output_dir=x"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_run_and_meml_eval_has_its_own_output_dir(
    tiny_model_dir, tmp_path, caplog, capsys
):
    run, evals = tmp_path / "run", tmp_path / "evals"
    assert main(["train", *tiny_overrides(tiny_model_dir, run, **RUN, **{"eval.after": "true"})]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["rl-000001", "rl-000002"]
    (run / "notes.txt").write_text("mine")  # not a run's file: stays
    (run / "checkpoints" / "keep").mkdir()  # not a checkpoint: stays

    # meml eval of the run, into a directory of its own, twice (the second finds its records)
    for _ in range(2):
        assert main(["eval", str(run), f"output_dir={evals}", "log.progress=false"]) == 0
    assert (evals / "summary.json").exists() and (evals / "records.jsonl").exists()
    assert main(["eval", str(run), "log.progress=false"]) == 0  # default: <run>/eval/<checkpoint>
    assert (run / "eval" / "rl-000002" / "summary.json").exists()
    capsys.readouterr()

    # a run into the eval's directory is refused, and so is one resumed from a checkpoint of another run there
    assert main(["train", *tiny_overrides(tiny_model_dir, evals, **RUN)]) == 2
    assert "already holds files of an earlier run" in capsys.readouterr().err
    other = [f"checkpoint.resume={run / 'checkpoints' / 'rl-000001'}"]
    assert main(["train", *tiny_overrides(tiny_model_dir, evals, **RUN), *other]) == 2
    assert f"output_dir {evals} already holds files of another run" in capsys.readouterr().err

    with caplog.at_level(logging.WARNING):
        assert main(["train", "--overwrite", *tiny_overrides(tiny_model_dir, run, **RUN, **{"train.steps": 1})]) == 0
    assert re.search(
        r"--overwrite: removing config.yaml, command.txt, metrics.jsonl, samples.jsonl, results.json, eval, "
        r"checkpoints/rl-000001, checkpoints/rl-000002 from ",
        caplog.text,
    )
    assert [(r["stage"], r["step"]) for r in _records(run)] == [
        ("rl", 1)
    ]  # nothing of the earlier run's 2 steps + eval
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["rl-000001"]
    assert len((run / "command.txt").read_text().splitlines()) == 1
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and {r["step"] for r in samples} == {1}
    assert (
        not (run / "eval").exists() and json.loads((run / "results.json").read_text()) == {}
    )  # no "after" eval this time
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "keep").is_dir()
