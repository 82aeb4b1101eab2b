"""Forward passes the diagnostics share: one recorded run per model, re-runs from a block, patches.

`trace(model, batch)` runs the model once (eager attention, so the attention probabilities exist)
and keeps, per decoder block, the hidden states entering and leaving it, the outputs of its
attention and MLP, its SwiGLU gate pre-activations and its attention probabilities, plus the
answer-position logits. `run_from(model, batch, start, hidden)` re-runs only blocks start.. on a
cached input (earlier blocks are skipped), optionally with module outputs replaced: patching a
module of block l never needs blocks before l again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mpt_utils.calibration import decoder_layers
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.errors import MPTError

PARTS = ("attn", "mlp")  # the two sub-modules of a decoder block that patching restores
Site = tuple[int, str]  # (block index, part)


def block_part(layer: nn.Module, part: str) -> nn.Module:
    """The attention (`self_attn`) or MLP (`mlp`) module of one decoder block."""
    name = {"attn": "self_attn", "mlp": "mlp"}.get(part)
    if name is None:
        raise MPTError(f"unknown block part {part!r}", f"use one of {PARTS}")
    module = getattr(layer, name, None)
    if module is None:
        raise MPTError(f"{type(layer).__name__} has no `{name}` module",
                       "the diagnostics need Llama/Qwen2/Mistral/Gemma-style blocks (self_attn + mlp)")
    return module


def gate_module(layer: nn.Module) -> nn.Module | None:
    """The gate projection of a gated (SwiGLU / GeGLU) MLP, None for an ungated MLP."""
    return getattr(getattr(layer, "mlp", None), "gate_proj", None)


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    for path in ("norm", "decoder.final_layer_norm", "language_model.norm"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Module):
            return obj
    raise MPTError(f"cannot find the final norm of {type(model).__name__}",
                   "supported: Llama, Qwen2, Mistral, Gemma and OPT-style decoders from transformers")


def head_logits(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """lm_head on final-normed hidden states, with Gemma's logit soft-capping where the config has it."""
    logits = model.get_output_embeddings()(normed).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def lens_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens: final norm + lm_head applied to a residual-stream state."""
    return head_logits(model, final_norm(model)(hidden))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, value: torch.Tensor):
    """A module output with its main tensor replaced; tuples (attention: output, weights) keep the rest."""
    if isinstance(out, tuple):
        return (value, *out[1:])
    if isinstance(out, list):
        return [value, *out[1:]]
    return value


def at_answer(hidden: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """[B, T, D] -> [B, D]: the state at each prompt's last real position."""
    return hidden[torch.arange(hidden.shape[0]), batch.last.to(hidden.device)]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention for the duration (SDPA/flash kernels never materialise the probabilities)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class Trace:
    """What one forward pass of `model` on a batch computed, per decoder block (CPU float32)."""

    block_inputs: list[torch.Tensor]
    block_outputs: list[torch.Tensor]
    parts: dict[Site, torch.Tensor]
    gates: list[torch.Tensor | None]
    attention: list[torch.Tensor | None]
    logits: torch.Tensor  # [B, V] at the answer positions
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.block_outputs)

    def subset(self, batch: PromptBatch, index: Sequence[int]) -> Trace:
        """The trace of `batch.subset(index)` cut out of this one: right padding and causal attention
        make every kept position exactly what a run on the subset alone computes."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        width = int(batch.lengths[idx].max())

        def cut(t: torch.Tensor | None, seq_dims: tuple[int, ...] = (1,)) -> torch.Tensor | None:
            if t is None:
                return None
            t = t[idx]
            for d in seq_dims:
                t = t.narrow(d, 0, width)
            return t.contiguous()

        return Trace([cut(t) for t in self.block_inputs], [cut(t) for t in self.block_outputs],
                     {k: cut(v) for k, v in self.parts.items()}, [cut(g) for g in self.gates],
                     [cut(w, (2, 3)) for w in self.attention], self.logits[idx])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def trace(model: nn.Module, batch: PromptBatch, attention: bool = True) -> Trace:
    """Run `model` on `batch` once and record every block's states (see the module docstring)."""
    layers = decoder_layers(model)
    n = len(layers)
    inputs: list = [None] * n
    outputs: list = [None] * n
    parts: dict[Site, torch.Tensor] = {}
    gates: list = [None] * n
    attn: list = [None] * n
    handles = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu()

    def on_input(i):
        def hook(_m, args, kwargs):
            inputs[i] = keep(args[0] if args else kwargs["hidden_states"])
        return hook

    def on_output(i):
        def hook(_m, _a, out):
            outputs[i] = keep(_first(out))
        return hook

    def on_part(i, part):
        def hook(_m, _a, out):
            parts[(i, part)] = keep(_first(out))
            if part == "attn" and isinstance(out, (tuple, list)) and len(out) > 1 and out[1] is not None:
                attn[i] = keep(out[1])
        return hook

    def on_gate(i):
        def hook(_m, _a, out):
            gates[i] = keep(out)
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(on_input(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(on_output(i)))
            for part in PARTS:
                handles.append(block_part(layer, part).register_forward_hook(on_part(i, part)))
            gate = gate_module(layer)
            if gate is not None:
                handles.append(gate.register_forward_hook(on_gate(i)))
        ctx = eager_attention(model) if attention else _null()
        with ctx:
            logits = _answer_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return Trace(inputs, outputs, parts, gates, attn, logits.cpu())


@contextmanager
def _null() -> Iterator[None]:
    yield


def _answer_logits(model: nn.Module, batch: PromptBatch) -> torch.Tensor:
    """Logits at the answer positions only (the lm_head on every position would be wasted work)."""
    base = getattr(model, "model", None)
    if base is None:
        raise MPTError(f"{type(model).__name__} has no `.model` base", "pass a transformers *ForCausalLM model")
    out = base(input_ids=batch.input_ids.to(_device(model)), use_cache=False)
    return head_logits(model, at_answer(out.last_hidden_state, batch)).float()


class _Passthrough(nn.Module):
    """Stands in for a decoder block that is not re-run: returns the hidden states it gets."""

    def __init__(self, original: nn.Module, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        if hasattr(original, "attention_type"):  # sliding/full mask selection reads it (Gemma, Qwen2)
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


@contextmanager
def patched(model: nn.Module, patches: Mapping[Site, torch.Tensor]) -> Iterator[None]:
    """Forward hooks that replace the output of each (block, part) by the given tensor. A forward hook
    returning a value replaces the module's output; tuple outputs keep their other elements."""
    layers = decoder_layers(model)
    handles = []

    def hook_for(value: torch.Tensor):
        def hook(_m, _a, out):
            first = _first(out)
            return _replace_first(out, value.to(device=first.device, dtype=first.dtype))
        return hook

    try:
        for (i, part), value in patches.items():
            handles.append(block_part(layers[i], part).register_forward_hook(hook_for(value)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def swapped_blocks(model: nn.Module, blocks: Mapping[int, nn.Module]) -> Iterator[None]:
    """Decoder blocks of `model` temporarily replaced (by index) with other modules."""
    layers = decoder_layers(model)
    saved = {i: layers[i] for i in blocks}
    try:
        for i, block in blocks.items():
            layers[i] = block
        yield
    finally:
        for i, block in saved.items():
            layers[i] = block


_TUPLE_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _returns_tuple(model: nn.Module, batch: PromptBatch) -> bool:
    # decoder blocks return a tensor in recent transformers and a tuple in older ones; asked once per model
    if model in _TUPLE_BLOCKS:
        return _TUPLE_BLOCKS[model]
    seen = {}
    layer = decoder_layers(model)[0]
    def look(_m, _a, out) -> None:  # must return None: a returned value would replace the output
        seen["t"] = isinstance(out, (tuple, list))

    handle = layer.register_forward_hook(look)
    try:
        with torch.no_grad():
            _answer_logits(model, batch.subset([0]))
    finally:
        handle.remove()
    _TUPLE_BLOCKS[model] = seen["t"]
    return seen["t"]


@torch.no_grad()
def run_from(model: nn.Module, batch: PromptBatch, start: int, hidden: torch.Tensor | None = None,
             patches: Mapping[Site, torch.Tensor] | None = None) -> torch.Tensor:
    """Answer logits [B, V] of `model` re-run from block `start`, fed `hidden` (the states entering
    block `start`, e.g. `trace.block_inputs[start]`); blocks before `start` are skipped. With
    `start=0` and no `hidden` this is a plain forward pass. `patches` replace module outputs."""
    layers = decoder_layers(model)
    if not 0 <= start < len(layers):
        raise MPTError(f"start block {start} is outside [0, {len(layers)})", "pick an existing block index")
    if start > 0 and hidden is None:
        raise MPTError("re-running from a later block needs the hidden states entering it",
                       "pass hidden=trace(model, batch).block_inputs[start]")
    as_tuple = _returns_tuple(model, batch) if start > 0 else False
    skip = {i: _Passthrough(layers[i], as_tuple) for i in range(start)}
    handle = None
    if hidden is not None:
        value = hidden.to(_device(model))

        def feed(_m, args, kwargs):
            if args:
                return (value.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": value.to(kwargs["hidden_states"].dtype)}

        handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        with swapped_blocks(model, skip), patched(model, patches or {}):
            return _answer_logits(model, batch).cpu()
    finally:
        if handle is not None:
            handle.remove()
