"""The expanded FFN linear layer used at inference: one router, k sparse experts, hard top-1."""

from __future__ import annotations

import torch
from torch import nn

from .linear import nonzero_flops
from .protocol import AccelerateContext, LayerKind, register, tensor_bytes
from .router import Router
from .sparse_linear import csr_candidate, prepare_csr, sparse_product

ROUTERS_ATTR = "sparse_expansion_routers"  # ModuleDict attached to each expanded decoder block


class ExpertLinear(nn.Module):
    """y_t = W_{e(t)} x_t + b, where e(t) is the router's expert for token t.

    `weight` holds the experts as (k, out_features, in_features). The router is owned by the block
    (it may be shared, e.g. by gate_proj and up_proj) and is only referenced here.
    """

    def __init__(self, router: Router, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        object.__setattr__(self, "_router", router)  # not a submodule: the block owns it
        # Per-expert CSR copies for the CPU sparse kernels (set by `accelerate`); None: dense only.
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


class ExpertLinearKind(LayerKind):
    name = "expert_linear"
    types = (ExpertLinear,)
    linear = True

    def set_weight(self, module: ExpertLinear, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype).expand_as(module.weight))

    def describe(self, module: ExpertLinear, name_of) -> dict:
        return {"router": name_of(module.router), "experts": module.experts, "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}

    def rebuild(self, spec: dict, resolve, dtype: torch.dtype) -> ExpertLinear:
        # Placeholders, never written: the state dict load assigns the stored tensors in their place, so
        # untouched pages cost no memory (an expanded model is k times its dense size).
        weight = torch.empty(spec["experts"], spec["out_features"], spec["in_features"], dtype=dtype)
        bias = torch.empty(spec["out_features"], dtype=dtype) if spec["bias"] else None
        return ExpertLinear(resolve(spec["router"]), weight, bias)

    def flops_per_token(self, module: ExpertLinear) -> float:
        """Each token runs exactly one expert: the mean over experts of its non-zero multiply-adds (the
        router is costed by its own kind)."""
        return sum(nonzero_flops(w) for w in module.weight) / module.experts

    def bytes_per_token(self, module: ExpertLinear) -> float:
        kernels = module.expert_kernels or [None] * module.experts
        per_expert = [k.bytes_at_one_token(w) if k is not None else tensor_bytes(w)
                      for k, w in zip(kernels, module.weight)]
        return sum(per_expert) / module.experts + tensor_bytes(module.bias)

    def accelerate(self, module: ExpertLinear, context: AccelerateContext) -> ExpertLinear:
        if context.mode == "off" or not context.cpu_kernels:
            return module
        module.expert_kernels = [prepare_csr(w, context) if csr_candidate(w) else None for w in module.weight]
        return module


register(ExpertLinearKind())
