"""Structured pruning: methods that make the model physically smaller (fewer blocks, KV-head groups,
MLP channels, or a smaller hidden size), not masks.

Every method has the shared signature

    fn(model, ratio, calib_ids, *, cache=None, seed=0, device=None, progress=True, **options) -> dict

It prunes `model` in place and returns a detail dict (what it removed). `calib_ids` is a
LongTensor [n, seqlen] of calibration windows (None for the calibration-free `random`). `cache` is
an optional dict shared across calls on copies of the same dense model and calibration set, so a
ratio sweep scores the dense model once. Call methods through `structured_prune`, which validates the
ratio and measures the achieved parameter reduction from the tensors.

What `ratio` means, per method (the knob of each paper, as in Table 1):
  shortgpt, sleb, srad, fraction of decoder blocks removed
  shortened_llama
  flap, llm_pruner,     fraction of decoder-block parameters removed (attention + MLP), with heads
  random                removed as whole KV groups under GQA
  slicegpt              fraction of the hidden size sliced away
  random_prunenet       fraction of every block's MLP channels (PruneNet's ratio, up to 0.9)
The achieved reduction of all parameters (embeddings included) is always reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mpt_utils.errors import MPTError, check_ratio
from mpt_utils.registry import Registry

StructuredFn = Callable[..., dict]
# what `structured_prune` and the sweep pass themselves; the rest of the keywords are options
ENGINE_ARGS = ("model", "ratio", "calib_ids", "cache", "seed", "device", "progress")
# Every module of this package is imported on first lookup; each method module registers itself with
# `@STRUCTURED.register(name, version=, display=, calibration=)`.
STRUCTURED: Registry[StructuredFn] = Registry("structured pruning method", ENGINE_ARGS, family="structured",
                                              package=__name__)


@dataclass
class StructuredResult:
    method: str
    ratio: float  # requested, in the method's own unit (see module docstring)
    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    n_layers_before: int
    n_layers_after: int
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def param_reduction(self) -> float:
        """Fraction of all parameters removed, measured on the tensors."""
        return 1.0 - self.params_after / self.params_before

    @property
    def block_reduction(self) -> float:
        """Fraction of decoder-block parameters removed, measured on the tensors."""
        return 1.0 - self.block_params_after / self.block_params_before

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "param_reduction": self.param_reduction, "block_reduction": self.block_reduction}


def structured_prune(model: nn.Module, method: str, ratio: float, calib_ids: torch.Tensor | None = None,
                     **options: Any) -> StructuredResult:
    """Prune `model` in place with `method` at `ratio`; report requested vs achieved reduction."""
    from mpt_utils.calibration import decoder_layers
    from mpt_utils.prune.structured.surgery import block_params, count_params, finalize

    fn = STRUCTURED.get(method)
    ratio = check_ratio(ratio)
    STRUCTURED.check_options(method, {k: v for k, v in options.items() if k not in ENGINE_ARGS})
    if STRUCTURED.info(method).calibration and calib_ids is None:
        raise MPTError(f"{method} needs calibration windows", "pass calib_ids=calibration_windows(tokenizer, ...)")
    before, block_before = count_params(model), block_params(model)
    layers_before = len(decoder_layers(model))
    start = time.perf_counter()
    detail = fn(model, ratio, calib_ids, **options)
    finalize(model)
    return StructuredResult(method, ratio, before, count_params(model), block_before, block_params(model),
                            layers_before, len(decoder_layers(model)), time.perf_counter() - start, detail)


def cached(cache: dict | None, name: str, calib_ids: torch.Tensor | None, compute: Callable[[], Any]) -> Any:
    """`compute()` once per (statistic, calibration set) when the caller shares a `cache` dict across a
    sweep on copies of one dense model; without a cache it just computes."""
    if cache is None:
        return compute()
    key = name if calib_ids is None else f"{name}:{tuple(calib_ids.shape)}:{int(calib_ids.long().sum())}"
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    from mpt_utils.models import pick_device

    return pick_device(device) if device is not None else next(model.parameters()).device


__all__ = ["STRUCTURED", "StructuredResult", "structured_prune"]
