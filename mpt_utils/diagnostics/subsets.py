"""Which facts survive compression: per-prompt answers, failure / robust subsets, ParaRel metrics.

A prompt is answered correctly when the answer's first token is the model's top next-token
prediction. Failure subset: prompts the dense model answers and the compressed one does not;
robust subset: prompts both answer. ParaRel-style consistency per fact, over its paraphrases:
at least one correct, a strict majority correct, all correct.
"""

from __future__ import annotations

import pandas as pd
from torch import nn

from mpt_utils.diagnostics.metrics import answer_prob, answer_rank
from mpt_utils.diagnostics.prompts import PromptBatch
from mpt_utils.diagnostics.runner import Trace, trace

SUBSETS = ("failure", "robust", "dense_wrong_comp_right", "both_wrong")


def answer_table(dense: nn.Module, compressed: nn.Module, batch: PromptBatch,
                 traces: tuple[Trace, Trace] | None = None) -> pd.DataFrame:
    """One row per prompt: the fact, the paraphrase, answer probability / rank / correctness under
    the dense and the compressed model, and the subset the prompt falls in."""
    td, tc = traces or (trace(dense, batch, attention=False), trace(compressed, batch, attention=False))
    rows = []
    cols = {}
    for kind, tr in (("dense", td), ("comp", tc)):
        cols[f"{kind}_prob"] = answer_prob(tr.logits, batch.answer_ids).tolist()
        cols[f"{kind}_rank"] = answer_rank(tr.logits, batch.answer_ids).tolist()
    for i, p in enumerate(batch.prompts):
        d_ok, c_ok = cols["dense_rank"][i] == 1, cols["comp_rank"][i] == 1
        subset = SUBSETS[0] if d_ok and not c_ok else SUBSETS[1] if d_ok else SUBSETS[2] if c_ok else SUBSETS[3]
        rows.append({"index": i, "fact_id": p.fact_id, "relation": p.relation, "subject": p.subject,
                     "answer": p.answer, "paraphrase": p.paraphrase, "prompt": p.prompt,
                     "dense_prob": cols["dense_prob"][i], "dense_rank": int(cols["dense_rank"][i]),
                     "dense_correct": bool(d_ok), "comp_prob": cols["comp_prob"][i],
                     "comp_rank": int(cols["comp_rank"][i]), "comp_correct": bool(c_ok), "subset": subset})
    return pd.DataFrame(rows)


def subset_indices(table: pd.DataFrame, subset: str) -> list[int]:
    """Batch indices of the prompts in one subset of an `answer_table`."""
    return table.loc[table.subset == subset, "index"].astype(int).tolist()


def pararel_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Per model (dense / compressed) and relation: facts, prompt accuracy, and the share of facts with
    ≥ 1 paraphrase correct, a strict majority correct, and all paraphrases correct."""
    rows = []
    for kind, col in (("dense", "dense_correct"), ("compressed", "comp_correct")):
        for relation, part in table.groupby("relation", sort=True):
            per_fact = part.groupby("fact_id")[col].agg(["sum", "count"])
            rows.append({"model_kind": kind, "relation": relation, "n_facts": len(per_fact),
                         "prompt_accuracy": float(part[col].mean()),
                         "any_correct": float((per_fact["sum"] >= 1).mean()),
                         "majority_correct": float((per_fact["sum"] > per_fact["count"] / 2).mean()),
                         "all_correct": float((per_fact["sum"] == per_fact["count"]).mean())})
    return pd.DataFrame(rows)
