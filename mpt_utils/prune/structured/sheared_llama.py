"""Sheared LLaMA: targeted structured pruning with learned hard-concrete masks, then continued pretraining.

Reference: "Sheared LLaMA: Accelerating Language Model Pre-training via Structured Pruning", Xia, Gao,
Zeng and Chen, arXiv:2310.06694 (ICLR 2024), github.com/princeton-nlp/LLM-Shearing
(`llmshearing/models/l0_module.py`, `composer_llama.py`, `scripts/pruning.sh`, `continue_pretrain.sh`,
`configs/llama2/7b.yaml`).

Stage 1, targeted pruning: stochastic masks z ~ hard concrete (Louizos et al.: temperature 2/3,
stretched to (-0.1, 1.1) and clipped to [0, 1], log α initialised at 5, clamped to [log 1e-2,
log 1e2]) sit on four structures: the hidden dimensions (embedding output, every write into the
residual stream, and the RMSNorms, which normalise over the dimensions still alive), the attention
heads of every layer, the MLP intermediate channels of every layer, and whole layers (one z scaling
both the attention and the MLP output). A fresh z is sampled per step and the model weights, the
log α and the Lagrange multipliers are trained together on the LM loss plus, per structure,
λ1·(ŝ - t) + λ2·(ŝ - t)², where ŝ is the expected sparsity from the masks' probabilities of being
non-zero and t the structure's target sparsity ramped linearly from 0 over the Lagrangian warm-up.
The multipliers do gradient ascent (the reference's negative learning rate), so the masks are
forced toward the target shape. At the end each structure keeps exactly its target count ranked by
sigmoid(0.8·log α / temperature) (the reference's deterministic mask with `eval_target_model`), the
kept soft mask values are folded into the weights, and the model is cut by surgery: rows/columns
of the linears, the embedding, the norms and the LM head lose the pruned hidden dimensions, heads
and channels go, masked layers are dropped.
Stage 2, continued pretraining: all weights of the pruned model trained with the LM loss.

Under grouped-query attention a head unit is a whole KV group (1 key/value head and its query
heads, so `num_key_value_groups` stays valid); LLaMA-2-7B, the reference's source, has plain
multi-head attention where it is a single head. Dynamic batch loading (the paper's per-domain data
proportions updated from the loss gap to a scaling-law reference) only matters for multi-domain
pretraining data such as RedPajama; our training windows come from one corpus, so it is not run.

`ratio` is the fraction of decoder-block parameters removed, as for the other width methods. The
target shape follows the reference's 7B→2.7B recipe, which keeps the depth and shrinks hidden size,
heads and intermediate size by about the same factor: with s = sqrt(1 - ratio), KV groups =
max(1, round(s·G)), hidden = s·d rounded to a multiple of the kept query heads, and the intermediate
size set so the block parameters meet the budget; `target_layers` adds depth pruning (the 1.3B recipe drops 32→24 layers). The hidden
dimensions also shrink the embedding and the LM head; the achieved reduction of all parameters is
reported beside the block reduction.

Reference budget (defaults): pruning 3,200 steps of 32 sequences x 4,096 tokens (0.4B tokens, micro
batch 4), AdamW β=(0.9, 0.95), no weight decay, lr 1e-4 with a 10 % warm-up and cosine decay to 10 %,
gradients clipped at 1, mask and multiplier lr 1.0, Lagrangian warm-up 640 steps (20 %); continued
pretraining 48,000 steps of 256 x 4,096 (50B tokens, micro batch 16), lr 1e-4, 3 % warm-up, same
optimizer. Training windows are whatever the caller passes (offline: calibration-split text, not
RedPajama). `EMBEDDED_BUDGET` is the reduced budget of the embedded 135M model on CPU, stated in the
result: 16 mask-learning steps and 8 continued-pretraining steps of 4 windows of 128 tokens, the
warm-ups at the reference's shares of the run (Lagrangian 20 %, learning rate 10 %), and a mask and
multiplier lr of 0.1 instead of 1.0: with Adam every log α moves by about the lr per step, so over a
run ~100x shorter the reference's 1.0 overshoots the target sparsity by far and leaves the ranking to
sampling noise (measured on a tiny model over 30 steps: worse than random masks at 1.0, better at
0.1). Even so the masks move little in so few steps (on the embedded model the expected sparsity ends
near 0.5 % against targets of 10-14 %; 32 steps of 2 windows did no better) and the final top-k rests
on small differences of log α: the embedded point shows the method's mechanics and cost, not its
converged quality.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar
from mpt_utils.prune.structured import STRUCTURED, model_device
from mpt_utils.prune.structured.surgery import (
    _embedding_and_head,
    channel_params,
    drop_blocks,
    group_params,
    keep_kv_groups,
    keep_mlp_channels,
    llama_parts,
    n_kv_groups,
    new_linear,
)

# hard concrete (l0_module.py): stretch limits, temperature, init and clamp of log alpha
LIMIT_A, LIMIT_B, EPSILON = -0.1, 1.1, 1e-6
TEMPERATURE = 2.0 / 3.0
MAGICAL_NUMBER = 0.8  # the deterministic mask's sharpening of log alpha
INIT_LOG_ALPHA = 5.0
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))

REFERENCE_BUDGET = {"data": "RedPajama (7 domains, dynamic batch loading)", "seqlen": 4096,
                    "prune_steps": 3200, "prune_batch_size": 32, "prune_micro_batch_size": 4,
                    "prune_warmup_steps": 320, "lagrangian_warmup_steps": 640, "lr": 1e-4, "lag_lr": 1.0,
                    "continue_steps": 48_000, "continue_batch_size": 256, "continue_micro_batch_size": 16,
                    "continue_warmup_steps": 1440, "betas": (0.9, 0.95), "alpha_f": 0.1}
EMBEDDED_BUDGET = {"prune_steps": 16, "prune_batch_size": 4, "prune_micro_batch_size": 4,
                   "lagrangian_warmup_steps": 3, "prune_warmup_steps": 2, "continue_steps": 8,
                   "continue_batch_size": 4, "continue_micro_batch_size": 4, "continue_warmup_steps": 1,
                   "lag_lr": 0.1, "sample_len": 128}
STRUCTURES = ("hidden", "head", "intermediate", "layer")


class HardConcrete(nn.Module):
    """Hard-concrete gates with log α of `shape`; the last axis holds the units of one row."""

    def __init__(self, shape: tuple[int, ...], target: int, generator: torch.Generator):
        super().__init__()
        init = INIT_LOG_ALPHA + 1e-2 * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter(init)
        self.size, self.target = shape[-1], int(target)

    def sample(self) -> torch.Tensor:
        u = torch.rand(self.log_alpha.shape, device=self.log_alpha.device).clamp(EPSILON, 1 - EPSILON)
        y = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / TEMPERATURE)
        return F.hardtanh(y * (LIMIT_B - LIMIT_A) + LIMIT_A, 0.0, 1.0)

    def expected_score(self) -> torch.Tensor:
        """P(z > 0) per unit: 1 - CDF of the stretched concrete at 0."""
        x0 = (0 - LIMIT_A) / (LIMIT_B - LIMIT_A)
        cdf = torch.sigmoid(math.log(x0 / (1 - x0)) * TEMPERATURE - self.log_alpha)
        return 1 - cdf.clamp(EPSILON, 1 - EPSILON)

    def expected_sparsity(self) -> torch.Tensor:
        return 1 - self.expected_score().sum(-1) / self.size

    @property
    def target_sparsity(self) -> float:
        return 1 - self.target / self.size

    @torch.no_grad()
    def deterministic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept indices per row [..., target], soft values of the kept units): exactly `target` kept."""
        soft = torch.sigmoid(self.log_alpha / TEMPERATURE * MAGICAL_NUMBER)
        keep = soft.topk(self.target, dim=-1).indices.sort(-1).values
        return keep, soft.gather(-1, keep)

    @torch.no_grad()
    def constrain(self) -> None:
        self.log_alpha.clamp_(*LOG_ALPHA_RANGE)


@dataclass
class TargetShape:
    layers: int
    hidden: int
    groups: int  # KV groups per layer (= heads without GQA)
    intermediate: int

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "groups": self.groups, "intermediate": self.intermediate}


def target_shape(model: nn.Module, ratio: float, target_layers: int | None = None) -> TargetShape:
    """The reference's 2.7B-style target: every width shrunk by ~sqrt(1 - ratio), the intermediate
    size solving for the exact decoder-block budget."""
    layers = decoder_layers(model)
    block = layers[0]
    attn, mlp = llama_parts(block)
    n_l, d, g, m = len(layers), attn.q_proj.in_features, n_kv_groups(attn), mlp.gate_proj.out_features
    t_l = n_l if target_layers is None else int(target_layers)
    if not 1 <= t_l <= n_l:
        raise MPTError(f"target_layers={target_layers} out of range for {n_l} blocks", f"use 1..{n_l}")
    dense = n_l * (g * group_params(block) + m * channel_params(block))
    # per-layer params scale with the hidden size: a group owns group_params/d per hidden dim
    per_dim_group, per_dim_chan = group_params(block) / d, channel_params(block) / d
    s = math.sqrt(max(1 - ratio, 0.0) * n_l / t_l)
    t_g = max(1, min(g, int(round(s * g))))
    # the hidden size stays a multiple of the query heads (as in the reference's targets, and
    # transformers' configs refuse anything else)
    q_heads = t_g * (attn.q_proj.out_features // (g * attn.head_dim))
    t_d = max(q_heads, min((d // q_heads) * q_heads, int(round(s * d / q_heads)) * q_heads))
    budget = (1 - ratio) * dense / (t_l * t_d)
    t_m = int(round((budget - t_g * per_dim_group) / per_dim_chan))
    if t_m < 1:
        raise MPTError(f"ratio={ratio} leaves no MLP channels at hidden {t_d}, {t_g} KV groups, {t_l} layers",
                       "use a smaller ratio or keep fewer layers/heads")
    return TargetShape(t_l, t_d, t_g, min(t_m, m))


def _cosine_factor(step: int, steps: int, warmup: int, alpha_f: float) -> float:
    """Composer's cosine_with_warmup: linear warm-up, then cosine from 1 down to `alpha_f`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    frac = (step - warmup) / max(1, steps - warmup)
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


class _MaskedNorm(nn.Module):
    """An RMSNorm that normalises over the hidden dimensions whose gate is non-zero."""

    def __init__(self, norm: nn.Module, state: dict):
        super().__init__()
        self.norm, self.state = norm, state

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.state["hidden"]
        alive = (z != 0).to(h.dtype)
        var = (h.float().pow(2) * alive).sum(-1, keepdim=True) / alive.sum().clamp(min=1)
        eps = getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6))
        return self.norm.weight * (h.float() * torch.rsqrt(var + eps)).to(h.dtype)


class _Masked:
    """Installs the masks on a Llama model with hooks and norm wrappers; `remove()` restores it."""

    def __init__(self, model: nn.Module, state: dict):
        self.model, self.state, self.handles, self.norms = model, state, [], []
        layers = decoder_layers(model)
        emb, _ = _embedding_and_head(model)
        self.handles.append(emb.register_forward_hook(lambda mod, a, out: out * state["hidden"].to(out.dtype)))
        for i, block in enumerate(layers):
            attn, mlp = llama_parts(block)
            rep = attn.q_proj.out_features // n_kv_groups(attn)

            def o_pre(mod, args, i=i, rep=rep):
                return (args[0] * state["head"][i].repeat_interleave(rep).to(args[0].dtype),) + tuple(args[1:])

            def d_pre(mod, args, i=i):
                return (args[0] * state["intermediate"][i].to(args[0].dtype),) + tuple(args[1:])

            def out_hook(mod, args, out, i=i):
                return out * (state["layer"][i] * state["hidden"]).to(out.dtype)

            self.handles += [attn.o_proj.register_forward_pre_hook(o_pre), mlp.down_proj.register_forward_pre_hook(d_pre),
                             attn.o_proj.register_forward_hook(out_hook), mlp.down_proj.register_forward_hook(out_hook)]
            for name in ("input_layernorm", "post_attention_layernorm"):
                self._wrap(block, name)
        self._wrap(model.model, "norm")

    def _wrap(self, owner: nn.Module, name: str) -> None:
        norm = getattr(owner, name)
        setattr(owner, name, _MaskedNorm(norm, self.state))
        self.norms.append((owner, name, norm))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for owner, name, norm in self.norms:
            setattr(owner, name, norm)


@torch.no_grad()
def _cut(model: nn.Module, masks: dict[str, HardConcrete]) -> dict:
    """Fold the deterministic masks into the weights and remove everything they zero."""
    layers = decoder_layers(model)
    keep_h, z_h = masks["hidden"].deterministic()
    keep_g, z_g = masks["head"].deterministic()
    keep_c, z_c = masks["intermediate"].deterministic()
    keep_l, z_l = masks["layer"].deterministic()
    kept_layers = set(keep_l.tolist())
    layer_scale = torch.zeros(len(layers))
    layer_scale[keep_l] = z_l
    for i, block in enumerate(layers):
        attn, mlp = llama_parts(block)
        dev = attn.o_proj.weight.device
        rep_hd = attn.q_proj.out_features // n_kv_groups(attn)
        # fold: head gate into o_proj columns, channel gate into down_proj columns, layer and hidden gates
        # into their output rows (the values the training forward multiplied by)
        g_scale = torch.zeros(n_kv_groups(attn), device=dev)
        g_scale[keep_g[i]] = z_g[i].to(dev)
        c_scale = torch.zeros(mlp.down_proj.in_features, device=dev)
        c_scale[keep_c[i]] = z_c[i].to(dev)
        h_scale = torch.zeros(attn.o_proj.out_features, device=dev)
        h_scale[keep_h] = z_h.to(dev)
        row = (layer_scale[i].to(dev) * h_scale)[:, None]
        attn.o_proj.weight.mul_((row * g_scale.repeat_interleave(rep_hd)[None, :]).to(attn.o_proj.weight.dtype))
        mlp.down_proj.weight.mul_((row * c_scale[None, :]).to(mlp.down_proj.weight.dtype))
        for lin in (attn.o_proj, mlp.down_proj):
            if lin.bias is not None:
                lin.bias.mul_(row.squeeze(1).to(lin.bias.dtype))
        keep_kv_groups(block, keep_g[i])
        keep_mlp_channels(block, keep_c[i])
        attn, mlp = llama_parts(block)
        # hidden dimensions: inputs of q/k/v/gate/up, outputs of o/down, the norms
        idx = keep_h.to(dev)
        for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
            for name in names:
                lin = getattr(owner, name)
                setattr(owner, name, new_linear(lin.weight[:, idx], lin.bias))
        for owner, name in ((attn, "o_proj"), (mlp, "down_proj")):
            lin = getattr(owner, name)
            setattr(owner, name, new_linear(lin.weight[idx], None if lin.bias is None else lin.bias[idx]))
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, name)
            norm.weight = nn.Parameter(norm.weight[idx].clone())
    emb, head = _embedding_and_head(model)
    tied = head.weight is emb.weight
    dev = emb.weight.device
    idx, zh = keep_h.to(dev), z_h.to(dev)
    new_w = (emb.weight[:, idx] * zh[None, :].to(emb.weight.dtype)).clone()
    emb.weight = nn.Parameter(new_w)
    emb.embedding_dim = int(idx.numel())
    final = model.model.norm
    if tied:  # the LM head shares the scaled embedding: undo the scale in the final norm that feeds it
        final.weight = nn.Parameter((final.weight[idx] / zh.to(final.weight.dtype)).clone())
        head.weight = emb.weight
        head.in_features = int(idx.numel())
    else:
        final.weight = nn.Parameter(final.weight[idx].clone())
        model.set_output_embeddings(new_linear(head.weight[:, idx], head.bias))
    model.config.hidden_size = int(idx.numel())
    removed = [i for i in range(len(layers)) if i not in kept_layers]
    if removed:
        drop_blocks(model, removed)
    return {"removed_layers": removed}


def _train(model: nn.Module, ids: torch.Tensor, params: list[nn.Parameter], steps: int, batch: int, micro: int,
           lr: float, warmup: int, betas: tuple[float, float], alpha_f: float, gen: torch.Generator, dev,
           desc: str, progress: bool, extra=None) -> list[float]:
    """AdamW on `params` with the LM loss (+ `extra(step)` losses and side optimizers)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_factor(s, steps, warmup, alpha_f))
    n = int(ids.shape[0])
    order: list[torch.Tensor] = []
    while len(order) < steps:
        order += list(torch.randperm(n, generator=gen).split(min(batch, n)))
    losses = []
    for step in progress_bar(range(steps), desc=desc, disable=not progress, leave=False):
        rows = order[step]
        total = 0.0
        for chunk in rows.split(micro):
            if extra is not None:
                extra.before_forward()
            x = ids[chunk].to(dev)
            loss = model(input_ids=x, labels=x, use_cache=False).loss * (len(chunk) / len(rows))
            loss.backward()
            total += float(loss.detach())
        if extra is not None:
            extra.after_backward(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if extra is not None:
            extra.step()
        losses.append(total)
    return losses


class _Lagrangian:
    """The mask side of stage 1: sample z before each forward, add the Lagrangian term, step the
    masks (descent) and the multipliers (ascent) with their own Adam at `lag_lr`."""

    def __init__(self, masks: dict[str, HardConcrete], state: dict, lag_lr: float, warmup: int):
        self.masks, self.state, self.warmup = masks, state, warmup
        dev = next(iter(masks.values())).log_alpha.device
        self.lambdas = {k: nn.Parameter(torch.zeros(2, device=dev)) for k in masks}
        self.mask_opt = torch.optim.AdamW([m.log_alpha for m in masks.values()], lr=lag_lr, weight_decay=0.0)
        self.lambda_opt = torch.optim.AdamW(list(self.lambdas.values()), lr=lag_lr, weight_decay=0.0)
        self.log: list[dict] = []

    def before_forward(self) -> None:
        for k, m in self.masks.items():
            self.state[k] = m.sample()

    def after_backward(self, step: int) -> None:
        ramp = min(1.0, step / self.warmup) if self.warmup > 0 else 1.0
        lag = 0.0
        entry = {"step": step}
        for k, m in self.masks.items():
            gap = m.expected_sparsity() - m.target_sparsity * ramp
            lam = self.lambdas[k]
            lag = lag + (lam[0] * gap + lam[1] * gap.pow(2)).mean()
            entry[k] = float(m.expected_sparsity().mean().detach())
        lag.backward()
        for lam in self.lambdas.values():  # gradient ascent on the multipliers
            if lam.grad is not None:
                lam.grad.neg_()
        self.log.append(entry)

    def step(self) -> None:
        self.mask_opt.step()
        self.lambda_opt.step()
        self.mask_opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        for m in self.masks.values():
            m.constrain()


@STRUCTURED.register("sheared_llama", version=1, display="Sheared LLaMA", calibration=True)
def sheared_llama(model: nn.Module, ratio: float, calib_ids: torch.Tensor, *, cache: dict | None = None,
                  target_layers: int | None = None,
                  prune_steps: int = REFERENCE_BUDGET["prune_steps"],
                  prune_batch_size: int = REFERENCE_BUDGET["prune_batch_size"],
                  prune_micro_batch_size: int = REFERENCE_BUDGET["prune_micro_batch_size"],
                  prune_warmup_steps: int = REFERENCE_BUDGET["prune_warmup_steps"],
                  lagrangian_warmup_steps: int = REFERENCE_BUDGET["lagrangian_warmup_steps"],
                  lr: float = REFERENCE_BUDGET["lr"], lag_lr: float = REFERENCE_BUDGET["lag_lr"],
                  continue_steps: int = REFERENCE_BUDGET["continue_steps"],
                  continue_batch_size: int = REFERENCE_BUDGET["continue_batch_size"],
                  continue_micro_batch_size: int = REFERENCE_BUDGET["continue_micro_batch_size"],
                  continue_warmup_steps: int = REFERENCE_BUDGET["continue_warmup_steps"],
                  sample_len: int | None = None, seed: int = 0, device: str | torch.device | None = None,
                  progress: bool = True) -> dict:
    """Learn hard-concrete masks toward the target shape of `ratio` (see `target_shape`), cut the model
    to exactly that shape, then continue pretraining it on `calib_ids` (`continue_steps=0`: skip)."""
    if prune_steps < 1 or continue_steps < 0 or min(prune_batch_size, prune_micro_batch_size, continue_batch_size,
                                                     continue_micro_batch_size) < 1 or lr <= 0 or lag_lr <= 0:
        raise MPTError(f"invalid Sheared LLaMA budget (prune_steps={prune_steps}, continue_steps={continue_steps}, "
                       f"lr={lr}, lag_lr={lag_lr})", "use prune_steps >= 1, continue_steps >= 0 and positive "
                       "batch sizes and learning rates (the reference: 3200, 48000, 1e-4, 1.0)")
    layers = decoder_layers(model)
    for block in layers:
        llama_parts(block)
        norms = [getattr(block, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if len(list(block.children())) != 4 or any(not hasattr(n, "weight") for n in norms):
            raise MPTError(f"Sheared LLaMA needs a pre-norm Llama block (two RMSNorms, no extra norms); got "
                           f"{type(block).__name__}", "use a Llama, Qwen2 or Mistral model")
    shape = target_shape(model, ratio, target_layers)
    attn0, mlp0 = llama_parts(layers[0])
    if any(llama_parts(b)[1].gate_proj.out_features != mlp0.gate_proj.out_features
           or n_kv_groups(llama_parts(b)[0]) != n_kv_groups(attn0) for b in layers):
        raise MPTError("Sheared LLaMA needs a model with the same width in every layer", "prune the dense model")
    ids = calib_ids if sample_len is None else calib_ids[:, :sample_len]
    dev = model_device(model, device)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_l, d, g, m = len(layers), attn0.q_proj.in_features, n_kv_groups(attn0), mlp0.gate_proj.out_features
    masks = {"hidden": HardConcrete((d,), shape.hidden, gen), "head": HardConcrete((n_l, g), shape.groups, gen),
             "intermediate": HardConcrete((n_l, m), shape.intermediate, gen),
             "layer": HardConcrete((n_l,), shape.layers, gen)}
    for mask in masks.values():
        mask.to(dev)
    state: dict[str, torch.Tensor] = {}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(True)
    weights = list(model.parameters())
    lagrangian = _Lagrangian(masks, state, lag_lr, lagrangian_warmup_steps)
    hooks = _Masked(model, state)
    t0 = time.perf_counter()
    model.train()
    try:
        prune_losses = _train(model, ids, weights, prune_steps, prune_batch_size, prune_micro_batch_size, lr,
                              prune_warmup_steps, REFERENCE_BUDGET["betas"], REFERENCE_BUDGET["alpha_f"], gen,
                              dev, "Sheared LLaMA pruning", progress, lagrangian)
    finally:
        hooks.remove()
    prune_seconds = time.perf_counter() - t0
    detail = _cut(model, masks)
    t1 = time.perf_counter()
    cont_losses: list[float] = []
    try:
        if continue_steps > 0:
            weights = list(model.parameters())
            cont_losses = _train(model, ids, weights, continue_steps, continue_batch_size, continue_micro_batch_size,
                                 lr, continue_warmup_steps, REFERENCE_BUDGET["betas"], REFERENCE_BUDGET["alpha_f"],
                                 gen, dev, "Sheared LLaMA continued pretraining", progress)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    last = lagrangian.log[-1] if lagrangian.log else {}
    return {**detail, "target_shape": shape.as_dict(), "prune_steps": prune_steps, "continue_steps": continue_steps,
            "prune_batch_size": min(prune_batch_size, int(ids.shape[0])),
            "continue_batch_size": min(continue_batch_size, int(ids.shape[0])), "seqlen": int(ids.shape[1]),
            "train_windows": int(ids.shape[0]), "lr": lr, "lag_lr": lag_lr,
            "lagrangian_warmup_steps": lagrangian_warmup_steps,
            "expected_sparsity_end": {k: v for k, v in last.items() if k != "step"},
            "target_sparsity": {k: mk.target_sparsity for k, mk in masks.items()},
            "prune_loss_first": prune_losses[0], "prune_loss_last": prune_losses[-1],
            "continue_loss_last": cont_losses[-1] if cont_losses else None, "prune_seconds": prune_seconds,
            "continue_seconds": time.perf_counter() - t1, "dynamic_batch_loading": False,
            "reference_budget": REFERENCE_BUDGET,
            "reduced_budget": sample_len is not None or any(v != REFERENCE_BUDGET[k] for k, v in (
                ("prune_steps", prune_steps), ("prune_batch_size", prune_batch_size), ("lag_lr", lag_lr),
                ("continue_steps", continue_steps), ("continue_batch_size", continue_batch_size)))}
