"""Multi-expert overhead: MEML's step time against GRPO at the same and at a third of the rollouts.

    python bench/expert_overhead.py --model PATH/TO/checkpoints/sft-N/model   # ~12 min on 2 cores
    python bench/expert_overhead.py --steps 2 --questions 1 --max-new-tokens 16   # smoke run

Arms, each in its own process, one after the other, on the same questions (the same seed, so
meml's question shuffle gives every arm the same ones) from the same model:
  meml          MEML-GRPO: 3 experts x G=4 answers per question, IML and HSFT on (the defaults)
  meml-no-aux   the same with IML and HSFT off: what the experts alone cost
  grpo-12       GRPO (preset grpo: one expert) with G=12: the same number of rollouts
  grpo-4        GRPO with G=4: a third of them
Per arm: step time averaged over the steps after --warmup, its parts (generation, reward,
forward+loss, backward, optimizer, sync), prompt and completion tokens per step, and rows
forwarded in the update per kind (policy gradient, IML, HSFT). meml / meml-no-aux isolates
the IML and HSFT forward/backward passes; meml-no-aux / grpo-12 the experts themselves
(three system prompts of different lengths, different completion lengths, fewer trained
sequences under A+ = max(A, 0)). Start from a stage-1 checkpoint (--model) so that rewards
are neither all 0 nor all 1 and IML and HSFT have something to do; from the base model they
rarely fire. Writes bench/results/expert_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, mean, meml_steps, rl_only_overrides, run_child, wait_for_quiet, write_json  # noqa: E402

ARMS = {
    "meml": ("meml", 4, []),
    "meml-no-aux": ("meml", 4, ["algo.iml.enabled=false", "algo.hsft.enabled=false"]),
    "grpo-12": ("grpo", 12, []),
    "grpo-4": ("grpo", 4, []),
}


def child(args) -> dict:
    preset, group, extra = ARMS[args.arm]
    out = tempfile.mkdtemp(prefix=f"overhead-{args.arm}-")
    overrides = (
        rl_only_overrides(
            out,
            args.seed,
            args.steps,
            args.questions,
            group,
            args.max_new_tokens,
            **{"rollout.backend": args.backend, "rollout.sequences_per_generate": 48},
        )
        + extra
    )
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    return meml_steps(preset, overrides)


def summarize(run: dict, warmup: int) -> dict:
    measured = [st for st in run["steps"] if st["step"] > warmup] or run["steps"]
    n = len(measured)
    parts = {
        k: sum(st["parts"].get(k, 0.0) for st in measured) / n
        for k in ("generate", "reward", "forward", "backward", "clip", "optimizer", "sync")
    }
    parts["other"] = sum(st["time_s"] for st in measured) / n - sum(parts.values())

    def per_step(key: str) -> float:
        return sum(st["counts"].get(key, 0.0) for st in measured) / n

    return {
        "measured_steps": n,
        "step_time_s": mean(st["time_s"] for st in measured),
        "step_time_s_each": [st["time_s"] for st in measured],
        "parts_s": parts,
        "sequences": mean(st["sequences"] for st in measured),
        "prompt_tokens_per_sequence": sum(st["prompt_tokens"] for st in measured)
        / sum(st["sequences"] for st in measured),
        "completion_tokens_per_step": mean(st["completion_tokens"] for st in measured),
        "completion_len": sum(st["completion_tokens"] for st in measured) / sum(st["sequences"] for st in measured),
        "train_rows": {k: per_step(f"train_rows/{k}") for k in ("pg", "iml", "hsft")},
        "train_tokens": {k: per_step(f"train_tokens/{k}") for k in ("pg", "iml", "hsft")},
        "reward": mean(st["metrics"]["reward/mean"] for st in measured),
        "zero_signal_frac": mean(st["metrics"]["zero_signal_frac"] for st in measured),
        "iml_fired": mean(st["metrics"].get("iml/fired", 0) for st in measured),
        "hsft_flushes": measured[-1]["metrics"].get("hsft/flushes", 0)
        - (run["steps"][warmup - 1]["metrics"].get("hsft/flushes", 0) if warmup else 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="", help="model.name_or_path (a stage-1 checkpoint's model/); default: the base model"
    )
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per arm, warm-up included")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend", default="hf", help="rollout.backend (vllm: run this script with the vLLM venv's python)"
    )
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-s", type=float, default=900)
    parser.add_argument("--out", default="expert_overhead.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        emit(child(args))
        return 0
    argv = [
        "--model",
        args.model,
        "--questions",
        str(args.questions),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--backend",
        args.backend,
    ]
    runs = {}
    for arm in args.arms.split(","):
        wait_for_quiet(args.max_load, args.wait_s)
        runs[arm] = run_child([sys.executable, __file__, "--arm", arm, *argv], label=arm)
        runs[arm]["summary"] = summarize(runs[arm], args.warmup)
    report = {"config": {k: v for k, v in vars(args).items() if k != "arm"}, "machine": machine(), "arms": runs}
    names = list(runs)
    print(f"\n{'':30}" + "".join(f"{a:>13}" for a in names))
    sm = {a: runs[a]["summary"] for a in names}
    for label, get in [
        ("step time (s)", lambda x: x["step_time_s"]),
        ("sequences/step", lambda x: x["sequences"]),
        ("prompt tokens/sequence", lambda x: x["prompt_tokens_per_sequence"]),
        ("completion length", lambda x: x["completion_len"]),
        ("pg rows trained/step", lambda x: x["train_rows"]["pg"]),
        ("IML rows/step", lambda x: x["train_rows"]["iml"]),
        ("HSFT rows/step", lambda x: x["train_rows"]["hsft"]),
        ("reward", lambda x: x["reward"]),
        ("zero-signal fraction", lambda x: x["zero_signal_frac"]),
    ]:
        print(f"{label:30}" + "".join(f"{get(sm[a]):>13.2f}" for a in names))
    for part in ("generate", "reward", "forward", "backward", "clip", "optimizer", "sync", "other"):
        print(f"  {part + ' (s/step)':28}" + "".join(f"{sm[a]['parts_s'][part]:>13.2f}" for a in names))
    print(
        f"{'load 1m before/after':30}"
        + "".join(f"{runs[a]['load_1m'][0]:>6.2f}/{runs[a]['load_1m'][1]:<6.2f}" for a in names)
    )
    ratios = {}
    for base in ("grpo-12", "grpo-4"):
        for arm in ("meml", "meml-no-aux"):
            if base in sm and arm in sm:
                ratios[f"{arm}/{base}"] = sm[arm]["step_time_s"] / sm[base]["step_time_s"]
    if "meml" in sm and "meml-no-aux" in sm:
        ratios["meml/meml-no-aux"] = sm["meml"]["step_time_s"] / sm["meml-no-aux"]["step_time_s"]
    report["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}" + ("  (target <= 1.15)" if k == "meml/grpo-12" else ""))
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
