"""Build a Sparse Expansion model one decoder block at a time.

For each block (on the dense block's calibration inputs):
1. record the inputs of the FFN linears: the FFN input (shared by gate and up, or fc1) and the
   intermediate activation (the input of down, or fc2);
2. fit one router per distinct input: PCA to d_in // reduction dimensions, then k-means (fitting.py);
3. accumulate one statistic per cluster from that cluster's tokens and prune one copy of the dense
   weight per cluster with the experts' method from the pruning registry (SparseGPT by default; all
   experts of a layer in one batched pass);
   under torch.distributed the experts are divided among the ranks (divided.py): the router is fitted once
   and broadcast, each cluster's tokens go to the rank that owns its expert, which accumulates its statistic
   in the one-process order and prunes it, and once the block's statistics are gone each expert is broadcast
   from its owner (selective expansion, which scores rows on all the inputs, gathers every rank's tokens
   instead);
4. replace each FFN linear with an `ExpertLinear` and attach the routers to the block.
With `selective` (a fraction p of rows), only the top p of each linear's output rows, by a score the caller
supplies (`row_scores`), become expert rows (a (k, rows, in) stack pruned as above); the other rows are
pruned once with the layer's whole statistic and shared by all tokens (`SelectiveExpertLinear`).
The engine then propagates the calibration batches through the *expanded* block, with routing, so the
next block calibrates on what the expanded model really produces.

A cluster with fewer than `min_cluster_tokens` tokens would give an unreliable statistic (an empty one
gives none at all): its experts are pruned with the layer's whole statistic (all clusters merged)
instead, and the manifest says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .. import distributed
from ..calibration import BlockHooks, Hessian, SequentialCalibration, Step, TokenRecorder, Watch
from ..errors import UsageError
from ..layers import ROUTERS_ATTR, ExpertLinear, Router, SelectiveExpertLinear, by_expert, clear_router_memos
from ..models.discovery import ModelLayout, linear_weight
from ..pruning.masks import check_nm_shape, highest_first
from ..pruning.methods import PruneOptions, PruningMethod, get_method
from ..pruning.spec import SparsitySpec
from ..runtime import free_bytes
from ..settings import AtLeast, Interval, check_fields, setting
from . import divided as divided_fit
from .fitting import EXPERTS, INITS, PCA_REDUCTION, fit_router, pca_components, sample_tokens

# (layer path, weight (out, in), the layer's calibration inputs (tokens, in) on the compute device, bias or
# None) -> one score per output row; the highest scores are expanded.
RowScores = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


STATISTIC_DTYPES = ("float32", "bfloat16")
# Share of the compute device's free memory that one input group's cluster statistics may take there; beyond it
# they accumulate on the host (and go to the device a batch of experts at a time, as they are pruned).
STATISTIC_MEMORY_SHARE = 0.4


def _data_methods() -> list[str]:
    from ..pruning.methods import METHODS

    return [name for name, method in METHODS.items() if method.statistic is not None]


@dataclass(frozen=True)
class ExpansionConfig:
    """How each FFN linear becomes a mixture of sparse experts (checked on construction)."""

    experts: int = setting(16, "experts per FFN linear", EXPERTS)
    pca_reduction: int | None = setting(32, "route in d_in // R PCA dimensions", PCA_REDUCTION,
                                        off_flag=("--no-pca", "cluster the raw inputs instead of their PCA projection"))
    kmeans_restarts: int = setting(1, "k-means++ restarts, lowest inertia kept (as scikit-learn)", AtLeast(1))
    kmeans_iterations: int = setting(300, "Lloyd iterations at most, per restart", AtLeast(1))
    kmeans_init: str = setting("k-means++", "k-means seeding", choices=INITS)
    seed: int = setting(0, "seed of the routers' k-means (the CLI uses the calibration seed)", cli=False)
    backend: str = setting("torch", "library that fits PCA and k-means (see docs/BENCHMARKS.md)",
                           choices=("torch", "sklearn"), flag="--router-backend")
    min_cluster_tokens: int = setting(32, "clusters with fewer calibration tokens use the layer's whole statistic",
                                      AtLeast(1))
    router_tokens: int | None = setting(None, "fit each router's PCA and k-means on a seeded sample of at most N "
                                              "calibration tokens; every token is then routed for its cluster's "
                                              "statistic (default: all tokens)", AtLeast(1), metavar="N")
    method: str = setting("sparsegpt", "how each expert is pruned on its cluster", choices=_data_methods,
                          flag="--expert-method")
    statistic_dtype: str | None = setting(
        None, "precision of the cluster statistics while they accumulate (bfloat16: half their memory; its effect "
        "on perplexity is measured in docs/BENCHMARKS.md) (default: float32)", choices=STATISTIC_DTYPES)
    statistic_device: str | None = setting(
        None, "where cluster statistics accumulate: cpu keeps them on the host; default: the compute device, or the "
        "host when they would not fit in STATISTIC_MEMORY_SHARE of its free memory", choices=("cpu",))
    selective: float | None = setting(
        None, "expand only the share of each FFN linear's rows that score highest (the CLI takes a percentage P, "
        "Python a fraction); the other rows are pruned once and shared (default: expand every row)",
        Interval(0, 1, what="a share of rows"), scale=100, metavar="P",
        flag="--selective")

    def __post_init__(self):
        check_fields(self)

    def check_bits(self, bits: int | None) -> None:
        """Joint quantization needs experts pruned by a method that supports it."""
        if bits is not None:
            get_method(self.method, bits)


@dataclass
class ExpansionReport:
    spec: SparsitySpec
    config: ExpansionConfig
    seconds: float = 0.0
    router_seconds: float = 0.0
    statistic_bytes: int = 0  # the most bytes of cluster statistics this process held at once (one input group)
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
        options = (options or PruneOptions()).for_experts()
        config = self.config
        return {"method": "sparse-expansion", "sparsity": self.spec.sparsity,
                "nm": f"{self.spec.n}:{self.spec.m}" if self.spec.is_nm else None, "scope": "ffn",
                "bits": options.bits, "blocksize": options.blocksize, "percdamp": options.percdamp,
                "factorization": options.factorization,
                "seconds": self.seconds, "overall_sparsity": self.overall_sparsity(),
                "experts": config.experts, "expert_method": config.method, "pca_reduction": config.pca_reduction,
                "kmeans_restarts": config.kmeans_restarts, "kmeans_iterations": config.kmeans_iterations,
                "kmeans_init": config.kmeans_init, "router_backend": config.backend,
                "min_cluster_tokens": config.min_cluster_tokens, "selective": config.selective,
                "router_seconds": self.router_seconds, "cluster_statistic_bytes": self.statistic_bytes,
                "fallback_experts": self.fallbacks(), "routers": self.routers, "layers": self.layers}


def _cluster_statistics(batches: list[torch.Tensor], router: Router, new_statistic, device: torch.device) -> list:
    """One statistic per cluster (`new_statistic(in_features)`), fed batch by batch with that cluster's tokens (in
    order; routed on `device`)."""
    statistics = [new_statistic(router.in_features) for _ in range(router.experts)]
    for batch in batches:
        batch = batch.to(device)
        if router.experts == 1:
            statistics[0].update(batch)
            continue
        _, chunks = by_expert(batch, router.assign(batch), router.experts)
        for statistic, chunk in zip(statistics, chunks):
            if chunk.shape[0]:
                statistic.update(chunk)
    return statistics


def select_rows(scores: torch.Tensor, fraction: float, rows: int, path: str) -> torch.Tensor:
    """The ceil(fraction * rows) rows with the highest scores (at least one), in ascending order; ties go to
    the lower index and NaN scores rank lowest, so the same scores always select the same rows."""
    scores = torch.as_tensor(scores)
    if scores.shape != (rows,):
        raise UsageError(f"row scores for {path}: expected {rows} values, got shape {tuple(scores.shape)}")
    count = min(rows, max(1, math.ceil(fraction * rows - 1e-9)))  # 1e-9: 0.3 * 10 is 3, not 3.0000000000000004
    return highest_first(scores, count).sort().values


@dataclass
class GroupFit:
    """A router fitted on one input's calibration tokens and the experts' statistics from its clusters."""

    router: Router
    clusters: list  # one statistic per expert (the method's statistic type); in a divided fit, this rank's
    whole: object | None  # all clusters combined (for small clusters and shared rows), when asked for
    sizes: list[int]  # calibration tokens per cluster
    small: list[int]  # clusters with fewer than min_cluster_tokens: pruned on the whole statistic
    router_seconds: float
    stack_of: object = None  # the statistic type (its `stack`)
    _stacks: dict = field(default_factory=dict)

    def stack(self, start: int, end: int, keep: bool = True):
        """Experts start..end-1's statistics as one batched statistic. `keep`: for the next linear that reads
        the same input (its factorization is cached on it); else the clusters' own copies are dropped."""
        key = (start, end)  # positions in `clusters`
        stacked = self._stacks.pop(key, None)  # the last linear to read it lets it go once pruned
        if stacked is None:
            stacked = self.stack_of.stack(self.clusters[start:end])
        if keep:
            self._stacks[key] = stacked
        else:
            self.clusters[start:end] = [None] * (end - start)
        return stacked


# Share of the free memory (host or GPU) that one batch of experts may take while it is pruned; larger
# layers are pruned a few experts at a time (a Llama-7B down projection needs ~2 GB per expert in fp32).
EXPERT_MEMORY_SHARE = 0.3


def experts_per_batch(rows: int, cols: int, experts: int, device: torch.device) -> int:
    """How many experts of a (rows, cols) weight to prune at once: each needs its Hessian, its copy in the
    factorization and the factor (3 x cols^2 floats) and about four (rows, cols) work arrays."""
    per_expert = 4 * (3 * cols * cols + 4 * rows * cols)
    return max(1, min(experts, int(EXPERT_MEMORY_SHARE * free_bytes(device)) // per_expert))


def statistic_placement(config: ExpansionConfig, method: PruningMethod, in_features: int, experts: int,
                        device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a group's cluster statistics accumulate (ExpansionConfig.statistic_device,
    statistic_dtype): on the host when asked, or when `experts` of them would take more than
    STATISTIC_MEMORY_SHARE of the compute device's free memory."""
    dtype = getattr(torch, config.statistic_dtype or "float32")
    if config.statistic_device == "cpu" or device.type == "cpu":
        return torch.device("cpu"), dtype
    per_feature = in_features if method.statistic is not None and issubclass(method.statistic, Hessian) else 1
    needed = experts * in_features * per_feature * torch.empty(0, dtype=dtype).element_size()
    return (torch.device("cpu") if needed > STATISTIC_MEMORY_SHARE * free_bytes(device) else device), dtype


def fit_group(batches: list[torch.Tensor], config: ExpansionConfig, method: PruningMethod, device: torch.device,
              whole: bool = False, in_features: int | None = None) -> GroupFit:
    """Fit the router on the tokens (at most `router_tokens` of them, a seeded sample), then route every token and
    accumulate one statistic per cluster (batches are consumed). A cluster with fewer than `min_cluster_tokens`
    tokens uses the layer's whole statistic instead.

    Under torch.distributed, unless `whole` is asked for, the batches are this rank's own and the fit is divided:
    `clusters` holds the statistics of this rank's experts only (divided.py; `in_features` then required)."""
    in_features = in_features or batches[0].shape[-1]
    divided = distributed.active() and not whole
    owned = distributed.owned(config.experts) if divided else list(range(config.experts))
    where, dtype = statistic_placement(config, method, in_features, len(owned), device)
    if divided and any(w.type == "cpu" for w, _ in distributed.gather_objects((where, dtype))):
        where = torch.device("cpu")  # every rank alike: the same arithmetic
    new_statistic = partial(method.statistic, device=where, dtype=dtype)
    start = time.perf_counter()
    if divided:
        tokens_dtype = divided_fit.tokens_dtype(batches)
        router = divided_fit.fit_router_once(batches, in_features, tokens_dtype, config, device)
        seconds = time.perf_counter() - start
        mine, sizes = divided_fit.owned_cluster_statistics(batches, router, tokens_dtype, new_statistic, device)
        clusters = [mine[e] for e in owned]

        def combine():
            return method.statistic.combine_owned(mine, sizes, in_features, where, dtype)
    else:
        tokens = sample_tokens(torch.cat(batches), config.router_tokens, config.seed)
        router = fit_router(tokens, config.experts, config.pca_reduction, config.kmeans_restarts,
                            config.seed, config.backend, max_iter=config.kmeans_iterations,
                            init=config.kmeans_init, overwrite=True).to(device)
        del tokens
        seconds = time.perf_counter() - start
        clusters = _cluster_statistics(batches, router, new_statistic, device)
        sizes = [s.tokens for s in clusters]

        def combine():
            return method.statistic.combine(clusters)
    batches.clear()
    small = [e for e, n in enumerate(sizes) if n < config.min_cluster_tokens]
    combined = combine() if small or whole else None
    if small:
        clusters = [combined if e in small else cluster for e, cluster in zip(owned, clusters, strict=True)]
    return GroupFit(router, clusters, combined, sizes, small, seconds, stack_of=method.statistic)


def statistic_bytes(fit: GroupFit) -> int:
    """Bytes of the distinct statistics a fit holds (its clusters' and the whole one)."""
    distinct = {id(s): s for s in (*fit.clusters, fit.whole) if s is not None}
    return sum(t.nbytes for s in distinct.values() for t in vars(s).values() if isinstance(t, torch.Tensor))


def prune_experts(weight: torch.Tensor, fit: GroupFit, method: PruningMethod, spec: SparsitySpec,
                  options: PruneOptions, keep: bool = True) -> torch.Tensor:
    """One pruned copy of `weight` (rows, in) per expert whose statistic the fit holds (in a divided fit, this
    rank's), each on its cluster's statistic: (experts, rows, in). Experts are pruned in batches that fit the free
    memory (all at once for small layers); `keep`: the batched statistics stay for another linear that reads the
    same input."""
    experts = len(fit.clusters)
    if experts == 0:  # a rank of a divided fit that owns no expert (more ranks than experts)
        return weight.new_empty((0, *weight.shape))
    size = experts_per_batch(*weight.shape, experts, weight.device)
    parts = []
    for start in range(0, experts, size):
        end = min(experts, start + size)
        parts.append(method.prune(weight.unsqueeze(0).expand(end - start, *weight.shape), fit.stack(start, end, keep),
                                  spec, options).to(weight.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _zeros(stack: torch.Tensor) -> list[int]:
    """Each expert's zero count, one expert's mask at a time (a whole 7B stack's mask is 0.7 GB beside it)."""
    return [int((expert == 0).sum()) for expert in stack]


def expand_linear(module: nn.Module, inputs: torch.Tensor, spec: SparsitySpec, config: ExpansionConfig,
                  options: PruneOptions | None = None) -> tuple[Router, torch.Tensor, torch.Tensor | None]:
    """Expand one linear layer on its calibration inputs (tokens, in), outside any model: its router, the
    (k, out, in) pruned experts and the bias. (What the analysis uses to vary the number of experts.)"""
    method = get_method(config.method)
    fit = fit_group([inputs], config, method, inputs.device)
    weight = linear_weight(module).detach().to(inputs.device)
    bias = getattr(module, "bias", None)
    experts = prune_experts(weight, fit, method, spec, (options or PruneOptions()).for_experts())
    return fit.router, experts, None if bias is None else bias.detach()


class ExpandStep(Step):
    """observe: record the FFN input and the intermediate activation (one recorder per input group);
    modify: fit a router per group, one statistic per cluster, prune k copies of each weight (or of its
    selected rows) with the experts' pruning method, swap in the expert layers and attach the routers to
    the block."""

    def __init__(self, layout: ModelLayout, spec: SparsitySpec, config: ExpansionConfig, options: PruneOptions,
                 method: PruningMethod, device: torch.device, report: ExpansionReport,
                 row_scores: RowScores | None = None):
        if config.selective is not None and row_scores is None:
            raise UsageError("selective expansion needs row scores (row_scores) to choose the rows to expand")
        self.layout, self.spec, self.config, self.options = layout, spec, config, options
        self.method, self.device, self.report = method, device, report
        self.row_scores = row_scores
        self.groups = layout.input_groups("ffn")
        self.groups_of = {name: group for group, names in self.groups.items() for name in names}

    def observe(self, index: int, block: nn.Module) -> dict[str, Watch]:
        # Under torch.distributed a divided fit exchanges only what each rank's experts need; the selective
        # path scores rows on all the inputs, so it gathers them.
        gather = self.config.selective is not None
        return {group: Watch(names[0], TokenRecorder(gather=gather)) for group, names in self.groups.items()}

    def modify(self, index: int, block: nn.Module, statistics: dict[str, TokenRecorder]) -> None:
        config, report = self.config, self.report
        selective = config.selective is not None
        routers = nn.ModuleDict()
        prefix = f"{self.layout.blocks_path}.{index}"
        owned = {}  # linear name -> its router, this rank's pruned experts (all of them in one process), bias
        for group, names in self.groups.items():
            batches = statistics[group].batches
            inputs = torch.cat(batches).to(self.device) if selective else None  # what the row scores read
            in_features = linear_weight(block.get_submodule(names[0])).shape[1]
            fit = fit_group(batches, config, self.method, self.device, whole=selective, in_features=in_features)
            report.router_seconds += fit.router_seconds
            report.statistic_bytes = max(report.statistic_bytes, statistic_bytes(fit))
            router = fit.router
            report.routers[f"{prefix}.{ROUTERS_ATTR}.{group}"] = {"tokens_per_expert": fit.sizes,
                                                                   "components": router.components}
            for name in names:
                keep = name != names[-1]  # another linear reads this input: keep its batched statistics
                path = f"{prefix}.{name}"
                module = block.get_submodule(name)
                weight = linear_weight(module).detach().to(self.device)
                bias = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
                if selective:
                    layer = self._selective_layer(path, router, weight, bias, inputs, fit, fit.whole, keep)
                    shared_zeros = int((layer.shared_weight == 0).sum())
                    zeros = [shared_zeros + z for z in _zeros(layer.expert_weight)]
                    self._record(path, weight, group, fit.small, zeros, selected_rows=layer.selected_features)
                    block.set_submodule(name, layer)
                    continue
                # On a GPU the finished experts wait on the host while the block's next group is fitted and
                # pruned (a Llama-2-70B gate and up: 15 GB in fp16 next to the down projection's work).
                experts = self._prune_experts(weight, fit, keep)
                owned[name] = (router, experts if self.device.type == "cpu" else experts.cpu(), bias, fit.small)
            del fit, inputs  # the group's statistics (and what the row scores read) go before the next group's
            routers[group] = router
            if selective and self.device.type != "cpu":  # as the experts above: they wait on the host
                for name in names:
                    block.get_submodule(name).to("cpu")
        # Every expert from its owner (a rank holds only its own until the block's statistics are gone: the
        # whole expanded block is needed only to propagate through it).
        for name, (router, experts, bias, small) in owned.items():
            owned[name] = None
            experts = distributed.assemble_owned(experts.to(self.device), self.config.experts)
            layer = ExpertLinear(router, experts, bias)
            self._record(f"{prefix}.{name}", linear_weight(block.get_submodule(name)), self.groups_of[name], small,
                         _zeros(layer.weight))
            block.set_submodule(name, layer)
        setattr(block, ROUTERS_ATTR, routers)
        block.to(self.device)  # whole again for the propagation

    def _record(self, path: str, weight: torch.Tensor, group: str, small: list[int], zeros: list[int],
                **extra) -> None:
        self.report.layers[path] = {"shape": list(weight.shape), "numel": weight.numel(), "router": group,
                                    "zeros": zeros, "sparsity": [z / weight.numel() for z in zeros],
                                    "fallback_experts": small, **extra}

    def _prune_experts(self, weight: torch.Tensor, fit: GroupFit, keep: bool) -> torch.Tensor:
        return prune_experts(weight, fit, self.method, self.spec, self.options, keep)

    def _selective_layer(self, path: str, router: Router, weight: torch.Tensor, bias: torch.Tensor | None,
                         inputs: torch.Tensor, fit: GroupFit, whole, keep: bool) -> SelectiveExpertLinear:
        """Expand the rows the scores rank highest; prune the others once, on the whole statistic."""
        rows = weight.shape[0]
        scores = self.row_scores(path, weight, inputs, None if bias is None else bias.to(self.device))
        expert_rows = select_rows(scores, self.config.selective, rows, path)
        shared = torch.ones(rows, dtype=torch.bool)
        shared[expert_rows] = False
        shared_rows = shared.nonzero().flatten().to(weight.device)
        expert_rows = expert_rows.to(weight.device)
        shared_weight = weight.index_select(0, shared_rows)
        if shared_rows.numel():
            shared_weight = self.method.prune(shared_weight, whole, self.spec, self.options)
        expert_weight = self._prune_experts(weight.index_select(0, expert_rows), fit, keep)
        return SelectiveExpertLinear(router, shared_weight.to(weight.dtype), expert_weight.to(weight.dtype),
                                     shared_rows, expert_rows, bias)


def expand_model(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, spec: SparsitySpec,
                 config: ExpansionConfig, options: PruneOptions | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 8, progress: bool = True, hooks: BlockHooks | None = None,
                 offload_dir: str | None = None,
                 row_scores: RowScores | None = None, report: ExpansionReport | None = None) -> ExpansionReport:
    """Turn every FFN linear of every block into `config.experts` SparseGPT experts, in place.

    With `config.selective`, only the rows that `row_scores` ranks highest become experts (see `RowScores`).
    """
    options = (options or PruneOptions()).for_experts()
    device = torch.device(device)
    ffn = layout.select("ffn")
    for lin in ffn:
        check_nm_shape(lin.in_features, spec, lin.name)
        pca_components(lin.in_features, config.pca_reduction)
    tokens = windows.numel()
    if tokens < config.experts:
        raise UsageError(f"{config.experts} experts but only {tokens} calibration tokens; use fewer experts "
                         "or more calibration data")
    report = report or ExpansionReport(spec=spec, config=config)
    start = time.perf_counter()

    method = get_method(config.method, options.bits)
    step = ExpandStep(layout, spec, config, options, method, device, report, row_scores)
    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress,
                                   desc=f"expand x{config.experts}", hooks=hooks, offload_dir=offload_dir)
    engine.run(windows, step)
    clear_router_memos(model)  # drop the last calibration batch the routers still hold
    report.seconds = time.perf_counter() - start
    return report
