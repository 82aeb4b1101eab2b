"""GGUF for real: export round trip under llama.cpp, llama.cpp quantization, file accounting, errors."""

import gguf
import numpy as np
import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.native import has_llama_cpp, run_isolated
from mpt_utils.quant.gguf import SCHEMES, export_gguf, quantize_gguf, read_gguf
from mpt_utils.testing import tiny_model

pytestmark = [pytest.mark.gguf, pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")]


def _sharp(arch: str):
    """A tiny random model with weights scaled up, so its predictions are far from uniform and a
    wrong tensor layout would show in the perplexity, not hide in noise."""
    loaded = tiny_model(arch, seed=1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim > 1:
                p.mul_(8)
    return loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2"):
        loaded = _sharp(arch)
        path = export_gguf(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp(arch) / "f32.gguf")
        out[arch] = (loaded, path)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_export_round_trip_within_one_percent(exported, arch):
    from mpt_utils.eval.llamacpp import llamacpp_logits, llamacpp_perplexity

    loaded, path = exported[arch]
    ids = torch.randint(0, 258, (64 * 4,), generator=torch.Generator().manual_seed(0))
    ref = perplexity(loaded.model, ids, seqlen=64, progress=False)
    got = llamacpp_perplexity(path, ids, seqlen=64, progress=False, kv_type="f32")
    assert ref.ppl > 300  # far from the uniform 258: the check has teeth
    assert abs(got.ppl / ref.ppl - 1) < 0.01
    assert got.n_windows == ref.n_windows and got.n_tokens == ref.n_tokens
    window = ids[:64]
    torch_logits = loaded.model(window.unsqueeze(0)).logits[0]
    assert torch.allclose(llamacpp_logits(path, window), torch_logits, atol=1e-3)


def test_export_writes_llama_cpp_names_and_tokenizer(exported):
    loaded, path = exported["llama"]
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight"} <= names
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == loaded.model.config.vocab_size
    info = read_gguf(path)
    assert info.type_counts == {"F32": len(names)} and info.bits_per_weight == 32.0
    assert info.n_params == sum(p.numel() for p in loaded.model.parameters())


@pytest.mark.parametrize("scheme, bpw", [("Q8_0", 8.5), ("Q4_0", 4.5)])
def test_llama_cpp_quantization_size_matches_bits_per_weight(exported, tmp_path, scheme, bpw):
    _, src = exported["llama"]
    report = quantize_gguf(src, tmp_path / f"{scheme}.gguf", scheme)
    info = read_gguf(tmp_path / f"{scheme}.gguf")
    assert scheme in info.type_counts
    reader = gguf.GGUFReader(str(tmp_path / f"{scheme}.gguf"))
    expected = 0
    for t in reader.tensors:  # bytes per tensor from ggml's block sizes
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        expected += int(np.prod(t.shape)) // block * type_size
        if t.tensor_type.name == scheme:
            assert 8 * int(t.n_bytes) / int(np.prod(t.shape)) == pytest.approx(bpw)
    assert info.tensor_bytes == expected
    assert info.tensor_bytes < info.file_bytes < info.tensor_bytes + 64 * 1024  # + metadata and alignment
    assert report.fallbacks == [] or scheme == "Q4_0"  # rows of 64 fit blocks of 32: no fallback needed


def test_k_quant_fallback_is_reported(exported, tmp_path):
    _, src = exported["llama"]
    report = quantize_gguf(src, tmp_path / "q4km.gguf", "Q4_K_M")
    info = read_gguf(tmp_path / "q4km.gguf")
    assert report.fallbacks and all("falling back" in line for line in report.fallbacks)
    assert "Q4_K" not in info.type_counts  # rows of 64 are not multiples of 256


def test_scheme_table_matches_llama_cpp_enums():
    enums = run_isolated("mpt_utils.quant.gguf.quantize:llama_ftype_constants", {}, what="llama_cpp")
    for scheme, (ftype, _bits) in SCHEMES.items():
        name = "LLAMA_FTYPE_ALL_F32" if scheme == "F32" else f"LLAMA_FTYPE_MOSTLY_{scheme}"
        assert enums[name] == ftype, scheme


def test_corrupt_or_unsupported_inputs_raise_clear_errors(exported, tmp_path):
    from mpt_utils.eval.llamacpp import llamacpp_perplexity

    _, src = exported["llama"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:5000])  # truncated
    with pytest.raises(MPTError, match="not a readable GGUF|truncated"):
        read_gguf(bad)
    with pytest.raises(MPTError):
        llamacpp_perplexity(bad, torch.arange(128), seqlen=64)
    with pytest.raises(MPTError, match="failed to quantize"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q8_0")
    with pytest.raises(MPTError, match="unknown GGUF scheme"):
        quantize_gguf(src, tmp_path / "out.gguf", "Q3_Z")
    with pytest.raises(MPTError, match="importance matrix"):
        quantize_gguf(src, tmp_path / "out.gguf", "IQ2_XXS")
    with pytest.raises(MPTError, match="does not support model_type"):
        export_gguf(tiny_model("opt").model, None, tmp_path / "opt.gguf")
    with pytest.raises(MPTError, match="export dtype"):
        export_gguf(exported["llama"][0].model, None, tmp_path / "x.gguf", dtype="q4")


def test_export_of_a_factored_linear_multiplies_it_back(tmp_path):
    from mpt_utils.quant.gguf.export import dense_weight

    loaded = _sharp("qwen2")
    mlp = loaded.model.model.layers[0].mlp
    w = mlp.down_proj.weight.detach().clone()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = torch.nn.Linear(w.shape[1], s.numel(), bias=False)
    second = torch.nn.Linear(s.numel(), w.shape[0], bias=False)
    first.weight.data, second.weight.data = s[:, None] * vh, u
    mlp.down_proj = torch.nn.Sequential(first, second)
    assert torch.allclose(dense_weight(mlp.down_proj), w, atol=1e-4)
    path = export_gguf(loaded.model, loaded.tokenizer, tmp_path / "f.gguf")
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    assert np.allclose(np.asarray(tensor.data).reshape(w.shape), w.numpy(), atol=1e-4)


def test_a_native_crash_in_llamacpp_becomes_a_clear_error(exported, tmp_path, monkeypatch):
    """The isolated evaluator reports a child killed by SIGSEGV (what a fault inside libggml does)
    as one MPTError naming the signal and the file, and the caller survives."""
    import os
    import stat

    from mpt_utils import native
    from mpt_utils.eval import llamacpp

    _, src = exported["llama"]
    crasher = tmp_path / "python-that-segfaults"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(native.sys, "executable", os.fspath(crasher))
    with pytest.raises(MPTError, match=r"llama.cpp crashed \(signal SIGSEGV\) while processing .*f32.gguf"):
        llamacpp.llamacpp_perplexity(src, torch.arange(128), seqlen=64, progress=False)
