"""Sparse Expansion: every FFN linear becomes a mixture of sparse experts behind a PCA + k-means router."""

from ..layers import ExpertLinear, Router
from .build import ExpandStep, ExpansionConfig, ExpansionReport, expand_model
from .fitting import fit_router

__all__ = ["ExpandStep", "ExpansionConfig", "ExpansionReport", "ExpertLinear", "Router", "expand_model", "fit_router"]
