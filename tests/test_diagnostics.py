"""Failure-mode diagnostics on tiny random models: exactness of patching and lens, the metrics' fixed
points, and the classifier on synthetic models whose failure mode is known."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from mpt_utils.combined.grid import point_config
from mpt_utils.diagnostics import (
    COMPUTATION_COLLAPSE,
    NO_FAILURE,
    SIGNAL_DEGRADATION,
    activation_patching,
    answer_table,
    broken_block,
    diagnose,
    diagnose_point,
    distributed_noise,
    encode_prompts,
    factual_suite,
    gate_flip_rate,
    high_precision_injection,
    layer_sensitivity,
    linear_cka,
    logit_lens,
    normalized_entropy,
    pararel_metrics,
    restore_sites,
    subspace_similarity,
    trace,
)
from mpt_utils.diagnostics.runner import run_from
from mpt_utils.diagnostics.session import DiagnosticSession, diagnosis_recipes, quant_bits_of, short_label
from mpt_utils.errors import MPTError
from mpt_utils.recipe import Recipe, apply_recipe
from mpt_utils.session import Session
from mpt_utils.store import ResultsStore
from mpt_utils.testing import tiny_model

N_LAYERS = 6  # enough blocks for "spread" and "localized" damage to differ


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", seed=0, layers=N_LAYERS).model


@pytest.fixture(scope="module")
def batch():
    from mpt_utils.testing import tiny_tokenizer

    return encode_prompts(tiny_tokenizer(), factual_suite(n_facts=4))


@pytest.fixture(scope="module")
def rtn2(dense):
    model = copy.deepcopy(dense)
    apply_recipe(model, "rtn:2bit/g32")
    return model


def test_suite_paraphrases_and_batch(batch):
    assert len(batch) == 12 and {p.paraphrase for p in batch.prompts} == {0, 1, 2}
    greece = factual_suite(n_facts=None)
    assert any(p.prompt == "The capital of Greece is" and p.answer == "Athens" for p in greece)
    assert any(p.prompt == "Greece's capital city is" for p in greece)
    # right padding: each prompt's ids end at its length, the rest is padding
    assert int(batch.lengths.max()) == batch.input_ids.shape[1]
    with pytest.raises(MPTError):
        factual_suite(relations=["no-such-relation"])


def test_right_padding_does_not_change_a_prompt(dense, batch):
    alone = trace(dense, batch.subset([0]), attention=False).logits
    together = trace(dense, batch, attention=False).logits[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_patching_every_module_restores_dense_output_exactly(dense, rtn2, batch):
    td = trace(dense, batch)
    sites = [(i, p) for i in range(N_LAYERS) for p in ("attn", "mlp")]
    out = restore_sites(dense, rtn2, batch, sites)
    assert out["kl_to_dense"] < 1e-9 and out["kl_recovery"] == pytest.approx(1.0)
    from mpt_utils.diagnostics.patching import patch_run

    tc = trace(rtn2, batch)
    torch.testing.assert_close(patch_run(rtn2, tc, td, batch, sites), td.logits, atol=0, rtol=0)
    # and the reverse: every compressed module injected into the dense model gives the compressed output
    torch.testing.assert_close(patch_run(dense, td, tc, batch, sites), tc.logits, atol=0, rtol=0)


def test_run_from_a_later_block_matches_the_full_run(rtn2, batch):
    tc = trace(rtn2, batch, attention=False)
    torch.testing.assert_close(run_from(rtn2, batch, 3, tc.block_inputs[3]), tc.logits, atol=1e-5, rtol=1e-5)


def test_logit_lens_last_layer_is_the_models_output(dense, rtn2, batch):
    lens = logit_lens(dense, rtn2, batch)
    full = dense(input_ids=batch.input_ids).logits[torch.arange(len(batch)), batch.last]
    last = lens[(lens.model_kind == "dense") & (lens.layer == N_LAYERS - 1)].iloc[0]
    assert last.kl_to_dense_final < 1e-6
    probs = torch.softmax(full.double(), -1).gather(-1, batch.answer_ids.view(-1, 1)).mean()
    assert last.answer_prob == pytest.approx(float(probs.detach()), rel=1e-5)
    comp_last = lens[(lens.model_kind == "compressed") & (lens.layer == N_LAYERS - 1)].iloc[0]
    assert comp_last.kl_to_dense_final > 0
    assert set(lens.columns) >= {"answer_rank_median", "answer_top1"}


def test_cka_is_one_for_itself_and_rotations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, torch.randn(50, 12, generator=gen, dtype=torch.float64)) < 0.6
    assert subspace_similarity(x, x, k=4) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(MPTError):
        linear_cka(x, x[:10])


def test_gate_flip_rate_of_a_model_against_itself_is_zero(dense, rtn2, batch):
    assert gate_flip_rate(dense, dense, batch)["flip_rate"].eq(0).all()
    assert gate_flip_rate(dense, rtn2, batch)["flip_rate"].gt(0).any()


def test_uniform_attention_row_has_normalised_entropy_one():
    q = 7
    weights = torch.tril(torch.ones(q, q))
    weights = weights / weights.sum(-1, keepdim=True)  # causal uniform rows
    ent = normalized_entropy(weights)
    assert math.isnan(ent[0]) and torch.allclose(ent[1:], torch.ones(q - 1), atol=1e-6)
    one_hot = torch.eye(q)
    assert torch.allclose(normalized_entropy(one_hot)[1:], torch.zeros(q - 1), atol=1e-6)


def test_patching_tables_and_directions(dense, rtn2, batch):
    restore = activation_patching(dense, rtn2, batch, "restore", layers=[0, N_LAYERS - 1])
    assert list(restore.columns) >= ["direction", "layer", "part"] and len(restore) == 4
    assert restore.kl_recovery.le(1 + 1e-6).all()
    inject = activation_patching(dense, rtn2, batch, "inject", layers=[0])
    assert {"damage_share", "kl_damage_share"} <= set(inject.columns)
    with pytest.raises(MPTError):
        activation_patching(dense, rtn2, batch, "sideways")


def test_layer_sensitivity_and_injection(dense, rtn2, batch):
    before = [p.clone() for p in dense.parameters()]
    sens = layer_sensitivity(dense, batch)
    assert len(sens) == N_LAYERS and sens.kl_to_dense.gt(0).all()
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))  # restored
    inj = high_precision_injection(dense, rtn2, batch, {"none": [], "all": range(N_LAYERS), "first": [0, 1]})
    by = inj.set_index("kept")
    assert by.loc["none", "kl_recovery"] == pytest.approx(0.0, abs=1e-9)
    assert by.loc["all", "kl_recovery"] == pytest.approx(1.0, abs=1e-6)


def test_subsets_and_pararel(dense, rtn2, batch):
    table = answer_table(dense, rtn2, batch)
    assert set(table.subset) <= {"failure", "robust", "dense_wrong_comp_right", "both_wrong"}
    fake = table.assign(dense_correct=[True, True, True] * 4, comp_correct=[True, False, False] * 4)
    m = pararel_metrics(fake).set_index("model_kind")
    assert m.loc["dense", "all_correct"] == 1.0
    assert (m.loc["compressed", "any_correct"], m.loc["compressed", "majority_correct"],
            m.loc["compressed", "all_correct"]) == (1.0, 0.0, 0.0)


def test_classifier_on_synthetic_failure_modes(dense, batch):
    same = diagnose(dense, dense, batch, patch=False, inject=False)
    assert same.label == NO_FAILURE
    noisy = diagnose(dense, distributed_noise(dense, rel_std=0.2, seed=1), batch, inject=False)
    assert noisy.label == SIGNAL_DEGRADATION, noisy.evidence["reason"]
    broken = diagnose(dense, broken_block(dense, layer=2, scale=50.0, seed=1), batch, inject=False)
    assert broken.label == COMPUTATION_COLLAPSE, broken.evidence["reason"]
    assert broken.evidence["damage_jump_layer"] == 2 and broken.evidence["localized"]


def test_diagnosis_round_trips_through_the_store(tmp_path, dense, rtn2, batch):
    store = ResultsStore(tmp_path)
    calls = []

    def make():
        calls.append(1)
        return rtn2

    config = {"model": "tiny-llama", "method": "rtn", "family": "quantization", "bits": 2, "metric_set": "test"}
    first = diagnose_point(store, config, dense, make, batch, inject=False, keep_sets={"first": [0]})
    again = diagnose_point(store, config, dense, make, batch, inject=False, keep_sets={"first": [0]})
    assert calls == [1] and again.label == first.label
    pd.testing.assert_frame_equal(first["similarity"], again["similarity"])
    assert again["answers"].dense_correct.dtype == bool and len(again["restore"]) == 2 * N_LAYERS
    fresh = diagnose(dense, rtn2, batch, inject=False, keep_sets={"first": [0]})
    for table in ("pararel", "lens", "injection"):
        cols = list(fresh[table].columns)
        pd.testing.assert_frame_equal(again[table][cols].reset_index(drop=True),
                                      fresh[table][cols].sort_values(list(again[table].columns[:2]))
                                      .reset_index(drop=True), check_dtype=False, check_like=True)


def test_collapse_onset_against_published_ptp():
    from mpt_utils.diagnostics.claims import collapse_onset
    from mpt_utils.published import load_published

    points = pd.DataFrame([
        {"family": "quant", "method": "rtn", "bits": b, "ratio": None, "label": lab}
        for b, lab in ((8, NO_FAILURE), (4, SIGNAL_DEGRADATION), (3, COMPUTATION_COLLAPSE), (2, COMPUTATION_COLLAPSE))
    ] + [{"family": "prune", "method": "wanda", "bits": None, "ratio": r, "label": lab}
         for r, lab in ((0.3, COMPUTATION_COLLAPSE), (0.5, COMPUTATION_COLLAPSE))
    ] + [{"family": "synthetic", "method": None, "bits": None, "ratio": None, "label": COMPUTATION_COLLAPSE}])
    out = collapse_onset(points, load_published("perspective_ptp_claims")).set_index("method")
    assert out.loc["rtn", "published PTP"] == "2-3 bits"
    assert out.loc["rtn", "verdict"].startswith("coincides") and "4 bits and 3 bits" in out.loc["rtn", "collapse onset"]
    assert out.loc["wanda", "verdict"] == "collapse sets in before the published PTP"
    assert list(out.family) == ["quantization", "pruning"]  # a synthetic control has no published PTP


def test_tables_keep_their_values_through_store_rows():
    from mpt_utils.diagnostics import frame_rows, rows_frame

    pararel = pd.DataFrame([{"model_kind": "dense", "relation": "r", "n_facts": 4, "prompt_accuracy": 0.5,
                             "any_correct": 0.75, "majority_correct": 0.5, "all_correct": 0.25}])
    back = rows_frame(frame_rows(pararel, "pararel"), "pararel")
    pd.testing.assert_frame_equal(back[pararel.columns], pararel)
    quality = pd.DataFrame([{"ppl": 12.5, "n_tokens": 512.0}])
    pd.testing.assert_frame_equal(rows_frame(frame_rows(quality, "quality"), "quality")[quality.columns], quality)


def test_diagnosis_recipes_and_their_labels():
    recipes = diagnosis_recipes([2, 8], 128, [["wanda", 0.5]], [["svd_llm", 0.2]])
    assert {k: str(r) for k, r in recipes.items()} == {
        "RTN 2-bit": "rtn:2bit", "RTN 8-bit": "rtn:8bit", "wanda 50%": "wanda@0.5", "svd_llm 20%": "svd_llm@0.2"}
    assert list(diagnosis_recipes([3], 64)) == ["RTN 3-bit g64"] and short_label("wanda@2:4") == "wanda 2:4"
    assert short_label("wanda@0.5 > rtn:4bit") == Recipe.parse("wanda@0.5 > rtn:4bit").label
    assert quant_bits_of("rtn:2bit") == 2 and quant_bits_of("wanda@0.5") is None and quant_bits_of(None) is None
    with pytest.raises(MPTError, match="wandaa"):
        diagnosis_recipes(prune_points=[["wandaa", 0.5]])
    with pytest.raises(MPTError, match="listed twice"):
        diagnosis_recipes([2, 2])


def _diagnostic_session(tmp_path, loader) -> DiagnosticSession:
    store = ResultsStore(tmp_path / "store")
    return DiagnosticSession("tiny-llama", store, n_facts=2, probe_size=2, calib_windows=2, calib_seqlen=32,
                             ppl_windows=1, k=4, device="cpu",
                             session=Session("tiny-llama", store, device="cpu", loader=loader))


def test_a_diagnosis_point_is_the_engines_recipe_and_a_rerun_reads_it(tmp_path):
    loads = []

    def loader():
        loads.append(1)
        return tiny_model("llama", seed=0, layers=N_LAYERS)

    diag = _diagnostic_session(tmp_path, loader)
    seen, run = [], diag._diagnose

    def spy(model, **kw):  # the model the point diagnoses
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return run(model, **kw)

    diag._diagnose = spy
    recipe = "wanda@0.5 > rtn:4bit/g32"
    first = diag.point(recipe, inject=False, patch=False)
    by_hand = copy.deepcopy(diag.dense)
    apply_recipe(by_hand, recipe, diag.session.calib_ids("embedded-wiki", 2, 32, 0))
    assert len(seen) == 1 and seen[0].keys() == by_hand.state_dict().keys()
    assert all(torch.equal(seen[0][k], v) for k, v in by_hand.state_dict().items())
    assert not all(torch.equal(seen[0][k], v) for k, v in diag.dense.state_dict().items())  # the dense one is kept
    assert first["quality"].ppl.iloc[0] > 0 and loads == [1]
    key = {**point_config(diag.protocol, recipe), "kind": "failure_modes",
           **diag.diagnosis_settings(inject=False, patch=False)}
    assert diag.store.load(key) is not None  # stored under the engine's recipe key

    # a fresh session finds the point under the recipe's key: nothing loaded, nothing compressed
    again = _diagnostic_session(tmp_path, lambda: pytest.fail("a stored diagnosis loaded the model"))
    back = again.point(" wanda@0.5  ->  rtn:4bit/g32 ", inject=False, patch=False)
    assert back.label == first.label and repr(sorted(back.evidence.items())) == repr(sorted(first.evidence.items()))
    pd.testing.assert_frame_equal(back["similarity"], first["similarity"])


def test_a_bad_recipe_fails_before_any_model_loads(tmp_path):
    diag = _diagnostic_session(tmp_path, lambda: pytest.fail("a bad recipe loaded the model"))
    for bad in ("wanda@1.5", "rtn:9bit", "rtn:4bit > wanda@0.5", "wanda@0.5 > gguf:Q4_0"):
        with pytest.raises(MPTError):
            diag.point(bad)
    assert not diag.session.is_loaded
