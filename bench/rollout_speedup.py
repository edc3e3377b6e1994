"""The two transformers-generation fixes in meml/rollout.py, before against after, on SmolLM2-135M.

    python bench/rollout_speedup.py                  # ~4 min on 2 cores
    python bench/rollout_speedup.py --questions 1 --max-new-tokens 16   # smoke run

"before" puts back what the engine did until these fixes: the LM head gets the prefill's
strided last position as it comes (torch.matmul then copies the head's weight once per row)
and each row samples with torch.multinomial. "after" is meml as it is. Each variant runs in
its own process (its peak RSS is its own): a warm-up call, then a rollout of questions x 3
experts x samples at temperature 1 with up to --max-new-tokens new tokens in one generate
call (rollout.sequences_per_generate = all sequences, as in bench/trl_compare.py), then one greedy
evaluation batch of eval.questions_per_batch=64 questions x 3 experts (192 rows) with
--eval-new-tokens new tokens. Prints the times, tokens/s and peak RSS and writes
bench/results/rollout_speedup.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, run_child, wait_for_quiet, write_json  # noqa: E402


def restore_before(engine) -> None:
    """The engine as it was: no contiguous-input hook on the LM head, torch.multinomial per row."""
    import torch

    from meml.engines import hf as rollout

    engine.model.get_output_embeddings()._forward_pre_hooks.clear()

    def multinomial(probs, generators):
        return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])

    rollout.inverse_cdf_sample = multinomial


def child(args) -> dict:
    import torch

    from meml.core.config import ModelConfig, _default_experts
    from meml.engines.base import SamplingParams
    from meml.engines.factory import make_engine
    from meml.engines.model import compute_dtype, load_policy, load_tokenizer, resolve_model_source
    from meml.tasks.arithmetic import generate
    from meml.tasks.base import NUMERIC_FORMAT
    from meml.tasks.experts import experts_from_config, prompt_ids

    cfg = ModelConfig()
    source = resolve_model_source(cfg)
    tokenizer, policy = load_tokenizer(cfg, source), load_policy(cfg, source)
    experts = experts_from_config(_default_experts())
    train = [
        prompt_ids(tokenizer, e, q, NUMERIC_FORMAT) for q in generate("train", args.questions, 2, 0) for e in experts
    ]
    test = [
        prompt_ids(tokenizer, e, q, NUMERIC_FORMAT)
        for q in generate("test", args.eval_questions, 2, 0)
        for e in experts
    ]
    engine = make_engine("hf", policy, tokenizer, compute_dtype("auto"), len(train) * args.samples)
    if args.variant == "before":
        restore_before(engine)
    engine.generate(train[:2], SamplingParams(2, 1.0, 1.0, 4, 0))  # warm-up
    out = {"variant": args.variant, "torch_threads": torch.get_num_threads()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    groups = engine.generate(train, SamplingParams(args.samples, 1.0, 1.0, args.max_new_tokens, 1))
    out["rollout_s"] = time.perf_counter() - t
    out["rollout_tokens"] = sum(len(g.token_ids) for group in groups for g in group)
    out["rollout_sequences"] = len(train) * args.samples
    out["rollout_tokens_per_s"] = out["rollout_tokens"] / out["rollout_s"]
    out["rss_mb_before_rollout"], out["peak_rss_mb_after_rollout"] = (
        rss,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    engine.batch_size = len(test)
    t = time.perf_counter()
    greedy = engine.generate(test, SamplingParams(1, 0.0, 1.0, args.eval_new_tokens, 0))
    out["eval_s"] = time.perf_counter() - t
    out["eval_rows"] = len(test)
    out["eval_tokens"] = sum(len(g.token_ids) for group in greedy for g in group)
    out["peak_rss_mb_after_eval"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="answers per (question, expert)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--eval-questions", type=int, default=64)
    parser.add_argument("--eval-new-tokens", type=int, default=16, help="enough to show the prefill's cost")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-s", type=float, default=900)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        emit(child(args))
        return 0
    argv = [
        "--questions",
        str(args.questions),
        "--samples",
        str(args.samples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--eval-questions",
        str(args.eval_questions),
        "--eval-new-tokens",
        str(args.eval_new_tokens),
    ]
    runs = {}
    for variant in ("before", "after"):
        wait_for_quiet(args.max_load, args.wait_s)
        runs[variant] = run_child([sys.executable, __file__, "--variant", variant, *argv], label=variant)
    print(f"\n{'':34}{'before':>12}{'after':>12}{'after/before':>14}")
    for label, key in [
        ("rollout (s)", "rollout_s"),
        ("rollout tokens/s", "rollout_tokens_per_s"),
        ("greedy eval batch (s)", "eval_s"),
        ("peak RSS after rollout (MB)", "peak_rss_mb_after_rollout"),
        ("peak RSS after eval batch (MB)", "peak_rss_mb_after_eval"),
    ]:
        b, a = runs["before"][key], runs["after"][key]
        print(f"{label:34}{b:>12.1f}{a:>12.1f}{a / b:>14.2f}")
    print(
        "load 1m before/after: "
        + ", ".join(f"{v} {r['load_1m'][0]:.2f}/{r['load_1m'][1]:.2f}" for v, r in runs.items())
    )
    write_json(
        "rollout_speedup.json",
        {"config": {k: v for k, v in vars(args).items() if k != "variant"}, "machine": machine(), "runs": runs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
