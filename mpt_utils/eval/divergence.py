"""KL divergence of a compressed model from its dense model, on the perplexity windows.

llama.cpp's `--kl-divergence` protocol, on the windows of `mpt_utils.eval.perplexity.window_ids`
(each from an empty cache, no BOS added): at every scored position t (tokens 1..seqlen-1 of each
window) compare the dense next-token distribution P_t with the compressed one Q_t and report

- `kl_mean`: mean over positions of KL(P_t || Q_t) (nats), with its standard error across windows
  (per-window means, sample std / sqrt(n_windows), as for perplexity), and the p50/p90/p99/max
  of the per-position KL;
- `same_top`: share of positions where the dense top-1 token is also a top-1 token of Q_t;
- `dp_mean`, `dp_rms`: mean and root-mean-square of Δp = Q_t(x_t+1) - P_t(x_t+1), the change of
  the probability of the actual next token (a fraction, not percent);
- `nll_diff`: mean NLL(compressed) - NLL(dense) on the same tokens, a paired perplexity difference.

The dense side is computed once and kept in a compact form (`DenseReference`): per position the
top-k log-probs of P_t, their token ids, the log of the remaining mass P_t(R) = 1 - sum of the
top-k, and the log-prob of the actual next token. KL is then computed over the k+1 "buckets"
{top-k tokens of P_t} ∪ {R, the rest lumped into one}:

    KL_k = sum_{i in top-k} p_i log(p_i / q_i) + p_R log(p_R / q_R),   q_R = 1 - sum_{i in top-k} q_i.

Merging tokens is a deterministic map of the outcome, so by the data-processing (log-sum)
inequality KL_k <= KL; the gap is exactly p_R * KL(P(.|R) || Q(.|R)), the rest mass times the
divergence of the two conditional tail distributions. The compressed side needs its full logits
only inside the process that computes them: for a GGUF, the reference travels to the llama.cpp
child and only per-position statistics come back.

Measured gap (`kl_exact` on full logits vs KL_k, mean over all scored positions):
- tiny random llama (vocab 258, weights x8 and lm_head x3 so that ~2 % of the mass lies outside
  the top-32, `tests/test_divergence.py`) vs. itself plus 5 % weight noise, k=32: KL_k = 0.973 KL
  (exact 0.457 nats); the gap equals p_R * KL(P(.|R) || Q(.|R)) to 1e-5 at every position.
- smollm2-135m (vocab 49152), embedded-wiki, seqlen 512, 2 windows (1022 positions), wanda@0.5
  (8 calibration windows; exact mean KL 1.015 nats): KL_k/KL = 0.83 / 0.88 / 0.92 / 0.94 / 0.96
  for k = 16 / 32 / 64 / 128 / 256 (mean dense rest mass 0.18 / 0.13 / 0.09 / 0.06 / 0.04);
  per position the median relative gap at k=64 is 6 %, the largest absolute gap 0.76 nats, and the
  p99 of the per-position KL is 4.38 (KL_k) vs 4.47 (exact). sparsegpt@0.5 on the same positions
  (exact 1.037): KL_k/KL = 0.81 / 0.86 / 0.90 / 0.94 / 0.96 for the same k.
So KL_k underestimates a heavily compressed small model's KL by ~10 % at the default k=64. The
two prunings lost a similar share (0.92 vs 0.90), so their order was kept; compare KL values only
at the same k. `DivergenceResult.rest_mass` reports the dense mass outside the top-k, the
only place KL_k can miss divergence; raise k where it is large.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.perplexity import standard_error, window_ids
from mpt_utils.models import check_seqlen, pick_device
from mpt_utils.progress import progress_bar

DENSE_DIR = "dense_logits"  # folder under the results store root holding cached dense references
DEFAULT_K = 64
_FORMAT = 1  # version of the cached file layout
PERCENTILES = (50, 90, 99)


# -- the compact dense reference ------------------------------------------------------------------
@dataclass
class DenseReference:
    """Dense next-token distributions of every scored position of `windows`, in compact form.

    top_ids/top_logp: [n, seqlen-1, k] the k most likely tokens of P_t and their log-probs
    (descending); rest_logp: [n, seqlen-1] log of the mass outside them (-inf when none);
    target_logp: [n, seqlen-1] log-prob of the actual next token."""

    windows: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor
    target_logp: torch.Tensor
    vocab_size: int
    key: str | None = None
    seconds: float = 0.0  # time the dense forward passes took (0 when loaded from the cache)

    @property
    def n_windows(self) -> int:
        return self.windows.size(0)

    @property
    def seqlen(self) -> int:
        return self.windows.size(1)

    @property
    def k(self) -> int:
        return self.top_ids.size(-1)

    @property
    def digest(self) -> str:
        """Short hash of the window token ids: results are paired only on identical windows."""
        return hashlib.sha256(self.windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def compact(self, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """What the compressed side needs for windows start:stop (what crosses to a llama.cpp child)."""
        sl = slice(start, stop)
        return {"windows": self.windows[sl], "top_ids": self.top_ids[sl], "top_logp": self.top_logp[sl],
                "rest_logp": self.rest_logp[sl]}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + os.replace): readers never see a partial file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FORMAT, "vocab_size": self.vocab_size, "key": self.key,
                   "windows": self.windows, "top_ids": self.top_ids, "top_logp": self.top_logp,
                   "rest_logp": self.rest_logp, "target_logp": self.target_logp}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DenseReference:
        """A saved reference; MPTError when the file is not one (tensors only: weights_only load)."""
        try:
            payload = torch.load(path, weights_only=True)
            if payload.get("format") != _FORMAT:
                raise ValueError(f"format {payload.get('format')!r}")
            return cls(windows=payload["windows"], top_ids=payload["top_ids"], top_logp=payload["top_logp"],
                       rest_logp=payload["rest_logp"], target_logp=payload["target_logp"],
                       vocab_size=int(payload["vocab_size"]), key=payload.get("key"))
        except Exception as err:  # noqa: BLE001 - any unreadable file is one user-facing failure
            raise MPTError(f"{path} is not a readable dense reference ({type(err).__name__}: {err})",
                           "delete it; the next call computes it again") from None


def _log_rest(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `top_ids`, summed directly over the other tokens
    (1 - sum(top) would lose the small remainders that matter most)."""
    return logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)


def reference_from_logits(logits: torch.Tensor, windows: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Compact dense statistics of a batch: logits [b, seqlen, vocab] of windows [b, seqlen]."""
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    k = min(k, logp.size(-1))
    top_logp, top_ids = logp.topk(k, dim=-1)
    target = windows[:, 1:].to(logp.device).unsqueeze(-1)
    return {"top_ids": top_ids.to(torch.int32).cpu(), "top_logp": top_logp.cpu(),
            "rest_logp": (_log_rest(logp, top_ids) if k < logp.size(-1)
                          else torch.full(logp.shape[:-1], float("-inf"), device=logp.device)).cpu(),
            "target_logp": logp.gather(-1, target).squeeze(-1).cpu()}


def reference_key(model_spec: str, data: str, seqlen: int, max_windows: int | None, k: int = DEFAULT_K,
                  **settings: Any) -> str | None:
    """Cache key of a dense reference: content fingerprints of the model and corpus, seqlen, number of
    windows, k, and any `settings` that change the logits (dtype, device). None when the model or the
    corpus cannot be fingerprinted here (then nothing is cached)."""
    from mpt_utils.fingerprint import data_fingerprint, model_fingerprint

    model_fp, data_fp = model_fingerprint(model_spec), data_fingerprint(data)
    if model_fp is None or data_fp is None:
        return None
    parts = [model_fp, data_fp, str(int(seqlen)), str(max_windows), str(int(k)),
             *(f"{name}={settings[name]}" for name in sorted(settings))]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:20]


def reference_dir(store_or_root: Any) -> Path:
    """`<results store root>/dense_logits`, for a ResultsStore or its root folder."""
    # a path is the root itself (a Path's own `.root` is its anchor, "/", not a store's folder)
    root = store_or_root if isinstance(store_or_root, (str, os.PathLike)) else store_or_root.root
    return Path(root) / DENSE_DIR


@torch.no_grad()
def dense_reference(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, *,
                    k: int = DEFAULT_K, cache_dir: str | os.PathLike | None = None, key: str | None = None,
                    batch_size: int = 1, device: str | torch.device | None = None,
                    progress: bool = True) -> DenseReference:
    """The compact dense reference of `model` on the perplexity windows of `ids`.

    With `cache_dir` and `key` (see `reference_key`), it is read from `<cache_dir>/<key>.pt` when
    there and computed then written once otherwise; a cached file made from other windows is
    recomputed (with a warning), never used."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MPTError(f"k={k!r} is not a positive number of top tokens", f"pass e.g. k={DEFAULT_K}")
    seqlen = check_seqlen(model, seqlen)
    windows = window_ids(ids, seqlen, max_windows)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None and key else None
    if path is not None and path.exists():
        cached = DenseReference.load(path)
        if torch.equal(cached.windows, windows) and cached.k == min(k, cached.vocab_size):
            return cached
        warnings.warn(f"dense reference {path} was made from other windows or k; computing it again",
                      stacklevel=2)
    dev = pick_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: list[dict[str, torch.Tensor]] = []
    vocab = 0
    start = time.perf_counter()
    try:
        for i in progress_bar(range(0, windows.size(0), batch_size), desc="dense reference", disable=not progress,
                              leave=False):
            batch = windows[i : i + batch_size].to(dev)
            logits = model(input_ids=batch, use_cache=False).logits
            vocab = logits.size(-1)
            parts.append(reference_from_logits(logits, batch, k))
    finally:
        model.train(was_training)
    ref = DenseReference(windows=windows, vocab_size=vocab, key=key, seconds=time.perf_counter() - start,
                         **{name: torch.cat([p[name] for p in parts]) for name in parts[0]})
    if path is not None:
        ref.save(path)
    return ref


# -- per-position statistics of the compressed model ------------------------------------------------
def position_stats(logits: torch.Tensor, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per scored position of a batch: lumped KL(P || Q), log Q(next token) and whether the dense
    top-1 token is a top-1 token of Q. `logits` [b, seqlen, vocab] of the compressed model on
    `ref["windows"]`, `ref` a `DenseReference.compact` slice. Used by the torch and llama.cpp paths."""
    logq = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    top_ids = ref["top_ids"].to(logq.device, torch.int64)
    q_top = logq.gather(-1, top_ids).double()
    p_top = ref["top_logp"].to(logq.device).double()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    p_rest = ref["rest_logp"].to(logq.device).double()
    if top_ids.size(-1) < logq.size(-1):
        q_rest = _log_rest(logq, top_ids).double()
        # p_R log(p_R / q_R), 0 when the dense rest is empty (0 log 0 = 0)
        kl = kl + torch.where(p_rest > float("-inf"), p_rest.exp() * (p_rest - q_rest), 0.0)
    kl = kl.clamp_min(0.0)  # KL_k >= 0; rounding gives -1e-8 for identical distributions
    target = ref["windows"][:, 1:].to(logq.device, torch.int64).unsqueeze(-1)
    return {"kl": kl.float().cpu(), "target_logp": logq.gather(-1, target).squeeze(-1).cpu(),
            "same_top": (q_top[..., 0] >= logq.max(dim=-1).values.double()).cpu()}


def kl_exact(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(P || Q) over the full vocabulary from both models' logits [.., vocab]
    (for measuring how far the lumped top-k KL is below it)."""
    logp = torch.log_softmax(dense_logits.double(), dim=-1)
    logq = torch.log_softmax(logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# -- the result ------------------------------------------------------------------------------------
@dataclass
class DivergenceResult:
    """Paired divergence of a compressed model from its dense reference (definitions in the module
    docstring). Window-level arrays ([n_windows]) allow resampling windows; `stderr`s are across
    windows (sample std of the per-window means / sqrt(n_windows)), NaN for one window."""

    n_windows: int
    n_positions: int
    seqlen: int
    k: int
    kl_mean: float
    kl_se: float
    kl_p50: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    same_top: float
    same_top_se: float
    dp_mean: float
    dp_se: float
    dp_rms: float
    nll: float  # mean NLL of the compressed model on the scored tokens
    nll_dense: float
    nll_diff: float
    nll_diff_se: float
    rest_mass: float  # mean dense mass outside the top-k: where KL_k can miss divergence
    seconds: float
    reference: str  # the reference's cache key or, uncached, the digest of its windows
    digest: str
    window_kl: list[float] = field(default_factory=list, repr=False)
    window_nll: list[float] = field(default_factory=list, repr=False)
    window_nll_dense: list[float] = field(default_factory=list, repr=False)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf

    @classmethod
    def from_positions(cls, stats: dict[str, torch.Tensor], reference: DenseReference,
                       seconds: float) -> DivergenceResult:
        """From per-position tensors [n, seqlen-1] (`position_stats` concatenated over windows)."""
        kl = stats["kl"].double()
        q_t, p_t = stats["target_logp"].double(), reference.target_logp.double()
        same = stats["same_top"].double()
        dp = q_t.exp() - p_t.exp()
        w_kl, w_nll, w_nll_dense = kl.mean(1), -q_t.mean(1), -p_t.mean(1)
        flat = kl.flatten().numpy()
        pct = np.percentile(flat, PERCENTILES) if np.isfinite(flat).all() else [math.nan] * len(PERCENTILES)
        return cls(n_windows=kl.size(0), n_positions=kl.numel(), seqlen=reference.seqlen, k=reference.k,
                   kl_mean=float(kl.mean()), kl_se=standard_error(w_kl),
                   kl_p50=float(pct[0]), kl_p90=float(pct[1]), kl_p99=float(pct[2]), kl_max=float(kl.max()),
                   same_top=float(same.mean()), same_top_se=standard_error(same.mean(1)),
                   dp_mean=float(dp.mean()), dp_se=standard_error(dp.mean(1)),
                   dp_rms=float(dp.pow(2).mean().sqrt()),
                   nll=float(w_nll.mean()), nll_dense=float(w_nll_dense.mean()),
                   nll_diff=float((w_nll - w_nll_dense).mean()), nll_diff_se=standard_error(w_nll - w_nll_dense),
                   rest_mass=float(reference.rest_logp.double().exp().mean()), seconds=seconds,
                   reference=reference.key or reference.digest, digest=reference.digest,
                   window_kl=w_kl.tolist(), window_nll=w_nll.tolist(), window_nll_dense=w_nll_dense.tolist())

    def rows(self, data: str | None = None, **extra: Any) -> list[dict[str, Any]]:
        """Tidy rows for the results store: one metric each, `stderr` the standard error of `value`
        where one is defined (as in the perplexity and downstream rows)."""
        common = {"data": data, "n_windows": self.n_windows, "n_tokens": self.n_positions, "seqlen": self.seqlen,
                  "top_k": self.k, "reference": self.reference, **extra}
        values = [("kl_mean", self.kl_mean, self.kl_se), ("kl_p50", self.kl_p50, None),
                  ("kl_p90", self.kl_p90, None), ("kl_p99", self.kl_p99, None), ("kl_max", self.kl_max, None),
                  ("same_top", self.same_top, self.same_top_se), ("dp_mean", self.dp_mean, self.dp_se),
                  ("dp_rms", self.dp_rms, None), ("nll_diff", self.nll_diff, self.nll_diff_se)]
        return [{"metric": name, "value": value, **({"stderr": se} if se is not None else {}), **common}
                for name, value, se in values]


@torch.no_grad()
def _torch_positions(model: torch.nn.Module, reference: DenseReference, batch_size: int,
                     device: str | torch.device | None, progress: bool, desc: str) -> dict[str, torch.Tensor]:
    check_seqlen(model, reference.seqlen)
    dev = pick_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    try:
        for i in progress_bar(range(0, reference.n_windows, batch_size), desc=desc, disable=not progress, leave=False):
            ref = reference.compact(i, i + batch_size)
            logits = model(input_ids=ref["windows"].to(dev), use_cache=False).logits
            if logits.size(-1) != reference.vocab_size:
                raise MPTError(f"the model has {logits.size(-1)} output tokens, the dense reference "
                               f"{reference.vocab_size}", "compare models that share the dense model's tokenizer")
            parts.append(position_stats(logits, ref))
    finally:
        model.train(was_training)
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def divergence(model_or_path: torch.nn.Module | str | os.PathLike, reference: DenseReference, *,
               batch_size: int = 1, device: str | torch.device | None = None, progress: bool = True,
               desc: str = "divergence", n_threads: int | None = None, kv_type: str = "f16",
               n_gpu_layers: int = 0, isolate: bool = True) -> DivergenceResult:
    """KL and top-token statistics of a compressed model against `reference` on its windows.

    `model_or_path`: a torch model, or a GGUF file evaluated by llama.cpp in a child process
    (`n_threads`, `kv_type`, `n_gpu_layers`, `isolate` as in `llamacpp_perplexity`)."""
    start = time.perf_counter()
    if isinstance(model_or_path, (str, os.PathLike)):
        from mpt_utils.eval.llamacpp import llamacpp_divergence_positions

        stats, seconds = llamacpp_divergence_positions(model_or_path, reference, n_threads=n_threads,
                                                       kv_type=kv_type, n_gpu_layers=n_gpu_layers,
                                                       progress=progress, desc=desc, isolate=isolate)
    else:
        stats = _torch_positions(model_or_path, reference, batch_size, device, progress, desc)
        seconds = time.perf_counter() - start
    return DivergenceResult.from_positions(stats, reference, seconds)


# -- how many windows does each metric need? --------------------------------------------------------
def ordering_consistency(a: DivergenceResult, b: DivergenceResult, window_counts: Sequence[int] | None = None,
                         n_boot: int = 2000, seed: int = 0, paired: bool = True):
    """How often an evaluation on n random windows orders models `a` and `b` as all windows do, per
    metric: "ppl" (sign of the mean NLL difference, i.e. of the PPL difference) and "kl" (sign of
    the mean KL difference).

    Each of `n_boot` resamples draws n windows with replacement from the shared windows (bootstrap:
    the windows stand for the corpus). `paired` scores both models on the same draw (how the suite
    evaluates: every evaluator uses `window_ids`); `paired=False` draws independently for each model
    (numbers taken from different evaluation subsets). Returns a DataFrame with columns n_windows,
    metric, consistent (share of resamples agreeing with the full-set order), full_diff (a - b on
    all windows) and z (full_diff over its standard error, paired or not).

    Measured once (smollm2-135m, embedded-wiki, seqlen 512, 20 windows, wanda@0.5 vs sparsegpt@0.5
    with 8 calibration windows, 4000 resamples): paired, 95 % consistency needs 2 windows for KL
    and 3 for PPL (z = -4.4 and -4.6 on all 20); unpaired, KL reaches 96 % at 20 windows and PPL
    79 %, because KL removes the text's difficulty, which dominates the per-window NLL.
    """
    import pandas as pd

    if a.digest != b.digest:
        raise MPTError("the two results were computed on different windows",
                       "compute both with divergence(...) against the same DenseReference")
    n = a.n_windows
    if n < 2:
        raise MPTError("ordering consistency needs at least two windows", "evaluate more windows")
    counts = sorted({int(c) for c in window_counts}) if window_counts else sorted({*range(1, min(n, 8) + 1),
                                                                                  *np.unique(np.geomspace(8, n, 8)
                                                                                             .astype(int))})
    per_window = {"ppl": (np.asarray(a.window_nll), np.asarray(b.window_nll)),
                  "kl": (np.asarray(a.window_kl), np.asarray(b.window_kl))}
    rng = np.random.default_rng(seed)
    rows = []
    for count in counts:
        # the same draws for both metrics, and for both models when paired
        idx_a = rng.integers(0, n, size=(n_boot, count))
        idx_b = idx_a if paired else rng.integers(0, n, size=(n_boot, count))
        for metric, (x, y) in per_window.items():
            full = float(x.mean() - y.mean())
            se = (float((x - y).std(ddof=1)) if paired else math.sqrt(x.var(ddof=1) + y.var(ddof=1))) / math.sqrt(n)
            agree = np.sign(x[idx_a].mean(axis=1) - y[idx_b].mean(axis=1)) == np.sign(full)
            rows.append({"n_windows": count, "metric": metric, "consistent": float(agree.mean()),
                         "full_diff": full, "z": full / se if se > 0 else math.inf})
    return pd.DataFrame(rows)


def windows_needed(table, level: float = 0.95) -> dict[str, int | None]:
    """Per metric of an `ordering_consistency` table, the fewest windows from which on every tested
    count reaches `level`; None when even the largest does not."""
    needed: dict[str, int | None] = {}
    for metric, part in table.groupby("metric"):
        part = part.sort_values("n_windows")
        ok = part["consistent"].to_numpy() >= level
        bad = np.flatnonzero(~ok)
        last_bad = bad[-1] if bad.size else -1
        needed[str(metric)] = int(part["n_windows"].iloc[last_bad + 1]) if last_bad + 1 < len(part) else None
    return needed
