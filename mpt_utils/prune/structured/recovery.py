"""Recovery fine-tuning after structured pruning: LoRA on the pruned model's linear layers (peft),
trained on language-modeling windows, then merged back so the model stays a plain, smaller model.

LLM-Pruner recovers with LoRA (r=8) on Alpaca for 2 epochs; offline we train a short run on
calibration-split text and label it as such. Recovery changes weights, never shapes, so the
parameter count and speed of the pruned model are unchanged.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mpt_utils.errors import MPTError
from mpt_utils.prune.structured import model_device

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_recover(model: nn.Module, train_ids: torch.Tensor, *, steps: int = 40, lr: float = 3e-4, rank: int = 8,
                 alpha: int = 16, dropout: float = 0.05, batch_size: int = 1,
                 targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Train LoRA adapters for `steps` optimizer steps on rows of `train_ids` [n, seqlen], merge them
    into the weights (in place) and return the loss trajectory summary."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MPTError("LoRA recovery needs the package 'peft'", "pip install peft  (extra: recovery)") from None
    if steps < 1 or train_ids.ndim != 2 or train_ids.shape[0] < 1:
        raise MPTError(f"recovery needs steps >= 1 and windows [n, seqlen], got steps={steps}, "
                       f"shape={tuple(train_ids.shape)}", "pass calibration_windows(...) and steps like 40")
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in targets if t in present]
    if not targets:
        raise MPTError("no LoRA target layers found in the model", f"targets were {DEFAULT_TARGETS}")
    dev = model_device(model, device)
    model.to(dev)
    torch.manual_seed(seed)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=targets, bias="none"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_ids.shape[0], generator=gen)
    losses = []
    start = time.perf_counter()
    peft_model.train()
    try:
        for step in tqdm(range(steps), desc="LoRA recovery", disable=not progress, leave=False):
            rows = order[(step * batch_size + torch.arange(batch_size)) % len(order)]
            ids = train_ids[rows].to(dev)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        merged = peft_model.merge_and_unload()
        merged.eval()
        for n, p in merged.named_parameters():
            p.requires_grad_(flags.get(n, True))
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5):]
    return {"recovery": "lora", "steps": steps, "lr": lr, "rank": rank, "alpha": alpha, "batch_size": batch_size,
            "seqlen": int(train_ids.shape[1]), "train_windows": int(train_ids.shape[0]),
            "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail),
            "seconds": time.perf_counter() - start}
