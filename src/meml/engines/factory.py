"""The rollout engines by name (`rollout.backend`): one table, one factory."""

from __future__ import annotations

import torch

from meml.core.registry import Registry
from meml.engines.base import Engine


def _hf(policy, tokenizer, dtype, sequences_per_generate, share_weights, vllm, tokens_per_generate=0) -> Engine:
    from meml.engines.hf import HFEngine

    return HFEngine(policy, tokenizer, dtype, sequences_per_generate, share_weights, tokens_per_generate)


def _vllm(policy, tokenizer, dtype, sequences_per_generate, share_weights, vllm, tokens_per_generate=0) -> Engine:
    # vLLM schedules its own batches over a paged key/value cache: tokens_per_generate is not needed there
    from meml.engines.vllm import VLLMEngine, VLLMSettings  # the optional vllm extra

    return VLLMEngine(policy, tokenizer, dtype, sequences_per_generate, settings=VLLMSettings(**vllm) if vllm else None)


ENGINES = Registry("rollout.backend", {"hf": _hf, "vllm": _vllm})


def make_engine(
    backend: str,
    policy: torch.nn.Module,
    tokenizer,
    dtype: torch.dtype,
    sequences_per_generate: int,
    share_weights: bool = True,
    vllm: dict | None = None,
    tokens_per_generate: int = 0,
) -> Engine:
    """share_weights: an fp32 engine may generate from the policy's own weights (no copy).
    vllm: the rollout.vllm settings, for that backend. tokens_per_generate: rollout's."""
    return ENGINES.get(backend)(
        policy, tokenizer, dtype, sequences_per_generate, share_weights, vllm, tokens_per_generate
    )
