"""Shared fixtures: tiny random models for unit tests, the embedded model once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OMP_NUM_THREADS, when set, wins (a test run beside other work on a small machine)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(4, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def embedded():
    """The embedded smollm2-135m (de-quantized fp32), loaded once: ~20 s on 2 cores."""
    from mpt_utils.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def tiny():
    from mpt_utils.testing import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file of numbered paragraphs for grid, build and CLI tests (a test module with
    its own corpus fixture overrides this one)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    paragraphs = [f"paragraph {i}: the quick brown fox jumps over the lazy dog, a stitch in time saves nine. " * 3
                  for i in range(12)]
    path.write_text("\n\n".join(paragraphs))
    return str(path)
