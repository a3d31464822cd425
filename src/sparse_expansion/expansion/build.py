"""Build a Sparse Expansion model one decoder block at a time.

For each block (on the dense block's calibration inputs):
1. record the inputs of the FFN linears: the FFN input (shared by gate and up, or fc1) and the
   intermediate activation (the input of down, or fc2);
2. fit one router per distinct input: PCA to d_in // reduction dimensions, then k-means (fitting.py);
3. accumulate one statistic per cluster from that cluster's tokens and prune one copy of the dense
   weight per cluster with the experts' method from the pruning registry (SparseGPT by default; all
   experts of a layer in one batched pass);
4. replace each FFN linear with an `ExpertLinear` and attach the routers to the block.
The engine then propagates the calibration batches through the *expanded* block, with routing, so the
next block calibrates on what the expanded model really produces.

A cluster with fewer than `min_cluster_tokens` tokens would give an unreliable statistic (an empty one
gives none at all): its experts are pruned with the layer's whole statistic (all clusters merged)
instead, and the manifest says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import SequentialCalibration, Step, TokenRecorder, Watch
from ..errors import UsageError
from ..layers import ROUTERS_ATTR, ExpertLinear, Router, clear_router_memos
from ..models.discovery import ModelLayout, linear_weight
from ..pruning.masks import check_nm_shape
from ..pruning.methods import PruneOptions, PruningMethod, get_method
from ..pruning.spec import SparsitySpec
from .fitting import INITS, fit_router, pca_components


@dataclass(frozen=True)
class ExpansionConfig:
    experts: int = 16
    pca_reduction: int | None = 32  # None: cluster the raw inputs (--no-pca)
    kmeans_restarts: int = 1
    kmeans_iterations: int = 300  # Lloyd iterations at most, per restart
    kmeans_init: str = "k-means++"  # or "random": k distinct random tokens
    seed: int = 0
    backend: str = "torch"
    min_cluster_tokens: int = 32
    method: str = "sparsegpt"  # how each expert is pruned on its cluster: a name from the pruning registry

    def validate(self) -> None:
        if self.experts < 1:
            raise UsageError(f"--experts must be at least 1, got {self.experts}")
        if self.pca_reduction is not None and self.pca_reduction < 1:
            raise UsageError(f"--pca-reduction must be at least 1, got {self.pca_reduction}")
        if self.kmeans_restarts < 1:
            raise UsageError(f"--kmeans-restarts must be at least 1, got {self.kmeans_restarts}")
        if self.kmeans_iterations < 1:
            raise UsageError(f"--kmeans-iterations must be at least 1, got {self.kmeans_iterations}")
        if self.kmeans_init not in INITS:
            raise UsageError(f"unknown --kmeans-init {self.kmeans_init!r}; choose one of {', '.join(INITS)}")
        if get_method(self.method).statistic is None:
            raise UsageError(f"--expert-method {self.method} uses no calibration data, so every expert would be "
                             "the same; choose a method that does (wanda, sparsegpt)")


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

    def describe(self, options: PruneOptions | None = None) -> dict:
        """What a manifest records of this run."""
        options = options or PruneOptions()
        config = self.config
        return {"method": "sparse-expansion", "sparsity": self.spec.sparsity,
                "nm": f"{self.spec.n}:{self.spec.m}" if self.spec.is_nm else None, "scope": "ffn",
                "bits": options.bits, "blocksize": options.blocksize, "percdamp": options.percdamp,
                "seconds": self.seconds, "overall_sparsity": self.overall_sparsity(),
                "experts": config.experts, "expert_method": config.method, "pca_reduction": config.pca_reduction,
                "kmeans_restarts": config.kmeans_restarts, "kmeans_iterations": config.kmeans_iterations,
                "kmeans_init": config.kmeans_init, "router_backend": config.backend,
                "min_cluster_tokens": config.min_cluster_tokens, "router_seconds": self.router_seconds,
                "fallback_experts": self.fallbacks(), "routers": self.routers, "layers": self.layers}


def _cluster_statistics(batches: list[torch.Tensor], router: Router, statistic_type, device: torch.device) -> list:
    """One statistic per cluster, fed batch by batch with that cluster's tokens (in order)."""
    statistics = [statistic_type(router.in_features, device) for _ in range(router.experts)]
    for batch in batches:
        batch = batch.to(device)
        if router.experts == 1:
            statistics[0].update(batch)
            continue
        labels = router.assign(batch)
        order = torch.argsort(labels, stable=True)  # tokens grouped by cluster, in their original order
        counts = torch.bincount(labels, minlength=router.experts).tolist()
        for statistic, chunk in zip(statistics, batch.index_select(0, order).split(counts)):
            if chunk.shape[0]:
                statistic.update(chunk)
    return statistics


class ExpandStep(Step):
    """observe: record the FFN input and the intermediate activation (one recorder per input group);
    modify: fit a router per group, one statistic per cluster, prune k copies of each weight with the
    experts' pruning method, swap in the expert layers and attach the routers to the block."""

    def __init__(self, layout: ModelLayout, spec: SparsitySpec, config: ExpansionConfig, options: PruneOptions,
                 method: PruningMethod, device: torch.device, report: ExpansionReport):
        self.layout, self.spec, self.config, self.options = layout, spec, config, options
        self.method, self.device, self.report = method, device, report
        self.groups = layout.input_groups("ffn")

    def observe(self, index: int, block: nn.Module) -> dict[str, Watch]:
        return {group: Watch(names[0], TokenRecorder()) for group, names in self.groups.items()}

    def modify(self, index: int, block: nn.Module, statistics: dict[str, TokenRecorder]) -> None:
        config, report = self.config, self.report
        routers = nn.ModuleDict()
        prefix = f"{self.layout.blocks_path}.{index}"
        for group, names in self.groups.items():
            batches = statistics[group].batches
            start = time.perf_counter()
            router = fit_router(torch.cat(batches), config.experts, config.pca_reduction, config.kmeans_restarts,
                                config.seed, config.backend, max_iter=config.kmeans_iterations,
                                init=config.kmeans_init).to(self.device)
            report.router_seconds += time.perf_counter() - start
            clusters = _cluster_statistics(batches, router, self.method.statistic, self.device)
            batches.clear()
            sizes = [s.tokens for s in clusters]
            small = [e for e, n in enumerate(sizes) if n < config.min_cluster_tokens]
            if small:
                # The layer's whole statistic (all clusters combined) for the clusters too small for their own.
                whole = self.method.statistic.combine(clusters)
                clusters = [whole if e in small else cluster for e, cluster in enumerate(clusters)]
            stacked = self.method.statistic.stack(clusters)  # shared by the layers of this group
            del clusters
            report.routers[f"{prefix}.{ROUTERS_ATTR}.{group}"] = {"tokens_per_expert": sizes,
                                                                   "components": router.components}
            for name in names:
                module = block.get_submodule(name)
                weight = linear_weight(module).detach().to(self.device)
                stacked_weight = weight.unsqueeze(0).expand(config.experts, *weight.shape)
                pruned = self.method.prune(stacked_weight, stacked, self.spec, self.options)
                bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
                expert_linear = ExpertLinear(router, pruned.to(weight.dtype), bias)
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
                 batch_size: int = 8, progress: bool = True, engine_options: dict | None = None) -> ExpansionReport:
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

    method = get_method(config.method, options.bits)
    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress,
                                   desc=f"expand x{config.experts}")
    engine.run(windows, ExpandStep(layout, spec, config, options, method, device, report), **(engine_options or {}))
    clear_router_memos(model)  # drop the last calibration batch the routers still hold
    report.seconds = time.perf_counter() - start
    return report
