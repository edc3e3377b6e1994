"""The training loop: stage 1 (MEF) then stage 2 (RIEL, or GRPO / Dr.GRPO with one expert).

    meml train [preset] [key=value ...]

`train` validates and loads everything (data before the model), evaluates, runs the
configured stages and evaluates again. `run_stage` is the loop both stages share:
step, log, periodic eval, checkpoint, and a clean stop on SIGTERM/SIGINT
(train/signals.py) or after too many non-finite updates. A step that fails with an
unexpected error stops the run with `StepFailed` (train/failure.py). One RL step is
train/rl_step.py; one MEF step is below.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from meml.algo import objective
from meml.algo.objective import LossSettings
from meml.core.config import Config
from meml.core.load import to_yaml
from meml.engines.model import frozen_copy
from meml.eval.evaluate import evaluate_examples, records_as_dicts
from meml.tasks.experts import response_ids
from meml.train import checkpoint as ckpt
from meml.train import sft as mef
from meml.train.failure import StepFailed, StepGuard, run_step
from meml.train.logger import console_line
from meml.train.preflight import check_resume_model
from meml.train.rl_step import rl_step
from meml.train.run_dir import _logged_eval, _state, _warn_if_low_space, find_resume_checkpoint
from meml.train.run_state import restore, save
from meml.train.session import (
    Session,
    attach_model,
    global_sum,
    make_optimizer,
    open_workload,
    sync_rollout_weights,
)
from meml.train.signals import StopRequested, install_signal_handlers
from meml.train.update import Learner, NonFiniteError, optimizer_step

log = logging.getLogger("meml")

__all__ = ["StepFailed", "train"]


# ----------------------------------------------------------------------------- entry point


def train(cfg: Config, preset: str | None = None, overwrite: bool = False) -> dict:
    """Run the configured stages; returns held-out accuracy before, after stage 1, and after.

    With checkpoint.resume=auto (`meml train --resume`) it continues from the newest valid
    checkpoint of output_dir and replays exactly what an uninterrupted run would have done.
    A fresh run refuses an output_dir holding an earlier run's files unless `overwrite`
    (`meml train --overwrite`), which removes them first.
    After SIGTERM/SIGINT the step finishes, a checkpoint is saved, and the result holds
    "stopped": {"stage", "step", "signal"} (`meml train` then exits with 128 + signal).
    A step that fails raises `StepFailed` (`meml train` exits with 1).
    """
    work = open_workload(cfg, preset)  # config, data and rewards checked first
    resume = find_resume_checkpoint(cfg, work.run_dir, overwrite)
    check_resume_model(cfg, resume)  # a LoRA checkpoint needs model.lora.enabled=true, a full one false
    ckpt.check_writable(work.run_dir)  # before the model loads: an unwritable output_dir costs nothing
    manifest = ckpt.read_manifest(resume) if resume else None
    s = attach_model(work, source=str(resume / "model") if resume and not cfg.model.lora.enabled else None)
    if resume and cfg.model.lora.enabled:
        load_adapter(s, resume / "model")
    if s.is_main:
        log.info("run directory: %s\n%s", s.run_dir, to_yaml(cfg))
        _warn_if_low_space(s)
    signals = install_signal_handlers(s)
    results: dict = {}
    try:
        if cfg.eval.before and not resume:
            results["before"] = evaluate(s, "before", step=0)
        elif cfg.eval.before and (before := _logged_eval(s, "before")) is not None:
            results["before"] = before  # evaluated by the first start of this run
        stage, step = (manifest["stage"], manifest["step"]) if manifest else (None, 0)
        if cfg.sft.enabled and stage in (None, "sft"):
            run_mef(s, start_step=step if stage == "sft" else 0, state=_state(resume) if stage == "sft" else None)
        if cfg.sft.enabled and cfg.eval.after_mef and cfg.train.steps > 0:  # what stage 1 alone gave
            logged = _logged_eval(s, "after_mef") if stage == "rl" else None
            results["after_mef"] = logged if logged is not None else evaluate(s, "after_mef", step=0)
        if cfg.train.steps > 0:
            run_rl(s, start_step=step if stage == "rl" else 0, state=_state(resume) if stage == "rl" else None)
        if cfg.eval.after:
            results["after"] = evaluate(s, "after", step=cfg.train.steps)
        if s.is_main:
            report_accuracy(results)
            (s.run_dir / "results.json").write_text(json.dumps(results, indent=1))
    except StopRequested as stop:
        results["stopped"] = {"stage": stop.stage, "step": stop.step, "signal": signals.signum}
        log.warning(
            "stopped after %s step %d; continue with: meml train --resume output_dir=%s (and the same settings)",
            stop.stage,
            stop.step,
            s.run_dir,
        )
    finally:
        signals.restore()
        s.logger.close()
    return results


def load_adapter(s: Session, path: Path) -> None:
    """Under LoRA a checkpoint holds only the adapter: load it onto the freshly built one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(s.unwrapped, load_file(str(path / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter weights that fit no LoRA module of this model: {result.unexpected_keys[:5]}")
    sync_rollout_weights(s)


# ----------------------------------------------------------------------------- stages


def run_mef(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 1: SFT on every expert's traces."""
    cfg = s.cfg
    keys = mef.trace_keys(s.traces, s.experts, cfg.sft.experts)
    total = mef.total_steps(len(keys), cfg.sft.sequences_per_step, cfg.sft.epochs)
    learner = make_learner(s, cfg.sft.lr, total)
    if state:
        restore(s, state, learner.optimizer, learner.scheduler)
    if s.is_main:
        log.info("stage 1 (MEF): %d traces, %d steps; traces per expert: %s", len(keys), total, s.trace_report)

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        batch = mef.batch_keys(keys, step - 1, cfg.sft.sequences_per_step, cfg.seed)
        local = batch[s.accelerator.process_index :: s.accelerator.num_processes]
        pairs = [
            (s.prompt(s.examples_by_id[qid], e), response_ids(s.tokenizer, s.traces[(qid, e)])) for qid, e in local
        ]
        global_tokens = int(global_sum(s, [sum(len(r) for _, r in pairs)])[0])
        stats = optimizer_step(learner, objective.sft_items(pairs, global_tokens), LossSettings())
        dt = time.perf_counter() - t0
        return {
            "loss": stats["loss"],
            "grad_norm": stats["grad_norm"],
            "lr": stats["lr"],
            "skipped_updates": stats["skipped"],
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / dt,
            "step_time_s": dt,
        }

    run_stage(s, "sft", start_step, total, step_fn, learner)
    release_learner(s, learner)  # stage 2 makes its own: one AdamW state in memory, not two
    # The engine's own (bf16) copy of the weights is not updated by stage-1 steps: refresh it
    # before RL samples or an evaluation generates, else they would use the pre-MEF model.
    sync_rollout_weights(s)


def run_rl(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 2: RIEL (or GRPO / Dr.GRPO when there is one expert and IML/HSFT are off)."""
    cfg = s.cfg
    world = s.accelerator.num_processes
    if cfg.train.questions_per_step % world:
        raise ValueError(
            f"train.questions_per_step={cfg.train.questions_per_step} must be divisible by the {world} processes"
        )
    learner = make_learner(s, cfg.optim.lr, cfg.train.steps)
    if state:
        restore(s, state, learner.optimizer, learner.scheduler)
    # The KL reference is the policy when RL started (after MEF); a resumed run gets it back
    # from the checkpoint, since the policy it loaded has moved on.
    reference = frozen_copy(s.unwrapped) if cfg.algo.kl_coef > 0 else None
    if reference is not None and state:
        if "reference" not in state:
            log.warning(
                "the checkpoint holds no KL reference (saved with algo.kl_coef=0); the resumed weights become it"
            )
        else:
            ref_params = dict(reference.named_parameters())
            with torch.no_grad():
                for name, value in state["reference"].items():
                    ref_params[name].copy_(value)
    if s.is_main:
        log.info(
            "stage 2 (RL): %d steps x %d questions x %d experts x %d answers",
            cfg.train.steps,
            cfg.train.questions_per_step,
            len(s.experts),
            cfg.rollout.num_generations_per_expert,
        )
    run_stage(
        s, "rl", start_step, cfg.train.steps, lambda step: rl_step(s, step, learner, reference), learner, reference
    )


def make_learner(s: Session, lr: float, total_steps: int) -> Learner:
    """A fresh optimizer and schedule for one stage, with what its updates need."""
    optimizer, scheduler = make_optimizer(s.policy.parameters(), lr, s.cfg, total_steps, s.accelerator)
    return Learner(
        s.policy,
        optimizer,
        scheduler,
        s.accelerator,
        s.tokenizer.pad_token_id,
        s.cfg.train.micro_batch_tokens,
        s.cfg.optim.grad_clip,
        s.counters,
        s.cfg.train.max_bad_steps,
        s.cfg.train.logit_chunk_tokens,
    )


def release_learner(s: Session, learner: Learner) -> None:
    """Free a finished stage's optimizer state (AdamW's two moments: twice the trainable
    weights in fp32). accelerate keeps every prepared optimizer in a list, so without this
    stage 1's moments stay alive through stage 2."""
    learner.optimizer.zero_grad(set_to_none=True)
    learner.optimizer.state.clear()
    prepared = getattr(s.accelerator, "_optimizers", None)
    if isinstance(prepared, list):
        prepared[:] = [o for o in prepared if o is not learner.optimizer]
    give_back_freed_memory()


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; a no-op elsewhere).

    A step allocates and frees gigabytes of activations on the CPU; glibc keeps much of what
    was freed in its arenas, so resident memory sat at 2-3x the live tensors between steps
    (bench/memory.py). Trimming once a step costs milliseconds."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def run_stage(s: Session, stage: str, start_step: int, total: int, step_fn, learner: Learner, reference=None) -> None:
    """Steps start_step+1..total with logging, periodic eval, checkpoints and signals."""
    cfg = s.cfg
    s.logger.truncate_after(stage, start_step)
    if s.is_main:
        _truncate_samples(s.run_dir / "samples.jsonl", start_step if stage == "rl" else 0)
    bar = tqdm(
        range(start_step + 1, total + 1),
        desc=f"{stage}",
        disable=not (cfg.log.progress and s.is_main),
        initial=start_step,
        total=total,
    )
    optimizer, scheduler = learner.optimizer, learner.scheduler
    guard = StepGuard(optimizer)
    for step in bar:
        record = {
            "stage": stage,
            "step": step,
            **run_step(s, stage, step, step_fn, guard, optimizer, scheduler, reference),
        }
        give_back_freed_memory()
        if s.is_main:
            s.logger.log(record)
            bar.set_postfix_str(console_line(record).split(" | ", 1)[-1])
            log.info(console_line(record))
        if stage == "rl" and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != total:
            evaluate(s, f"step{step}", step)
        bad = s.counters["bad_streak"] >= cfg.train.max_bad_steps
        stop = s.stop_requested if s.accelerator.num_processes == 1 else global_sum(s, [float(s.stop_requested)])[0] > 0
        due = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if due or step == total or stop or bad:
            save(s, stage, step, optimizer, scheduler, reference)
        if bad:
            raise NonFiniteError(
                f"{cfg.train.max_bad_steps} updates in a row had a non-finite loss or gradient (stage {stage}, step "
                f"{step}); "
                "stopped. The last good weights are saved in "
                f"{s.run_dir / 'checkpoints' / ckpt.checkpoint_name(stage, step)}. "
                "Lower the learning rate or check the data, then continue with --resume."
            )
        if stop:
            raise StopRequested(stage, step)
    guard.close()


def _truncate_samples(path: Path, last_step: int) -> None:
    """Drop sample lines of RL steps after `last_step`, written before a kill (resume rewrites them)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _sample_step(line) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _sample_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a line cut by the kill


# ----------------------------------------------------------------------------- evaluation


def evaluate(s: Session, tag: str, step: int) -> dict:
    """Greedy accuracy per expert on the held-out split (main process), logged and saved.

    With eval.samples > 0 also pass@k, compute-matched coverage and zero-signal estimates.
    Records go to <run>/eval/<tag>.jsonl, one line per question.
    """
    summary: dict = {}
    if s.is_main:
        t0 = time.perf_counter()
        summary, records = evaluate_examples(
            s.evaluator(), s.eval_examples, s.cfg.eval, s.cfg.rollout.num_generations_per_expert, s.cfg.seed
        )
        summary["eval_time_s"] = time.perf_counter() - t0
        s.logger.log({"stage": "eval", "tag": tag, "step": step, **summary})
        path = s.run_dir / "eval" / f"{tag}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records_as_dicts(records)))
        log.info("eval %s: %s", tag, ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("acc/")))
        give_back_freed_memory()
    s.accelerator.wait_for_everyone()
    return summary


def report_accuracy(results: dict) -> None:
    if not results:
        return
    keys = sorted({k for r in results.values() for k in r if k.startswith("acc/")})
    lines = ["held-out greedy accuracy:", f"  {'':16s}" + "".join(f"{tag:>10s}" for tag in results)]
    for k in keys:
        lines.append(f"  {k:16s}" + "".join(f"{results[tag].get(k, float('nan')):10.3f}" for tag in results))
    print("\n".join(lines), flush=True)
