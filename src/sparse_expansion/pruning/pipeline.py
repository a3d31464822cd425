"""Prune a whole model: discovery + the sequential engine + one per-layer method from the registry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..calibration import BlockHooks, SequentialCalibration, Step, Watch
from ..models.discovery import ModelLayout, linear_weight, set_linear_weight
from .masks import check_nm_shape
from .methods import PruneOptions, PruningMethod
from .spec import SparsitySpec


@dataclass
class PruneReport:
    method: str
    spec: SparsitySpec
    scope: str
    seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)  # "blocks.3.mlp.up_proj" -> measured sparsity, shape

    def overall_sparsity(self) -> float:
        zeros = sum(info["zeros"] for info in self.layers.values())
        total = sum(info["numel"] for info in self.layers.values())
        return zeros / total if total else 0.0

    def describe(self, options: PruneOptions | None = None) -> dict:
        """What a manifest records of this run."""
        options = options or PruneOptions()
        return {"method": self.method, "sparsity": self.spec.sparsity,
                "nm": f"{self.spec.n}:{self.spec.m}" if self.spec.is_nm else None, "scope": self.scope,
                "bits": options.bits, "blocksize": options.blocksize, "percdamp": options.percdamp,
                "seconds": self.seconds, "overall_sparsity": self.overall_sparsity(), "layers": self.layers}


def _pruned_weight(module: nn.Module, method: PruningMethod, statistic, spec: SparsitySpec, options: PruneOptions,
                   compute_device: torch.device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The module's weight pruned (only `rows`, when given: pruned as one matrix of their own, the others
    left as they are)."""
    weight = linear_weight(module).detach().to(compute_device)
    if rows is None:
        return method.prune(weight, statistic, spec, options)
    rows = rows.to(compute_device)
    pruned = weight.clone()
    pruned[rows] = method.prune(weight[rows], statistic, spec, options)
    return pruned


def _record(name: str, pruned: torch.Tensor, report: PruneReport, rows: torch.Tensor | None = None) -> None:
    measured = pruned if rows is None else pruned[rows.to(pruned.device)]
    zeros = int((measured == 0).sum())
    report.layers[name] = {"shape": list(measured.shape), "zeros": zeros, "numel": measured.numel(),
                           "sparsity": zeros / measured.numel()}


def _prune_linear(name: str, module: nn.Module, method: PruningMethod, statistic, spec: SparsitySpec,
                  options: PruneOptions, report: PruneReport, compute_device: torch.device,
                  rows: torch.Tensor | None = None) -> None:
    pruned = _pruned_weight(module, method, statistic, spec, options, compute_device, rows)
    set_linear_weight(module, pruned)
    _record(name, linear_weight(module), report, rows)


class PruneStep(Step):
    """observe: one statistic per group of linears that read the same input; modify: prune each linear."""

    def __init__(self, layout: ModelLayout, method: PruningMethod, spec: SparsitySpec, scope: str,
                 options: PruneOptions, device: torch.device, report: PruneReport,
                 rows: dict[str, torch.Tensor] | None = None):
        self.layout, self.method, self.spec, self.scope = layout, method, spec, scope
        self.options, self.device, self.report, self.rows = options, device, report, rows
        self.groups = layout.input_groups(scope)

    def observe(self, index: int, block: nn.Module) -> dict[str, Watch]:
        watches = {}
        for group, names in self.groups.items():
            in_features = linear_weight(block.get_submodule(names[0])).shape[-1]
            watches[group] = Watch(names[0], self.method.statistic(in_features, self.device))
        return watches

    def modify(self, index: int, block: nn.Module, statistics: dict[str, object]) -> None:
        """Prune each selected linear; under torch.distributed the linears are divided among the ranks and
        each pruned weight is broadcast from the rank that computed it."""
        work = [(group, name, f"{self.layout.blocks_path}.{index}.{name}") for group, names in self.groups.items()
                for name in names]
        work = [item for item in work if self.rows is None or item[2] in self.rows]
        for position, (group, name, path) in enumerate(work):
            module = block.get_submodule(name)
            rows = None if self.rows is None else self.rows[path]
            current = linear_weight(module)
            pruned = distributed.computed_by_owner(
                position, lambda: _pruned_weight(module, self.method, statistics[group], self.spec, self.options,
                                                 self.device, rows).to(current.dtype),
                current.shape, current.dtype, self.device)
            set_linear_weight(module, pruned)
            _record(path, linear_weight(module), self.report, rows)


def prune_model(model: nn.Module, layout: ModelLayout, windows: torch.Tensor | None, method: PruningMethod,
                spec: SparsitySpec, scope: str = "ffn", options: PruneOptions | None = None,
                device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = True,
                hooks: BlockHooks | None = None, offload_dir: str | None = None,
                rows: dict[str, torch.Tensor] | None = None, report: PruneReport | None = None) -> PruneReport:
    """Prune the selected linears of every block in place and report the measured sparsity per layer.

    `hooks` and `offload_dir` go to the engine (calibration/engine.py). `rows` (layer path
    -> output row indices) prunes only those rows of those layers (the neuron ablation); the layers'
    reported sparsity is then that of the pruned rows. `report`: one to fill (e.g. holding the layers of
    blocks restored by a resumed run), else a new one.
    """
    options = options or PruneOptions()
    device = torch.device(device)
    selected = layout.select(scope)
    for lin in selected:
        check_nm_shape(lin.in_features, spec, lin.name)
    report = report or PruneReport(method=method.name, spec=spec, scope=scope)
    prefix = layout.blocks_path
    start = time.perf_counter()

    if method.statistic is None:
        # Data-free (magnitude): no calibration pass needed.
        for index in tqdm(range(len(layout.blocks)), desc=method.name, disable=not progress, leave=False):
            for name, module in layout.modules(index, scope).items():
                path = f"{prefix}.{index}.{name}"
                if rows is not None and path not in rows:
                    continue
                _prune_linear(path, module, method, None, spec, options, report, device,
                              None if rows is None else rows[path])
        report.seconds = time.perf_counter() - start
        return report

    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress,
                                   desc=method.name, hooks=hooks, offload_dir=offload_dir)
    engine.run(windows, PruneStep(layout, method, spec, scope, options, device, report, rows))
    report.seconds = time.perf_counter() - start
    return report
