"""Pruned linear layers that run the CPU sparse kernels where, and only where, they are faster.

`CSRWeight` holds one pruned matrix in CSR form for the kernels in `kernels/native.py`, with a measured
switch (layers/switch.py): for n tokens it runs the sparse kernel only if that measured faster than the
dense `F.linear` on the same shape and density. `SparseLinear` keeps the dense weight as its fallback; its
state dict is an ordinary linear layer's, so it is saved as one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from .linear import AcceleratedLinearKind, LinearKind
from .protocol import AccelerateContext, register, register_converter, tensor_bytes
from .switch import ALWAYS, SWITCH_BATCH_SIZES, SwitchCache, Switched

MIN_SPARSITY = 0.2  # below this a CSR product cannot beat dense (bench --kernel: 1.0x at 30%)

__all__ = ["CSRWeight", "MIN_SPARSITY", "SWITCH_BATCH_SIZES", "SparseLinear", "SwitchCache", "csr_candidate",
           "prepare_csr", "sparse_product", "to_sparse_linear"]


class CSRWeight(Switched):
    """A (rows x cols) fp32 matrix as int64 row pointers, 16- or 32-bit column indices and values."""

    def __init__(self, dense: torch.Tensor):
        super().__init__()
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
        return tensor_bytes(self.rowptr, self.col, self.values)

    def use_sparse(self, tokens: int) -> bool:
        return self.use_fast(tokens)

    def to_dense(self) -> torch.Tensor:
        """The matrix back, exactly (for the dense products of a layer that keeps only this copy)."""
        columns = self.col.to(torch.int64)
        if self.col.dtype == torch.int16:
            columns = columns & 0xFFFF  # uint16 bits stored in int16
        rows = torch.repeat_interleave(torch.arange(self.rows), self.rowptr.diff())
        dense = torch.zeros(self.rows, self.cols, dtype=torch.float32)
        dense[rows, columns] = self.values
        return dense

    def bytes_at_one_token(self, dense: torch.Tensor) -> int:
        """Weight bytes one token reads: the CSR arrays when the kernel runs at one token, else the matrix."""
        return self.nbytes if self.use_sparse(1) else tensor_bytes(dense)

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


def apply_switch(cache: SwitchCache, csr: CSRWeight, dense: torch.Tensor) -> None:
    """The measured decision for this shape and density (shared by the layers that have them)."""
    weight = dense.detach().to(torch.float32).contiguous()
    cache.decide(csr, ("csr", csr.rows, csr.cols, round(csr.density, 2)), fast=csr.matmul,
                 dense=lambda x: F.linear(x, weight), cols=csr.cols)


def csr_candidate(weight: torch.Tensor) -> bool:
    """fp32 on the CPU and sparse enough for the kernel to have a chance."""
    return (weight.dtype == torch.float32 and weight.device.type == "cpu"
            and 1 - torch.count_nonzero(weight).item() / weight.numel() >= MIN_SPARSITY)


def prepare_csr(weight: torch.Tensor, context: AccelerateContext) -> CSRWeight:
    csr = CSRWeight(weight)
    if context.mode == "always":
        csr.switch = ALWAYS
    else:
        apply_switch(context.switches, csr, weight)
    return csr


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
        return (f"{super().extra_repr()}, density={self.csr.density:.3f}, "
                f"sparse kernel at tokens={self.csr.fast_sizes() or 'never'}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.csr.use_sparse(x.numel() // self.in_features):
            return F.linear(x, self.weight, self.bias)  # the fallback costs no more than nn.Linear
        flat = x.reshape(-1, self.in_features)
        return sparse_product(self.csr, flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)


def to_sparse_linear(module: nn.Linear, context: AccelerateContext) -> SparseLinear | None:
    """The CPU path for a pruned fp32 linear layer, or None when it does not apply."""
    if not context.cpu_kernels or not csr_candidate(module.weight):
        return None
    return SparseLinear(module, prepare_csr(module.weight, context))


class SparseLinearKind(AcceleratedLinearKind):
    name = "sparse_linear"
    types = (SparseLinear,)

    def bytes_per_token(self, module: SparseLinear) -> float:
        return float(module.csr.bytes_at_one_token(module.weight) + tensor_bytes(module.bias))

    def fast_paths(self, module: SparseLinear) -> list:
        return [module.csr]


# Tried before the GPU 2:4 form (semi_structured.py, priority 10), as it always was; the two never both apply
# (fp32 on the CPU here, fp16/bf16 on CUDA there).
CSR_CONVERTER_PRIORITY = 20

register(SparseLinearKind())
register_converter(LinearKind.name, "csr", to_sparse_linear, priority=CSR_CONVERTER_PRIORITY)
