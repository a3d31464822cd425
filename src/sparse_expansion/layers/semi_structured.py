"""GPU path: 2:4 semi-structured sparse weights through PyTorch's built-in support, behind a measured switch.

A linear layer pruned with `--nm 2:4` has two zeros in every group of four consecutive input weights. On
an NVIDIA GPU with sparse tensor cores (compute capability 8.0 or newer) and fp16/bf16 weights,
`torch.sparse.to_sparse_semi_structured` stores such a weight compressed and `F.linear` runs it through
cuSPARSELt/CUTLASS. Measured on an H100 (issue 8), those products were 25-30x *slower* than dense at
4096 x 4096 and 11008 x 4096, so the layer keeps its dense weight and uses the semi-structured one only
for the token counts where it measured faster on the layer's own shape (layers/switch.py); a shape where
it never wins is not converted at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import AcceleratedLinearKind, LinearKind
from .protocol import AccelerateContext, register, register_converter, tensor_bytes
from .switch import ALWAYS, Switched

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_TOKENS = 8  # cuSPARSELt wants at least 8 rows of fp16/bf16 activations: fewer are padded


def is_two_four(weight: torch.Tensor) -> bool:
    """At least two zeros in every group of four consecutive weights along the input dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
    return bool((zeros >= 2).all())


def semi_structured_supported(device: torch.device | str | None = None) -> bool:
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and hasattr(torch.sparse, "to_sparse_semi_structured")


def shape_supported(weight: torch.Tensor) -> bool:
    # cuSPARSELt / CUTLASS minimum tile sizes for fp16/bf16 (PyTorch raises on smaller shapes).
    rows, cols = weight.shape
    return rows % 64 == 0 and cols % 64 == 0 and rows >= 64 and cols >= 64


def semi_structured_product(sparse_weight, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    tokens = x2d.shape[0]
    pad = (-tokens) % MIN_TOKENS if tokens < MIN_TOKENS else 0
    padded = F.pad(x2d, (0, 0, 0, pad)) if pad else x2d
    out = F.linear(padded, sparse_weight)
    out = out[:tokens] if pad else out
    return out + bias if bias is not None else out


class SemiStructuredLinear(nn.Linear, Switched):
    """An `nn.Linear` with a 2:4 compressed copy of its weight, used where it measured faster."""

    def __init__(self, linear: nn.Linear, sparse_weight):
        nn.Module.__init__(self)
        Switched.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.sparse_weight = sparse_weight  # not a parameter: the dense weight is what is saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if torch.is_grad_enabled() or not self.use_fast(tokens):
            return F.linear(x, self.weight, self.bias)
        out = semi_structured_product(self.sparse_weight, x.reshape(-1, self.in_features), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def semi_structured_candidate(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cuda" and weight.dtype in SEMI_STRUCTURED_DTYPES and shape_supported(weight)
            and semi_structured_supported(weight.device) and is_two_four(weight))


@torch.no_grad()
def to_semi_structured(module: nn.Linear, context: AccelerateContext) -> SemiStructuredLinear | None:
    """The GPU path for a 2:4 fp16/bf16 linear layer, or None where it does not apply or never wins."""
    if not semi_structured_candidate(module.weight):
        return None
    sparse = torch.sparse.to_sparse_semi_structured(module.weight)
    layer = SemiStructuredLinear(module, sparse)
    if context.mode == "always":
        layer.switch = ALWAYS
    else:
        weight = module.weight
        context.switches.decide(layer, ("2:4", *weight.shape), cols=weight.shape[1], device=weight.device,
                                dtype=weight.dtype, fast=lambda x: semi_structured_product(sparse, x, None),
                                dense=lambda x: F.linear(x, weight))
    return layer if layer.fast_sizes() else None


class SemiStructuredKind(AcceleratedLinearKind):
    name = "semi_structured_linear"
    types = (SemiStructuredLinear,)

    def bytes_per_token(self, module: SemiStructuredLinear) -> float:
        if module.use_fast(1):
            # values (half the weights) + 2-bit metadata per kept value
            weight = module.weight
            return float(weight.numel() // 2 * weight.element_size() + weight.numel() // 8 + tensor_bytes(module.bias))
        return float(tensor_bytes(module.weight, module.bias))

    def fast_paths(self, module: SemiStructuredLinear) -> list:
        return [module]  # the layer holds its own switch


SEMI_STRUCTURED_CONVERTER_PRIORITY = 10  # after the CPU CSR form (sparse_linear.py, 20)

register(SemiStructuredKind())
register_converter(LinearKind.name, "semi_structured", to_semi_structured, priority=SEMI_STRUCTURED_CONVERTER_PRIORITY)
