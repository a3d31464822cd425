"""Cost accounting from the layer protocol: FFN FLOPs per token, weight bytes, for any model.

Each layer kind says what one token costs it (layers/protocol.py): linear layers 2 FLOPs per *non-zero*
weight (what an ideal sparse kernel does), an expert layer the mean over its experts (each token runs one),
a router the product it computes. `ffn_flops_per_token` is the FFN linears plus the routers of the
blocks; a test checks it against torch's FlopCounterMode on a one-token forward.
"""

from __future__ import annotations

from torch import nn

from ..layers.protocol import kind_of, unique_tensor_bytes
from .discovery import ModelLayout


def block_ffn_costs(block: nn.Module, layout: ModelLayout) -> dict:
    """One block's share of `ffn_costs` (what a build streamed block by block adds up)."""
    dense = sparse = router = 0.0
    ffn_params = 0
    for lin in layout.select("ffn"):
        module = block.get_submodule(lin.name)
        dense += 2 * lin.in_features * lin.out_features
        sparse += kind_of(module).flops_per_token(module)
        # What is stored (not the materialised expert matrices of a selective layer): weights, no bias.
        ffn_params += sum(p.numel() for name, p in module.named_parameters(recurse=False) if name != "bias")
    for module in block.modules():
        kind = kind_of(module)
        if kind is not None and kind.router:
            router += kind.flops_per_token(module)
    return {"ffn_dense_flops_per_token": dense, "ffn_flops_per_token": sparse + router,
            "router_flops_per_token": router, "ffn_params_stored": ffn_params}


def sum_block_costs(per_block: list[dict], stored_bytes: int) -> dict:
    total = {key: sum(b[key] for b in per_block) for key in ("ffn_dense_flops_per_token", "ffn_flops_per_token",
                                                             "router_flops_per_token", "ffn_params_stored")}
    for key in ("ffn_dense_flops_per_token", "router_flops_per_token", "ffn_params_stored"):
        total[key] = int(total[key])
    total["stored_bytes"] = stored_bytes
    return total


def ffn_costs(model: nn.Module, layout: ModelLayout) -> dict:
    return sum_block_costs([block_ffn_costs(block, layout) for block in layout.blocks],
                           unique_tensor_bytes([*model.parameters(), *model.buffers()]))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every layer with a kind once, in the form it runs at one token
    (an expert layer one expert, a pruned layer its CSR arrays where the kernel runs); embeddings one row
    unless they are tied to the output layer, which reads them whole; other leaf modules (norms) whole."""
    total = 0.0
    counted = set()
    for module in model.modules():
        kind = kind_of(module)
        if kind is None:
            continue
        total += kind.bytes_per_token(module)
        counted.update(id(t) for t in module.parameters(recurse=False))
        counted.update(id(t) for t in module.buffers(recurse=False))
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, nn.Embedding):
            if id(module.weight) not in counted:
                total += module.weight.shape[1] * module.weight.element_size()
        elif kind_of(module) is None and next(module.children(), None) is None:
            total += sum(t.numel() * t.element_size() for t in own if id(t) not in counted)
    return int(total)
