"""Checkpoints: atomic writes, validation of what is on disk, pruning, and write failures
(full disk, unwritable directory) that leave the previous checkpoint intact."""

import errno
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from meml.core.errors import ConfigError
from meml.core.load import load_config
from meml.train import checkpoint as ckpt
from meml.train.loop import find_resume_checkpoint, train

from conftest import tiny_overrides


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _save(run_dir, model_and_tokenizer, stage="rl", step=1, keep_last=5, state=None, config_yaml="seed: 0\n"):
    model, tok = model_and_tokenizer
    return ckpt.save_checkpoint(run_dir, stage, step, model, tok, state or {"step": step}, config_yaml, keep_last)


def test_checkpoint_is_complete_and_listed_in_order(tmp_path, model_and_tokenizer):
    for stage, step in [("rl", 2), ("sft", 10), ("rl", 10), ("rl", 1)]:
        _save(tmp_path, model_and_tokenizer, stage, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["sft-000010", "rl-000001", "rl-000002", "rl-000010"]  # stage 1 before stage 2, then by step
    path = tmp_path / "checkpoints" / "rl-000010"
    manifest = ckpt.read_manifest(path)
    assert (manifest["stage"], manifest["step"]) == ("rl", 10)
    assert {"trainer_state.pt", "config.yaml", "model/model.safetensors", "model/config.json"} <= set(manifest["files"])
    assert ckpt.validate_checkpoint(path) is None
    assert ckpt.load_trainer_state(path) == {"step": 10}
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary directory left


def _truncate(path):
    f = path / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _flip_byte(path):
    f = path / "trainer_state.pt"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "no manifest (the write did not finish)": lambda p: (p / "manifest.json").unlink(),
    "unreadable manifest (JSONDecodeError": lambda p: (p / "manifest.json").write_text('{"stage": "rl", "fi'),
    "unreadable manifest (KeyError": lambda p: (p / "manifest.json").write_text('{"stage": "rl"}'),
    "file model/model.safetensors has 100 bytes, manifest says": _truncate,
    "file trainer_state.pt does not match its checksum": _flip_byte,
    "missing file config.yaml": lambda p: (p / "config.yaml").unlink(),
    "manifest says rl-000001, the directory is rl-000002": lambda p: (p / "manifest.json").write_text(
        (p.parent / "rl-000001" / "manifest.json").read_text()
    ),
}


@pytest.mark.parametrize("reason", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_skipped_with_its_reason(reason, tmp_path, model_and_tokenizer, caplog):
    _save(tmp_path, model_and_tokenizer, step=1)
    newest = _save(tmp_path, model_and_tokenizer, step=2)
    CORRUPTIONS[reason](newest)
    assert reason in ckpt.validate_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_latest(tmp_path).name == "rl-000001"
    assert f"skipping checkpoint {newest}: {reason}" in caplog.text


def test_keep_last_prunes_across_stages_and_touches_nothing_else(tmp_path, model_and_tokenizer):
    root = tmp_path / "checkpoints"
    (root / "best-by-hand").mkdir(parents=True)  # not named like a checkpoint: never pruned
    (root / ".tmp-rl-000009-1").mkdir()  # a stray of a writer killed earlier (another pid)
    for step in (1, 2, 3):
        _save(tmp_path, model_and_tokenizer, "sft", step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["sft-000002", "sft-000003"]
    _save(tmp_path, model_and_tokenizer, "rl", 1, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["sft-000003", "rl-000001"]
    _save(tmp_path, model_and_tokenizer, "rl", 2, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["best-by-hand", "rl-000002"]


def test_strays_are_cleaned_and_an_interrupted_resave_is_put_back(tmp_path, model_and_tokenizer, caplog):
    path = _save(tmp_path, model_and_tokenizer, step=3)
    root = path.parent
    (root / ".tmp-rl-000004-99999").mkdir()
    os.rename(path, root / ".old-rl-000003-99999")  # killed between the two renames of a re-save
    assert ckpt.find_latest(tmp_path) is None
    with caplog.at_level(logging.WARNING):
        ckpt.clean_strays(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["rl-000003"]
    assert ckpt.find_latest(tmp_path) == path
    assert "removing" in caplog.text and ".tmp-rl-000004-99999" in caplog.text


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_save_to_dev_full(obj, f, *args, **kwargs):
    return REAL_TORCH_SAVE(obj, "/dev/full")  # a real ENOSPC inside torch's writer: it raises RuntimeError


REAL_TORCH_SAVE = torch.save


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (_enospc, "No space left on device"),
        (
            _torch_save_to_dev_full,
            "RuntimeError|incomplete: manifest lists no trainer_state.pt",
        ),  # raises, or fails silently
    ],
)
def test_a_full_disk_raises_a_clear_error_and_keeps_the_previous_checkpoint(
    fault, reason, tmp_path, model_and_tokenizer, monkeypatch
):
    if fault is _torch_save_to_dev_full and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    previous = _save(tmp_path, model_and_tokenizer, step=1, keep_last=1)
    monkeypatch.setattr(ckpt.torch, "save", fault)
    with pytest.raises(ckpt.CheckpointError) as info:
        _save(tmp_path, model_and_tokenizer, step=2, keep_last=1, state={"moments": torch.zeros(10_000)})
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "rl-000002") in message and re.search(reason, message)
    assert "free on that filesystem" in message and "earlier checkpoints are intact" in message
    assert ckpt.validate_checkpoint(previous) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["rl-000001"]  # no temporary directory left


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, where a checkpoint of the tiny model fits once (root with mount rights only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
    ):
        pytest.skip("cannot mount a tmpfs here; the monkeypatched full-disk tests cover the code path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_tmpfs, model_and_tokenizer):
    """Real ENOSPC: safetensors and torch.save raise their own types, not OSError."""
    previous = _save(small_tmpfs, model_and_tokenizer, step=1, keep_last=1)
    with pytest.raises(
        ckpt.CheckpointError, match="could not write checkpoint .*rl-000002.*MiB free on that filesystem"
    ):
        _save(small_tmpfs, model_and_tokenizer, step=2, keep_last=1, state={"filler": torch.zeros(200_000)})
    assert ckpt.validate_checkpoint(previous) is None
    assert [p.name for p in (small_tmpfs / "checkpoints").iterdir()] == ["rl-000001"]


def test_an_unwritable_output_dir_is_a_clear_error(tmp_path):
    """Tests run as root, where chmod does not stop writes: a path under a regular file does."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ckpt.CheckpointError, match=rf"output_dir {blocker / 'run'} is not writable \(Not a directory"):
        ckpt.check_writable(blocker / "run")


def test_resume_choice(tmp_path, model_and_tokenizer, tiny_model_dir, caplog):
    def cfg(**extra):
        return load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra))

    assert find_resume_checkpoint(cfg(**{"checkpoint.resume": "auto"}), tmp_path) is None  # nothing yet: a fresh start
    first = _save(tmp_path, model_and_tokenizer, step=1, config_yaml="seed: 1\n")
    second = _save(tmp_path, model_and_tokenizer, step=2)
    with pytest.raises(
        ConfigError, match="already holds checkpoints .newest rl-000002.; continue that run with --resume"
    ):
        find_resume_checkpoint(cfg(), tmp_path)  # a fresh run would prune them
    (second / "manifest.json").unlink()
    (tmp_path / "checkpoints" / ".tmp-rl-000003-99999").mkdir()
    with caplog.at_level(logging.INFO):
        assert find_resume_checkpoint(cfg(**{"checkpoint.resume": "auto"}), tmp_path) == first
    assert "skipping checkpoint" in caplog.text and f"resuming from {first}" in caplog.text
    assert "changed config" in caplog.text and "seed: 1 -> 0" in caplog.text
    assert not (tmp_path / "checkpoints" / ".tmp-rl-000003-99999").exists()
    assert find_resume_checkpoint(cfg(**{"checkpoint.resume": str(first)}), tmp_path) == first
    (first / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        find_resume_checkpoint(cfg(**{"checkpoint.resume": "auto"}), tmp_path)
    with pytest.raises(ConfigError, match="not a valid checkpoint .no manifest"):
        find_resume_checkpoint(cfg(**{"checkpoint.resume": str(first)}), tmp_path)
    with pytest.raises(ConfigError, match="needs output_dir"):
        find_resume_checkpoint(cfg(**{"checkpoint.resume": "auto", "output_dir": ""}), tmp_path)


def test_resume_skips_a_truncated_newest_checkpoint(tiny_model_dir, tmp_path, caplog):
    """End to end: the newest checkpoint is cut short; --resume takes the one before, redoes
    the step, and writes the step's checkpoint again in place."""
    extra = {"sft.enabled": "false", "train.steps": 3, "checkpoint.every_steps": 1, "checkpoint.keep_last": 3}
    train(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra)))
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()
    _truncate(tmp_path / "checkpoints" / "rl-000003")
    with caplog.at_level(logging.INFO):
        train(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra, **{"checkpoint.resume": "auto"})))
    assert "skipping checkpoint" in caplog.text and "model/model.safetensors has 100 bytes" in caplog.text
    assert "rl-000002 (rl step 2)" in caplog.text
    assert ckpt.validate_checkpoint(tmp_path / "checkpoints" / "rl-000003") is None
    again = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in again] == [1, 2, 3]
    assert json.loads(again[2])["loss"] == json.loads(first[2])["loss"]


def test_the_writability_check_leaves_only_the_directories(tmp_path):
    ckpt.check_writable(tmp_path / "run")
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("run"), Path("run/checkpoints")]
