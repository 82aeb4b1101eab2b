"""Results store: tidy rows keyed by everything that determines them, one atomic file per finished point.

A point's key hashes its config together with its inputs (`point_inputs`): content fingerprints of
the model and corpora it names and the algorithm versions of the methods it used. So replacing a
model or corpus file at the same path, or bumping a method's version, recomputes exactly the points
concerned; the stored `config` stays the readable settings, the inputs are stored beside it.

A point is written only when it is complete (temp file + os.replace), so a crash or kill in the
middle of a sweep loses at most the point being computed, and a rerun skips every finished point.
A point file that cannot be read is moved to `<root>/quarantine/` with a warning naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mpt_utils import __version__
from mpt_utils.errors import MPTError, cli_main
from mpt_utils.fingerprint import CACHE_NAME, FingerprintCache, data_fingerprint, model_fingerprint

ROW_COLUMNS = ["model", "method", "family", "ratio", "bits", "metric", "value", "seed", "config_hash"]
DEFAULT_ROOT = "results"
# config keys naming a model spec, and those naming corpora (a name or a list of names)
MODEL_KEYS = ("model",)
DATA_KEYS = ("data", "eval", "eval_data", "calib_data", "extra_eval_data")
STALE_COLUMNS = ["file", "method", "model", "reason"]


class StoreWarning(UserWarning):
    """A point file the store could not use (it was moved to quarantine)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # json has no inf/nan; keep them visible instead of failing
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def point_inputs(config: Mapping[str, Any], cache: FingerprintCache | None = None) -> dict[str, dict]:
    """What a point's numbers depend on beyond its settings: {"model": {spec: fingerprint},
    "data": {name: fingerprint}, "methods": {name: version}}. Inputs that cannot be resolved here
    (a missing file, an uncached hub model) are left out; empty groups are dropped."""
    from mpt_utils.method_versions import config_versions

    models = {n: model_fingerprint(n, cache) for k in MODEL_KEYS for n in _names(config.get(k))}
    data = {n: data_fingerprint(n, cache) for k in DATA_KEYS for n in _names(config.get(k))}
    inputs = {"model": {k: v for k, v in sorted(models.items()) if v is not None},
              "data": {k: v for k, v in sorted(data.items()) if v is not None},
              "methods": config_versions(config)}
    return {k: v for k, v in inputs.items() if v}


def config_hash(config: dict[str, Any], inputs: Mapping[str, Any] | None = None) -> str:
    """Stable key of a point: its config (keys sorted) plus its inputs (computed if not given)."""
    inputs = point_inputs(config) if inputs is None else inputs
    payload = json.dumps(_jsonable({"config": config, "inputs": inputs}), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports and CSVs should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


class BadPoint(ValueError):
    """A point file whose content is not a stored point (the message says what is wrong)."""


def read_point(path: Path) -> dict[str, Any]:
    """The payload of a point file; BadPoint when it is not UTF-8 JSON holding an object with a
    `rows` list of objects."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadPoint(f"not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {err.start}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadPoint(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(payload, dict):
        raise BadPoint(f"JSON {type(payload).__name__} instead of an object")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise BadPoint("no 'rows' list")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise BadPoint(f"row {bad} is a {type(rows[bad]).__name__}, not an object")
    return payload


def _diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Why stored inputs differ from current ones; inputs not resolvable now are not judged."""
    reasons = []
    for group, what in (("model", "model"), ("data", "corpus")):
        old, new = stored.get(group, {}), current.get(group, {})
        reasons += [f"{what} {name} changed" for name in sorted(new) if old.get(name) != new[name]]
    old, new = stored.get("methods", {}), current.get("methods", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            was = "unversioned" if name not in old else f"version {old[name]}"
            now = "unregistered" if name not in new else f"version {new[name]}"
            reasons.append(f"{name} {was} -> {now}")
    return reasons


class ResultsStore:
    """A folder of finished points: `<root>/points/<key>.json`, each holding its rows."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(os.environ.get("MPT_RESULTS", root) if root == DEFAULT_ROOT else root)
        self.points = self.root / "points"
        self.quarantine_dir = self.root / "quarantine"
        self.points.mkdir(parents=True, exist_ok=True)
        self.fingerprints = FingerprintCache(self.root / CACHE_NAME)

    def _path(self, key: str) -> Path:
        return self.points / f"{key}.json"

    def inputs(self, config: Mapping[str, Any]) -> dict[str, dict]:
        """Current fingerprints and method versions of `config` (see `point_inputs`)."""
        return point_inputs(config, self.fingerprints)

    def key(self, config: dict[str, Any]) -> str:
        return config_hash(config, self.inputs(config))

    # -- reading, with quarantine of damaged files ----------------------------------------------
    def _quarantine(self, path: Path, reason: str, outcome: str) -> None:
        dest = self.quarantine_dir / path.name
        n = 1
        while dest.exists():
            dest, n = self.quarantine_dir / f"{path.stem}.{n}{path.suffix}", n + 1
        try:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            moved = f"moved it to {dest}"
        except OSError as err:
            moved = f"could not move it aside ({err.strerror})"
        warnings.warn(f"results store: point file {path} is unreadable ({reason}); {moved} and {outcome}",
                      StoreWarning, stacklevel=3)

    def _read(self, path: Path, outcome: str) -> dict[str, Any] | None:
        try:
            return read_point(path)
        except BadPoint as err:
            self._quarantine(path, str(err), outcome)
        except FileNotFoundError:
            pass  # removed meanwhile (another process quarantined or dropped it)
        return None

    def has(self, config: dict[str, Any]) -> bool:
        return self.load(config) is not None

    def load(self, config: dict[str, Any]) -> list[dict[str, Any]] | None:
        path = self._path(self.key(config))
        if not path.exists():
            return None
        payload = self._read(path, "will compute the point again")
        if payload is None:
            return None
        return [{k: _decode(v) for k, v in row.items()} for row in payload["rows"]]

    def put(self, config: dict[str, Any], rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        # inputs are taken now, after computing: a hub model downloaded by the computation counts
        inputs = self.inputs(config)
        key = config_hash(config, inputs)
        base = {k: config.get(k) for k in ROW_COLUMNS if k in config}
        full = [{**base, **row, "config_hash": key} for row in rows]
        payload = {"config": _jsonable(config), "inputs": _jsonable(inputs), "config_hash": key,
                   "finished": time.time(), "mpt_version": __version__, "rows": [_jsonable(r) for r in full]}
        atomic_write_text(self._path(key), json.dumps(payload, indent=1))
        return full

    def get_or_compute(self, config: dict[str, Any],
                       compute: Callable[[], dict[str, Any] | list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Rows for `config`: from disk when finished before, else computed now and stored atomically.
        `compute` returns one row or a list of rows (each at least metric and value)."""
        rows = self.load(config)
        if rows is not None:
            return rows
        result = compute()
        return self.put(config, [result] if isinstance(result, dict) else result)

    def _payloads(self, outcome: str) -> Iterable[tuple[Path, dict[str, Any]]]:
        for path in sorted(self.points.glob("*.json")):
            payload = self._read(path, outcome)
            if payload is not None:
                yield path, payload

    def frame(self, **filters: Any) -> pd.DataFrame:
        """All stored rows as one tidy DataFrame (optionally filtered by column == value)."""
        rows: list[dict[str, Any]] = []
        for _, payload in self._payloads("left it out of the table"):
            rows.extend({k: _decode(v) for k, v in row.items()} for row in payload["rows"])
        df = pd.DataFrame(rows)
        for col in ROW_COLUMNS:
            if col not in df.columns:
                df[col] = None
        for key, value in filters.items():
            df = df[df[key] == value]
        return df.reset_index(drop=True)

    def export_csv(self, path: str | os.PathLike | None = None) -> Path:
        out = Path(path) if path else self.root / "results.csv"
        atomic_write_text(out, self.frame().to_csv(index=False))
        return out

    # -- stale points ---------------------------------------------------------------------------
    def stale(self) -> pd.DataFrame:
        """Points whose stored inputs no longer match the current fingerprints / method versions
        (a rerun would not find them): one row per point with file, method, model and reason."""
        found = []
        for path, payload in self._payloads("left it out of the stale check"):
            config = payload.get("config")
            if not isinstance(config, dict):
                reasons = ["no stored config"]
            elif not isinstance(payload.get("inputs"), dict):
                reasons = ["no recorded inputs (stored by an older version of the store)"]
            else:
                reasons = _diff(payload["inputs"], self.inputs(config))
            if reasons:
                config = config if isinstance(config, dict) else {}
                found.append({"file": path.name, "method": config.get("method"), "model": config.get("model"),
                              "reason": "; ".join(reasons)})
        return pd.DataFrame(found, columns=STALE_COLUMNS)

    def drop_stale(self) -> pd.DataFrame:
        """Delete the stale points; returns what was dropped (as `stale()` listed it)."""
        stale = self.stale()
        for name in stale["file"]:
            (self.points / name).unlink(missing_ok=True)
        return stale


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpt_utils.store",
                                     description="List or drop points whose model, data or method changed.")
    parser.add_argument("--results", default=os.environ.get("MPT_RESULTS", DEFAULT_ROOT),
                        help="results store folder (default: $MPT_RESULTS or ./results)")
    parser.add_argument("command", choices=("list-stale", "drop-stale"))
    args = parser.parse_args(argv)
    if not (Path(args.results) / "points").is_dir():
        raise MPTError(f"no results store at {args.results} (no points/ folder)",
                       "pass --results DIR, the folder given to ResultsStore")
    store = ResultsStore(args.results)
    if args.command == "list-stale":
        stale = store.stale()
        for row in stale.itertuples():
            print(f"{row.file}  {row.method}  {row.model}  {row.reason}")
        print(f"{len(stale)} stale point(s) in {store.points}")
    else:
        dropped = store.drop_stale()
        print(f"dropped {len(dropped)} stale point(s) from {store.points}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
