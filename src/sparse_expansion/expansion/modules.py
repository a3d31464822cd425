"""The expanded FFN linear layer used at inference: one router, k sparse experts, hard top-1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts == 1:
            return F.linear(x, self.weight[0], self.bias)
        labels = self.router(x)
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 1:
            # One token (decoding): read exactly one expert.
            out = F.linear(flat, self.weight[labels[0]], self.bias)
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
                out_sorted[start:end] = F.linear(grouped[start:end], self.weight[expert], self.bias)
                start = end
        out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
        return out.reshape(*x.shape[:-1], self.out_features)


def clear_router_memos(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Router):
            module.clear_memo()
