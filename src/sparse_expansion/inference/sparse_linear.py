"""Pruned linear layers that run the CPU sparse kernels where, and only where, they are faster.

`CSRWeight` holds one pruned matrix in CSR form for `native.py`'s kernels. Whether a product with n
tokens uses the sparse kernel or the dense `F.linear` is decided by measurement: `measure_switch`
times both on the layer's own weights for n = 1, 2, 4, ... and the layer then takes, for n tokens, the
faster of the two at the smallest measured size >= n. Layers of the same shape and density share one
measurement (a model has only a few distinct shapes).

`enable_sparse_kernels(model)` applies this to every pruned linear layer of the decoder blocks (plain
`nn.Linear` layers become `SparseLinear`, which keeps the dense weight as its fallback) and to every
expert of every `ExpertLinear`. It is for inference: with gradients enabled, on another device or dtype,
layers fall back to the dense path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .timing import paired_medians_ms

SWITCH_BATCH_SIZES = tuple(2 ** i for i in range(12))  # 1 .. 2048 tokens
MIN_SPARSITY = 0.2  # below this a CSR product cannot beat dense (bench --kernel: 1.0x at 30%)


class CSRWeight:
    """A (rows x cols) fp32 matrix as int64 row pointers, 16- or 32-bit column indices and values."""

    def __init__(self, dense: torch.Tensor):
        if dense.dim() != 2:
            raise ValueError("CSRWeight needs a 2-D weight")
        weight = dense.detach().to("cpu", torch.float32).contiguous()
        self.rows, self.cols = weight.shape
        nonzero = weight != 0
        self.rowptr = torch.zeros(self.rows + 1, dtype=torch.int64)
        torch.cumsum(nonzero.sum(1), 0, out=self.rowptr[1:])
        columns = nonzero.nonzero()[:, 1]
        if native.index_dtype(self.cols) == torch.int16:
            columns = torch.where(columns >= 1 << 15, columns - (1 << 16), columns)  # uint16 bits in int16
        self.col = columns.to(native.index_dtype(self.cols)).contiguous()
        self.values = weight[nonzero].contiguous()
        self.suffix = native.index_suffix(self.cols)
        self.switch = []  # (tokens, sparse is faster), filled by measure_switch
        self._pointers = (self.rowptr.data_ptr(), self.col.data_ptr(), self.values.data_ptr())
        self._functions = None  # the library's two entry points, looked up at the first product

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.rows * self.cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.col, self.values))

    @property
    def switch(self) -> list[tuple[int, bool]]:
        return self._switch

    @switch.setter
    def switch(self, decisions: list[tuple[int, bool]]) -> None:
        self._switch = list(decisions)
        self._sizes = [size for size, _ in self._switch]
        # Decoding asks about one token ~100 times per generated token: answer that from a field.
        self.sparse_at_one_token = self._lookup(1)

    def _lookup(self, tokens: int) -> bool:
        if not self._switch:
            return False
        return self._switch[min(bisect.bisect_left(self._sizes, tokens), len(self._sizes) - 1)][1]

    def use_sparse(self, tokens: int) -> bool:
        return self.sparse_at_one_token if tokens == 1 else self._lookup(tokens)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (tokens x cols) fp32 contiguous CPU -> x W^T + bias (tokens x rows)."""
        if self._functions is None:
            lib = native.library()
            self._functions = (lib.matvec[self.suffix], lib.matmul[self.suffix])
        tokens = x.shape[0]
        out = torch.empty(tokens, self.rows, dtype=torch.float32)
        rowptr, col, values = self._pointers
        bias_ptr = None if bias is None else bias.data_ptr()
        if tokens == 1:
            self._functions[0](self.rows, rowptr, col, values, x.data_ptr(), bias_ptr, out.data_ptr())
        elif self._functions[1](self.rows, self.cols, tokens, rowptr, col, values, x.data_ptr(), bias_ptr,
                                out.data_ptr()):
            raise MemoryError("sparse kernel could not allocate its token buffer")
        return out


def measure_switch(csr: CSRWeight, dense: torch.Tensor, batch_sizes=SWITCH_BATCH_SIZES, repeats: int = 7,
                   seed: int = 0) -> list[tuple[int, bool, float, float]]:
    """Time dense and sparse products for each batch size; returns (tokens, sparse faster, dense s, sparse s).

    Dense and sparse runs alternate, one call each per round, and each keeps its median, so a busy
    machine slows both alike.
    """
    generator = torch.Generator().manual_seed(seed)
    dense = dense.detach().to(torch.float32).contiguous()
    rows = []
    for tokens in batch_sizes:
        x = torch.randn(tokens, csr.cols, generator=generator)
        medians = paired_medians_ms({"dense": lambda: F.linear(x, dense), "sparse": lambda: csr.matmul(x)},
                                    min_run_time=0.0, block_seconds=0.0, min_rounds=repeats)
        dense_s, sparse_s = medians["dense"] * 1e-3, medians["sparse"] * 1e-3
        rows.append((tokens, sparse_s < dense_s, dense_s, sparse_s))
    return rows


@dataclass
class SwitchCache:
    """One measurement per (shape, density to 1%, threads): layers that share these share the switch."""

    batch_sizes: tuple[int, ...] = SWITCH_BATCH_SIZES
    repeats: int = 7
    measured: dict = field(default_factory=dict)

    def apply(self, csr: CSRWeight, dense: torch.Tensor) -> None:
        key = (csr.rows, csr.cols, round(csr.density, 2), torch.get_num_threads())
        if key not in self.measured:
            self.measured[key] = measure_switch(csr, dense, self.batch_sizes, self.repeats)
        csr.switch = [(tokens, faster) for tokens, faster, _, _ in self.measured[key]]


def sparse_product(csr: CSRWeight | None, x2d: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x2d W^T + b through the sparse kernel when measured faster for this many tokens, else dense.

    The kernel only serves fp32 CPU inference; anything else (gradients, other dtypes) goes dense.
    """
    if (csr is not None and csr.use_sparse(x2d.shape[0]) and x2d.dtype == torch.float32
            and not x2d.is_cuda and not torch.is_grad_enabled()):
        return csr.matmul(x2d.contiguous(), bias)
    return F.linear(x2d, weight, bias)


class SparseLinear(nn.Linear):
    """An `nn.Linear` whose forward uses a CSR copy of its (pruned) weight when that is faster.

    The dense `weight` stays: it is the fallback, and state dicts, saving and cost accounting see an
    ordinary linear layer.
    """

    def __init__(self, linear: nn.Linear, csr: CSRWeight):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.csr = csr

    def extra_repr(self) -> str:
        sparse_sizes = [tokens for tokens, faster in self.csr.switch if faster]
        return (f"{super().extra_repr()}, density={self.csr.density:.3f}, "
                f"sparse kernel at tokens={sparse_sizes or 'never'}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.csr.use_sparse(x.numel() // self.in_features):
            return F.linear(x, self.weight, self.bias)  # the fallback costs no more than nn.Linear
        flat = x.reshape(-1, self.in_features)
        return sparse_product(self.csr, flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)
