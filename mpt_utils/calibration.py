"""The one layer-by-layer calibration engine shared by pruning, quantization and low-rank methods.

As in SparseGPT/GPTQ/Wanda: capture the inputs of decoder block 0 on the calibration windows, then
for each block i: run it while hooks accumulate per-linear input statistics, let the method compress
the block from those statistics, and produce the inputs of block i+1 by running the (compressed,
when `sequential`) block again. Only one block and the captured activations live on the device.

Block streaming (`stream=True`, or every call inside `with streaming():`) is for models larger than
the device: the model rests on CPU for the whole run; the modules outside the blocks (embeddings,
rotary embedding) visit the device only while block 0's inputs are captured, then each block visits
it in turn and goes back to CPU before the next one comes. The device then holds one block, its
statistics and the activations, and the numbers are those of the in-memory engine (the same
operations on the same device). `peak_device_memory` reads what a run used at most.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from mpt_utils.errors import MPTError
from mpt_utils.progress import progress_bar


class _StopForward(Exception):
    pass


@dataclass
class LayerStats:
    """Statistics of a linear layer's inputs X (rows = tokens) gathered on calibration data."""

    in_features: int
    device: torch.device
    keep_rows: int = 0
    gram: torch.Tensor = field(init=False)  # sum of x xᵀ over tokens, float32 [in, in]
    x_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    n: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)  # a bounded sample of raw inputs

    def __post_init__(self):
        self.gram = torch.zeros(self.in_features, self.in_features, device=self.device)
        self.x_sum = torch.zeros(self.in_features, device=self.device)
        self.abs_sum = torch.zeros(self.in_features, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.t(), x)
        self.x_sum += x.sum(0)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]
        kept = sum(r.shape[0] for r in self.rows)
        if kept < self.keep_rows:
            self.rows.append(x[: self.keep_rows - kept].detach().clone())

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n XᵀX, the layer-wise reconstruction Hessian of SparseGPT/GPTQ."""
        return self.gram * (2.0 / max(self.n, 1))

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖₂² per input feature (Wanda's activation norm, squared)."""
        return torch.diagonal(self.gram).clone()

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / max(self.n, 1)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_norm / max(self.n, 1) - self.mean**2).clamp_min(0)

    def sample(self) -> torch.Tensor:
        if not self.rows:
            raise MPTError("this method needs raw calibration rows", "call layerwise(..., keep_rows>0)")
        return torch.cat(self.rows)

    def to(self, device: torch.device | str) -> LayerStats:
        self.gram, self.x_sum, self.abs_sum = (t.to(device) for t in (self.gram, self.x_sum, self.abs_sum))
        self.rows = [r.to(device) for r in self.rows]
        self.device = torch.device(device)
        return self


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a causal LM (Llama/Qwen2/Mistral/Gemma: model.layers; OPT: decoder.layers)."""
    base = getattr(model, "model", model)
    for path in ("layers", "decoder.layers", "language_model.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise MPTError(f"cannot find decoder layers in {type(model).__name__}",
                   "supported: Llama, Qwen2, Mistral, Gemma and OPT-style decoders from transformers")


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of a block by its name inside the block (e.g. 'self_attn.q_proj')."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def check_calibration_inputs(model: nn.Module, calib_ids: torch.Tensor) -> None:
    """Windows within the model's context and finite weights, checked before any block runs: NaN
    weights would otherwise surface later as failed Hessian factorizations blamed on the data."""
    from mpt_utils.models import check_finite_weights, check_seqlen

    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.is_floating_point():
        shape = tuple(calib_ids.shape) if isinstance(calib_ids, torch.Tensor) else type(calib_ids).__name__
        raise MPTError(f"calibration ids must be a LongTensor [n, seqlen], got {shape}",
                       "pass calib_ids=calibration_windows(tokenizer, data, n, seqlen)")
    if calib_ids.shape[0] == 0:
        raise MPTError("calibration ids hold no windows", "pass calib_ids=calibration_windows(tokenizer, data, n, seqlen)")
    check_seqlen(model, int(calib_ids.shape[1]))
    check_finite_weights(model)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, device: torch.device
                         ) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each calibration window, plus the block's keyword arguments
    (position embeddings, masks) with the KV cache dropped so shapes stay fixed across calls."""
    layers = decoder_layers(model)
    check_calibration_inputs(model, calib_ids)
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in calib_ids:
            try:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    for key in ("past_key_value", "past_key_values", "cache_position"):
        kwargs_seen.pop(key, None)
    kwargs_seen["use_cache"] = False
    return captured, kwargs_seen


@dataclass
class BlockIO:
    """What a block saw on the calibration windows: its inputs (one tensor per window), its outputs
    before compression and the keyword arguments it is called with (for methods that train a block)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    kwargs: dict


OnBlock = Callable[..., None]  # on_block(i, block, stats) or, with block_io=True, on_block(i, block, stats, io)

# the default of `layerwise(stream=None)`: set by `streaming()` so a whole recipe streams without
# every family's entry point passing the flag down
_STREAM: ContextVar[bool] = ContextVar("mpt_stream_blocks", default=False)
OFFLOAD = torch.device("cpu")


@contextlib.contextmanager
def streaming(enabled: bool = True) -> Iterator[None]:
    """Every `layerwise` call inside the block (pruning, GPTQ, AWQ, SVD-LLM, statistics) streams
    blocks from CPU (module docstring) unless it passes `stream=False` itself."""
    token = _STREAM.set(bool(enabled))
    try:
        yield
    finally:
        _STREAM.reset(token)


def streaming_enabled() -> bool:
    """Whether `layerwise(stream=None)` streams here (inside `streaming()`)."""
    return _STREAM.get()


def _place(module: nn.Module, device: torch.device) -> nn.Module:
    """Move `module` (a block, or a leaf outside the blocks) to `device`: the one place the engine
    moves weights, so the streaming bookkeeping can be checked."""
    return module.to(device)


def reset_peak_device_memory(device: str | torch.device | None) -> None:
    """Start a new peak for `peak_device_memory` (CUDA only; nothing to do elsewhere)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)


def peak_device_memory(device: str | torch.device | None) -> int | None:
    """Bytes allocated at most on a CUDA `device` since the last reset
    (`torch.cuda.max_memory_allocated`); None elsewhere, where torch keeps no such counter."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(dev))
    return None


@torch.no_grad()
def layerwise(model: nn.Module, calib_ids: torch.Tensor, on_block: OnBlock, *, sequential: bool = True,
              device: str | torch.device | None = None, keep_rows: int = 0,
              layer_filter: Callable[[str], bool] | None = None, progress: bool = True,
              desc: str = "blocks", stream: bool | None = None, block_io: bool = False) -> None:
    """Run `on_block(i, block, stats)` for every decoder block, in order, on calibration inputs.

    `stats` maps each linear's name inside the block to its LayerStats. With `sequential=True` the
    next block sees the outputs of the compressed block (SparseGPT/GPTQ), else of the dense one.
    `stream`: keep the model on CPU and move one block at a time to `device` (module docstring);
    None: as set by `streaming()` (off by default). The model ends where it started.
    `block_io=True` also passes a `BlockIO` (the block's inputs and its uncompressed outputs).
    """
    from mpt_utils.models import pick_device

    dev = pick_device(device)
    stream = streaming_enabled() if stream is None else bool(stream)
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    rest = OFFLOAD if stream else home  # where a block goes after its visit to the device
    if stream and home != OFFLOAD:
        _place(model, OFFLOAD)
    # Everything but the blocks goes to the device (for the capture); blocks visit it one at a time.
    outside = [child for _name, child in _non_layer_modules(model, layers)]
    for child in outside:
        _place(child, dev)
    was_training = model.training
    model.eval()
    try:
        inputs, kwargs = capture_block_inputs(model, calib_ids, dev)
        if stream:  # only the capture needs them; the blocks' kwargs (rotary cos/sin) are already tensors
            for child in outside:
                _place(child, OFFLOAD)
        for i in progress_bar(range(len(layers)), desc=desc, disable=not progress, leave=False):
            block = _place(layers[i], dev)
            linears = {n: m for n, m in linear_layers(block).items() if layer_filter is None or layer_filter(n)}
            stats = {n: LayerStats(m.in_features, dev, keep_rows) for n, m in linears.items()}
            hooks = [m.register_forward_hook(_accumulate(stats[n])) for n, m in linears.items()]
            outputs = []
            try:
                for x in inputs:
                    outputs.append(_first_output(block(x, **kwargs)))
            finally:
                for h in hooks:
                    h.remove()
            if block_io:
                on_block(i, block, stats, BlockIO(inputs, outputs, kwargs))
            else:
                on_block(i, block, stats)
            if sequential:
                outputs = [_first_output(block(x, **kwargs)) for x in inputs]
            inputs = outputs
            _place(layers[i], rest)
            del stats
    finally:
        _place(model, home)
        model.train(was_training)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _accumulate(stats: LayerStats):
    def hook(_module, args, _output):  # returns None: a hook that returns a value replaces the output
        stats.add(args[0].detach())

    return hook


def _non_layer_modules(model: nn.Module, layers: nn.ModuleList):
    """Leaf modules outside the block list (embeddings, final norm, rotary embedding, lm_head)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    for name, child in model.named_modules():
        if id(child) not in inside and next(child.children(), None) is None:
            yield name, child


@torch.no_grad()
def collect_stats(model: nn.Module, calib_ids: torch.Tensor, *, device: str | torch.device | None = None,
                  keep_rows: int = 0, layer_filter: Callable[[str], bool] | None = None,
                  progress: bool = True, store_device: str = "cpu",
                  stream: bool | None = None) -> dict[str, LayerStats]:
    """Statistics of every linear in every block from the dense model in one pass, keyed by the full
    module name. Ratio sweeps compute this once and reuse it for every point (one-shot from dense)."""
    layers = decoder_layers(model)
    prefix = {id(layer): name for name, layer in model.named_modules() if any(layer is m for m in layers)}
    collected: dict[str, LayerStats] = {}

    def keep(i: int, block: nn.Module, stats: dict[str, LayerStats]) -> None:
        for name, st in stats.items():
            collected[f"{prefix[id(block)]}.{name}"] = st.to(store_device)

    layerwise(model, calib_ids, keep, sequential=False, device=device, keep_rows=keep_rows,
              layer_filter=layer_filter, progress=progress, desc="calibration stats", stream=stream)
    return collected
