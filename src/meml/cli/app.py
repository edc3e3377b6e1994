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

from meml.core.errors import ConfigError, DataError, ModelLoadError, RewardConfigError
from meml.core.load import list_presets

# each module registers its subcommand with add_parser(subparsers); heavy imports stay inside its handler
SUBCOMMANDS = [
    "meml.cli.train",
    "meml.cli.eval",
    "meml.cli.compare",
    "meml.cli.report",
    "meml.cli.distill",
    "meml.cli.data",
]


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
    for module in SUBCOMMANDS:
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
