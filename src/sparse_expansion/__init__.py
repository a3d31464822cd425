"""sparse-expansion: one-shot pruning and Sparse Expansion of Hugging Face causal LMs."""

from .errors import UsageError

__version__ = "0.1.0"

__all__ = ["UsageError", "__version__"]
