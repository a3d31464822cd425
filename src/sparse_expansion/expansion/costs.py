"""Cost accounting: FFN FLOPs per token and bytes stored, for dense, pruned and expanded models.

FLOPs count 2 per multiply-add on the *non-zero* weights (what an ideal sparse kernel does). An
expanded layer costs the mean non-zeros of its experts (each token reads exactly one expert) and
every router adds its own work: centring (d), the PCA projection (2*d*r) and squared distances to
the k centroids (3*r*k). Bytes stored are every parameter and buffer at its dtype, zeros included
(dense storage); compressed storage is accounted separately where it exists.
"""

from __future__ import annotations

from torch import nn

from ..models.discovery import ModelLayout, linear_weight
from .modules import ROUTERS_ATTR, ExpertLinear


def _tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() in seen:
            continue  # tied weights (embeddings / lm_head) are stored once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def ffn_costs(model: nn.Module, layout: ModelLayout) -> dict:
    dense = sparse = router = 0
    ffn_params = 0
    for block in layout.blocks:
        for lin in layout.select("ffn"):
            module = block.get_submodule(lin.name)
            dense += 2 * lin.in_features * lin.out_features
            if isinstance(module, ExpertLinear):
                nonzeros = (module.weight != 0).flatten(1).sum(1).float().mean().item()
                ffn_params += module.weight.numel()
            else:
                nonzeros = int((linear_weight(module) != 0).sum())
                ffn_params += linear_weight(module).numel()
            sparse += 2 * nonzeros
        routers = getattr(block, ROUTERS_ATTR, None)
        if routers is not None:
            router += sum(r.flops_per_token() for r in routers.values())
    return {
        "ffn_dense_flops_per_token": dense,
        "ffn_flops_per_token": sparse + router,
        "router_flops_per_token": router,
        "ffn_params_stored": ffn_params,
        "stored_bytes": _tensor_bytes(model),
    }
