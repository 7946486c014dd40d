"""Argument checks of the text data modules, run in ``__init__`` so that a bad recipe fails before any data is
read or any tokenizer trained. Every message starts with the checking object's name and names the argument."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["require_file", "require_fraction", "require_ints"]


def require_ints(owner: str, minimum: Mapping[str, tuple[Any, int]]) -> None:
    """Raise ``ValueError`` for the first ``name: (value, smallest)`` whose value is not an int of at least
    ``smallest`` (a bool is not an int here: ``True`` for a count is a recipe mistake)."""
    for name, (value, smallest) in minimum.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"{owner}: {name} must be an int >= {smallest}, got {value!r}")


def require_fraction(owner: str, name: str, value: Any, zero_allowed: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in [0, 1] (``zero_allowed=False``: in (0, 1])."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not (0 <= value <= 1) or (value == 0 and not zero_allowed):
        raise ValueError(f"{owner}: {name} must be in {'[0' if zero_allowed else '(0'}, 1], got {value!r}")


def require_file(path: Path, owner: str, hint: str) -> Path:
    """``path``, which must be a file; else ``FileNotFoundError`` with ``hint`` (how to get the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: {path} is missing; {hint}")
    return path
