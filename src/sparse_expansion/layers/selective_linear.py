"""Selective expansion: only some output rows of an FFN linear are expert rows, the rest are shared.

A full expansion stores k copies of the whole matrix; here the selected rows (output neurons) get one pruned
copy per expert and every other row is pruned once and serves all tokens, so the stored weights grow by
about p (k - 1) instead of k - 1 for a fraction p of selected rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .expert_linear import (
    RoutedExperts,
    csr_copies,
    matrix_bytes_at_one_token,
    mean_expert_bytes,
    mean_nonzero_flops,
    routed_products,
)
from .linear import nonzero_flops
from .protocol import AccelerateContext, LayerKind, register, tensor_bytes
from .router import Router
from .sparse_linear import prepare_csr, sparse_candidate, sparse_product


class SelectiveExpertLinear(RoutedExperts):
    """y_t[shared_rows] = W_s x_t + b[shared_rows] and y_t[expert_rows] = W_{e(t)} x_t + b[expert_rows],
    where e(t) is the router's expert for token t.

    `shared_weight` is (out_features - n_sel, in_features), `expert_weight` (k, n_sel, in_features); the
    buffers `shared_rows` and `expert_rows` (int64, disjoint, together 0..out_features-1) say where their
    rows go in the output. The router is owned by the block and only referenced here, as in `ExpertLinear`.
    """

    _stack = "expert_weight"

    def __init__(self, router: Router, shared_weight: torch.Tensor, expert_weight: torch.Tensor,
                 shared_rows: torch.Tensor, expert_rows: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if (shared_weight.shape[0] != shared_rows.numel() or expert_weight.shape[1] != expert_rows.numel()
                or shared_weight.shape[1] != expert_weight.shape[2]):
            raise ValueError(f"selective expert layer: shared weight {tuple(shared_weight.shape)} with "
                             f"{shared_rows.numel()} rows, expert weight {tuple(expert_weight.shape)} with "
                             f"{expert_rows.numel()} rows")
        self.shared_weight = nn.Parameter(shared_weight, requires_grad=False)
        self.expert_weight = nn.Parameter(expert_weight, requires_grad=False)
        self.register_buffer("shared_rows", shared_rows.to(torch.int64))
        self.register_buffer("expert_rows", expert_rows.to(torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._attach(router)
        self.shared_kernel = None  # the shared rows' CSR copy (set by `accelerate`)

    @property
    def selected_features(self) -> int:
        return self.expert_weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.shared_weight.shape[0] + self.selected_features

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"selected_rows={self.selected_features}")

    def _bias_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.index_select(0, rows)

    def expert_matrices(self) -> torch.Tensor:
        """Every expert's full (out_features, in_features) matrix: the shared rows plus its selected rows."""
        full = self.expert_weight.new_empty(self.experts, self.out_features, self.in_features)
        full[:, self.shared_rows] = self.shared_weight
        full[:, self.expert_rows] = self.expert_weight
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if self.shared_rows.numel():
            shared = sparse_product(self.shared_kernel, flat, self.shared_weight, self._bias_of(self.shared_rows))
            out.index_copy_(1, self.shared_rows, shared)
        bias = self._bias_of(self.expert_rows)
        kernels = self.expert_kernels

        def product(expert: int, tokens: torch.Tensor) -> torch.Tensor:
            kernel = kernels[expert] if kernels is not None else None
            return sparse_product(kernel, tokens, self.expert_weight[expert], bias)

        out.index_copy_(1, self.expert_rows, routed_products(self.router, x, flat, self.experts,
                                                             self.selected_features, product))
        return out.reshape(*x.shape[:-1], self.out_features)


class SelectiveExpertLinearKind(LayerKind):
    name = "selective_expert_linear"
    types = (SelectiveExpertLinear,)
    linear = True
    routed = True

    def weight(self, module: SelectiveExpertLinear) -> torch.Tensor:
        """(experts, out_features, in_features), materialised (a copy: write back with `set_weight`)."""
        return module.expert_matrices()

    def shape(self, module: SelectiveExpertLinear) -> tuple[int, int]:
        return module.out_features, module.in_features

    def set_weight(self, module: SelectiveExpertLinear, weight: torch.Tensor) -> None:
        """Accepts (out_features, in_features), given to every expert, or (experts, out_features, in_features)
        whose shared rows are the same in every expert."""
        weight = weight.to(module.expert_weight.dtype)
        if weight.dim() == 2:
            weight = weight.unsqueeze(0)
        shared = weight.index_select(1, module.shared_rows)
        if not torch.equal(shared, shared[:1].expand_as(shared)):
            raise ValueError("the shared rows of a selective expert layer must be the same in every expert")
        with torch.no_grad():
            module.shared_weight.copy_(shared[0])
            module.expert_weight.copy_(weight.index_select(1, module.expert_rows).expand_as(module.expert_weight))

    def describe(self, module: SelectiveExpertLinear, name_of) -> dict:
        return {"router": name_of(module.router), "experts": module.experts, "in_features": module.in_features,
                "out_features": module.out_features, "selected_rows": module.selected_features,
                "bias": module.bias is not None}

    def rebuild(self, spec: dict, resolve, dtype: torch.dtype) -> SelectiveExpertLinear:
        # Placeholders, never written: the state dict load assigns the stored tensors (weights and row
        # indices) in their place, as for ExpertLinearKind.
        experts, rows, cols = spec["experts"], spec["out_features"], spec["in_features"]
        selected = spec["selected_rows"]
        return SelectiveExpertLinear(
            resolve(spec["router"]), shared_weight=torch.empty(rows - selected, cols, dtype=dtype),
            expert_weight=torch.empty(experts, selected, cols, dtype=dtype),
            shared_rows=torch.empty(rows - selected, dtype=torch.int64),
            expert_rows=torch.empty(selected, dtype=torch.int64),
            bias=torch.empty(rows, dtype=dtype) if spec["bias"] else None)

    def flops_per_token(self, module: SelectiveExpertLinear) -> float:
        """The shared rows for every token plus, on average, one expert's selected rows (non-zero
        multiply-adds; the router is costed by its own kind)."""
        return nonzero_flops(module.shared_weight) + mean_nonzero_flops(module.expert_weight)

    def bytes_per_token(self, module: SelectiveExpertLinear) -> float:
        """The shared matrix, on average one expert's rows, the bias and the row indices (the scatter reads them)."""
        return (matrix_bytes_at_one_token(module.shared_kernel, module.shared_weight)
                + mean_expert_bytes(module.expert_kernels, module.expert_weight)
                + tensor_bytes(module.bias, module.shared_rows, module.expert_rows))

    def accelerate(self, module: SelectiveExpertLinear, context: AccelerateContext) -> SelectiveExpertLinear:
        if context.mode == "off" or not context.cpu_kernels:
            return module
        shared = module.shared_weight
        module.shared_kernel = prepare_csr(shared, context) if shared.numel() and sparse_candidate(shared) else None
        module.expert_kernels = csr_copies(module.expert_weight, context)
        return module

    def release(self, module: SelectiveExpertLinear) -> None:
        module.shared_kernel, module.expert_kernels = None, None

    def fast_paths(self, module: SelectiveExpertLinear) -> list:
        return [k for k in (module.shared_kernel, *(module.expert_kernels or [])) if k is not None]


register(SelectiveExpertLinearKind())
