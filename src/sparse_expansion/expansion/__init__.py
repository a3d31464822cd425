"""Sparse Expansion: every FFN linear becomes a mixture of SparseGPT experts behind a PCA + k-means router."""

from .build import ExpansionConfig, ExpansionReport, expand_model
from .costs import ffn_costs
from .modules import ExpertLinear
from .router import Router, fit_router
from .storage import is_expanded_dir, load_expanded, save_expanded

__all__ = [
    "ExpansionConfig",
    "ExpansionReport",
    "ExpertLinear",
    "Router",
    "expand_model",
    "ffn_costs",
    "fit_router",
    "is_expanded_dir",
    "load_expanded",
    "save_expanded",
]
