"""Layer 6: the `meml` command and its subcommands, one module each (cli/app.py lists them)."""

from meml.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
