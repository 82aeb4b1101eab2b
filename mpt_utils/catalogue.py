"""The method catalogue: one record per registered method of every family, holding every trait the
method declares in its one `register(...)` decorator (`mpt_utils.registry.Registry.register`).

    method_info("wanda")          -> MethodInfo(name="wanda", family="prune", display="Wanda", ...)
    methods("lowrank")            -> [{"name": "asvd", "family": "lowrank", "mode": "I", ...}, ...]
    pd.DataFrame(methods())       -> the whole catalogue as a table
    display_names("structured")   -> {"flap": "FLAP", ...} for tables and figure legends

Tables, figures and the engines read traits from here; no other module keeps a per-method table.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mpt_utils.errors import MPTError

# The modules that define a family's registry; each registry then finds its own method modules.
REGISTRY_MODULES = ("mpt_utils.prune", "mpt_utils.prune.structured", "mpt_utils.quant", "mpt_utils.lowrank",
                    "mpt_utils.quant.gguf.ladder")
FAMILY_ORDER = ("prune", "structured", "quant", "lowrank", "gguf")  # listings and messages


@dataclass(frozen=True)
class MethodInfo:
    """What one method declares at its registration.

    `kind` is its registry's wording ("pruning method"), used in messages and the version lock.
    `paper_name` is the name the papers print when it differs from `display`; a method that wraps a
    base method (OWL, DSnoT) maps each base to the name of that pairing. `mode` is the low-rank mode
    (I: weight-dominant, II: activation-centric), None elsewhere. `traits` are the family's own extras
    (pruning: updates_weights, supports_nm, allocate; quantization: fixed_bits)."""

    kind: str
    name: str
    version: int
    modules: tuple[str, ...]
    family: str
    display: str
    calibration: bool
    paper_name: str | Mapping[str, str] | None = None
    mode: str | None = None
    traits: Mapping[str, Any] = field(default_factory=dict)

    def paper(self, base: str | None = None) -> str | None:
        """The name the papers use (for a wrapper, of its pairing with `base`; None if they never ran it)."""
        if isinstance(self.paper_name, Mapping):
            return self.paper_name.get(base) if base else None
        return self.paper_name or self.display

    def row(self) -> dict[str, Any]:
        """A flat, DataFrame-friendly record; non-scalar traits (OWL's allocation) appear by type name."""
        traits = {k: v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__
                  for k, v in self.traits.items()}
        paper = dict(self.paper_name) if isinstance(self.paper_name, Mapping) else self.paper()
        return {"name": self.name, "family": self.family, "display": self.display, "paper_name": paper,
                "calibration": self.calibration, "mode": self.mode, "version": self.version, "kind": self.kind,
                "modules": list(self.modules), **traits}


class _Registry(Protocol):
    family: str

    def load(self) -> None: ...


# Method name (as configs spell it) -> its record, across every family: names are unique.
CATALOGUE: dict[str, MethodInfo] = {}
REGISTRIES: list[_Registry] = []  # every Registry, appended as it is created
_loaded = False


def record(info: MethodInfo) -> None:
    """Add `info` to the catalogue (called by every registration)."""
    version = info.version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{info.kind} {info.name!r}: version must be an integer >= 1, got {version!r}")
    known = CATALOGUE.get(info.name)
    if known is not None and known.kind != info.kind:
        raise ValueError(f"method name {info.name!r} is used by both {known.kind} and {info.kind}")
    CATALOGUE[info.name] = info


def load_all() -> dict[str, MethodInfo]:
    """Import every family and every method module once; returns the whole catalogue."""
    global _loaded
    if not _loaded:
        for module in REGISTRY_MODULES:
            importlib.import_module(module)
        for registry in list(REGISTRIES):
            registry.load()
        _loaded = True
    return dict(CATALOGUE)


def families() -> list[str]:
    """The families with a registered method, in FAMILY_ORDER (pruning first) whatever order their
    modules happened to be imported in."""
    load_all()
    present = list(dict.fromkeys(i.family for i in CATALOGUE.values()))
    return sorted(present, key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER))


def _pick(family: str | None) -> list[MethodInfo]:
    """The records of `family` (or all), grouped by family, each family in registration order."""
    infos = list(load_all().values())
    if family is None:
        rank = {f: i for i, f in enumerate(families())}
        return sorted(infos, key=lambda i: rank[i.family])  # stable: registration order within a family
    if family not in families():
        raise MPTError(f"unknown method family {family!r}", f"choose one of: {', '.join(families())}")
    return [i for i in infos if i.family == family]


def method_info(name: str) -> MethodInfo:
    """The catalogue record of method `name`; an unknown name raises MPTError naming the closest."""
    catalogue = load_all()
    if name not in catalogue:
        close = difflib.get_close_matches(str(name), catalogue, n=3, cutoff=0.5)
        guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise MPTError(f"unknown method {name!r}", f"{guess}known methods: {', '.join(sorted(catalogue))}")
    return catalogue[name]


def methods(family: str | None = None) -> list[dict[str, Any]]:
    """One tidy row per registered method (of `family`, or all): `pd.DataFrame(methods())`."""
    return [info.row() for info in _pick(family)]


def display_names(family: str | None = None, *, free_suffix: str = "",
                  names: Iterable[str] | None = None) -> dict[str, str]:
    """Method name -> its name in tables and figures (of `family`, or all; only `names` if given).
    `free_suffix` is appended for calibration-free methods (a figure that sets them apart)."""
    infos = _pick(family) if names is None else [method_info(n) for n in names]
    return {i.name: i.display + ("" if i.calibration else free_suffix) for i in infos}
