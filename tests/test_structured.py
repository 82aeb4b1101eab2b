"""Structured pruning: physically smaller models, honest parameter counts, the papers' invariants."""

import copy

import pytest
import torch

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
from mpt_utils.models import load_model
from mpt_utils.prune.structured import STRUCTURED, structured_prune
from mpt_utils.prune.structured.shortgpt import block_influence
from mpt_utils.prune.structured.surgery import drop_blocks, keep_mlp_channels, save_pruned
from mpt_utils.testing import tiny_model

WIDTH = ("flap", "llm_pruner", "random", "loraprune")
DEPTH = ("shortgpt", "sleb", "srad", "shortened_llama")
FFN = ("random_prunenet",)
# methods that train: a few steps here (their reference budgets are thousands of steps)
TRAINING = {"loraprune": {"steps": 4, "batch_size": 2, "micro_batch_size": 2, "prune_freq": 1},
            "sheared_llama": {"prune_steps": 4, "prune_batch_size": 2, "prune_micro_batch_size": 2,
                              "lagrangian_warmup_steps": 1, "prune_warmup_steps": 1, "continue_steps": 2,
                              "continue_batch_size": 2, "continue_micro_batch_size": 2, "continue_warmup_steps": 1}}


def _tiny(arch="llama", tie_word_embeddings=False, **kw):
    kw.setdefault("layers", 4)
    loaded = tiny_model(arch, **kw)
    if tie_word_embeddings:  # like the embedded SmolLM2: one matrix for embedding and LM head
        loaded.model.config.tie_word_embeddings = True
        loaded.model.tie_weights()
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    return loaded


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 258, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(2))


def _expected_params(model) -> int:
    """Parameter count recomputed from the layer shapes alone (not from the tensors' numel)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.in_features * mod.out_features + (mod.out_features if mod.bias is not None else 0)
        elif isinstance(mod, torch.nn.Embedding):
            total += mod.num_embeddings * mod.embedding_dim
        elif hasattr(mod, "weight") and isinstance(mod.weight, torch.nn.Parameter) and mod.weight.ndim == 1:
            total += mod.weight.numel()  # norms
    if model.config.tie_word_embeddings:
        total -= model.get_output_embeddings().weight.numel()
    return total


@pytest.mark.parametrize("method", sorted(STRUCTURED.names()))
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruned_model_is_smaller_runs_and_counts_match(method, ratio, calib, probe):
    loaded = _tiny()
    dense = loaded.model
    before = sum(p.numel() for p in dense.parameters())
    model = copy.deepcopy(dense)
    res = structured_prune(model, method, ratio, calib, progress=False, **TRAINING.get(method, {}))
    after = sum(p.numel() for p in model.parameters())
    assert res.params_before == before and res.params_after == after == _expected_params(model)
    assert res.param_reduction == pytest.approx(1 - after / before)
    assert 0 < res.param_reduction < ratio + 0.05
    out = model(input_ids=probe).logits
    assert out.shape == (2, 24, 258) and torch.isfinite(out).all()
    if method in DEPTH:
        assert len(decoder_layers(model)) == 4 - round(ratio * 4) == model.config.num_hidden_layers
        assert res.block_reduction == pytest.approx(round(ratio * 4) / 4)
    elif method in WIDTH:
        assert res.block_reduction == pytest.approx(ratio, abs=0.03)  # the budget is hit in parameters
    elif method in FFN:  # the ratio counts every block's MLP channels (PruneNet)
        d_ff = dense.config.intermediate_size
        assert {b.mlp.gate_proj.out_features for b in decoder_layers(model)} == {int((1 - ratio) * d_ff)}
        assert model.config.intermediate_size == int((1 - ratio) * d_ff)
    else:
        assert model.get_input_embeddings().weight.shape[1] < 64  # the hidden size itself shrank


@pytest.mark.parametrize("method", WIDTH)
def test_gqa_heads_go_in_whole_groups(method, calib, probe):
    model = _tiny(heads=4, kv_heads=2).model  # 2 query heads per KV head, head_dim 16
    res = structured_prune(model, method, 0.5, calib, progress=False,
                           **({"scope": "all"} if method == "random" else TRAINING.get(method, {})))
    for block, groups in zip(decoder_layers(model), res.detail["kept_groups"]):
        attn = block.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == groups * 16
        assert attn.q_proj.out_features == attn.o_proj.in_features == groups * 2 * 16
        assert attn.num_key_value_groups == 2
    assert torch.isfinite(model(input_ids=probe).logits).all()


@pytest.mark.parametrize("tied", [False, True])
def test_slicegpt_without_slicing_is_rotation_invariant(tied, calib, probe):
    dense = _tiny(tie_word_embeddings=tied).model
    ref = dense(input_ids=probe).logits
    model = copy.deepcopy(dense)
    res = structured_prune(model, "slicegpt", 0.0, calib, progress=False)
    assert res.detail["sliced_hidden"] == 64
    assert (model(input_ids=probe).logits - ref).abs().max() < 1e-4


def test_slicegpt_keeps_the_full_lm_head_with_tied_embeddings(calib, probe):
    dense = _tiny(tie_word_embeddings=True).model
    ref = dense(input_ids=probe).logits
    same = copy.deepcopy(dense)
    structured_prune(same, "slicegpt", 0.0, calib, progress=False)
    assert same.get_output_embeddings().in_features == 64
    assert (same(input_ids=probe).logits - ref).abs().max() < 1e-4  # untied, rotated: the dense function
    model = copy.deepcopy(dense)
    res = structured_prune(model, "slicegpt", 0.25, calib, progress=False)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert res.detail["slice_head"] is False and res.detail["untied_head"] is True
    assert emb.weight.shape == (258, 48) and head.weight.shape == (258, 64)  # the head is not sliced
    assert decoder_layers(model)[-1].mlp.down_proj.out_features == 64  # the last block writes the full width
    assert torch.isfinite(model(input_ids=probe).logits).all()
    small = copy.deepcopy(dense)
    structured_prune(small, "slicegpt", 0.25, calib, progress=False, slice_head=True)
    assert small.get_output_embeddings().in_features == 48


def test_slicegpt_slices_hidden_size_and_pays_for_shortcuts(calib):
    model = _tiny().model
    res = structured_prune(model, "slicegpt", 0.25, calib, progress=False)
    assert res.detail["sliced_hidden"] == 48
    layer = decoder_layers(model)[0]
    assert layer.self_attn.q_proj.in_features == 48 and layer.attn_shortcut.weight.shape == (48, 48)
    # the shortcut matrices are counted: the block reduction is below the slicing ratio
    assert 0 < res.block_reduction < 0.25


def test_shortgpt_removes_the_lowest_block_influence(calib):
    model = _tiny(layers=6).model
    bi = block_influence(model, calib, progress=False)
    # independent check of BI on the blocks whose output HF exposes un-normed
    hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in calib]
    for i in range(5):
        cos = torch.cat([torch.nn.functional.cosine_similarity(h[i][0], h[i + 1][0], dim=-1) for h in hs])
        assert bi[i].item() == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    res = structured_prune(model, "shortgpt", 0.5, calib, progress=False)
    assert res.detail["removed_blocks"] == sorted(torch.argsort(bi)[:3].tolist())


def test_sleb_first_removal_is_the_best_single_block(calib):
    dense = _tiny(layers=5).model
    res = structured_prune(copy.deepcopy(dense), "sleb", 0.2, calib, progress=False)

    @torch.no_grad()
    def nll_without(j):
        m = copy.deepcopy(dense)
        drop_blocks(m, [j])
        return float(nll_from_logits(m(input_ids=calib).logits, calib).sum())

    brute = min(range(1, 4), key=nll_without)  # the first and last blocks are never candidates
    assert res.detail["removal_order"] == [brute]


def _model_with_free_ends(calib):
    """5 blocks; the first and last are the identity (free to remove), the middle three are trained on
    `calib` so that removing any of them costs perplexity."""
    model = _tiny(layers=5).model
    ends = [decoder_layers(model)[i] for i in (0, 4)]
    with torch.no_grad():
        for block in ends:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    frozen = {id(p) for block in ends for p in block.parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in frozen], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        model(input_ids=calib, labels=calib).loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_sleb_never_removes_the_first_or_last_block(calib):
    dense = _model_with_free_ends(calib)
    res = structured_prune(copy.deepcopy(dense), "sleb", 0.4, calib, progress=False)
    assert set(res.detail["removal_order"]) <= {1, 2, 3} and len(res.detail["removal_order"]) == 2
    free = structured_prune(copy.deepcopy(dense), "sleb", 0.4, calib, progress=False, early_barrier=0,
                            latter_barrier=0)
    assert free.detail["removal_order"] == [0, 4]  # without the barriers the free ends go first
    with pytest.warns(UserWarning, match="protected; removing 3"):  # 4 of 5 cannot go with both ends kept
        most = structured_prune(copy.deepcopy(dense), "sleb", 0.8, calib, progress=False)
    assert most.detail["removed_blocks"] == [1, 2, 3] and most.n_layers_after == 2


def test_sleb_order_is_a_prefix_across_ratios(calib):
    dense = _tiny(layers=5).model
    cache = {}
    two = structured_prune(copy.deepcopy(dense), "sleb", 0.4, calib, cache=cache, progress=False)
    one = structured_prune(copy.deepcopy(dense), "sleb", 0.2, calib, cache=cache, progress=False)
    assert one.detail["removal_order"] == two.detail["removal_order"][:1]


def test_flap_bias_replaces_removed_channels_by_their_mean():
    torch.manual_seed(0)
    block = decoder_layers(_tiny().model)[0]
    mlp = block.mlp
    x = torch.randn(200, 128)  # intermediate activations entering down_proj
    mean = x.mean(0)
    keep = torch.arange(0, 128, 2)
    drop = torch.ones(128, dtype=torch.bool)
    drop[keep] = False
    want = mlp.down_proj(torch.where(drop, mean, x))
    comp = mlp.down_proj.weight[:, drop] @ mean[drop]
    keep_mlp_channels(block, keep, comp)
    assert torch.allclose(mlp.down_proj(x[:, keep]), want, atol=1e-5)


def test_llm_pruner_importance_is_first_order_taylor(calib):
    from mpt_utils.prune.structured.llm_pruner import taylor_importance

    model = _tiny().model
    imp = taylor_importance(model, calib[:2], "param_first", progress=False)
    model.zero_grad()
    for w in calib[:2]:
        (model(input_ids=w[None], labels=w[None]).loss / 2).backward()
    mlp = decoder_layers(model)[1].mlp
    c = 5
    manual = sum(float((lin.weight * lin.weight.grad).abs()[c].sum()) for lin in (mlp.gate_proj, mlp.up_proj))
    manual += float((mlp.down_proj.weight * mlp.down_proj.weight.grad).abs()[:, c].sum())
    assert imp[1][1][c].item() == pytest.approx(manual, rel=1e-4)


def test_llm_pruner_keeps_first_and_last_blocks(calib):
    model = _tiny(layers=16).model
    res = structured_prune(model, "llm_pruner", 0.3, calib, progress=False)
    assert res.detail["layer_range"] == [2, 15]  # LLM-Pruner's 4..30 of 32, scaled to 16 blocks
    kept = res.detail["kept_channels"]
    assert kept[0] == kept[1] == kept[15] == 128 and max(kept[2:15]) < 128
    assert res.block_reduction == pytest.approx(0.3, abs=0.03)


def test_random_is_calibration_free_and_seeded():
    dense = _tiny().model
    runs = []
    for seed in (0, 0, 1):
        m = copy.deepcopy(dense)
        structured_prune(m, "random", 0.3, None, seed=seed)
        runs.append(decoder_layers(m)[0].mlp.gate_proj.weight)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(MPTError, match="only MLP channels"):
        structured_prune(copy.deepcopy(dense), "random", 0.8, None)


def test_user_errors_are_clear(calib):
    model = _tiny().model
    with pytest.raises(MPTError, match="unknown structured pruning method"):
        structured_prune(model, "magic", 0.2, calib)
    with pytest.raises(MPTError, match="outside"):
        structured_prune(model, "flap", 1.0, calib)
    with pytest.raises(MPTError, match="needs calibration"):
        structured_prune(model, "flap", 0.2, None)
    with pytest.raises(MPTError, match="unknown option"):
        structured_prune(model, "shortgpt", 0.2, calib, colour="red")
    with pytest.raises(MPTError, match="not a Llama-style block"):
        structured_prune(tiny_model("opt").model, "flap", 0.2, calib)


@pytest.mark.parametrize("method", ["flap", "slicegpt", "sleb"])
def test_saved_model_reloads_through_load_model(method, calib, probe, tmp_path):
    loaded = _tiny(tie_word_embeddings=True) if method == "slicegpt" else _tiny()
    model = loaded.model
    structured_prune(model, method, 0.5, calib, progress=False)
    save_pruned(model, tmp_path / method, loaded.tokenizer)
    back = load_model(str(tmp_path / method), device="cpu")
    assert back.info.n_params == sum(p.numel() for p in model.parameters())
    assert torch.equal(back.model(input_ids=probe).logits, model(input_ids=probe).logits)
    assert back.tokenizer is not None


def test_lora_recovery_changes_weights_not_shapes(calib):
    from mpt_utils.prune.structured.recovery import lora_recover

    model = _tiny().model
    structured_prune(model, "random", 0.3, None)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = lora_recover(model, calib[:1], steps=5, lr=1e-2, progress=False)  # one window: loss must fall
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # merged: no adapters left
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "model.layers.0.mlp.up_proj.weight" in changed
    assert all(n.endswith("_proj.weight") for n in changed)  # embeddings, norms, head untouched
    assert info["steps"] == 5 and info["loss_last"] < info["loss_first"]
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are back


def test_lora_recovery_defaults_to_the_reference_budget(calib):
    from mpt_utils.prune.structured.recovery import REFERENCE_BUDGET, REFERENCE_STEPS, lora_recover

    # LLM-Pruner's post-training: 2 epochs of ~49,760 Alpaca samples, batch 64, lr 1e-4, r=8
    assert REFERENCE_STEPS == 1556 and REFERENCE_BUDGET["lr"] == 1e-4 and REFERENCE_BUDGET["rank"] == 8
    model = _tiny().model
    info = lora_recover(model, calib, progress=False)  # 4 windows: one batch per epoch
    assert (info["steps"], info["epochs_seen"], info["batch_size"]) == (2, 2.0, 4)
    assert (info["lr"], info["rank"], info["alpha"], info["warmup_steps"]) == (1e-4, 8, 16, 0)
    info = lora_recover(model, calib, batch_size=2, micro_batch_size=1, progress=False)
    assert info["steps"] == 4 and info["epochs_seen"] == 2.0
    flat = lora_recover(model, calib, steps=3, lr_schedule="constant", warmup_steps=0, progress=False)
    assert flat["lr_schedule"] == "constant" and flat["steps"] == 3
    with pytest.raises(MPTError, match="at least one step"):
        lora_recover(model, calib, steps=0)


@pytest.mark.integration
def test_embedded_structured_pruning_end_to_end(embedded, tmp_path):
    """FLAP and SliceGPT on the real 135M model (tied embeddings, 3 KV groups of 3 heads)."""
    from mpt_utils.data import calibration_windows, eval_ids
    from mpt_utils.eval.perplexity import perplexity

    calib = calibration_windows(embedded.tokenizer, "embedded-wiki", 16, 256, seed=0)  # > hidden size tokens for PCA
    ids = eval_ids(embedded.tokenizer, "embedded-wiki")
    dense_ppl = perplexity(embedded.model, ids, seqlen=128, max_windows=4, progress=False).ppl
    for method in ("flap", "slicegpt"):
        model = copy.deepcopy(embedded.model)
        res = structured_prune(model, method, 0.2, calib, progress=False)
        ppl = perplexity(model, ids, seqlen=128, max_windows=4, progress=False).ppl
        assert dense_ppl < ppl < 20 * dense_ppl, (method, dense_ppl, ppl)
        assert res.params_after == sum(p.numel() for p in model.parameters())
        assert 0.0 < res.block_reduction < 0.25
    save_pruned(model, tmp_path / "slicegpt", embedded.tokenizer)
    back = load_model(str(tmp_path / "slicegpt"), device="cpu")
    probe = calib[:1, :32]
    assert torch.allclose(back.model(input_ids=probe).logits, model(input_ids=probe).logits, atol=1e-4)
