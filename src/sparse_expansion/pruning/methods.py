"""The pruning methods: each maps (weight, calibration statistic, spec) to a pruned weight.

None of them knows about models: the calibration engine feeds them statistics of one linear layer's
inputs, and the pipeline writes the result back. Every method also prunes a stack of matrices at once,
`weight` of shape (E, rows, cols) with a stacked statistic (`Statistic.stack`, one row per matrix): Sparse
Expansion prunes the k experts of a layer this way, each with its own cluster's statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..calibration.observers import Hessian, InputSquaredNorm
from ..errors import UsageError
from ..settings import AtLeast, Positive, SettingError, check_fields, setting
from .masks import lowest_mask
from .quantization import BITS
from .sparsegpt import FACTORIZATIONS, hessian_factors, sparsegpt_prune
from .spec import SPARSITY, SparsitySpec


@dataclass(frozen=True)
class PruneOptions:
    """How a layer is pruned, whatever the target sparsity (checked on construction)."""

    bits: int | None = setting(None, "quantize jointly to B bits (sparsegpt only, 2..8)", BITS, metavar="B")
    blocksize: int = setting(128, "SparseGPT column block size", AtLeast(1))
    percdamp: float = setting(0.01, "SparseGPT dampening, fraction of mean diag(H)", Positive())
    factorization: str | None = setting(
        None, "SparseGPT's arithmetic: reference = Cholesky, its inverse, Cholesky again, and the later columns "
        "updated after every 32 columns (the arithmetic of every figure before 2026-12-07); fast = one Cholesky and "
        "a triangular inverse (half the work), one Hessian or a share of the experts per thread, and the later "
        "columns updated once per block; different rounding (default: fast for Sparse Expansion's experts, judged "
        "over calibration seeds at 50% and 70% in docs/BENCHMARKS.md, studies (f) and (n); reference for SparseGPT "
        "itself)", choices=tuple(FACTORIZATIONS))

    def __post_init__(self):
        check_fields(self)

    def for_experts(self) -> PruneOptions:
        """These options as Sparse Expansion prunes its experts (and a selective layer's shared rows) with them:
        the fast factorization unless one was asked for."""
        return self if self.factorization else replace(self, factorization="fast")


def magnitude_prune(weight: torch.Tensor, statistic, spec: SparsitySpec, options: PruneOptions) -> torch.Tensor:
    """Zero the smallest |w|: over the whole matrix (unstructured) or per M-group (N:M)."""
    mask = lowest_mask(weight.abs().float(), spec, per_row=False)
    return weight.masked_fill(mask, 0)


def wanda_scores(weight: torch.Tensor, input_mean_sq: torch.Tensor) -> torch.Tensor:
    """Wanda's saliency |W_ij| * ||X_j||_2 (any constant factor on the norm leaves the ranking unchanged)."""
    return weight.abs().float() * input_mean_sq.to(weight.device).float().sqrt().unsqueeze(-2)


def wanda_prune(weight: torch.Tensor, statistic: InputSquaredNorm, spec: SparsitySpec,
                options: PruneOptions) -> torch.Tensor:
    """Zero the lowest-saliency weights of each output row (Wanda's comparison group)."""
    mask = lowest_mask(wanda_scores(weight, statistic.mean_sq), spec, per_row=True)
    return weight.masked_fill(mask, 0)


def sparsegpt_method(weight: torch.Tensor, statistic: Hessian, spec: SparsitySpec,
                     options: PruneOptions) -> torch.Tensor:
    # The factorization is cached on the statistic: layers that read the same input share it.
    key = ("sparsegpt_factors", options.percdamp, options.factorization)
    if key not in statistic.derived:
        matrices = statistic.matrix if statistic.matrix.dim() == 3 else statistic.matrix.unsqueeze(0)
        statistic.derived[key] = hessian_factors(matrices.to(weight.device), options.percdamp, options.factorization)
    return sparsegpt_prune(weight, None, spec, blocksize=options.blocksize, percdamp=options.percdamp,
                           bits=options.bits, factors=statistic.derived[key],
                           block_updates=options.factorization == "fast").weight


@dataclass(frozen=True)
class PruningMethod:
    name: str
    prune: Callable[[torch.Tensor, object, SparsitySpec, PruneOptions], torch.Tensor]
    statistic: type | None  # statistic of the layer's calibration inputs; None = needs no data
    supports_bits: bool = False
    description: str = ""


METHODS: dict[str, PruningMethod] = {
    "magnitude": PruningMethod("magnitude", magnitude_prune, None, description="smallest |w| per matrix"),
    "wanda": PruningMethod("wanda", wanda_prune, InputSquaredNorm, description="|w| * ||x|| per output row"),
    "sparsegpt": PruningMethod("sparsegpt", sparsegpt_method, Hessian, supports_bits=True,
                               description="OBS reconstruction with the inputs' Hessian"),
}


@dataclass(frozen=True)
class PruneSettings:
    """What one prune or expand run aims at: a method and a sparsity or an N:M pattern (checked on construction)."""

    method: str = setting("sparsegpt", "pruning method", choices=lambda: list(METHODS))
    sparsity: float | None = setting(None, "fraction of weights to zero, in [0, 1)", SPARSITY)
    nm: str | None = setting(None, "N:M pattern instead of sparsity, e.g. 2:4 (2 of every 4 zeroed)")

    def __post_init__(self):
        check_fields(self)
        if self.nm is not None:
            spec = SparsitySpec.create(nm=self.nm)
            if self.sparsity is not None:
                raise SettingError("nm", f"give either {{sparsity}} or {{nm}}, not both ({{nm}} {self.nm} zeroes "
                                   f"{spec.sparsity:.0%} of the weights)")

    def spec(self) -> SparsitySpec:
        return SparsitySpec.create(sparsity=self.sparsity, nm=self.nm)


def get_method(name: str, bits: int | None = None) -> PruningMethod:
    try:
        method = METHODS[name]
    except KeyError:
        raise UsageError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}") from None
    if bits is not None and not method.supports_bits:
        raise SettingError("bits", f"{{bits}} (joint quantization) is only supported with sparsegpt, not {name}")
    return method
