"""One exception type for user-facing failures: a message plus the fix, no traceback soup."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

T = TypeVar("T")


class MPTError(Exception):
    """A failure the user can act on. `fix` says what to do about it."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Compression ratios live in [0, 1): 1.0 would remove everything."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise MPTError(f"{name}={ratio!r} is not a number", f"pass a {name} in [0, 1), e.g. 0.5") from None
    if not 0.0 <= value < 1.0:
        raise MPTError(f"{name}={value} is outside [0, 1)", f"pass a {name} in [0, 1), e.g. 0.5")
    return value


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a script entry point: MPTError prints one clear message and exits 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MPTError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
