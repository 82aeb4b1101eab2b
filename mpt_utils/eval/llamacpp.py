"""Perplexity, throughput and KL divergence of a GGUF with llama.cpp (llama-cpp-python) on the torch
evaluator's windows.

Exactly the protocol of `mpt_utils.eval.perplexity`: the same non-overlapping windows from
`window_ids`, each evaluated from an empty KV cache with no BOS added, the NLL of tokens 1..n-1
given their prefix summed per window by the same `nll_from_logits` (so the standard error across
windows is the torch one), tokens/s = windows x seqlen / loop time. The KL divergence against a
dense reference (`mpt_utils.eval.divergence`) is computed inside the llama.cpp child by the same
`position_stats`: the compact reference goes in, per-position statistics come out, the full
vocabulary logits never cross the process boundary.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import DenseReference
from mpt_utils.eval.perplexity import PerplexityResult, nll_from_logits, window_ids
from mpt_utils.native import in_child, run_isolated
from mpt_utils.progress import progress_bar

KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids for the KV cache


def open_gguf(path: str | os.PathLike, seqlen: int, n_threads: int | None = None, kv_type: str = "f16",
              n_gpu_layers: int = 0):
    """A llama_cpp.Llama that keeps the logits of every position of a `seqlen`-token window.
    `n_gpu_layers=-1` offloads every layer when llama-cpp-python was built with CUDA/Metal."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MPTError("llama.cpp evaluation needs llama-cpp-python", "pip install llama-cpp-python") from None
    from mpt_utils.quant.gguf.fileinfo import read_gguf

    read_gguf(path)  # a clear error for missing/corrupt files before llama.cpp prints its own
    if kv_type not in KV_TYPES:
        raise MPTError(f"unknown KV cache type {kv_type!r}", f"use one of {sorted(KV_TYPES)}")
    threads = n_threads or os.cpu_count() or 1
    try:
        return Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                     n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers, verbose=False,
                     type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
    except ValueError as err:  # llama-cpp-python raises ValueError when llama.cpp cannot load the model
        raise MPTError(f"llama.cpp could not load {path}: {err}",
                       "check the GGUF's architecture and tokenizer metadata") from None


def _check_vocab(llm, windows: torch.Tensor) -> int:
    vocab = llm.n_vocab()
    if int(windows.max()) >= vocab:
        raise MPTError(f"token id {int(windows.max())} is outside the GGUF's vocabulary of {vocab}",
                       "evaluate with the tokenizer of the exported model")
    return vocab


def _window_logits(llm, window: torch.Tensor) -> torch.Tensor:
    """[1, seqlen, vocab] logits of one window from an empty KV cache (each window stands alone,
    as in the torch evaluator)."""
    llm.reset()
    llm.eval(window.tolist())
    return torch.from_numpy(np.asarray(llm.scores[: window.numel()], dtype=np.float32)).unsqueeze(0)


def _window_nll(path: str, windows: torch.Tensor, n_threads: int | None, kv_type: str, n_gpu_layers: int,
                progress: bool, desc: str) -> tuple[torch.Tensor, float]:
    """NLL of each of `windows` summed over its tokens under llama.cpp, and the seconds the loop took."""
    llm = open_gguf(path, windows.size(1), n_threads, kv_type, n_gpu_layers)
    _check_vocab(llm, windows)
    sums = torch.zeros(windows.size(0), dtype=torch.float64)
    start = time.perf_counter()
    try:
        for i, window in enumerate(progress_bar(windows, desc=desc, disable=not progress, leave=False)):
            sums[i] = nll_from_logits(_window_logits(llm, window), window.unsqueeze(0))[0]
        return sums, time.perf_counter() - start
    finally:
        llm.close() if hasattr(llm, "close") else None


def _window_divergence(path: str, reference: dict[str, torch.Tensor], vocab_size: int, n_threads: int | None,
                       kv_type: str, n_gpu_layers: int, progress: bool,
                       desc: str) -> tuple[dict[str, torch.Tensor], float]:
    """Per-position divergence statistics (`position_stats`) of the GGUF against a compact dense
    reference, and the seconds the loop took."""
    from mpt_utils.eval.divergence import position_stats

    windows = reference["windows"]
    llm = open_gguf(path, windows.size(1), n_threads, kv_type, n_gpu_layers)
    vocab = _check_vocab(llm, windows)
    if vocab != vocab_size:
        raise MPTError(f"the GGUF has {vocab} output tokens, the dense reference {vocab_size}",
                       "compare models that share the dense model's tokenizer")
    parts = []
    start = time.perf_counter()
    try:
        for i in progress_bar(range(windows.size(0)), desc=desc, disable=not progress, leave=False):
            ref = {name: value[i : i + 1] for name, value in reference.items()}
            parts.append(position_stats(_window_logits(llm, windows[i]), ref))
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}, time.perf_counter() - start
    finally:
        llm.close() if hasattr(llm, "close") else None


def llamacpp_perplexity(path: str | os.PathLike, ids: torch.Tensor, seqlen: int = 2048,
                        max_windows: int | None = None, n_threads: int | None = None, kv_type: str = "f16",
                        progress: bool = True, desc: str = "llama.cpp ppl", n_gpu_layers: int = 0,
                        isolate: bool = True) -> PerplexityResult:
    """Perplexity of the GGUF at `path` on 1-D token ids `ids` (same windows and NLL as torch).
    `isolate` runs llama.cpp in a child process (a few seconds of start-up) so that a crash in
    native code is reported, not fatal. A missing or corrupt file is reported by `open_gguf`."""
    windows = window_ids(ids, seqlen, max_windows)
    args = {"path": str(path), "windows": windows, "n_threads": n_threads, "kv_type": kv_type,
            "n_gpu_layers": n_gpu_layers, "progress": progress, "desc": desc}
    if isolate and not in_child():
        sums, seconds = run_isolated("mpt_utils.eval.llamacpp:_window_nll", args, what=str(path),
                                     show_output=progress)
    else:
        sums, seconds = _window_nll(**args)
    return PerplexityResult.from_window_sums(sums, windows, seconds)


def llamacpp_divergence_positions(path: str | os.PathLike, reference: DenseReference, n_threads: int | None = None,
                                  kv_type: str = "f16", n_gpu_layers: int = 0, progress: bool = True,
                                  desc: str = "llama.cpp divergence",
                                  isolate: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """Per-position KL, next-token log-prob and same-top-1 of the GGUF at `path` against `reference`
    ([n_windows, seqlen-1] each) and the loop's seconds; use `mpt_utils.eval.divergence.divergence`."""
    args = {"path": str(path), "reference": reference.compact(), "vocab_size": reference.vocab_size,
            "n_threads": n_threads, "kv_type": kv_type, "n_gpu_layers": n_gpu_layers, "progress": progress,
            "desc": desc}
    if isolate and not in_child():
        return run_isolated("mpt_utils.eval.llamacpp:_window_divergence", args, what=str(path),
                            show_output=progress)
    return _window_divergence(**args)


def llamacpp_logits(path: str | os.PathLike, window: torch.Tensor, n_threads: int | None = None,
                    kv_type: str = "f32", isolate: bool = True) -> torch.Tensor:
    """[seqlen, vocab] logits of one window (for exactness checks against torch), in a child process
    unless `isolate=False`."""
    if isolate and not in_child():
        return run_isolated("mpt_utils.eval.llamacpp:llamacpp_logits",
                            {"path": str(path), "window": window, "n_threads": n_threads, "kv_type": kv_type,
                             "isolate": False}, what=str(path))
    llm = open_gguf(path, window.numel(), n_threads, kv_type)
    try:
        llm.reset()
        llm.eval(window.tolist())
        return torch.from_numpy(np.array(llm.scores[: window.numel()], dtype=np.float32))
    finally:
        llm.close() if hasattr(llm, "close") else None
