"""Rollout engines: the only module that knows how answers are generated.

`make_engine` returns an object with two methods:
  generate(prompts, params) -> for each prompt, `params.num_samples` Generations
  sync_weights(policy)      -> make the engine sample from the policy's current weights
The transformers engine keeps its own copy of the weights in the compute dtype (bf16 on
hardware that has it): generating from the fp32 master weights under autocast would re-cast
every weight at every token. After each update the copy is refreshed in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    num_samples: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


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


class HFEngine:
    """Batched `generate` from transformers with left padding."""

    def __init__(self, policy: torch.nn.Module, tokenizer, dtype: torch.dtype, batch_size: int):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(policy, tokenizer)
        if dtype == torch.float32:
            self.model = policy  # no copy needed: generate from the master weights
            self._owns_copy = False
        else:
            self.model = copy.deepcopy(policy).to(dtype)
            self.model.requires_grad_(False)
            self._owns_copy = True
        self._config_for_generation()

    def _config_for_generation(self) -> None:
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        base.config.use_cache = True

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> None:
        if not self._owns_copy:
            return
        source = dict(policy.named_parameters())
        for name, param in self.model.named_parameters():
            param.copy_(source[name].detach())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        per_call = max(1, self.batch_size // params.num_samples)
        out: list[list[Generation]] = []
        devices = [device] if device.type == "cuda" else []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(params.seed + start)  # per-call seed: same seed, same samples
                out.extend(self._generate_chunk(chunk, params, device))
        if was_training and not self._owns_copy:
            self.model.train()
        return out

    def _generate_chunk(self, chunk: list[list[int]], params: SamplingParams, device) -> list[list[Generation]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (prompts, width), left-padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        greedy = params.temperature == 0
        sampling = {} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        sequences = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=not greedy,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=1 if greedy else params.num_samples,
            pad_token_id=pad,
            eos_token_id=self.stop_ids,
            **sampling,
        )  # (prompts * num_samples, width + new), samples of one prompt adjacent
        if greedy:  # greedy samples are identical: generate once, repeat
            sequences = sequences.repeat_interleave(params.num_samples, dim=0)
        new_tokens = sequences[:, width:].tolist()
        result: list[list[Generation]] = []
        for i in range(len(chunk)):
            group = []
            for row in new_tokens[i * params.num_samples : (i + 1) * params.num_samples]:
                ids, finished = split_completion(row, self.stop_ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Generation(ids, text, finished))
            result.append(group)
        return result


def make_engine(backend: str, policy: torch.nn.Module, tokenizer, dtype: torch.dtype, batch_size: int):
    if backend == "hf":
        return HFEngine(policy, tokenizer, dtype, batch_size)
    if backend == "vllm":
        from meml.rollout_vllm import VLLMEngine  # optional extra

        return VLLMEngine(policy, tokenizer, dtype, batch_size)
    raise ValueError(f"rollout.backend='{backend}': choose hf or vllm")
