"""LoRAPrune: structured pruning guided by LoRA gradients, interleaved with LoRA fine-tuning.

Reference: "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning", Zhang, Chen,
Wang, Huang, Zhuang and Chen, arXiv:2305.18403 (ACL Findings 2024), github.com/aim-uofa/LoRAPrune
(`prune.py`, `loraprune/trainer.py`, `loraprune/utils.py`, `script/prune.sh`).

LoRA adapters (r=8, alpha 16, dropout 0.05) sit on q/k/v/o/gate/up/down while the base weights stay
frozen. After every optimizer step each adapted linear gets the importance of its weights from the
adapters alone, without the gradient of the full weight: the gradient of the low-rank update is
estimated from the adapter gradients, G = dB·A + B·dA - dB·dA (the reference's expression), and
the importance is |G ⊙ (W + scale·B·A)|. It is summed per group (a KV group's q/k/v rows and o_proj
columns; an MLP channel's gate/up rows and down column), L2-normalised per module, and smoothed by a
moving average I ← 0.9·I + 0.1·I_step. Every `prune_freq` steps the masks of the prunable blocks are
shrunk to the current sparsity of a cubic schedule (flat for the first 10 % of the steps, cubic to
the target, flat for the last 10 %), removing the least important units still alive, so pruning and
fine-tuning alternate. Masked units are zeroed in the forward pass (their o_proj / down_proj inputs),
so the adapters learn to compensate. At the end the adapters are merged and the masked heads and
channels are physically removed (`surgery.keep_kv_groups` / `keep_mlp_channels`).

As in the reference, the first 10 % of the blocks and the last block are never pruned, and every
pruned block loses the same share of its units. `ratio` here is the suite's unit for width methods,
the fraction of all decoder-block parameters removed: the per-block share r_l is scaled up to make
up for the frozen blocks, KV groups go round(r_l·groups) at a time (whole groups under GQA; the
reference prunes single heads of multi-head LLaMA) and the MLP channel count makes up each block's
exact budget, as `llm_pruner` does. One deliberate change: the reference prunes only while the
scheduled sparsity is strictly below the target, so its last pruning event can fall a few units
short; here the first step of the final flat phase applies the exact target.

Reference budget (`script/prune.sh`): LaMini-instruction prompts cut at 512 tokens, batch 128 in
micro-batches of 2, lr 1e-4 (AdamW, linear decay, no warm-up, gradients clipped at 1), 2 epochs,
prune every 10 steps. Defaults: `steps=None` runs those 2 epochs over the windows it is given
(offline: calibration-split text, not LaMini); `EMBEDDED_BUDGET` is the reduced budget used on the
embedded 135M model on CPU: 20 steps of 4 windows of 128 tokens (micro-batch 4) instead of ~40,000
steps of 128 prompts of up to 512 tokens, lr 5e-4 instead of 1e-4 so that so few steps move the
adapters, and pruning every 2 steps instead of 10 so that the schedule still has several pruning
events. The result records the budget it ran with (`reduced_budget` says whether it was the
reference's).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, model_device
from mpt_utils.prune.structured.recovery import DEFAULT_TARGETS, LoRALinear, _lr_factor
from mpt_utils.prune.structured.surgery import (
    channel_params,
    group_params,
    keep_kv_groups,
    keep_mlp_channels,
    llama_parts,
    n_kv_groups,
)

REFERENCE_BUDGET = {"data": "MBZUAI/LaMini-instruction", "cutoff_len": 512, "epochs": 2, "batch_size": 128,
                    "micro_batch_size": 2, "lr": 1e-4, "rank": 8, "alpha": 16, "dropout": 0.05,
                    "prune_freq": 10, "warmup_iters": 0.1, "cooldown_iters": 0.1, "moving_average": 0.9}
# the reduced budget of the embedded profile (one point in a few CPU minutes), passed as options
EMBEDDED_BUDGET = {"steps": 20, "batch_size": 4, "micro_batch_size": 4, "lr": 5e-4, "prune_freq": 2,
                   "sample_len": 128}
METRICS = ("lora", "magnitude")


def cubic_sparsity(step: int, total: int, target: float, warmup: float = 0.1, cooldown: float = 0.1,
                   initial: float = 0.0) -> float:
    """LoRAPrune's schedule: `initial` for the first `warmup` share of the steps, `target` for the last
    `cooldown` share, and target + (initial - target)·(1 - progress)^3 in between."""
    if step <= warmup * total:
        return initial
    if step > total - cooldown * total:
        return target
    span = total - (warmup + cooldown) * total
    coeff = 1 - (step - warmup * total) / span
    return target + (initial - target) * coeff ** 3


def _lora_grad_importance(lin: LoRALinear, metric: str) -> torch.Tensor:
    """|G ⊙ (W + scale·B·A)| for one adapted linear ([out, in])."""
    a, b = lin.lora_a.detach(), lin.lora_b.detach()
    w = lin.base.weight.detach().float() + lin.scale * (b @ a)
    if metric == "magnitude":
        return w.abs()
    ga, gb = lin.lora_a.grad, lin.lora_b.grad
    if ga is None or gb is None:
        return torch.zeros_like(w)
    grad = gb @ a + b @ ga - gb @ ga
    return (grad * w).abs()


def _normed(s: torch.Tensor) -> torch.Tensor:
    return s / (torch.linalg.norm(s) + 1e-8)


def _block_importance(attn: nn.Module, mlp: nn.Module, n_groups: int, metric: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV-group importance [G], MLP-channel importance [m]) of one adapted block at this step."""
    g_imp = torch.zeros(n_groups)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        s = _lora_grad_importance(getattr(attn, name), metric)
        per_channel = s.sum(0) if name == "o_proj" else s.sum(1)
        # rows of q (and o's columns) hold the group's heads contiguously, as do rows of k and v
        g_imp += _normed(per_channel.reshape(n_groups, -1).sum(1)).cpu()
    c_imp = torch.zeros(mlp.gate_proj.base.out_features)
    for name in ("gate_proj", "up_proj", "down_proj"):
        s = _lora_grad_importance(getattr(mlp, name), metric)
        c_imp += _normed(s.sum(0) if name == "down_proj" else s.sum(1)).cpu()
    return g_imp, c_imp


def prunable_range(n_layers: int) -> tuple[int, int]:
    """Blocks [int(0.1·n), n-1): the reference never prunes the first 10 % nor the last block."""
    start = int(n_layers * 0.1)
    return (start, n_layers - 1) if n_layers - 1 > start else (0, n_layers)


def _final_drops(layers, ratio: float, start: int, end: int) -> tuple[list[tuple[int, int]], float, bool]:
    """Per-block (KV groups, channels) to remove so that `ratio` of all block parameters go."""
    prunable = [n_kv_groups(llama_parts(b)[0]) * group_params(b)
                + llama_parts(b)[1].gate_proj.out_features * channel_params(b) for b in layers]
    r_layer = ratio * sum(prunable) / sum(prunable[start:end])
    capped = r_layer > 0.95
    r_layer = min(r_layer, 0.95)
    drops = []
    for i, block in enumerate(layers):
        if not start <= i < end:
            drops.append((0, 0))
            continue
        attn, mlp = llama_parts(block)
        n_g, n_c = n_kv_groups(attn), mlp.gate_proj.out_features
        drop_g = min(int(round(r_layer * n_g)), n_g - 1)
        budget = r_layer * prunable[i] - drop_g * group_params(block)
        drop_c = min(max(int(round(budget / channel_params(block))), 0), n_c - 1)
        drops.append((drop_g, drop_c))
    return drops, r_layer, capped


@STRUCTURED.register("loraprune", version=1, display="LoRAPrune", calibration=True,
                     sources=("mpt_utils.prune.structured.recovery",))
def loraprune(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
              steps: int | None = None, epochs: float = REFERENCE_BUDGET["epochs"],
              batch_size: int = REFERENCE_BUDGET["batch_size"],
              micro_batch_size: int = REFERENCE_BUDGET["micro_batch_size"], lr: float = REFERENCE_BUDGET["lr"],
              rank: int = REFERENCE_BUDGET["rank"], alpha: float = REFERENCE_BUDGET["alpha"],
              dropout: float = REFERENCE_BUDGET["dropout"], prune_freq: int = REFERENCE_BUDGET["prune_freq"],
              warmup_iters: float = REFERENCE_BUDGET["warmup_iters"],
              cooldown_iters: float = REFERENCE_BUDGET["cooldown_iters"],
              moving_average: float = REFERENCE_BUDGET["moving_average"], metric: str = "lora",
              sample_len: int | None = None, seed: int = 0, device: str | torch.device | None = None,
              progress: bool = True) -> dict:
    """Prune `ratio` of the decoder-block parameters while LoRA-fine-tuning on `calib_ids`, then merge
    the adapters and remove the pruned KV groups and MLP channels. `sample_len` cuts the windows
    (None: as given); `steps=None` is `epochs` passes over the windows in batches of `batch_size`."""
    if metric not in METRICS:
        raise MPTError(f"unknown LoRAPrune metric {metric!r}", f"use one of {METRICS}")
    if steps is not None and steps < 1 or prune_freq < 1 or batch_size < 1 or micro_batch_size < 1 or lr <= 0:
        raise MPTError(f"invalid LoRAPrune budget (steps={steps}, prune_freq={prune_freq}, batch_size={batch_size}, "
                       f"micro_batch_size={micro_batch_size}, lr={lr})",
                       "use positive values, e.g. the reference's batch_size=128, prune_freq=10, lr=1e-4")
    if not 0 <= moving_average < 1:
        raise MPTError(f"moving_average={moving_average} must be in [0, 1)", "the reference uses 0.9")
    layers = decoder_layers(model)
    for block in layers:
        llama_parts(block)
    ids = calib_ids if sample_len is None else calib_ids[:, :sample_len]
    n = int(ids.shape[0])
    batch = min(batch_size, n)
    total = int(math.ceil(epochs * math.ceil(n / batch))) if steps is None else int(steps)
    start_l, end_l = prunable_range(len(layers))
    drops, r_layer, capped = _final_drops(layers, ratio, start_l, end_l)

    dev = model_device(model, device)
    model.to(dev)
    torch.manual_seed(seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    parts = [llama_parts(b) for b in layers]
    n_groups = [n_kv_groups(attn) for attn, _ in parts]
    # adapters on every target linear of every block, in place
    adapters: list[tuple[nn.Module, str, LoRALinear]] = []
    for owner_pair in parts:
        for owner in owner_pair:
            for name in DEFAULT_TARGETS:
                if hasattr(owner, name):
                    lora = LoRALinear(getattr(owner, name), rank, alpha, dropout)
                    setattr(owner, name, lora)
                    adapters.append((owner, name, lora))
    params = [p for _, _, a in adapters for p in (a.lora_a, a.lora_b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, 0, "linear"))

    # masks: 1 = alive; applied to the inputs of o_proj (per query channel) and down_proj (per channel)
    g_masks = [torch.ones(g, device=dev) for g in n_groups]
    c_masks = [torch.ones(mlp.gate_proj.base.out_features, device=dev) for _, mlp in parts]
    hooks = []
    for i, (attn, mlp) in enumerate(parts):
        rep = attn.q_proj.base.out_features // n_groups[i]

        def o_hook(mod, args, i=i, rep=rep):
            return (args[0] * g_masks[i].repeat_interleave(rep).to(args[0].dtype),) + tuple(args[1:])

        def d_hook(mod, args, i=i):
            return (args[0] * c_masks[i].to(args[0].dtype),) + tuple(args[1:])

        hooks += [attn.o_proj.register_forward_pre_hook(o_hook), mlp.down_proj.register_forward_pre_hook(d_hook)]

    importance: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < total:
        batches += list(torch.randperm(n, generator=gen).split(batch))
    losses: list[float] = []
    events: list[int] = []
    reached = False
    t0 = time.perf_counter()
    model.train()

    def apply_masks(frac: float) -> None:
        for i in range(start_l, end_l):
            g_imp, c_imp = importance[i]
            for mask, imp, final in ((g_masks[i], g_imp, drops[i][0]), (c_masks[i], c_imp, drops[i][1])):
                k = min(int(round(frac * final)), final)
                if k <= int((mask == 0).sum()):
                    continue
                # pruned units stay pruned: their importance counts as 0, below every live unit
                order = torch.argsort(imp.to(dev) * mask + (mask - 1) * 1e30)
                mask[order[:k]] = 0

    try:
        for step in progress_bar(range(total), desc="LoRAPrune", disable=not progress, leave=False):
            rows = batches[step]
            loss_sum = 0.0
            for chunk in rows.split(micro_batch_size):
                x = ids[chunk].to(dev)
                loss = model(input_ids=x, labels=x, use_cache=False).loss * (len(chunk) / len(rows))
                loss.backward()
                loss_sum += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            # importance from this step's adapter gradients, smoothed (reference: after clipping)
            now = [_block_importance(a, m, g, metric) for (a, m), g in zip(parts, n_groups)]
            if not any(torch.isnan(g).any() or torch.isnan(c).any() for g, c in now):
                importance = now if importance is None else [
                    (moving_average * g0 + (1 - moving_average) * g1, moving_average * c0 + (1 - moving_average) * c1)
                    for (g0, c0), (g1, c1) in zip(importance, now)]
            current = cubic_sparsity(step, total, ratio, warmup_iters, cooldown_iters)
            if importance is not None and ratio > 0 and not reached:
                if current >= ratio:  # first step of the final flat phase: the exact target
                    apply_masks(1.0)
                    events.append(step)
                    reached = True
                elif step % prune_freq == 0 and current > 0:
                    apply_masks(current / ratio)
                    events.append(step)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_sum)
    finally:
        for h in hooks:
            h.remove()
        for owner, name, lora in adapters:
            setattr(owner, name, lora.merged())
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
    if importance is None:
        raise MPTError("LoRAPrune got no finite gradients", "check the calibration windows and the learning rate")
    apply_masks(1.0)  # the exact target, whatever the schedule did
    kept_g, kept_c = [], []
    for i, block in enumerate(layers):
        keep_kv_groups(block, torch.nonzero(g_masks[i].cpu()).flatten())
        keep_mlp_channels(block, torch.nonzero(c_masks[i].cpu()).flatten())
        kept_g.append(n_kv_groups(llama_parts(block)[0]))
        kept_c.append(llama_parts(block)[1].gate_proj.out_features)
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5):]
    return {"metric": metric, "layer_range": [start_l, end_l], "layer_ratio": r_layer, "ratio_capped": capped,
            "kept_groups": kept_g, "kept_channels": kept_c, "steps": total, "batch_size": batch,
            "micro_batch_size": micro_batch_size, "lr": lr, "rank": rank, "alpha": alpha, "prune_freq": prune_freq,
            "prune_events": len(events), "seqlen": int(ids.shape[1]), "train_windows": n,
            "reference_budget": REFERENCE_BUDGET,
            "reduced_budget": any(v != REFERENCE_BUDGET[k] for k, v in (
                ("batch_size", batch_size), ("micro_batch_size", micro_batch_size), ("lr", lr), ("epochs", epochs),
                ("prune_freq", prune_freq))) or steps is not None or sample_len is not None, "loss_first": sum(head) / len(head),
            "loss_last": sum(tail) / len(tail), "train_seconds": time.perf_counter() - t0}
