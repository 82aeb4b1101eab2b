"""GGUF export of a recipe's torch result: low rank multiplied back, structured shapes checked, and
(with llama.cpp) the file scored in a child process matches the torch model."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from mpt_utils.combined.export import dense_copy, export_recipe_gguf
from mpt_utils.errors import MPTError
from mpt_utils.lowrank.factorized import LowRankLinear
from mpt_utils.native import has_llama_cpp
from mpt_utils.quant.gguf.fileinfo import read_gguf
from mpt_utils.recipe import apply_recipe
from mpt_utils.testing import tiny_model


def _sharp():
    """A tiny Llama with weights scaled up (as in test_gguf): far-from-uniform predictions, so a wrong
    tensor in the file would show in the perplexity."""
    loaded = tiny_model("llama", seed=1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim > 1:
                p.mul_(8)
    return loaded


@pytest.fixture(scope="module")
def svd_export(tmp_path_factory):
    loaded = _sharp()
    low = copy.deepcopy(loaded.model)
    apply_recipe(low, "svd@0.3")
    folder = tmp_path_factory.mktemp("svd")
    dense_path = export_recipe_gguf(loaded.model, loaded.tokenizer, folder / "dense.gguf")
    low_path = export_recipe_gguf(low, loaded.tokenizer, folder / "svd.gguf")
    return loaded, low, dense_path, low_path


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_low_rank_export_has_the_dense_shapes_and_does_not_shrink(svd_export):
    loaded, low, dense_path, low_path = svd_export
    assert isinstance(low.model.layers[0].mlp.down_proj, LowRankLinear)  # the model itself is untouched
    dense_t, low_t = _tensors(dense_path), _tensors(low_path)
    assert {n: tuple(t.shape) for n, t in low_t.items()} == {n: tuple(t.shape) for n, t in dense_t.items()}
    info, ref = read_gguf(low_path), read_gguf(dense_path)
    assert info.n_params == ref.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert info.file_bytes == ref.file_bytes  # llama.cpp stores U·V densely: the file does not shrink
    down = low.model.layers[0].mlp.down_proj
    stored = np.asarray(low_t["blk.0.ffn_down.weight"].data, dtype=np.float32).reshape(down.weight_approx.shape)
    assert np.allclose(stored, down.weight_approx.detach().numpy(), atol=2e-2, rtol=1e-3)  # f16 storage


def test_dense_copy_shares_every_other_tensor_and_computes_the_same():
    loaded = tiny_model("llama", seed=0)
    low = copy.deepcopy(loaded.model)
    apply_recipe(low, "svd@0.3")
    flat = dense_copy(low)
    assert not any(isinstance(m, LowRankLinear) for m in flat.modules())
    assert flat.model.embed_tokens.weight is low.model.embed_tokens.weight
    ids = torch.randint(0, 258, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(flat(ids).logits, low(ids).logits, atol=1e-4)


def test_pruned_zeros_are_written_as_zeros(tmp_path):
    loaded = tiny_model("llama", seed=0)
    pruned = copy.deepcopy(loaded.model)
    apply_recipe(pruned, "magnitude@0.5")
    path = export_recipe_gguf(pruned, loaded.tokenizer, tmp_path / "p.gguf", dtype="f32")
    stored = np.asarray(_tensors(path)["blk.1.ffn_up.weight"].data)
    assert (stored == 0).sum() == int((pruned.model.layers[1].mlp.up_proj.weight == 0).sum()) > 0


def test_non_uniform_structured_pruning_is_one_clear_error_and_uniform_exports(tmp_path):
    loaded = tiny_model("llama", seed=0)
    calib = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    for recipe, what in (("flap@0.3", "per-layer widths"), ("slicegpt@0.2", "SliceGPT")):
        model = copy.deepcopy(loaded.model)
        apply_recipe(model, recipe, calib)
        with pytest.raises(MPTError, match=what) as info:
            export_recipe_gguf(model, loaded.tokenizer, tmp_path / "x.gguf")
        assert "uniform" in info.value.fix and not (tmp_path / "x.gguf").exists()
    hand = copy.deepcopy(loaded.model)  # widths changed by hand, no structure record: the shape check
    mlp = hand.model.layers[1].mlp
    mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(MPTError, match="block 1's mlp.gate_proj is \\(96, 64\\)"):
        export_recipe_gguf(hand, loaded.tokenizer, tmp_path / "x.gguf")
    short = copy.deepcopy(loaded.model)
    apply_recipe(short, "shortgpt@0.5", calib)  # one of two blocks removed: uniform
    path = export_recipe_gguf(short, loaded.tokenizer, tmp_path / "short.gguf")
    assert {n for n in _tensors(path) if n.startswith("blk.")} == {n for n in _tensors(path) if n.startswith("blk.0.")}


@pytest.mark.gguf
@pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")
def test_low_rank_gguf_scores_like_the_torch_model_under_llama_cpp(svd_export):
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.eval.perplexity import perplexity

    _, low, _, low_path = svd_export
    ids = torch.randint(0, 258, (64 * 4,), generator=torch.Generator().manual_seed(0))
    ref = perplexity(low, ids, seqlen=64, progress=False)
    got = llamacpp_perplexity(low_path, ids, seqlen=64, progress=False, kv_type="f32")  # in a child process
    assert ref.ppl > 300  # far from the uniform 258: the check has teeth
    assert abs(got.ppl / ref.ppl - 1) < 0.01
    assert got.n_windows == ref.n_windows and got.n_tokens == ref.n_tokens
