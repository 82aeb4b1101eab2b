"""The pruning driver on tiny random decoders: what it touches, its modes, saving and reloading."""

import pytest
import torch

from mpt_utils.calibration import collect_stats, decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.models import load_model
from mpt_utils.prune import prune_model
from mpt_utils.prune.engine import save_pruned
from mpt_utils.prune.measure import sparsity_report
from mpt_utils.testing import tiny_model


def _calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _is_block_linear(model, name):
    blocks = {id(b) for b in decoder_layers(model)}
    owners = [m for n, m in model.named_modules() if name.startswith(n + ".") and id(m) in blocks]
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return bool(owners) and isinstance(module, torch.nn.Linear) and name.endswith(".weight")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_changes_only_decoder_linear_weights(method):
    lm = tiny_model("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    report = prune_model(lm.model, method, 0.5, calib_ids=_calib())
    after = lm.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(_is_block_linear(lm.model, k) for k in changed)
    assert len(changed) == 2 * 7  # q, k, v, o, gate, up, down in both blocks
    assert report.mode == "sequential" and report.achieved == pytest.approx(0.5, abs=0.01)
    assert all(s == pytest.approx(0.5, abs=0.01) for s in report.block_sparsity)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3_text", "opt"])
def test_engine_runs_on_other_decoders(arch):
    lm = tiny_model(arch)
    report = prune_model(lm.model, "sparsegpt", pattern="2:4", calib_ids=_calib(2, 16))
    assert report.nm_ok and report.achieved == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(lm.model(input_ids=_calib(1, 8)).logits).all()


def test_dense_stats_equal_one_shot_engine_and_cache_is_reused():
    calib = _calib()
    a, b = tiny_model("llama"), tiny_model("llama")
    stats = collect_stats(a.model, calib, progress=False)
    cache: dict = {}
    ra = prune_model(a.model, "sparsegpt", 0.5, stats=stats, cache=cache)
    prune_model(b.model, "sparsegpt", 0.5, calib_ids=calib, sequential=False)
    assert ra.mode == "dense-stats" and len(cache) == 14
    for (ka, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-5), ka
    factor = next(iter(cache.values()))
    prune_model(tiny_model("llama").model, "sparsegpt", 0.7, stats=stats, cache=cache)
    assert next(iter(cache.values())) is factor  # the inverse-Hessian factor was not recomputed


def test_owl_block_ratios_average_to_target_in_the_engine():
    lm = tiny_model("llama", layers=4)
    report = prune_model(lm.model, "owl", 0.6, calib_ids=_calib(), base="wanda")
    assert sum(report.block_targets) / 4 == pytest.approx(0.6)
    assert len(set(report.block_targets)) > 1
    assert report.achieved == pytest.approx(0.6, abs=0.01)
    with pytest.raises(MPTError, match="N:M"):
        prune_model(lm.model, "owl", pattern="2:4", calib_ids=_calib())


def test_methods_needing_data_say_so_and_magnitude_needs_none():
    lm = tiny_model("llama")
    with pytest.raises(MPTError, match="calibration"):
        prune_model(lm.model, "wanda", 0.5)
    assert prune_model(lm.model, "magnitude", pattern="4:8").nm_ok


def test_pruned_model_saves_and_reloads(tmp_path):
    lm = tiny_model("llama")
    prune_model(lm.model, "magnitude", 0.5)
    path = save_pruned(lm.model, lm.tokenizer, tmp_path / "pruned")
    assert list(path.glob("*.safetensors"))
    again = load_model(str(path), device="cpu", dtype="float32")
    assert sparsity_report(again.model)["sparsity"] == pytest.approx(sparsity_report(lm.model)["sparsity"])
    ids = _calib(1, 8)
    assert torch.allclose(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits, atol=1e-5)
