"""SLEB (Song et al., ICML 2024): remove redundant decoder blocks one at a time, each time the block
whose removal gives the lowest perplexity on the calibration windows (greedy, re-evaluated after
every removal, so interactions between removed blocks are accounted for).

The greedy sequence for k removals is a prefix of the one for k+1, so a sweep computes it once, to
its largest ratio. Each candidate is scored from the cached inputs of its own block: blocks before
it are unchanged by its removal, which halves the cost of a naive re-run.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpt_utils.calibration import capture_block_inputs, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
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
                  device: str | torch.device | None = None, progress: bool = True) -> list[int]:
    """Original indices of the first `n_remove` blocks SLEB removes, extending `prefix` if given."""
    layers = decoder_layers(model)
    dev = model_device(model, device)
    model.to(dev)
    was_training = model.training
    model.eval()
    head = _head(model)
    inputs, kwargs = capture_block_inputs(model, calib_ids, dev)
    removed = list(prefix or [])
    per_block = sum(x.numel() * x.element_size() for x in inputs)
    keep_cache = per_block * len(layers) <= CACHE_BYTES
    bar = tqdm(total=n_remove, initial=min(len(removed), n_remove), desc="SLEB", disable=not progress, leave=False)
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


@STRUCTURED.register("sleb", version=1)
def sleb(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None, seed: int = 0,
         device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Greedily remove round(ratio * n_blocks) blocks by calibration perplexity."""
    n_layers = len(decoder_layers(model))
    n_remove = min(int(round(ratio * n_layers)), n_layers - 1)
    key = f"sleb:{tuple(calib_ids.shape)}:{int(calib_ids.long().sum())}"
    prefix = list(cache.get(key, [])) if cache is not None else []
    if len(prefix) < n_remove:
        prefix = removal_order(model, calib_ids, n_remove, prefix, device, progress)
        if cache is not None:
            cache[key] = prefix
    order = prefix[:n_remove]
    drop_blocks(model, order)
    return {"removed_blocks": sorted(order), "removal_order": order}
