"""What every rollout engine shares: sampling settings, the generation record, stop tokens,
per-prompt seeds, and the interface the trainer talks to (`Engine`).

Engines (engines/factory.py builds them by `rollout.backend`):
  generate(prompts, params, seeds=None) -> for each prompt, `params.num_samples` Generations
  sync_weights(policy)                  -> sample from the policy's current weights
  load_state_dict(state)                -> take full (gathered) weights, under FSDP/ZeRO-3
`seeds` gives each prompt its own sampling seed, so a prompt's samples do not depend on
which other prompts share its batch or its process (the trainer derives them from the run
seed, the step, the question and the expert). Without it, prompt i gets params.seed + i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


def prompt_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (not Python's salted hash)."""
    import hashlib

    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Generation:
    token_ids: list[int]  # completion tokens, up to and including the stop token if any
    text: str  # decoded completion without special tokens
    finished: bool  # stopped on a stop token (False: cut at max_new_tokens)
    logprobs: list[float] | None = None  # sampling log-probs, where the engine reports them


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def split_completion(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """Cut a generated row after its first stop token; pads after it are dropped."""
    for i, tok in enumerate(row):
        if tok in stop_ids:
            return row[: i + 1], True
    return row, False


class Engine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Generation]]: ...

    def sync_weights(self, policy: torch.nn.Module) -> None: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
