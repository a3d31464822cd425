"""The expanded FFN linear layer used at inference: one router, k sparse experts, hard top-1."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UsageError
from .linear import nonzero_flops
from .protocol import AccelerateContext, LayerKind, register, tensor_bytes
from .router import Router, by_expert
from .sparse_linear import prepare_csr, sparse_candidate, sparse_form, sparse_product, switch_kernel

ROUTERS_ATTR = "sparse_expansion_routers"  # ModuleDict attached to each expanded decoder block


class RoutedExperts(nn.Module):
    """What every layer that sends each token to one of k experts shares: the router, owned by the block (it
    may be shared, e.g. by gate_proj and up_proj) and only referenced here, and a (k, rows, in_features)
    stack of expert weights named by `_stack`."""

    _stack = "weight"

    def _attach(self, router: Router) -> None:
        object.__setattr__(self, "_router", router)  # not a submodule: the block owns it
        # Per-expert sparse copies for the CPU kernels (set by `accelerate`, or all there is once compact); None:
        # dense only.
        self.expert_kernels: list | None = None

    @property
    def router(self) -> Router:
        return self._router

    @property
    def experts(self) -> int:
        return getattr(self, self._stack).shape[0]

    @property
    def in_features(self) -> int:
        return getattr(self, self._stack).shape[2]


class ExpertLinear(RoutedExperts):
    """y_t = W_{e(t)} x_t + b, where e(t) is the router's expert for token t.

    `weight` holds the experts as (k, out_features, in_features).
    """

    def __init__(self, router: Router, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._attach(router)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}"

    @property
    def compacted(self) -> bool:
        """Only the experts' sparse forms are held (`compact`): the dense stack is a shape without storage."""
        return getattr(self, "_compacted", False)

    def compact(self) -> bool:
        """Keep only each expert's sparse form (bitmask + values in the stack's dtype, or CSR where that reads
        fewer bytes: packed.choose_form) and free the dense stack; products use the kernel where its switch says
        so, else the expert decoded for the call (exactly the dense product). Only CPU stacks whose every expert
        is sparse enough."""
        if self.compacted:
            return True
        if not all(sparse_candidate(w) for w in self.weight):
            return False
        if self.expert_kernels is None or any(k is None for k in self.expert_kernels):
            self.expert_kernels = [sparse_form(w) for w in self.weight]
        self.hold(self.expert_kernels)
        return True

    def hold(self, kernels: list) -> None:
        """Hold these sparse forms of the experts as all there is of them (compact; loading builds them straight
        from the file). A stand-in with the stack's shape and no storage of its own (one zero, broadcast) keeps
        shapes, dtype and `.to(cpu)` working; saving is refused by the kind (describe)."""
        self.expert_kernels = list(kernels)
        self.weight = nn.Parameter(torch.zeros(1, dtype=self.weight.dtype).expand(self.weight.shape),
                                   requires_grad=False)
        self._compacted = True

    def expert_weight(self, expert: int) -> torch.Tensor:
        return self.expert_kernels[expert].to_dense(self.weight.dtype) if self.compacted else self.weight[expert]

    def _expert_product(self, expert: int, x2d: torch.Tensor) -> torch.Tensor:
        kernel = self.expert_kernels[expert] if self.expert_kernels is not None else None
        return sparse_product(kernel, x2d, None if self.compacted else self.weight[expert], self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = routed_products(self.router, x, flat, self.experts, self.out_features, self._expert_product)
        return out.reshape(*x.shape[:-1], self.out_features)


def routed_products(router: Router, x: torch.Tensor, flat: torch.Tensor, experts: int, out_features: int,
                    product: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`product(expert, tokens)` for every token with the expert the router picks, as (tokens, out_features)
    in token order. `x` is the layer's input as received (the router memoizes on it), `flat` its tokens.

    One expert: no routing. One token (decoding): exactly one expert is read. Otherwise tokens are grouped
    by expert, one product per expert that receives tokens, and scattered back.
    """
    if experts == 1:
        return product(0, flat)
    labels = router(x)
    if flat.shape[0] == 1:
        return product(int(labels[0]), flat)
    order, chunks = by_expert(flat, labels, experts)
    out_sorted = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
    start = 0
    for expert, chunk in enumerate(chunks):
        if chunk.shape[0]:
            end = start + chunk.shape[0]
            out_sorted[start:end] = product(expert, chunk)
            start = end
    return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)


def mean_nonzero_flops(weights: torch.Tensor) -> float:
    """Mean over a stack of expert matrices of their non-zero FLOPs (each token runs one expert)."""
    return sum(nonzero_flops(w) for w in weights) / weights.shape[0]


def matrix_bytes_at_one_token(kernel, weight: torch.Tensor) -> int:
    """What one token reads of a matrix: its sparse form where the kernel runs at one token, else the matrix."""
    return kernel.bytes_at_one_token(weight) if kernel is not None else tensor_bytes(weight)


def mean_expert_bytes(kernels: list | None, weights: torch.Tensor) -> float:
    """Mean over a stack of expert matrices of what one token reads of its expert."""
    kernels = kernels or [None] * weights.shape[0]
    return sum(matrix_bytes_at_one_token(k, w) for k, w in zip(kernels, weights)) / weights.shape[0]


def csr_copies(weights: torch.Tensor, context: AccelerateContext) -> list:
    """One sparse copy per matrix of a stack where the kernel has a chance, else None."""
    return [prepare_csr(w, context) if sparse_candidate(w) else None for w in weights]


def clear_router_memos(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Router):
            module.clear_memo()


class ExpertLinearKind(LayerKind):
    name = "expert_linear"
    types = (ExpertLinear,)
    linear = True
    routed = True

    def weight(self, module: ExpertLinear) -> torch.Tensor:
        if module.compacted:  # decoded: a compact layer keeps no dense stack
            return torch.stack([module.expert_weight(e) for e in range(module.experts)])
        return module.weight

    def shape(self, module: ExpertLinear) -> tuple[int, int]:
        return module.out_features, module.in_features

    def set_weight(self, module: ExpertLinear, weight: torch.Tensor) -> None:
        if module.compacted:
            raise UsageError("the experts of this layer are held compressed for inference; reload the model to "
                             "change them")
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype).expand_as(module.weight))

    def describe(self, module: ExpertLinear, name_of) -> dict:
        if module.compacted:
            raise UsageError("a model whose experts are held compressed for inference cannot be saved; save it "
                             "before loading it for inference")
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
        if module.compacted:
            return sum(2 * k.nnz for k in module.expert_kernels) / module.experts
        return mean_nonzero_flops(module.weight)

    def bytes_per_token(self, module: ExpertLinear) -> float:
        # Compacted too: each expert's stand-in view has the expert's shape and dtype, so a dense fallback
        # counts the matrix it decodes.
        return mean_expert_bytes(module.expert_kernels, module.weight) + tensor_bytes(module.bias)

    def accelerate(self, module: ExpertLinear, context: AccelerateContext) -> ExpertLinear:
        if context.mode == "off" or not context.cpu_kernels:
            return module
        if module.compacted:  # the sparse forms exist: measure their switches on the decoded experts
            for e, kernel in enumerate(module.expert_kernels):
                switch_kernel(kernel, lambda e=e: module.expert_weight(e), context)
            return module
        module.expert_kernels = csr_copies(module.weight, context)
        return module

    def fast_paths(self, module: ExpertLinear) -> list:
        return [k for k in module.expert_kernels or [] if k is not None]

    def compact(self, module: ExpertLinear) -> ExpertLinear:
        module.compact()
        return module

    def packed_parameter(self, module: ExpertLinear) -> str | None:
        return "weight"

    def hold_packed(self, module: ExpertLinear, kernels: list) -> ExpertLinear:
        module.hold(kernels)
        return module

    def release(self, module: ExpertLinear) -> None:
        module.expert_kernels = None  # a compact layer's sparse forms: the only storage it had left
        module._compacted = False


register(ExpertLinearKind())
