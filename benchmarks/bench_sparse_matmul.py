"""Does unstructured sparsity make inference faster? Dense vs sparse matmul, side by side in one run.

The question of "Flash-LLM: Enabling Cost-Effective and Highly-Efficient Large Generative Model
Inference with Unstructured Sparsity" (Xia et al., arXiv:2309.10285, github.com/AlibabaResearch/
flash-llm): pruned weights only save time when a kernel skips them. Flash-LLM's own kernel is CUDA
(tensor cores, "load as sparse, compute as dense"); here we measure what a user of this suite gets
without it:
- one decoder linear of the model (its MLP down projection, the real weight, magnitude-pruned
  unstructured to 50 % and 70 % per row) as a dense matmul vs `torch.sparse` CSR matmul on the CPU,
  for a decode-sized input (16 tokens, the skinny case Flash-LLM targets) and a prefill-sized one;
- the whole model's prefill with every decoder linear stored as CSR vs dense (embedded profile);
- 2:4 semi-structured sparsity (`torch.sparse.to_sparse_semi_structured`, sparse tensor cores) on a
  CUDA GPU of compute capability >= 8.0, else a row saying why it is not available on this device.
Each ratio is dense time / sparse time (> 1: sparsity is faster), from the best of interleaved rounds.
Results are checked for equality with the dense matmul of the same pruned weight, never timed in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from mpt_utils.models import load_model
from mpt_utils.prune.measure import block_linears
from mpt_utils.reproduce import load_profile
from mpt_utils.store import ResultsStore

SPARSITIES = (0.5, 0.7)
TOKENS = {"decode": 16, "prefill": 512}
ROUNDS = {"embedded": 5}


def magnitude_prune_rows(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`weight` with the smallest-|w| fraction `sparsity` of every row set to zero (unstructured)."""
    k = int(weight.shape[1] * sparsity)
    if k == 0:
        return weight.clone()
    idx = weight.abs().argsort(dim=1)[:, :k]
    return weight.clone().scatter_(1, idx, 0.0)


def csr_matmul(w_csr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ Wᵀ with W in CSR ([out, in]) and x [tokens, in]: the sparse operand must come first."""
    return (w_csr @ x.t()).t()


class CSRLinear(nn.Module):
    """A linear layer whose weight is stored as a CSR tensor (zeros skipped by the kernel)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight_csr = lin.weight.detach().to_sparse_csr()
        self.bias = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = csr_matmul(self.weight_csr, flat)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time of each function over `rounds` interleaved rounds (after one warm-up call)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def semi_structured_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device (2:4 sparse tensor cores need an NVIDIA GPU of compute capability >= 8.0)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores"
    return True, f"cuda {torch.cuda.get_device_name()} (sm_{major}{minor})"


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (the 2:4 pattern)."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    idx = groups.abs().argsort(dim=-1)[..., :2]
    return groups.clone().scatter_(-1, idx, 0.0).reshape_as(weight)


def linear_rows(weight: torch.Tensor, rounds: int) -> list[dict]:
    """Dense vs CSR matmul of one pruned weight, per sparsity and input size (CPU, fp32)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for sparsity in SPARSITIES:
        w = magnitude_prune_rows(weight.float(), sparsity)
        w_csr = w.to_sparse_csr()
        for mode, n in TOKENS.items():
            x = torch.randn(n, w.shape[1], generator=gen)
            same = torch.allclose(csr_matmul(w_csr, x), x @ w.t(), atol=1e-4, rtol=1e-4)
            t = _best({"dense": lambda x=x, w=w: x @ w.t(), "sparse": lambda x=x, c=w_csr: csr_matmul(c, x)}, rounds)
            rows.append({"metric": "dense_over_sparse", "value": t["dense"] / t["sparse"], "what": "linear",
                         "kernel": "torch.sparse CSR (CPU)", "sparsity": sparsity, "mode": mode, "tokens": n,
                         "shape": list(w.shape), "seconds_dense": t["dense"], "seconds_sparse": t["sparse"],
                         "same_result": bool(same)})
    ok, why = semi_structured_available()
    if not ok:
        rows.append({"metric": "dense_over_sparse", "value": None, "what": "linear", "kernel": "2:4 semi-structured",
                     "sparsity": 0.5, "mode": "prefill", "available": False, "reason": f"not available on this device: {why}"})
        return rows
    from torch.sparse import to_sparse_semi_structured

    w = two_four(weight.float()).half().cuda()
    w_24 = to_sparse_semi_structured(w)
    for mode, n in TOKENS.items():
        x = torch.randn(max(n, 32), w.shape[1], dtype=torch.half, device="cuda")  # kernels need >= 32 rows

        def dense(x=x):
            torch.nn.functional.linear(x, w)
            torch.cuda.synchronize()

        def sparse(x=x):
            torch.nn.functional.linear(x, w_24)
            torch.cuda.synchronize()

        same = torch.allclose(torch.nn.functional.linear(x, w_24), torch.nn.functional.linear(x, w), atol=1e-2, rtol=1e-2)
        t = _best({"dense": dense, "sparse": sparse}, rounds * 4)
        rows.append({"metric": "dense_over_sparse", "value": t["dense"] / t["sparse"], "what": "linear",
                     "kernel": "2:4 semi-structured", "sparsity": 0.5, "mode": mode, "tokens": int(x.shape[0]),
                     "shape": list(w.shape), "seconds_dense": t["dense"], "seconds_sparse": t["sparse"],
                     "available": True, "reason": why, "same_result": bool(same)})
    return rows


def sparsify_model(model: nn.Module, sparsity: float) -> None:
    """Magnitude-prune every decoder linear in place (dense storage, zeros kept)."""
    with torch.no_grad():
        for linears in block_linears(model):
            for lin in linears.values():
                lin.weight.copy_(magnitude_prune_rows(lin.weight, sparsity))


def to_csr_model(model: nn.Module) -> None:
    """Swap every decoder linear for a CSRLinear holding the same (pruned) weight."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f"{name}.":
                setattr(mod, child_name, CSRLinear(child))


def model_rows(model: nn.Module, seqlen: int, rounds: int) -> list[dict]:
    """Prefill of the whole model: dense weights with zeros vs the same weights as CSR."""
    import copy

    rows = []
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    for sparsity in SPARSITIES:
        dense = copy.deepcopy(model)
        sparsify_model(dense, sparsity)
        sparse = copy.deepcopy(dense)
        to_csr_model(sparse)
        with torch.no_grad():
            ref, got = dense(input_ids=ids).logits, sparse(input_ids=ids).logits
            # 30 blocks of float32 sums in another order: compare at the logits' own scale
            diff = float((got - ref).abs().max())
            same = diff <= 1e-4 * float(ref.abs().max()) + 1e-3

            def run(m):
                return lambda: m(input_ids=ids, use_cache=False)

            t = _best({"dense": run(dense), "sparse": run(sparse)}, rounds)
        rows.append({"metric": "dense_over_sparse", "value": t["dense"] / t["sparse"], "what": "model_prefill",
                     "kernel": "torch.sparse CSR (CPU)", "sparsity": sparsity, "mode": "prefill", "tokens": seqlen,
                     "seconds_dense": t["dense"], "seconds_sparse": t["sparse"], "same_result": bool(same),
                     "max_abs_logit_diff": diff})
        del dense, sparse
    return rows


def main(profile: str, store: ResultsStore) -> None:
    common = load_profile(profile)["common"]
    model_name = common["model"]
    rounds = ROUNDS.get(profile, 10)
    seqlen = min(int(common["seqlen"]), TOKENS["prefill"])
    cfg = {"model": model_name, "method": "sparse_matmul_speed", "version": 2, "family": "bench", "ratio": None, "bits": None,
           "seed": 0, "sparsities": list(SPARSITIES), "tokens": TOKENS, "threads": torch.get_num_threads(),
           "device": "cpu", "rounds": rounds, "cuda_24": semi_structured_available()[0]}

    def compute():
        model = load_model(model_name, device="cpu").model.eval()
        weight = block_linears(model)[0]["mlp.down_proj"].weight.detach()
        rows = linear_rows(weight, rounds)
        if profile == "embedded":  # the whole-model prefill is cheap only for the small model
            rows += model_rows(model, seqlen, max(2, rounds // 2))
        return rows

    for row in store.get_or_compute(cfg, compute):
        if row.get("value") is None:
            print(f"  {row['kernel']}: {row['reason']}")
            continue
        print(f"  {row['what']:13s} {row['kernel']:24s} {row['sparsity']:.0%} {row['mode']:7s} ({row['tokens']} tokens): "
              f"dense {row['seconds_dense'] * 1e3:.2f} ms vs sparse {row['seconds_sparse'] * 1e3:.2f} ms -> "
              f"dense/sparse = {row['value']:.2f} (same result: {row['same_result']})")
