"""Routers: PCA projection + nearest k-means centroid (fitted by expansion/fitting.py).

Routing at inference is one (tokens x d_in) @ (d_in x k) product and an argmin, on the model's device.
"""

from __future__ import annotations

import torch
from torch import nn

from .protocol import LayerKind, register


class Router(nn.Module):
    """Sends each token to one expert: argmin_k ||P^T (x - mean) - c_k||.

    Buffers: `mean` (d_in), `projection` (d_in x r; an identity-sized placeholder of shape (0, 0) when
    PCA is off) and `centroids` (k x r).
    """

    def __init__(self, in_features: int, components: int | None, experts: int):
        super().__init__()
        dim = components if components else in_features
        self.in_features = in_features
        self.components = components
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("projection", torch.zeros(in_features, components) if components else torch.zeros(0, 0))
        self.register_buffer("centroids", torch.zeros(experts, dim))
        self._memo: tuple | None = None
        self._fused_cache: tuple | None = None

    @property
    def experts(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        centred = x.reshape(-1, self.in_features).to(self.mean.dtype) - self.mean
        return centred @ self.projection if self.components else centred

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W = P C^T and b = ||c||^2 + 2 mean^T W, cached until a buffer changes (e.g. a state-dict load)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.mean, self.projection, self.centroids))
        if self._fused_cache is None or self._fused_cache[0] != key:
            weight = (self.projection @ self.centroids.t()) if self.components else self.centroids.t()
            weight = weight.contiguous()
            bias = self.centroids.pow(2).sum(1) + 2 * (self.mean @ weight)
            self._fused_cache = (key, weight, bias)
        return self._fused_cache[1], self._fused_cache[2]

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for every token (ties go to the lower index).

        ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2 with z = P^T (x - mean); ||z||^2 does not change the
        argmin, and z.c = x.(P c) - mean.(P c), so routing is one (tokens x d_in) @ (d_in x k) product:
        at one token that is a single small matrix-vector product instead of projection and distances.
        """
        weight, bias = self.fused()
        flat = x.reshape(-1, self.in_features).to(weight.dtype)
        return torch.addmm(bias, flat, weight, alpha=-2).argmin(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate_proj and up_proj share one router and receive the very same input tensor: route once.
        memo = self._memo
        if memo is not None and memo[0] is x and memo[1] == x._version:
            return memo[2]
        labels = self.assign(x)
        self._memo = (x, x._version, labels)
        return labels

    def clear_memo(self) -> None:
        self._memo = None

    def flops_per_token(self) -> int:
        """What `assign` computes: one (1 x d_in) @ (d_in x k) product (the bias add and argmin are not
        multiply-adds); nothing with one expert, where the expert layer does not route."""
        return 2 * self.in_features * self.experts if self.experts > 1 else 0


class RouterKind(LayerKind):
    name = "router"
    types = (Router,)
    router = True

    def describe(self, module: Router, name_of) -> dict:
        return {"in_features": module.in_features, "components": module.components, "experts": module.experts}

    def rebuild(self, spec: dict, resolve, dtype: torch.dtype) -> Router:
        return Router(spec["in_features"], spec["components"], spec["experts"])

    def release(self, module: Router) -> None:
        module.clear_memo()  # the last input it routed, and its labels
        module._fused_cache = None

    def flops_per_token(self, module: Router) -> float:
        return float(module.flops_per_token())

    def bytes_per_token(self, module: Router) -> float:
        if module.experts == 1:
            return 0.0
        weight, bias = module.fused()
        return float(weight.numel() * weight.element_size() + bias.numel() * bias.element_size())


register(RouterKind())


def by_expert(tokens: torch.Tensor, labels: torch.Tensor, experts: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`tokens` (n, features) grouped by their expert `labels`: the stable order that groups them (each expert's
    tokens in their original order) and one chunk per expert, in that order (empty for an expert with none)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=experts).tolist()
    return order, list(tokens.index_select(0, order).split(counts))

