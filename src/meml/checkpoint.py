"""Atomic checkpoints that resume exactly.

A checkpoint is a directory `checkpoints/<stage>-<step:06d>/` holding
  model/              the policy in Hugging Face format (a PEFT adapter under LoRA) + tokenizer
  trainer_state.pt    optimizer, scheduler, every RNG state, counters, the HSFT buffer
  config.yaml         the resolved config
  manifest.json       written last: stage, step, and size + sha256 of every file
It is written into a hidden temporary directory, flushed to disk, and renamed into place,
so a run killed mid-write leaves either the previous checkpoint or a stray temporary
directory, never a half checkpoint under a real name. On resume, a checkpoint whose
manifest is missing or whose files do not match it is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STAGE_ORDER = {"sft": 0, "rl": 1}
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:06d}"


def _sort_key(path: Path) -> tuple[int, int]:
    stage, _, step = path.name.partition("-")
    return STAGE_ORDER.get(stage, -1), int(step) if step.isdigit() else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, stage: str, step: int, model, tokenizer, state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write a checkpoint atomically and prune older ones; returns its path.

    On any failure (full disk, unwritable directory) the temporary directory is removed,
    earlier checkpoints are untouched, and a CheckpointError says what happened.
    """
    root = run_dir / "checkpoints"
    name = checkpoint_name(stage, step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"stage": stage, "step": step, "created": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}; earlier checkpoints are intact") from exc
    prune(root, keep_last)
    return final


def validate_checkpoint(path: Path, deep: bool = True) -> str | None:
    """None if the checkpoint is complete and matches its manifest, else the reason."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for rel, meta in files.items():
        f = path / rel
        if not f.exists():
            return f"missing file {rel}"
        if f.stat().st_size != meta["size"]:
            return f"file {rel} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if deep and _sha256(f) != meta["sha256"]:
            return f"file {rel} does not match its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_sort_key)


def find_latest(run_dir: Path) -> Path | None:
    """The newest valid checkpoint; invalid ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = validate_checkpoint(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


def prune(root: Path, keep_last: int) -> None:
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_sort_key)
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp-*"):  # left by a killed writer
        if not stray.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stray, ignore_errors=True)


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=False)
