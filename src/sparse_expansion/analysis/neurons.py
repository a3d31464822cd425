"""Stream a dense model block by block and measure every FFN neuron (one output row of an FFN linear).

For each selected block, an observe-only step of the calibration engine records the inputs of the FFN
linears (one recorder per input: gate and up share theirs); the neurons' pre-activation outputs
y = W x + b are computed from them, measured (Wasserstein distance to a Gaussian, mapping difficulty, mean,
standard deviation, weight norm), handed to a callback (which writes and plots them) and dropped: memory
holds one block's inputs and one layer's outputs at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from ..calibration import BlockHooks, SequentialCalibration, Step, TokenRecorder, Watch
from ..models.discovery import ModelLayout, linear_weight
from .wasserstein import mapping_difficulty, top_fraction, wasserstein_to_gaussian


@dataclass
class LayerNeurons:
    """What the analysis measured on one FFN linear layer (one value per neuron, CPU float64)."""

    path: str  # full module path, e.g. "model.layers.3.mlp.up_proj"
    block: int
    name: str  # path inside the block, e.g. "mlp.up_proj"
    role: str  # "ffn_in" (reads the block's hidden state) or "ffn_out"
    tokens: int
    wd: torch.Tensor
    md: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight_norm: torch.Tensor
    top_percent: float
    examples: dict[str, dict] = field(default_factory=dict)  # "top"/"median"/"bottom" -> neuron, wd, outputs

    @property
    def neurons(self) -> int:
        return self.wd.numel()

    @property
    def wasserstein_neurons(self) -> torch.Tensor:
        return top_fraction(self.wd, self.top_percent)

    def spearman(self) -> float:
        keep = torch.isfinite(self.wd) & torch.isfinite(self.md)
        if int(keep.sum()) < 3:
            return float("nan")
        return float(spearmanr(self.wd[keep].numpy(), self.md[keep].numpy()).statistic)


@torch.no_grad()
def layer_outputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's pre-activation outputs y = W x + b for inputs (tokens, d_in), in float32."""
    bias = getattr(module, "bias", None)
    weight = linear_weight(module)
    return F.linear(inputs.float(), weight.float(), None if bias is None else bias.float())


def _examples(wd: torch.Tensor, outputs: torch.Tensor) -> dict[str, dict]:
    """The neurons with the highest, the median and the lowest distance, with their outputs."""
    finite = torch.nonzero(torch.isfinite(wd)).flatten()
    if finite.numel() == 0:
        return {}
    order = finite[torch.sort(wd[finite], descending=True, stable=True).indices]
    picks = {"top": order[0], "median": order[order.numel() // 2], "bottom": order[-1]}
    return {label: {"neuron": int(i), "wd": float(wd[i]), "outputs": outputs[:, i].detach().cpu().double()}
            for label, i in picks.items()}


@torch.no_grad()
def measure_layer(path: str, block: int, name: str, role: str, module: nn.Module, inputs: torch.Tensor,
                  top_percent: float, pairs: int | None = None, seed: int = 0) -> LayerNeurons:
    outputs = layer_outputs(module, inputs)
    wd = wasserstein_to_gaussian(outputs)
    y = outputs.double().cpu()
    return LayerNeurons(path=path, block=block, name=name, role=role, tokens=outputs.shape[0], wd=wd,
                        md=mapping_difficulty(inputs, outputs, pairs=pairs, seed=seed), mean=y.mean(0),
                        std=y.std(0, unbiased=False),
                        weight_norm=linear_weight(module).detach().double().cpu().norm(dim=1),
                        top_percent=top_percent, examples=_examples(wd, outputs))


class FFNInputsStep(Step):
    """Observe-only: record the FFN inputs of the selected blocks and hand each FFN linear, with its
    input (tokens, d_in), to `on_layer(index, name, role, module, inputs)`."""

    modifies = False

    def __init__(self, layout: ModelLayout, blocks: list[int], on_layer: Callable):
        self.layout, self.blocks, self.on_layer = layout, set(blocks), on_layer
        self.groups = layout.input_groups("ffn")
        self.roles = {lin.name: lin.role for lin in layout.select("ffn")}

    def observe(self, index: int, block: nn.Module) -> dict[str, Watch]:
        if index not in self.blocks:
            return {}
        return {group: Watch(names[0], TokenRecorder()) for group, names in self.groups.items()}

    def modify(self, index: int, block: nn.Module, statistics: dict[str, TokenRecorder]) -> None:
        for group, names in self.groups.items():
            if group not in statistics:
                continue
            inputs = statistics[group].all()
            statistics[group].batches.clear()
            for name in names:
                self.on_layer(index, name, self.roles[name], block.get_submodule(name), inputs)
            del inputs


def walk_ffn_inputs(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, blocks: list[int],
                    on_layer: Callable, device: torch.device | str = "cpu", batch_size: int = 8,
                    progress: bool = True, desc: str = "neurons", streamed=None) -> None:
    """Run the dense model up to the last of `blocks`, calling `on_layer` for each FFN linear of `blocks`.
    `streamed`: the reader of a model whose blocks wait on disk (its `onload`/`offload` bring each in at its turn)."""
    hooks = BlockHooks(stop_after=max(blocks), onload=streamed and streamed.onload,
                       offload=streamed and streamed.offload)
    engine = SequentialCalibration(model, layout, device=device, batch_size=batch_size, progress=progress, desc=desc,
                                   hooks=hooks)
    engine.run(windows, FFNInputsStep(layout, blocks, on_layer))


def analyze_neurons(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, blocks: list[int],
                    on_layer: Callable[[LayerNeurons], None], top_percent: float = 3.0, pairs: int | None = None,
                    seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 8,
                    progress: bool = True, streamed=None) -> None:
    """Measure every FFN linear of `blocks`; `on_layer` receives each `LayerNeurons` as soon as it is done."""
    def measure(index, name, role, module, inputs):
        on_layer(measure_layer(f"{layout.blocks_path}.{index}.{name}", index, name, role, module, inputs,
                               top_percent, pairs, seed))

    walk_ffn_inputs(model, layout, windows, blocks, measure, device, batch_size, progress, streamed=streamed)
