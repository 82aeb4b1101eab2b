"""Perplexity by the papers' protocol: one tokenization, non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from mpt_utils.errors import MPTError
from mpt_utils.models import check_seqlen, pick_device
from mpt_utils.progress import progress_bar


@dataclass
class PerplexityResult:
    """Perplexity with its uncertainty over windows.

    Each window w scores the same number of tokens (seqlen - 1), so the mean token NLL is the mean
    of the per-window mean NLLs x_w. Its standard error is taken across windows,
    `nll_se = std(x_w, ddof=1) / sqrt(n_windows)` (tokens inside a window are correlated, windows
    are close to independent draws of text), and carried to perplexity by the delta method,
    `ppl_se = ppl * nll_se`. llama.cpp's perplexity tool prints a per-token "±" instead, which
    treats every token as independent and is smaller. With one window, or a collapsed model, the
    standard errors are NaN (not estimable).
    """

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # tokens scored
    n_windows: int
    seqlen: int
    seconds: float
    tokens_per_s: float  # tokens forwarded per second (windows x seqlen / seconds)
    nll_se: float = math.nan  # standard error of `nll` across windows
    ppl_se: float = math.nan  # standard error of `ppl` (delta method: ppl * nll_se)
    window_nll: list[float] = field(default_factory=list, repr=False)  # mean NLL of each window

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_window_sums(cls, sums: torch.Tensor | list[float], windows: torch.Tensor,
                         seconds: float) -> PerplexityResult:
        """From the NLL summed within each of `windows` ([n, seqlen]); a collapsed model gives ppl=inf."""
        n, seqlen = windows.shape
        per_window = torch.as_tensor(sums, dtype=torch.float64).reshape(n) / (seqlen - 1)
        nll = float(per_window.mean())
        finite = math.isfinite(nll) and nll < 700
        ppl = math.exp(nll) if finite else math.inf
        nll_se = standard_error(per_window) if finite else math.nan
        return cls(ppl=ppl, nll=nll if math.isfinite(nll) else math.inf, n_tokens=n * (seqlen - 1), n_windows=n,
                   seqlen=seqlen, seconds=seconds, tokens_per_s=windows.numel() / seconds if seconds > 0 else math.inf,
                   nll_se=nll_se, ppl_se=ppl * nll_se, window_nll=per_window.tolist())


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (sample std / sqrt(n)); NaN for fewer than two values."""
    values = values.double().flatten()
    if values.numel() < 2:
        return math.nan
    return float(values.std(unbiased=True) / math.sqrt(values.numel()))


def window_ids(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D id tensor into non-overlapping [n, seqlen] windows; the incomplete tail is dropped,
    as in the GPTQ/SparseGPT/Wanda evaluation code, so numbers stay comparable."""
    seqlen = check_seqlen(None, seqlen)
    if seqlen < 2:
        raise MPTError(f"seqlen={seqlen} is too short", "use seqlen >= 2 (2048 for 7B models)")
    have = ids.numel()
    n = have // seqlen
    if n == 0:
        raise MPTError(f"text has {have} tokens, fewer than one window of seqlen={seqlen} tokens",
                       f"pass seqlen <= {have}, or a larger evaluation corpus" if have >= 2
                       else "use a larger evaluation corpus")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def nll_from_logits(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window (float64 accumulation: long texts, tiny differences)."""
    shift = logits[:, :-1, :].float()
    target = windows[:, 1:].to(shift.device)
    loss = F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), reduction="none")
    return loss.view(windows.size(0), -1).double().sum(dim=1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1,
               device: str | torch.device | None = None, max_windows: int | None = None,
               progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` on 1-D token ids `ids`. A collapsed model (inf/NaN loss) gives ppl=inf."""
    seqlen = check_seqlen(model, seqlen)  # beyond the context a RoPE model gives a wrong number, OPT crashes
    dev = pick_device(device) if device is not None else next(model.parameters()).device
    windows = window_ids(ids, seqlen, max_windows)
    was_training = model.training
    model.eval()
    sums = []
    start = time.perf_counter()
    for i in progress_bar(range(0, windows.size(0), batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(dev)
        logits = model(input_ids=batch, use_cache=False).logits
        sums.append(nll_from_logits(logits, batch).cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return PerplexityResult.from_window_sums(torch.cat(sums), windows, seconds)


def perplexity_rows(model: torch.nn.Module, tokenizer, datasets: list[str], seqlen: int,
                    max_windows: int | None = None, batch_size: int = 1,
                    device: str | torch.device | None = None, progress: bool = True) -> list[dict]:
    """Tidy rows (metric='ppl', one per dataset) for the results store, with tokens and tokens/s.
    `stderr` is the standard error of `value` (as in the downstream rows), `nll_stderr` that of `nll`;
    see `PerplexityResult` for their definition."""
    from mpt_utils.data import check_corpus, eval_ids

    if isinstance(datasets, str):  # one name, not its characters
        datasets = [datasets]
    # every input is checked before the first (long) evaluation runs
    seqlen = check_seqlen(model, seqlen)
    pick_device(device)
    for name in datasets:
        check_corpus(name)
    ids = {name: eval_ids(tokenizer, name) for name in datasets}
    for name, tokens in ids.items():
        if tokens.numel() < seqlen:
            raise MPTError(f"eval split of {name!r} has {tokens.numel()} tokens, fewer than one window of "
                           f"seqlen={seqlen} tokens", f"pass seqlen <= {tokens.numel()}, or a larger corpus"
                           if tokens.numel() >= 2 else "use a larger corpus")
    rows = []
    for name in datasets:
        res = perplexity(model, ids[name], seqlen=seqlen, batch_size=batch_size,
                         device=device, max_windows=max_windows, progress=progress, desc=f"ppl {name}")
        rows.append({"metric": "ppl", "data": name, "value": res.ppl, "stderr": res.ppl_se, "nll": res.nll,
                     "nll_stderr": res.nll_se, "n_tokens": res.n_tokens, "n_windows": res.n_windows, "seqlen": seqlen,
                     "tokens_per_s": res.tokens_per_s})
    return rows
