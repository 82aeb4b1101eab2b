"""The dense reference point every compression curve starts from: PPL per corpus, size, tokens/s.

The dense point is the empty recipe's (`Session.dense_point`), scored on each corpus exactly as every
compressed point is (`eval.paired.PairedEvaluator`: PPL ± SE over the windows, and the KL to itself,
0), so notebook 01's numbers are the reference the other notebooks' curves start from. What the model
is (architecture, depth, width, dtype, source, parameters and bytes as loaded) is a measurement of
the same point, stored beside it, so a finished notebook reads everything back without loading.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from mpt_utils.session import Session

INFO_KIND = "model_info"


def dense_protocol(model: str, data: str, seqlen: int, max_windows: int | None, device: str | None) -> Any:
    """The protocol of the dense point on `data`: the dense model calibrates nothing, so its
    calibration fields (part of every protocol's key) name the scored corpus itself."""
    from mpt_utils.combined.grid import GridSetup

    return GridSetup(model=model, eval_data=data, calib_data=data, seqlen=seqlen, max_windows=max_windows,
                     device=device)


def _info_rows(model: Any, bench: Any) -> list[dict[str, Any]]:
    info = bench.loaded.info
    return [{"metric": "n_params", "value": info.n_params}, {"metric": "size_gb", "value": info.n_bytes / 1e9},
            {"metric": "model_info", "value": None, "dtype": info.dtype, "source": info.source, "arch": info.arch,
             "n_layers": info.n_layers, "hidden_size": info.hidden_size, "note": info.note}]


def dense_baseline(session: Session, datasets: list[str], *, seqlen: int = 512, max_windows: int | None = None,
                   device: str | None = None) -> pd.DataFrame:
    """The dense point on each corpus of `datasets` (stored per corpus, resumable) and the model's
    description, as tidy rows: the scorer's rows (ppl with stderr, n_tokens and tokens_per_s of the
    scoring pass, kl rows), the size rows of the recipe point, and `n_params`, `size_gb` (bytes as
    loaded) and one `model_info` row (arch, n_layers, hidden_size, dtype, source, note)."""
    rows: list[dict[str, Any]] = []
    for data in datasets:
        rows += session.dense_point(dense_protocol(session.model_spec, data, seqlen, max_windows, device))
    if datasets:
        protocol = dense_protocol(session.model_spec, datasets[0], seqlen, max_windows, device)
        rows += session.measure("dense", protocol, INFO_KIND, {}, _info_rows)
    return pd.DataFrame(rows)


__all__ = ["dense_baseline", "dense_protocol"]
