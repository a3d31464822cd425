"""Prune a whole model: discovery + the sequential engine + one per-layer method."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import SequentialCalibration, record_inputs
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


def _prune_linear(name: str, module: nn.Module, method: PruningMethod, statistic, spec: SparsitySpec,
                  options: PruneOptions, report: PruneReport, compute_device: torch.device) -> None:
    weight = linear_weight(module).detach().to(compute_device)
    pruned = method.prune(weight, statistic, spec, options)
    set_linear_weight(module, pruned)
    zeros = int((linear_weight(module) == 0).sum())
    numel = weight.numel()
    report.layers[name] = {"shape": list(weight.shape), "zeros": zeros, "numel": numel, "sparsity": zeros / numel}


def prune_model(model: nn.Module, layout: ModelLayout, windows: torch.Tensor | None, method: PruningMethod,
                spec: SparsitySpec, scope: str = "ffn", options: PruneOptions | None = None,
                device: torch.device | str = "cpu", batch_size: int = 8, progress: bool = True) -> PruneReport:
    """Prune the selected linears of every block in place and report the measured sparsity per layer."""
    options = options or PruneOptions()
    device = torch.device(device)
    selected = layout.select(scope)
    for lin in selected:
        check_nm_shape(lin.in_features, spec, lin.name)
    report = PruneReport(method=method.name, spec=spec, scope=scope)
    prefix = layout.blocks_path
    start = time.perf_counter()

    if method.statistic is None:
        # Data-free (magnitude): no calibration pass needed.
        for index in tqdm(range(len(layout.blocks)), desc=method.name, disable=not progress, leave=False):
            for name, module in layout.modules(index, scope).items():
                _prune_linear(f"{prefix}.{index}.{name}", module, method, None, spec, options, report, device)
        report.seconds = time.perf_counter() - start
        return report

    def process_block(index: int, block: nn.Module, feed) -> None:
        modules = layout.modules(index, scope)
        statistics = {name: method.statistic(linear_weight(m).shape[1], device) for name, m in modules.items()}
        with record_inputs(modules, statistics):
            feed()
        for name, module in modules.items():
            _prune_linear(f"{prefix}.{index}.{name}", module, method, statistics[name], spec, options, report,
                          device)

    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress,
                                   desc=method.name)
    engine.run(windows, process_block)
    report.seconds = time.perf_counter() - start
    return report
