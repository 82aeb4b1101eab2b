"""Integration: the embedded model through GGUF export and llama.cpp, and its Q4_1 weight grid."""

import pytest

from mpt_utils.data import eval_ids
from mpt_utils.eval.perplexity import perplexity
from mpt_utils.native import has_llama_cpp

pytestmark = pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python not installed")


@pytest.mark.integration
@pytest.mark.gguf
def test_embedded_f32_gguf_round_trip_and_q4_1_grid(embedded, tmp_path):
    from mpt_utils.eval.llamacpp import llamacpp_perplexity
    from mpt_utils.quant.gguf import export_gguf, read_gguf
    from mpt_utils.quant.grid_check import grid_distance

    path = export_gguf(embedded.model, embedded.tokenizer, tmp_path / "smollm2-f32.gguf",
                       tokenizer_gguf=embedded.info.path)
    info = read_gguf(path)
    assert info.n_params == embedded.info.n_params and info.type_counts == {"F32": 272}
    ids = eval_ids(embedded.tokenizer, "embedded-wiki")
    ref = perplexity(embedded.model, ids, seqlen=256, max_windows=2, progress=False)
    got = llamacpp_perplexity(path, ids, seqlen=256, max_windows=2, progress=False)
    assert abs(got.ppl / ref.ppl - 1) < 0.01

    rows = {r["scheme"]: r for r in grid_distance(embedded.model)}
    q4_1 = rows["RTN w4 g32 float-offset (Q4_1 format)"]
    assert q4_1["rel_rms_diff"] < 1e-3  # the embedded weights already sit on this grid
    assert rows["RTN w4 g128 int zero point"]["rel_rms_diff"] > 10 * q4_1["rel_rms_diff"]
