"""The `meml` command.

    meml train [PRESET] [key=value ...]      stage 1 (MEF) then stage 2 (RL), as configured
    meml sft [PRESET] [key=value ...]        stage 1 only
    meml eval [MODEL_OR_RUN] [--preset P] [key=value ...]
                                             greedy accuracy per expert on the task's test split
Examples:
    meml train                               the embedded default (SmolLM2-135M, arithmetic, CPU)
    meml train grpo train.steps=20 optim.lr=1e-6
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from meml.config import ConfigError, list_presets, load_config
from meml.data.base import DataError
from meml.model import ModelLoadError
from meml.rewards.functions import RewardConfigError


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading argument without '=' is the preset; the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("meml").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(ns: argparse.Namespace, stage_one_only: bool = False) -> int:
    from meml.trainer import train

    preset, overrides = _split_args(ns.args)
    if stage_one_only:
        overrides = ["sft.enabled=true", "train.steps=0", *overrides]
    cfg = load_config(preset, overrides)
    train(cfg, preset)
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from meml.evaluate_cli import run_eval

    target, overrides = _split_args(ns.args)
    return run_eval(target, ns.preset, overrides)


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
    p = sub.add_parser("train", help="stage 1 (MEF) then stage 2 (RL), as configured", epilog=f"presets: {presets}")
    p.add_argument("args", nargs="*", help="[PRESET] [key=value ...]")
    p = sub.add_parser("sft", help="stage 1 only: multi-expert SFT", epilog=f"presets: {presets}")
    p.add_argument("args", nargs="*", help="[PRESET] [key=value ...]")
    p = sub.add_parser("eval", help="greedy accuracy per expert on the task's test split")
    p.add_argument("--preset", default=None, help="preset whose task and experts to use")
    p.add_argument("args", nargs="*", help="[MODEL_OR_RUN] [key=value ...]")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _setup_logging(ns.verbose)
    try:
        if ns.command == "train":
            return cmd_train(ns)
        if ns.command == "sft":
            return cmd_train(ns, stage_one_only=True)
        if ns.command == "eval":
            return cmd_eval(ns)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, ModelLoadError, RewardConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
