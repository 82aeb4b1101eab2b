"""Perplexity and the paired divergence from the dense model, from one forward pass per window.

Every sweep scores a point with `PairedEvaluator.rows`: the perplexity row (with its standard error
over windows) and, beside it, the KL-divergence rows of `mpt_utils.eval.divergence` against the dense
model on the same windows. The dense reference (top-k log-probs per position) is computed once per
(model, corpus, seqlen, windows, k), while the model is still dense, and cached on disk under
`<store>/dense_logits/` when the model and corpus can be fingerprinted; so the paired metric costs
no extra forward pass of the compressed model and one dense pass per evaluation set in total.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.divergence import (
    DEFAULT_K,
    DenseReference,
    dense_reference,
    divergence,
    reference_dir,
    reference_key,
)
from mpt_utils.eval.perplexity import PerplexityResult, perplexity_rows, window_ids


def ppl_row(res: PerplexityResult, data: str, seqlen: int) -> dict[str, Any]:
    """The tidy perplexity row every sweep stores (`stderr`: standard error of `value`)."""
    return {"metric": "ppl", "data": data, "value": res.ppl, "stderr": res.ppl_se, "nll": res.nll,
            "nll_stderr": res.nll_se, "n_tokens": res.n_tokens, "n_windows": res.n_windows, "seqlen": seqlen,
            "tokens_per_s": res.tokens_per_s}


class PairedEvaluator:
    """Scores models on `datasets`' perplexity windows, paired with the dense model's distributions.

    `prepare(dense_model)` must run while the model is dense (a sweep calls it before its first
    compression); it reads or computes one reference per corpus. `k=None` switches the paired metric
    off (perplexity only)."""

    def __init__(self, model_spec: str, tokenizer: Any, seqlen: int, max_windows: int | None, *,
                 store_root: str | Path | None = None, device: str | None = None, k: int | None = DEFAULT_K):
        self.model_spec, self.tokenizer, self.seqlen, self.max_windows = model_spec, tokenizer, seqlen, max_windows
        self.store_root, self.device, self.k = store_root, device, k
        self._refs: dict[str, DenseReference] = {}
        self._ids: dict[str, torch.Tensor] = {}

    @property
    def config(self) -> dict[str, Any]:
        """What the paired metric adds to a point's key (changing k changes the stored rows)."""
        return {"divergence_k": self.k}

    def ids(self, data: str) -> torch.Tensor:
        from mpt_utils.data import eval_ids

        if data not in self._ids:
            self._ids[data] = eval_ids(self.tokenizer, data)
        return self._ids[data]

    def prepare(self, dense_model: torch.nn.Module, datasets: Iterable[str], progress: bool = False) -> None:
        """Read or compute the dense reference of each corpus; `dense_model` must be uncompressed."""
        if self.k is None:
            return
        for data in datasets:
            if data in self._refs:
                continue
            key = reference_key(self.model_spec, data, self.seqlen, self.max_windows, self.k)
            cache = reference_dir(self.store_root) if self.store_root is not None and key else None
            self._refs[data] = dense_reference(dense_model, self.ids(data), self.seqlen, self.max_windows, k=self.k,
                                               cache_dir=cache, key=key, device=self.device, progress=progress)

    def references(self) -> dict[str, DenseReference]:
        """The prepared dense references by corpus (what a distributed sweep computes once and
        hands to every worker's evaluator with `use_references`)."""
        return dict(self._refs)

    def use_references(self, refs: dict[str, DenseReference]) -> None:
        """Adopt dense references prepared elsewhere (same model, corpus, seqlen, windows and k):
        `prepare` then skips those corpora instead of running the dense model again."""
        for data, ref in refs.items():
            if ref.seqlen != self.seqlen:
                raise MPTError(f"the dense reference of {data!r} has seqlen {ref.seqlen}, this evaluator {self.seqlen}",
                               "hand over references prepared with the same protocol")
            self._refs[data] = ref

    def rows(self, model: torch.nn.Module | str | os.PathLike, datasets: Sequence[str], progress: bool = False,
             llamacpp: dict[str, Any] | None = None, **extra: Any) -> list[dict[str, Any]]:
        """Perplexity row, then the divergence rows, per corpus; without a prepared reference for a
        corpus (or with k=None) only perplexity. `model` may be a GGUF file: llama.cpp scores it in a
        child process (`llamacpp`: n_threads, kv_type, n_gpu_layers), which needs a prepared reference."""
        if isinstance(datasets, str):
            datasets = [datasets]
        out: list[dict[str, Any]] = []
        for data in datasets:
            ref = self._refs.get(data)
            if ref is None and isinstance(model, (str, os.PathLike)):
                raise MPTError(f"no dense reference prepared for {data!r}",
                               "call prepare(dense_model, [data]) before scoring a GGUF file")
            if ref is None:
                rows = perplexity_rows(model, self.tokenizer, [data], self.seqlen, self.max_windows,
                                       device=self.device, progress=progress)
                out += [{**r, **extra} for r in rows]
                continue
            div = divergence(model, ref, device=self.device, progress=progress, desc=f"ppl+kl {data}",
                             **(llamacpp or {}))
            sums = torch.tensor(div.window_nll, dtype=torch.float64) * (ref.seqlen - 1)
            res = PerplexityResult.from_window_sums(sums, window_ids(self.ids(data), self.seqlen, self.max_windows),
                                                    div.seconds)
            out.append({**ppl_row(res, data, self.seqlen), **extra})
            out += div.rows(data, **extra)
        return out
