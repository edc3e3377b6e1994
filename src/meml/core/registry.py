"""One table per kind of interchangeable part (losses, aggregations, engines, tasks).

A registry maps the names a config setting accepts to their implementations. It is the
only list of those names: dispatch goes through `get`, and an unknown name is a
ConfigError that names the setting, a close match and every valid name.

    >>> colours = Registry("paint.colour", {"red": 1, "green": 2})
    >>> colours.get("green")
    2
    >>> colours.get("gren")
    Traceback (most recent call last):
    ...
    meml.core.errors.ConfigError: paint.colour='gren' is not valid. Did you mean 'green'? Choose one of: green, red
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from meml.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, setting: str, entries: dict[str, T] | None = None):
        self.setting = setting  # the config key whose values name the entries
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator adding an implementation (users' own tasks, losses, ...)."""

        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.setting}: '{name}' is registered already")
            self._entries[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{self.setting}='{name}' is not valid.{hint} Choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
