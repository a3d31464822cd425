"""Per-neuron statistics of the Sparse Expansion paper's entanglement analysis (tensors in, tensors out; no models).

`wasserstein_to_gaussian`: each neuron's outputs z-scored over the tokens, then the 1-Wasserstein distance
of that empirical distribution to the standard normal N(0, 1), computed exactly (not against a random
normal sample as the authors' code does, so the figure is deterministic). With the outputs sorted,
z_(1) <= ... <= z_(n), the quantile coupling gives

    W1 = sum_i  integral over u in [(i-1)/n, i/n] of |z_(i) - Phi^-1(u)| du
       = sum_i  integral over t in [t_(i-1), t_i] of |z_(i) - t| phi(t) dt,     t_i = Phi^-1(i/n),

and with G_a(t) = a Phi(t) + phi(t) (an antiderivative of (a - t) phi(t)) each term is
2 G_a(c) - G_a(t_(i-1)) - G_a(t_i), where c is z_(i) clamped to the segment.

`mapping_difficulty`: the paper's Eq. 2 over random disjoint token pairs (i, j):
N_x = max ||x_i - x_j||, N_y = median |y_i - y_j| (per neuron),
MD = mean over pairs of (|y_i - y_j| / N_y) / (||x_i - x_j|| / N_x). Pairs with identical inputs (the same
token at the same position, e.g. a BOS token opening every window) have no ratio and are left out.
"""

from __future__ import annotations

import math

import torch

from ..pruning.masks import highest_first

_SQRT_2PI = math.sqrt(2 * math.pi)


def _pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) / _SQRT_2PI


CHUNK_ELEMENTS = 1 << 21  # tokens x neurons handled at once: bounds the float64 temporaries (about 16 MiB each)


def wasserstein_to_gaussian(outputs: torch.Tensor) -> torch.Tensor:
    """One distance per neuron: outputs (tokens,) or (tokens, neurons) -> () or (neurons,), float64 on the CPU.

    A neuron whose outputs are constant has no shape to compare: its distance is NaN.
    """
    single = outputs.dim() == 1
    flat = outputs.detach().reshape(outputs.shape[0], -1)
    n = flat.shape[0]
    if n < 2:
        raise ValueError("the Wasserstein distance of a neuron needs at least 2 tokens")
    step = max(1, CHUNK_ELEMENTS // n)
    distance = torch.cat([_distance(flat[:, start:start + step].to("cpu", torch.float64))
                          for start in range(0, flat.shape[1], step)])
    return distance[0] if single else distance


def _distance(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[0]
    std = y.std(0, unbiased=False)
    z = (y - y.mean(0)) / std
    z, _ = torch.sort(z, dim=0)
    levels = torch.arange(n + 1, dtype=torch.float64) / n
    knots = torch.special.ndtri(levels)  # t_0 = -inf, ..., t_n = +inf
    pdf_knots = _pdf(knots.clamp(-40, 40)).unsqueeze(1)  # phi(+-inf) = 0
    cdf_lo, cdf_hi = levels[:-1].unsqueeze(1), levels[1:].unsqueeze(1)  # Phi(t_i) = i / n exactly
    lo, hi = knots[:-1].unsqueeze(1), knots[1:].unsqueeze(1)
    c = torch.minimum(torch.maximum(z, lo), hi)
    g_c = z * torch.special.ndtr(c) + _pdf(c)
    g_lo = z * cdf_lo + pdf_knots[:-1]
    g_hi = z * cdf_hi + pdf_knots[1:]
    distance = (2 * g_c - g_lo - g_hi).sum(0)
    return torch.where(std > 0, distance, torch.full_like(distance, float("nan")))


def disjoint_pairs(tokens: int, pairs: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of `pairs` random disjoint token pairs (at most tokens // 2), from a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(tokens, generator=generator)
    count = tokens // 2 if pairs is None else min(pairs, tokens // 2)
    return order[0:2 * count:2], order[1:2 * count:2]


def mapping_difficulty(inputs: torch.Tensor, outputs: torch.Tensor, pairs: int | None = None,
                       seed: int = 0) -> torch.Tensor:
    """One mapping difficulty per neuron: inputs (tokens, d_in), outputs (tokens,) or (tokens, neurons)."""
    single = outputs.dim() == 1
    y = outputs.detach().reshape(outputs.shape[0], -1).to("cpu", torch.float64)
    x = inputs.detach().to("cpu", torch.float64)
    i, j = disjoint_pairs(x.shape[0], pairs, seed)
    dx = torch.linalg.vector_norm(x[i] - x[j], dim=1)
    keep = dx > 0
    if not bool(keep.any()):
        raise ValueError("mapping difficulty: every sampled pair has identical inputs")
    i, j, dx = i[keep], j[keep], dx[keep]
    dy = (y[i] - y[j]).abs()
    n_x = dx.max()
    n_y = dy.median(0).values
    ratio = (dy / n_y) / (dx / n_x).unsqueeze(1)
    difficulty = ratio.mean(0)
    difficulty = torch.where(n_y > 0, difficulty, torch.full_like(difficulty, float("nan")))
    return difficulty[0] if single else difficulty


def top_fraction(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Indices of the top `percent`% of scores (at least one), highest first; NaN scores rank last, ties go
    to the lower index."""
    return highest_first(scores, max(1, math.ceil(scores.numel() * percent / 100)))
