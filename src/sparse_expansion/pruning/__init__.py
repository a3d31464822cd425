"""Pruning: per-layer math (magnitude, Wanda, SparseGPT) apart from the model pipeline."""

from .methods import (
    METHODS,
    PruneOptions,
    PruneSettings,
    PruningMethod,
    get_method,
    magnitude_prune,
    wanda_prune,
    wanda_scores,
)
from .pipeline import PruneReport, PruneStep, prune_model
from .sparsegpt import sparsegpt_prune
from .spec import SparsitySpec, parse_nm

__all__ = [
    "METHODS",
    "PruneOptions",
    "PruneReport",
    "PruneSettings",
    "PruneStep",
    "PruningMethod",
    "SparsitySpec",
    "get_method",
    "magnitude_prune",
    "parse_nm",
    "prune_model",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
]
