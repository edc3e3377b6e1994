"""Layer 6: the `meml` command and its subcommands, one module each."""

from meml.cli.app import build_parser, main, split_args

__all__ = ["build_parser", "main", "split_args"]
