"""Where results and figures live, whatever the working directory.

A notebook opened in JupyterLab runs in notebooks/, one run by `make reproduce` in the repository
root: relative paths are therefore taken from the repository root, never from the cwd. The results
root `results/` moves to $MPT_RESULTS when that is set (as for `ResultsStore()`), so
`results/embedded` is `$MPT_RESULTS/embedded`.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "MPT_RESULTS"
RESULTS_ROOT = "results"


def repo_root() -> Path:
    """The checkout holding this package (the folder with pyproject.toml above it); the working
    directory when the package is installed without its checkout."""
    package = Path(__file__).resolve().parent
    return package.parent if (package.parent / "pyproject.toml").is_file() else Path.cwd()


def repo_path(path: str | os.PathLike) -> Path:
    """`path` made absolute: a relative path is taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def results_path(path: str | os.PathLike = RESULTS_ROOT) -> Path:
    """A results location made absolute: like `repo_path`, except that a relative path starting at
    `results/` starts at $MPT_RESULTS instead when that is set."""
    path = Path(path).expanduser()
    env = os.environ.get(RESULTS_ENV)
    if env and not path.is_absolute() and path.parts[:1] == (RESULTS_ROOT,):
        return repo_path(Path(env).joinpath(*path.parts[1:]))
    return repo_path(path)


def notebook_dirs(store_dir: str | os.PathLike, figures_dir: str | os.PathLike) -> tuple[Path, Path]:
    """A notebook's `store_dir` and `figures_dir` parameters as absolute paths (see the module doc)."""
    return results_path(store_dir), repo_path(figures_dir)


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """`path` relative to the repository root (POSIX form) when it lies inside it, else absolute:
    what a report may show without naming the machine it ran on."""
    path = Path(path).expanduser().resolve()
    root = Path(root).resolve() if root is not None else repo_root()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
