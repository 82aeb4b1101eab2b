"""Linear layers that keep a slice of a dense layer (MoDeGPT) or add a row-sparse part to a low-rank
one (LoSparse). Each stores only what it computes and exposes `dense_shape` (the [out, in] of the
layer it replaced), `stored_params` and `kept`, so `factorized.layer_reduction` measures its size
from its tensors like a `LowRankLinear`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ShrunkLinear(nn.Linear):
    """A plain, smaller nn.Linear standing in for a wider one (MoDeGPT's MLP: fewer neurons)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense_shape: tuple[int, int], kept: int):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                         dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.dense_shape, self.kept = tuple(dense_shape), int(kept)

    @property
    def stored_params(self) -> int:
        return self.weight.numel()


class ScatterLinear(nn.Module):
    """Computes only the output features `index` (weight [k, in]) and writes them into a zero vector of
    the dense width, so attention code that reshapes by head_dim keeps working; the zero features
    contribute nothing to q·k or to the attention output."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], int(out_features)
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("index", index.to(weight.device, torch.long), persistent=True)
        self.dense_shape, self.kept = (self.out_features, self.in_features), int(index.numel())

    @property
    def stored_params(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = F.linear(x, self.weight, self.bias)
        out = small.new_zeros(*small.shape[:-1], self.out_features)
        return out.index_copy(-1, self.index, small)


class GatherLinear(nn.Module):
    """Reads only the input features `index` (weight [out, k]): the dropped inputs are always zero."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("index", index.to(weight.device, torch.long), persistent=True)
        self.dense_shape, self.kept = (self.out_features, self.in_features), int(index.numel())

    @property
    def stored_params(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight, self.bias)


class LowRankSparseLinear(nn.Module):
    """LoSparse's W ≈ U·V + S with S row-sparse: `up` [out, r], `down` [r, in] and `sparse` [out, in].

    While training, S is a dense tensor whose pruned rows are zero; `compact()` then keeps only the
    non-zero rows (`sparse_rows` [k, in] and their indices), which is what the layer stores."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, sparse: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = sparse.shape
        self.rank = up.shape[1]
        self.up = nn.Parameter(up.detach().clone())
        self.down = nn.Parameter(down.detach().clone())
        self.sparse = nn.Parameter(sparse.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("rows", torch.arange(self.out_features, device=sparse.device), persistent=True)
        self.dense_shape = (self.out_features, self.in_features)

    @property
    def compacted(self) -> bool:
        return self.sparse.shape[0] != self.out_features or self.rows.numel() != self.out_features

    @property
    def kept_rows(self) -> int:
        return int(self.rows.numel()) if self.compacted else int((self.sparse.detach() != 0).any(1).sum())

    @property
    def kept(self) -> int:
        return self.rank

    @property
    def stored_params(self) -> int:
        """U and V plus the non-zero rows of S (their indices are a buffer, as a sparse format's are)."""
        return self.up.numel() + self.down.numel() + self.kept_rows * self.in_features

    @torch.no_grad()
    def compact(self) -> None:
        """Drop S's zero rows from storage (after the last pruning step)."""
        live = (self.sparse != 0).any(1).nonzero().flatten()
        self.rows = live.to(self.sparse.device)
        self.sparse = nn.Parameter(self.sparse[live].clone())

    def weight_approx(self) -> torch.Tensor:
        dense = self.up @ self.down
        return dense.index_add(0, self.rows, self.sparse) if self.compacted else dense + self.sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.down), self.up, self.bias)
        if not self.compacted:
            return y + F.linear(x, self.sparse)
        return y.index_add(-1, self.rows, F.linear(x, self.sparse))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
