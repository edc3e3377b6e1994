"""The training loop: stage 1 (MEF) then stage 2 (RIEL, or GRPO / Dr.GRPO with one expert).

    meml train [preset] [key=value ...]

`train` validates and loads everything (data before the model), evaluates, runs the
configured stages and evaluates again. `run_stage` is the loop both stages share:
step, log, periodic eval, checkpoint, and a clean stop on SIGTERM/SIGINT or after too
many non-finite updates. One RL step is `meml.riel.rl_step`; one MEF step is below.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from tqdm.auto import tqdm

from meml import checkpoint as ckpt
from meml import sft as mef
from meml.config import Config, to_yaml
from meml.evaluation import greedy_eval, records_as_dicts
from meml.experts import response_ids
from meml.logger import console_line
from meml.model import frozen_copy
from meml.riel import rl_step
from meml.session import (
    Session,
    attach_model,
    global_sum,
    make_optimizer,
    open_session,
    rng_state,
    set_rng_state,
)
from meml.update import LossSettings, NonFiniteError, optimizer_step

log = logging.getLogger("meml")


class StopRequested(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the step."""


# ----------------------------------------------------------------------------- entry point


def train(cfg: Config, preset: str | None = None) -> dict:
    """Run the configured stages; returns held-out accuracy before and after."""
    s = open_session(cfg, preset, load_model=False)  # config, data and rewards checked first
    resume = find_resume_checkpoint(cfg, s.run_dir)
    manifest = ckpt.read_manifest(resume) if resume else None
    attach_model(s, source=str(resume / "model") if resume and not cfg.model.lora.enabled else None)
    if resume and cfg.model.lora.enabled:
        load_adapter(s, resume / "model")
    install_signal_handlers(s)
    results: dict = {}
    if s.is_main:
        log.info("run directory: %s\n%s", s.run_dir, to_yaml(cfg))
    if cfg.eval.before and not resume:
        results["before"] = evaluate(s, "before", step=0)
    try:
        stage, step = (manifest["stage"], manifest["step"]) if manifest else (None, 0)
        if cfg.sft.enabled and stage in (None, "sft"):
            run_mef(s, start_step=step if stage == "sft" else 0, state=_state(resume) if stage == "sft" else None)
        if cfg.train.steps > 0:
            run_rl(s, start_step=step if stage == "rl" else 0, state=_state(resume) if stage == "rl" else None)
    except StopRequested:
        log.warning("stopped on request; resume with checkpoint.resume=auto output_dir=%s", s.run_dir)
        s.logger.close()
        return results
    if cfg.eval.after:
        results["after"] = evaluate(s, "after", step=cfg.train.steps)
    if s.is_main:
        report_accuracy(results)
        (s.run_dir / "results.json").write_text(json.dumps(results, indent=1))
    s.logger.close()
    return results


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        if not cfg.output_dir:
            raise ValueError("checkpoint.resume=auto needs output_dir=<the run directory to resume>")
        found = ckpt.find_latest(run_dir)
        if found is None:
            log.info("checkpoint.resume=auto: no valid checkpoint in %s, starting fresh", run_dir)
        return found
    path = Path(cfg.checkpoint.resume)
    reason = ckpt.validate_checkpoint(path)
    if reason:
        raise ValueError(f"checkpoint.resume={path}: not a valid checkpoint ({reason})")
    return path


def _state(path: Path | None) -> dict | None:
    return ckpt.load_trainer_state(path) if path else None


def load_adapter(s: Session, path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(s.unwrapped, load_file(str(path / "adapter_model.safetensors")))
    s.engine.sync_weights(s.unwrapped)


def install_signal_handlers(s: Session) -> None:
    def request_stop(signum, _frame):
        if s.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received signal %d: finishing this step, saving a checkpoint, then exiting", signum)
        s.stop_requested = True

    try:
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread (e.g. under some test runners)
        pass


# ----------------------------------------------------------------------------- stages


def run_mef(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 1: SFT on every expert's traces."""
    cfg = s.cfg
    keys = mef.trace_keys(s)
    total = mef.total_steps(s)
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.sft.lr, cfg, total)
    if state:
        restore(s, state, optimizer, scheduler)
    if s.is_main:
        log.info("stage 1 (MEF): %d traces, %d steps; traces per expert: %s", len(keys), total, s.trace_report)

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        batch = mef.batch_keys(keys, step - 1, cfg.sft.batch_size, cfg.seed)
        local = batch[s.accelerator.process_index :: s.accelerator.num_processes]
        tokens = sum(len(response_ids(s.tokenizer, s.traces[k])) for k in local)
        global_tokens = int(global_sum(s, [tokens])[0])
        stats = optimizer_step(s, optimizer, scheduler, mef.sft_items(s, local, global_tokens), LossSettings())
        dt = time.perf_counter() - t0
        return {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": stats["lr"], "skipped": stats["skipped"],
                "tokens": global_tokens, "tokens_per_s": global_tokens / dt, "step_time_s": dt}

    run_stage(s, "sft", start_step, total, step_fn, optimizer, scheduler)


def run_rl(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 2: RIEL (or GRPO / Dr.GRPO when there is one expert and IML/HSFT are off)."""
    cfg = s.cfg
    world = s.accelerator.num_processes
    if cfg.train.questions_per_step % world:
        raise ValueError(f"train.questions_per_step={cfg.train.questions_per_step} must be divisible by the {world} processes")
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.optim.lr, cfg, cfg.train.steps)
    if state:
        restore(s, state, optimizer, scheduler)
    reference = frozen_copy(s.unwrapped) if cfg.algo.kl_coef > 0 else None  # only when the KL term is on
    if s.is_main:
        log.info("stage 2 (RL): %d steps x %d questions x %d experts x %d answers", cfg.train.steps,
                 cfg.train.questions_per_step, len(s.experts), cfg.rollout.num_generations_per_expert)
    run_stage(s, "rl", start_step, cfg.train.steps, lambda step: rl_step(s, step, optimizer, scheduler, reference), optimizer, scheduler)


def run_stage(s: Session, stage: str, start_step: int, total: int, step_fn, optimizer, scheduler) -> None:
    """Steps start_step+1..total with logging, periodic eval, checkpoints and signals."""
    cfg = s.cfg
    s.logger.truncate_after(stage, start_step)
    bar = tqdm(range(start_step + 1, total + 1), desc=f"{stage}", disable=not (cfg.log.progress and s.is_main), initial=start_step, total=total)
    for step in bar:
        record = {"stage": stage, "step": step, **step_fn(step)}
        if s.is_main:
            s.logger.log(record)
            bar.set_postfix_str(console_line(record).split(" | ", 1)[-1])
            log.info(console_line(record))
        if stage == "rl" and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != total:
            evaluate(s, f"step{step}", step)
        bad = s.counters["bad_streak"] >= cfg.train.max_bad_steps
        due = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if due or step == total or s.stop_requested or bad:
            save(s, stage, step, optimizer, scheduler)
        if bad:
            raise NonFiniteError(
                f"{cfg.train.max_bad_steps} updates in a row had a non-finite loss or gradient (stage {stage}, step {step}); "
                f"the last good weights are saved in {s.run_dir / 'checkpoints'}. Lower the learning rate or check the data."
            )
        if s.stop_requested:
            raise StopRequested(stage)


def save(s: Session, stage: str, step: int, optimizer, scheduler) -> None:
    state = {"stage": stage, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "buffer": s.buffer.state_dict(), "counters": dict(s.counters)}
    s.accelerator.wait_for_everyone()
    if s.is_main:
        path = ckpt.save_checkpoint(s.run_dir, stage, step, s.unwrapped, s.tokenizer, state, to_yaml(s.cfg), s.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)
    s.accelerator.wait_for_everyone()


def restore(s: Session, state: dict, optimizer, scheduler) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    s.buffer.load_state_dict(state["buffer"])
    s.counters.update(state["counters"])


# ----------------------------------------------------------------------------- evaluation


def evaluate(s: Session, tag: str, step: int) -> dict:
    """Greedy accuracy per expert on the held-out split (main process), logged and saved.

    With eval.samples > 0 also pass@k, compute-matched coverage and zero-signal estimates.
    Records go to <run>/eval/<tag>.jsonl, one line per question.
    """
    summary: dict = {}
    if s.is_main:
        t0 = time.perf_counter()
        summary, records = greedy_eval(s, s.eval_examples, s.cfg.eval.max_new_tokens, samples=s.cfg.eval.samples)
        summary["eval_time_s"] = time.perf_counter() - t0
        s.logger.log({"stage": "eval", "tag": tag, "step": step, **summary})
        path = s.run_dir / "eval" / f"{tag}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records_as_dicts(records)))
        log.info("eval %s: %s", tag, ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("acc/")))
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
