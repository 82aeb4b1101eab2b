"""Results store: tidy rows keyed by a hash of the full config, one atomic file per finished point.

A point is written only when it is complete (temp file + os.replace), so a crash or kill in the
middle of a sweep loses at most the point being computed, and a rerun skips every finished point.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mpt_utils import __version__

ROW_COLUMNS = ["model", "method", "family", "ratio", "bits", "metric", "value", "seed", "config_hash"]
DEFAULT_ROOT = "results"


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


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a config (keys sorted) plus the package version, so code changes re-run."""
    payload = json.dumps(_jsonable({**config, "mpt_version": __version__}), sort_keys=True)
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


class ResultsStore:
    """A folder of finished points: `<root>/points/<config_hash>.json`, each holding its rows."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(os.environ.get("MPT_RESULTS", root) if root == DEFAULT_ROOT else root)
        self.points = self.root / "points"
        self.points.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.points / f"{key}.json"

    def has(self, config: dict[str, Any]) -> bool:
        return self._path(config_hash(config)).exists()

    def load(self, config: dict[str, Any]) -> list[dict[str, Any]] | None:
        path = self._path(config_hash(config))
        if not path.exists():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # unreadable point (should not happen with atomic writes): recompute it
        return [{k: _decode(v) for k, v in row.items()} for row in payload["rows"]]

    def put(self, config: dict[str, Any], rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        key = config_hash(config)
        base = {k: config.get(k) for k in ROW_COLUMNS if k in config}
        full = [{**base, **row, "config_hash": key} for row in rows]
        payload = {"config": _jsonable(config), "config_hash": key, "finished": time.time(),
                   "mpt_version": __version__, "rows": [_jsonable(r) for r in full]}
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

    def frame(self, **filters: Any) -> pd.DataFrame:
        """All stored rows as one tidy DataFrame (optionally filtered by column == value)."""
        rows: list[dict[str, Any]] = []
        for path in sorted(self.points.glob("*.json")):
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
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
