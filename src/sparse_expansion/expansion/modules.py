"""The expanded FFN linear layer used at inference: one router, k sparse experts, hard top-1."""

from __future__ import annotations

import torch
from torch import nn

from ..inference.sparse_linear import sparse_product
from .router import Router

ROUTERS_ATTR = "sparse_expansion_routers"  # ModuleDict attached to each expanded decoder block


class ExpertLinear(nn.Module):
    """y_t = W_{e(t)} x_t + b, where e(t) is the router's expert for token t.

    `weight` holds the experts as (k, out_features, in_features). The router is owned by the block
    (it may be shared, e.g. by gate_proj and up_proj) and is only referenced here.
    """

    is_expert_linear = True  # lets architecture discovery recognise expanded layers

    def __init__(self, router: Router, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        object.__setattr__(self, "_router", router)  # not a submodule: the block owns it
        # Per-expert CSR copies for the CPU sparse kernels (inference/sparse_model.py); None: dense only.
        self.expert_kernels: list | None = None

    @property
    def router(self) -> Router:
        return self._router

    @property
    def experts(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}"

    def _expert_product(self, expert: int, x2d: torch.Tensor) -> torch.Tensor:
        kernel = self.expert_kernels[expert] if self.expert_kernels is not None else None
        return sparse_product(kernel, x2d, self.weight[expert], self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.experts == 1:
            return self._expert_product(0, flat).reshape(*x.shape[:-1], self.out_features)
        labels = self.router(x)
        if flat.shape[0] == 1:
            # One token (decoding): read exactly one expert.
            out = self._expert_product(int(labels[0]), flat)
            return out.reshape(*x.shape[:-1], self.out_features)
        # Group tokens by expert, one matmul per expert that receives tokens, scatter back.
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.experts).tolist()
        grouped = flat.index_select(0, order)
        out_sorted = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                end = start + count
                out_sorted[start:end] = self._expert_product(expert, grouped[start:end])
                start = end
        out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
        return out.reshape(*x.shape[:-1], self.out_features)


def clear_router_memos(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Router):
            module.clear_memo()
