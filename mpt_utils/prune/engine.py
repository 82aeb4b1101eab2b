"""The pruning driver: apply one registered method to every linear of every decoder block.

Three ways to get each layer's input statistics, all through mpt_utils.calibration:
- `calib_ids` with `sequential=True` (SparseGPT/Wanda protocol): block i is pruned from inputs that
  went through the already-pruned blocks 0..i-1; one block plus the activations on the device.
- `stats` from `collect_stats` (one pass over the dense model): every point of a sparsity sweep
  reuses them, and `cache` keeps each layer's ratio-independent factors (inverse Hessians). A fast
  shortcut, not the published protocol: later blocks are pruned for inputs they no longer receive.
- no statistics at all for magnitude pruning.

A block-level method (BESA, trait `block_level`) trains on each block's calibration inputs and
outputs, so it runs only with `calib_ids`. A per-block allocation (OWL) scores blocks on the dense
model in every mode; those scores do not depend on the ratio, so a sweep computes them once
(`allocation_scores`) and passes `block_scores`.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpt_utils.calibration import BlockIO, LayerStats, decoder_layers, layerwise, linear_layers
from mpt_utils.errors import MPTError
from mpt_utils.prune import PruneMethod, check_method_options, get_method
from mpt_utils.prune.masks import Pattern, parse_pattern, pattern_name, resolve_sparsity
from mpt_utils.prune.measure import sparsity_report


@dataclass
class PruneReport:
    method: str
    pattern: str
    requested: float
    achieved: float  # measured zeros / prunable weights, after pruning
    sparsity_all_params: float
    nm_ok: bool | None
    mode: str  # "sequential", "dense-stats", "one-shot dense" or "data-free"
    seconds: float
    block_targets: list[float] = field(default_factory=list)
    block_sparsity: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_prefixes(model: nn.Module) -> list[str]:
    """Module path of each decoder block (e.g. 'model.layers.3'), the key prefix of collect_stats."""
    ids = {id(layer): i for i, layer in enumerate(decoder_layers(model))}
    names = [""] * len(ids)
    for name, module in model.named_modules():
        if id(module) in ids:
            names[ids[id(module)]] = name
    return names


def _prune_block(block: nn.Module, stats: dict[str, LayerStats] | None, method: PruneMethod, sparsity: float,
                 pattern: Pattern | None, prefix: str, cache: dict | None, opts: dict) -> None:
    for name, lin in linear_layers(block).items():
        st = None
        if method.calibration:
            if stats is None or name not in stats:
                raise MPTError(f"no calibration statistics for {prefix}.{name}",
                               "collect them with mpt_utils.calibration.collect_stats on this model")
            st = stats[name]
            # a non-finite input or product shows on the diagonal Σx², so the check reads [in], not [in, in];
            # else SparseGPT blames "too few calibration windows"
            if not bool(torch.isfinite(torch.diagonal(st.gram)).all()):
                raise MPTError(f"calibration statistics for {prefix}.{name} contain NaN/inf: the activations "
                               "reaching it are not finite",
                               "check the weights with mpt_utils.models.check_finite_weights(model), or "
                               "calibrate in float32 (load_model(..., dtype='float32')) if float16 overflows")
            if st.device != lin.weight.device:  # a moved copy: the shared sweep statistics stay put
                st = copy.copy(st).to(lin.weight.device)
        layer_cache = cache.setdefault(f"{prefix}.{name}", {}) if cache is not None else None
        new = method.fn(lin.weight.data, st, sparsity, pattern, name=name, cache=layer_cache, **opts)
        lin.weight.data.copy_(new.to(lin.weight.dtype))


def _block_stats(stats: dict[str, LayerStats], prefix: str) -> dict[str, LayerStats]:
    head = prefix + "."
    return {k[len(head):]: v for k, v in stats.items() if k.startswith(head)}


def _block_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.data for n, m in linear_layers(block).items()}


def _window_opts(spec: PruneMethod, method: str, opts: dict, calib_ids, calib_seqlen: int | None) -> dict:
    """Fill `window_tokens` for methods whose statistic is a per-window sum (DSnoT): the length of
    the calibration windows, known from `calib_ids`, or given with dense `stats` as `calib_seqlen`."""
    if "window_tokens" not in inspect.signature(spec.fn).parameters or opts.get("window_tokens") is not None:
        return opts
    window = int(calib_ids.shape[1]) if calib_ids is not None else calib_seqlen
    if window is None:
        raise MPTError(f"{method} sums its statistic over one calibration window, whose length dense "
                       "statistics do not record",
                       "pass calib_seqlen=<tokens per calibration window> with stats=..., or calib_ids=...")
    return {**opts, "window_tokens": int(window)}


@torch.no_grad()
def allocation_scores(model: nn.Module, method: str, *, calib_ids=None, stats: dict[str, LayerStats] | None = None,
                      device: str | torch.device | None = None, progress: bool = False,
                      stream: bool | None = None, **opts) -> list[float] | None:
    """The dense-model block scores of `method`'s per-block allocation (OWL's outlier ratios), or
    None for a uniform method. Ratio-independent: a sweep computes them once for all its points."""
    spec = get_method(method)
    if spec.allocate is None:
        return None
    layers, prefixes = decoder_layers(model), block_prefixes(model)
    if stats is not None:
        return [spec.allocate.block_score(_block_weights(b), _block_stats(stats, p), **opts)
                for p, b in zip(prefixes, layers)]
    if calib_ids is None:
        raise MPTError(f"{method} needs calibration data", "pass calib_ids=... or stats=collect_stats(...)")
    scores: list[float] = []
    layerwise(model, calib_ids, lambda i, b, st: scores.append(spec.allocate.block_score(_block_weights(b), st, **opts)),
              sequential=False, device=device, progress=progress, desc=f"{method} block scores", stream=stream)
    return scores


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float | None = None, *, calib_ids=None,
                stats: dict[str, LayerStats] | None = None, pattern=None, sequential: bool = True,
                device: str | torch.device | None = None, cache: dict | None = None, progress: bool = False,
                calib_seqlen: int | None = None, block_scores: list[float] | None = None,
                stream: bool | None = None, **opts) -> PruneReport:
    """Prune `model` in place with registered `method` at `sparsity` (or N:M `pattern`, e.g. '2:4').

    Give either `calib_ids` (LongTensor [n, seqlen], the layer-by-layer engine) or `stats` (dense
    statistics from `collect_stats`, keyed by full module name, with `calib_seqlen` the length of
    the windows they came from); magnitude needs neither. `block_scores`: the dense block scores of
    an allocating method (from `allocation_scores`), else computed here. `stream`: the engine keeps
    the model on CPU and moves one block at a time to `device` (`mpt_utils.calibration.layerwise`;
    None: as `calibration.streaming()` sets it). `opts` go to the method (e.g. base='sparsegpt' for
    owl/dsnot, percdamp, m and lam for OWL).
    """
    spec = get_method(method)
    check_method_options(method, opts)
    nm = parse_pattern(pattern)
    target = resolve_sparsity(sparsity, nm)
    if nm is not None and not spec.supports_nm:
        raise MPTError(f"{method} does not support N:M patterns ({pattern_name(nm)})",
                       "use unstructured sparsity with this method, or another method for N:M")
    if spec.calibration and stats is None and calib_ids is None:
        raise MPTError(f"{method} needs calibration data", "pass calib_ids=... or stats=collect_stats(...)")
    if spec.block_level and stats is not None:
        raise MPTError(f"{method} trains each block on that block's own inputs and outputs, which dense "
                       "per-layer statistics do not hold",
                       "pass calib_ids=... (the layer-by-layer engine; a sweep's mode='sequential')")
    if spec.calibration:
        opts = _window_opts(spec, method, opts, None if stats is not None else calib_ids, calib_seqlen)
    if spec.allocate is not None and block_scores is not None and len(block_scores) != len(decoder_layers(model)):
        raise MPTError(f"{len(block_scores)} block scores for a model with {len(decoder_layers(model))} blocks",
                       "compute them on this model with mpt_utils.prune.engine.allocation_scores")
    layers = decoder_layers(model)
    prefixes = block_prefixes(model)
    start = time.perf_counter()

    if not spec.calibration:
        mode = "data-free"
        for prefix, block in zip(prefixes, layers):
            _prune_block(block, None, spec, target, nm, prefix, None, opts)
        targets = [target] * len(layers)
    elif stats is not None:
        mode = "dense-stats"
        targets = [target] * len(layers)
        if spec.allocate is not None:
            scores = block_scores or allocation_scores(model, method, stats=stats, **opts)
            targets = spec.allocate.ratios(scores, target, **opts)
        for prefix, block, s in zip(prefixes, layers, targets):
            _prune_block(block, _block_stats(stats, prefix), spec, s, nm, prefix, cache, opts)
    else:
        mode = "sequential" if sequential else "one-shot dense"
        targets = [target] * len(layers)
        if spec.allocate is not None:  # OWL: outlier ratios from a dense pass, as the released code does
            scores = block_scores or allocation_scores(model, method, calib_ids=calib_ids, device=device,
                                                       progress=progress, stream=stream, **opts)
            targets = spec.allocate.ratios(scores, target, **opts)

        def on_block(i: int, block: nn.Module, st: dict[str, LayerStats], io: BlockIO | None = None) -> None:
            if spec.block_level:  # BESA: the method prunes the whole block from its inputs and outputs
                spec.fn(block, st, targets[i], nm, io=io, name=prefixes[i], cache=None, **opts)
            else:
                _prune_block(block, st, spec, targets[i], nm, prefixes[i], None, opts)

        layerwise(model, calib_ids, on_block, sequential=sequential, device=device, progress=progress,
                  desc=f"prune {method}", stream=stream, block_io=spec.block_level)
    seconds = time.perf_counter() - start
    measured = sparsity_report(model, nm)
    return PruneReport(method=method, pattern=pattern_name(nm), requested=target, achieved=measured["sparsity"],
                       sparsity_all_params=measured["sparsity_all_params"], nm_ok=measured["nm_ok"], mode=mode,
                       seconds=seconds, block_targets=[float(t) for t in targets],
                       block_sparsity=measured["block_sparsity"])


def save_pruned(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write a pruned model as a transformers directory (safetensors) that `load_model(path)` reads."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
