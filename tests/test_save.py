"""Compressed models saved as folders: round trips (logits of the reloaded model equal the in-memory
compressed model's), plain transformers where the architecture allows it, refusals where not."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.lowrank import LowRankLinear, decompose
from mpt_utils.models import load_model
from mpt_utils.prune.engine import prune_model
from mpt_utils.prune.structured.surgery import drop_blocks, keep_kv_groups, keep_mlp_channels
from mpt_utils.quant import quantize
from mpt_utils.save import MANIFEST, SUITE_WEIGHTS, load_compressed, save_compressed
from mpt_utils.testing import tiny_model


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model, ids):
    return model.eval()(ids).logits


def plain(path):
    """Loaded with transformers alone, no suite code."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_same(a, b, ids, atol=1e-5):
    torch.testing.assert_close(logits(a, ids), logits(b, ids), atol=atol, rtol=1e-4)


def test_unstructured_pruned_model_is_a_plain_folder(tmp_path, probe):
    loaded = tiny_model("llama")
    prune_model(loaded.model, "magnitude", 0.5)
    saved = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    assert saved.layout == "transformers" and saved.loads_with.startswith("transformers.")
    back = plain(tmp_path / "pruned")
    assert_same(loaded.model, back, probe)
    assert (back.model.layers[0].mlp.up_proj.weight == 0).float().mean() >= 0.5  # the zeros are stored
    assert (tmp_path / "pruned" / "model.safetensors").exists()
    assert json.loads((tmp_path / "pruned" / MANIFEST).read_text())["layout"] == "transformers"


def test_fake_quantized_model_is_a_plain_folder(tmp_path, probe):
    loaded = tiny_model("llama", seed=1)
    quantize(loaded.model, "rtn", bits=4, group_size=32, progress=False)
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "q")
    assert_same(loaded.model, plain(tmp_path / "q"), probe)


def test_depth_pruned_config_follows_the_kept_blocks(tmp_path, probe):
    loaded = tiny_model("qwen2", layers=4)  # qwen2 carries a per-layer `layer_types` list
    loaded.model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    drop_blocks(loaded.model, [1])
    assert [m.layer_idx for m in (b.self_attn for b in decoder_layers(loaded.model))] == [0, 1, 2]
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["layer_types"] == ["full_attention"] * 3
    back = plain(tmp_path / "short")
    assert [b.self_attn.layer_idx for b in back.model.layers] == [0, 1, 2]
    assert_same(loaded.model, back, probe)


def test_blocks_removed_behind_the_configs_back_are_refused(tmp_path):
    loaded = tiny_model("qwen2", layers=4)
    del loaded.model.model.layers[1]  # layer_types still lists four layers
    with pytest.raises(MPTError, match="layer_types has 4 entries for 3"):
        save_compressed(loaded.model, loaded.tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _keep(block, kv_groups, channels):
    keep_kv_groups(block, torch.arange(kv_groups))
    keep_mlp_channels(block, torch.arange(channels))


def test_uniform_width_pruning_updates_the_config_sizes(tmp_path, probe):
    loaded = tiny_model("llama")  # 4 heads in 2 KV groups, FFN 128
    for block in decoder_layers(loaded.model):
        _keep(block, 1, 96)
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "narrow")
    config = json.loads((tmp_path / "narrow" / "config.json").read_text())
    sizes = (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"])
    assert sizes == (2, 1, 96)
    assert "mpt_structure" not in config
    assert_same(loaded.model, plain(tmp_path / "narrow"), probe)
    assert loaded.model.config.intermediate_size == 128  # the in-memory model's config is left alone


def test_non_uniform_widths_are_refused_then_saved_in_the_suite_format(tmp_path, probe):
    loaded = tiny_model("llama")
    _keep(decoder_layers(loaded.model)[0], 1, 64)  # block 1 keeps its full width
    with pytest.raises(MPTError) as err:
        save_compressed(loaded.model, loaded.tokenizer, tmp_path / "flap")
    assert "different widths" in str(err.value) and 'layout="suite"' in err.value.fix
    assert not (tmp_path / "flap").exists()
    saved = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "flap", layout="suite")
    assert saved.layout == "suite" and (tmp_path / "flap" / SUITE_WEIGHTS).exists()
    assert_same(loaded.model, load_compressed(tmp_path / "flap").model, probe)
    assert_same(loaded.model, load_model(str(tmp_path / "flap")).model, probe)  # the suite's usual loader


@pytest.mark.parametrize("tied", [False, True])
def test_low_rank_keeps_its_factors_by_default(tied, tmp_path, probe):
    loaded = tiny_model("llama", seed=2)
    if tied:  # like the embedded SmolLM2: one matrix for embedding and LM head
        loaded.model.config.tie_word_embeddings = True
        loaded.model.tie_weights()
    decompose(loaded.model, "svd", 0.3)
    saved = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "lr")
    assert saved.layout == "suite" and "cannot load" in saved.note and saved.lowrank
    name, spec = next(iter(saved.lowrank.items()))
    assert spec["rank"] == loaded.model.get_submodule(name).rank
    back = load_compressed(tmp_path / "lr")
    assert isinstance(back.model.get_submodule(name), LowRankLinear) and back.tokenizer is not None
    assert_same(loaded.model, back.model, probe)
    assert back.model.lm_head.weight is back.model.model.embed_tokens.weight or not tied
    assert_same(loaded.model, load_model(str(tmp_path / "lr")).model, probe)
    with pytest.raises(OSError):  # plain transformers fails loudly rather than building random layers
        plain(tmp_path / "lr")


def test_low_rank_merged_is_a_plain_dense_folder(tmp_path, probe):
    loaded = tiny_model("llama", seed=2)
    decompose(loaded.model, "svd", 0.3)
    saved = save_compressed(loaded.model, loaded.tokenizer, tmp_path / "merged", merge=True)
    assert saved.layout == "transformers" and "dense-size" in saved.note
    assert_same(loaded.model, plain(tmp_path / "merged"), probe, atol=1e-4)
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())  # the model is unchanged
    with pytest.raises(MPTError, match="no factorized linear"):
        save_compressed(loaded.model, loaded.tokenizer, tmp_path / "x", layout="transformers")


def test_low_rank_on_a_width_pruned_model(tmp_path, probe):
    loaded = tiny_model("llama", seed=4)
    for block in decoder_layers(loaded.model):
        _keep(block, 1, 96)
    decompose(loaded.model, "svd", 0.2)
    save_compressed(loaded.model, None, tmp_path / "both")
    assert_same(loaded.model, load_compressed(tmp_path / "both").model, probe)


def test_hooks_that_change_the_computation_are_refused(tmp_path, probe):
    loaded = tiny_model("llama")
    target = loaded.model.model.layers[0].mlp.down_proj
    target.register_forward_pre_hook(lambda _m, args: (args[0].round(), *args[1:]))
    with pytest.raises(MPTError, match="forward hooks"):
        save_compressed(loaded.model, loaded.tokenizer, tmp_path / "h")
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "h", ignore_hooks=True)
    assert (tmp_path / "h" / "model.safetensors").exists()


def test_a_module_the_layout_cannot_rebuild_is_refused(tmp_path):
    from mpt_utils.prune.structured.recovery import LoRALinear

    loaded = tiny_model("llama")
    mlp = loaded.model.model.layers[0].mlp
    mlp.up_proj = LoRALinear(mlp.up_proj, rank=2, alpha=4, dropout=0.0)  # adapters not merged
    for layout in ("transformers", "suite"):
        with pytest.raises(MPTError, match="tensors differ.*lora"):
            save_compressed(loaded.model, loaded.tokenizer, tmp_path / "lora", layout=layout)
    mlp.up_proj = mlp.up_proj.merged()
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "lora")


def test_folders_are_replaced_only_when_they_hold_an_artifact(tmp_path):
    loaded = tiny_model("llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(MPTError, match="not empty"):
        save_compressed(loaded.model, loaded.tokenizer, tmp_path / "busy")
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "art")
    decompose(loaded.model, "svd", 0.3)
    save_compressed(loaded.model, loaded.tokenizer, tmp_path / "art")  # plain -> suite: no stale weights left
    assert not (tmp_path / "art" / "model.safetensors").exists() and (tmp_path / "art" / SUITE_WEIGHTS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "busy"]
