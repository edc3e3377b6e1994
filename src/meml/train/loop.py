"""The training loop: stage 1 (MEF) then stage 2 (RIEL, or GRPO / Dr.GRPO with one expert).

    meml train [preset] [key=value ...]

`train` validates and loads everything (data before the model), evaluates, runs the
configured stages and evaluates again. `run_stage` is the loop both stages share:
step, log, periodic eval, checkpoint, and a clean stop on SIGTERM/SIGINT or after too
many non-finite updates. A step that fails with an unexpected error stops the run with
`StepFailed`, after saving the state of the step before it where that state is intact.
One RL step is `meml.train.rl_step.rl_step`; one MEF step is below.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from meml.core.config import Config
from meml.core.errors import ConfigError
from meml.core.load import to_dict, to_yaml
from meml.engines.model import frozen_copy
from meml.eval.evaluate import greedy_eval, records_as_dicts
from meml.tasks.experts import response_ids
from meml.train import checkpoint as ckpt
from meml.train import sft as mef
from meml.train.logger import console_line
from meml.train.rl_step import rl_step
from meml.train.session import (
    Session,
    attach_model,
    check_resume_model,
    global_sum,
    make_optimizer,
    open_session,
    rng_state,
    set_rng_state,
    sharded,
    sync_rollout_weights,
)
from meml.train.update import LossSettings, NonFiniteError, optimizer_step

log = logging.getLogger("meml")


class StopRequested(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the step."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"stopped on request after {stage} step {step}")
        self.stage, self.step = stage, step


class StepFailed(RuntimeError):
    """A step raised an unexpected error; the message says where, what was saved and how to go on."""

    def __init__(self, message: str, stage: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


class Interrupted(KeyboardInterrupt):
    """A second SIGTERM/SIGINT: stop at once, without saving (the last checkpoint stands)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second signal {signal.Signals(signum).name}")
        self.signum = signum


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
    s = open_session(cfg, preset, load_model=False)  # config, data and rewards checked first
    resume = find_resume_checkpoint(cfg, s.run_dir, overwrite)
    check_resume_model(cfg, resume)  # a LoRA checkpoint needs model.lora.enabled=true, a full one false
    ckpt.check_writable(s.run_dir)  # before the model loads: an unwritable output_dir costs nothing
    manifest = ckpt.read_manifest(resume) if resume else None
    attach_model(s, source=str(resume / "model") if resume and not cfg.model.lora.enabled else None)
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
        log.warning("stopped after %s step %d; continue with: meml train --resume output_dir=%s (and the same settings)",
                    stop.stage, stop.step, s.run_dir)
    finally:
        signals.restore()
        s.logger.close()
    return results


# What a run (`meml train`/`sft`) or an evaluation (`meml eval`) writes into its directory;
# only these, and checkpoint directories, are ever removed by --overwrite or a restart.
RUN_FILES = ("config.yaml", "command.txt", "metrics.jsonl", "samples.jsonl", "results.json", "eval", "tensorboard", "wandb")
EVAL_FILES = ("records.jsonl", "summary.json", "eval_settings.json")


def earlier_run_files(run_dir: Path) -> list[Path]:
    """The files an earlier run or evaluation left in run_dir (an empty checkpoints/ is none)."""
    found = [run_dir / name for name in (*RUN_FILES, *EVAL_FILES) if (run_dir / name).exists()]
    root = run_dir / "checkpoints"
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if ckpt.NAME.match(p.name) or p.name.startswith((".tmp-", ".old-")))
    return found


def remove_run_files(run_dir: Path, why: str) -> None:
    """Delete what `earlier_run_files` lists, saying so; anything else in run_dir stays."""
    found = earlier_run_files(run_dir)
    if not found:
        return
    log.warning("%s: removing %s from %s", why, ", ".join(str(p.relative_to(run_dir)) for p in found), run_dir)
    for path in found:  # every process may do this at once: a path already gone is fine
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _names(paths: list[Path], run_dir: Path) -> str:
    names = [str(p.relative_to(run_dir)) for p in paths]
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def find_resume_checkpoint(cfg: Config, run_dir: Path, overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from (None: start fresh), validated; strays are cleaned.

    A fresh run refuses an output_dir that already holds an earlier run's files
    (checkpoints, logs, results, eval records): its saves would prune the checkpoints, its
    logs would mix with theirs and its results overwrite them. `overwrite` removes those
    files first. Resuming (auto) where the earlier start left files but no checkpoint
    removes them too: that start is redone from scratch.
    """
    existing = ckpt.list_checkpoints(run_dir)
    if overwrite:
        if cfg.checkpoint.resume != "none":
            raise ConfigError("--overwrite starts a run afresh; it cannot be combined with --resume (checkpoint.resume)")
        if not cfg.output_dir:
            raise ConfigError("--overwrite needs output_dir=<the run directory to replace>")
        remove_run_files(run_dir, "--overwrite")
        return None
    if cfg.checkpoint.resume == "none":
        if existing:
            raise ConfigError(
                f"output_dir {run_dir} already holds checkpoints (newest {existing[-1].name}); continue that run with "
                "--resume (checkpoint.resume=auto), replace it with --overwrite, or choose a new output_dir"
            )
        if earlier := earlier_run_files(run_dir):
            raise ConfigError(
                f"output_dir {run_dir} already holds files of an earlier run ({_names(earlier, run_dir)}); continue that run "
                "with --resume (checkpoint.resume=auto), replace it with --overwrite, or choose a new output_dir"
            )
        return None
    if cfg.checkpoint.resume == "auto":
        if not cfg.output_dir:
            raise ConfigError("checkpoint.resume=auto (--resume) needs output_dir=<the run directory to resume>")
        ckpt.clean_strays(run_dir)
        found = ckpt.find_latest(run_dir)
        if found is None:
            if existing:
                raise ConfigError(f"checkpoint.resume=auto: no valid checkpoint in {run_dir / 'checkpoints'} (reasons above)")
            evals = [run_dir / n for n in EVAL_FILES if (run_dir / n).exists()]
            if evals:
                raise ConfigError(f"output_dir {run_dir} holds the output of `meml eval` ({_names(evals, run_dir)}), not a run to "
                                  "resume; choose another output_dir, or replace it with --overwrite")
            if earlier_run_files(run_dir):  # a start killed before its first checkpoint: redo it, logs and all
                remove_run_files(run_dir, "checkpoint.resume=auto: no checkpoint yet, so the run starts again from scratch")
            else:
                log.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
            return None
    else:
        found = Path(cfg.checkpoint.resume)
        reason = ckpt.validate_checkpoint(found)
        if reason:
            raise ConfigError(f"checkpoint.resume={found}: not a valid checkpoint ({reason})")
        if found.parent != run_dir / "checkpoints" and (earlier := earlier_run_files(run_dir)):
            raise ConfigError(f"output_dir {run_dir} already holds files of another run ({_names(earlier, run_dir)}); "
                              "choose a new output_dir")
        ckpt.clean_strays(run_dir)
    manifest = ckpt.read_manifest(found)
    log.info("resuming from %s (%s step %d)", found, manifest["stage"], manifest["step"])
    changed = ckpt.config_changes(found, to_dict(cfg))
    if changed:
        log.warning("resuming with a changed config (an exact replay needs the same one): %s", "; ".join(changed))
    return found


def _state(path: Path | None) -> dict | None:
    return ckpt.load_trainer_state(path) if path else None


def _logged_eval(s: Session, tag: str) -> dict | None:
    """An eval summary an earlier start of this run logged (resume skips re-evaluating it)."""
    path = s.run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("stage") == "eval" and rec.get("tag") == tag:
            return {k: v for k, v in rec.items() if k not in ("stage", "tag", "step")}
    return None


def _warn_if_low_space(s: Session) -> None:
    params = list(s.unwrapped.parameters())
    trainable = sum(p.numel() * 4 for p in params if p.requires_grad)  # fp32 master copy
    weights = trainable if s.cfg.model.lora.enabled else sum(p.numel() * p.element_size() for p in params)
    ckpt.warn_if_low_space(s.run_dir, weights + 2 * trainable, s.cfg.checkpoint.keep_last)  # + AdamW's two moments


def load_adapter(s: Session, path: Path) -> None:
    """Under LoRA a checkpoint holds only the adapter: load it onto the freshly built one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(s.unwrapped, load_file(str(path / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"{path}: adapter weights that fit no LoRA module of this model: {result.unexpected_keys[:5]}")
    sync_rollout_weights(s)


class StopSignals:
    """Handlers for SIGTERM and SIGINT during a run.

    The first signal sets s.stop_requested: the step finishes, a checkpoint is saved and the
    run stops. A second one raises `Interrupted` at once (nothing more is saved; a
    checkpoint being written is abandoned and its temporary directory removed).
    `restore` puts back the handlers that were there before.
    """

    def __init__(self, s: Session):
        self.s, self.signum, self._previous = s, 0, {}

    def __call__(self, signum, _frame) -> None:
        if self.s.stop_requested:
            raise Interrupted(signum)
        self.signum = signum
        self.s.stop_requested = True
        log.warning("received %s: finishing this step, saving a checkpoint, then exiting (send it again to stop at once)",
                    signal.Signals(signum).name)

    def install(self) -> StopSignals:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def install_signal_handlers(s: Session) -> StopSignals:
    return StopSignals(s).install()


# ----------------------------------------------------------------------------- stages


def run_mef(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 1: SFT on every expert's traces."""
    cfg = s.cfg
    keys = mef.trace_keys(s)
    total = mef.total_steps(s)
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.sft.lr, cfg, total, s.accelerator)
    if state:
        restore(s, state, optimizer, scheduler)
    if s.is_main:
        log.info("stage 1 (MEF): %d traces, %d steps; traces per expert: %s", len(keys), total, s.trace_report)

    def step_fn(step: int) -> dict:
        t0 = time.perf_counter()
        batch = mef.batch_keys(keys, step - 1, cfg.sft.sequences_per_step, cfg.seed)
        local = batch[s.accelerator.process_index :: s.accelerator.num_processes]
        tokens = sum(len(response_ids(s.tokenizer, s.traces[k])) for k in local)
        global_tokens = int(global_sum(s, [tokens])[0])
        stats = optimizer_step(s, optimizer, scheduler, mef.sft_items(s, local, global_tokens), LossSettings())
        dt = time.perf_counter() - t0
        return {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": stats["lr"], "skipped_updates": stats["skipped"],
                "tokens": global_tokens, "tokens_per_s": global_tokens / dt, "step_time_s": dt}

    run_stage(s, "sft", start_step, total, step_fn, optimizer, scheduler)
    # The engine's own (bf16) copy of the weights is not updated by stage-1 steps: refresh it
    # before RL samples or an evaluation generates, else they would use the pre-MEF model.
    sync_rollout_weights(s)


def run_rl(s: Session, start_step: int = 0, state: dict | None = None) -> None:
    """Stage 2: RIEL (or GRPO / Dr.GRPO when there is one expert and IML/HSFT are off)."""
    cfg = s.cfg
    world = s.accelerator.num_processes
    if cfg.train.questions_per_step % world:
        raise ValueError(f"train.questions_per_step={cfg.train.questions_per_step} must be divisible by the {world} processes")
    optimizer, scheduler = make_optimizer(s.policy.parameters(), cfg.optim.lr, cfg, cfg.train.steps, s.accelerator)
    if state:
        restore(s, state, optimizer, scheduler)
    # The KL reference is the policy when RL started (after MEF); a resumed run gets it back
    # from the checkpoint, since the policy it loaded has moved on.
    reference = frozen_copy(s.unwrapped) if cfg.algo.kl_coef > 0 else None
    if reference is not None and state:
        if "reference" not in state:
            log.warning("the checkpoint holds no KL reference (saved with algo.kl_coef=0); the resumed weights become it")
        else:
            ref_params = dict(reference.named_parameters())
            with torch.no_grad():
                for name, value in state["reference"].items():
                    ref_params[name].copy_(value)
    if s.is_main:
        log.info("stage 2 (RL): %d steps x %d questions x %d experts x %d answers", cfg.train.steps,
                 cfg.train.questions_per_step, len(s.experts), cfg.rollout.num_generations_per_expert)
    run_stage(s, "rl", start_step, cfg.train.steps, lambda step: rl_step(s, step, optimizer, scheduler, reference),
              optimizer, scheduler, reference)


def run_stage(s: Session, stage: str, start_step: int, total: int, step_fn, optimizer, scheduler, reference=None) -> None:
    """Steps start_step+1..total with logging, periodic eval, checkpoints and signals."""
    cfg = s.cfg
    s.logger.truncate_after(stage, start_step)
    if s.is_main:
        _truncate_samples(s.run_dir / "samples.jsonl", start_step if stage == "rl" else 0)
    bar = tqdm(range(start_step + 1, total + 1), desc=f"{stage}", disable=not (cfg.log.progress and s.is_main), initial=start_step, total=total)
    guard = StepGuard(optimizer)
    for step in bar:
        record = {"stage": stage, "step": step, **run_step(s, stage, step, step_fn, guard, optimizer, scheduler, reference)}
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
                f"{cfg.train.max_bad_steps} updates in a row had a non-finite loss or gradient (stage {stage}, step {step}); "
                f"stopped. The last good weights are saved in {s.run_dir / 'checkpoints' / ckpt.checkpoint_name(stage, step)}. "
                "Lower the learning rate or check the data, then continue with --resume."
            )
        if stop:
            raise StopRequested(stage, step)
    guard.close()


class StepGuard:
    """What a failed step needs to save the state at the end of the step before it.

    A step changes the weights, the optimizer and the scheduler only once the optimizer
    steps; before that it changes only the RNG states, the HSFT buffer and the counters,
    which `begin` copies at the start of each step (kilobytes). So a step that fails before
    its update can be rewound exactly to where the previous step ended; one that fails in
    or after its update cannot, since the previous weights and moments are gone.
    """

    def __init__(self, optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the torch optimizer inside it
        register = getattr(inner, "register_step_pre_hook", None)
        self._handle = register(self._updating) if register is not None else None
        self.updated: bool | None = None  # None: cannot tell (no hook), so never rewound
        self._state: dict = {}

    def _updating(self, *_args) -> None:
        self.updated = True

    def begin(self, s: Session) -> None:
        if self._handle is not None:
            self.updated = False
        self._state = {"rng": rng_state(), "buffer": s.buffer.state_dict(), "counters": dict(s.counters)}

    def rewind(self, s: Session) -> None:
        s.buffer.load_state_dict(self._state["buffer"])
        s.counters.clear()
        s.counters.update(self._state["counters"])
        set_rng_state(self._state["rng"])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def run_step(s: Session, stage: str, step: int, step_fn, guard: StepGuard, optimizer, scheduler, reference) -> dict:
    """step_fn(step); an unexpected error in it becomes `StepFailed` (KeyboardInterrupt and
    the signals' `Interrupted` pass through untouched)."""
    guard.begin(s)
    try:
        return step_fn(step)
    except Exception as exc:  # noqa: BLE001 - a bug, a model error...: say where, keep what can be kept
        raise step_failed(s, stage, step, exc, guard, optimizer, scheduler, reference) from exc


def step_failed(s: Session, stage: str, step: int, exc: Exception, guard: StepGuard, optimizer, scheduler, reference) -> StepFailed:
    """Log the traceback, save the previous step's state if it is intact, and say how to go on."""
    log.error("%s step %d failed:", stage, step, exc_info=exc)
    previous, saved = step - 1, None
    path = s.run_dir / "checkpoints" / ckpt.checkpoint_name(stage, max(previous, 0))
    if previous == 0:
        note = f"No {stage} step of this start had finished, so there was nothing new to save"
    elif ckpt.validate_checkpoint(path, deep=False) is None:
        saved, note = path, f"The state at the end of {stage} step {previous} is in {path}"
    elif s.accelerator.num_processes > 1:
        note = f"No checkpoint was saved: with {s.accelerator.num_processes} processes a save needs all of them"
    elif guard.updated is not False:
        note = (f"No checkpoint was saved: the failure came {'in or after the optimizer update' if guard.updated else 'at a point where it cannot be told whether the weights had changed'} "
                f"of step {step}, so the state at the end of step {previous} is no longer whole")
    else:
        guard.rewind(s)  # weights, optimizer and scheduler are untouched: only these had moved
        try:
            save(s, stage, previous, optimizer, scheduler, reference)
            saved, note = path, f"Saved the state at the end of {stage} step {previous} (before the failed step) in {path}"
        except Exception as save_exc:  # noqa: BLE001 - the original failure is what matters
            log.error("could not save a checkpoint after the failure: %s", save_exc)
            note = f"A checkpoint of {stage} step {previous} could not be written ({save_exc})"
    existing = ckpt.list_checkpoints(s.run_dir)
    if saved is not None or existing:
        how = (f"Fix the cause, then continue from {(saved or existing[-1]).name} with: meml train --resume output_dir={s.run_dir} "
               "(and the same settings)")
    else:
        how = f"There is no checkpoint: fix the cause, then start again (meml train --resume output_dir={s.run_dir} starts afresh)"
    return StepFailed(f"{stage} step {step} failed{_where(exc)}: {type(exc).__name__}: {exc}. {note}. {how}", stage, step, saved)


def _where(exc: BaseException) -> str:
    """' at train/rl_step.py:85 in roll_out (innermost: .../module.py:1751 in forward)': the last frame
    of this package in the traceback, and the frame that raised when it is elsewhere."""
    frames = traceback.extract_tb(exc.__traceback__)
    package = Path(__file__).resolve().parents[1]  # src/meml
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(package)]
    parts = []
    if ours:
        parts.append(f" at {Path(ours[-1].filename).resolve().relative_to(package)}:{ours[-1].lineno} in {ours[-1].name}")
    if frames and (not ours or frames[-1] is not ours[-1]):
        last = frames[-1]
        parts.append(f" ({'innermost: ' if ours else 'at '}{last.filename}:{last.lineno} in {last.name})")
    return "".join(parts)


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


def save(s: Session, stage: str, step: int, optimizer, scheduler, reference=None) -> None:
    """A checkpoint of everything the next step depends on (main process writes it)."""
    state = {"stage": stage, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "buffer": s.buffer.state_dict(), "counters": dict(s.counters), "position": _position(s, stage, step)}
    if reference is not None:  # only what training changes (the adapter under LoRA)
        trainable = {n for n, p in s.unwrapped.named_parameters() if p.requires_grad}
        state["reference"] = {n: p.detach().cpu().clone() for n, p in reference.named_parameters() if n in trainable}
    s.accelerator.wait_for_everyone()
    model_state = s.accelerator.get_state_dict(s.policy) if sharded(s) else None  # collective: full weights
    if s.is_main:
        path = ckpt.save_checkpoint(s.run_dir, stage, step, s.unwrapped, s.tokenizer, state, to_yaml(s.cfg), s.cfg.checkpoint.keep_last, model_state)
        log.info("saved checkpoint %s", path)
    s.accelerator.wait_for_everyone()


def _position(s: Session, stage: str, step: int) -> dict:
    """Where the data stands, for inspection: the next batch is derived from (seed, step) anyway."""
    if stage == "rl":
        seen = step * s.cfg.train.questions_per_step
        return {"questions_seen": seen, "epoch": seen // max(1, len(s.train_examples))}
    per_epoch = mef.steps_per_epoch(len(mef.trace_keys(s)), s.cfg.sft.sequences_per_step)
    return {"batches_seen": step, "epoch": step // per_epoch}


def restore(s: Session, state: dict, optimizer, scheduler) -> None:
    """Put back what `save` wrote. Called after everything that draws random numbers at
    setup (model init, LoRA init, optimizer), so the RNG state is the one saved."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    s.buffer.load_state_dict(state["buffer"])
    s.counters.update(state["counters"])
    set_rng_state(state["rng"])


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
