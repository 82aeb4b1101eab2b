import pytest
import torch

from mpt_utils.calibration import collect_stats, decoder_layers, layerwise, linear_layers
from mpt_utils.testing import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3_text", "opt"])
def test_engine_visits_every_block_and_keeps_dense_outputs(arch):
    loaded = tiny_model(arch)
    model = loaded.model
    calib = torch.randint(0, 258, (3, 16))
    before = model(calib).logits
    seen = []

    def on_block(i, block, stats):
        seen.append(i)
        assert set(stats) == set(linear_layers(block))
        assert all(s.n == 3 * 16 for s in stats.values())

    layerwise(model, calib, on_block, progress=False)
    assert seen == list(range(len(decoder_layers(model))))
    assert torch.allclose(model(calib).logits, before)  # a no-op method leaves the model unchanged


def test_gram_matches_hooked_inputs(tiny):
    model = tiny.model
    calib = torch.randint(0, 258, (2, 16))
    target = decoder_layers(model)[1].mlp.down_proj
    grabbed = []
    h = target.register_forward_hook(lambda m, a, o: grabbed.append(a[0].reshape(-1, a[0].shape[-1])))
    model(calib[:1])
    model(calib[1:])
    h.remove()
    x = torch.cat(grabbed)
    stats = collect_stats(model, calib, progress=False, keep_rows=5)
    st = stats["model.layers.1.mlp.down_proj"]
    assert st.n == 32
    assert torch.allclose(st.gram, x.t() @ x, atol=1e-4)
    assert torch.allclose(st.sq_norm, (x**2).sum(0), atol=1e-4)
    assert torch.allclose(st.abs_mean, x.abs().mean(0), atol=1e-5)
    assert st.sample().shape == (5, x.shape[1])


def test_sequential_propagates_compressed_outputs(tiny):
    """With sequential=True block i+1 sees the compressed block i: zeroing block 0's o_proj
    changes block 1's statistics; with sequential=False it does not."""
    calib = torch.randint(0, 258, (2, 16))
    grams = {}
    for sequential in (True, False):
        model = tiny_model("llama").model

        def on_block(i, block, stats, sequential=sequential):
            if i == 0:
                block.self_attn.o_proj.weight.data.zero_()
                block.mlp.down_proj.weight.data.zero_()
            else:
                grams[sequential] = stats["self_attn.q_proj"].gram.clone()

        layerwise(model, calib, on_block, sequential=sequential, progress=False)
    dense = collect_stats(tiny_model("llama").model, calib, progress=False)["model.layers.1.self_attn.q_proj"]
    assert torch.allclose(grams[False], dense.gram, atol=1e-4)
    assert not torch.allclose(grams[True], dense.gram, atol=1e-4)
