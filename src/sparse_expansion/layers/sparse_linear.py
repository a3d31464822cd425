"""Pruned linear layers that run the CPU sparse kernels where, and only where, they are faster.

A pruned matrix is held in the form a decoded token reads the fewest bytes of (packed.choose_form): bitmask +
values in the layer's dtype (`packed.PackedWeight`; the codes of its grid for a `--bits` model) or, for fp32
above ~94% sparsity, CSR (`CSRWeight`). Each has a measured switch (layers/switch.py): for n tokens it runs the
sparse kernel only if that measured faster than the dense `F.linear` on the same shape, density and dtype.
`SparseLinear` keeps the dense weight as its fallback, and its state dict is an ordinary linear layer's, unless
it is compact (loaded for inference): then the sparse form is all it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..kernels import native
from .linear import AcceleratedLinearKind, LinearKind
from .packed import PackedWeight, choose_form, pack_rows
from .protocol import AccelerateContext, register, register_converter, register_holder, tensor_bytes
from .switch import ALWAYS, SWITCH_BATCH_SIZES, SwitchCache, Switched

MIN_SPARSITY = 0.2  # below this a sparse product cannot beat dense (bench --kernel)

__all__ = ["CSRWeight", "MIN_SPARSITY", "SWITCH_BATCH_SIZES", "SparseLinear", "SwitchCache", "prepare_csr",
           "sparse_candidate", "sparse_form", "sparse_product", "switch_kernel", "to_sparse_linear"]


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
        self.dtype, self.bits = torch.float32, None

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

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix back, exactly (for the dense products of a layer that keeps only this copy)."""
        columns = self.col.to(torch.int64)
        if self.col.dtype == torch.int16:
            columns = columns & 0xFFFF  # uint16 bits stored in int16
        rows = torch.repeat_interleave(torch.arange(self.rows), self.rowptr.diff())
        dense = torch.zeros(self.rows, self.cols, dtype=torch.float32)
        dense[rows, columns] = self.values
        return dense.to(dtype)

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


SPARSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernels' value and activation dtypes


def apply_switch(cache: SwitchCache, kernel, dense) -> None:
    """The measured decision for this form, shape, density and dtype (shared by the layers that have them).
    `dense`: the matrix, or a function that decodes it (called only when this key is measured)."""
    held = []

    def dense_product(x: torch.Tensor) -> torch.Tensor:
        if not held:
            held.append((dense() if callable(dense) else dense).detach().contiguous())
        return F.linear(x, held[0])

    form = "csr" if isinstance(kernel, CSRWeight) else f"bitmask{kernel.bits or ''}"
    cache.decide(kernel, (form, kernel.rows, kernel.cols, round(kernel.density, 2)), fast=kernel.matmul,
                 dense=dense_product, cols=kernel.cols, dtype=kernel.dtype)


def sparse_candidate(weight: torch.Tensor) -> bool:
    """On the CPU, in a dtype the kernels serve, and sparse enough for them to have a chance."""
    return (weight.dtype in SPARSE_DTYPES and weight.device.type == "cpu" and weight.dim() == 2 and weight.numel()
            and 1 - torch.count_nonzero(weight).item() / weight.numel() >= MIN_SPARSITY)


def sparse_form(weight: torch.Tensor, bits: int | None = None) -> CSRWeight | PackedWeight:
    """The form a decoded token reads the fewest bytes of (packed.choose_form): CSR or bitmask + values (the
    codes of its grid with `bits`)."""
    rows, cols = weight.shape
    nnz = int(torch.count_nonzero(weight))
    if choose_form(rows, cols, nnz, weight.dtype, bits) == "csr":
        return CSRWeight(weight)
    if bits is None:
        return PackedWeight.from_dense(weight)
    nonzero = weight != 0
    return PackedWeight.from_mask(pack_rows(nonzero.numpy()), weight[nonzero], rows, cols, weight.dtype, bits)


def switch_kernel(kernel, weight, context: AccelerateContext):
    """Give a kernel its switch: always, or measured against the dense product of `weight` (a matrix, or a
    function that decodes it)."""
    if context.mode == "always":
        kernel.switch = ALWAYS
    else:
        apply_switch(context.switches, kernel, weight)
    return kernel


def prepare_csr(weight: torch.Tensor, context: AccelerateContext, bits: int | None = None):
    return switch_kernel(sparse_form(weight, bits), weight, context)


def sparse_product(kernel, x2d: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x2d W^T + b through the sparse kernel when measured faster for this many tokens, else dense (`weight`, or
    the matrix decoded from the kernel's form when the layer holds no dense copy).

    The kernels serve CPU inference in their own dtype; anything else (gradients, another dtype) goes dense.
    """
    if (kernel is not None and kernel.use_sparse(x2d.shape[0]) and x2d.dtype == kernel.dtype
            and not x2d.is_cuda and not torch.is_grad_enabled()):
        return kernel.matmul(x2d.contiguous(), None if bias is None else bias.to(torch.float32))
    if weight is None:
        weight = kernel.to_dense(x2d.dtype)
    return F.linear(x2d, weight, bias)


class SparseLinear(nn.Linear):
    """An `nn.Linear` whose forward uses a sparse copy of its (pruned) weight (`kernel`: CSR, or bitmask +
    values) where that is faster.

    The dense `weight` stays unless the layer is `compact` (inference: the sparse form is then all it holds, and
    dense products decode it); a non-compact layer's state dict is an ordinary linear layer's.
    """

    def __init__(self, linear: nn.Linear | None, kernel, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = kernel.cols, kernel.rows
        if linear is not None:
            self.weight, self.bias = linear.weight, linear.bias
        else:
            self.weight, self.bias = None, bias
        self.kernel = kernel

    @property
    def compacted(self) -> bool:
        return getattr(self, "_compacted", False)

    def compact(self, dtype: torch.dtype | None = None) -> None:
        """Hold the sparse form only: the dense weight becomes a stand-in of its shape without storage (in
        `dtype`, default the weight's)."""
        if self.compacted:
            return
        dtype = dtype or self.weight.dtype
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.zeros(1, dtype=dtype).expand(shape), requires_grad=False)
        self._compacted = True

    def dense_weight(self) -> torch.Tensor:
        return self.kernel.to_dense(self.weight.dtype) if self.compacted else self.weight

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, density={self.kernel.density:.3f}, {type(self.kernel).__name__}, "
                f"sparse kernel at tokens={self.kernel.fast_sizes() or 'never'}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel.use_sparse(x.numel() // self.in_features) and not self.compacted:
            return F.linear(x, self.weight, self.bias)  # the fallback costs no more than nn.Linear
        flat = x.reshape(-1, self.in_features)
        weight = None if self.compacted else self.weight
        return sparse_product(self.kernel, flat, weight, self.bias).reshape(*x.shape[:-1], self.out_features)


def to_sparse_linear(module: nn.Linear, context: AccelerateContext) -> SparseLinear | None:
    """The CPU path for a pruned linear layer, or None when it does not apply."""
    if not context.cpu_kernels or not sparse_candidate(module.weight):
        return None
    return SparseLinear(module, prepare_csr(module.weight.detach(), context))


class SparseLinearKind(AcceleratedLinearKind):
    name = "sparse_linear"
    types = (SparseLinear,)

    def weight(self, module: SparseLinear) -> torch.Tensor:
        return module.dense_weight()

    def shape(self, module: SparseLinear) -> tuple[int, int]:
        return module.out_features, module.in_features

    def set_weight(self, module: SparseLinear, weight: torch.Tensor) -> None:
        if module.compacted:
            raise UsageError("this layer is held compressed for inference; reload the model to change it")
        super().set_weight(module, weight)

    def describe(self, module: SparseLinear, name_of) -> dict | None:
        if module.compacted:
            raise UsageError("a model whose layers are held compressed for inference cannot be saved; save it "
                             "before loading it for inference")
        return None

    def flops_per_token(self, module: SparseLinear) -> float:
        return 2.0 * module.kernel.nnz

    def bytes_per_token(self, module: SparseLinear) -> float:
        return float(module.kernel.bytes_at_one_token(module.weight) + tensor_bytes(module.bias))

    def accelerate(self, module: SparseLinear, context: AccelerateContext) -> SparseLinear:
        if context.mode != "off" and context.cpu_kernels and not module.kernel.switch:  # held compact since loading
            switch_kernel(module.kernel, module.dense_weight, context)
        return module

    def fast_paths(self, module: SparseLinear) -> list:
        return [module.kernel]

    def compact(self, module: SparseLinear) -> SparseLinear:
        module.compact()
        return module


# Tried before the GPU 2:4 form (semi_structured.py, priority 10), as it always was; the two never both apply
# (the CPU here, CUDA there).
CSR_CONVERTER_PRIORITY = 20

def held_linear(module: nn.Linear, kernels: list) -> SparseLinear:
    """A plain linear layer whose weight loading handed over as its sparse form: that form is all it holds."""
    layer = SparseLinear(None, kernels[0], bias=module.bias)
    layer.compact(module.weight.dtype)
    return layer


register(SparseLinearKind())
register_converter(LinearKind.name, "csr", to_sparse_linear, priority=CSR_CONVERTER_PRIORITY)
register_holder(LinearKind.name, held_linear)
