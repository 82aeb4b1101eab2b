"""Downstream evaluation: the offline lm-eval suite, our scorers against lm-eval's HFLM, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpt_utils.errors import MPTError
from mpt_utils.eval import downstream
from mpt_utils.eval.downstream import (
    OFFLINE_SUITE,
    LlamaCppScorer,
    TorchScorer,
    downstream_rows,
    evaluate_downstream,
)
from mpt_utils.eval.offline_tasks import build_offline_tasks, load_items
from mpt_utils.testing import tiny_model

SIZES = {"mpt_capital_common_countries": 23, "mpt_capital_world": 116, "mpt_currency": 30,
         "mpt_city_in_state": 66, "mpt_grammar_analogy": 360}


def _requests(per_task: int = 3) -> list:
    """lm-eval Instances for a few items of every offline task, plus HFLM's edge cases."""
    from lm_eval.api.instance import Instance

    reqs = []
    for task in OFFLINE_SUITE:
        for item in load_items(task)[:per_task]:
            reqs += [Instance("loglikelihood", item, (item["query"], " " + c), 0) for c in item["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", "an empty context"), 0))  # scored after the prefix token
    reqs.append(Instance("loglikelihood", {}, ("trailing spaces  ", "move"), 0))
    reqs.append(Instance("loglikelihood", {}, ("x" * 700, " truncated on the left"), 0))  # > max_length
    return reqs


def test_offline_suite_is_deterministic_and_documented(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_offline_tasks(a)
    build_offline_tasks(b, force=True)
    for task, size in SIZES.items():
        text = (a / "data" / f"{task}.jsonl").read_text()
        assert text == (b / "data" / f"{task}.jsonl").read_text()
        items = [json.loads(line) for line in text.splitlines()]
        assert len(items) == size
        for item in items:
            assert len(set(item["choices"])) == 4 and item["choices"][item["gold"]] == item["answer"]
    assert json.loads((a / "data" / "manifest.json").read_text())["sizes"] == SIZES
    greece = next(i for i in load_items("mpt_capital_world") if i["subject"] == "Greece")
    assert greece["query"] == "The capital of Greece is" and greece["answer"] == "Athens"


def test_offline_tasks_load_through_lm_eval_task_manager(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(build_offline_tasks(tmp_path)), include_defaults=False)
    loaded = manager.load(["mpt_offline"])["tasks"]
    assert {name: len(task.eval_docs) for name, task in loaded.items()} == SIZES
    task = loaded["mpt_currency"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == doc["query"] and task.doc_to_choice(doc) == doc["choices"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_torch_scorer_matches_lm_eval_hflm(arch):
    from lm_eval.models.huggingface import HFLM

    loaded = tiny_model(arch)
    reqs = _requests()
    ref = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8).loglikelihood(reqs, True)
    ours = TorchScorer(loaded.model, loaded.tokenizer, batch_size=8).loglikelihood(reqs, True)
    assert np.abs(np.array([r[0] for r in ref]) - np.array([o[0] for o in ours])).max() < 1e-4
    assert [r[1] for r in ref] == [o[1] for o in ours]


class _TorchLlama:
    """The slice of llama_cpp.Llama that the scorer uses, computed by a tiny torch model."""

    def __init__(self, loaded, n_ctx: int = 256):
        self.model, self.tok, self._n_ctx = loaded.model, loaded.tokenizer, n_ctx
        self.metadata = {"tokenizer.ggml.add_bos_token": "false"}
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)
        self.scores = np.zeros((n_ctx, loaded.model.config.vocab_size), dtype=np.single)
        self.n_tokens, self.evaluated = 0, 0

    def n_ctx(self):
        return self._n_ctx

    def token_bos(self):
        return self.tok.bos_token_id

    def token_eos(self):
        return self.tok.eos_token_id

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False):
        return self.tok.encode(text.decode("utf-8"), add_special_tokens=add_bos)

    def reset(self):
        self.n_tokens = 0

    @torch.no_grad()
    def eval(self, tokens):
        self.evaluated += len(tokens)
        self.input_ids[self.n_tokens : self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        ids = torch.tensor(self.input_ids[: self.n_tokens], dtype=torch.long)[None]
        self.scores[: self.n_tokens] = self.model(input_ids=ids).logits[0].numpy()


def test_llamacpp_scorer_follows_lm_eval_and_reuses_prefixes():
    loaded = tiny_model("llama")
    reqs = _requests()[:-1]  # the fake context is 256 tokens: leave the truncation case to HFLM above
    ref = TorchScorer(loaded.model, loaded.tokenizer).loglikelihood(reqs, True)
    fake = _TorchLlama(loaded)
    ours = LlamaCppScorer(fake).loglikelihood(reqs, True)
    assert np.abs(np.array([r[0] for r in ref]) - np.array([o[0] for o in ours])).max() < 1e-4
    total = sum(len(fake.tokenize(("".join(r.args)).encode(), add_bos=False)) for r in reqs)
    assert fake.evaluated < 0.6 * total  # the choices of an item share their context's KV cache


def test_tiny_random_model_scores_near_chance(capsys):
    loaded = tiny_model("llama")
    rows = evaluate_downstream(loaded.model, loaded.tokenizer, "mpt_offline", limit=60, backend="mpt")
    drawn = capsys.readouterr()
    assert "Tokenizing inputs" not in drawn.err + drawn.out  # no lm-eval bar without progress=True
    acc = [r for r in rows if r["metric"] == "acc"]
    assert {r["task"] for r in acc} == set(OFFLINE_SUITE)
    assert all(r["chance"] == pytest.approx(0.25) and r["n"] == min(60, SIZES[r["task"]]) for r in acc)
    pooled = sum(r["value"] * r["n"] for r in acc) / sum(r["n"] for r in acc)
    assert abs(pooled - 0.25) < 0.1
    assert all(np.isfinite(r["stderr"]) and r["backend"] == "mpt" for r in rows)


def test_hf_and_mpt_backends_give_the_same_rows():
    loaded = tiny_model("llama", seed=1)
    kw = dict(tasks=["mpt_currency", "mpt_capital_common_countries"], limit=12)
    hf = evaluate_downstream(loaded.model, loaded.tokenizer, backend="hf", **kw)
    mpt = evaluate_downstream(loaded.model, loaded.tokenizer, backend="mpt", **kw)
    assert [(r["task"], r["metric"], r["value"]) for r in hf] == [(r["task"], r["metric"], r["value"]) for r in mpt]


def test_unknown_task_lists_the_available_ones(tiny):
    with pytest.raises(MPTError) as err:
        evaluate_downstream(tiny.model, tiny.tokenizer, ["mpt_capital_wrold"])
    text = str(err.value)
    assert "mpt_capital_wrold" in text and "did you mean mpt_capital_world" in text
    assert all(name in text for name in (*OFFLINE_SUITE, "arc_easy", "mmlu"))


def test_standard_tasks_offline_fail_fast_naming_the_offline_suite(tiny, monkeypatch):
    monkeypatch.setattr("mpt_utils.models.hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(MPTError) as err:
        evaluate_downstream(tiny.model, tiny.tokenizer, ["arc_easy", "mpt_currency"])
    assert "unreachable" in str(err.value) and "mpt_offline" in str(err.value)


def test_bad_backend_and_missing_tokenizer_are_clear(tiny):
    with pytest.raises(MPTError, match="unknown downstream backend"):
        evaluate_downstream(tiny.model, tiny.tokenizer, "mpt_currency", backend="vllm")
    with pytest.raises(MPTError, match="tokenizer"):
        evaluate_downstream(tiny.model, None, "mpt_currency")


def test_downstream_rows_resume_from_the_store(tmp_path, monkeypatch, tiny):
    from mpt_utils.store import ResultsStore

    calls = []

    def fake(model, tokenizer, tasks, **kw):
        calls.append(tasks)
        return [{"task": tasks[0], "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 4, "chance": 0.25}]

    monkeypatch.setattr(downstream, "evaluate_downstream", fake)
    store = ResultsStore(tmp_path)
    base = {"model": "tiny-llama", "method": "dense", "family": "dense", "ratio": 0.0, "bits": None, "seed": 0}
    first = downstream_rows(store, base, lambda: (tiny.model, tiny.tokenizer), tasks=["mpt_currency", "mpt_city_in_state"])
    again = downstream_rows(store, base, lambda: (tiny.model, tiny.tokenizer), tasks=["mpt_currency", "mpt_city_in_state"])
    assert len(calls) == 2 and [r["value"] for r in again] == [r["value"] for r in first]
    frame = store.frame()
    assert set(frame["task"]) == {"mpt_currency", "mpt_city_in_state"} and set(frame["method"]) == {"dense"}


@pytest.mark.integration
def test_embedded_model_scorers_agree(embedded):
    """On the 135M model: our torch scorer equals HFLM to 1e-4; llama.cpp on the Q4_1 file itself is
    close to the de-quantized torch model (it quantizes activations to 8 bits inside its dot products)."""
    from lm_eval.models.huggingface import HFLM

    from mpt_utils.models import embedded_path

    reqs = _requests(per_task=2)[:-3]
    ref = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=8).loglikelihood(reqs, True)
    ours = TorchScorer(embedded.model, embedded.tokenizer, batch_size=8).loglikelihood(reqs, True)
    ref_ll, our_ll = np.array([r[0] for r in ref]), np.array([o[0] for o in ours])
    assert np.abs(ref_ll - our_ll).max() < 1e-4
    scored = downstream.gguf_loglikelihoods(embedded_path("smollm2-135m"), [r.args for r in reqs], n_ctx=256)
    cpp_ll = np.array([g[0] for g in scored])
    assert np.abs(cpp_ll - our_ll).mean() < 0.25
    same_pick = (cpp_ll.reshape(-1, 4).argmax(1) == our_ll.reshape(-1, 4).argmax(1)).mean()
    assert same_pick >= 0.8
