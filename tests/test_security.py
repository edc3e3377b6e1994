"""A run directory from somewhere else runs none of its code: a trainer_state.pt that is a
hostile pickle is refused on resume, and `meml eval RUN` does not take over the run's
model.trust_remote_code (so a Python file shipped in its checkpoint is never imported).
Each hostile file here would create a marker file if it ran; the tests check it did not."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from meml.cli import main
from meml.cli.eval import resolve
from meml.core.errors import ConfigError
from meml.core.load import load_config, to_yaml
from meml.train import checkpoint as ckpt
from meml.train.session import rng_state

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appears if the pickle is executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _reseal(path):
    """Recompute the manifest, as whoever hands out a tampered checkpoint would."""
    manifest = ckpt.read_manifest(path)
    manifest["files"] = {
        str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": ckpt._sha256(f)}
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != ckpt.MANIFEST
    }
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.validate_checkpoint(path) is None


def _hostile_checkpoint(run_dir, model_and_tokenizer, marker):
    model, tok = model_and_tokenizer
    path = ckpt.save_checkpoint(run_dir, "rl", 1, model, tok, {"step": 1}, "seed: 0\n", keep_last=2)
    torch.save({"optimizer": _CreatesAFile(marker), "step": 1}, path / "trainer_state.pt")
    _reseal(path)
    return path


def test_load_trainer_state_refuses_a_pickle_that_would_run_code(tmp_path, model_and_tokenizer):
    marker = tmp_path / "pwned"
    path = _hostile_checkpoint(tmp_path, model_and_tokenizer, marker)
    with pytest.raises(ConfigError) as err:  # a ConfigError: meml exits with code 2
        ckpt.load_trainer_state(path)
    message = str(err.value)
    assert str(path / "trainer_state.pt") in message and "refusing to load" in message and "io.open" in message
    assert not marker.exists()


@pytest.mark.e2e
def test_resume_refuses_a_hostile_trainer_state_with_exit_code_2(tmp_path, tiny_model_dir, model_and_tokenizer, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    path = _hostile_checkpoint(run, model_and_tokenizer, marker)
    rc = main(["train", "--resume", *tiny_overrides(tiny_model_dir, run, **{"sft.enabled": "false"})])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"refusing to load {path / 'trainer_state.pt'}" in err
    assert not marker.exists()


def test_the_trainer_state_round_trips_without_pickle(tmp_path, model_and_tokenizer):
    """What meml writes loads with plain weights_only=True (numpy's RNG state included) and
    comes back equal; a file written the earlier way (numpy array pickled) still loads."""
    random.seed(3)
    np.random.seed(3)
    np.random.random(5)  # a state part-way through the array, with a cached gaussian
    np.random.standard_normal()
    state = {
        "rng": rng_state(),
        "counters": {"bad_streak": np.int64(2)},
        "buffer": {"capacity": 2, "items": [{"ids": [1, 2]}]},
    }
    model, tok = model_and_tokenizer
    path = ckpt.save_checkpoint(tmp_path, "rl", 1, model, tok, state, "seed: 0\n", keep_last=2)

    torch.load(path / "trainer_state.pt", weights_only=True)  # no pickled object in it
    back = ckpt.load_trainer_state(path)
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["rng"]["numpy"][0] == "MT19937" and back["rng"]["numpy"][2:] == state["rng"]["numpy"][2:]
    assert back["rng"]["numpy"][1].dtype == np.uint32 and np.array_equal(
        back["rng"]["numpy"][1], state["rng"]["numpy"][1]
    )
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["counters"] == {"bad_streak": 2} and type(back["counters"]["bad_streak"]) is int
    assert back["buffer"] == state["buffer"]
    np.random.set_state(back["rng"]["numpy"])
    assert np.random.standard_normal() == _next_normal(state)  # the same stream continues

    torch.save({"rng": state["rng"]}, path / "trainer_state.pt")  # an earlier meml's file
    assert np.array_equal(ckpt.load_trainer_state(path)["rng"]["numpy"][1], state["rng"]["numpy"][1])


def _next_normal(state) -> float:
    rs = np.random.RandomState()
    rs.set_state(state["rng"]["numpy"])
    return rs.standard_normal()


# ----------------------------------------------------------------------------- meml eval RUN


def _run_with_remote_code(tmp_path, tiny_model_dir, model_and_tokenizer, marker, **extra):
    """A run directory whose config.yaml says trust_remote_code: true and whose checkpoint's
    config.json maps the model to a Python file in the checkpoint that creates `marker`."""
    run = tmp_path / "foreign-run"
    cfg = load_config(None, tiny_overrides(tiny_model_dir, run, **{"model.trust_remote_code": "true", **extra}))
    text = to_yaml(cfg)
    run.mkdir()
    (run / "config.yaml").write_text(text)
    model, tok = model_and_tokenizer
    path = ckpt.save_checkpoint(run, "rl", 1, model, tok, {"step": 1}, text, keep_last=2)
    config = json.loads((path / "model" / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "remote_code.RemoteConfig",
        "AutoModelForCausalLM": "remote_code.RemoteModel",
    }
    (path / "model" / "config.json").write_text(json.dumps(config))
    (path / "model" / "remote_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class RemoteConfig(LlamaConfig):\n    pass\n\n\n"
        "class RemoteModel(LlamaForCausalLM):\n    config_class = RemoteConfig\n"
    )
    _reseal(path)
    return run


@pytest.mark.e2e
def test_eval_of_a_run_does_not_run_code_from_its_checkpoint(
    tmp_path, tiny_model_dir, model_and_tokenizer, caplog, capsys
):
    marker = tmp_path / "remote-code-ran"
    run = _run_with_remote_code(tmp_path, tiny_model_dir, model_and_tokenizer, marker)
    with caplog.at_level(logging.WARNING, logger="meml"):
        rc = main(["eval", str(run)])
    assert not marker.exists()
    assert rc == 0  # the checkpoint's weights load with transformers' own Llama class
    assert json.loads((run / "eval" / "rl-000001" / "summary.json").read_text())["questions"] == 4
    assert "made with model.trust_remote_code=true; ignoring that setting" in caplog.text


@pytest.mark.e2e
def test_only_this_command_line_turns_trust_remote_code_on(tmp_path, tiny_model_dir, model_and_tokenizer):
    marker = tmp_path / "remote-code-ran"
    run = _run_with_remote_code(
        tmp_path,
        tiny_model_dir,
        model_and_tokenizer,
        marker,
        **{"reward.functions": "[reward_fns:length_parity]"},
    )
    cfg, _, source = resolve(str(run), [], None, None)
    assert cfg.model.trust_remote_code is False and source == str(run / "checkpoints" / "rl-000001" / "model")
    assert cfg.reward.functions == []  # not imported either: eval does not use them
    cfg, _, _ = resolve(str(run), ["model.trust_remote_code=true"], None, None)
    assert cfg.model.trust_remote_code is True
    assert not marker.exists()
