"""Helpers shared by the low-rank methods that train after decomposing (Lillama, LoSparse)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpt_utils.calibration import capture_block_inputs, decoder_layers
from mpt_utils.lowrank.factorized import set_module


def block_names(model: nn.Module) -> list[str]:
    layers = decoder_layers(model)
    prefix = {id(b): n for n, b in model.named_modules() if any(b is m for m in layers)}
    return [prefix[id(b)] for b in layers]


def swap_in_trainable_copies(model: nn.Module, block: nn.Module, block_name: str,
                             originals: dict[str, nn.Module]) -> list[nn.Parameter]:
    """All trainable parameters of a block whose linears were (partly) replaced: the factors of the new
    layers as they are, and copies of every other parameterised leaf (norms, linears left dense), the
    dense originals kept in `originals`, so training leaves the dense model restorable."""
    from mpt_utils.lowrank.factorized import LowRankLinear

    replaced = [n for n, m in block.named_modules() if isinstance(m, LowRankLinear) or hasattr(m, "dense_shape")]
    params: list[nn.Parameter] = []
    for name in replaced:
        params.extend(block.get_submodule(name).parameters())
    for name, mod in list(block.named_modules()):
        inside = any(name == r or name.startswith(f"{r}.") for r in replaced)
        if name and not inside and next(mod.children(), None) is None and any(True for _ in mod.parameters()):
            twin = copy.deepcopy(mod)
            originals[f"{block_name}.{name}"] = set_module(block, name, twin)
            params.extend(twin.parameters())
    return params


@torch.no_grad()
def block_inputs(model: nn.Module, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every window [n, seqlen, d] and the blocks' keyword arguments."""
    home = next(model.parameters()).device
    model.to(device)
    was = model.training
    model.eval()
    try:
        hidden, kwargs = capture_block_inputs(model, ids, device)
    finally:
        model.train(was)
    model.to(home)
    return torch.cat(hidden), kwargs


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class TrainedCache:
    """The trained layers of the last ratio applied, kept on the CPU: a sweep applies one ratio several
    times in a row (one point per corpus) and the training would be redone each time for the same result."""

    _last: tuple[float, dict[str, nn.Module]] | None = None

    def _remember(self, model: nn.Module, ratio: float, originals: dict[str, nn.Module]) -> None:
        from mpt_utils.lowrank.factorized import get_module

        self._last = (ratio, {n: copy.deepcopy(get_module(model, n)).to("cpu") for n in originals})

    def _recall(self, model: nn.Module, ratio: float, names: list[str], method: str):
        from mpt_utils.lowrank.factorized import LowRankReport, count_params, get_module, layer_reduction

        if self._last is None or self._last[0] != ratio:
            return None
        before = count_params(model)
        originals: dict[str, nn.Module] = {}
        for n, mod in self._last[1].items():
            dev = next(get_module(model, n).parameters()).device
            originals[n] = set_module(model, n, copy.deepcopy(mod).to(dev))
        layers = [layer_reduction(n, get_module(model, n)) for n in names]
        return LowRankReport(method, ratio, layers, before, count_params(model), 0.0, originals)
