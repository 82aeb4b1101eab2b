"""Logit lens: what each block's residual stream would predict if the model stopped there."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from mpt_utils.diagnostics.metrics import answer_prob, answer_rank, kl_to
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, at_answer, lens_logits, trace


@torch.no_grad()
def lens_rows(model: nn.Module, tr: Trace, batch: PromptBatch, reference: torch.Tensor, label: str) -> list[dict]:
    """One row per block of `model`'s trace: the lens distribution at the answer position against
    `reference` (the dense model's final logits), averaged over prompts."""
    rows = []
    for layer, hidden in enumerate(tr.block_outputs):
        logits = lens_logits(model, at_answer(hidden, batch).to(next(model.parameters()).device)).cpu()
        rank = answer_rank(logits, batch.answer_ids)
        rows.append({"model_kind": label, "layer": layer,
                     "kl_to_dense_final": float(kl_to(reference, logits).mean()),
                     "answer_prob": float(answer_prob(logits, batch.answer_ids).mean()),
                     "answer_rank_median": float(rank.float().median()),
                     "answer_top1": float((rank == 1).float().mean())})
    return rows


def logit_lens(dense: nn.Module, compressed: nn.Module, batch: PromptBatch,
               traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """Per block l and model (dense / compressed): KL(dense final ‖ lens after block l), and the
    probability, median rank and top-1 share of the correct answer token, at the answer position.
    `traces` = (dense trace, compressed trace) reuses recorded runs."""
    td, tc = traces or (trace(dense, batch), trace(compressed, batch))
    if "lens" not in td.extra:  # the dense rows do not depend on the compressed model: once per trace
        td.extra["lens"] = lens_rows(dense, td, batch, td.logits, "dense")
    return pd.DataFrame(td.extra["lens"] + lens_rows(compressed, tc, batch, td.logits, "compressed"))
