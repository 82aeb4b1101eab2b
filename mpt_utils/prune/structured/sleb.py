"""SLEB: remove redundant decoder blocks one at a time, each time the block whose removal gives the
lowest perplexity on the calibration windows (greedy, re-evaluated after every removal, so
interactions between removed blocks are accounted for).

Reference: "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of Transformer
Blocks", Song, Oh, Kim, Kim, Kim and Kim, arXiv:2402.09025 (ICML 2024),
github.com/jiwonsong-dev/SLEB (`sleb.py`). Its search only visits alive blocks
`range(early_barrier, n_alive - latter_barrier)` with both barriers 1 by default, so the first and
the last block are never removed; `early_barrier` / `latter_barrier` default to the same and 0 lifts
the protection. Calibration: 128 windows of 2048 tokens of WikiText-2 in the reference (the sweep's
profile sets ours); blocks are scored by the summed NLL, which ranks them as the reference's loss does.

The greedy sequence for k removals is a prefix of the one for k+1, so a sweep computes it once, to
its largest ratio. Each candidate is scored from the cached inputs of its own block: blocks before
it are unchanged by its removal, which halves the cost of a naive re-run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mpt_utils.calibration import capture_block_inputs, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, model_device
from mpt_utils.prune.structured.surgery import drop_blocks

CACHE_BYTES = 4 * 2**30  # keep per-block inputs only when they fit in this budget


def _head(model: nn.Module) -> nn.Module:
    """Final norm + LM head as one callable on the last hidden states."""
    base = getattr(model, "model", model)
    norm = getattr(base, "norm", None) or getattr(getattr(base, "decoder", None), "final_layer_norm", None)
    if norm is None or getattr(getattr(base, "decoder", None), "project_out", None) is not None:
        raise MPTError(f"SLEB cannot find the final norm of {type(model).__name__}",
                       "use a Llama/Qwen2/Mistral/Gemma/OPT decoder")
    return nn.Sequential(norm, model.get_output_embeddings())


def _run(layers, alive: list[int], x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for j in alive:
        out = layers[j](x, **kwargs)
        x = out[0] if isinstance(out, (tuple, list)) else out
    return x


@torch.no_grad()
def removal_order(model: nn.Module, calib_ids: torch.Tensor, n_remove: int, prefix: list[int] | None = None,
                  device: str | torch.device | None = None, progress: bool = True, early_barrier: int = 1,
                  latter_barrier: int = 1) -> list[int]:
    """Original indices of the first `n_remove` blocks SLEB removes, extending `prefix` if given.
    The first `early_barrier` and last `latter_barrier` blocks are never candidates."""
    layers = decoder_layers(model)
    _check_barriers(len(layers), n_remove, early_barrier, latter_barrier)
    dev = model_device(model, device)
    model.to(dev)
    was_training = model.training
    model.eval()
    head = _head(model)
    inputs, kwargs = capture_block_inputs(model, calib_ids, dev)
    removed = list(prefix or [])
    per_block = sum(x.numel() * x.element_size() for x in inputs)
    keep_cache = per_block * len(layers) <= CACHE_BYTES
    bar = progress_bar(total=n_remove, initial=min(len(removed), n_remove), desc="SLEB", disable=not progress, leave=False)
    try:
        while len(removed) < n_remove:
            alive = [j for j in range(len(layers)) if j not in removed]
            block_in: dict[int, list[torch.Tensor]] = {}
            if keep_cache:  # inputs of every alive block under the current removals
                xs = list(inputs)
                for j in alive:
                    block_in[j] = xs
                    xs = [_run(layers, [j], x, kwargs) for x in xs]
            best, best_nll = -1, float("inf")
            for pos, j in enumerate(alive):
                if pos < early_barrier or pos >= len(alive) - latter_barrier:
                    continue  # protected ends (the barriers never shift: their blocks are never removed)
                rest = alive[pos + 1:]
                starts = block_in[j] if keep_cache else [_run(layers, alive[:pos], x, kwargs) for x in inputs]
                nll = 0.0
                for x, window in zip(starts, calib_ids):
                    logits = head(_run(layers, rest, x, kwargs))
                    nll += float(nll_from_logits(logits, window.unsqueeze(0)).sum())
                if nll < best_nll:
                    best, best_nll = j, nll
            removed.append(best)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return removed


def _check_barriers(n_layers: int, n_remove: int, early: int, latter: int) -> None:
    if early < 0 or latter < 0:
        raise MPTError(f"SLEB barriers must be >= 0, got early_barrier={early}, latter_barrier={latter}",
                       "use the reference's early_barrier=1, latter_barrier=1 (0 lifts the protection)")
    if n_remove > n_layers - early - latter:
        raise MPTError(f"SLEB cannot remove {n_remove} of {n_layers} blocks with the first {early} and last "
                       f"{latter} protected", "use a smaller ratio, or lower early_barrier / latter_barrier")


@STRUCTURED.register("sleb", version=2, display="SLEB", calibration=True)
def sleb(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None, seed: int = 0,
         early_barrier: int = 1, latter_barrier: int = 1, device: str | torch.device | None = None,
         progress: bool = True) -> dict:
    """Greedily remove round(ratio * n_blocks) blocks by calibration perplexity, never one of the first
    `early_barrier` or last `latter_barrier` blocks (the reference's 1 and 1). When the protected ends
    leave fewer blocks than requested (tiny models), all unprotected blocks go and a warning says so;
    the achieved reduction is measured as always."""
    n_layers = len(decoder_layers(model))
    requested = int(round(ratio * n_layers))
    _check_barriers(n_layers, 0, early_barrier, latter_barrier)
    n_remove = min(requested, max(n_layers - early_barrier - latter_barrier, 0))
    if n_remove < requested:  # only tiny models get here: 30 blocks allow ratios up to 0.93
        warnings.warn(f"SLEB: {requested} of {n_layers} blocks requested but the first {early_barrier} and last "
                      f"{latter_barrier} are protected; removing {n_remove} (early_barrier=0 / latter_barrier=0 "
                      "lift the protection)", stacklevel=2)
    key = f"sleb:{tuple(calib_ids.shape)}:{int(calib_ids.long().sum())}:{early_barrier}:{latter_barrier}"
    prefix = list(cache.get(key, [])) if cache is not None else []
    if len(prefix) < n_remove:
        prefix = removal_order(model, calib_ids, n_remove, prefix, device, progress, early_barrier, latter_barrier)
        if cache is not None:
            cache[key] = prefix
    order = prefix[:n_remove]
    drop_blocks(model, order)
    return {"removed_blocks": sorted(order), "removal_order": order, "requested_blocks": requested,
            "barriers": [early_barrier, latter_barrier]}
