"""One exception type for user-facing failures: a message plus the fix, no traceback soup."""

from __future__ import annotations

import errno
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


# Filesystem faults a user can fix, with what to do about each (the rest get the OS's own wording).
_OS_FIXES = {
    errno.ENOSPC: "free disk space or write to another disk",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EROFS: "choose a folder on a writable filesystem",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file was expected: choose another path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "remove it or choose another path",
}


def describe_os_error(err: OSError, with_fix: bool = True) -> str:
    """One line for an OSError: what failed, on which path, the errno name and (optionally) the fix."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    code = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else ""
    what = (err.strerror or str(err) or type(err).__name__).rstrip(".")
    line = f"{where}: {what}" if where else what
    if code:
        line += f" ({code})"
    fix = _OS_FIXES.get(err.errno) if with_fix else None
    return f"{line}; {fix}" if fix else line


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a script entry point: MPTError prints one clear message and exits 2; a filesystem
    fault (OSError with an errno: read-only, permission, full disk, not a folder, ...) prints one line
    and exits 2; Ctrl-C prints one line and exits 130 (the shell's code for SIGINT), with the
    KeyboardInterrupt's text when a caller raised one with a note."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MPTError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as err:
            detail = f": {err}" if str(err) else ""  # a caller may say what was kept, e.g. a report path
            print(f"interrupted (Ctrl-C){detail}", file=sys.stderr)
            raise SystemExit(130) from None
        except OSError as err:
            if err.errno is None:  # not a filesystem fault (a library's own OSError): keep its traceback
                raise
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
