"""Reading a subcommand's free arguments: `[PRESET_OR_TARGET] [key=value ...] [--name VALUE]`."""

from __future__ import annotations

from meml.core.errors import ConfigError


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """A leading argument without '=' is the preset (or target); the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def pop_options(args: list[str], names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Take `--name VALUE` / `--name=VALUE` out of args."""
    rest, found, i = [], {}, 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in names and eq:
            found[name] = value
        elif args[i] in names:
            if i + 1 >= len(args):
                raise ConfigError(f"{args[i]} needs a value")
            found[args[i]] = args[i + 1]
            i += 1
        else:
            rest.append(args[i])
        i += 1
    return rest, found
