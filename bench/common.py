"""Helpers shared by the bench scripts: child processes with their own peak RSS, timers
wrapped around functions from outside the hot path, the load check, JSON output.

Not an entry point; the bench scripts import it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def load_1m() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 20.0) -> float:
    """Wait until the 1-minute load average is below max_load (or the timeout passes).

    Timing figures only mean something on an idle machine; the load is recorded either way.
    """
    start = time.time()
    while (load := load_1m()) >= max_load and time.time() - start < timeout_s:
        print(f"   load {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll_s)
    return load


def run_child(cmd: list[str], env: dict | None = None, label: str = "") -> dict:
    """Run one measurement in a fresh process; returns the JSON it printed on its last
    `RESULT ` line, plus its own peak RSS (os.wait4's rusage of that child alone), its wall
    time and the load average before and after."""
    print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
    load_before = load_1m()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(stdout[-3000:] + "\n" + stderr[-6000:])
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_wall_s"] = wall
    result["load_1m"] = [load_before, load_1m()]
    return result


def emit(result: dict) -> None:
    """A child's result, for run_child to pick up."""
    print("RESULT " + json.dumps(result), flush=True)


def write_json(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")
    return path


class Timers:
    """Seconds spent inside wrapped callables, summed per label (nested labels both count)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        """The sums since the last take, then reset."""
        out = dict(self.seconds)
        self.seconds.clear()
        self.calls.clear()
        return out


def machine() -> dict:
    import platform

    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def spread(values: list[float]) -> dict:
    """Mean, sd, min, max and count of a list of measurements (sd 0 for one value)."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def rl_only_overrides(
    output_dir: str, seed: int, steps: int, questions: int, generations: int, max_new_tokens: int, **extra
) -> list[str]:
    """`meml train` overrides for a job of RL steps alone: no stage 1, no evaluation, no
    progress bar, HSFT's K at most G - 1. `extra` adds or replaces settings (dotted keys
    given as a dict: `**{"rollout.backend": "vllm"}`)."""
    settings = {
        "output_dir": output_dir,
        "seed": seed,
        "train.steps": steps,
        "train.questions_per_step": questions,
        "rollout.num_generations_per_expert": generations,
        "rollout.max_new_tokens": max_new_tokens,
        "sft.enabled": "false",
        "eval.before": "false",
        "eval.after": "false",
        "log.progress": "false",
        "algo.hsft.max_wrong": max(0, min(3, generations - 1)),
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


# ----------------------------------------------------------------------------- meml RL steps, instrumented


def model_shape(model) -> dict:
    """Parameter counts for model FLOPs: the embedding is a lookup (no FLOPs); with tied
    embeddings the same matrix is the LM head, a matmul on every position whose logits are
    computed; every other weight is a matmul on every token."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    head = c.vocab_size * c.hidden_size
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    body = total - head - norms - (0 if getattr(c, "tie_word_embeddings", False) else head)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {
        "params": total,
        "body_matmul_params": body,
        "head_params": head,
        "layers": c.num_hidden_layers,
        "attn_width": c.num_attention_heads * head_dim,
    }


def forward_flops(shape: dict, tokens: int, logit_positions: int, attn_pairs: int) -> float:
    """Model FLOPs of one forward pass: 2 per weight per token (the head only where logits are
    computed) plus attention: QK^T and AV, 2 * 2 * width FLOPs per (query, key) pair per layer."""
    return (
        2 * shape["body_matmul_params"] * tokens
        + 2 * shape["head_params"] * logit_positions
        + 4 * shape["layers"] * shape["attn_width"] * attn_pairs
    )


def causal_pairs(length: int, start: int = 0) -> int:
    """(query, key) pairs a causal pass over positions start..length-1 attends (keys 0..t)."""
    return sum(t + 1 for t in range(start, length))


def force_lengths(s) -> None:
    """Make every completion of session `s` run to max_new_tokens: stop tokens are masked until
    then (transformers' min_new_tokens, vLLM's min_tokens: the settings TRL takes for the same),
    and the answer is read from the whole forced text as if it had finished. For benchmarks
    whose figures must not depend on how long the model chooses to answer."""
    engine = s.engine
    if hasattr(engine, "llm"):  # vLLM: each request's SamplingParams gets min_tokens = max_tokens
        import msgspec

        request = engine._request

        def forced_request(params, seed):
            r = request(params, seed)
            return msgspec.structs.replace(r, min_tokens=r.max_tokens)

        engine._request = forced_request
    else:
        generate_ids = engine.model.generate

        def forced(*a, generation_config, **k):
            config = copy.copy(generation_config)
            config.min_new_tokens = config.max_new_tokens
            return generate_ids(*a, generation_config=config, **k)

        engine.model.generate = forced
    generate = engine.generate

    def read_as_finished(prompts, params, seeds=None):
        groups = generate(prompts, params, seeds)
        for group in groups:
            for g in group:
                g.finished = True
        return groups

    engine.generate = read_as_finished


def meml_steps(
    preset: str,
    overrides: list[str],
    skip_zero: bool = True,
    log=print,
    on_session=None,
    edit_config=None,
) -> dict:
    """Run meml's RL steps (`meml.train.rl_step.rl_step`) as the trainer does, timing each step and its
    parts from outside, and counting the tokens each forward pass sees (for model FLOPs).

    skip_zero=False forwards zero-advantage sequences too (meml skips them: no gradient).
    on_session(session), when given, runs once the session is open (e.g. force_lengths);
    edit_config(cfg), before it opens (for what key=value cannot say, e.g. a list of experts).
    """
    import torch

    from meml.algo import objective
    from meml.core.load import load_config
    from meml.train import rl_step as riel
    from meml.train import update

    try:  # rollouts live in train/sampling.py since the sparse-reward toolkit, in rl_step before
        from meml.train import sampling
    except ImportError:
        sampling = riel
    from meml.train.loop import make_learner
    from meml.train.session import open_session

    cfg = load_config(preset, overrides)
    if edit_config is not None:
        edit_config(cfg)
    t0 = time.perf_counter()
    s = open_session(cfg, preset)
    if on_session is not None:
        on_session(s)
    learner = make_learner(s, cfg.optim.lr, cfg.train.steps)
    optimizer = learner.optimizer
    startup = time.perf_counter() - t0
    shape = model_shape(s.unwrapped)
    timers = Timers()
    timers.wrap(sampling, "score_episodes", "reward")
    timers.wrap(s.accelerator, "backward", "backward")
    timers.wrap(s.accelerator, "clip_grad_norm_", "clip")
    timers.wrap(optimizer, "step", "optimizer")
    timers.wrap(riel, "sync_rollout_weights", "sync")
    counts: dict[str, float] = defaultdict(float)

    roll_out = sampling.roll_out

    def counted_roll_out(*args, **kwargs):
        t = time.perf_counter()
        episodes = roll_out(*args, **kwargs)
        timers.seconds["generate"] += time.perf_counter() - t
        for e in episodes:
            p, c = len(e.prompt_ids), len(e.completion_ids)
            counts["gen_prompt_tokens"] += p
            counts["gen_completion_tokens"] += c
            counts["gen_flops"] += forward_flops(
                shape, p + c - 1, c, causal_pairs(p + c - 1)
            )  # the last token is never fed back
        counts["sequences"] += len(episodes)
        return episodes

    sampling.roll_out = counted_roll_out
    micro_batch_loss = update.micro_batch_loss

    def counted_loss(model, items, batch, *a, **k):
        t = time.perf_counter()
        out = micro_batch_loss(model, items, batch, *a, **k)
        timers.seconds["forward"] += time.perf_counter() - t
        for it in items:
            if it.weight == 0:  # a padding copy under several processes
                continue
            p, r = len(it.prompt_ids), len(it.response_ids)
            counts[f"train_rows/{it.kind}"] += 1
            counts[f"train_tokens/{it.kind}"] += p + r
            counts["train_flops"] += 3 * forward_flops(
                shape, p + r, r, causal_pairs(p + r)
            )  # forward + backward = 3x forward
        counts["train_padded_tokens"] += batch.input_ids.numel()
        return out

    update.micro_batch_loss = counted_loss
    if not skip_zero:
        policy_items = objective.policy_items
        objective.policy_items = lambda *a, drop_zero: policy_items(*a, drop_zero=False)
    steps = []
    for step in range(1, cfg.train.steps + 1):
        t = time.perf_counter()
        m = riel.rl_step(s, step, learner, None)
        dt = time.perf_counter() - t
        c = dict(counts)
        counts.clear()
        rec = {
            "step": step,
            "time_s": dt,
            "completion_tokens": int(c["gen_completion_tokens"]),
            "prompt_tokens": int(c["gen_prompt_tokens"]),
            "sequences": int(c["sequences"]),
            "trained_sequences": int(c.get("train_rows/pg", 0)),
            "counts": c,
            "parts": timers.take(),
            "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))},
        }
        steps.append(rec)
        log(
            f"step {step}: {dt:.1f}s, {rec['completion_tokens']} completion tokens, {rec['trained_sequences']} "
            "trained sequences",
            flush=True,
        )
    if cfg.rollout.backend == "vllm":
        s.engine.close()
    return {
        "startup_s": startup,
        "steps": steps,
        "model_shape": shape,
        "torch_threads": torch.get_num_threads(),
        "transformers": __import__("transformers").__version__,
        "mixed_precision": s.accelerator.mixed_precision,
    }
