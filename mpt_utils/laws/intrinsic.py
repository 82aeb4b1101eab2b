"""Intrinsic quality: test cross-entropy per token and in bits per byte.

Cross-entropy follows the suite's perplexity protocol (`mpt_utils.eval.perplexity`: one tokenization
of the evaluation split, non-overlapping windows of `seqlen`, mean NLL of every token but the first
of each window, in nats), with one addition: a model whose tokenizer starts every text with a BOS
token (Gemma) sees BOS before each window, as in its training. Gemma 3 relies on it (measured on two
256-token windows of embedded-wiki: 3.83 nats/token without, 2.67 with); SmolLM2's tokenizer adds
none, so its numbers equal the suite's protocol. The scored tokens are the same either way.

Nats per token depend on the tokenizer (SmolLM2's 49k BPE vocabulary vs Gemma 3's 262k one cut the
same text into different numbers of tokens), so models are compared in bits per byte: the NLL summed
over the scored tokens, in bits, divided by the UTF-8 bytes those tokens decode to.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from mpt_utils.data import check_corpus, eval_ids
from mpt_utils.eval.perplexity import PerplexityResult, nll_from_logits, window_ids
from mpt_utils.models import check_seqlen, pick_device


def bos_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of a text by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return int(bos) if ids and ids[0] == bos else None


@torch.no_grad()
def cross_entropy(model: torch.nn.Module, tokenizer, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                  batch_size: int = 1, device: str | torch.device | None = None) -> PerplexityResult:
    """The perplexity protocol's result (nll = cross-entropy in nats/token) with the model's BOS
    convention: BOS, when the tokenizer adds one, is context only, never scored."""
    bos = bos_id(tokenizer)
    check_seqlen(model, seqlen + (bos is not None))
    dev = pick_device(device) if device is not None else next(model.parameters()).device
    windows = window_ids(ids, seqlen, max_windows)
    was_training = model.training
    model.eval()
    sums = []
    start = time.perf_counter()
    for i in range(0, windows.size(0), batch_size):
        batch = windows[i : i + batch_size].to(dev)
        if bos is None:
            logits = model(input_ids=batch, use_cache=False).logits
        else:  # logits at BOS predict the window's first token, which is not scored: drop them
            full = torch.cat([torch.full_like(batch[:, :1], bos), batch], dim=1)
            logits = model(input_ids=full, use_cache=False).logits[:, 1:]
        sums.append(nll_from_logits(logits, batch).cpu())
    model.train(was_training)
    return PerplexityResult.from_window_sums(torch.cat(sums), windows, time.perf_counter() - start)


def scored_bytes(tokenizer, ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> int:
    """UTF-8 bytes of the tokens the protocol scores (every window but its first token). Measured as
    decode(window) minus decode(first token), so SentencePiece's handling of a leading space in a
    window that starts mid-text neither drops nor adds bytes."""
    total = 0
    for w in window_ids(ids, seqlen, max_windows).tolist():
        full = tokenizer.decode(w, skip_special_tokens=False).encode("utf-8")
        head = tokenizer.decode(w[:1], skip_special_tokens=False).encode("utf-8")
        total += len(full) - len(head)
    return total


def ce_rows(model: torch.nn.Module, tokenizer, datasets: list[str], seqlen: int, max_windows: int | None = None,
            device: str | None = None) -> list[dict[str, Any]]:
    """Per corpus: rows metric='ce' (nats/token, with its standard error across windows) and
    metric='bpb' (bits per byte), plus the tokens and bytes they were measured on."""
    for name in datasets:  # every corpus is checked before the first evaluation runs
        check_corpus(name)
    rows = []
    for name in datasets:
        ids = eval_ids(tokenizer, name)
        res = cross_entropy(model, tokenizer, ids, seqlen, max_windows, device=device)
        n_bytes = scored_bytes(tokenizer, ids, seqlen, max_windows)
        to_bits = res.n_tokens / (math.log(2) * n_bytes)
        extra = {"data": name, "n_tokens": res.n_tokens, "n_bytes": n_bytes, "n_windows": res.n_windows,
                 "seqlen": seqlen, "bos": bos_id(tokenizer) is not None, "ppl": res.ppl,
                 "tokens_per_s": res.tokens_per_s}
        rows.append({"metric": "ce", "value": res.nll, "stderr": res.nll_se, **extra})
        rows.append({"metric": "bpb", "value": res.nll * to_bits if math.isfinite(res.nll) else math.inf,
                     "stderr": res.nll_se * to_bits, **extra})
    return rows
