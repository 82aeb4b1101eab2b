"""Name -> function registries, so methods are chosen by a string in a config or notebook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mpt_utils.errors import MPTError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
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

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
