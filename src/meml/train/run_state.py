"""The state a run resumes from: what `save` writes into a checkpoint (train/checkpoint.py
writes the files) and `restore` puts back, so that a resumed run replays exactly."""

from __future__ import annotations

import logging

from meml.core.load import to_yaml
from meml.train import checkpoint as ckpt
from meml.train import sft as mef
from meml.train.session import Session, rng_state, set_rng_state, sharded

log = logging.getLogger("meml")


def save(s: Session, stage: str, step: int, optimizer, scheduler, reference=None) -> None:
    """A checkpoint of everything the next step depends on (main process writes it)."""
    state = {
        "stage": stage,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "buffer": s.buffer.state_dict(),
        "counters": dict(s.counters),
        "position": _position(s, stage, step),
    }
    if s.budget is not None:  # the adaptive expert budget's success averages
        state["budget"] = s.budget.state_dict()
    if reference is not None:  # only what training changes (the adapter under LoRA)
        trainable = {n for n, p in s.unwrapped.named_parameters() if p.requires_grad}
        state["reference"] = {n: p.detach().cpu().clone() for n, p in reference.named_parameters() if n in trainable}
    s.accelerator.wait_for_everyone()
    model_state = s.accelerator.get_state_dict(s.policy) if sharded(s.accelerator) else None  # collective: full weights
    if s.is_main:
        path = ckpt.save_checkpoint(
            s.run_dir,
            stage,
            step,
            s.unwrapped,
            s.tokenizer,
            state,
            to_yaml(s.cfg),
            s.cfg.checkpoint.keep_last,
            model_state,
        )
        log.info("saved checkpoint %s", path)
    s.accelerator.wait_for_everyone()


def _position(s: Session, stage: str, step: int) -> dict:
    """Where the data stands, for inspection: the next batch is derived from (seed, step) anyway."""
    if stage == "rl":
        seen = step * s.cfg.train.questions_per_step
        return {"questions_seen": seen, "epoch": seen // max(1, len(s.train_examples))}
    per_epoch = mef.steps_per_epoch(
        len(mef.trace_keys(s.traces, s.experts, s.cfg.sft.experts)), s.cfg.sft.sequences_per_step
    )
    return {"batches_seen": step, "epoch": step // per_epoch}


def restore(s: Session, state: dict, optimizer, scheduler) -> None:
    """Put back what `save` wrote. Called after everything that draws random numbers at
    setup (model init, LoRA init, optimizer), so the RNG state is the one saved."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    s.buffer.load_state_dict(state["buffer"])
    s.counters.update(state["counters"])
    if s.budget is not None and "budget" in state:
        s.budget.load_state_dict(state["budget"])
    set_rng_state(state["rng"])
