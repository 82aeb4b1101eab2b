"""Name -> function registries, so methods are chosen by a string in a config or notebook.

Every registered method also declares an integer algorithm `version`. It is part of the results
store's key of every point computed with that method, so bumping it (after a change that alters the
numbers) recomputes exactly that method's points. `mpt_utils/method_versions.json` locks each
version to a hash of the method's source, and a test fails when the code moved but the version did not.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mpt_utils.errors import MPTError

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class MethodVersion:
    """The declared algorithm version of one method and the modules whose code defines it."""

    kind: str
    name: str
    version: int
    modules: tuple[str, ...]


# Method name (as it appears in configs) -> its version, across every registry: names are unique.
METHOD_VERSIONS: dict[str, MethodVersion] = {}


def record_version(kind: str, name: str, version: int, modules: Iterable[str]) -> None:
    """Record `name`'s algorithm version (called by every registration)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{kind} {name!r}: version must be an integer >= 1, got {version!r}")
    known = METHOD_VERSIONS.get(name)
    if known is not None and known.kind != kind:
        raise ValueError(f"method name {name!r} is used by both {known.kind} and {kind}")
    METHOD_VERSIONS[name] = MethodVersion(kind, name, version, tuple(dict.fromkeys(modules)))


def accepted_options(fn: Callable, exclude: Iterable[str] = ()) -> set[str] | None:
    """Keyword options `fn` accepts (minus `exclude`); None when it takes **kwargs (anything goes)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in keyword} - set(exclude)


def check_options(method: str, options: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raise MPTError for the first option of `options` not in `valid`, naming the closest valid one."""
    valid = sorted(set(valid))
    unknown = [k for k in options if k not in valid]
    if not unknown:
        return
    bad = unknown[0]
    close = difflib.get_close_matches(bad, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(valid) if valid else f"none ({method} takes no options)"
    raise MPTError(f"unknown option {bad!r} for {method}", f"{hint}valid options: {listed}")


class Registry(Generic[F]):
    def __init__(self, kind: str, engine_args: Iterable[str] = ()):
        """`engine_args`: parameters the caller (engine, sweep) fills in itself, never user options."""
        self.kind = kind
        self.engine_args = tuple(engine_args)
        self._items: dict[str, F] = {}

    def register(self, name: str, version: int = 1, sources: Iterable[str] = (),
                 module: str | None = None) -> Callable[[F], F]:
        """Decorator: register `fn` under `name` at algorithm `version`. The version covers the
        code of `fn`'s module (or `module`) plus the modules named in `sources`."""

        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            record_version(self.kind, name, version, (module or fn.__module__, *sources))
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._items:
            raise MPTError(
                f"unknown {self.kind} {name!r}",
                f"choose one of: {', '.join(sorted(self._items))}",
            )
        return self._items[name]

    def options(self, name: str) -> set[str] | None:
        """The user options of method `name` (its keyword parameters minus the engine's)."""
        return accepted_options(self.get(name), self.engine_args)

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """MPTError naming the closest valid option when `options` holds one `name` does not take."""
        valid = self.options(name)
        if valid is not None:
            check_options(f"{self.kind} {name!r}", options, valid)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
