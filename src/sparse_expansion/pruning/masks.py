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
    flat = scores if per_row else scores.reshape(*lead, 1, rows * cols)
    k = int(flat.shape[-1] * spec.sparsity)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # The k-th smallest value, then everything below it plus the first ties by position: the same set a
    # stable sort would give, at the cost of a selection instead of a full sort.
    threshold = flat.kthvalue(k, dim=-1, keepdim=True).values
    below = flat < threshold
    ties = flat == threshold
    needed = k - below.sum(-1, keepdim=True)
    mask = below | (ties & (ties.cumsum(-1) <= needed))
    return mask.reshape(scores.shape)


def check_nm_shape(in_features: int, spec: SparsitySpec, name: str = "layer") -> None:
    if spec.is_nm and in_features % spec.m:
        raise UsageError(f"{name} has {in_features} inputs, not a multiple of M={spec.m} for {spec.label}")
