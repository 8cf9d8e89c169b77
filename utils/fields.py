"""Dataclass fields that describe themselves: help text, flag name, aliases, choices and help group.

A config dataclass is the one place where a setting and its default live; utils.cli turns its described fields into
command-line flags, so a script never lists a setting a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, field, fields
from typing import Any


def option(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices: tuple[Any, ...] | None = None, group: str | None = None,
           parse: Callable[[str], Any] | None = None, nargs: str | None = None, required: bool = False) -> Any:
    """A dataclass field that is also a command-line flag `--<flag or field name>` (plus `aliases`).

    `parse` reads the flag's text when the default's type cannot (e.g. 'none' for fp32); with `nargs` ('+') the flag
    takes several values, each read by `parse` (default str), stored as a tuple.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases, "choices": choices,
                                             "group": group, "parse": parse, "nargs": nargs, "required": required})


def described_fields(cls: type) -> list[Field]:
    """The fields of a dataclass that were declared with option(...)."""
    return [f for f in fields(cls) if "help" in f.metadata]
