"""The sparsification ablation of the Sparse Expansion paper (ICLR v4, Fig. 3) and the follow-up paper's
negative pre-activation variant (arXiv 2509.24198).

In every FFN linear the same number of neurons (rows) is chosen by one criterion: highest Wasserstein
distance, highest output mean, highest output variance, highest weight norm, or at random (seeded). Then
either only those rows are pruned with SparseGPT at a high sparsity, everything else left dense, or, at
inference, only their negative pre-activations are zeroed (on the linears that read the block's hidden
state: gate and up, or fc1; the FFN output linear has no activation after it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .wasserstein import top_fraction

CRITERIA = ("wasserstein", "mean", "variance", "weight-norm", "random")


def criterion_scores(layer, criterion: str, seed: int = 0) -> torch.Tensor:
    if criterion == "wasserstein":
        return layer.wd
    if criterion == "mean":
        return layer.mean
    if criterion == "variance":
        return layer.std.pow(2)
    if criterion == "weight-norm":
        return layer.weight_norm
    if criterion == "random":
        # One seeded stream per layer, so a layer's choice does not depend on which other layers ran.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer.block * 101 + len(layer.name))
        return torch.rand(layer.neurons, generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def select_rows(layers: list, criterion: str, percent: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per layer path: the rows of the top `percent`% neurons by `criterion` (the same count for every
    criterion: ceil(percent% of the layer's neurons))."""
    rows = {}
    for layer in layers:
        rows[layer.path] = torch.sort(top_fraction(criterion_scores(layer, criterion, seed), percent)).values
    return rows


@contextlib.contextmanager
def zero_negative_preactivations(model: nn.Module, rows: dict[str, torch.Tensor]) -> Iterator[int]:
    """While active, the outputs of the given rows of the given linears are clamped at zero from below.
    Yields the number of linears hooked."""
    handles = []

    def hook(module, args, output, index):
        selected = output.index_select(-1, index.to(output.device))
        return output.index_copy(-1, index.to(output.device), selected.clamp_min(0))

    for path, index in rows.items():
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, a, o, index=index: hook(m, a, o, index)))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
