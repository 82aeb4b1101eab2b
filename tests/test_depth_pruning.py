"""Depth pruning by similarity (SRAD) and by one-shot block ranking (Shortened LLaMA, PPL and Taylor+)."""

import copy
import math

import pytest
import torch

from mpt_utils.calibration import decoder_layers
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import nll_from_logits
from mpt_utils.prune.structured import structured_prune
from mpt_utils.prune.structured.shortened_llama import ppl_scores, taylor_scores
from mpt_utils.prune.structured.srad import angular_distances, boundary_states
from mpt_utils.prune.structured.surgery import drop_blocks
from mpt_utils.testing import tiny_model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 258, (6, 24), generator=torch.Generator().manual_seed(3))


def _model(layers=8, seed=0):
    return tiny_model("llama", seed=seed, layers=layers).model


def _plant_identity(model, blocks, scale=1e-3):
    """Make `blocks` nearly the identity: their residual branches write almost nothing."""
    for i in blocks:
        block = decoder_layers(model)[i]
        block.self_attn.o_proj.weight.data.mul_(scale)
        block.mlp.down_proj.weight.data.mul_(scale)


def test_srad_distances_are_the_last_token_angles(calib):
    model = _model(6)
    states = boundary_states(model, calib, progress=False)
    assert states.shape == (7, 6, 64)
    hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in calib]
    for n in (1, 2, 4):
        d = angular_distances(states, n)
        for ell in range(0, 6 - n):  # HF exposes block inputs un-normed for every boundary but the last
            cos = torch.stack([torch.nn.functional.cosine_similarity(h[ell][0, -1], h[ell + n][0, -1], dim=0)
                               for h in hs])
            assert d[ell].item() == pytest.approx((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item(), abs=1e-5)


@pytest.mark.parametrize("planted", [[2, 3, 4], [5, 6, 7], [3, 4], [6]])
def test_srad_removes_exactly_a_planted_identity_stretch(planted, calib):
    model = _model(8)
    _plant_identity(model, planted)
    res = structured_prune(model, "srad", len(planted) / 8, calib, progress=False)
    assert res.detail["removed_blocks"] == planted and res.detail["start"] == planted[0]
    assert len(decoder_layers(model)) == 8 - len(planted)
    # without the plant the same model loses its first blocks (random weights): the plant decided
    other = structured_prune(_model(8), "srad", len(planted) / 8, calib, progress=False)
    assert other.detail["removed_blocks"] == list(range(len(planted)))


def test_srad_shares_one_pass_across_a_sweep(calib):
    dense, cache = _model(8), {}
    _plant_identity(dense, [4, 5, 6])
    got = [structured_prune(copy.deepcopy(dense), "srad", r, calib, cache=cache, progress=False).detail
           for r in (0.125, 0.25, 0.375)]
    assert [d["removed_blocks"][0] in (4, 5, 6) for d in got] == [True] * 3 and got[2]["removed_blocks"] == [4, 5, 6]
    assert sum(k.startswith("srad:states") for k in cache) == 1
    assert structured_prune(_model(8), "srad", 0.0, calib, progress=False).detail["removed_blocks"] == []


def _ppl_without(model, block, samples):
    pruned = copy.deepcopy(model)
    drop_blocks(pruned, [block])
    with torch.no_grad():
        nll = sum(float(nll_from_logits(pruned(input_ids=w[None]).logits, w[None]).sum()) for w in samples)
    return math.exp(nll / (samples.shape[0] * (samples.shape[1] - 1)))


def test_shortened_llama_ppl_criterion_is_the_brute_force_ranking(calib):
    model = _model(6, seed=1)
    _plant_identity(model, [3], scale=0.05)  # a clear winner, and the rest ranked by brute force too
    brute = torch.tensor([_ppl_without(model, j, calib) for j in range(6)], dtype=torch.float64)
    scores = ppl_scores(model, calib, progress=False)
    assert torch.allclose(scores, brute, rtol=1e-5)
    for ratio, k in ((1 / 6, 1), (0.5, 3)):
        pruned = copy.deepcopy(model)
        res = structured_prune(pruned, "shortened_llama", ratio, calib, progress=False)
        assert res.detail["removed_blocks"] == sorted(torch.argsort(brute)[:k].tolist())
        assert len(decoder_layers(pruned)) == 6 - k and res.n_layers_after == 6 - k


def test_shortened_llama_uses_the_reference_calibration_slice():
    ids = torch.randint(0, 258, (16, 160), generator=torch.Generator().manual_seed(4))
    res = structured_prune(_model(4), "shortened_llama", 0.25, ids, progress=False)
    assert (res.detail["n_samples"], res.detail["sample_len"]) == (10, 128)


def test_taylor_score_is_weight_times_gradient_summed_per_block(calib):
    model = _model(4)
    scores = taylor_scores(model, calib, batch_size=4, progress=False)  # two batches: 4 + 2 samples
    ref = copy.deepcopy(model)
    sal = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for batch in calib.split(4):
        ref.zero_grad()
        ref(input_ids=batch, labels=batch).loss.backward()
        for n, p in ref.named_parameters():
            sal[n] += p.detach() * p.grad
    want = [sum(float(s.abs().sum()) for n, s in sal.items() if n.startswith(f"model.layers.{i}.") and "weight" in n)
            for i in range(4)]
    assert torch.allclose(scores, torch.tensor(want, dtype=torch.float64), rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_taylor_plus_keeps_the_first_four_and_last_two_blocks(calib):
    model = _model(8)
    res = structured_prune(copy.deepcopy(model), "shortened_llama", 0.25, calib, criterion="taylor", progress=False)
    assert res.detail["keep"] == [4, 2] and set(res.detail["removed_blocks"]) <= {4, 5}
    assert len(res.detail["removed_blocks"]) == 2
    free = structured_prune(copy.deepcopy(model), "shortened_llama", 0.25, calib, criterion="taylor",
                            keep_first=0, keep_last=0, progress=False)
    scores = torch.tensor(free.detail["scores"])
    assert free.detail["removed_blocks"] == sorted(torch.argsort(scores)[:2].tolist())
    with pytest.warns(UserWarning, match="protected"):
        few = structured_prune(copy.deepcopy(model), "shortened_llama", 0.5, calib, criterion="taylor", progress=False)
    assert few.detail["removed_blocks"] == [4, 5]


def test_depth_user_errors(calib):
    model = _model(4)
    with pytest.raises(MPTError, match="criterion 'magnitude'"):
        structured_prune(model, "shortened_llama", 0.25, calib, criterion="magnitude")
    with pytest.raises(MPTError, match="keep_first=-1"):
        structured_prune(model, "shortened_llama", 0.25, calib, keep_first=-1)
    with pytest.raises(MPTError, match="calibration"):
        structured_prune(model, "srad", 0.25, None)
    with pytest.raises(MPTError, match="did you mean 'criterion'"):
        structured_prune(model, "shortened_llama", 0.25, calib, criterium="ppl")
