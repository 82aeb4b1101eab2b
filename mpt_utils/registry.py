"""Name -> function registries, so methods are chosen by a string in a config or notebook.

A method module declares itself with one decorator carrying all its traits:

    @PRUNERS.register("wanda", version=1, display="Wanda", calibration=True)
    def wanda(weight, stats, sparsity, pattern=None, *, name="", cache=None): ...

Every registration lands in the catalogue (`mpt_utils.catalogue`: `method_info`, `methods`), which
tables, figures and engines read. A family's registry names its package and imports every module in
it on first use, so adding a method is adding one file.

The integer algorithm `version` is part of the results store's key of every point computed with that
method, so bumping it (after a change that alters the numbers) recomputes exactly that method's
points. `mpt_utils/method_versions.json` locks each version to a hash of the method's source, and a
test fails when the code moved but the version did not.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from mpt_utils.catalogue import CATALOGUE, REGISTRIES, MethodInfo, record
from mpt_utils.errors import MPTError

F = TypeVar("F", bound=Callable)

# The catalogue under its older name: name -> MethodInfo (version, modules, ...) of every method.
METHOD_VERSIONS = CATALOGUE


def method_modules(package: str) -> list[str]:
    """The modules of `package` (not its subpackages, not `_private` ones), sorted by name: what a
    family registry imports to find its methods. Helpers that register nothing are imported too."""
    path = importlib.import_module(package).__path__
    return [f"{package}.{m.name}" for m in sorted(pkgutil.iter_modules(path), key=lambda m: m.name)
            if not m.ispkg and not m.name.startswith("_")]


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
    """The methods of one family, by name. `engine_args`: parameters the caller (engine, sweep) fills
    in itself, never user options. `package`: where the family's method modules live (each is imported
    on first lookup); None when the methods are defined next to the registry. `modes`: the values the
    family's `mode` trait takes (none: no mode). `traits`: the family's extra traits with their
    defaults. `wrap(info, fn)` builds what `get` returns (default: `fn` itself)."""

    def __init__(self, kind: str, engine_args: Iterable[str] = (), *, family: str, package: str | None = None,
                 modes: Iterable[str] = (), traits: Mapping[str, Any] | None = None,
                 wrap: Callable[[MethodInfo, Callable], F] | None = None):
        self.kind, self.family, self.package = kind, family, package
        self.engine_args = tuple(engine_args)
        self.modes = tuple(modes)
        self.traits = dict(traits or {})
        self._wrap = wrap
        self._items: dict[str, F] = {}
        self._infos: dict[str, MethodInfo] = {}
        self._loaded = package is None
        REGISTRIES.append(self)

    def register(self, name: str, *, version: int, display: str, calibration: bool,
                 paper_name: str | Mapping[str, str] | None = None, mode: str | None = None,
                 sources: Iterable[str] = (), **traits: Any) -> Callable[[Callable], Callable]:
        """Decorator: register `fn` under `name` with all its traits (see `MethodInfo`). `version`
        covers the code of `fn`'s module plus the modules named in `sources`; `calibration`: it
        needs calibration windows; `display`: its name in tables and figures."""
        unknown = set(traits) - set(self.traits)
        if unknown:
            raise ValueError(f"{self.kind} {name!r}: unknown traits {sorted(unknown)} "
                             f"(this family's: {sorted(self.traits) or 'none'})")
        if (mode not in self.modes) if self.modes else (mode is not None):
            want = f"one of {self.modes}" if self.modes else "None"
            raise ValueError(f"{self.kind} {name!r}: mode must be {want}, got {mode!r}")
        if not isinstance(calibration, bool) or not (isinstance(display, str) and display):
            raise ValueError(f"{self.kind} {name!r}: give display (a name) and calibration (True/False)")

        def deco(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            info = MethodInfo(self.kind, name, version, tuple(dict.fromkeys((fn.__module__, *sources))),
                              self.family, display, calibration, paper_name, mode, {**self.traits, **traits})
            record(info)
            self._infos[name] = info
            self._items[name] = self._wrap(info, fn) if self._wrap else fn
            return fn

        return deco

    def load(self) -> None:
        """Import every module of the family's package once (each method module registers itself)."""
        if self._loaded:
            return
        self._loaded = True  # set first: a method module that looks up another one must not re-enter
        try:
            for module in method_modules(self.package):
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise

    def get(self, name: str) -> F:
        self.load()
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise MPTError(f"unknown {self.kind} {name!r}", f"{guess}choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def info(self, name: str) -> MethodInfo:
        """The catalogue record of this family's method `name`."""
        self.get(name)
        return self._infos[name]

    def options(self, name: str) -> set[str] | None:
        """The user options of method `name` (its keyword parameters minus the engine's)."""
        return accepted_options(self.get(name), self.engine_args)

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """MPTError naming the closest valid option when `options` holds one `name` does not take."""
        valid = self.options(name)
        if valid is not None:
            check_options(f"{self.kind} {name!r}", options, valid)

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._items
