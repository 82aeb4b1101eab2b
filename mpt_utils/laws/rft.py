"""Recovery fine-tuning (RFT) on a token budget D, as in "Compression Laws for Large Language
Models" (arXiv:2504.04342): LoRA of rank 16 on the pruned model, one epoch over D tokens, merged
back (shapes, and so size and speed, are unchanged).

The training text is the calibration split of a corpus (the paper uses Alpaca; offline we use the
embedded Wikipedia calibration part, which is disjoint from the evaluation part by article). D tokens
are round(D / seqlen) distinct, non-overlapping windows drawn from that split by a seeded permutation,
so "one epoch" means every token is seen once. The optimisation itself is the suite's
`mpt_utils.prune.structured.recovery.lora_recover` (AdamW, clipped gradients, LoRA on q/k/v/o and
gate/up/down), run for ceil(windows / batch_size) steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mpt_utils.data import token_ids
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import window_ids

RECOVERY = "lora_rft"
DEFAULTS: dict[str, Any] = {"rank": 16, "alpha": 32, "lr": 3e-4, "dropout": 0.05, "seqlen": 128, "batch_size": 4,
                            "epochs": 1}


def rft_windows(tokenizer, tokens: int, data: str, seqlen: int, seed: int = 0) -> torch.Tensor:
    """round(tokens / seqlen) distinct non-overlapping windows [n, seqlen] of the calibration split."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise MPTError(f"RFT token budget {tokens!r} is not a positive whole number", "pass e.g. tokens=20000")
    windows = window_ids(token_ids(tokenizer, data, "calibration"), seqlen)
    n = max(1, round(tokens / seqlen))
    if n > windows.shape[0]:
        have = windows.shape[0] * seqlen
        raise MPTError(f"RFT budget of {tokens} tokens exceeds the {have} tokens of {data!r}'s calibration split "
                       f"(one epoch sees each token once)", f"use tokens <= {have}, or a larger corpus")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order[:n].sort().values]


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) of `model` over `windows`."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(dev)
        n = ids[:, 1:].numel()
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
        count += n
    model.train(was_training)
    return total / count


def lora_rft(model: nn.Module, tokenizer, tokens: int, data: str, *, seed: int = 0, rank: int = 16, alpha: int = 32,
             lr: float = 3e-4, dropout: float = 0.05, seqlen: int = 128, batch_size: int = 4,
             loss_windows: int = 16, device: str | torch.device | None = None,
             progress: bool = False) -> dict[str, Any]:
    """One epoch of LoRA recovery over `tokens` calibration tokens, merged into `model` in place.
    Returns the settings, tokens actually trained on, the training loss on the first `loss_windows`
    training windows before and after, and the time."""
    from mpt_utils.prune.structured.recovery import lora_recover

    train = rft_windows(tokenizer, tokens, data, seqlen, seed)
    batch_size = min(batch_size, train.shape[0])
    steps = math.ceil(train.shape[0] / batch_size)
    probe = train[:loss_windows]  # the training loss is read on a fixed subset: cheap, same rows before/after
    before = mean_loss(model, probe, batch_size)
    info = lora_recover(model, train, steps=steps, lr=lr, rank=rank, alpha=alpha, dropout=dropout,
                        batch_size=batch_size, seed=seed, device=device, progress=progress)
    after = mean_loss(model, probe, batch_size)
    return {"recovery": RECOVERY, "tokens_requested": tokens, "tokens": int(train.numel()),
            "rft_windows": int(train.shape[0]), "rft_seqlen": seqlen, "rft_batch_size": batch_size,
            "rft_steps": steps, "rft_epochs": 1, "rft_rank": rank, "rft_alpha": alpha, "rft_lr": lr,
            "train_loss_before": before, "train_loss_after": after, "rft_seconds": info["seconds"],
            "recovery_data": f"{data} calibration split"}
