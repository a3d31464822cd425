"""Build a Sparse Expansion model one decoder block at a time.

For each block (on the dense block's calibration inputs):
1. record the inputs of the FFN linears: the FFN input (shared by gate and up, or fc1) and the
   intermediate activation (the input of down, or fc2);
2. fit one router per distinct input: PCA to d_in // reduction dimensions, then k-means;
3. accumulate one Hessian per cluster from that cluster's tokens and prune one copy of the dense
   weight per cluster with SparseGPT (all experts of a layer in one batched pass);
4. replace each FFN linear with an `ExpertLinear` and attach the routers to the block.
The engine then propagates the calibration batches through the *expanded* block, with routing, so the
next block calibrates on what the expanded model really produces.

A cluster with fewer than `min_cluster_tokens` tokens would give an unreliable Hessian (an empty one
gives none at all): its experts are pruned with the layer's whole Hessian instead, and the manifest
says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import SequentialCalibration
from ..errors import UsageError
from ..models.discovery import ModelLayout, linear_weight
from ..pruning.masks import check_nm_shape
from ..pruning.methods import PruneOptions
from ..pruning.sparsegpt import hessian_factors, sparsegpt_prune
from ..pruning.spec import SparsitySpec
from ..pruning.statistics import Hessian
from .modules import ROUTERS_ATTR, ExpertLinear, clear_router_memos
from .router import Router, fit_router, pca_components


@dataclass(frozen=True)
class ExpansionConfig:
    experts: int = 16
    pca_reduction: int | None = 32  # None: cluster the raw inputs (--no-pca)
    kmeans_restarts: int = 1
    seed: int = 0
    backend: str = "torch"
    min_cluster_tokens: int = 32

    def validate(self) -> None:
        if self.experts < 1:
            raise UsageError(f"--experts must be at least 1, got {self.experts}")
        if self.pca_reduction is not None and self.pca_reduction < 1:
            raise UsageError(f"--pca-reduction must be at least 1, got {self.pca_reduction}")
        if self.kmeans_restarts < 1:
            raise UsageError(f"--kmeans-restarts must be at least 1, got {self.kmeans_restarts}")


@dataclass
class ExpansionReport:
    spec: SparsitySpec
    config: ExpansionConfig
    seconds: float = 0.0
    router_seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)  # linear path -> per-expert sparsity, fallbacks
    routers: dict[str, dict] = field(default_factory=dict)  # router path -> cluster sizes

    def overall_sparsity(self) -> float:
        zeros = sum(sum(info["zeros"]) for info in self.layers.values())
        total = sum(info["numel"] * len(info["zeros"]) for info in self.layers.values())
        return zeros / total if total else 0.0

    def fallbacks(self) -> int:
        return sum(len(info["fallback_experts"]) for info in self.layers.values())


def input_groups(layout: ModelLayout) -> dict[str, list[str]]:
    """FFN linears grouped by the tensor they read: 'in' (gate+up / fc1) and one group per output layer."""
    ffn = layout.select("ffn")
    groups: dict[str, list[str]] = {}
    inputs = [lin.name for lin in ffn if lin.role == "ffn_in"]
    if inputs:
        groups["in"] = inputs
    outputs = [lin.name for lin in ffn if lin.role == "ffn_out"]
    for i, name in enumerate(outputs):
        groups["out" if len(outputs) == 1 else f"out{i}"] = [name]
    return groups


def _cluster_hessians(batches: list[torch.Tensor], router: Router, device: torch.device) -> tuple[list[Hessian], list[int]]:
    """One Hessian per cluster, fed batch by batch with that cluster's tokens (in order)."""
    hessians = [Hessian(router.in_features, device) for _ in range(router.experts)]
    for batch in batches:
        batch = batch.to(device)
        labels = router.assign(batch)
        if router.experts == 1:
            hessians[0].update(batch)
            continue
        order = torch.argsort(labels, stable=True)  # tokens grouped by cluster, in their original order
        counts = torch.bincount(labels, minlength=router.experts).tolist()
        for hessian, chunk in zip(hessians, batch.index_select(0, order).split(counts)):
            if chunk.shape[0]:
                hessian.update(chunk)
    return hessians, [h.tokens for h in hessians]


def expand_block(block: nn.Module, index: int, layout: ModelLayout, feed, spec: SparsitySpec,
                 options: PruneOptions, config: ExpansionConfig, device: torch.device,
                 report: ExpansionReport) -> None:
    modules = {lin.name: block.get_submodule(lin.name) for lin in layout.select("ffn")}
    groups = input_groups(layout)
    recorded: dict[str, list[torch.Tensor]] = {group: [] for group in groups}
    handles = []
    for group, names in groups.items():
        def hook(_module, args, _output, store=recorded[group]):
            x = args[0].detach()
            store.append(x.reshape(-1, x.shape[-1]))
        handles.append(modules[names[0]].register_forward_hook(hook))
    try:
        feed()
    finally:
        for handle in handles:
            handle.remove()

    routers = nn.ModuleDict()
    prefix = f"{layout.blocks_path}.{index}"
    for group, names in groups.items():
        batches = recorded.pop(group)
        start = time.perf_counter()
        router = fit_router(torch.cat(batches), config.experts, config.pca_reduction, config.kmeans_restarts,
                            config.seed, config.backend).to(device)
        report.router_seconds += time.perf_counter() - start
        hessians, sizes = _cluster_hessians(batches, router, device)
        del batches
        small = [e for e, n in enumerate(sizes) if n < config.min_cluster_tokens]
        matrices = torch.stack([h.matrix for h in hessians])
        if small:
            # The layer's whole Hessian: the token-weighted mean of the cluster Hessians.
            total = sum(sizes)
            whole = sum(h.matrix * (n / total) for h, n in zip(hessians, sizes))
            matrices[small] = whole
        del hessians
        report.routers[f"{prefix}.{ROUTERS_ATTR}.{group}"] = {"tokens_per_expert": sizes,
                                                               "components": router.components}
        factors = hessian_factors(matrices, options.percdamp)  # shared by the layers of this group
        del matrices
        for name in names:
            module = modules[name]
            weight = linear_weight(module).detach().to(device)
            stacked = weight.unsqueeze(0).expand(config.experts, *weight.shape)
            result = sparsegpt_prune(stacked, None, spec, blocksize=options.blocksize, bits=options.bits,
                                     factors=factors)
            bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
            expert_linear = ExpertLinear(router, result.weight.to(weight.dtype), bias)
            block.set_submodule(name, expert_linear)
            zeros = (expert_linear.weight == 0).flatten(1).sum(1).tolist()
            report.layers[f"{prefix}.{name}"] = {"shape": list(weight.shape), "numel": weight.numel(),
                                                 "router": group, "zeros": zeros,
                                                 "sparsity": [z / weight.numel() for z in zeros],
                                                 "fallback_experts": small}
        routers[group] = router
    setattr(block, ROUTERS_ATTR, routers)


def expand_model(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, spec: SparsitySpec,
                 config: ExpansionConfig, options: PruneOptions | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 8, progress: bool = True) -> ExpansionReport:
    """Turn every FFN linear of every block into `config.experts` SparseGPT experts, in place."""
    config.validate()
    options = options or PruneOptions()
    device = torch.device(device)
    ffn = layout.select("ffn")
    for lin in ffn:
        check_nm_shape(lin.in_features, spec, lin.name)
        pca_components(lin.in_features, config.pca_reduction)
    tokens = windows.numel()
    if tokens < config.experts:
        raise UsageError(f"{config.experts} experts but only {tokens} calibration tokens; use fewer experts "
                         "or more calibration data")
    report = ExpansionReport(spec=spec, config=config)
    start = time.perf_counter()

    def process_block(index: int, block: nn.Module, feed) -> None:
        expand_block(block, index, layout, feed, spec, options, config, device, report)

    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress,
                                   desc=f"expand x{config.experts}")
    engine.run(windows, process_block)
    clear_router_memos(model)  # drop the last calibration batch the routers still hold
    report.seconds = time.perf_counter() - start
    return report
