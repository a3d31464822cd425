"""The thresholded FFN down projection: y = W mask(x) + b, with mask(x)_i = x_i where |x_i| >= t_i, else 0.

The per-neuron thresholds t_i come from the CETT search (activation/). On the CPU an activation-sparse
kernel reads only the rows of W^T (one contiguous row per intermediate neuron; only its non-zero weights, as
CSR, when the weight is pruned) of the neurons that pass,
for the token counts where it measured faster than the masked dense product on the layer's own shape at its
recorded activation ratio (layers/switch.py); elsewhere the dense product runs on the masked input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from .linear import LinearKind, nonzero_flops
from .protocol import AccelerateContext, register, tensor_bytes
from .sparse_linear import MIN_SPARSITY
from .switch import ALWAYS, Switched


def mask_below(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """x with the entries below their neuron's threshold (in absolute value) set to zero."""
    return x * (x.abs() >= thresholds.to(x.dtype))


class ActivationSparseWeight(Switched):
    """W^T (in x out) for the activation-sparse kernel, with its measured switch: dense rows (contiguous per
    neuron), or CSR rows when the weight is pruned (`MIN_SPARSITY` or more zeros), so that activation and
    weight sparsity both skip work."""

    def __init__(self, weight: torch.Tensor, thresholds: torch.Tensor):
        super().__init__()
        weight_t = weight.detach().to("cpu", torch.float32).t().contiguous()
        self.thresholds = thresholds.detach().to("cpu", torch.float32).contiguous()
        self.rows_in, self.cols_out = weight_t.shape
        self.sparse = 1 - torch.count_nonzero(weight_t).item() / weight_t.numel() >= MIN_SPARSITY
        if self.sparse:
            nonzero = weight_t != 0
            self.rowptr = torch.zeros(self.rows_in + 1, dtype=torch.int64)
            torch.cumsum(nonzero.sum(1), 0, out=self.rowptr[1:])
            self.col = nonzero.nonzero()[:, 1].to(torch.int32).contiguous()
            self.values = weight_t[nonzero].contiguous()
            self.nbytes = tensor_bytes(self.rowptr, self.col, self.values)
        else:
            self.weight_t = weight_t
            self.nbytes = tensor_bytes(weight_t)
        self.last_active: torch.Tensor | None = None  # per token of the last product: neurons that passed

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (tokens x in) fp32 contiguous CPU -> mask(x) W^T + bias (tokens x out)."""
        tokens = x.shape[0]
        out = torch.empty(tokens, self.cols_out, dtype=torch.float32)
        active = torch.empty(tokens, dtype=torch.int64)
        lib = native.library()
        bias_ptr = None if bias is None else bias.data_ptr()
        if self.sparse:
            if lib.act_sparse_csr_matmul(self.rows_in, self.cols_out, tokens, self.rowptr.data_ptr(),
                                         self.col.data_ptr(), self.values.data_ptr(), x.data_ptr(),
                                         self.thresholds.data_ptr(), bias_ptr, out.data_ptr(), active.data_ptr()):
                raise MemoryError("activation-sparse kernel could not allocate its buffers")
        else:
            lib.act_sparse_matmul(self.rows_in, self.cols_out, tokens, self.weight_t.data_ptr(), x.data_ptr(),
                                  self.thresholds.data_ptr(), bias_ptr, out.data_ptr(), active.data_ptr())
        self.last_active = active
        return out


class ThresholdedLinear(nn.Linear):
    """An FFN down projection that zeroes its weak inputs. Buffers: `thresholds` (in_features) and
    `activation_ratio` (the fraction of inputs measured to pass, for costs and the kernel's switch)."""

    def __init__(self, linear: nn.Linear, thresholds: torch.Tensor, activation_ratio: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("thresholds", thresholds.detach().to(linear.weight.dtype).clone())
        self.register_buffer("activation_ratio", torch.tensor(float(activation_ratio)))
        self.kernel: ActivationSparseWeight | None = None  # set by `accelerate`

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_ratio={float(self.activation_ratio):.3f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        kernel = self.kernel
        if (kernel is not None and kernel.use_fast(flat.shape[0]) and flat.dtype == torch.float32
                and not flat.is_cuda and not torch.is_grad_enabled()):
            out = kernel.matmul(flat.contiguous(), self.bias)
        else:
            out = F.linear(mask_below(flat, self.thresholds), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def _expected_input(tokens: int, cols: int, ratio: float, thresholds: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Inputs where a fraction `ratio` of the entries pass their thresholds (for timing the switch)."""
    generator = torch.Generator().manual_seed(seed)
    passing = torch.rand(tokens, cols, generator=generator) < ratio
    scale = thresholds.float().clamp_min(1e-6) * 2
    return torch.where(passing, scale, scale * 0.25) * torch.sign(torch.randn(tokens, cols, generator=generator))


def prepare_kernel(module: ThresholdedLinear, context: AccelerateContext) -> ActivationSparseWeight:
    kernel = ActivationSparseWeight(module.weight, module.thresholds)
    if context.mode == "always":
        kernel.switch = ALWAYS
        return kernel
    ratio = float(module.activation_ratio)
    weight, thresholds = module.weight.detach().float().contiguous(), module.thresholds.float()
    key = ("activation", module.out_features, module.in_features, round(ratio, 2), kernel.sparse)
    batches = {}

    def inputs(x: torch.Tensor) -> torch.Tensor:  # the switch's random x, replaced by one at the layer's ratio
        if x.shape[0] not in batches:
            batches[x.shape[0]] = _expected_input(x.shape[0], module.in_features, ratio, thresholds)
        return batches[x.shape[0]]

    context.switches.decide(kernel, key, fast=lambda x: kernel.matmul(inputs(x)),
                            dense=lambda x: F.linear(mask_below(inputs(x), thresholds), weight),
                            cols=module.in_features)
    return kernel


class ThresholdedLinearKind(LinearKind):
    name = "thresholded_linear"
    types = (ThresholdedLinear,)
    priority = 10  # before nn.Linear's kind

    def describe(self, module: ThresholdedLinear, name_of) -> dict:
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}

    def rebuild(self, spec: dict, resolve, dtype: torch.dtype) -> ThresholdedLinear:
        linear = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta", dtype=dtype)
        layer = ThresholdedLinear(linear, torch.empty(spec["in_features"], device="meta", dtype=dtype), 1.0)
        return layer.to_empty(device="cpu")  # the state dict load fills weight, bias and the two buffers

    def flops_per_token(self, module: ThresholdedLinear) -> float:
        """The expected multiply-adds: the non-zero weights of the neurons that pass, at the recorded ratio."""
        return nonzero_flops(module.weight) * float(module.activation_ratio)

    def bytes_per_token(self, module: ThresholdedLinear) -> float:
        kernel = module.kernel
        read = kernel.nbytes * float(module.activation_ratio) if kernel is not None and kernel.use_fast(1) \
            else tensor_bytes(module.weight)
        return read + tensor_bytes(module.bias, module.thresholds)

    def accelerate(self, module: ThresholdedLinear, context: AccelerateContext) -> ThresholdedLinear:
        if context.mode == "off" or not context.cpu_kernels or module.weight.dtype != torch.float32:
            return module
        module.kernel = prepare_kernel(module, context)
        return module

    def fast_paths(self, module: ThresholdedLinear) -> list:
        return [module.kernel] if module.kernel is not None else []

    def release(self, module: ThresholdedLinear) -> None:
        module.kernel = None


register(ThresholdedLinearKind())
