"""`meml train` (stage 1 then stage 2, as configured) and `meml sft` (stage 1 only).

meml train                               the embedded default (SmolLM2-135M, arithmetic, CPU)
meml train grpo train.steps=20 optim.lr=1e-6
meml train --resume output_dir=runs/x     continue run x from its newest valid checkpoint
meml train --overwrite output_dir=runs/x  start afresh in runs/x, removing the earlier run's files
meml sft moe_sft output_dir=runs/mef      stage 1 alone
"""

from __future__ import annotations

import argparse
import sys

from meml.cli.args import split_args
from meml.core.load import list_presets, load_config

HELP = {
    "train": """Stage 1 (MEF: SFT on every expert's traces) then stage 2 (RL: MEML-GRPO, or GRPO / Dr.GRPO
with one expert), with held-out greedy accuracy per expert before, after stage 1 and at the
end. Writes output_dir (default runs/<preset>-<time>): config.yaml, metrics.jsonl,
checkpoints/, eval/, results.json (README "A run directory"). Main settings: train.steps,
train.questions_per_step, rollout.num_generations_per_expert, optim.lr, sft.epochs,
algo.iml.enabled, algo.hsft.enabled, model.name_or_path, task.name, task.path.""",
    "sft": """Stage 1 only: SFT on every expert's traces (MEF), or one expert's with a single-expert preset.
Writes output_dir like `meml train`; its checkpoint starts stage 2 with
`meml train PRESET model.name_or_path=<that run directory> sft.enabled=false`.
Main settings: sft.epochs, sft.lr, sft.sequences_per_step, sft.max_examples, sft.experts.""",
}


EXAMPLES = {"train": "grpo train.steps=20 optim.lr=1e-6", "sft": "moe_sft output_dir=runs/mef"}


def add_parser(sub) -> None:
    presets = ", ".join(list_presets())
    for name, text in (
        ("train", "stage 1 (MEF) then stage 2 (RL), as configured"),
        ("sft", "stage 1 only: multi-expert SFT"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=HELP[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  meml {name} {EXAMPLES[name]}\npresets: {presets}",
        )
        p.add_argument("args", nargs="*", help="[PRESET] [key=value ...]")
        start = p.add_mutually_exclusive_group()
        start.add_argument(
            "--resume",
            action="store_true",
            help="continue from the newest valid checkpoint of output_dir (checkpoint.resume=auto)",
        )
        start.add_argument(
            "--overwrite",
            action="store_true",
            help=(
                "start afresh in an output_dir that holds an earlier run: its checkpoints, logs and results are "
                "deleted first"
            ),
        )
        p.set_defaults(func=cmd_train)


def cmd_train(ns: argparse.Namespace) -> int:
    """Exit codes: 0 done; 1 a checkpoint could not be written, too many non-finite updates
    (the last checkpoint stands), or a step failed with an unexpected error (the state before
    it is saved where it is intact); 2 bad config, data or model, or an output_dir holding an
    earlier run; 128 + signal after SIGTERM/SIGINT (143/130: stopped cleanly with a
    checkpoint, or at once after a second signal)."""
    from meml.train.checkpoint import CheckpointError
    from meml.train.loop import StepFailed, train
    from meml.train.update import NonFiniteError

    preset, overrides = split_args(ns.args)
    if ns.command == "sft":
        overrides = ["sft.enabled=true", "train.steps=0", *overrides]
    if ns.resume:
        overrides.append("checkpoint.resume=auto")
    cfg = load_config(preset, overrides)
    try:
        results = train(cfg, preset, overwrite=ns.overwrite)
    except (CheckpointError, NonFiniteError, StepFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        print(
            f"interrupted ({exc or 'SIGINT'}); continue from the last checkpoint with --resume "
            f"output_dir={cfg.output_dir or '<run>'}",
            file=sys.stderr,
        )
        return 128 + signum
    return 128 + results["stopped"]["signal"] if "stopped" in results else 0
