"""How far vLLM's sampling log-probs are from the policy's own, on the same tokens.

    .venv-vllm/bin/python bench/logprob_gap.py                   # bf16 engine, as training uses it
    .venv-vllm/bin/python bench/logprob_gap.py --dtype fp32 --questions 4

The trainer never uses the sampler's log-probs for the gradient: it recomputes them with
the policy (fp32 master weights under bf16 autocast). When the two disagree, the samples
are slightly off-policy, which a truncated importance weight corrects (docs/VLLM.md).
This samples with the vLLM engine (questions x 3 experts x samples, temperature 1), then
scores the same tokens three ways:
  policy, autocast   the trainer's recomputation (meml.train.update.score_logprobs)
  policy, fp32       the exact log-probs of the master weights
  bf16 weight copy   what the transformers engine samples from, scored in full bf16
and prints, per reference, mean |delta|, max |delta| and the fraction of tokens whose
ratio exp(delta) falls outside [0.8, 1.25]. delta = log p_reference - log p_sampler.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "logprob_gap.json"


def gap_stats(reference: list[torch.Tensor], sampler: list[torch.Tensor]) -> dict:
    delta = torch.cat([r - s for r, s in zip(reference, sampler)])  # (tokens,)
    ratio = delta.exp()
    return {
        "tokens": delta.numel(),
        "mean_abs": float(delta.abs().mean()),
        "max_abs": float(delta.abs().max()),
        "p99_abs": float(delta.abs().quantile(0.99)) if delta.numel() else math.nan,
        "frac_ratio_outside_0.8_1.25": float(((ratio < 0.8) | (ratio > 1.25)).float().mean()),
        "frac_ratio_above_2": float((ratio > 2).float().mean()),
        "mean_seq_abs_sum": float(torch.stack([(r - s).sum().abs() for r, s in zip(reference, sampler)]).mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", help="engine / autocast dtype: auto | bf16 | fp32")
    args = parser.parse_args()

    from meml.algo.objective import TrainItem
    from meml.core.config import ModelConfig, _default_experts
    from meml.engines.base import SamplingParams
    from meml.engines.model import compute_dtype, load_policy, load_tokenizer, resolve_model_source
    from meml.engines.vllm import VLLMEngine
    from meml.tasks.arithmetic import generate
    from meml.tasks.experts import experts_from_config, prompt_ids
    from meml.train.forward import score_logprobs

    cfg = ModelConfig()
    source = resolve_model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    policy = load_policy(cfg, source).eval()
    dtype = compute_dtype(args.dtype)
    experts = experts_from_config(_default_experts())
    prompts = [prompt_ids(tokenizer, e, q, "") for q in generate("train", args.questions, 2, 0) for e in experts]

    engine = VLLMEngine(policy, tokenizer, dtype, sequences_per_generate=48)
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(args.samples, 1.0, 1.0, args.max_new_tokens, 0))
    gen_s = time.perf_counter() - t0
    engine.close()
    items = [TrainItem("pg", p, g.token_ids, 1.0) for p, group in zip(prompts, out) for g in group]
    sampler = [torch.tensor(g.logprobs) for group in out for g in group]

    def scored(model, autocast) -> list[torch.Tensor]:
        batch = [TrainItem("pg", it.prompt_ids, it.response_ids, 1.0) for it in items]
        score_logprobs(model, batch, 4096, tokenizer.pad_token_id, autocast, "old_logprobs")
        return [it.old_logprobs for it in batch]

    references = {"policy, fp32": scored(policy, contextlib.nullcontext)}
    if dtype != torch.float32:
        references["policy, autocast"] = scored(policy, lambda: torch.autocast("cpu", dtype=dtype))
        references["bf16 weight copy"] = scored(copy.deepcopy(policy).to(dtype), contextlib.nullcontext)
    report = {
        "engine_dtype": str(dtype).removeprefix("torch."),
        "sequences": len(items),
        "generate_s": gen_s,
        "load_avg_1m": os.getloadavg()[0],
        "gaps": {name: gap_stats(ref, sampler) for name, ref in references.items()},
    }
    if "bf16 weight copy" in references:  # the transformers engine's own gap, for scale
        report["gaps_hf_bf16_copy_vs_policy_autocast"] = gap_stats(
            references["policy, autocast"], references["bf16 weight copy"]
        )

    print(
        f"vLLM sampler ({report['engine_dtype']}): {len(items)} sequences, "
        f"{report['gaps']['policy, fp32']['tokens']} tokens"
    )
    print(f"{'reference':26}{'mean |d|':>10}{'max |d|':>10}{'p99 |d|':>10}{'outside [0.8,1.25]':>20}{'ratio > 2':>11}")
    rows = list(report["gaps"].items())
    if "gaps_hf_bf16_copy_vs_policy_autocast" in report:
        rows.append(("(HF bf16 copy vs autocast)", report["gaps_hf_bf16_copy_vs_policy_autocast"]))
    for name, g in rows:
        print(
            f"{name:26}{g['mean_abs']:>10.4f}{g['max_abs']:>10.3f}{g['p99_abs']:>10.3f}"
            f"{g['frac_ratio_outside_0.8_1.25']:>20.4%}{g['frac_ratio_above_2']:>11.4%}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
