"""lm-eval `custom_dataset` hook: the items come from mpt_utils, built on first use."""

from pathlib import Path


def load(mpt_task: str, **_):  # lm-eval also passes the task's metadata as keywords
    from datasets import Dataset, DatasetDict

    from mpt_utils.eval.offline_tasks import load_items

    return DatasetDict({"test": Dataset.from_list(load_items(mpt_task, Path(__file__).resolve().parent))})
