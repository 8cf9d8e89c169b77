"""Argument types shared by the root scripts (the seed's commands pass booleans as True/False and lists as [3])."""

from __future__ import annotations

import argparse
import ast


def str2bool(value: str | bool) -> bool:
    """'True'/'False' (and 1/0, yes/no) as the seed's command lines write them."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y"):
        return True
    if value.lower() in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def int_list(value: str) -> tuple[int, ...]:
    """'[3]', '3', '3,5' or '[3, 5]' -> (3,) / (3, 5)."""
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        try:
            parsed = [int(x) for x in value.replace("[", "").replace("]", "").split(",") if x.strip()]
        except ValueError:
            parsed = []
    parsed = [parsed] if isinstance(parsed, int) else list(parsed) if isinstance(parsed, (list, tuple)) else []
    if not parsed or not all(isinstance(x, int) and x > 0 for x in parsed):
        raise argparse.ArgumentTypeError(f"expected a list of positive integers like [3] or 3,5, got {value!r}")
    return tuple(parsed)
