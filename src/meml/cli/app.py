"""The `meml` command.

    meml train [PRESET] [key=value ...]      stage 1 (MEF) then stage 2 (RL), as configured
    meml sft [PRESET] [key=value ...]        stage 1 only
    meml eval [MODEL_OR_RUN] [--preset P] [key=value ...]
                                             greedy accuracy per expert on the task's test split
Examples:
    meml train                               the embedded default (SmolLM2-135M, arithmetic, CPU)
    meml train grpo train.steps=20 optim.lr=1e-6
    meml train --resume output_dir=runs/x     continue run x from its newest valid checkpoint
    meml train --overwrite output_dir=runs/x  start afresh in runs/x, removing the earlier run's files

Each further subcommand lives in its own module, which exposes `add_parser(subparsers)`
registering a parser whose `func` default handles it (heavy imports stay inside `func`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from meml.core.config import ConfigError, list_presets, load_config
from meml.engines.model import ModelLoadError
from meml.tasks.base import DataError
from meml.tasks.rewards import RewardConfigError

SUBCOMMAND_MODULES = ["meml.cli.eval", "meml.distill", "meml.tasks.inspect", "meml.cli.report", "meml.cli.compare"]


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading argument without '=' is the preset (or target); the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("meml").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
        print(f"interrupted ({exc or 'SIGINT'}); continue from the last checkpoint with --resume output_dir={cfg.output_dir or '<run>'}",
              file=sys.stderr)
        return 128 + signum
    return 128 + results["stopped"]["signal"] if "stopped" in results else 0


def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(list_presets())
    parser = argparse.ArgumentParser(
        prog="meml",
        description="RL with verifiable rewards for reasoning: MEML-GRPO, GRPO, Dr.GRPO on Hugging Face models.",
        epilog=f"presets: {presets}\nOverrides are key.sub=value, e.g. train.steps=20 rollout.temperature=0.8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "stage 1 (MEF) then stage 2 (RL), as configured"), ("sft", "stage 1 only: multi-expert SFT")):
        p = sub.add_parser(name, help=text, epilog=f"presets: {presets}")
        p.add_argument("args", nargs="*", help="[PRESET] [key=value ...]")
        start = p.add_mutually_exclusive_group()
        start.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of output_dir (checkpoint.resume=auto)")
        start.add_argument("--overwrite", action="store_true",
                           help="start afresh in an output_dir that holds an earlier run: its checkpoints, logs and results are deleted first")
        p.set_defaults(func=cmd_train)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.verbose)
    try:
        return ns.func(ns)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ModelLoadError, RewardConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
