"""The transformers rollout engine (`rollout.backend=hf`): batched `generate`.

The engine keeps its own copy of the weights in the compute dtype (bf16 on
hardware that has it): generating from the fp32 master weights under autocast would re-cast
every weight at every token. After each update the copy is refreshed in place.

Two costs of transformers `generate` on CPU that this module avoids (bench/trl_compare.py,
docs/benchmarks.md): the prefill hands the LM head the last position as a strided slice,
(rows, 1, hidden), which torch.matmul cannot fold into one matrix product, so it copies the
head's weight once per row and runs a batched product (a 192-row eval batch of SmolLM2
copied 11 GB, in 12 s); and sampling each row with `torch.multinomial` draws one exponential
variate per vocabulary entry (half a millisecond per row and token at a 49k vocabulary).

Memory: the rollout copy is built parameter by parameter in the compute dtype, never as a
whole fp32 copy first (that transient was the size of the master weights). A generate call
holds a key/value cache of rows x (longest prompt + max_new_tokens) positions; calls take at
most `sequences_per_generate` rows and, with `tokens_per_generate`, at most that many
rows x positions, so a long completion length or many samples split into more calls instead
of a larger cache. A call's rows are consecutive prompts in order, as before, so the default
batches (and every greedy and seeded output) do not change; per-row seeds make sampled
outputs independent of the batching in any case.
"""

from __future__ import annotations

import copy

import torch

from meml.engines.base import (
    Generation,
    SamplingParams,
    prompt_seed,
    split_completion,
    stop_token_ids,
)


class RowSeededSampler:
    """A logits processor that samples each row with its own generator.

    `generate` runs greedy decoding over the scores this returns (0 for the sampled token,
    -inf elsewhere), so each row's tokens depend only on its own seed and its own logits:
    the same prompt and seed give the same samples whatever the batch holds.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # (rows, vocab)
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= self.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        picked = inverse_cdf_sample(torch.softmax(logits, -1), self.generators)  # (rows,)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), picked] = 0.0
        return out


def inverse_cdf_sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: the first index whose cumulative probability exceeds the row's own
    uniform draw. probs (rows, vocab) -> (rows,).

    The same distribution as torch.multinomial, for one uniform per row instead of one
    exponential per vocabulary entry; the cumulative sum is taken in fp64 so that tokens of
    tiny probability keep their share. A token of probability 0 (cut by top_p) is never
    picked: its cumulative value equals its predecessor's.
    """
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=g.device) for g in generators])  # (rows,)
    cdf = probs.double().cumsum(-1)  # (rows, vocab)
    u = u.to(cdf.device) * cdf[:, -1]  # scale to the row's total, which rounding keeps near but not at 1
    return torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def copy_in_dtype(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`copy.deepcopy(policy).to(dtype)` without its fp32 intermediate: every floating
    parameter and buffer is cast on its own while the module tree is copied (tied weights
    stay tied: one tensor, one copy). The copy holds no gradients."""
    memo: dict[int, object] = {}
    for tensor in [*policy.parameters(), *policy.buffers()]:
        if id(tensor) in memo:
            continue
        data = tensor.detach()
        data = data.to(dtype, copy=True) if data.is_floating_point() else data.clone()
        memo[id(tensor)] = (
            torch.nn.Parameter(data, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else data
        )
    return copy.deepcopy(policy, memo)


def plan_calls(
    widths: list[int], rows_per_prompt: int, prompts_per_call: int, new_tokens: int, token_budget: int
) -> list[slice]:
    """Consecutive runs of prompts, one generate call each: at most prompts_per_call prompts
    and, with token_budget > 0, rows x (longest prompt + new_tokens) <= token_budget (a prompt
    that alone exceeds it still gets its own call). widths: each prompt's length."""
    calls, start = [], 0
    while start < len(widths):
        end, longest = start, 0
        while end < len(widths) and end - start < prompts_per_call:
            longest_next = max(longest, widths[end])
            rows = (end - start + 1) * rows_per_prompt
            if token_budget and end > start and rows * (longest_next + new_tokens) > token_budget:
                break
            longest, end = longest_next, end + 1
        calls.append(slice(start, end))
        start = end
    return calls


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook: hand the module a contiguous input, which torch.matmul folds into
    one matrix product instead of copying the weight once per batch row. Decode steps pass a
    contiguous input already (no copy). When the engine shares the fp32 policy, the trainer's
    passes get the hook too: a copy of the response positions' hidden states, small next to
    the weight copies it saves."""
    return (args[0].contiguous(), *args[1:]) if args else None


class HFEngine:
    """Batched `generate` from transformers with left padding.

    sequences_per_generate: rows of one generate call at most (a prompt's samples are rows);
    tokens_per_generate: if > 0, rows x (longest prompt + max_new_tokens) of one call at most,
    which bounds its key/value cache (0: the row count alone decides)."""

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        dtype: torch.dtype,
        sequences_per_generate: int,
        share_weights: bool = True,
        tokens_per_generate: int = 0,
    ):
        self.tokenizer = tokenizer
        self.sequences_per_generate = sequences_per_generate
        self.tokens_per_generate = tokens_per_generate
        self.stop_ids = stop_token_ids(policy, tokenizer)
        if dtype == torch.float32 and share_weights:
            self.model = policy  # no copy needed: generate from the master weights
            self._owns_copy = False
        else:
            self.model = copy_in_dtype(policy, dtype)
            self._owns_copy = True
        self._config_for_generation()
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None and not getattr(
            head, "_meml_contiguous_input", False
        ):  # the prefill's strided last position: see the module docstring
            head.register_forward_pre_hook(_contiguous_input)
            head._meml_contiguous_input = True  # once per module, however many engines share it

    def _config_for_generation(self) -> None:
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        base.config.use_cache = True

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> None:
        if not self._owns_copy:
            return
        # Only trainable weights change (under LoRA: the adapters); frozen ones stay as copied.
        source = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        for name, param in self.model.named_parameters():
            if name in source:
                param.copy_(source[name].detach())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy full (gathered) weights in, e.g. from accelerate's get_state_dict under FSDP."""
        for name, param in self.model.named_parameters():
            if name in state:
                param.copy_(state[name])

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[list[Generation]]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        seeds = seeds if seeds is not None else [params.seed + i for i in range(len(prompts))]
        per_call = max(1, self.sequences_per_generate // params.num_samples)
        rows_per_prompt = 1 if params.temperature == 0 else params.num_samples  # greedy: generated once
        calls = plan_calls(
            [len(p) for p in prompts], rows_per_prompt, per_call, params.max_new_tokens, self.tokens_per_generate
        )
        out: list[list[Generation]] = []
        for chunk in calls:
            out.extend(self._generate_chunk(prompts[chunk], seeds[chunk], params, device))
        if was_training and not self._owns_copy:
            self.model.train()
        return out

    def _generate_chunk(
        self, chunk: list[list[int]], seeds: list[int], params: SamplingParams, device
    ) -> list[list[Generation]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (prompts, width), left-padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        greedy = params.temperature == 0
        samples = 1 if greedy else params.num_samples  # greedy samples are identical: generate once, repeat
        processors = []
        if not greedy:
            row_seeds = [
                prompt_seed(seed, j) for seed in seeds for j in range(samples)
            ]  # rows: samples of a prompt adjacent
            processors = [RowSeededSampler(row_seeds, params.temperature, params.top_p, device)]
        from transformers import GenerationConfig, LogitsProcessorList

        # A fresh generation config: a model's own defaults (repetition penalty, top-k, ...)
        # would otherwise bend the sampling distribution away from the policy's.
        config = GenerationConfig(
            do_sample=False, max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=self.stop_ids
        )
        sequences = self.model.generate(
            input_ids=input_ids.repeat_interleave(samples, dim=0).to(device),
            attention_mask=attention_mask.repeat_interleave(samples, dim=0).to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )  # (prompts * samples, width + new), samples of one prompt adjacent
        if greedy:
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
