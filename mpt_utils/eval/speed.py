"""Tokens per second of several models on one device, measured side by side in one run.

Timings on a shared machine drift (thermal state, other processes), so models are timed in
interleaved rounds, the order rotating every round, and each model's median round is reported. The
ratio against a reference model (the dense one) is the number to quote: both saw the same conditions.

Modes: `prefill` times one forward over a [batch, seqlen] prompt (throughput, as in perplexity
evaluation); `decode` times greedy generation of `new_tokens` tokens with the KV cache after a
short prompt (latency-bound serving). A value in `models` may also be a callable taking the input
ids (for engines that are not torch modules, e.g. a llama.cpp wrapper) in prefill mode.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.models import check_seqlen, pick_device

MODES = ("prefill", "decode")


@dataclass
class SpeedResult:
    name: str
    mode: str
    tokens_per_s: float
    seconds: float  # median seconds per timed call
    spread: float  # (max - min) / median over the rounds: how noisy this measurement was
    tokens: int  # tokens produced or consumed per timed call
    n_params: int | None
    speedup: float | None  # tokens_per_s / reference tokens_per_s
    reference: str | None
    device: str
    batch_size: int
    seqlen: int
    rounds: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _caller(model: nn.Module | Callable, mode: str, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    if not isinstance(model, nn.Module):
        if mode != "prefill":
            raise MPTError("callables can only be timed in prefill mode", "pass an nn.Module for decode timing")
        return lambda: model(ids)
    if mode == "prefill":
        return lambda: model(input_ids=ids, use_cache=False)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0 if pad is None else pad)


@torch.no_grad()
def measure_speed(models: dict[str, nn.Module | Callable], *, mode: str = "prefill", seqlen: int = 256,
                  batch_size: int = 1, new_tokens: int = 32, prompt_len: int = 16, rounds: int = 5,
                  warmup: int = 1, device: str | torch.device | None = None, reference: str | None = None,
                  vocab_size: int | None = None, seed: int = 0) -> list[SpeedResult]:
    """Time every model in `models` on the same random token ids, interleaved, and report tokens/s
    plus the speedup over `reference` (default: the first model, e.g. the dense one)."""
    if not models:
        raise MPTError("measure_speed got no models", "pass {'dense': model, 'pruned': other}")
    if mode not in MODES:
        raise MPTError(f"unknown speed mode {mode!r}", f"use one of {MODES}")
    if rounds < 1 or batch_size < 1:
        raise MPTError("rounds and batch_size must be >= 1", "use e.g. rounds=5, batch_size=1")
    seqlen = check_seqlen(None, seqlen)
    # a sequence beyond a model's context times a wrong (RoPE) or crashing (OPT) forward
    for model in models.values():
        if not isinstance(model, nn.Module):
            continue  # engines like llama.cpp check their own context
        if mode == "prefill":
            check_seqlen(model, seqlen)
        else:
            check_seqlen(None, new_tokens, "new_tokens")
            check_seqlen(model, prompt_len, "prompt_len")
            check_seqlen(model, prompt_len + new_tokens, "prompt_len + new_tokens")
    reference = reference if reference is not None else next(iter(models))
    if reference not in models:
        raise MPTError(f"reference {reference!r} is not among the models", f"choose one of {list(models)}")
    dev = pick_device(device)
    vocab = vocab_size or min(int(getattr(getattr(m, "config", None), "vocab_size", 0) or 32000)
                              for m in models.values())
    gen = torch.Generator().manual_seed(seed)
    length = seqlen if mode == "prefill" else prompt_len
    ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(dev)
    tokens = batch_size * (seqlen if mode == "prefill" else new_tokens)
    calls, states = {}, {}
    for name, model in models.items():
        if isinstance(model, nn.Module):
            states[name] = model.training
            model.eval()
        calls[name] = _caller(model, mode, ids, new_tokens)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    try:
        for _ in range(warmup):
            for name in names:
                calls[name]()
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                _sync(dev)
                start = time.perf_counter()
                calls[name]()
                _sync(dev)
                times[name].append(time.perf_counter() - start)
    finally:
        for name, training in states.items():
            models[name].train(training)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref_tps = tokens / med[reference]
    out = []
    for name, model in models.items():
        tps = tokens / med[name]
        n_params = sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else None
        out.append(SpeedResult(name, mode, tps, med[name], (max(times[name]) - min(times[name])) / med[name], tokens,
                               n_params, tps / ref_tps, reference, str(dev), batch_size, seqlen, rounds))
    return out
