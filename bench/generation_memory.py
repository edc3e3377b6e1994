"""Peak RSS of the transformers engine: building its rollout copy, and one generate call against
rollout.tokens_per_generate.

    python bench/generation_memory.py                      # the default model, ~10 min on 2 cores
    python bench/generation_memory.py --rows 48 --new-tokens 512 --budgets 0,16384,8192
    python bench/generation_memory.py --rows 4 --new-tokens 8 --budgets 0,64   # smoke run

Each measurement runs in its own process on the default model (SmolLM2-135M-Instruct, fp32
master weights as the trainer loads them, a bf16 rollout copy):
  copy/deepcopy   the engine's copy built as before: copy.deepcopy(policy).to(bf16)
  copy/in_dtype   as now (engines/hf.py:copy_in_dtype): each tensor cast on its own
  generate/B      one greedy generate call over --rows evaluation prompts of the default task
                  with every completion forced to --new-tokens (stop tokens masked), with
                  rollout.tokens_per_generate = B (0: one call of all rows)
A phase's figure is the process's RSS high-water mark during it (VmHWM, reset through
/proc/self/clear_refs when the phase starts) minus the RSS when it started: what the phase
added at its worst. The same prompts, the same outputs (compared across budgets: the JSON's
same_outputs). Peak RSS does not depend on the machine's load; the times in the JSON do.
Writes bench/results/generation_memory.json.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, force_lengths, machine, run_child, write_json  # noqa: E402


def rss_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def start_phase() -> float:
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def child(args) -> dict:
    import torch

    from meml.core.load import load_config
    from meml.engines import hf
    from meml.engines import model as model_lib
    from meml.tasks.experts import prompt_ids
    from meml.train.session import model_source, open_workload

    cfg = load_config(None, ["output_dir=/tmp/generation-memory", f"task.max_eval_examples={args.rows}"])
    work = open_workload(cfg, None)
    source = model_source(cfg)
    tokenizer = model_lib.load_tokenizer(cfg.model, source)
    policy = model_lib.load_policy(cfg.model, source)
    for p in policy.parameters():  # page the master weights in, as training does, before measuring
        p.detach().sum()
    result: dict = {"mode": args.mode}
    if args.mode.startswith("copy"):
        before = start_phase()
        t = time.perf_counter()
        if args.mode == "copy-deepcopy":
            copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)
        else:
            hf.copy_in_dtype(policy, torch.bfloat16)
        result.update(copy_added_mb=rss_mb("VmHWM") - before, copy_kept_mb=rss_mb("VmRSS") - before)
        result["copy_s"] = time.perf_counter() - t
    else:
        engine = hf.HFEngine(
            policy, tokenizer, torch.bfloat16, cfg.rollout.sequences_per_generate, tokens_per_generate=args.budget
        )
        force_lengths(SimpleNamespace(engine=engine))  # every row runs to max_new_tokens
        from meml.engines.base import SamplingParams

        examples = work.eval_examples[: args.rows]
        prompts = [
            prompt_ids(tokenizer, work.experts[i % 3], ex, work.task.format_instruction)
            for i, ex in enumerate(examples)
        ]
        calls = hf.plan_calls([len(p) for p in prompts], 1, engine.sequences_per_generate, args.new_tokens, args.budget)
        engine.generate(prompts[:2], SamplingParams(1, 0.0, 1.0, 4))  # warm-up: lazy buffers, thread pools
        before = start_phase()
        t = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(1, 0.0, 1.0, args.new_tokens))
        result.update(
            generate_added_mb=rss_mb("VmHWM") - before,
            generate_s=time.perf_counter() - t,
            calls=[c.stop - c.start for c in calls],
            longest_prompt=max(len(p) for p in prompts),
            outputs=[g[0].token_ids for g in out],
        )
    result["threads"] = torch.get_num_threads()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=48, help="evaluation prompts in the generate call")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--budgets", default="0,8192", help="rollout.tokens_per_generate values to measure")
    parser.add_argument("--skip-copy", action="store_true")
    parser.add_argument("--out", default="generation_memory.json")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        emit(child(args))
        return 0
    common = ["--rows", str(args.rows), "--new-tokens", str(args.new_tokens)]
    runs = {}
    modes = (
        []
        if args.skip_copy
        else [("copy/deepcopy", ["--mode", "copy-deepcopy"]), ("copy/in_dtype", ["--mode", "copy-in-dtype"])]
    )
    modes += [(f"generate/{b}", ["--mode", "generate", "--budget", b]) for b in args.budgets.split(",")]
    for label, extra in modes:
        runs[label] = run_child([sys.executable, __file__, *extra, *common], label=label)
    outputs = [r.pop("outputs") for r in runs.values() if "outputs" in r]
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("mode", "budget")},
        "machine": machine(),
        "runs": runs,
        "same_outputs": all(o == outputs[0] for o in outputs),
    }
    for label, r in runs.items():
        if "copy_added_mb" in r:
            print(f"{label:18s} +{r['copy_added_mb']:6.0f} MB at peak, +{r['copy_kept_mb']:6.0f} MB kept")
        else:
            print(f"{label:18s} +{r['generate_added_mb']:6.0f} MB at peak, in calls of {r['calls']} rows")
    print(f"same outputs across budgets: {report['same_outputs']}")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
