"""A run's directory: refusing one that holds an earlier run, replacing it (--overwrite),
finding the checkpoint to resume (--resume), and what an earlier start already logged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from meml.core.config import Config
from meml.core.errors import ConfigError
from meml.core.load import to_dict
from meml.train import checkpoint as ckpt
from meml.train.session import Session

log = logging.getLogger("meml")


# What a run (`meml train`/`sft`) or an evaluation (`meml eval`) writes into its directory;
# only these, and checkpoint directories, are ever removed by --overwrite or a restart.
RUN_FILES = (
    "config.yaml",
    "command.txt",
    "metrics.jsonl",
    "samples.jsonl",
    "results.json",
    "eval",
    "tensorboard",
    "wandb",
)
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
            raise ConfigError(
                "--overwrite starts a run afresh; it cannot be combined with --resume (checkpoint.resume)"
            )
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
                f"output_dir {run_dir} already holds files of an earlier run ({_names(earlier, run_dir)}); continue "
                "that run "
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
                raise ConfigError(
                    f"checkpoint.resume=auto: no valid checkpoint in {run_dir / 'checkpoints'} (reasons above)"
                )
            evals = [run_dir / n for n in EVAL_FILES if (run_dir / n).exists()]
            if evals:
                raise ConfigError(
                    f"output_dir {run_dir} holds the output of `meml eval` ({_names(evals, run_dir)}), not a run to "
                    "resume; choose another output_dir, or replace it with --overwrite"
                )
            if earlier_run_files(run_dir):  # a start killed before its first checkpoint: redo it, logs and all
                remove_run_files(
                    run_dir, "checkpoint.resume=auto: no checkpoint yet, so the run starts again from scratch"
                )
            else:
                log.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", run_dir)
            return None
    else:
        found = Path(cfg.checkpoint.resume)
        reason = ckpt.validate_checkpoint(found)
        if reason:
            raise ConfigError(f"checkpoint.resume={found}: not a valid checkpoint ({reason})")
        if found.parent != run_dir / "checkpoints" and (earlier := earlier_run_files(run_dir)):
            raise ConfigError(
                f"output_dir {run_dir} already holds files of another run ({_names(earlier, run_dir)}); "
                "choose a new output_dir"
            )
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
