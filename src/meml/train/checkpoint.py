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

trainer_state.pt is read with `torch.load(weights_only=True)`: tensors and plain Python
values only, never pickled objects, because a pickle can run any code when it is loaded and
a run directory may come from someone else. The manifest's checksums only tell that the
files are the ones its writer listed, not who the writer was. The one non-plain value meml
keeps (numpy's RNG state, which holds an array) is stored as a byte tensor and put back on
loading; `save_trainer_state` / `load_trainer_state` do both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import yaml

from meml.core.errors import ConfigError

log = logging.getLogger(__name__)

STAGE_ORDER = {"sft": 0, "rl": 1}
MANIFEST = "manifest.json"
NAME = re.compile(r"^(sft|rl)-(\d{6})$")
STATE = "trainer_state.pt"
REQUIRED = (STATE, "config.yaml")  # plus at least one file under model/
NDARRAY = "__meml_ndarray__"  # marks a numpy array stored as raw bytes in trainer_state.pt


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (or the output directory cannot hold one)."""


class UnsafeCheckpointError(ConfigError):
    """A trainer_state.pt that would need pickle (and so could run code) to load: refused."""


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


def save_checkpoint(
    run_dir: Path,
    stage: str,
    step: int,
    model,
    tokenizer,
    state: dict,
    config_yaml: str,
    keep_last: int,
    model_state: dict | None = None,
) -> Path:
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
        model.save_pretrained(
            tmp / "model", safe_serialization=True, state_dict=model_state
        )  # model_state: gathered weights under FSDP/ZeRO-3
        tokenizer.save_pretrained(tmp / "model")
        save_trainer_state(state, tmp / STATE)
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
    missing = [f for f in REQUIRED if f not in files] + (
        [] if any(f.startswith("model/") for f in files) else ["model/"]
    )
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
        log.warning(
            "only %.1f MiB free under %s; %d checkpoints of about %.1f MiB need %.1f MiB",
            free / 2**20,
            run_dir,
            keep_last + 1,
            checkpoint_bytes / 2**20,
            needed / 2**20,
        )


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


def _plain(obj, where: str = "state"):
    """`obj` with numpy arrays turned into tagged byte tensors and numpy scalars into Python
    numbers, so that torch.load(weights_only=True) can read it back."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: a numpy array of Python objects cannot be stored without pickle")
        data = np.frombuffer(np.ascontiguousarray(obj).tobytes(), dtype=np.uint8).copy()
        return {NDARRAY: torch.from_numpy(data), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        items = ((k, _plain(v, f"{where}.{k}")) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def _unplain(obj):
    """The inverse of `_plain`."""
    if isinstance(obj, dict):
        if NDARRAY in obj:
            raw = obj[NDARRAY].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        items = ((k, _unplain(v)) for k, v in obj.items())
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_unplain(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_unplain(v) for v in obj)
    return obj


def save_trainer_state(state: dict, file: Path) -> None:
    """Write `state` so that it loads without pickle; raises TypeError when something in it
    could not (found at the first save rather than at the resume that needs it)."""
    torch.save(_plain(state), file)
    unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    needs = unsafe(file) if unsafe else []
    if needs:
        raise TypeError(f"the trainer state holds objects that only pickle can restore: {', '.join(needs)}")


def _legacy_numpy_globals() -> list:
    """What a trainer_state.pt of an earlier meml needs besides plain values: the numpy RNG
    state's uint32 array. Building an array runs no code of the file's choosing."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


def load_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint `path`, read without pickle (tensors and plain values).

    A file that asks for anything else is refused with UnsafeCheckpointError, which names
    the file; nothing in it is run.
    """
    file = path / STATE
    try:
        state = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        try:
            if allow is None:
                raise exc
            with allow(_legacy_numpy_globals()):
                state = torch.load(file, weights_only=True)
            log.info("%s was written by an earlier meml (numpy RNG state as an array); loaded it without pickle", file)
        except pickle.UnpicklingError as again:
            wanted = re.search(r"GLOBAL (\S+)", str(again)) or re.search(r"GLOBAL (\S+)", str(exc))
            what = f"it asks for {wanted.group(1)[:200]!r}" if wanted else "it holds more than tensors and plain values"
            raise UnsafeCheckpointError(
                f"refusing to load {file}: {what}, which only an unrestricted pickle load could build, and such a load "
                "can run code from the file. meml writes trainer states of tensors and plain values only; resume only "
                "checkpoints whose origin you trust, or start a fresh run"
            ) from None
    return _unplain(state)
