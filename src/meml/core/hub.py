"""Local path or Hugging Face hub id? And is the hub in reach at all?

`model.name_or_path` and `task.path` take either. A name that is meant as a local path but
does not exist (a typo) must say so at once, not be looked up on the hub; and a hub id on
a machine without network must fail in a second with a message, not after a minute of
retries inside `transformers` / `datasets`.

A hub id is "name" or "owner/name" made of letters, digits, '.', '_' and '-'. A name is
taken as a local path when it starts with '.', '/' or '~', has a file suffix (.gguf,
.jsonl, ...), cannot be a hub id (two or more '/', a backslash, a space, ...), or is
"dir/name" where `dir` exists here (runs/x, data/y).
"""

from __future__ import annotations

import os
import re
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
FILE_SUFFIXES = frozenset(
    {
        ".gguf",
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".json",
        ".jsonl",
        ".csv",
        ".tsv",
        ".parquet",
        ".arrow",
        ".yaml",
        ".yml",
        ".txt",
        ".gz",
        ".zip",
    }
)
_TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 3.0


def looks_like_local_path(name: str) -> bool:
    """Whether `name` reads as a local path (so it must never be looked up on the hub)."""
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        return True
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    head, sep, _ = name.partition("/")
    return bool(sep) and Path(head).is_dir()


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is set."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe_target() -> tuple[str, int, str]:
    """(host, port, what) a TCP connection is tried to: the HTTPS proxy if one is set."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(var)
        if proxy:
            url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if url.hostname:
                return url.hostname, url.port or 8080, f"the proxy {url.hostname} ({var})"
    url = urlparse(endpoint())
    return (
        url.hostname or "huggingface.co",
        url.port or (80 if url.scheme == "http" else 443),
        url.hostname or endpoint(),
    )


@lru_cache(maxsize=1)
def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (or the configured proxy) opens within
    `timeout_s`; else why not. Probed once per process. Name resolution runs on a daemon
    thread, since it has no timeout of its own."""
    host, port, what = _probe_target()
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{what}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=connect, name="meml-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return result[0] if result else f"{what}:{port}: no answer within {timeout_s:g} s"


def cached_file(repo_id: str, filename: str, revision: str | None = None, repo_type: str | None = None) -> str | None:
    """The local path of `filename` of a hub repo in the Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type)
    except Exception:  # an id the cache layout cannot hold: not cached
        return None
    return found if isinstance(found, str) else None


def unavailable(repo_id: str, field: str, cached: bool) -> str | None:
    """Why `repo_id` cannot be fetched from the hub now (None: go ahead).

    Offline mode or an unreachable hub is fine for a cached copy (load it with
    local_files_only); without one the message says what to do."""
    if cached:
        return None
    if offline():
        return (
            f"{field}='{repo_id}' is not a local path, and it is not in the Hugging Face cache while "
            "HF_HUB_OFFLINE is set: download it once with network access, or give a local path"
        )
    reason = unreachable_reason()
    if reason:
        return (
            f"{field}='{repo_id}' is not a local path or a cached copy, and the Hugging Face hub "
            f"({endpoint()}) cannot be reached ({reason}): check the network or give a local path"
        )
    return None


def local_only(cached: bool) -> bool:
    """Load a cached hub repo without asking the hub (offline, or the hub is out of reach)."""
    return cached and (offline() or unreachable_reason() is not None)
