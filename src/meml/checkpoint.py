"""Atomic checkpoints that resume exactly.

A checkpoint is a directory `checkpoints/<stage>-<step:06d>/` (stage: sft | rl) holding
  model/              the policy in Hugging Face format (a PEFT adapter under LoRA) + tokenizer
  trainer_state.pt    optimizer, scheduler, every RNG state, counters, the HSFT buffer, the
                      data position (and the KL reference's trainable weights when there is one)
  config.yaml         the resolved config
  manifest.json       written last: stage, step, and size + sha256 of every file
It is written into a hidden temporary directory `.tmp-<name>-<pid>`, flushed to disk, and
renamed into place, so a run killed mid-write leaves either the previous checkpoint or a
stray temporary directory, never a half checkpoint under a real name. On resume, a
checkpoint whose manifest is missing or whose files do not match it is reported and
skipped, and stray temporary directories are removed. Only directories named like a
checkpoint are ever listed or pruned. docs/RELIABILITY.md has the whole story.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

log = logging.getLogger(__name__)

STAGE_ORDER = {"sft": 0, "rl": 1}
MANIFEST = "manifest.json"
NAME = re.compile(r"^(sft|rl)-(\d{6})$")
REQUIRED = ("trainer_state.pt", "config.yaml")  # plus at least one file under model/


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (or the output directory cannot hold one)."""


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}-{step:06d}"


def _sort_key(path: Path) -> tuple[int, int]:
    stage, step = NAME.match(path.name).groups()
    return STAGE_ORDER[stage], int(step)


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


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free on that filesystem"
    return "free space unknown"


def save_checkpoint(run_dir: Path, stage: str, step: int, model, tokenizer, state: dict, config_yaml: str, keep_last: int, model_state: dict | None = None) -> Path:
    """Write a checkpoint atomically and prune older ones; returns its path.

    On any failure (full disk, unwritable directory) the temporary directory is removed,
    earlier checkpoints are untouched, and a CheckpointError names the path and the reason.
    Writers raise different types for a full disk (OSError from open/write/fsync,
    SafetensorError from safetensors, RuntimeError from torch.save), so all are caught.
    """
    root = run_dir / "checkpoints"
    name = checkpoint_name(stage, step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)  # model_state: gathered weights under FSDP/ZeRO-3
        tokenizer.save_pretrained(tmp / "model")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"stage": stage, "step": step, "created": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(tmp)
        incomplete = validate_checkpoint(tmp, deep=False)  # a writer that failed without raising
        if incomplete:
            raise OSError(f"the written checkpoint is incomplete: {incomplete}")
        if final.exists():  # re-saving a step (a fresh run never reaches here: train() refuses a used directory)
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason} ({_free_space(root)}); earlier checkpoints are intact"
        ) from exc
    except BaseException:  # KeyboardInterrupt (a second signal): leave no temporary directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def validate_checkpoint(path: Path, deep: bool = True) -> str | None:
    """None if the checkpoint is complete and matches its manifest, else the reason."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files, stage, step = manifest["files"], manifest["stage"], manifest["step"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"unreadable manifest ({type(exc).__name__}: {exc})"
    if NAME.match(path.name) and path.name != checkpoint_name(stage, step):
        return f"manifest says {checkpoint_name(stage, step)}, the directory is {path.name}"
    missing = [f for f in REQUIRED if f not in files] + ([] if any(f.startswith("model/") for f in files) else ["model/"])
    if missing:
        return f"manifest lists no {', '.join(missing)}"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != meta["size"]:
            return f"file {rel} has {f.stat().st_size} bytes, manifest says {meta['size']} (truncated or overwritten)"
        if deep and _sha256(f) != meta["sha256"]:
            return f"file {rel} does not match its checksum"
    return None


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)), key=_sort_key)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, oldest first (stage 1 before stage 2, then by step); unvalidated."""
    return _checkpoint_dirs(run_dir / "checkpoints")


def find_latest(run_dir: Path) -> Path | None:
    """The newest valid checkpoint; invalid ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        reason = validate_checkpoint(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (across stages); remove strays of killed writers."""
    for old in _checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp-*"):
        if not stray.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stray, ignore_errors=True)


def clean_strays(run_dir: Path) -> None:
    """Before resuming: remove temporary directories of killed writers, and put back a
    checkpoint a kill caught between the two renames of a re-save."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for old in root.glob(".old-*"):
        name = old.name[len(".old-") :].rsplit("-", 1)[0]
        if NAME.match(name) and not (root / name).exists():
            try:
                os.rename(old, root / name)
                log.warning("restored %s from an interrupted re-save", root / name)
            except FileNotFoundError:  # another process of this run got there first
                pass
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp-*"):
        log.warning("removing %s, left by a run killed while writing a checkpoint", stray)
        shutil.rmtree(stray, ignore_errors=True)


def check_writable(run_dir: Path) -> None:
    """Fail early, before any model is loaded, when checkpoints could not be written."""
    probe = run_dir / "checkpoints" / f".probe-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"output_dir {run_dir} is not writable ({exc.strerror or exc} at {exc.filename or probe}); "
            "choose another output_dir or fix its permissions"
        ) from None


def warn_if_low_space(run_dir: Path, checkpoint_bytes: int, keep_last: int) -> None:
    """A warning at start when the disk cannot hold keep_last + 1 checkpoints (one is written
    before the oldest is pruned); the write itself still fails cleanly if it runs out."""
    needed = checkpoint_bytes * (keep_last + 1)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        log.warning("only %.1f MiB free under %s; %d checkpoints of about %.1f MiB need %.1f MiB",
                    free / 2**20, run_dir, keep_last + 1, checkpoint_bytes / 2**20, needed / 2**20)


def config_changes(path: Path, config: dict) -> list[str]:
    """'key: old -> new' for each setting that differs from the checkpoint's config.yaml."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    old, new = flat(yaml.safe_load((path / "config.yaml").read_text()) or {}), flat(config)
    keys = sorted((set(old) | set(new)) - {"checkpoint.resume"})
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=False)
