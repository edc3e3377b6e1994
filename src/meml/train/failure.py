"""A step that fails with an unexpected error: where it failed, what could be saved, how to go on.

A step changes the weights, the optimizer and the scheduler only once the optimizer steps;
before that only the RNG states, the HSFT buffer and the counters. `StepGuard` copies
those at the start of each step and watches the optimizer, so a step that fails before its
update is rewound and the state at the end of the step before it is saved; one that fails
in or after its update saves nothing (the previous weights are gone) and says so.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from meml.train import checkpoint as ckpt
from meml.train.run_state import save
from meml.train.session import Session, rng_state, set_rng_state

log = logging.getLogger("meml")


class StepFailed(RuntimeError):
    """A step raised an unexpected error; the message says where, what was saved and how to go on."""

    def __init__(self, message: str, stage: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


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


def step_failed(
    s: Session, stage: str, step: int, exc: Exception, guard: StepGuard, optimizer, scheduler, reference
) -> StepFailed:
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
        when = (
            "in or after the optimizer update"
            if guard.updated
            else "at a point where it cannot be told whether the weights had changed"
        )
        note = (
            f"No checkpoint was saved: the failure came {when} of step {step}, "
            f"so the state at the end of step {previous} is no longer whole"
        )
    else:
        guard.rewind(s)  # weights, optimizer and scheduler are untouched: only these had moved
        try:
            save(s, stage, previous, optimizer, scheduler, reference)
            saved, note = (
                path,
                f"Saved the state at the end of {stage} step {previous} (before the failed step) in {path}",
            )
        except Exception as save_exc:  # noqa: BLE001 - the original failure is what matters
            log.error("could not save a checkpoint after the failure: %s", save_exc)
            note = f"A checkpoint of {stage} step {previous} could not be written ({save_exc})"
    existing = ckpt.list_checkpoints(s.run_dir)
    if saved is not None or existing:
        how = (
            f"Fix the cause, then continue from {(saved or existing[-1]).name} with: meml train --resume "
            f"output_dir={s.run_dir} "
            "(and the same settings)"
        )
    else:
        how = (
            "There is no checkpoint: fix the cause, then start again "
            f"(meml train --resume output_dir={s.run_dir} starts afresh)"
        )
    return StepFailed(
        f"{stage} step {step} failed{_where(exc)}: {type(exc).__name__}: {exc}. {note}. {how}", stage, step, saved
    )


def _where(exc: BaseException) -> str:
    """' at train/rl_step.py:85 in roll_out (innermost: .../module.py:1751 in forward)': the last frame
    of this package in the traceback, and the frame that raised when it is elsewhere."""
    frames = traceback.extract_tb(exc.__traceback__)
    package = Path(__file__).resolve().parents[1]  # src/meml
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(package)]
    parts = []
    if ours:
        parts.append(
            f" at {Path(ours[-1].filename).resolve().relative_to(package)}:{ours[-1].lineno} in {ours[-1].name}"
        )
    if frames and (not ours or frames[-1] is not ours[-1]):
        last = frames[-1]
        parts.append(f" ({'innermost: ' if ours else 'at '}{last.filename}:{last.lineno} in {last.name})")
    return "".join(parts)
