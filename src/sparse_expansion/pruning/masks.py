"""Choosing which weights to zero from a score matrix (lower score = pruned first)."""

from __future__ import annotations

import torch

from .spec import SparsitySpec


def lowest_mask(scores: torch.Tensor, spec: SparsitySpec, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores.

    Unstructured: exactly floor(s * count) weights per row (`per_row`) or per matrix.
    N:M: exactly N per group of M consecutive columns in every row. Ties break by position
    (stable sort), so the same scores always give the same mask.
    """
    rows, cols = scores.shape
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if spec.is_nm:
        groups = scores.reshape(rows, cols // spec.m, spec.m)
        order = torch.argsort(groups, dim=-1, stable=True)[..., : spec.n]
        group_mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)
        return group_mask.reshape(rows, cols)
    if per_row:
        k = int(cols * spec.sparsity)
        if k:
            order = torch.argsort(scores, dim=1, stable=True)[:, :k]
            mask.scatter_(1, order, True)
        return mask
    k = int(scores.numel() * spec.sparsity)
    if k:
        order = torch.argsort(scores.flatten(), stable=True)[:k]
        mask.view(-1)[order] = True
    return mask


def check_nm_shape(in_features: int, spec: SparsitySpec, name: str = "layer") -> None:
    from ..errors import UsageError

    if spec.is_nm and in_features % spec.m:
        raise UsageError(f"{name} has {in_features} inputs, not a multiple of M={spec.m} for {spec.label}")
