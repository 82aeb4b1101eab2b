"""Algorithm versions of every registered method, locked to a hash of each method's source.

Each method declares `version=` at its registration (`register("wanda", version=1)`); the results
store keys every point by the versions of the methods it used, so bumping one version recomputes
only that method's points. `method_versions.json` records, per method, the version and a hash of its
module's code (comments, docstrings and formatting ignored). When the code changes while the version
does not, `lock_problems()` (and the test suite) says so:

    python -m mpt_utils.method_versions --check   # list problems, exit 1 if any
    python -m mpt_utils.method_versions --lock    # record the current versions and hashes
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mpt_utils.catalogue import CATALOGUE, load_all
from mpt_utils.errors import MPTError, cli_main

LOCK_PATH = Path(__file__).with_name("method_versions.json")
LOCK_COMMAND = "python -m mpt_utils.method_versions --lock"
__all__ = ["config_versions", "load_all", "lock_problems", "method_version", "write_lock"]


def method_version(name: str) -> int | None:
    """The declared version of method `name`, or None when no registered method has that name."""
    load_all()
    found = CATALOGUE.get(name)
    return found.version if found is not None else None


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split(":")  # 'owl:sparsegpt' uses both OWL and SparseGPT
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _names(v)]
    return []


def config_versions(config: Mapping[str, Any]) -> dict[str, int]:
    """Versions of the registered methods a point's config names under `method` (labels like
    'owl:sparsegpt' count each part) and `registry_method` (when `method` is a display label)."""
    names = _names(config.get("method")) + _names(config.get("registry_method"))
    load_all()
    found = {n: CATALOGUE[n].version for n in names if n in CATALOGUE}
    return dict(sorted(found.items()))


# -- source hashes ---------------------------------------------------------------------------------
def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _canonical(node: Any) -> Any:
    """A Python-version-stable form of an AST: node type and its non-empty fields (newer Pythons
    add fields such as `type_params` that are empty in our code), no line numbers."""
    if isinstance(node, ast.AST):
        fields = [(f, _canonical(getattr(node, f, None))) for f in node._fields]
        return [type(node).__name__, [[f, v] for f, v in fields if v not in (None, [])]]
    if isinstance(node, list):
        return [_canonical(n) for n in node]
    if isinstance(node, (str, int, float, bool)) or node is None:
        return node
    return repr(node)  # complex, bytes, Ellipsis


def module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MPTError(f"cannot find the source of module {module!r}", "check the method's sources= list")
    return Path(spec.origin)


def source_hash(modules: Iterable[str]) -> str:
    """Hash of the code of `modules`, ignoring comments, docstrings and formatting."""
    digest = hashlib.sha256()
    for module in modules:
        tree = _strip_docstrings(ast.parse(module_file(module).read_text(encoding="utf-8")))
        digest.update(module.encode("utf-8") + b"\n")
        digest.update(json.dumps(_canonical(tree), separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()[:16]


# -- the lock ------------------------------------------------------------------------------------------
def current_lock() -> dict[str, dict[str, Any]]:
    """What the lock file should hold now: per method its kind, version, modules and source hash."""
    return {name: {"kind": mv.kind, "version": mv.version, "modules": list(mv.modules),
                   "source": source_hash(mv.modules)}
            for name, mv in sorted(load_all().items())}


def read_lock(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    path = Path(path or LOCK_PATH)
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def write_lock(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    from mpt_utils.store import atomic_write_text

    lock = current_lock()
    atomic_write_text(Path(path or LOCK_PATH), json.dumps(lock, indent=1, sort_keys=True) + "\n")
    return lock


def lock_problems(lock: Mapping[str, Mapping[str, Any]] | None = None,
                  current: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """One message per method whose code or version does not match the lock."""
    lock = read_lock() if lock is None else lock
    current = current_lock() if current is None else current
    problems = []
    for name, now in current.items():
        locked = lock.get(name)
        if locked is None:
            problems.append(f"{now['kind']} {name!r} (version {now['version']}) is not in the lock: "
                            f"run `{LOCK_COMMAND}`")
        elif now["version"] != locked.get("version"):
            problems.append(f"{now['kind']} {name!r} is at version {now['version']} but the lock has "
                            f"{locked.get('version')}: run `{LOCK_COMMAND}`")
        elif now["source"] != locked.get("source") or list(now["modules"]) != list(locked.get("modules", [])):
            problems.append(f"{now['kind']} {name!r} changed its code ({', '.join(now['modules'])}) but not its "
                            f"version {now['version']}: bump the version in the register call and run "
                            f"`{LOCK_COMMAND}` (only re-lock without a bump if the change cannot alter any "
                            "number: stored points of the old code would be reused)")
    for name in sorted(set(lock) - set(current)):
        problems.append(f"{name!r} is in the lock but no longer registered: run `{LOCK_COMMAND}`")
    return problems


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpt_utils.method_versions",
                                     description="Check or record the algorithm version lock of every method.")
    parser.add_argument("--lock", action="store_true", help="write the current versions and source hashes")
    parser.add_argument("--check", action="store_true", help="list mismatches with the lock (the default)")
    args = parser.parse_args(argv)
    if args.lock:
        lock = write_lock()
        print(f"locked {len(lock)} methods in {LOCK_PATH}")
        return 0
    problems = lock_problems()
    for line in problems:
        print(line)
    if not problems:
        print(f"all {len(current_lock())} methods match {LOCK_PATH.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
