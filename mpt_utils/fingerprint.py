"""Content fingerprints of what a point was computed from: the files behind a model spec or a corpus.

The results store puts these into each point's key, so replacing a model directory, a GGUF or a
corpus file at the same path recomputes the points that used it. A fingerprint is a short sha256 of
file contents; hashing never loads a model. File hashes are cached by (path, size, mtime_ns) in a
small JSON file, so a 100 MB GGUF is read once, not at every point of every sweep.

`None` means "cannot be resolved here" (a missing file, a hub model not in the local cache, a name
that is no corpus): such inputs are left out of the key instead of failing, and loading the model or
corpus reports the real problem when the point has to be computed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mpt_utils.errors import MPTError

CACHE_NAME = ".fingerprints.json"
_CHUNK = 1 << 20
# files of a model directory that do not change the model: docs and git metadata
_IGNORED_SUFFIXES = (".md",)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


class FingerprintCache:
    """File hashes keyed by absolute path and validated by (size, mtime_ns); persisted as JSON at
    `path` (None: kept in memory only). A damaged or unwritable cache only costs re-hashing."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list] = self._read()

    def _read(self) -> dict[str, list]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            files = json.loads(self.path.read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 3}

    def _save(self) -> None:
        if self.path is None:
            return
        from mpt_utils.store import atomic_write_text

        merged = {**self._read(), **self._entries}  # keep what other processes added meanwhile
        try:
            atomic_write_text(self.path, json.dumps({"files": merged}, indent=0, sort_keys=True))
        except OSError:
            pass  # a read-only store still works, it just hashes again next session

    def file_hash(self, path: str | os.PathLike) -> str:
        """sha256 of the file at `path`, re-read only when its size or mtime changed."""
        real = Path(path).resolve()
        st = real.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self._entries.get(str(real))
        if entry is not None and entry[:2] == stamp:
            return entry[2]
        digest = sha256_file(real)
        self._entries[str(real)] = [*stamp, digest]
        self._save()
        return digest


_MEMORY = FingerprintCache(None)


def _file(path: Path, cache: FingerprintCache | None) -> str:
    return _short("file", (cache or _MEMORY).file_hash(path))


def _member_hash(path: Path, cache: FingerprintCache | None) -> str:
    real = path.resolve()
    if real.parent.name == "blobs":  # Hugging Face cache: a blob is named by its content hash
        return real.name
    return (cache or _MEMORY).file_hash(real)


def directory_fingerprint(folder: str | os.PathLike, cache: FingerprintCache | None = None) -> str:
    """Fingerprint of a model directory: every top-level file (weights, config, tokenizer) by name
    and content; hidden files and docs are left out."""
    folder = Path(folder)
    members = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                     and not p.name.endswith(_IGNORED_SUFFIXES))
    return _short("dir", *(f"{p.name}={_member_hash(p, cache)}" for p in members))


def _hub_snapshot(repo_id: str) -> Path | None:
    """The locally cached snapshot of a hub model, without any network access; None if not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: not resolvable offline
        return None


def model_fingerprint(spec: str, cache: FingerprintCache | None = None) -> str | None:
    """Fingerprint of the files `mpt_utils.models.load_model(spec)` would read (same resolution
    order), or None when they cannot be found here."""
    from mpt_utils.models import EMBEDDED, embedded_path

    if spec.startswith("tiny-"):  # random tiny test models: defined by their name and seed alone
        return _short("name", spec)
    if spec in EMBEDDED:
        try:
            return _file(embedded_path(spec), cache)
        except MPTError:
            return None
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _file(path, cache) if path.is_file() else None
    if path.is_dir():
        return directory_fingerprint(path, cache)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return None
    snapshot = _hub_snapshot(spec)
    return directory_fingerprint(snapshot, cache) if snapshot is not None else None


def data_fingerprint(name: str, cache: FingerprintCache | None = None) -> str | None:
    """Fingerprint of corpus `name` as `mpt_utils.data.load_text` resolves it: the gensim file of
    an embedded corpus (plus the text-cleaning version), the name of a hub dataset, or a text file."""
    from mpt_utils import data

    if name in data.EMBEDDED_CORPORA:
        try:
            path = data.embedded_corpus_file(name)
        except MPTError:
            return None
        clean = f"clean-v{data._CLEAN_VERSION}" if name == "embedded-wiki" else ""
        return _short("corpus", _file(path, cache), clean) if path.is_file() else None
    if name in data.HUB_CORPORA:
        return _short("hub-dataset", name)  # pinned by the loader (dataset, config, split, shard)
    path = Path(name).expanduser()
    return _file(path, cache) if path.is_file() else None
