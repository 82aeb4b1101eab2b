"""Sentences of notebook 03's conclusion from its GGUF ladder table (mpt_utils.quant.report)."""

import math

import pandas as pd

from mpt_utils.quant.report import ladder_sentence


def test_ladder_sentence_spans_the_ladder_and_finds_the_smallest_near_lossless_file():
    ladder = pd.DataFrame({"ppl": [10.0, 10.5, 12.9, 40.0, math.nan],
                           "bits_per_weight": [16.0, 8.5, 4.5, 2.6, 1.6]},
                          index=pd.Index(["F16", "Q8_0", "Q4_0", "Q2_K", "IQ1_S"], name="scheme"))
    text = ladder_sentence(ladder, dense_ppl=10.0, tolerance=0.3)
    assert text == ("GGUF ladder through llama.cpp (4 schemes): PPL 10 at F16 (16.00 bits/weight) to 40 at Q2_K "
                    "(2.60 bits/weight); the smallest file within dense × 1.30 is Q4_0 (4.50 bits/weight).")
    assert "no scheme within dense × 1.01" in ladder_sentence(ladder.iloc[1:], 10.0, tolerance=0.01)
    assert ladder_sentence(ladder.iloc[0:0], 10.0) == "No GGUF scheme was evaluated: the ladder is empty."
