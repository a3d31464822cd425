"""The pruning methods: each maps (weight, calibration statistic, spec) to a pruned weight.

None of them knows about models: the calibration engine feeds them statistics of one linear layer's
inputs, and the pipeline writes the result back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UsageError
from .masks import lowest_mask
from .sparsegpt import sparsegpt_prune
from .spec import SparsitySpec
from .statistics import Hessian, InputSquaredNorm


@dataclass(frozen=True)
class PruneOptions:
    bits: int | None = None  # joint quantization (SparseGPT only)
    blocksize: int = 128
    percdamp: float = 0.01


def magnitude_prune(weight: torch.Tensor, statistic, spec: SparsitySpec, options: PruneOptions) -> torch.Tensor:
    """Zero the smallest |w|: over the whole matrix (unstructured) or per M-group (N:M)."""
    mask = lowest_mask(weight.abs().float(), spec, per_row=False)
    return weight.masked_fill(mask, 0)


def wanda_scores(weight: torch.Tensor, input_mean_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's saliency |W_ij| * ||X_j||_2 (any constant factor on the norm leaves the ranking unchanged)."""
    return weight.abs().float() * input_mean_sq.to(weight.device).float().sqrt().reshape(1, -1)


def wanda_prune(weight: torch.Tensor, statistic: InputSquaredNorm, spec: SparsitySpec,
                options: PruneOptions) -> torch.Tensor:
    """Zero the lowest-saliency weights of each output row (Wanda's comparison group)."""
    mask = lowest_mask(wanda_scores(weight, statistic.mean_sq), spec, per_row=True)
    return weight.masked_fill(mask, 0)


def sparsegpt_method(weight: torch.Tensor, statistic: Hessian, spec: SparsitySpec,
                     options: PruneOptions) -> torch.Tensor:
    return sparsegpt_prune(weight, statistic.matrix, spec, blocksize=options.blocksize,
                           percdamp=options.percdamp, bits=options.bits).weight


@dataclass(frozen=True)
class PruningMethod:
    name: str
    prune: Callable[[torch.Tensor, object, SparsitySpec, PruneOptions], torch.Tensor]
    statistic: type | None  # statistic of the layer's calibration inputs; None = needs no data
    supports_bits: bool = False


METHODS: dict[str, PruningMethod] = {
    "magnitude": PruningMethod("magnitude", magnitude_prune, None),
    "wanda": PruningMethod("wanda", wanda_prune, InputSquaredNorm),
    "sparsegpt": PruningMethod("sparsegpt", sparsegpt_method, Hessian, supports_bits=True),
}


def get_method(name: str, bits: int | None = None) -> PruningMethod:
    try:
        method = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}") from None
    if bits is not None and not method.supports_bits:
        raise UsageError(f"--bits (joint quantization) is only supported with sparsegpt, not {name}")
    return method
