"""How a Sparse Expansion model disentangles its neurons (the paper's Fig. 5b/c).

On the dense model's own inputs at each FFN linear, the expanded model's router for that layer splits the
calibration tokens into clusters. For each neuron, its dense outputs within each cluster are compared with
a Gaussian: the cluster-size-weighted Wasserstein distance (and mapping difficulty) against the one over all
tokens. Clustering disentangles a neuron when its weighted distance is lower.
"""

from __future__ import annotations

import functools

import torch

from .neurons import layer_outputs
from .wasserstein import mapping_difficulty, top_fraction, wasserstein_to_gaussian


def _weighted(per_cluster: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Per neuron, the size-weighted mean over the clusters where the value is defined."""
    values = torch.stack(per_cluster)  # (clusters, neurons)
    weights = torch.tensor(sizes, dtype=torch.float64).unsqueeze(1).expand_as(values)
    defined = torch.isfinite(values)
    weights = torch.where(defined, weights, torch.zeros_like(weights))
    total = weights.sum(0)
    mean = (torch.where(defined, values, torch.zeros_like(values)) * weights).sum(0) / total
    return torch.where(total > 0, mean, torch.full_like(mean, float("nan")))


def _cluster_md(inputs: torch.Tensor, outputs: torch.Tensor, seed: int) -> torch.Tensor:
    try:
        return mapping_difficulty(inputs, outputs, seed=seed)
    except ValueError:  # every pair of this cluster has identical inputs
        return torch.full((outputs.shape[1],), float("nan"), dtype=torch.float64)


@functools.lru_cache(maxsize=256)
def _floor(tokens: int, samples: int, seed: int) -> float:
    """Median WD of `samples` z-scored standard-normal samples of `tokens` values (one seeded draw per size)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + tokens)
    return float(wasserstein_to_gaussian(torch.randn(tokens, samples, generator=generator, dtype=torch.float64))
                 .median())


def gaussian_floor(sizes: list[int], samples: int = 256, seed: int = 0) -> float:
    """The cluster-size-weighted WD that perfectly Gaussian outputs would show with these cluster sizes: the WD
    of a finite sample is not zero (about 0.05 at 256 tokens, 0.0125 at 4,096), so splitting tokens into
    clusters raises the weighted WD of a neuron that was Gaussian already. Median over `samples` seeded draws."""
    floors = [_floor(n, samples, seed) for n in sizes]
    return float(sum(f * n for f, n in zip(floors, sizes)) / max(1, sum(sizes)))


def layer_disentanglement(module, router, inputs: torch.Tensor, top_percent: float, seed: int = 0) -> dict:
    """Dense and cluster-weighted WD and MD per neuron of one layer (tensors), with the cluster sizes."""
    outputs = layer_outputs(module, inputs)
    labels = router.assign(inputs.to(router.mean.device)).cpu()
    wd_dense = wasserstein_to_gaussian(outputs)
    md_dense = mapping_difficulty(inputs, outputs, seed=seed)
    wd_parts, md_parts, sizes = [], [], []
    for expert in range(router.experts):
        members = torch.nonzero(labels == expert).flatten()
        if members.numel() < 4:  # too few tokens for a distribution (or a pair)
            continue
        x, y = inputs[members.to(inputs.device)], outputs[members.to(outputs.device)]
        wd_parts.append(wasserstein_to_gaussian(y))
        md_parts.append(_cluster_md(x, y, seed))
        sizes.append(members.numel())
    counts = torch.bincount(labels, minlength=router.experts).tolist()
    return {"wd_dense": wd_dense, "wd_weighted": _weighted(wd_parts, sizes), "md_dense": md_dense,
            "md_weighted": _weighted(md_parts, sizes), "cluster_sizes": counts,
            "gaussian_floor": {"dense": gaussian_floor([inputs.shape[0]], seed=seed),
                               "weighted": gaussian_floor(sizes, seed=seed)},
            "wasserstein_neurons": top_fraction(wd_dense, top_percent)}


def change_summary(dense: torch.Tensor, weighted: torch.Tensor, rows: torch.Tensor | None = None) -> dict:
    """Fraction of neurons whose weighted value is lower than the dense one, and the median relative change."""
    if rows is not None:
        dense, weighted = dense[rows], weighted[rows]
    ok = torch.isfinite(dense) & torch.isfinite(weighted) & (dense > 0)
    if not bool(ok.any()):
        return {"neurons": 0}
    change = (weighted[ok] - dense[ok]) / dense[ok]
    return {"neurons": int(ok.sum()), "fraction_lower": float((change < 0).double().mean()),
            "median_relative_change": float(change.median()), "mean_relative_change": float(change.mean())}
