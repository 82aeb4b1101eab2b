"""Corpora for perplexity and calibration: standard hub datasets online, embedded corpora offline."""

from __future__ import annotations

import bz2
import difflib
import hashlib
import importlib.util
import json
import numbers
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

from mpt_utils.errors import MPTError

SPLITS = ("eval", "calibration")
EMBEDDED_CORPORA = ("embedded-wiki", "embedded-news")
# name -> (datasets path, config, eval split, calibration split, text field, embedded alternative)
HUB_CORPORA: dict[str, tuple[str, str | None, str, str, str, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "train", "text", "embedded-wiki"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "train", "sentence", "embedded-news"),
    "c4": ("allenai/c4", "en", "validation", "train", "text", "embedded-wiki"),
}
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS = "lee_background.cor"
CALIBRATION_SHARE = 0.3
_CLEAN_VERSION = 1  # bump when _clean_wiki changes, so cached text is rebuilt  # fraction of articles/documents that go to the calibration split


def corpus_names() -> list[str]:
    return [*EMBEDDED_CORPORA, *HUB_CORPORA]


def _closest(name: str, names: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def check_corpus(name: str) -> None:
    """Fail early on a corpus name that is neither known nor an existing file (no text is loaded)."""
    if not isinstance(name, (str, os.PathLike)):
        raise MPTError(f"corpus name {name!r} is not a string", f"use one of {', '.join(corpus_names())}")
    name = os.fspath(name)
    if name in corpus_names():
        return
    path = Path(name).expanduser()
    if path.is_file():
        return
    what = "is a directory, not a text file" if path.is_dir() else "is neither a known corpus nor a file"
    raise MPTError(f"unknown corpus {name!r}: it {what}",
                   f"{_closest(name, corpus_names())}use one of {', '.join(corpus_names())}, "
                   "or a path to a UTF-8 text file")


def _read_corpus_file(path: Path) -> str:
    """A local corpus as text; a binary or non-UTF-8 file names the offending byte, not a traceback."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:  # NUL is valid UTF-8 but never in a text corpus
        raise MPTError(f"corpus file {path} looks binary, not text (NUL byte at offset {nul})",
                       "pass a plain-text file; text in another encoding converts with "
                       f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt`")
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is harmless
    except UnicodeDecodeError as err:
        raise MPTError(f"corpus file {path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
                       "cannot be decoded",
                       f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt`"
                       ) from None
    if not text.strip():
        raise MPTError(f"corpus file {path} is empty", "pass a text file with at least a few thousand words")
    return text


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MPTError("embedded corpora need the PyPI package 'gensim'", "pip install gensim")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def embedded_corpus_file(name: str) -> Path:
    """The gensim file an embedded corpus is built from (what the results store fingerprints)."""
    return _gensim_test_data() / {"embedded-wiki": _WIKI_DUMP, "embedded-news": _NEWS}[name]


def _in_calibration(key: str) -> bool:
    """Deterministic split by document identity: stable across runs, machines and versions."""
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < CALIBRATION_SHARE


def _clean_wiki(markup: str) -> str:
    import mwparserfromhell
    from gensim.corpora.wikicorpus import filter_wiki

    # gensim drops nested [[File:...]] / {{...}} blocks that mwparserfromhell keeps as text,
    # mwparserfromhell then strips the remaining inline markup.
    text = mwparserfromhell.parse(filter_wiki(markup)).strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        # drop leftover table/file/category debris, keep prose and headings
        if not line or line.startswith(("|", "{", "!", "Category:", "File:", "Image:", "thumb")):
            continue
        lines.append(line)
    return "\n".join(lines)


def _cache_dir() -> Path:
    base = os.environ.get("MPT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mpt_utils")
    return Path(base).expanduser()


def _parse_wiki_dump(path: Path) -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(path, "rb") as fh:
        for title, markup, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if not markup or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = _clean_wiki(markup)
            if len(text) > 200:
                articles.append((title, f"= {title} =\n{text}"))
    return articles


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every real article in gensim's Wikipedia sample, redirects dropped.
    Parsing takes ~12 s, so the cleaned text is cached on disk, keyed by the dump's size."""
    from mpt_utils.store import atomic_write_text

    path = _gensim_test_data() / _WIKI_DUMP
    cache = _cache_dir() / f"embedded-wiki-v{_CLEAN_VERSION}-{path.stat().st_size}.json"
    if cache.exists():
        try:
            return tuple(tuple(a) for a in json.loads(cache.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass  # damaged cache: rebuild it
    articles = _parse_wiki_dump(path)
    try:
        atomic_write_text(cache, json.dumps(articles))
    except OSError:
        pass  # a read-only home is fine, we just parse again next time
    return tuple(articles)


@lru_cache(maxsize=1)
def news_documents() -> tuple[str, ...]:
    path = _gensim_test_data() / _NEWS
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _hub_text(name: str, split: str) -> str:
    from mpt_utils.models import hub_reachable

    path, config, eval_split, calib_split, field, alternative = HUB_CORPORA[name]
    if not hub_reachable():
        raise MPTError(
            f"dataset {name!r} needs the Hugging Face hub, which is unreachable",
            f"use the embedded stand-in data={alternative!r} (offline), or run with network access",
        )
    import datasets

    try:
        if name == "c4":  # the full C4 is terabytes; the papers use one shard of each split
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz"}
            key = calib_split if split == "calibration" else eval_split
            ds = datasets.load_dataset(path, data_files={key: files[key]}, split=key)
            if split == "eval":
                ds = ds.select(range(1100))  # the GPTQ/Wanda protocol's C4 validation subset
        else:
            ds = datasets.load_dataset(path, config, split=calib_split if split == "calibration" else eval_split)
    except Exception as err:
        raise MPTError(f"could not load dataset {name!r}: {type(err).__name__}: {str(err)[:200]}",
                       f"use the embedded stand-in data={alternative!r}") from None
    sep = " " if name == "c4" and split == "calibration" else "\n\n"
    return sep.join(ds[field])


def load_text(name: str, split: str = "eval") -> str:
    """The text of corpus `name` for `split` ('eval' or 'calibration'), documents joined by blank lines."""
    if split not in SPLITS:
        raise MPTError(f"unknown split {split!r}", f"{_closest(str(split), SPLITS)}use one of {', '.join(SPLITS)}")
    check_corpus(name)
    name = os.fspath(name)
    if name == "embedded-wiki":
        docs = [text for title, text in wiki_articles() if _in_calibration(title) == (split == "calibration")]
    elif name == "embedded-news":
        # keyed by content: the Lee corpus repeats some stories, and a repeat must not cross splits
        docs = [d for d in news_documents() if _in_calibration(d) == (split == "calibration")]
    elif name in HUB_CORPORA:
        return _hub_text(name, split)
    else:
        path = Path(name).expanduser()
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", _read_corpus_file(path)) if p.strip()]
        docs = [p for p in paragraphs if _in_calibration(p) == (split == "calibration")]
        if not docs or len(docs) == len(paragraphs):
            return "\n\n".join(paragraphs)  # too small to split in two: the same text serves both
    return "\n\n".join(docs)


@lru_cache(maxsize=16)
def _token_ids_cached(tokenizer, name: str, split: str) -> torch.Tensor:
    text = load_text(name, split)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def token_ids(tokenizer, name: str, split: str = "eval") -> torch.Tensor:
    """Tokenize the joined split once (the perplexity protocol) and return a 1-D LongTensor."""
    try:
        return _token_ids_cached(tokenizer, name, split)
    except TypeError:  # unhashable tokenizer
        return _token_ids_cached.__wrapped__(tokenizer, name, split)


def eval_ids(tokenizer, name: str) -> torch.Tensor:
    return token_ids(tokenizer, name, "eval")


def calibration_windows(tokenizer, name: str, n: int = 128, seqlen: int = 2048, seed: int = 0, *,
                        model: torch.nn.Module | None = None) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from the calibration split, reproducible from `seed`.
    With `model`, `seqlen` is also checked against its context length (the engine checks it anyway)."""
    from mpt_utils.models import check_seqlen

    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise MPTError(f"n={n!r} is not a positive number of calibration windows",
                       "use e.g. n=128 (paper) or n=32 (embedded)")
    n = int(n)
    seqlen = check_seqlen(model, seqlen)
    if seqlen < 2:
        raise MPTError(f"seqlen={seqlen} is too short for a calibration window",
                       "use e.g. n=128, seqlen=2048 (paper) or n=32, seqlen=256 (embedded)")
    check_corpus(name)
    ids = token_ids(tokenizer, name, "calibration")
    if ids.numel() <= seqlen:  # a random start needs at least one token beyond the window
        have = ids.numel()
        raise MPTError(f"calibration split of {name!r} has {have} tokens; a window of seqlen={seqlen} "
                       f"needs at least {seqlen + 1}",
                       f"pass seqlen <= {have - 1}, or a larger corpus" if have > 2 else "use a larger corpus")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
