"""Downstream (extrinsic) accuracy through the LM Evaluation Harness, for in-memory and GGUF models.

`evaluate_downstream(model, tokenizer, tasks)` runs lm-eval's `simple_evaluate` on one of three
log-likelihood backends, so prompts, few-shot sampling and the acc / acc_norm definitions are
lm-eval's own in every case:

- "hf": lm-eval's `HFLM` wrapped around the in-memory (possibly compressed) torch model: the reference.
- "mpt": our torch scorer, the same log-likelihoods (checked against HFLM to 1e-4) computed faster:
  all choices of an item share one pass over their common context (a packed row with a tree-shaped
  attention mask), and the vocabulary projection runs only at the positions that are scored.
- "llamacpp": our scorer over `llama_cpp.Llama(logits_all=True)` for GGUF files (lm-eval's own
  `gguf` model needs a running server); consecutive requests reuse the KV cache of their common prefix.

acc = argmax of the summed continuation log-likelihood; acc_norm = argmax of log-likelihood divided
by the choice's length in characters (lm-eval's definition; equal to its byte length for ASCII text).
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval.offline_tasks import OFFLINE_TASKS, build_offline_tasks
from mpt_utils.native import in_child, run_isolated

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - the eval extra is part of `make setup`
    raise MPTError("downstream evaluation needs lm-eval", "pip install 'lm-eval>=0.4.9'") from None

OFFLINE_SUITE: tuple[str, ...] = OFFLINE_TASKS
OFFLINE_ALIASES = ("offline", "mpt_offline")
# the paper's downstream tasks (lm-eval names); their datasets come from the Hugging Face hub
STANDARD_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq",
                                   "mmlu")
BACKENDS = ("hf", "mpt", "llamacpp")
ROW_FIELDS = ("task", "metric", "value", "stderr", "n", "chance")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- task names


@lru_cache(maxsize=1)
def _lm_eval_task_names() -> frozenset[str]:
    """Names declared by lm-eval's bundled YAML files, read with a regex (2 s) instead of building its
    full TaskManager index (35 s on 2 cores). Used only to tell 'unknown' from 'needs the hub'."""
    import lm_eval

    pattern = re.compile(r"^(?:task|group|tag):\s*(.+)$", re.M)
    names: set[str] = set()
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        for match in pattern.finditer(path.read_text(encoding="utf-8", errors="ignore")):
            value = match.group(1).split("#")[0].strip()
            names.update(v.strip(" '\"") for v in value.strip("[]").split(","))
    return frozenset(n for n in names if n)


def _unknown_task_error(bad: list[str]) -> MPTError:
    known = [*OFFLINE_SUITE, *OFFLINE_ALIASES, *STANDARD_TASKS]
    hints = sorted({m for b in bad for m in difflib.get_close_matches(b, known + sorted(_lm_eval_task_names()),
                                                                      n=3, cutoff=0.6)})
    return MPTError(
        f"unknown downstream task(s) {bad}" + (f" (did you mean {', '.join(hints)}?)" if hints else ""),
        f"offline suite (no network): {', '.join(OFFLINE_SUITE)}, or 'mpt_offline' for all of them; "
        f"standard tasks (need the Hugging Face hub): {', '.join(STANDARD_TASKS)}; "
        "or any other lm-eval task name (`lm_eval ls tasks`)",
    )


def resolve_tasks(tasks: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """Split requested names into (offline, standard), expanding 'offline'/'mpt_offline'. Unknown names,
    and standard names while the hub is unreachable, raise MPTError at once (never a hang)."""
    from mpt_utils.models import hub_reachable

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise MPTError("no downstream tasks given", f"pass e.g. tasks={list(OFFLINE_SUITE)}")
    offline: list[str] = []
    standard: list[str] = []
    for name in names:
        if name in OFFLINE_ALIASES:
            offline.extend(t for t in OFFLINE_SUITE if t not in offline)
        elif name in OFFLINE_SUITE:
            if name not in offline:
                offline.append(name)
        else:
            standard.append(name)
    if not standard:
        return offline, standard
    reachable = hub_reachable()
    bad = [n for n in standard if n not in _lm_eval_task_names()]
    if bad and reachable:  # the regex index can miss generated names: ask lm-eval itself
        bad = [n for n in bad if n not in _task_manager(True).all_tasks]
    if bad:
        raise _unknown_task_error(bad)
    if not reachable:
        raise MPTError(
            f"downstream task(s) {standard} need their datasets from the Hugging Face hub, which is unreachable",
            f"use the offline suite: tasks='mpt_offline' ({', '.join(OFFLINE_SUITE)}), built from gensim's "
            "questions-words.txt; or run where huggingface.co is reachable",
        )
    return offline, standard


@lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(build_offline_tasks()), include_defaults=include_defaults)


# ---------------------------------------------------------------- shared log-likelihood plumbing


def _greedy_and_logprob(logits: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of log p(target) over positions and whether every target is the argmax (float32 softmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(list(targets), device=logp.device)
    return float(logp.gather(-1, idx[:, None]).sum()), bool((logp.argmax(-1) == idx).all())


class _ScorerLM(TemplateLM):
    """What our scorers share: lm-eval's request plumbing, no generation."""

    show_progress = True

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise MPTError("this scorer does only multiple-choice log-likelihoods",
                       "use backend='hf' for perplexity-style (loglikelihood_rolling) tasks")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise MPTError("this scorer does not generate text", "use backend='hf' for generative tasks")


# ---------------------------------------------------------------- our torch scorer


class TorchScorer(_ScorerLM):
    """Log-likelihoods of an in-memory causal LM, equal to lm-eval's HFLM (same tokenization, left
    truncation, prefix token) but computed with shared contexts and scored positions only."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 add_bos_token: bool | None = None):
        super().__init__()
        from lm_eval.models.utils import resolve_max_length

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.add_bos_token = add_bos_token
        self.max_length = max_length or resolve_max_length(getattr(model, "config", None), tokenizer)
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False  # the text already carries its BOS
        return self.tokenizer.encode(string, **kw)

    def _groups(self, requests) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
        """(context, [(request index, continuation)]) with HFLM's left truncation applied first."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if len(cont) > self.max_length:
                raise MPTError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}",
                               "raise max_length or shorten the task's answers")
            whole = (ctx + cont)[-(self.max_length + 1):]
            groups.setdefault(tuple(whole[: len(whole) - len(cont)]), []).append((i, cont))
        return [(list(c), members) for c, members in groups.items()]

    def _packable(self, rows: list[tuple[list[int], list[tuple[int, list[int]]]]]) -> bool:
        cfg = getattr(self.model, "config", None)
        if cfg is None or getattr(cfg, "_attn_implementation", "eager") not in ("eager", "sdpa"):
            return False  # flash kernels take no custom 4-D mask
        window = getattr(cfg, "sliding_window", None)
        if window:  # a custom mask bypasses sliding windows: only pack when every span fits inside one
            span = max(len(c) + max(len(k) for _, k in m) for c, m in rows)
            return span < window
        return True

    def _forward_packed(self, batch) -> list[tuple[int, float, bool]]:
        """One row per context: context, then each continuation (minus its last token) side by side,
        each attending to the context and to itself only, at its own positions."""
        seqs, poss, allow, keeps, targets = [], [], [], [], []
        for ctx, members in batch:
            tokens, pos, owner = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
            keep: list[list[int]] = []
            for j, (_, cont) in enumerate(members):
                start = len(tokens)
                tokens += cont[:-1]
                pos += range(len(ctx), len(ctx) + len(cont) - 1)
                owner += [j] * (len(cont) - 1)
                keep.append([len(ctx) - 1, *range(start, start + len(cont) - 1)])
            n = len(tokens)
            own = torch.tensor(owner)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            same = (own[:, None] == own[None, :]) | (own[None, :] == -1)
            seqs.append(tokens)
            poss.append(pos)
            allow.append(causal & same)
            keeps.append(keep)
            targets.append([cont for _, cont in members])
        width = max(len(s) for s in seqs)
        n_keep = max(sum(len(k) for k in keep) for keep in keeps)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        pos_ids = torch.zeros_like(ids)
        mask = torch.eye(width, dtype=torch.bool).repeat(len(seqs), 1, 1)  # padding sees itself only
        keep_idx = torch.zeros(len(seqs), n_keep, dtype=torch.long)
        for r, (s, p, a, keep) in enumerate(zip(seqs, poss, allow, keeps)):
            ids[r, : len(s)] = torch.tensor(s)
            pos_ids[r, : len(p)] = torch.tensor(p)
            mask[r, : len(s), : len(s)] = a
            flat = [q for k in keep for q in k]
            keep_idx[r, : len(flat)] = torch.tensor(flat)
        dtype = next(self.model.parameters()).dtype
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        logits = self.model(input_ids=ids.to(self._device), position_ids=pos_ids.to(self._device),
                            attention_mask=additive[:, None].to(self._device), use_cache=False,
                            logits_to_keep=keep_idx.to(self._device)).logits
        out = []
        for r, ((_, members), keep) in enumerate(zip(batch, keeps)):
            at = 0
            for (i, cont), k in zip(members, keep):
                out.append((i, *_greedy_and_logprob(logits[r, at : at + len(k)], cont)))
                at += len(k)
        return out

    def _forward_plain(self, batch) -> list[tuple[int, float, bool]]:
        """HFLM's layout (one right-padded row per request), scoring only the continuation positions."""
        rows = [(i, ctx + cont[:-1], len(ctx), cont) for ctx, members in batch for i, cont in members]
        width = max(len(r[1]) for r in rows)
        n_keep = max(len(r[3]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        keep_idx = torch.zeros(len(rows), n_keep, dtype=torch.long)
        for r, (_, inp, n_ctx, cont) in enumerate(rows):
            ids[r, : len(inp)] = torch.tensor(inp)
            keep_idx[r, : len(cont)] = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont))
        logits = self.model(input_ids=ids.to(self._device), use_cache=False,
                            logits_to_keep=keep_idx.to(self._device)).logits
        return [(i, *_greedy_and_logprob(logits[r, : len(cont)], cont))
                for r, (i, _, _, cont) in enumerate(rows)]

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from mpt_utils.progress import progress_bar

        groups = sorted(self._groups(requests), key=lambda g: -(len(g[0]) + sum(len(k) for _, k in g[1])))
        results: dict[int, tuple[float, bool]] = {}
        for start in progress_bar(range(0, len(groups), self.batch_size), disable=disable_tqdm or not self.show_progress, desc="mpt scorer"):
            batch = groups[start : start + self.batch_size]
            forward = self._forward_packed if self._packable(batch) else self._forward_plain
            for i, ll, greedy in forward(batch):
                results[i] = (ll, greedy)
        return [results[i] for i in range(len(requests))]


# ---------------------------------------------------------------- llama.cpp scorer (GGUF)


def load_llama(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None):
    """A llama.cpp model that keeps the logits of every position (needed to score continuations)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MPTError("GGUF evaluation needs llama-cpp-python", "pip install llama-cpp-python "
                       "(compiles for ~6 minutes on 2 cores)") from None
    path = Path(path)
    if not path.is_file():
        raise MPTError(f"GGUF file {path} does not exist", "pass an existing .gguf path")
    return Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=n_threads, verbose=False)


class LlamaCppScorer(_ScorerLM):
    """lm-eval's log-likelihood requests scored by llama.cpp; the common prefix of consecutive requests
    stays in the KV cache (requests are visited in token order so choices of an item are neighbours)."""

    def __init__(self, llama, add_bos_token: bool | None = None):
        super().__init__()
        self.llama = llama
        self.max_length = llama.n_ctx()
        if add_bos_token is None:  # the GGUF's own tokenizer setting, as transformers reads it
            add_bos_token = str(llama.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        self.add_bos_token = add_bos_token

    @property
    def eot_token_id(self) -> int:
        return self.llama.token_eos()

    @property
    def prefix_token_id(self) -> int:
        bos = self.llama.token_bos()
        return bos if bos is not None and bos >= 0 else self.llama.token_eos()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.llama.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from mpt_utils.progress import progress_bar

        llama = self.llama
        llama.reset()
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        for i in progress_bar(order, disable=disable_tqdm or not self.show_progress,
                              desc="llama.cpp scorer"):
            _, ctx, cont = requests[i]
            whole = (ctx + cont)[-(self.max_length + 1):]
            inp = whole[:-1]
            cached = llama.input_ids[: llama.n_tokens].tolist()
            common = 0
            for a, b in zip(cached, inp):
                if a != b:
                    break
                common += 1
            llama.n_tokens = common  # eval() drops the KV cache beyond n_tokens before decoding
            if common < len(inp):
                llama.eval(inp[common:])
            first = len(inp) - len(cont)
            logits = torch.from_numpy(np.array(llama.scores[first : len(inp)], dtype=np.float32))
            results[i] = _greedy_and_logprob(logits, cont)
        return results  # type: ignore[return-value]


def gguf_loglikelihoods(path: str | Path, pairs: Sequence[tuple[str, str]], n_ctx: int = 2048,
                        isolate: bool = True) -> list[tuple[float, bool]]:
    """lm-eval's (log-likelihood, is-greedy) of each (context, continuation) pair under the GGUF at
    `path`, scored by llama.cpp in a child process unless `isolate=False`."""
    if isolate and not in_child():
        return run_isolated("mpt_utils.eval.downstream:gguf_loglikelihoods",
                            {"path": str(path), "pairs": [tuple(p) for p in pairs], "n_ctx": n_ctx,
                             "isolate": False}, what=str(path))
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, tuple(pair), 0) for pair in pairs]
    return LlamaCppScorer(load_llama(path, n_ctx=n_ctx)).loglikelihood(requests, disable_tqdm=True)


# ---------------------------------------------------------------- evaluation entry point


@contextmanager
def _quiet_lm_eval(progress: bool, level: int = logging.ERROR) -> Iterator[None]:
    """lm-eval logs every task build and draws a bar per stage: keep errors only, and the bars only on
    request (its modules bind `tqdm` at import, so the silent variant is swapped in for this call)."""
    import importlib

    from tqdm import tqdm

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    def silent(*args: Any, **kwargs: Any) -> Any:  # lm-eval passes disable= itself: override it, not default it
        return tqdm(*args, **{**kwargs, "disable": True})

    swapped = []
    if not progress:
        for name in ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface"):
            module = importlib.import_module(name)
            if hasattr(module, "tqdm"):
                swapped.append((module, module.tqdm))
                module.tqdm = silent
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
        for module, original in swapped:
            module.tqdm = original


def make_lm(model: Any, tokenizer=None, backend: str | None = None, batch_size: int = 16,
            max_length: int | None = None, n_ctx: int = 2048):
    """The lm-eval LM for `model`: a torch module ('hf' or 'mpt'), or a .gguf path / llama_cpp.Llama."""
    is_gguf = isinstance(model, (str, Path)) and str(model).endswith(".gguf")
    is_llama = type(model).__name__ == "Llama" and hasattr(model, "tokenize")
    backend = backend or ("llamacpp" if is_gguf or is_llama else "hf")
    if backend not in BACKENDS:
        raise MPTError(f"unknown downstream backend {backend!r}", f"choose one of: {', '.join(BACKENDS)}")
    if backend == "llamacpp":
        if not (is_gguf or is_llama):
            raise MPTError("backend='llamacpp' scores GGUF files", "pass a .gguf path or a llama_cpp.Llama")
        return LlamaCppScorer(load_llama(model, n_ctx=n_ctx) if is_gguf else model)
    if is_gguf or is_llama or not isinstance(model, torch.nn.Module):
        raise MPTError(f"backend={backend!r} needs an in-memory torch model, got {type(model).__name__}",
                       "pass the torch model with its tokenizer, or backend='llamacpp' for a .gguf file")
    if tokenizer is None:
        raise MPTError("a torch model needs its tokenizer", "pass tokenizer=loaded.tokenizer")
    if backend == "mpt":
        return TorchScorer(model, tokenizer, batch_size=batch_size, max_length=max_length)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _chance(samples: list[dict[str, Any]]) -> float:
    """Mean of 1 / (number of choices) over the scored items: the uniform-guess accuracy."""
    sizes = [len(s.get("arguments") or []) for s in samples]
    sizes = [k for k in sizes if k > 0]
    return float(np.mean([1.0 / k for k in sizes])) if sizes else math.nan


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name) or []
    return [leaf for c in children for leaf in _leaves(c, group_subtasks)] if children else [name]


def result_rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (task, metric, value, stderr, n, chance, level) from lm-eval's results dict."""
    samples = out.get("samples") or {}
    n_samples = out.get("n-samples") or {}
    groups = out.get("group_subtasks") or {}
    rows = []
    for task, metrics in out["results"].items():
        leaves = _leaves(task, groups)
        leaf_samples = [s for leaf in leaves for s in samples.get(leaf, [])]
        n = sum(int((n_samples.get(leaf) or {}).get("effective", len(samples.get(leaf, [])))) for leaf in leaves)
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                         "n": n, "chance": _chance(leaf_samples) if metric.startswith("acc") else math.nan,
                         "level": "group" if task in groups and groups[task] else "task"})
    return rows


def evaluate_downstream(model: Any, tokenizer=None, tasks: str | Sequence[str] = OFFLINE_SUITE,
                        num_fewshot: int | None = None, limit: int | float | None = None,
                        batch_size: int = 16, backend: str | None = None, seed: int = 0,
                        max_length: int | None = None, progress: bool = False,
                        isolate: bool = True) -> list[dict[str, Any]]:
    """Accuracy of `model` on lm-eval tasks, as tidy rows (task, metric, value, stderr, n, chance, ...).

    model: an in-memory torch causal LM (with `tokenizer`), a `.gguf` path or a `llama_cpp.Llama`.
    tasks: lm-eval names; 'mpt_offline' is the offline suite; standard ones need the hub.
    num_fewshot: None keeps each task's default (0 for the offline suite). limit: items per task.
    backend: 'hf' (lm-eval's HFLM, default for torch), 'mpt' (our faster torch scorer), 'llamacpp'.
    isolate: a `.gguf` path is scored by llama.cpp in a child process (`mpt_utils.native`), so a native
    crash becomes an MPTError naming the signal and the file instead of killing the caller.
    """
    offline, standard = resolve_tasks(tasks)
    is_gguf = isinstance(model, (str, Path)) and str(model).endswith(".gguf")
    if is_gguf and isolate and backend in (None, "llamacpp") and not in_child():
        if not Path(model).is_file():
            raise MPTError(f"GGUF file {model} does not exist", "pass an existing .gguf path")
        return run_isolated("mpt_utils.eval.downstream:evaluate_downstream",
                            {"model": str(model), "tasks": offline + standard, "num_fewshot": num_fewshot,
                             "limit": limit, "batch_size": batch_size, "backend": "llamacpp", "seed": seed,
                             "max_length": max_length, "progress": progress, "isolate": False},
                            what=str(model), show_output=progress)
    lm = make_lm(model, tokenizer, backend, batch_size=batch_size, max_length=max_length)
    if isinstance(lm, _ScorerLM):
        lm.show_progress = progress
    import lm_eval

    manager = _task_manager(bool(standard))
    start = time.perf_counter()
    with _quiet_lm_eval(progress):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=offline + standard, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=True, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    rows = result_rows(out)
    n_items = sum(r["n"] for r in rows if r["metric"] == "acc" and r["level"] == "task")
    name = type(lm).__name__
    used = {"HFLM": "hf", "TorchScorer": "mpt", "LlamaCppScorer": "llamacpp"}.get(name, name)
    shots = out.get("n-shot") or {}
    for r in rows:
        r.update(backend=used, num_fewshot=shots.get(r["task"], num_fewshot), limit=limit,
                 run_seconds=seconds, run_items=n_items)
    if progress:
        print(f"[downstream] {n_items} items in {seconds:.1f} s with {used} ({n_items / seconds:.1f} items/s)")
    return rows


def downstream_rows(store, base_config: dict[str, Any], model: Any, tokenizer=None,
                    tasks: str | Sequence[str] = OFFLINE_SUITE, **kwargs) -> list[dict[str, Any]]:
    """`evaluate_downstream` per task through the results store (one point per task, so reruns resume).
    `base_config` describes the model (model, method, family, ratio, bits, seed, ...); the model is only
    used for tasks not stored yet, so pass a loader `lambda: (model, tokenizer)` to skip loading too."""
    offline, standard = resolve_tasks(tasks)
    rows: list[dict[str, Any]] = []
    loaded: tuple[Any, Any] | None = None
    settings = {k: kwargs.get(k) for k in ("num_fewshot", "limit", "backend", "max_length")}
    for task in offline + standard:
        config = {**base_config, "eval": "downstream", "task": task, **settings}

        def compute(task=task):
            nonlocal loaded
            if loaded is None:
                loaded = model() if callable(model) and not isinstance(model, torch.nn.Module) else (model, tokenizer)
            return evaluate_downstream(loaded[0], loaded[1], [task], **kwargs)

        rows.extend(store.get_or_compute(config, compute))
    return rows
