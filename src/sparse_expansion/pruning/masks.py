"""Choosing which weights to zero from a score matrix (lower score = pruned first).

Scores may carry leading batch dimensions (several experts pruned at once); the selection is then
made independently for each matrix.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .spec import SparsitySpec


def highest_first(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest of a 1-D score vector, highest first: NaN ranks lowest and ties go to
    the lower index, so the same scores always give the same choice (rows to expand, neurons to study)."""
    values = scores.detach().to("cpu", torch.float64)
    values = torch.where(torch.isnan(values), float("-inf"), values)
    return torch.argsort(values, descending=True, stable=True)[:count]


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest along the last dimension (kept as a dimension of 1): numpy's introselect on the CPU,
    2.0x faster than torch's kthvalue on eight experts' 196,608 block scores each (docs/bench_fast_arithmetic.json,
    issue 18); the same value, a selection being exact."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and values.numel():
        import numpy as np

        return torch.from_numpy(np.partition(values.detach().numpy(), k - 1, axis=-1)[..., k - 1:k])
    return values.kthvalue(k, dim=-1, keepdim=True).values


def lowest_mask(scores: torch.Tensor, spec: SparsitySpec, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores of each (rows x cols) matrix.

    Unstructured: exactly floor(s * count) weights per row (`per_row`) or per matrix.
    N:M: exactly N per group of M consecutive columns in every row. Ties break by position
    (stable sort), so the same scores always give the same mask.
    """
    *lead, rows, cols = scores.shape
    if spec.is_nm:
        groups = scores.reshape(*lead, rows, cols // spec.m, spec.m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., : spec.n]
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
        return mask.reshape(scores.shape)
    k = int((cols if per_row else rows * cols) * spec.sparsity)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # The k-th smallest value (per row or per matrix), then everything below it plus the first ties by
    # position: the same set a stable sort would give, at the cost of a selection instead of a full sort.
    # The k-th smallest of a matrix is the same in any memory order, so it is taken in the order the scores are
    # stored (a transposed view needs no copy); where no tie straddles it, every score up to it is the mask.
    transposed = not per_row and not scores.is_contiguous() and scores.transpose(-1, -2).is_contiguous()
    if transposed:
        flat, stored = None, scores.transpose(-1, -2).reshape(*lead, 1, rows * cols)
    else:
        flat = stored = scores if per_row else scores.reshape(*lead, 1, rows * cols)
    threshold = _kth_smallest(stored, k)
    mask = stored <= threshold
    if bool((mask.sum(-1, keepdim=True) == k).all()):
        return mask.reshape(*lead, cols, rows).transpose(-1, -2) if transposed else mask.reshape(scores.shape)
    if flat is None:
        flat = scores.reshape(*lead, 1, rows * cols)
    below = flat < threshold
    ties = flat == threshold
    needed = k - below.sum(-1, keepdim=True)
    mask = below | (ties & (ties.cumsum(-1) <= needed))
    return mask.reshape(scores.shape)


def check_nm_shape(in_features: int, spec: SparsitySpec, name: str = "layer") -> None:
    if spec.is_nm and in_features % spec.m:
        raise UsageError(f"{name} has {in_features} inputs, not a multiple of M={spec.m} for {spec.label}")
