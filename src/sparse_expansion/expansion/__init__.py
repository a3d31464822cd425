"""Sparse Expansion: every FFN linear becomes a mixture of sparse experts behind a PCA + k-means router."""

from ..layers import ExpertLinear, Router, SelectiveExpertLinear
from .build import ExpandStep, ExpansionConfig, ExpansionReport, RowScores, expand_linear, expand_model
from .fitting import fit_router

__all__ = ["ExpandStep", "ExpansionConfig", "ExpansionReport", "ExpertLinear", "Router", "RowScores",
           "SelectiveExpertLinear", "expand_linear", "expand_model", "fit_router"]
