"""Plain linear layers: `nn.Linear` and GPT-2's transposed `Conv1D`. Costs count the non-zero weights."""

from __future__ import annotations

import torch
from torch import nn

from .protocol import AccelerateContext, LayerKind, converters, holder, register, tensor_bytes


def nonzero_flops(weight: torch.Tensor) -> float:
    """2 FLOPs per non-zero weight: one token's multiply-adds on a (possibly pruned) matrix."""
    return 2.0 * int(torch.count_nonzero(weight))


class LinearKind(LayerKind):
    name = "linear"
    types = (nn.Linear,)
    linear = True

    def flops_per_token(self, module: nn.Module) -> float:
        return nonzero_flops(module.weight)

    def bytes_per_token(self, module: nn.Module) -> float:
        return float(tensor_bytes(module.weight, module.bias))

    def accelerate(self, module: nn.Module, context: AccelerateContext) -> nn.Module:
        if type(module) is not nn.Linear or context.mode == "off":
            return module
        # Faster forms of a plain linear layer, registered for this kind with their priorities (the CPU CSR
        # kernel in sparse_linear.py, the GPU 2:4 product in semi_structured.py): the first that applies wins.
        for converter in converters(self.name):
            converted = converter.convert(module, context)
            if converted is not None:
                return converted
        return module

    def packed_parameter(self, module: nn.Module) -> str | None:
        return "weight" if type(module) is nn.Linear and holder(self.name) is not None else None

    def hold_packed(self, module: nn.Module, kernels: list) -> nn.Module:
        return holder(self.name)(module, kernels)


class Conv1DKind(LinearKind):
    """GPT-2 style layers store the weight transposed as (in_features, out_features)."""

    name = "conv1d"
    types = ()
    priority = 1

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.t()

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight.t().to(module.weight.dtype))

    def accelerate(self, module: nn.Module, context: AccelerateContext) -> nn.Module:
        return module  # no sparse kernel for the transposed layout (stays dense)

    def packed_parameter(self, module: nn.Module) -> str | None:
        return None


class AcceleratedLinearKind(LinearKind):
    """A linear layer already switched to a faster form (a subclass of nn.Linear that keeps its dense weight):
    saved and costed as the linear layer it is; subclasses say what one token reads."""

    priority = 10

    def accelerate(self, module: nn.Module, context: AccelerateContext) -> nn.Module:
        return module

    def packed_parameter(self, module: nn.Module) -> str | None:
        return None


register(LinearKind())
register(Conv1DKind())
