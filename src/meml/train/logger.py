"""Metrics sinks: JSONL (always), TensorBoard and Weights & Biases (optional), console.

Each record is flat: {"stage": "rl", "step": 3, "reward/mean": 0.25, ...}. Only the main
process writes. On resume, `truncate_after` drops records past the checkpoint's step so
the file reads as one uninterrupted run.

TensorBoard tags are "<stage>/<metric>" against the stage's own step. Weights & Biases
gets the same names with one step axis per stage ("rl/step", ...), so SFT, RL and eval
records never fight over wandb's global step; mode "offline" writes <run>/wandb/ and needs
no network (`wandb sync` uploads it later).
Opening a logger also appends the command line of the process to <run>/command.txt
(one line per start, so a resumed run shows both), which `meml report` shows.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from pathlib import Path

log = logging.getLogger("meml")

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.3f}"),
    ("zero_signal_frac", "zero", "{:.2f}"),
    ("loss", "loss", "{:+.4f}"),
    ("kl", "kl", "{:.4f}"),
    ("iml/fired", "iml", "{:.0f}"),
    ("hsft/buffer", "buf", "{:.0f}"),
    ("completion_len", "len", "{:.0f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("step_time_s", "s", "{:.1f}"),
]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        backends: list[str],
        config: dict,
        enabled: bool = True,
        wandb_project: str = "meml",
        wandb_mode: str = "offline",
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "command.txt").open("a") as f:
            f.write(command_line() + "\n")
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("log.backends has wandb but it is not installed: pip install 'meml[wandb]'") from exc
            self._wandb = wandb.init(
                project=wandb_project, dir=str(run_dir), config=config, mode=wandb_mode, name=run_dir.name
            )
            for axis in ("sft", "rl", "eval", "samples"):
                self._wandb.define_metric(f"{axis}/step")
                self._wandb.define_metric(f"{axis}/*", step_metric=f"{axis}/step")

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop records of `stage` beyond `step` (and of later stages) left by a killed run."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if _keep_on_resume(rec, stage, step):
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        step = record.get("step", 0)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        prefix = record.get("stage", "rl")
        if self._tb is not None:
            for k, v in numeric.items():
                if k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({**{f"{prefix}/{k}": v for k, v in numeric.items() if k != "step"}, f"{prefix}/step": step})

    def log_text(self, name: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(name, text, step)
        if self._wandb is not None:
            self._wandb.log({f"samples/{name.removeprefix('samples/')}": text, "samples/step": step})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _keep_on_resume(rec: dict, stage: str, step: int) -> bool:
    """Whether a record written before a kill stays when `stage` resumes after `step`.

    Eval records belong to the RL timeline (their step is an RL step), except "before",
    which precedes both stages; "after" always goes, since the resumed run writes it again.
    """
    order = {"sft": 0, "rl": 1}
    rec_stage = rec.get("stage", "rl")
    if rec_stage == "eval":
        tag = rec.get("tag")
        return tag == "before" or (stage == "rl" and tag != "after" and rec.get("step", 0) <= step)
    if order.get(rec_stage, 1) > order.get(stage, 1):
        return False
    return not (rec_stage == stage and rec.get("step", 0) > step)


def command_line() -> str:
    """This process's command line; `python -m meml.cli` and the installed script read as `meml`."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog in ("meml", "cli.py", "__main__.py") and "meml" in sys.argv[0]:
        prog = "meml"
    return shlex.join([prog, *sys.argv[1:]])


def console_line(record: dict) -> str:
    parts = [f"{record.get('stage', 'rl')} step {record.get('step', 0)}"]
    for key, label, fmt in CONSOLE_KEYS:
        if key in record and isinstance(record[key], (int, float)):
            parts.append(f"{label} {fmt.format(record[key])}")
    return " | ".join(parts)
