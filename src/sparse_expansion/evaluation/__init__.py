"""Evaluation: perplexity by the SparseGPT/Wanda protocol."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
