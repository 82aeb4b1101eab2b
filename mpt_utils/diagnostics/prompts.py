"""Factual-recall prompts with several paraphrases per fact, and their encoding into one batch.

Facts come from the same offline analogy file as the downstream suite (gensim's questions-words.txt,
see `mpt_utils.eval.offline_tasks`): "Athens Greece ..." becomes the fact (Greece, Athens), asked in
three paraphrases ("The capital of Greece is", "Greece's capital city is", ...). The answer token is
the first token of " <answer>", as in logit-lens and causal-tracing work.

A batch is right-padded: with causal attention, padding after a prompt cannot change any of its
positions, so no attention mask is needed and every real position is exactly what an unpadded run
computes.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpt_utils.errors import MPTError

# relation (questions-words section) -> (the file writes "answer subject", paraphrase templates over {x})
RELATIONS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "capital-common-countries": (True, ("The capital of {x} is", "{x}'s capital city is",
                                        "The capital city of {x} is called")),
    "capital-world": (True, ("The capital of {x} is", "{x}'s capital city is",
                             "The capital city of {x} is called")),
    "currency": (False, ("The currency of {x} is the", "The official currency of {x} is the",
                         "In {x}, people pay with the")),
    "city-in-state": (False, ("{x} is a city in the state of", "The city of {x} is located in the state of",
                              "{x} is in the US state of")),
}


@dataclass(frozen=True)
class FactPrompt:
    """One paraphrase of one fact: `prompt` should be completed by " " + `answer`."""

    fact_id: str
    relation: str
    subject: str
    answer: str
    paraphrase: int
    prompt: str


def relation_facts(relation: str) -> list[tuple[str, str]]:
    """(subject, answer) pairs of one relation, sorted; subjects with two answers in the file are dropped."""
    from mpt_utils.eval.offline_tasks import read_sections, source_file

    if relation not in RELATIONS:
        raise MPTError(f"unknown relation {relation!r}", f"choose from {', '.join(RELATIONS)}")
    answer_first, _ = RELATIONS[relation]
    answers: dict[str, set[str]] = defaultdict(set)
    for a, b, c, d in read_sections(source_file())[relation]:
        for x, y in ((a, b), (c, d)):
            x, y = (y, x) if answer_first else (x, y)
            answers[x].add(y)
    return sorted((x, next(iter(ys))) for x, ys in answers.items() if len(ys) == 1)


def factual_suite(relations: Sequence[str] = ("capital-common-countries",), n_facts: int | None = None,
                  seed: int = 0) -> list[FactPrompt]:
    """Every paraphrase of `n_facts` facts per relation (all facts when None), a seeded sample."""
    if n_facts is not None and (not isinstance(n_facts, int) or n_facts < 1):
        raise MPTError(f"n_facts={n_facts!r} is not a positive integer", "pass e.g. n_facts=16, or None for all")
    out = []
    for relation in relations:
        facts = relation_facts(relation)
        if n_facts is not None and n_facts < len(facts):
            facts = sorted(random.Random(f"mpt-diagnostics:{relation}:{seed}").sample(facts, n_facts))
        for subject, answer in facts:
            for k, template in enumerate(RELATIONS[relation][1]):
                out.append(FactPrompt(f"{relation}:{subject}", relation, subject, answer, k,
                                      template.format(x=subject)))
    return out


@dataclass
class PromptBatch:
    """Right-padded token ids [B, T], the real length of each prompt and its answer token."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    answer_ids: torch.Tensor
    prompts: list[FactPrompt]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def last(self) -> torch.Tensor:
        """Position of each prompt's last token: where the answer is predicted."""
        return self.lengths - 1

    def token_mask(self, skip_first: bool = True) -> torch.Tensor:
        """Bool [B, T]: real (non-pad) positions. The first position is left out by default: it is the
        attention sink, whose outlier norm would dominate any token statistic."""
        pos = torch.arange(self.input_ids.shape[1]).unsqueeze(0)
        mask = pos < self.lengths.unsqueeze(1)
        return mask & (pos >= 1) if skip_first else mask

    def subset(self, index: Sequence[int]) -> PromptBatch:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        if idx.numel() == 0:
            raise MPTError("an empty prompt subset cannot be run", "check the subset before diagnosing it")
        width = int(self.lengths[idx].max())
        return PromptBatch(self.input_ids[idx, :width], self.lengths[idx], self.answer_ids[idx],
                           [self.prompts[i] for i in idx.tolist()])

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(self.input_ids.to(device), self.lengths, self.answer_ids, self.prompts)


def answer_token(tokenizer, answer: str) -> int:
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MPTError(f"answer {answer!r} encodes to no token", "use a non-empty answer string")
    return int(ids[0])


def encode_prompts(tokenizer, prompts: Sequence[FactPrompt]) -> PromptBatch:
    """One right-padded batch of `prompts` with the first token of each answer."""
    if not prompts:
        raise MPTError("no prompts to encode", "build some with factual_suite()")
    ids = [tokenizer(p.prompt)["input_ids"] for p in prompts]
    if min(len(i) for i in ids) < 1:
        raise MPTError("a prompt encodes to no token", "drop empty prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(i) for i in ids)
    batch = torch.full((len(ids), width), int(pad), dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return PromptBatch(batch, torch.tensor([len(i) for i in ids]),
                       torch.tensor([answer_token(tokenizer, p.answer) for p in prompts]), list(prompts))
