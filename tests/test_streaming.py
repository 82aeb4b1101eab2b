"""Block streaming in the calibration engine: the in-memory engine's weights, one block on the
device at a time, and the grid's points unchanged by it."""

from __future__ import annotations

import copy

import pytest
import torch

from mpt_utils import calibration
from mpt_utils.calibration import (
    _non_layer_modules,
    decoder_layers,
    layerwise,
    peak_device_memory,
    streaming,
    streaming_enabled,
)
from mpt_utils.combined.grid import GridBench, GridSetup, grid_point
from mpt_utils.prune import prune_model
from mpt_utils.store import ResultsStore
from mpt_utils.testing import TinyLoader, tiny_model


def _calib(n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_streamed_pruning_gives_the_weights_of_the_in_memory_engine(method):
    dense = tiny_model("llama", seed=1, layers=3).model
    in_memory, streamed, by_context = (copy.deepcopy(dense) for _ in range(3))
    prune_model(in_memory, method, 0.5, calib_ids=_calib(), stream=False)
    prune_model(streamed, method, 0.5, calib_ids=_calib(), stream=True)
    with streaming():
        assert streaming_enabled()
        prune_model(by_context, method, 0.5, calib_ids=_calib())
    assert not streaming_enabled()
    reference = in_memory.state_dict()
    assert any(not torch.equal(reference[k], v) for k, v in dense.state_dict().items())  # it did prune
    for other in (streamed, by_context):
        assert all(torch.equal(reference[k], v) for k, v in other.state_dict().items())
        assert next(other.parameters()).device == torch.device("cpu")


def test_only_one_block_visits_the_device_at_a_time(monkeypatch):
    """`_place` is the engine's only weight move; here it records where each module would be
    ("meta" standing for the CPU rest, "cpu" for the target device) and leaves it on the CPU."""
    model = tiny_model("llama", seed=0, layers=4).model
    layers = decoder_layers(model)
    blocks = {id(b): i for i, b in enumerate(layers)}
    outside = {id(m) for _, m in _non_layer_modules(model, layers)}
    where: dict[int, str] = {k: "cpu" for k in [*blocks, *outside]}
    moves: list[tuple[str, str]] = []

    def place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        for m in module.modules():
            if id(m) in where:
                where[id(m)] = str(torch.device(device))
        moves.append((f"block {blocks[id(module)]}" if id(module) in blocks else type(module).__name__,
                      str(torch.device(device))))
        return module

    monkeypatch.setattr(calibration, "_place", place)
    monkeypatch.setattr(calibration, "OFFLOAD", torch.device("meta"))

    def on_device() -> tuple[set[int], set[str]]:
        return ({i for k, i in blocks.items() if where[k] == "cpu"}, {where[k] for k in outside})

    seen: list[tuple[int, set[int], set[str]]] = []
    capture: list[tuple[set[int], set[str]]] = []
    handle = layers[0].register_forward_pre_hook(lambda *_: capture.append(on_device()) if not seen else None)
    try:
        layerwise(model, _calib(), lambda i, block, stats: seen.append((i, *on_device())), device="cpu",
                  stream=True, progress=False)
    finally:
        handle.remove()
    # capturing block 0's inputs: the modules outside the blocks on the device, no block
    assert capture[0] == (set(), {"cpu"})
    # each block alone on the device while it is compressed; embeddings and head back at rest
    assert [(i, on, out) for i, on, out in seen] == [(i, {i}, {"meta"}) for i in range(len(layers))]
    assert [m for m in moves if m[0].startswith("block")][:4] == [("block 0", "cpu"), ("block 0", "meta"),
                                                                    ("block 1", "cpu"), ("block 1", "meta")]
    assert moves[0] == ("LlamaForCausalLM", "meta") and moves[-1] == ("LlamaForCausalLM", "cpu")  # ends home
    assert on_device() == (set(range(len(layers))), {"cpu"})


def test_peak_device_memory_is_cuda_only():
    assert peak_device_memory("cpu") is None and peak_device_memory(None) is None
    calibration.reset_peak_device_memory("cpu")  # nothing to reset, no error


def test_a_streamed_grid_point_is_the_in_memory_point(tmp_path, corpus):
    setups = [GridSetup(model="tiny-llama", eval_data=corpus, calib_data=corpus, n_calib=4, seqlen=32, max_windows=4,
                        seed=0, device="cpu", stream=stream) for stream in (False, True)]
    rows = [grid_point(ResultsStore(tmp_path / str(s.stream)), GridBench(s, TinyLoader()), "sparsegpt@0.5 > rtn:4bit")
            for s in setups]
    for a, b in zip(*rows):
        assert a["metric"] == b["metric"] and a["config_hash"] == b["config_hash"]  # streaming is not in the key
        if a["metric"] not in ("step_seconds", "peak_device_bytes"):
            assert a["value"] == pytest.approx(b["value"], rel=1e-6)
    peaks = [next(r for r in point if r["metric"] == "peak_device_bytes") for point in rows]
    assert [p["stream"] for p in peaks] == [False, True]
    assert all(p["value"] is None and p["peak_memory"] == "n/a" for p in peaks)
