"""Which blocks matter: compress one block at a time, or keep chosen blocks dense in a compressed model.

layer sensitivity: every decoder linear of block i alone is RTN-quantized (2 bits, groups of 128 by
default; any `compress_block` callable works), the rest stays dense, and the damage at the answer
position is measured; the block is restored before the next one.
high-precision injection: in the compressed model, the blocks of a chosen set are swapped for the
dense model's blocks, so the dense ("high precision") computation is injected there and the
remaining compressed blocks must carry it; recovery 1 = the dense answer distribution back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from mpt_utils.calibration import decoder_layers, linear_layers
from mpt_utils.diagnostics.metrics import answer_prob, kl_recovery, kl_to, normalized_recovery
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, run_from, swapped_blocks, trace
from mpt_utils.errors import MPTError


def rtn_block(bits: int = 2, group_size: int | None = 128) -> Callable[[nn.Module], None]:
    """A `compress_block` that RTN-quantizes every linear of one block in place (asymmetric, int zero)."""
    from mpt_utils.quant.rtn import QuantSpec, check_spec, normalize_group_size, quantize_weight

    spec = check_spec(QuantSpec(bits, normalize_group_size(group_size)), "rtn")

    def compress(block: nn.Module) -> None:
        for lin in linear_layers(block).values():
            lin.weight.data = quantize_weight(lin.weight.data, spec)

    return compress


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batch: PromptBatch, compress_block: Callable[[nn.Module], None] | None = None,
                      *, layers: Sequence[int] | None = None, dense_trace: Trace | None = None) -> pd.DataFrame:
    """Per block i: answer probability, its drop, KL to the dense output and top-1 share with block i
    alone compressed (2-bit RTN g128 unless `compress_block` says otherwise). `model` is left as it was."""
    compress_block = compress_block or rtn_block()
    td = dense_trace or trace(model, batch, attention=False)
    p_dense = float(answer_prob(td.logits, batch.answer_ids).mean())
    blocks = decoder_layers(model)
    rows = []
    for i in range(len(blocks)) if layers is None else layers:
        saved = {k: v.clone() for k, v in blocks[i].state_dict().items()}
        try:
            compress_block(blocks[i])
            logits = run_from(model, batch, i, td.block_inputs[i] if i else None)
        finally:
            blocks[i].load_state_dict(saved)
        p = answer_prob(logits, batch.answer_ids)
        rows.append({"layer": int(i), "answer_prob": float(p.mean()), "prob_drop": p_dense - float(p.mean()),
                     "kl_to_dense": float(kl_to(td.logits, logits).mean()),
                     "answer_top1": float((logits.argmax(-1) == batch.answer_ids).float().mean())})
    return pd.DataFrame(rows)


@torch.no_grad()
def high_precision_injection(dense: nn.Module, compressed: nn.Module, batch: PromptBatch,
                             keep: Mapping[str, Sequence[int]],
                             traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """One row per named set of blocks kept dense inside the compressed model (indices may be
    negative, counted from the last block): answer probability, recovery (probability gap closed),
    KL to the dense output and KL recovery."""
    td, tc = traces or (trace(dense, batch, attention=False), trace(compressed, batch, attention=False))
    dense_blocks, n = decoder_layers(dense), len(decoder_layers(compressed))
    if len(dense_blocks) != n:
        raise MPTError(f"the dense model has {len(dense_blocks)} blocks and the compressed one {n}",
                       "high-precision injection needs the same block structure (not layer-dropping methods)")
    p_dense = float(answer_prob(td.logits, batch.answer_ids).mean())
    p_comp = float(answer_prob(tc.logits, batch.answer_ids).mean())
    kl_comp = float(kl_to(td.logits, tc.logits).mean())
    rows = []
    for name, blocks in keep.items():
        if any(not -n <= int(b) < n for b in blocks):
            raise MPTError(f"set {name!r} names blocks outside [-{n}, {n})", "use existing block indices")
        blocks = sorted({int(b) % n for b in blocks})  # negative indices count from the last block
        if blocks:
            start = blocks[0]
            with swapped_blocks(compressed, {b: dense_blocks[b] for b in blocks}):
                logits = run_from(compressed, batch, start, tc.block_inputs[start] if start else None)
        else:
            logits = tc.logits
        p, kl = float(answer_prob(logits, batch.answer_ids).mean()), float(kl_to(td.logits, logits).mean())
        rows.append({"kept": name, "n_blocks": len(blocks), "blocks": ",".join(map(str, blocks)),
                     "answer_prob": p, "recovery": normalized_recovery(p, p_comp, p_dense), "kl_to_dense": kl,
                     "kl_recovery": kl_recovery(kl, kl_comp)})
    return pd.DataFrame(rows)
