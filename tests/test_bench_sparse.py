"""The sparse-matmul benchmark computes what the dense matmul computes (its speed is never asserted)."""

import torch

from benchmarks.bench_sparse_matmul import (
    CSRLinear,
    csr_matmul,
    magnitude_prune_rows,
    semi_structured_available,
    two_four,
)


def test_pruning_patterns_are_exact():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.5, 0.7):
        pruned = magnitude_prune_rows(w, sparsity)
        assert ((pruned == 0).sum(1) == int(32 * sparsity)).all()
        kept = pruned != 0
        for r in range(8):
            assert w[r].abs()[kept[r]].min() >= w[r].abs()[~kept[r]].max()
    assert ((two_four(w).reshape(8, -1, 4) == 0).sum(-1) == 2).all()


def test_csr_matmul_equals_the_dense_matmul():
    gen = torch.Generator().manual_seed(1)
    w = magnitude_prune_rows(torch.randn(48, 64, generator=gen), 0.7)
    x = torch.randn(16, 64, generator=gen)
    torch.testing.assert_close(csr_matmul(w.to_sparse_csr(), x), x @ w.t(), atol=1e-5, rtol=1e-5)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
    x3 = torch.randn(2, 5, 64, generator=gen)
    torch.testing.assert_close(CSRLinear(lin)(x3), lin(x3), atol=1e-5, rtol=1e-5)


def test_semi_structured_availability_says_why():
    ok, why = semi_structured_available()
    assert isinstance(ok, bool) and why
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in why
