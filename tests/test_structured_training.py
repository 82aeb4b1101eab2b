"""Structured pruning that trains: LoRAPrune (LoRA-gradient importance, iterative) and Sheared LLaMA
(hard-concrete masks under Lagrangian constraints, then continued pretraining)."""

import copy
import math

import pytest
import torch

from mpt_utils.calibration import decoder_layers
from mpt_utils.prune.structured import loraprune as lp
from mpt_utils.prune.structured import sheared_llama as sl
from mpt_utils.prune.structured import structured_prune
from mpt_utils.prune.structured.surgery import llama_parts, n_kv_groups
from mpt_utils.testing import tiny_model, tiny_tokenizer

LP_BUDGET = dict(steps=12, batch_size=4, micro_batch_size=4, lr=1e-3, prune_freq=2, progress=False)
SL_BUDGET = dict(prune_steps=12, prune_batch_size=4, prune_micro_batch_size=4, lagrangian_warmup_steps=3,
                 prune_warmup_steps=1, continue_steps=2, continue_batch_size=4, continue_micro_batch_size=4,
                 continue_warmup_steps=1, progress=False)


@torch.no_grad()
def _teacher():
    """A tiny model with a few dominant heads and channels, and text sampled from it: pruning what
    matters raises its loss on its own samples, pruning what does not barely does."""
    loaded = tiny_model("llama", seed=0, layers=4, heads=4, kv_heads=4)
    model = loaded.model
    gen = torch.Generator().manual_seed(3)
    for block in decoder_layers(model):
        attn, mlp = llama_parts(block)
        mlp.down_proj.weight.mul_(torch.where(torch.rand(mlp.down_proj.in_features, generator=gen) < 0.2, 8.0, 0.3))
        hd = attn.head_dim
        head_scale = torch.tensor([6.0, 0.3, 0.3, 0.3])[torch.randperm(4, generator=gen)]
        attn.o_proj.weight.mul_(head_scale.repeat_interleave(hd)[None, :])
    model.lm_head.weight.mul_(4.0)
    torch.manual_seed(0)
    start = torch.randint(0, 256, (24, 1), generator=gen)
    text = model.generate(start, max_new_tokens=31, do_sample=True, top_k=0, pad_token_id=257,
                          min_new_tokens=31)
    return model, text[:16], text[16:]


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_cubic_schedule_matches_the_reference_formula():
    assert lp.cubic_sparsity(5, 100, 0.5) == 0.0  # flat during the first 10 %
    assert lp.cubic_sparsity(95, 100, 0.5) == 0.5  # flat during the last 10 %
    assert lp.cubic_sparsity(50, 100, 0.5) == pytest.approx(0.5 + (0 - 0.5) * (1 - 40 / 80) ** 3)
    values = [lp.cubic_sparsity(s, 100, 0.5) for s in range(100)]
    assert values == sorted(values)


def test_loraprune_reaches_the_ratio_keeps_frozen_blocks_and_runs(teacher):
    dense, calib, _ = teacher
    model = copy.deepcopy(dense)
    res = structured_prune(model, "loraprune", 0.3, calib, **LP_BUDGET)
    assert res.block_reduction == pytest.approx(0.3, abs=0.01)
    start, end = res.detail["layer_range"]
    assert (start, end) == lp.prunable_range(4) == (0, 3)
    last = decoder_layers(model)[-1]  # never pruned, as in the reference
    assert llama_parts(last)[1].gate_proj.out_features == 128 and n_kv_groups(llama_parts(last)[0]) == 4
    assert res.detail["prune_events"] >= 2  # iterative, not one shot
    assert torch.isfinite(model(input_ids=calib[:2]).logits).all()


def test_loraprune_lora_gradient_importance_is_the_reference_estimate():
    base = torch.nn.Linear(6, 4)
    lora = lp.LoRALinear(base, rank=2, alpha=4, dropout=0.0)
    torch.nn.init.normal_(lora.lora_b)
    x = torch.randn(3, 6)
    lora(x).pow(2).sum().backward()
    a, b, ga, gb = lora.lora_a.detach(), lora.lora_b.detach(), lora.lora_a.grad, lora.lora_b.grad
    expected = ((gb @ a + b @ ga - gb @ ga) * (base.weight.detach() + 2.0 * b @ a)).abs()
    torch.testing.assert_close(lp._lora_grad_importance(lora, "lora"), expected)


def test_loraprune_importance_beats_random_at_the_same_ratio(teacher, monkeypatch):
    dense, calib, held = teacher
    learned = copy.deepcopy(dense)
    structured_prune(learned, "loraprune", 0.4, calib, **LP_BUDGET)
    gen = torch.Generator().manual_seed(0)

    def random_importance(attn, mlp, n_groups, metric):
        return torch.rand(n_groups, generator=gen), torch.rand(mlp.gate_proj.base.out_features, generator=gen)

    monkeypatch.setattr(lp, "_block_importance", random_importance)
    rand = copy.deepcopy(dense)
    structured_prune(rand, "loraprune", 0.4, calib, **LP_BUDGET)
    assert _loss(learned, held) < _loss(rand, held)


def test_hard_concrete_has_the_published_constants_and_distribution():
    assert (sl.TEMPERATURE, sl.LIMIT_A, sl.LIMIT_B, sl.INIT_LOG_ALPHA) == (2 / 3, -0.1, 1.1, 5.0)
    mask = sl.HardConcrete((2000,), 1000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask.log_alpha.copy_(torch.linspace(-3, 3, 2000))
    torch.manual_seed(0)
    z = torch.stack([mask.sample() for _ in range(200)])
    assert z.min() == 0 and z.max() == 1  # hard: exact zeros and ones
    assert ((z > 0) & (z < 1)).any()
    # P(z > 0) from the closed form matches the samples
    torch.testing.assert_close((z > 0).float().mean(0).mean(), mask.expected_score().mean(), atol=0.02, rtol=0)
    keep, soft = mask.deterministic()
    assert keep.numel() == 1000 and set(keep.tolist()) == set(range(1000, 2000))
    torch.testing.assert_close(soft, torch.sigmoid(mask.log_alpha[keep] / sl.TEMPERATURE * 0.8))


@pytest.mark.parametrize("tied", [False, True])
def test_sheared_cut_is_the_masked_model_with_deterministic_masks(teacher, tied):
    dense, calib, _ = teacher
    model = copy.deepcopy(dense)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    shape = sl.target_shape(model, 0.4, target_layers=3)
    gen = torch.Generator().manual_seed(1)
    masks = {"hidden": sl.HardConcrete((64,), shape.hidden, gen), "head": sl.HardConcrete((4, 4), shape.groups, gen),
             "intermediate": sl.HardConcrete((4, 128), shape.intermediate, gen),
             "layer": sl.HardConcrete((4,), shape.layers, gen)}
    with torch.no_grad():
        for m in masks.values():
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=gen) * 2)
    state = {}
    for k, m in masks.items():  # the deterministic z, scattered back to full size
        keep, soft = m.deterministic()
        state[k] = torch.zeros_like(m.log_alpha).scatter(-1, keep, soft)
    hooks = sl._Masked(model, state)
    with torch.no_grad():
        expected = model(input_ids=calib[:2]).logits
    hooks.remove()
    sl._cut(model, masks)
    assert model.config.hidden_size == shape.hidden and len(decoder_layers(model)) == shape.layers
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib[:2]).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio,layers", [(0.3, None), (0.5, 3)])
def test_sheared_reaches_exactly_the_target_shape_and_runs(teacher, ratio, layers):
    dense, calib, _ = teacher
    model = copy.deepcopy(dense)
    res = structured_prune(model, "sheared_llama", ratio, calib, target_layers=layers, **SL_BUDGET)
    shape = res.detail["target_shape"]
    assert len(decoder_layers(model)) == shape["layers"] == (layers or 4)
    assert model.model.embed_tokens.weight.shape[1] == model.config.hidden_size == shape["hidden"]
    for block in decoder_layers(model):
        attn, mlp = llama_parts(block)
        assert n_kv_groups(attn) == shape["groups"] and mlp.gate_proj.out_features == shape["intermediate"]
        assert attn.q_proj.in_features == mlp.down_proj.out_features == shape["hidden"]
    # the intermediate size is solved for the budget: within one channel per layer of the ratio
    per_channel = 3 * shape["hidden"] / res.block_params_before * shape["layers"]
    assert abs(res.block_reduction - ratio) <= per_channel + 1e-9
    assert torch.isfinite(model(input_ids=calib[:2]).logits).all()


def test_sheared_learned_masks_beat_random_masks_of_the_same_shape(teacher):
    dense, calib, held = teacher
    # masks only (the weights stay the dense ones), at the reduced budget's mask lr
    budget = {**SL_BUDGET, "prune_steps": 30, "lagrangian_warmup_steps": 6, "continue_steps": 0, "lr": 1e-12,
              "lag_lr": sl.EMBEDDED_BUDGET["lag_lr"]}
    learned = copy.deepcopy(dense)
    structured_prune(learned, "sheared_llama", 0.4, calib, **budget)
    rand = copy.deepcopy(dense)
    shape = sl.target_shape(rand, 0.4)
    gen = torch.Generator().manual_seed(5)
    masks = {"hidden": sl.HardConcrete((64,), shape.hidden, gen), "head": sl.HardConcrete((4, 4), shape.groups, gen),
             "intermediate": sl.HardConcrete((4, 128), shape.intermediate, gen),
             "layer": sl.HardConcrete((4,), shape.layers, gen)}
    with torch.no_grad():
        for m in masks.values():
            # a random ranking, every kept gate near 1 like the trained ones
            m.log_alpha.copy_(sl.INIT_LOG_ALPHA + 1e-2 * torch.rand(m.log_alpha.shape, generator=gen))
    sl._cut(rand, masks)
    assert _loss(learned, held) < _loss(rand, held)
    assert not math.isclose(_loss(learned, held), _loss(dense, held))


def test_defaults_are_the_reference_budgets_and_reduced_runs_say_so(teacher):
    import inspect

    lp_defaults = inspect.signature(lp.loraprune).parameters
    assert (lp_defaults["batch_size"].default, lp_defaults["micro_batch_size"].default, lp_defaults["lr"].default,
            lp_defaults["prune_freq"].default, lp_defaults["rank"].default) == (128, 2, 1e-4, 10, 8)
    sl_defaults = inspect.signature(sl.sheared_llama).parameters
    assert (sl_defaults["prune_steps"].default, sl_defaults["continue_steps"].default,
            sl_defaults["lagrangian_warmup_steps"].default, sl_defaults["lag_lr"].default) == (3200, 48_000, 640, 1.0)
    dense, calib, _ = teacher
    res = structured_prune(copy.deepcopy(dense), "sheared_llama", 0.3, calib, **SL_BUDGET)
    assert res.detail["reduced_budget"] and res.detail["dynamic_batch_loading"] is False
    res = structured_prune(copy.deepcopy(dense), "loraprune", 0.3, calib, **LP_BUDGET)
    assert res.detail["reduced_budget"] and res.detail["steps"] == LP_BUDGET["steps"]


def test_sheared_model_saves_and_reloads_as_a_plain_model(teacher, tmp_path):
    from mpt_utils.models import load_model
    from mpt_utils.prune.structured.surgery import save_pruned

    dense, calib, _ = teacher
    model = copy.deepcopy(dense)
    structured_prune(model, "sheared_llama", 0.4, calib, **SL_BUDGET)
    model.eval()
    save_pruned(model, tmp_path / "sheared", tiny_tokenizer())
    back = load_model(str(tmp_path / "sheared"), device="cpu")
    assert back.model.config.hidden_size == model.config.hidden_size < 64
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits)


def test_bad_input_raises_clear_errors(teacher):
    from mpt_utils.errors import MPTError

    dense, calib, _ = teacher
    with pytest.raises(MPTError, match="unknown LoRAPrune metric"):
        structured_prune(copy.deepcopy(dense), "loraprune", 0.3, calib, metric="taylor")
    with pytest.raises(MPTError, match="invalid Sheared LLaMA budget"):
        structured_prune(copy.deepcopy(dense), "sheared_llama", 0.3, calib, prune_steps=0)
    with pytest.raises(MPTError, match="target_layers"):
        structured_prune(copy.deepcopy(dense), "sheared_llama", 0.3, calib, target_layers=9)
    with pytest.raises(MPTError, match="pre-norm Llama block"):
        structured_prune(tiny_model("gemma3_text").model, "sheared_llama", 0.3, calib, **SL_BUDGET)
