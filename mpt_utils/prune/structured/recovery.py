"""Recovery fine-tuning: LoRA adapters on chosen linear layers, trained on language-modeling windows and
merged back, so the model stays a plain model of the same size (weights change, never shapes).

The defaults are the reference budget of LLM-Pruner's recover stage ("LLM-Pruner: On the Structural
Pruning of Large Language Models", Ma, Fang and Wang, arXiv:2305.11627, github.com/horseee/LLM-Pruner,
`post_training.py` as run by `scripts/llama_prune.sh`): LoRA r=8, alpha 16, dropout 0.05 on
q/k/v/o/gate/up/down, 2 epochs over Alpaca-cleaned (51,760 samples less a 2,000-sample validation
split, prompts cut at 256 tokens), batch 64 in micro-batches of 4, AdamW at lr 1e-4 without weight
decay, 100 warm-up steps then linear decay, gradients clipped at norm 1 (the transformers Trainer
defaults the script keeps). That is `REFERENCE_STEPS` = 1,556 optimizer steps. SVD-LLM's update stage
(`utils/LoRA.py` of github.com/AIoT-MLSys-Lab/SVD-LLM) borrows the same configuration, so
`train_lora` serves both.

Deviations, all explicit: the training windows are whatever the caller passes (offline runs use
calibration-split text, not Alpaca, and say so); `steps` sets a reduced budget; the warm-up is capped
at a tenth of a run shorter than the reference's so the peak learning rate is still reached;
`lr_schedule="constant"` (this suite's earlier behaviour) keeps the rate flat after the warm-up. The
adapters are our own few lines (peft's initialisation: A Kaiming-uniform, B zero, scale alpha/r), so
recovery needs no extra package and can target any linear, e.g. one factor of a low-rank layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import model_device

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LLM-Pruner's post-training run (post_training.py + README), reused by SVD-LLM's utils/LoRA.py
REFERENCE_BUDGET = {"data": "yahma/alpaca-cleaned", "train_samples": 51_760 - 2_000, "cutoff_len": 256,
                    "epochs": 2, "batch_size": 64, "micro_batch_size": 4, "lr": 1e-4, "rank": 8, "alpha": 16,
                    "dropout": 0.05, "warmup_steps": 100}
REFERENCE_STEPS = REFERENCE_BUDGET["epochs"] * math.ceil(REFERENCE_BUDGET["train_samples"]
                                                         / REFERENCE_BUDGET["batch_size"])


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r)·B·A·dropout(x). B starts at zero, so training starts from the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        dev = base.weight.device
        # float32 adapters even on a half-precision model: AdamW updates of 1e-4 vanish in fp16
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return self.base(x) + (self.scale * delta).to(x.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        w = self.base.weight
        w.copy_((w.float() + self.scale * self.lora_b @ self.lora_a).to(w.dtype))
        return self.base


SCHEDULES = ("linear", "constant")


def _lr_factor(step: int, steps: int, warmup: int, schedule: str = "linear") -> float:
    """Linear warm-up, then linear decay to zero (transformers' default Trainer schedule, the
    reference's) or a constant rate."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_lora(model: nn.Module, train_ids: torch.Tensor, modules: Sequence[str], *, steps: int | None = None,
               epochs: float = REFERENCE_BUDGET["epochs"], lr: float = REFERENCE_BUDGET["lr"],
               rank: int = REFERENCE_BUDGET["rank"], alpha: float = REFERENCE_BUDGET["alpha"],
               dropout: float = REFERENCE_BUDGET["dropout"], batch_size: int = REFERENCE_BUDGET["batch_size"],
               micro_batch_size: int = REFERENCE_BUDGET["micro_batch_size"], warmup_steps: int | None = None,
               lr_schedule: str = "linear", seed: int = 0, device: str | torch.device | None = None,
               progress: bool = True, desc: str = "LoRA") -> dict:
    """Train LoRA adapters on the linears named in `modules` (everything else frozen) with the LM loss
    on rows of `train_ids` [n, seqlen], merge them in place and return a summary.

    `steps=None` is the reference schedule: `epochs` passes over the windows in batches of
    `batch_size` (fewer windows than a batch: one batch of all of them). `warmup_steps=None`: the
    reference's 100, capped at a tenth of the run. `lr_schedule="constant"` skips the linear decay.
    """
    if train_ids.ndim != 2 or train_ids.shape[0] < 1 or train_ids.shape[1] < 2:
        raise MPTError(f"LoRA training needs windows [n, seqlen >= 2], got shape {tuple(train_ids.shape)}",
                       "pass calibration_windows(...)")
    if steps is not None and steps < 1:
        raise MPTError(f"steps={steps}: LoRA training needs at least one step",
                       "pass steps >= 1, or steps=None for the reference schedule (2 epochs)")
    if epochs <= 0 or lr <= 0 or rank < 1 or batch_size < 1 or micro_batch_size < 1:
        raise MPTError(f"invalid LoRA budget (epochs={epochs}, lr={lr}, rank={rank}, batch_size={batch_size}, "
                       f"micro_batch_size={micro_batch_size})", "use positive values, e.g. the reference's "
                       "epochs=2, lr=1e-4, rank=8, batch_size=64, micro_batch_size=4")
    if lr_schedule not in SCHEDULES:
        raise MPTError(f"unknown learning-rate schedule {lr_schedule!r}", f"use one of {SCHEDULES}")
    if not modules:
        raise MPTError("no layers to train LoRA adapters on", f"targets were e.g. {DEFAULT_TARGETS}")
    n = int(train_ids.shape[0])
    batch = min(batch_size, n)
    steps = int(math.ceil(epochs * math.ceil(n / batch))) if steps is None else int(steps)
    warmup = min(REFERENCE_BUDGET["warmup_steps"], steps // 10) if warmup_steps is None else int(warmup_steps)
    dev = model_device(model, device)
    model.to(dev)
    torch.manual_seed(seed)  # adapter init and dropout
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, LoRALinear] = {}
    for name in modules:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        base = getattr(owner, child)
        if not isinstance(base, nn.Linear):
            raise MPTError(f"{name} is a {type(base).__name__}, not a linear layer", "pass linear layer names")
        adapters[name] = LoRALinear(base, rank, alpha, dropout)
        setattr(owner, child, adapters[name])
    params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup, lr_schedule))
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:  # a fresh shuffle per epoch; its last batch may be short, as in the Trainer
        batches += list(torch.randperm(n, generator=gen).split(batch))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        for step in progress_bar(range(steps), desc=desc, disable=not progress, leave=False):
            rows = batches[step]
            total = 0.0
            for chunk in rows.split(micro_batch_size):  # gradient accumulation: the batch-mean loss
                ids = train_ids[chunk].to(dev)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (len(chunk) / len(rows))
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
    finally:
        for name, adapter in adapters.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, adapter.merged())
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5):]
    return {"recovery": "lora", "steps": steps, "epochs_seen": sum(len(b) for b in batches[:steps]) / n, "lr": lr, "rank": rank,
            "alpha": alpha, "dropout": dropout, "batch_size": batch, "micro_batch_size": micro_batch_size,
            "warmup_steps": warmup, "lr_schedule": lr_schedule, "seqlen": int(train_ids.shape[1]), "train_windows": n,
            "n_adapted": len(adapters), "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail),
            "seconds": time.perf_counter() - start}


def lora_recover(model: nn.Module, train_ids: torch.Tensor, *, steps: int | None = None,
                 epochs: float = REFERENCE_BUDGET["epochs"], lr: float = REFERENCE_BUDGET["lr"],
                 rank: int = REFERENCE_BUDGET["rank"], alpha: float = REFERENCE_BUDGET["alpha"],
                 dropout: float = REFERENCE_BUDGET["dropout"], batch_size: int = REFERENCE_BUDGET["batch_size"],
                 micro_batch_size: int = REFERENCE_BUDGET["micro_batch_size"], warmup_steps: int | None = None,
                 lr_schedule: str = "linear", targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = True) -> dict:
    """LLM-Pruner's recover stage: LoRA on every linear named like one of `targets`, merged in place.

    The defaults are the reference's (module docstring): 2 epochs over `train_ids` in batches of 64 at
    lr 1e-4, r=8; with ~49,760 windows of 256 tokens that is the reference's 1,556 steps. A reduced
    budget (CPU runs) passes `steps`, `batch_size` and `lr` explicitly and is labelled as such."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise MPTError("no LoRA target layers found in the model", f"targets were {tuple(targets)}")
    return train_lora(model, train_ids, names, steps=steps, epochs=epochs, lr=lr, rank=rank, alpha=alpha,
                      dropout=dropout, batch_size=batch_size, micro_batch_size=micro_batch_size,
                      warmup_steps=warmup_steps, lr_schedule=lr_schedule, seed=seed, device=device,
                      progress=progress, desc="LoRA recovery")
