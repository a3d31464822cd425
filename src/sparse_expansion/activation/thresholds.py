"""Per-neuron activation thresholds on a model: collect the FFN intermediate activations, find each layer's
threshold for a CETT shared by all layers, apply them (counting what they zero), and search the CETT at which
perplexity rises by p% over dense (PPL-p% sparsity)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..analysis.neurons import walk_ffn_inputs
from ..errors import UsageError
from ..models.discovery import ModelLayout, linear_weight
from ..settings import SettingError
from .cett import ThresholdSearch, down_column_norms


@dataclass
class IntermediateActivations:
    """Per FFN output linear (the down projection): a seeded sample of its input rows and its weight."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> (tokens, d_f)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> (d_out, d_f), or (k, d_out, d_f)
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # expert layers: each token's expert
    searches: dict[str, ThresholdSearch] = field(default_factory=dict, repr=False)  # built at the first search

    def search(self, path: str) -> ThresholdSearch:
        if path not in self.searches:
            self.searches[path] = ThresholdSearch(self.inputs[path], self.weights[path],
                                                  labels=self.labels.get(path))
        return self.searches[path]


def collect_intermediate(model: nn.Module, layout: ModelLayout, windows: torch.Tensor, max_tokens: int = 4096,
                         seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 8,
                         progress: bool = True, streamed=None) -> IntermediateActivations:
    """The dense model's FFN intermediate activations (the input of each FFN output linear), at most
    `max_tokens` rows per layer (a seeded sample of the calibration tokens); `streamed`: walk_ffn_inputs'."""
    collected = IntermediateActivations()
    outputs = {lin.name for lin in layout.select("ffn") if lin.role == "ffn_out"}
    if not outputs:
        raise UsageError("no FFN output linear found in the model's blocks: nothing to threshold")

    def on_layer(index, name, role, module, inputs) -> None:
        if name not in outputs:
            return
        rows = inputs.reshape(-1, inputs.shape[-1])
        if rows.shape[0] > max_tokens:
            generator = torch.Generator().manual_seed(seed + index)
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:max_tokens].to(rows.device)]
        path = f"{layout.blocks_path}.{index}.{name}"
        collected.inputs[path] = rows.detach().float().cpu().clone()
        collected.weights[path] = linear_weight(module).detach().float().cpu()
        router = getattr(module, "router", None)
        if router is not None:  # an expanded layer: each token runs its own expert's weight
            with torch.no_grad():
                collected.labels[path] = router.assign(rows.to(router.mean.device)).cpu()

    walk_ffn_inputs(model, layout, windows, list(range(len(layout.blocks))), on_layer, device, batch_size,
                    progress=progress, desc="activations", streamed=streamed)
    return collected


def layer_thresholds(activations: IntermediateActivations, target_cett: float) -> dict[str, float]:
    """Per layer: the contribution threshold t whose CETT is at most `target_cett`."""
    return {path: activations.search(path).threshold(target_cett) for path in activations.inputs}


def neuron_thresholds(activations: IntermediateActivations, thresholds: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per layer and neuron i: t / ||W_down[:, i]|| (a neuron with a zero column is never needed: +inf);
    (k, d_f) for an expert layer, one row per expert."""
    result = {}
    for path, t in thresholds.items():
        norms = down_column_norms(activations.weights[path])
        result[path] = torch.where(norms > 0, t / norms, torch.full_like(norms, float("inf")))
    return result


class ActivationCounter:
    """What the applied thresholds left active: counts of non-zero intermediate activations per layer."""

    def __init__(self):
        self.active: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def add(self, path: str, kept: torch.Tensor) -> None:
        self.active[path] = self.active.get(path, 0) + int(torch.count_nonzero(kept))
        self.total[path] = self.total.get(path, 0) + kept.numel()

    def ratios(self) -> dict[str, float]:
        return {path: self.active[path] / self.total[path] for path in self.total if self.total[path]}

    def ratio(self) -> float:
        """The mean over layers of each layer's activation ratio (every layer sees the same tokens)."""
        ratios = self.ratios()
        return sum(ratios.values()) / len(ratios) if ratios else 1.0


@contextlib.contextmanager
def masked(model: nn.Module, keep: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[ActivationCounter]:
    """While active, the input x of each listed FFN output linear is multiplied by `keep[path](x)` (a boolean
    mask of the entries to keep), and the yielded counter records how many entries stay non-zero."""
    counter = ActivationCounter()
    handles = []

    def make_hook(path: str, rule: Callable) -> Callable:
        def hook(module, args):
            x = args[0]
            kept = x * rule(x)
            counter.add(path, kept)
            return (kept, *args[1:])
        return hook

    for path, rule in keep.items():
        handles.append(model.get_submodule(path).register_forward_pre_hook(make_hook(path, rule)))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def thresholded(model: nn.Module, per_neuron: dict[str, torch.Tensor]):
    """`masked` with per-neuron thresholds: x_i is kept where |x_i| >= threshold_i (for an expert layer, the
    thresholds of the expert its router picks for the token)."""
    def rule(path: str, t: torch.Tensor) -> Callable:
        if t.dim() == 1:
            return lambda x: x.abs() >= t.to(x.device, x.dtype)
        router = model.get_submodule(path).router

        def expert_rule(x: torch.Tensor) -> torch.Tensor:
            labels = router.assign(x).to(t.device)
            return x.abs() >= t[labels].to(x.device, x.dtype).reshape(x.shape)
        return expert_rule

    return masked(model, {path: rule(path, t) for path, t in per_neuron.items()})


def top_k_rule(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Keep the k entries of largest magnitude of every token (a constant k per layer)."""
    def rule(x: torch.Tensor) -> torch.Tensor:
        magnitude = x.abs()
        if k >= x.shape[-1]:
            return torch.ones_like(x, dtype=torch.bool)
        cutoff = magnitude.topk(k, dim=-1).values[..., -1:]
        return magnitude >= cutoff
    return rule


def global_threshold_rule(epsilon: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """FAT-epsilon: keep |x_i| >= epsilon, one epsilon for every layer and neuron."""
    return lambda x: x.abs() >= epsilon


def nonzero_rule(x: torch.Tensor) -> torch.Tensor:
    """Exact zeros only (what a ReLU model skips for free)."""
    return x != 0


@dataclass
class SearchStep:
    cett: float
    ppl: float
    ratio: float  # ppl / dense ppl
    activation_ratio: float


def search_cett(measure: Callable[[float], tuple[float, float]], dense_ppl: float, increase: float,
                iterations: int = 14, tolerance: float | None = None) -> tuple[SearchStep, list[SearchStep]]:
    """Bisect the CETT in [0, 1] for perplexity = (1 + increase) x dense (the paper's Algorithm 1).

    `measure(cett)` returns (perplexity, activation ratio) with the thresholds of that CETT applied. Stops when a
    step lands within `tolerance` (default increase / 4) of the target; otherwise returns the last step below
    the target (the largest CETT known to stay within it).
    """
    tolerance = increase / 4 if tolerance is None else tolerance
    lo, hi = 0.0, 1.0
    steps: list[SearchStep] = []
    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ppl, active = measure(mid)
        step = SearchStep(mid, ppl, ppl / dense_ppl, active)
        steps.append(step)
        if abs(step.ratio - (1 + increase)) <= tolerance:
            return step, steps
        if step.ratio < 1 + increase:
            lo, best = mid, step
        else:
            hi = mid
    if best is None:
        ppl, active = measure(0.0)
        best = SearchStep(0.0, ppl, ppl / dense_ppl, active)
        steps.append(best)
    return best, steps


def install_thresholds(model: nn.Module, per_neuron: dict[str, torch.Tensor], ratios: dict[str, float]) -> int:
    """Replace each thresholded FFN output linear by a `ThresholdedLinear` (saved and reloaded with its
    thresholds, run by the activation-sparse kernel where faster). Only plain linear layers (dense or pruned)
    can be converted; returns how many were."""
    from ..layers import ThresholdedLinear

    for path in per_neuron:
        if type(model.get_submodule(path)) is not nn.Linear:
            raise SettingError("out", f"{{out}}: {path} is a {type(model.get_submodule(path)).__name__}; saved "
                                      "thresholds need a plain linear down projection (dense or pruned; not expanded, "
                                      "not GPT-2's Conv1D)")
    for path, thresholds in per_neuron.items():
        model.set_submodule(path, ThresholdedLinear(model.get_submodule(path), thresholds, ratios.get(path, 1.0)))
    return len(per_neuron)
