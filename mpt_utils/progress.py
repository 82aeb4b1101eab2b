"""Progress bars that never end up in an executed notebook.

Every bar of the package comes from `progress_bar`. Where it draws:
- `PROGRESS_ENV` set (a notebook run by `mpt_utils.reproduce`): the bar's newest line is written to
  the file that variable names, and reproduce echoes it to its own terminal. Captured stderr would
  otherwise land in the report as one red line per redraw.
- otherwise, ipywidgets importable: tqdm.auto (a widget in JupyterLab, text in a terminal).
- otherwise: a plain text bar on stderr. tqdm.auto without ipywidgets warns "IProgress not found"
  into the notebook, so it is not used then.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import std as tqdm_std

PROGRESS_ENV = "MPT_PROGRESS_FILE"
# the file gets at most one write per this many seconds per bar (the reader polls every few seconds)
FILE_MININTERVAL = 1.0
FILE_FORMAT = "{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"

# Libraries (transformers, huggingface_hub) import tqdm.auto themselves; in a kernel without
# ipywidgets that import warns into the first cell touching them. Their bars fall back to text anyway.
warnings.filterwarnings("ignore", message="IProgress not found", category=tqdm_std.TqdmWarning)


class LatestLine:
    """A write-only text stream for tqdm that keeps only the newest non-blank line, in `path`.

    Written atomically (temp file + rename), so a reader never sees half a line. Errors are
    swallowed: progress reporting must never stop a computation."""

    encoding = "utf-8"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, text: str) -> int:
        lines = [s.strip() for s in text.replace("\r", "\n").split("\n")]
        line = next((s for s in reversed(lines) if s), "")
        if line:  # tqdm clears a finished bar by writing blanks: keep the last real line instead
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                tmp.write_text(line + "\n", encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:
                pass
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _widgets_available() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: float | None = None,
                 disable: bool = False, leave: bool = False, **kwargs: Any) -> tqdm_std.tqdm:
    """A tqdm bar (iterate over it, or `.update()` it) drawn where it belongs, see the module doc."""
    target = os.environ.get(PROGRESS_ENV)
    if target:
        kwargs = {"mininterval": FILE_MININTERVAL, "bar_format": FILE_FORMAT, **kwargs}
        return tqdm_std.tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave,
                             file=LatestLine(target), **kwargs)
    if _widgets_available():
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, **kwargs)
    return tqdm_std.tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, **kwargs)


def read_progress(path: str | os.PathLike) -> str:
    """The newest progress line in `path` ('' when there is none yet)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
