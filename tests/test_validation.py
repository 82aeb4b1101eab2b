"""Bad input fails before any work with one MPTError naming the fix, never a traceback or a wrong number."""

import pytest
import torch

from mpt_utils.calibration import layerwise
from mpt_utils.data import calibration_windows, load_text
from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import perplexity, perplexity_rows
from mpt_utils.eval.speed import measure_speed
from mpt_utils.models import available_devices, check_seqlen, load_model, model_context, pick_device
from mpt_utils.prune.engine import prune_model
from mpt_utils.testing import tiny_model, tiny_tokenizer

CONTEXT = 512  # tiny_config's max_position_embeddings


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, 258, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_perplexity_beyond_context_is_refused(arch):
    model = tiny_model(arch).model
    with pytest.raises(MPTError, match=f"seqlen=1024 exceeds the model's context of {CONTEXT} tokens") as err:
        perplexity(model, _ids(2048), seqlen=1024, progress=False)
    assert err.value.fix == f"pass seqlen <= {CONTEXT}"


def test_opt_at_its_context_still_evaluates():
    res = perplexity(tiny_model("opt").model, _ids(CONTEXT), seqlen=CONTEXT, progress=False)
    assert res.n_windows == 1


@pytest.mark.parametrize("bad", [0, -5, 2048.0, "2048", None, True])
def test_seqlen_must_be_a_positive_integer(bad):
    with pytest.raises(MPTError, match="seqlen"):
        check_seqlen(None, bad)


def test_context_comes_from_the_config():
    model = tiny_model("llama").model
    assert model_context(model) == CONTEXT
    model.config.max_position_embeddings = 64
    model.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert model_context(model) == 256


def test_calibration_beyond_context_is_refused():
    model = tiny_model("opt").model
    with pytest.raises(MPTError, match=f"exceeds the model's context of {CONTEXT}"):
        layerwise(model, torch.zeros(1, 1024, dtype=torch.long), lambda *a: None, progress=False)
    with pytest.raises(MPTError, match=f"exceeds the model's context of {CONTEXT}"):
        calibration_windows(tiny_tokenizer(), "embedded-news", n=2, seqlen=1024, model=model)


def test_speed_beyond_context_is_refused():
    model = tiny_model("llama").model
    with pytest.raises(MPTError, match=f"seqlen=1024 exceeds the model's context of {CONTEXT}"):
        measure_speed({"dense": model}, seqlen=1024, rounds=1, warmup=0)
    with pytest.raises(MPTError, match=r"prompt_len \+ new_tokens=1016 exceeds"):
        measure_speed({"dense": model}, mode="decode", prompt_len=16, new_tokens=1000, rounds=1, warmup=0)


def test_latin1_corpus_names_file_offset_and_iconv(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n\nna\u00efve".encode("latin-1"))
    with pytest.raises(MPTError, match=r"latin\.txt is not UTF-8: byte 0xe9 at offset 3") as err:
        load_text(str(path))
    assert "iconv -f latin1 -t utf-8" in err.value.fix


def test_binary_corpus_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"text\x00\x01\x02")
    with pytest.raises(MPTError, match=r"weights\.bin looks binary, not text \(NUL byte at offset 4\)"):
        load_text(str(path))


def test_empty_and_short_corpora_say_what_is_needed(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(MPTError, match="empty.txt is empty"):
        load_text(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")  # 16 byte tokens
    with pytest.raises(MPTError, match="has 16 tokens; a window of seqlen=64 needs at least 65") as err:
        calibration_windows(tiny_tokenizer(), str(short), n=2, seqlen=64)
    assert "seqlen <= 15" in err.value.fix
    with pytest.raises(MPTError, match="has 16 tokens, fewer than one window of seqlen=64"):
        perplexity_rows(tiny_model("llama").model, tiny_tokenizer(), [str(short)], seqlen=64, progress=False)


def test_unknown_corpus_suggests_the_closest_name():
    with pytest.raises(MPTError, match="unknown corpus 'embeded-wiki'") as err:
        load_text("embeded-wiki")
    assert "did you mean 'embedded-wiki'?" in err.value.fix


def test_every_dataset_is_checked_before_the_first_evaluation():
    with pytest.raises(MPTError, match="unknown corpus 'wikitext'") as err:
        perplexity_rows(tiny_model("llama").model, tiny_tokenizer(), ["embedded-news", "wikitext"], seqlen=32)
    assert "did you mean 'wikitext2'?" in err.value.fix


def test_nan_weights_name_the_parameter():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    calib = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(MPTError, match=r"model weights contain NaN/inf in model\.layers\.1\.mlp\.up_proj\.weight"):
        prune_model(lm.model, "sparsegpt", 0.5, calib_ids=calib)


def test_fp16_overflow_suggests_a_wider_dtype():
    model = tiny_model("llama").model.half()
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(MPTError, match=r"NaN/inf in model\.norm\.weight \(1 of 64 values\)") as err:
        layerwise(model, torch.zeros(1, 8, dtype=torch.long), lambda *a: None, progress=False)
    assert "bfloat16" in err.value.fix


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "mps", "tpu", "cpu0"])
def test_unavailable_device_lists_the_available_ones(device):
    if device == "mps" and "mps" in available_devices():
        pytest.skip("this machine has MPS")
    with pytest.raises(MPTError, match=rf"device {device!r} .*; available here: cpu") as err:
        pick_device(device)
    assert "'cpu'" in err.value.fix


def test_gpu_alias_points_at_cuda_where_present():
    if "cuda" not in available_devices():
        pytest.skip("no CUDA here")
    with pytest.raises(MPTError) as err:
        pick_device("gpu")
    assert "did you mean device='cuda'?" in err.value.fix


def test_bad_device_fails_before_loading():
    with pytest.raises(MPTError, match="device 'cuda:99'"):
        load_model("tiny-llama", device="cuda:99")
    assert pick_device("cpu") == torch.device("cpu") and pick_device("auto").type in ("cpu", "cuda")


def test_unknown_model_suggests_the_closest_embedded_name():
    with pytest.raises(MPTError, match="unknown model 'smollm2'") as err:
        load_model("smollm2")
    assert "did you mean 'smollm2-135m'?" in err.value.fix


def test_non_finite_statistics_are_not_blamed_on_window_count():
    lm = tiny_model("llama")
    from mpt_utils.calibration import collect_stats

    stats = collect_stats(lm.model, torch.zeros(2, 16, dtype=torch.long), progress=False)
    stats["model.layers.1.self_attn.k_proj"].gram[0, 0] = float("inf")
    with pytest.raises(MPTError, match=r"statistics for model\.layers\.1\.self_attn\.k_proj contain NaN/inf"):
        prune_model(lm.model, "sparsegpt", 0.5, stats=stats)


def test_nan_checkpoint_fails_at_load(tmp_path):
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.lm_head.weight[3, 3] = float("inf")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(MPTError, match=r"NaN/inf in lm_head\.weight"):
        load_model(str(tmp_path), device="cpu")
