"""Model FLOPs utilisation of meml's RL step, against a bf16 matmul peak measured in the same run.

    python bench/mfu.py --model PATH/TO/checkpoints/sft-N/model        # ~6 min on 2 cores
    python bench/mfu.py --backends hf,vllm --model ...                  # + the vLLM rollout backend
    python bench/mfu.py --steps 2 --questions 1 --max-new-tokens 16     # smoke run

Each backend runs in its own process (vLLM from --vllm-python). In that process, first the
peak: the best of several timed `torch.matmul`s of large square bf16 matrices, at the
process's torch thread count (2 on this machine) and at 1 thread (vLLM decodes on one),
and, for scale, matmuls of the model's own shapes (a decode step of the rollout batch, a
training micro-batch). Then meml's RL steps, the default MEML job (3 experts x G answers,
IML and HSFT on; `--preset`, `--model` and sizes as options), each timed and its tokens
counted from outside the hot path (bench/common.py:meml_steps).

What is counted (model FLOPs, useful tokens only; padding and recomputation are not):
  a forward pass of a sequence of T tokens: 2 x (matmul weights outside the embedding) x T
    + 2 x (LM-head weights) x (positions whose logits are computed)
    + 4 x layers x attention width x (causal query-key pairs)
  generation: one forward over prompt + completion (the prompt once per sampled sequence,
    as transformers generate prefills it; logits at each of the c generated positions)
  update: 3 x the forward of each trained sequence (forward + backward), prompt included;
    policy-gradient, IML and HSFT rows alike. The optimizer, clipping and sync are time,
    not FLOPs.
MFU = FLOPs / seconds / peak, for generation (its time), the update (time/update_s: loss,
backward, optimizer, sync) and the whole step. Prints the figures and writes
bench/results/mfu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, emit, machine, meml_steps, rl_only_overrides, run_child, wait_for_quiet, write_json  # noqa: E402


def matmul_rate(m: int, k: int, n: int, threads: int, seconds: float = 1.0, repeats: int = 5) -> float:
    """Best FLOP/s of (m, k) @ (k, n) in bf16 over `repeats` timed runs of ~`seconds` each."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    t = time.perf_counter()
    torch.matmul(a, b)
    per_call = max(1e-6, time.perf_counter() - t)
    calls = max(1, int(seconds / per_call))
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b)
        best = max(best, 2 * m * k * n * calls / (time.perf_counter() - t))
    torch.set_num_threads(before)
    return best


def peaks(threads: int, hidden: int, intermediate: int, rollout_rows: int) -> dict:
    square = {n: matmul_rate(n, n, n, threads) for n in (1024, 2048, 4096)}
    return {
        "square_gflops": {str(n): v / 1e9 for n, v in square.items()},
        "peak_gflops": max(square.values()) / 1e9,
        "decode_mlp_gflops": matmul_rate(rollout_rows, hidden, intermediate, threads)
        / 1e9,  # one decode step of the batch
        "train_mlp_gflops": matmul_rate(4096, hidden, intermediate, threads) / 1e9,  # a 4096-token micro-batch
    }


def child(args) -> dict:
    import torch

    out = tempfile.mkdtemp(prefix="mfu-")
    overrides = rl_only_overrides(
        out,
        args.seed,
        args.steps,
        args.questions,
        args.generations,
        args.max_new_tokens,
        **{"rollout.backend": args.backend},
    )
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    threads = torch.get_num_threads()
    rows = args.questions * args.generations * 3
    peak = {f"threads_{n}": peaks(n, 576, 1536, rows) for n in sorted({threads, 1})}
    run = meml_steps(args.preset, overrides)
    run["peak"] = peak
    run["threads"] = threads
    return run


def summarize(run: dict, warmup: int, backend: str) -> dict:
    measured = [st for st in run["steps"] if st["step"] > warmup] or run["steps"]
    gen_s = sum(st["parts"].get("generate", 0.0) for st in measured)
    update_s = sum(st["metrics"]["time/update_s"] for st in measured)
    step_s = sum(st["time_s"] for st in measured)
    gen_flops = sum(st["counts"].get("gen_flops", 0.0) for st in measured)
    train_flops = sum(st["counts"].get("train_flops", 0.0) for st in measured)
    peak = run["peak"][f"threads_{run['threads']}"]["peak_gflops"] * 1e9
    gen_peak = (
        run["peak"]["threads_1"]["peak_gflops"] * 1e9 if backend == "vllm" else peak
    )  # vLLM decodes on one thread
    return {
        "measured_steps": len(measured),
        "step_time_s": step_s / len(measured),
        "generate_s": gen_s / len(measured),
        "update_s": update_s / len(measured),
        "gen_tflops_per_step": gen_flops / len(measured) / 1e12,
        "train_tflops_per_step": train_flops / len(measured) / 1e12,
        "peak_gflops": peak / 1e9,
        "gen_peak_gflops": gen_peak / 1e9,
        "achieved_gflops": {
            "generation": gen_flops / gen_s / 1e9,
            "update": train_flops / update_s / 1e9,
            "step": (gen_flops + train_flops) / step_s / 1e9,
        },
        "mfu": {
            "generation": gen_flops / gen_s / gen_peak,
            "update": train_flops / update_s / peak,
            "step": (gen_flops + train_flops) / step_s / peak,
        },
        "trained_rows_per_step": {
            k.split("/")[1]: sum(st["counts"].get(k, 0) for st in measured) / len(measured)
            for k in ("train_rows/pg", "train_rows/iml", "train_rows/sft")
        },
        "completion_tokens_per_step": sum(st["completion_tokens"] for st in measured) / len(measured),
        "padding_overhead_train": sum(st["counts"].get("train_padded_tokens", 0) for st in measured)
        / max(1, sum(sum(v for k, v in st["counts"].items() if k.startswith("train_tokens/")) for st in measured)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="meml")
    parser.add_argument(
        "--model", default="", help="model.name_or_path (e.g. a stage-1 checkpoint's model/); default: the base model"
    )
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="G per (question, expert)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="hf")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--wait-s", type=float, default=900)
    parser.add_argument("--out", default="mfu.json")
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(child(args))
        return 0
    argv = [
        "--preset",
        args.preset,
        "--model",
        args.model,
        "--questions",
        str(args.questions),
        "--generations",
        str(args.generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
    ]
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("backend", "child")},
        "machine": machine(),
        "backends": {},
    }
    for backend in args.backends.split(","):
        python = args.vllm_python if backend == "vllm" else sys.executable
        wait_for_quiet(args.max_load, args.wait_s)
        run = run_child([python, __file__, "--child", "--backend", backend, *argv], label=f"mfu/{backend}")
        run["summary"] = summarize(run, args.warmup, backend)
        report["backends"][backend] = run
        sm = run["summary"]
        print(
            f"{backend}: peak {sm['peak_gflops']:.0f} GFLOP/s ({run['threads']} threads; 1 thread "
            f"{run['peak']['threads_1']['peak_gflops']:.0f}); step {sm['step_time_s']:.1f}s "
            f"(generate {sm['generate_s']:.1f}s, update {sm['update_s']:.1f}s); load "
            f"{run['load_1m'][0]:.2f}/{run['load_1m'][1]:.2f}"
        )
        for part in ("generation", "update", "step"):
            print(f"   {part:10s} {sm['achieved_gflops'][part]:8.1f} GFLOP/s   MFU {100 * sm['mfu'][part]:5.1f}%")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
